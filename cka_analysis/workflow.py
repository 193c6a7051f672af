"""One pruning run from a typed request: what the CLI, the dashboard and the benchmarks all call.

* :class:`PruneRequest` — everything a run depends on (model, data, calibration, criterion, target, recovery,
  evaluation, device), validated once when it is built: a mistake is a ConfigError naming the argument and the
  fix, raised before anything is loaded, scored or written.
* :func:`run_prune` — runs a request: opens the model, checks the blocks/target against the blocks' costs, loads the
  data, prunes (:func:`cka_analysis.pruning.prune`, one-shot or iterative), recovers the accuracy
  (:func:`cka_analysis.recovery.recover`, per step and at the end, within one image budget), evaluates and times
  the result. Progress and cancel are honoured throughout; a resume directory lets a killed run go on.
* :class:`PruneRecord` — the typed record of a run (steps, costs, accuracies, recovery, latency) with
  :meth:`~PruneRecord.to_dict`/:meth:`~PruneRecord.from_dict`: what ``report.json`` holds, what the dashboard keeps
  in its session and what the figures take.

* :func:`estimate_run` / :func:`estimate_further` — how long a run (or a further recovery) will take on its device,
  said before it starts by the CLI and the dashboard and kept in the record (``estimated_seconds``) beside the
  actual ``seconds``.

"N test images" means the same images everywhere: :func:`eval_subset` (a class-balanced, seeded subset, see
:func:`~cka_analysis.data.calibration_subset`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import Dataset, Subset

from .choices import CRITERION_INFO, DEFAULT_CALIBRATION_IMAGES, DEFAULT_CAPACITY_WEIGHT, criterion_info
from .device import describe_device, describe_devices
from .errors import CheckpointError, ConfigError
from .metrics import format_duration
from .progress import CancelToken, ProgressFn, no_progress
from .pruning import (
    PruneHooks,
    PruneResult,
    PruneStep,
    ResumeStore,
    ScoringOptions,
    Target,
    check_reachable,
    prune,
)
from .records import LatencyRecord, RecoveryRecord

if TYPE_CHECKING:
    from .recovery import RecoveryConfig

__all__ = [
    "EVAL_BATCH",
    "Measurement",
    "PruneData",
    "PruneOutcome",
    "PruneRecord",
    "PruneRequest",
    "RunEstimate",
    "check_feasible",
    "estimate_further",
    "estimate_run",
    "eval_subset",
    "fit_recovery",
    "forward_seconds_per_image",
    "further_recovery",
    "load_probe",
    "load_seconds_per_image",
    "records_equal",
    "recover_further",
    "recovery_stand_in",
    "run_prune",
]

#: Batch size of the accuracy evaluations (at least the request's batch size).
EVAL_BATCH = 256
RECORD_FORMAT = "cka-prune-record/1"
_AMP = ("none", "fp16", "bf16")
#: Where accuracies are measured: the test split, or training images held out of calibration and recovery.
EVAL_SPLITS = ("test", "validation")


def eval_subset(dataset: Dataset, samples: int | None, seed: int = 0) -> Dataset:
    """The "N test images" of every accuracy number: a class-balanced, seeded subset (all images when ``samples``
    is None or not smaller than the split). Image folders list files class by class, so the first N would be one
    class; the same (split, N, seed) gives the same images in the CLI, the dashboard and the benchmarks."""
    from .data import calibration_subset

    if samples is None:
        return dataset
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"eval_samples={samples!r} must be a positive whole number of test images (or None: all)")
    if samples >= len(dataset):  # type: ignore[arg-type]
        return dataset
    sub = calibration_subset(dataset, max(samples, 4), seed=seed)
    return sub if samples >= 4 else Subset(dataset, sub.indices[:samples])


# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, fix: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number ≥ {minimum}; {fix}")


@dataclass(frozen=True)
class PruneRequest:
    """Everything one pruning run depends on; validated when built (ConfigError naming the argument and the fix).

    Attributes:
        model: a registry name, ``timm:NAME``, ``hf:DIR_OR_ID``, ``factory:MODULE:FUNCTION`` or a directory
            written by ``save_pruned`` (opened with ``weights``, ``num_classes`` and ``block_patterns``), or a
            model already built (carrying its preset; not modified).
        block_patterns: for ``timm:``/``hf:``/``factory:`` models, the residual blocks as names or glob patterns
            (default: the blocks :func:`~cka_analysis.blocks.discover_blocks` finds).
        data: the data spec (``digits``, ``cifar10[:ROOT]``, ``imagefolder:ROOT``, ...); ``download`` allows
            fetching CIFAR.
        calibration_samples, calibration_seed: class-balanced calibration images from the training split.
        criterion, debiased: removal criterion (:data:`~cka_analysis.choices.CRITERIA`).
        capacity_weight: the knob of the ``cka_capacity`` criterion (the exponent of each block's parameter
            ratio, :func:`~cka_analysis.scoring.capacity_adjusted`; 0 = plain ``cka`` order); other criteria
            ignore it.
        target: how much to prune (:class:`~cka_analysis.pruning.Target` or text such as ``"macs:50%"``), or
            ``blocks``: which blocks to remove by hand (exactly one of the two).
        iterative: rescore after each removal, with a share of the recovery budget after each step (the paper).
        recovery: :class:`~cka_analysis.recovery.RecoveryConfig` or its text (``quick``, ``standard``, ``none``,
            or a number of training images); default ``quick``.
        eval_samples, eval_seed: accuracies on this many test images (:func:`eval_subset`; None = all of them).
        eval_split: ``"test"`` (the default) or ``"validation"``: accuracies on training images held out of
            calibration and recovery (:func:`~cka_analysis.data.validation_indices`: 5,000 of CIFAR-10's 50,000,
            a tenth of a smaller split), for choosing recipes and plans without looking at the test split.
        device, amp, batch_size: where and how to compute (``amp``: none | fp16 | bf16, CUDA only).
        seed: seeds everything in the run: scoring, recovery (unless the request's
            :class:`~cka_analysis.recovery.RecoveryConfig` sets its own ``seed``) and, unless given, the
            calibration and evaluation subsets.
        latency: time the unpruned and pruned models for the record.
        latency_batch_size: the batch size of that timing and of a latency target's per-block costs.
        num_workers: data-loading workers of the evaluation loader (None: automatic).
    """

    model: str | nn.Module
    data: str = "digits"
    weights: str | None = None
    num_classes: int | None = None
    block_patterns: tuple[str, ...] | None = None
    download: bool = False
    calibration_samples: int = DEFAULT_CALIBRATION_IMAGES
    calibration_seed: int | None = None
    criterion: str = "cka"
    debiased: bool = False
    capacity_weight: float = DEFAULT_CAPACITY_WEIGHT
    target: Target | str | None = None
    blocks: tuple[str, ...] | None = None
    iterative: bool = False
    recovery: RecoveryConfig | str | int = "quick"
    eval_samples: int | None = None
    eval_seed: int | None = None
    eval_split: str = "test"
    device: str = "auto"
    amp: str = "none"
    batch_size: int = 128
    seed: int = 0
    latency: bool = True
    latency_batch_size: int = 1
    num_workers: int | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def macs_target(self) -> float | None:
        """The fraction of MACs to remove when the target is a MACs target, else None (what a recovery estimate
        looks up its reference curve by)."""
        t = self.target
        return t.value if isinstance(t, Target) and t.kind == "macs" else None

    def _normalise(self) -> None:
        from .recovery import RecoveryConfig

        if isinstance(self.target, str):
            self._set("target", Target.parse(self.target))
        if isinstance(self.block_patterns, str):
            self._set("block_patterns", tuple(b.strip() for b in self.block_patterns.split(",") if b.strip()) or None)
        elif self.block_patterns is not None:
            self._set("block_patterns", tuple(self.block_patterns) or None)
        if isinstance(self.blocks, str):
            self._set("blocks", tuple(b.strip() for b in self.blocks.split(",") if b.strip()))
        elif self.blocks is not None:
            self._set("blocks", tuple(self.blocks))
        _positive_int("seed", self.seed, "give an integer seed such as 0", minimum=0)
        if isinstance(self.recovery, (str, int)) and not isinstance(self.recovery, bool):
            self._set("recovery", RecoveryConfig.parse(str(self.recovery)))
        if isinstance(self.recovery, RecoveryConfig):  # the request's seed, unless the config sets its own
            self._set("recovery", self.recovery.seeded(self.seed))
        if self.calibration_seed is None:
            self._set("calibration_seed", self.seed)
        if self.eval_seed is None:
            self._set("eval_seed", self.seed)

    def validate(self) -> None:
        """Check every field; raises ConfigError naming the first bad argument and how to fix it."""
        from .data import parse_data_spec
        from .recovery import RecoveryConfig

        if isinstance(self.model, str):
            if not self.model.strip():
                raise ConfigError("model='' is empty; give a registry name (see `cka-prune models`) or a directory")
        elif not isinstance(self.model, nn.Module) or getattr(self.model, "cka_preset", None) is None:
            raise ConfigError("model must be a registry name, a saved directory, or a model built with "
                              "cka_analysis.models.build_model (it carries its preset)")
        parse_data_spec(self.data)
        criterion_info(self.criterion)
        cw = self.capacity_weight
        if isinstance(cw, bool) or not isinstance(cw, (int, float)) or not cw >= 0 or cw == float("inf"):
            raise ConfigError(f"capacity_weight={cw!r} must be a number ≥ 0 (the cka_capacity knob; 0 = plain cka "
                              f"order, default {DEFAULT_CAPACITY_WEIGHT:g})")
        if (self.target is None) == (self.blocks is None):
            raise ConfigError("give exactly one of target= (how much to prune, e.g. 'macs:50%') or blocks= "
                              "(which blocks to remove)")
        if self.target is not None and not isinstance(self.target, Target):
            raise ConfigError(f"target={self.target!r} must be a Target or text such as 'macs:50%' or '3 blocks'")
        if self.blocks is not None and (not self.blocks or not all(isinstance(b, str) for b in self.blocks)):
            raise ConfigError("blocks= must name at least one block, e.g. ('layer1.1', 'layer2.2')")
        if self.blocks is not None and self.iterative:
            raise ConfigError("iterative=True needs a target: blocks chosen by hand are removed in one go")
        _positive_int("calibration_samples", self.calibration_samples,
                      f"CKA needs at least 4 calibration images ({DEFAULT_CALIBRATION_IMAGES} is the default)", minimum=4)
        _positive_int("batch_size", self.batch_size, "use e.g. 128")
        _positive_int("latency_batch_size", self.latency_batch_size, "use 1 for single-image latency")
        if self.eval_samples is not None:
            _positive_int("eval_samples", self.eval_samples, "or None to evaluate on the whole test split")
        if self.eval_split not in EVAL_SPLITS:
            raise ConfigError(f"eval_split={self.eval_split!r} must be one of {', '.join(EVAL_SPLITS)}")
        if self.amp not in _AMP:
            raise ConfigError(f"amp={self.amp!r} must be one of {', '.join(_AMP)}")
        if not isinstance(self.recovery, RecoveryConfig):
            raise ConfigError(f"recovery={self.recovery!r} must be a RecoveryConfig or its text: quick, "
                              "standard, none, or a number of training images")
        if self.num_workers is not None:
            _positive_int("num_workers", self.num_workers, "0 loads in the main process", minimum=0)

    # -------------------------------------------------------------------------------------------- derived
    @property
    def needs_calibration(self) -> bool:
        return self.blocks is None and CRITERION_INFO[self.criterion].needs_data

    def describe_model(self) -> dict[str, Any]:
        """The model as JSON: its name and weights (a built model: its architecture, weights and removed blocks)."""
        if isinstance(self.model, str):
            out = {"model": self.model, "weights": self.weights, "num_classes": self.num_classes}
            return {**out, "block_patterns": list(self.block_patterns)} if self.block_patterns else out
        from .blocks import removed_blocks

        preset = self.model.cka_preset
        out = {"model": preset.arch, "weights": preset.weights, "num_classes": preset.num_classes,
               "removed_before": removed_blocks(self.model)}
        origin = getattr(self.model, "cka_origin", None)  # set by open_model: what reopens it
        return {**out, "origin": dict(origin)} if origin else out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` rebuilds an equal request (a built model is named by its description)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "model":
                out.update(self.describe_model())
            elif f.name in ("weights", "num_classes", "block_patterns"):
                continue
            elif f.name == "target":
                out["target"] = None if v is None else v.to_dict()
            elif f.name == "blocks":
                out["blocks"] = None if v is None else list(v)
            elif f.name == "recovery":
                out["recovery"] = v.to_dict()
            else:
                out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> PruneRequest:
        """A request from :meth:`to_dict`'s output (``overrides`` replace fields, e.g. ``model=`` a built one)."""
        from .recovery import RecoveryConfig

        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if kw.get("target") is not None and isinstance(kw["target"], Mapping):
            kw["target"] = Target.from_dict(kw["target"])
        if kw.get("blocks") is not None:
            kw["blocks"] = tuple(kw["blocks"])
        if isinstance(kw.get("recovery"), Mapping):
            kw["recovery"] = RecoveryConfig.from_dict(kw["recovery"])
        kw.update(overrides)
        return cls(**kw)

    def resume_key(self) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (not the device, evaluation or timing)."""
        d = self.to_dict()
        for k in ("device", "eval_samples", "eval_seed", "latency", "num_workers", "download"):
            d.pop(k, None)
        return d


# ---------------------------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Costs (MACs for one image, parameters) and top-1 accuracy (%, None when not measured) of one model."""

    macs: int
    params: int
    accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "params": self.params, "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        return cls(int(d["macs"]), int(d["params"]), d.get("accuracy"))


@dataclass
class PruneRecord:
    """What a pruning run did and reached; ``report.json`` is :meth:`to_dict`.

    Attributes:
        request: the request's :meth:`PruneRequest.to_dict`.
        arch, criterion (None: blocks by hand), iterative, target (a :class:`~cka_analysis.pruning.Target` or None).
        removed: the blocks removed, in order. steps: :class:`~cka_analysis.pruning.PruneStep` per removal
            (step 0 = unpruned; per-step recovery records in ``steps[i].recovery``).
        base, after_removal, final: the unpruned model, the pruned one before the final recovery, and the result.
        recovery: the final recovery's :class:`~cka_analysis.records.RecoveryRecord` (config, images seen,
            history, ...; ``further``: extra recoveries from :func:`recover_further`), None when there was none.
        images_seen: training images drawn by all recoveries together (≤ the recovery budget).
        latency_ms: a :class:`~cka_analysis.records.LatencyRecord` (median ms of the unpruned and pruned model, and
            for a latency target the prediction and its error), None when not measured.
        robustness: optional robustness results added by the caller.
        cancelled: the run was cancelled; what it finished is kept. seconds: wall time of the run; of a resumed
            run, this part plus ``resumed_seconds``: the time the interrupted run had spent on what this one
            reused (the saved scores or iterative steps, as saved, and the recovery's training before its
            checkpoint, ``recovery.resumed_seconds``; the work after the last checkpoint is lost and not counted).
        estimated_seconds: what :func:`estimate_run` said the run would take before it started (None when no
            estimate was made), kept beside ``seconds`` so that every estimate can be checked against the truth
            (of a resumed run: what was left, against ``seconds − resumed_seconds``).
        device: what the run computed on, in words (``"cuda (NVIDIA H200)"``, ``"cpu (2 threads)"``); where a
            resumed recovery's earlier part ran is in ``recovery.devices`` (see :meth:`where`). None in reports
            written before it was recorded.
    """

    request: dict[str, Any]
    arch: str
    criterion: str | None
    iterative: bool
    target: Target | None
    removed: list[str]
    steps: list[PruneStep]
    base: Measurement
    after_removal: Measurement
    final: Measurement
    recovery: RecoveryRecord | None = None
    images_seen: int = 0
    latency_ms: LatencyRecord | None = None
    robustness: dict[str, Any] | None = None
    cancelled: bool = False
    seconds: float = 0.0
    estimated_seconds: float | None = None
    device: str | None = None
    resumed_seconds: float = 0.0

    @property
    def macs_reduction(self) -> float:
        return 1 - self.final.macs / self.base.macs if self.base.macs else 0.0

    @property
    def params_reduction(self) -> float:
        return 1 - self.final.params / self.base.params if self.base.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": RECORD_FORMAT, "request": self.request, "arch": self.arch, "criterion": self.criterion,
            "iterative": self.iterative, "target": None if self.target is None else self.target.to_dict(),
            "removed": list(self.removed),
            "steps": [s.to_dict() for s in self.steps], "base": self.base.to_dict(),
            "after_removal": self.after_removal.to_dict(),
            "final": {**self.final.to_dict(), "macs_reduction": self.macs_reduction,
                      "params_reduction": self.params_reduction, "removed": list(self.removed)},
            "recovery": None if self.recovery is None else self.recovery.to_dict(), "images_seen": self.images_seen,
            "latency_ms": None if self.latency_ms is None else self.latency_ms.to_dict(),
            "robustness": self.robustness, "cancelled": self.cancelled, "seconds": self.seconds,
        }
        if self.estimated_seconds is not None:  # absent from reports written before estimates were recorded
            out["estimated_seconds"] = self.estimated_seconds
        if self.device is not None:  # likewise
            out["device"] = self.device
        if self.resumed_seconds:  # only a resumed run has it
            out["resumed_seconds"] = self.resumed_seconds
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneRecord:
        """The record :meth:`to_dict` wrote (derived keys such as the reductions are recomputed)."""
        if d.get("format") != RECORD_FORMAT:
            raise ConfigError(f"not a pruning record (format {d.get('format')!r}, expected {RECORD_FORMAT!r})")
        return cls(
            request=dict(d["request"]), arch=d["arch"], criterion=d["criterion"], iterative=bool(d["iterative"]),
            target=None if d["target"] is None else Target.from_dict(d["target"]), removed=list(d["removed"]),
            steps=[PruneStep.from_dict(s) for s in d["steps"]],
            base=Measurement.from_dict(d["base"]), after_removal=Measurement.from_dict(d["after_removal"]),
            final=Measurement.from_dict(d["final"]),
            recovery=None if d.get("recovery") is None else RecoveryRecord.from_dict(d["recovery"]),
            images_seen=int(d.get("images_seen", 0)),
            latency_ms=None if d.get("latency_ms") is None else LatencyRecord.from_dict(d["latency_ms"]),
            robustness=d.get("robustness"), cancelled=bool(d.get("cancelled")), seconds=float(d.get("seconds", 0)),
            estimated_seconds=d.get("estimated_seconds"), device=d.get("device"),
            # older reports: the recovery's part was the only one counted
            resumed_seconds=float(d.get("resumed_seconds", (d.get("recovery") or {}).get("resumed_seconds", 0.0))),
        )

    # ------------------------------------------------------------------------------------------------ views
    def describe(self) -> str:
        """One line: how the blocks were chosen and how much (e.g. ``cka iterative, ≥ 50 % fewer MACs``)."""
        how = "by hand" if self.criterion is None else \
            f"{self.criterion} {'iterative' if self.iterative else 'one-shot'}"
        if self.target is None:
            return f"{how}, {len(self.removed)} chosen block(s)"
        return f"{how}, {self.target.describe()}"

    def where(self) -> str | None:
        """What the run computed on, in words; for a recovery resumed on another device (or thread count), each
        stretch of it too: ``"cpu (2 threads); its recovery: cpu (1 threads) to step 17,200, then cpu (2
        threads)"``. None when the record does not say (reports written before it was recorded)."""
        stretches = describe_devices(self.recovery.devices) if self.recovery is not None else None
        if stretches is None or stretches == self.device:
            return self.device
        return stretches if self.device is None else f"{self.device}; its recovery: {stretches}"

    def recovery_name(self) -> str:
        """The recovery asked for, in words (``quick``, ``12,000 images``, ``none``)."""
        cfg = self.request.get("recovery") or {}
        name = (cfg.get("name") or f"{cfg['images']:,} images") if cfg.get("images") else "none"
        if cfg.get("preset_images"):
            name += f" (capped at {cfg['images']:,} images: a few epochs of the training split)"
        further = [] if self.recovery is None else [f.config for f in self.recovery.further]
        return name + "".join(f" + {f.name or format(f.images, ',') + ' images'}" for f in further)

    def summary(self) -> str:
        """The plain-text table the CLI prints: accuracy, MACs, parameters and latency before and after."""
        def acc(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f} %"

        lat = self.latency_ms

        def ms(key: str) -> str:
            return "-" if lat is None else f"{getattr(lat, key):.2f} ms"

        rows = [("original", self.base, ms("base")), ("removed", self.after_removal, ""),
                ("pruned", self.final, ms("pruned"))]
        lines = [f"removed {len(self.removed)} block(s): {', '.join(self.removed) or '-'}",
                 f"{'':<10}{'accuracy':>12}{'MACs':>12}{'params':>12}{'latency':>12}"]
        lines += [f"{name:<10}{acc(m.accuracy):>12}{_fmt_int(m.macs):>12}{_fmt_int(m.params):>12}{t:>12}"
                  for name, m, t in rows]
        lines.append(f"MACs −{100 * self.macs_reduction:.1f} %, parameters −{100 * self.params_reduction:.1f} %; "
                     f"recovery {self.recovery_name()}: {self.images_seen:,} training images"
                     + (" (cancelled: what finished was kept)" if self.cancelled else ""))
        if lat is not None and lat.predicted_reduction is not None:
            lines.append(f"latency −{100 * lat.measured_reduction:.1f} % measured at batch {lat.batch_size} "
                         f"(predicted −{100 * lat.predicted_reduction:.1f} %, error {100 * lat.error:+.1f} points)")
        if self.where() is not None:
            lines.append(f"took {format_duration(self.seconds)} on {self.where()}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The record as Markdown (the dashboard's report and ``report.md``)."""
        from .export import markdown_table

        out = [f"- Removed (in order): {', '.join(self.removed) or 'nothing'}",
               f"- How: {self.describe()}",
               f"- Recovery: {self.recovery_name()}, {self.images_seen:,} training images"
               + (" (cancelled)" if self.cancelled else ""),
               *([f"- Took {format_duration(self.seconds)} on {self.where()}"] if self.where() else []), "",
               markdown_table(["", "accuracy %", "MACs", "params"],
                              [[n, m.accuracy, m.macs, m.params] for n, m in
                               (("original", self.base), ("after removal", self.after_removal),
                                ("pruned", self.final))]),
               "", f"MACs reduction {100 * self.macs_reduction:.1f} %, parameter reduction "
               f"{100 * self.params_reduction:.1f} %.", "", "### Trajectory", "",
               markdown_table(["step", "removed", "MACs", "params", "accuracy %"],
                              [[s.step, ", ".join(s.removed), s.macs, s.params, s.accuracy] for s in self.steps])]
        return "\n".join(out)


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


@dataclass
class PruneOutcome:
    """The pruned model and its record."""

    model: nn.Module
    record: PruneRecord


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PruneData:
    """The splits a run reads; missing ones are loaded from the request's data spec when needed.

    The dashboard passes the datasets it already holds (same spec, same preset), the CLI lets them load.
    ``train`` is the plain training split (calibration), ``train_augmented`` the same with the training
    augmentation (recovery), ``test`` the test split (accuracies). For a request with ``eval_split="validation"``,
    :meth:`filled` makes ``test`` the held-out training images and ``train``/``train_augmented`` the rest.
    """

    train: Dataset | None = None
    test: Dataset | None = None
    train_augmented: Dataset | None = None

    def filled(self, request: PruneRequest, preset: Any, *, recovery: bool,
               progress: ProgressFn | None = None) -> PruneData:
        """A copy with every split this request needs loaded (checked against the model's classes)."""
        from .data import (
            VALIDATION_IMAGES,
            check_num_classes,
            load_dataset,
            parse_data_spec,
            validation_indices,
        )

        spec = parse_data_spec(request.data)
        folder = spec.kind == "imagefolder"

        def load(split: str, augment: bool, whole: bool) -> Dataset:
            ds = load_dataset(spec, split, preset, augment=augment, download=request.download,
                              in_memory=folder and whole, progress=progress)
            check_num_classes(ds, preset.num_classes)
            return ds

        out = replace(self)
        if request.eval_split == "validation" and out.test is None:
            plain = load("train", False, True)
            aug = load("train", True, True) if recovery else None
            n = len(plain)
            keep, held = validation_indices(n, min(VALIDATION_IMAGES, max(1, n // 10)))
            out.test = Subset(plain, held)
            out.train = Subset(plain, keep)
            out.train_augmented = None if aug is None else Subset(aug, keep)
            return out
        if out.test is None:
            out.test = load("test", False, request.eval_samples is None)
        if out.train is None and request.needs_calibration:
            out.train = load("train", False, False)
        if out.train_augmented is None and recovery:
            out.train_augmented = load("train", True, True)
        return out


# ---------------------------------------------------------------------------------------------------------------
# Running a request
# ---------------------------------------------------------------------------------------------------------------


def _open(request: PruneRequest) -> nn.Module:
    """A private copy of the request's model (never the caller's object: runs move and modify it)."""
    if isinstance(request.model, nn.Module):
        return copy.deepcopy(request.model).eval()
    from .export import open_model

    return open_model(request.model, weights=request.weights, num_classes=request.num_classes,
                      block_patterns=list(request.block_patterns) if request.block_patterns else None)


def check_feasible(request: PruneRequest, model: nn.Module) -> None:
    """Refuse blocks that are not removable and targets out of reach, from the blocks' costs alone (before any
    data is read, anything scored or a file written)."""
    from .blocks import find_blocks
    from .metrics import count_macs, count_params
    from .pruning import plan

    blocks = find_blocks(model)
    macs, params = count_macs(model, model.cka_preset.input_size), count_params(model)
    if request.blocks is not None:
        plan(blocks, None, base_macs=macs, base_params=params, chosen=list(request.blocks))
    elif request.target.kind != "latency":  # a latency target needs measured costs: prune() checks it
        check_reachable(blocks, request.target, base_macs=macs, base_params=params)


def recovery_stand_in(request: PruneRequest, model: nn.Module) -> nn.Module:
    """A model of the size ``request`` will leave, to time its recovery before anything is scored: the blocks named
    by hand, or blocks taken in forward order until the MACs, parameter or block-count target is met (a CIFAR
    ResNet's blocks all cost the same MACs, so any set that meets the target trains at about the same speed); the
    unpruned model itself for a latency target, whose blocks' costs are not measured yet."""
    from .blocks import find_blocks, remove_blocks
    from .metrics import count_macs, count_params
    from .pruning import plan

    if request.blocks is not None:
        return remove_blocks(model, request.blocks)
    if request.target is None or request.target.kind == "latency":
        return model
    blocks = find_blocks(model)
    uniform = {b.name: 0.0 for b in blocks if b.removable}
    chosen = plan(blocks, uniform, request.target, base_macs=count_macs(model, model.cka_preset.input_size),
                  base_params=count_params(model)).blocks
    return remove_blocks(model, chosen)


def fit_recovery(request: PruneRequest, train: Dataset | int) -> PruneRequest:
    """``request`` with its recovery budget fitted to the training split ``train`` (a dataset or its size): a
    named preset is capped to a few epochs of a small split (:meth:`RecoveryConfig.fit_to
    <cka_analysis.recovery.RecoveryConfig.fit_to>`); anything else is returned as it is."""
    n = train if isinstance(train, int) else len(train)  # type: ignore[arg-type]
    fitted = request.recovery.fit_to(n)
    return request if fitted == request.recovery else replace(request, recovery=fitted)


#: Forward-pass probes batch as many images as fit in this many multiply-accumulates (64 of ResNet-56, 4 of a
#: ResNet-50), within PROBE_BATCH: CPU throughput at batch 16 is a quarter of that at 128 on ResNet-56.
PROBE_MACS = 8e9
PROBE_BATCH = (4, 64)
#: Rounds of the latency timing in a run (:data:`cka_analysis.latency.COMPARE_TIMING`: 3 warm-up + 20 timed).
_LATENCY_ROUNDS = 23


@dataclass
class RunEstimate:
    """How long a run (or a further recovery) will take here, said before it starts: :func:`estimate_run`.

    Attributes:
        seconds: the whole run (of a resumed run: what is left of it). phases: seconds by phase (``scoring``,
            ``evaluation``, ``recovery``, ``latency``, ``bookkeeping``). recovery:
            :func:`~cka_analysis.recovery.estimate_recovery`'s answer for the budget that will be spent (after
            :func:`fit_recovery`; for the whole budget, also when resumed), with the reference benchmark's
            accuracy drop; None without recovery. request: the request as it will run (its budget fitted to the
            training split). resumed: for a run that goes on from its checkpoint folder, what it will not redo
            (``scores``: saved one-shot scores reused; ``removals_done``: iterative steps saved; ``step``/``total``:
            where the final recovery goes on), else None.
    """

    seconds: float
    phases: dict[str, float]
    recovery: dict[str, Any] | None
    request: PruneRequest
    resumed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "phases": dict(self.phases), "recovery": self.recovery,
                "resumed": self.resumed}


#: The file in a run's checkpoint folder that holds its final recovery's training state.
RECOVERY_CHECKPOINT = "recovery.pt"


def resumed_phases(phases: Mapping[str, float], *, scores_saved: bool, step: int | None, total: int | None,
                   removals: int = 1, removals_done: int = 0, step_share: float = 0.0) -> dict[str, float]:
    """The phases of :func:`estimate_run` that are left for a run resumed from its checkpoint folder.

    One-shot: no scoring when its scores were saved, and the final recovery's share of steps not yet done
    (``step`` of ``total``). Iterative (``removals`` steps planned, ``removals_done`` of them saved): the scoring of
    the steps left, and of the recovery budget the per-step share (``step_share``) of the steps left plus the final
    recovery's share of its steps not yet done. The evaluations stay whole.
    """
    left = dict(phases)
    todo = max(0, removals - removals_done) / max(1, removals)
    if "scoring" in left:
        left["scoring"] *= 0.0 if scores_saved else todo
    if "recovery" in left:
        final = 1.0 - step / total if step is not None and total else 1.0
        left["recovery"] *= step_share * todo + (1.0 - step_share) * max(0.0, final)
    return left


def forward_seconds_per_image(model: nn.Module, device: str | Any = "auto") -> float:
    """Measured seconds of one forward pass per image of ``model`` on ``device``, at a batch like real work's
    (:data:`PROBE_MACS`); the probe of every time estimate (:func:`~cka_analysis.metrics.estimate_seconds`)."""
    from .metrics import count_macs, estimate_seconds

    macs = max(1, count_macs(model, model.cka_preset.input_size))
    low, high = PROBE_BATCH
    batch = int(min(high, max(low, PROBE_MACS // macs)))
    return estimate_seconds(model, batch, 1.0, device, batch_size=batch, repeats=1).per_image_s


def load_seconds_per_image(dataset: Dataset, images: int = 32) -> float:
    """Measured seconds to read and transform one image of ``dataset`` (``images`` of them, spread over the
    split): what a data loader pays per image besides the model's arithmetic (on the digits demo as much as the
    forward pass itself)."""
    from .data import make_loader

    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return 0.0
    count = min(images, n)
    probe = Subset(dataset, [(i * n) // count for i in range(count)])
    start = time.perf_counter()
    for _ in make_loader(probe, batch_size=count, shuffle=False, num_workers=0):
        pass
    return (time.perf_counter() - start) / count


#: The two probe sizes of :func:`load_probe`: their difference is what one more image costs.
LOAD_PROBE_IMAGES = (16, 80)


def load_probe(dataset: Dataset) -> tuple[float, float]:
    """Measured ``(seconds per image, start-up seconds)`` of reading and transforming ``dataset``'s images.

    The slope between two probes (:data:`LOAD_PROBE_IMAGES`, spread over the split) is the per-image cost; what
    the smaller one took beyond it is the loader's start-up, paid once per pass and not per image (a single
    32-image probe said 47 µs an image on the digits demo where one more image costs 7 µs, which counted the
    start-up thousands of times over a recovery's images; on CIFAR-10's JPEG test split it said 2.5 ms an image).
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        return 0.0, 0.0
    small, large = LOAD_PROBE_IMAGES
    t_small = load_seconds_per_image(dataset, small) * min(small, n)
    t_large = load_seconds_per_image(dataset, large) * min(large, n)
    rate = (t_large - t_small) / (large - small) if n > large else t_large / min(large, n)
    if rate <= 0:
        rate = t_large / min(large, n)
    return rate, max(0.0, t_small - rate * min(small, n))


def _load_rate(dataset: Dataset) -> float:
    return load_probe(dataset)[0]


def estimate_run(request: PruneRequest, model: nn.Module, data: PruneData, *,
                 per_image_s: float | None = None, resume_dir: str | Path | None = None) -> RunEstimate:
    """What :func:`run_prune` of ``request`` will take on its device, before it starts: the one time estimate of
    a run, which the CLI announces, the dashboard shows and the ``estimates`` benchmark checks against the truth.

    ``model`` is the unpruned model; ``data`` holds the splits the run will read (their sizes set the work:
    :meth:`PruneData.filled`). Scoring, the accuracy evaluations and the latency timing are forward passes at the
    probed rate (``per_image_s``: a rate already measured for this model and device, else probed here); the
    recovery is :func:`~cka_analysis.recovery.estimate_recovery` of the budget that will be spent, timed on
    :func:`recovery_stand_in`. ``resume_dir``: the checkpoint folder of a run that will resume from it (the CLI's
    ``--resume``): the estimate is what is left (:func:`resumed_phases`: saved scores, iterative steps and recovery
    steps).
    """
    from .blocks import find_blocks
    from .metrics import count_macs, estimate_seconds
    from .recovery import estimate_recovery

    recovering = request.recovery.images > 0
    if recovering and data.train_augmented is not None:
        request = fit_recovery(request, data.train_augmented)
    rate = per_image_s if per_image_s is not None else forward_seconds_per_image(model, request.device)
    n_test = len(eval_subset(data.test, request.eval_samples, request.eval_seed))  # type: ignore[arg-type]
    steps = 1
    if request.blocks is None and request.iterative:
        steps = _max_steps(request, model)
    phases: dict[str, float] = {}
    load_test = _load_rate(data.test)  # type: ignore[arg-type]
    if request.needs_calibration:
        removable = sum(b.removable for b in find_blocks(model))
        load_train = _load_rate(data.train) if data.train is not None else load_test
        # one pass over the calibration images, then the rest of the network after each candidate (about half)
        phases["scoring"] = (rate * (1 + removable / 2) + load_train) * request.calibration_samples * steps
    # the unpruned model and after each removal; with recovery, its start and end inside it, and for the record
    phases["evaluation"] = (rate + load_test) * n_test * (1 + steps + (3 if recovering else 0))
    rec = None
    if recovering:
        rec = dict(estimate_recovery(request.recovery, recovery_stand_in(request, model), model,
                                     device=request.device, macs_reduction=request.macs_target))
        train = data.train_augmented if data.train_augmented is not None else data.train
        load = _load_rate(train) if train is not None else load_test
        phases["recovery"] = float(rec["seconds"]) + load * request.recovery.images
    if request.latency:
        one = estimate_seconds(model, 1, 1.0, request.device, batch_size=1, repeats=3).per_image_s
        phases["latency"] = 2 * _LATENCY_ROUNDS * one * request.latency_batch_size
    # bookkeeping: the run counts MACs and parameters of the model before, at every step and after (a traced pass
    # each: 50 ms on the demo, more on deep networks)
    start = time.perf_counter()
    count_macs(model, model.cka_preset.input_size)
    phases["bookkeeping"] = (time.perf_counter() - start) * (4 + steps)
    resumed = None
    if resume_dir is not None:
        from .training import checkpoint_progress

        folder = Path(resume_dir)
        done = checkpoint_progress(folder / RECOVERY_CHECKPOINT) if recovering else None
        store = ResumeStore(folder, request.resume_key(), resume=True)
        try:  # saved parts count only when written with these settings (the run checks the same key)
            scores = not request.iterative and store.load_scores() is not None
            removed = store.iterative_removed() if request.iterative else None
        except CheckpointError:
            scores, removed = False, None  # another run's: the run itself refuses the folder, with its message
        if done is not None or scores or removed:
            step, total = done if done is not None else (None, None)
            resumed = {"scores": scores, "step": step, "total": total, "removals_done": len(removed or ())}
            share = 0.0
            if request.iterative and recovering and request.recovery.images:
                per_step, _ = request.recovery.split_iterative(steps)
                share = per_step * steps / request.recovery.images
            # the final recovery starts once every step is done (the target may need fewer than planned)
            finished = steps if done is not None else len(removed or ())
            phases = resumed_phases(phases, scores_saved=scores, step=step, total=total, removals=steps,
                                    removals_done=finished, step_share=share)
    return RunEstimate(seconds=sum(phases.values()), phases=phases, recovery=rec, request=request, resumed=resumed)


def estimate_further(record: PruneRecord, model: nn.Module, base: nn.Module, recovery: RecoveryConfig | str | int,
                     data: PruneData, *, per_image_s: float | None = None) -> RunEstimate:
    """What :func:`recover_further` will take: the same recovery estimate as :func:`estimate_run` (timed on the
    pruned ``model`` itself, distilling from ``base``) plus its one evaluation on the run's test images."""
    from .recovery import estimate_recovery

    request = PruneRequest.from_dict(record.request, model=base)
    config = further_recovery(record, recovery) if isinstance(recovery, (str, int)) else \
        recovery.seeded(request.seed)
    if data.train_augmented is not None:
        config = config.fit_to(len(data.train_augmented))  # type: ignore[arg-type]
    rate = per_image_s if per_image_s is not None else forward_seconds_per_image(base, request.device)
    n_test = len(eval_subset(data.test, request.eval_samples, request.eval_seed))  # type: ignore[arg-type]
    rec = dict(estimate_recovery(config, model, base, device=request.device, macs_reduction=record.macs_reduction))
    load_test = _load_rate(data.test)  # type: ignore[arg-type]
    load_train = _load_rate(data.train_augmented) if data.train_augmented is not None else load_test
    phases = {"evaluation": (rate + load_test) * n_test,
              "recovery": float(rec["seconds"]) + load_train * config.images}
    return RunEstimate(seconds=sum(phases.values()), phases=phases, recovery=rec,
                       request=replace(request, recovery=config))


def _max_steps(request: PruneRequest, model: nn.Module, costs: Any = None) -> int:
    """The most removals an iterative run can take for its target (cheapest blocks first): the per-step share
    of the recovery budget is computed for this many steps, so the steps never spend more than the budget."""
    from .blocks import find_blocks
    from .metrics import count_macs, count_params
    from .pruning import plan

    target = request.target
    if target.kind == "blocks":
        return int(target.value)
    blocks = find_blocks(model)
    block_ms = None if costs is None else costs.block_ms
    if target.kind == "latency":
        cost = {b.name: float(block_ms.get(b.name, 0.0)) for b in blocks if b.removable}
    else:
        cost = {b.name: float(b.params if target.kind == "params" else b.macs) for b in blocks if b.removable}
    p = plan(blocks, cost, target, base_macs=count_macs(model, model.cka_preset.input_size),
             base_params=count_params(model), block_costs=block_ms,
             base_latency=None if costs is None else costs.base_ms)
    return max(1, len(p.blocks))


class _Runner:
    """One :func:`run_prune` call: the opened model, its data, the evaluation and the recovery budget."""

    def __init__(self, request: PruneRequest, base: nn.Module, data: PruneData, progress: ProgressFn,
                 cancel: CancelToken | None, store: ResumeStore | None) -> None:
        from .data import calibration_subset, make_loader
        from .device import amp_dtype, resolve_device

        self.request, self.base, self.data = request, base, data
        self.progress, self.cancel, self.store = progress, cancel, store
        self.device = resolve_device(request.device)
        self.amp = amp_dtype(request.amp)
        self.calibration = (calibration_subset(data.train, request.calibration_samples,
                                               seed=request.calibration_seed)
                            if request.needs_calibration else None)
        self.test = eval_subset(data.test, request.eval_samples, request.eval_seed)
        self.test_loader = make_loader(self.test, batch_size=max(request.batch_size, EVAL_BATCH),
                                       num_workers=request.num_workers, device=self.device)
        self.images_seen = 0
        self.per_step = None
        self.costs = None

    def evaluate(self, model: nn.Module, *, cancellable: bool = True) -> float:
        """Top-1 on the request's test images; once the run is cancelled (or for the final number, which a
        cancelled run still reports) it is measured without the cancel token."""
        from .metrics import evaluate

        token = self.cancel if cancellable and not (self.cancel and self.cancel.cancelled) else None
        return evaluate(model, self.test_loader, device=self.device, amp=self.amp, cancel=token).top1

    def recover(self, model: nn.Module, config: RecoveryConfig, *, final: bool) -> RecoveryRecord:
        """Recover ``model`` in place with ``config``; the record of what it did."""
        from .recovery import recover

        self.progress(0, None, f"recovering the pruned model ({config.name or 'budget'}: {config.images:,} images)"
                      if final else f"recovering after the removal ({config.images:,} images)")
        ckpt = self.store.path(RECOVERY_CHECKPOINT) if (final and self.store is not None) else None
        res = recover(model, self.data.train_augmented, config, teacher=self.base,
                      eval_data=self.test if final else None, device=self.device, progress=self.progress,
                      cancel=self.cancel, checkpoint_path=ckpt,
                      resume=bool(final and self.store is not None and self.store.resume))
        self.images_seen += int(res.images_seen)
        return RecoveryRecord.from_result(res)

    def after_removal(self, model: nn.Module, step: int) -> RecoveryRecord | None:
        if self.per_step is None or self.per_step.images <= 0:
            return None
        return self.recover(model, self.per_step, final=False)

    def block_costs(self) -> Any:
        """Measured per-block latency of the base model for a latency target (cached by cka_analysis.latency)."""
        from .latency import measure_block_costs

        if self.request.target is None or self.request.target.kind != "latency":
            return None
        self.progress(0, None, "measuring the latency of every block")
        self.costs = measure_block_costs(self.base, batch_size=self.request.latency_batch_size,
                                         device=self.device, progress=self.progress, cancel=self.cancel)
        return self.costs

    def latency(self, pruned: nn.Module) -> LatencyRecord | None:
        """Base and pruned latency timed interleaved (and, for a latency target, predicted vs measured)."""
        from .distributed import is_main_process
        from .latency import check_prediction, compare_latency

        if not self.request.latency or not is_main_process():
            return None
        self.progress(0, None, "timing the original and the pruned model")
        if self.costs is not None:
            c = check_prediction(self.base, pruned, self.costs, device=self.device)
            return LatencyRecord(c.base_ms, c.pruned_ms, c.batch_size, c.device, predicted=c.predicted_ms,
                                 predicted_reduction=c.predicted_reduction, measured_reduction=c.measured_reduction,
                                 error=c.error, relative_error=c.relative_error, quantile=c.quantile,
                                 repeats=c.repeats)
        t = compare_latency({"base": self.base, "pruned": pruned}, batch_size=self.request.latency_batch_size,
                            device=self.device, reference="base")
        p = t["pruned"]
        return LatencyRecord(t["base"].median_ms, p.median_ms, self.request.latency_batch_size, t["base"].device,
                             ratio=p.ratio, ratio_p10=p.ratio_p10, ratio_p90=p.ratio_p90)


def _prune_step(runner: _Runner) -> PruneResult:
    """Score and remove blocks (one-shot or iterative, with per-step recoveries from the shared budget)."""
    req = runner.request
    cfg = req.recovery
    costs = runner.block_costs()
    if req.iterative and cfg.images > 0:
        per_step, _ = cfg.split_iterative(_max_steps(req, runner.base, costs))
        runner.per_step = cfg.with_images(per_step)
    hooks = PruneHooks(evaluate=runner.evaluate, after_removal=runner.after_removal, store=runner.store,
                       block_costs=None if costs is None else costs.block_ms,
                       base_latency=None if costs is None else costs.base_ms)
    scoring = ScoringOptions(debiased=req.debiased, batch_size=req.batch_size, device=runner.device,
                             amp=runner.amp, seed=req.seed, capacity_weight=float(req.capacity_weight))
    result = prune(runner.base, runner.calibration, target=req.target,
                   blocks_to_remove=None if req.blocks is None else list(req.blocks), criterion=req.criterion,
                   iterative=req.iterative, scoring=scoring, hooks=hooks, progress=runner.progress,
                   cancel=runner.cancel)
    # steps restored from a resume directory recovered before this process started
    runner.images_seen = sum(s.recovery.images_seen for s in result.steps if s.recovery is not None)
    return result


def _final_recovery(runner: _Runner, result: PruneResult) -> tuple[RecoveryRecord | None, bool]:
    cfg = runner.request.recovery
    left = cfg.images - runner.images_seen
    if result.cancelled or not result.removed or left <= 0:
        return None, False
    rec = runner.recover(result.model, cfg.with_images(left) if left != cfg.images else cfg, final=True)
    return rec, rec.cancelled


def run_prune(
    request: PruneRequest,
    *,
    data: PruneData | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    estimated_seconds: float | None = None,
) -> PruneOutcome:
    """Run ``request``: prune, recover, evaluate, time; returns the pruned model and its :class:`PruneRecord`.

    Bad input (an unknown model, block or data folder, a target out of reach) raises before anything is scored
    or written. ``data`` supplies splits already loaded (else they are loaded from ``request.data``).
    ``checkpoint_dir`` keeps the finished parts (scores, iterative steps, the recovery state) so that a killed run
    goes on with ``resume=True``; it is created only once there is something to keep. A cancel keeps what
    finished (the blocks removed so far, the recovered weights) and sets ``record.cancelled``.
    A named recovery budget is capped to a few epochs of a small training split (:meth:`RecoveryConfig.fit_to
    <cka_analysis.recovery.RecoveryConfig.fit_to>`); the record's request holds the budget that was spent.
    ``estimated_seconds`` (what :func:`estimate_run` said beforehand) is kept in the record beside the actual time.
    """
    progress = progress or no_progress
    start = time.perf_counter()
    base = _open(request)
    check_feasible(request, base)
    recovering = request.recovery.images > 0
    data = (data or PruneData()).filled(request, base.cka_preset, recovery=recovering, progress=progress)
    if recovering:
        request = fit_recovery(request, data.train_augmented)
    store = None if checkpoint_dir is None else ResumeStore(checkpoint_dir, request.resume_key(), resume=resume)
    runner = _Runner(request, base, data, progress, cancel, store)
    result = _prune_step(runner)
    after = result.steps[-1]
    recovery, cancelled = _final_recovery(runner, result)
    final_acc = after.accuracy if recovery is None else runner.evaluate(result.model, cancellable=False)
    final_macs, final_params = after.macs, after.params
    if any(r is not None and r.adaptors for r in (*(s.recovery for s in result.steps), recovery)):
        from .metrics import count_macs, count_params  # fitted adaptors stay in the model and cost MACs

        final_macs = count_macs(result.model, result.model.cka_preset.input_size)
        final_params = count_params(result.model)
    record = PruneRecord(
        request=request.to_dict(), arch=result.arch, criterion=result.criterion, iterative=result.iterative,
        target=result.target, removed=list(result.removed),
        steps=result.steps, base=Measurement(result.steps[0].macs, result.steps[0].params, result.steps[0].accuracy),
        after_removal=Measurement(after.macs, after.params, after.accuracy),
        final=Measurement(final_macs, final_params, final_acc), recovery=recovery, images_seen=runner.images_seen,
        latency_ms=runner.latency(result.model), cancelled=result.cancelled or cancelled,
        estimated_seconds=estimated_seconds, device=describe_device(runner.device),
    )
    record.resumed_seconds = result.resumed_seconds + (recovery.resumed_seconds if recovery is not None else 0.0)
    record.seconds = time.perf_counter() - start + record.resumed_seconds
    return PruneOutcome(result.model, record)


def further_recovery(record: PruneRecord | Mapping[str, Any], budget: str | int) -> RecoveryConfig:
    """The recovery that "recover further" spends for a ``budget`` given as text or a number of images
    (``"quick"``, ``25000``): the run's own recipe (method, learning rate, distillation, ...) and seed, with the
    new budget, so that a run recovered with ``kd`` goes on with ``kd``. The run's cap on a small training split
    (:meth:`~cka_analysis.recovery.RecoveryConfig.fit_to`) is not carried over: the new budget is fitted anew
    (with it, ``quick`` further on the digits demo spent all 25,000 images, 17 epochs, 5× the run's recovery)."""
    from .recovery import RecoveryConfig

    request = record.request if isinstance(record, PruneRecord) else record["request"]
    run = request.get("recovery") or {}
    recipe = RecoveryConfig.from_dict(run) if isinstance(run, Mapping) else RecoveryConfig()
    wanted = RecoveryConfig.parse(budget)
    return replace(recipe, images=wanted.images, name=wanted.name, preset_images=None).seeded(
        int(request.get("seed", 0)))


def recover_further(
    model: nn.Module,
    record: PruneRecord,
    base: nn.Module,
    recovery: RecoveryConfig | str | int,
    *,
    data: PruneData | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    estimated_seconds: float | None = None,
) -> PruneOutcome:
    """Spend another recovery budget on a pruned model without pruning again (the dashboard's Compare page).

    ``recovery``: a :class:`~cka_analysis.recovery.RecoveryConfig` (used as given; its seed, when None, is the
    run's), or a budget as text or images, spent with the run's own recipe (:func:`further_recovery`).
    ``model`` is not modified: a copy is recovered with ``base`` (the unpruned model) as the teacher, on the data
    and device of ``record``'s request, and evaluated on the same test images. The new record is ``record`` with
    the final accuracy, the costs (adaptors may be added), the images seen (the sum) and the recovery history
    (``record.recovery.further``, one entry per extra recovery) updated. A named budget is capped as in
    :func:`run_prune`; ``estimated_seconds`` (from :func:`estimate_further`) is kept in the new entry of
    ``further`` beside the seconds it took.
    """
    from dataclasses import replace as dc_replace

    from .metrics import count_macs, count_params
    from .recovery import RecoveryConfig, recover

    start = time.perf_counter()
    request = PruneRequest.from_dict(record.request, model=base)
    config = recovery.seeded(request.seed) if isinstance(recovery, RecoveryConfig) else \
        further_recovery(record, recovery)
    if config.images <= 0:
        raise ConfigError(f"recovery={recovery!r} spends no images; give a budget such as 'quick' or 25000")
    work = copy.deepcopy(model)
    data = (data or PruneData()).filled(request, base.cka_preset, recovery=True, progress=progress)
    config = config.fit_to(len(data.train_augmented))  # type: ignore[arg-type]
    runner = _Runner(request, base, data, progress or no_progress, cancel, None)
    res = recover(work, data.train_augmented, config, teacher=base, device=runner.device, progress=progress,
                  cancel=cancel)
    accuracy = runner.evaluate(work, cancellable=False)
    previous = dc_replace(record.recovery) if record.recovery is not None else RecoveryRecord(request.recovery)
    extra = dc_replace(RecoveryRecord.from_result(res), estimated_seconds=estimated_seconds,
                       total_seconds=time.perf_counter() - start)
    previous.further = [*previous.further, extra]
    size = work.cka_preset.input_size
    new = dc_replace(record, final=Measurement(count_macs(work, size), count_params(work), accuracy),
                     recovery=previous, images_seen=record.images_seen + res.images_seen,
                     cancelled=record.cancelled or res.cancelled,
                     seconds=record.seconds + time.perf_counter() - start)
    return PruneOutcome(work, new)


def records_equal(a: PruneRecord | Mapping[str, Any], b: PruneRecord | Mapping[str, Any],
                  ignore: Sequence[str] = ("seconds", "estimated_seconds", "total_seconds", "resumed_seconds",
                                           "latency_ms", "device")) -> bool:
    """Whether two records agree on everything but wall-clock fields (``ignore`` keys at any depth)."""
    def strip(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {k: strip(v) for k, v in x.items() if k not in ignore}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    da = a.to_dict() if isinstance(a, PruneRecord) else a
    db = b.to_dict() if isinstance(b, PruneRecord) else b
    return strip(da) == strip(db)
