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

from .choices import CRITERION_INFO, DEFAULT_CAPACITY_WEIGHT, criterion_info
from .errors import ConfigError
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

if TYPE_CHECKING:
    from .recovery import RecoveryConfig

__all__ = [
    "EVAL_BATCH",
    "Measurement",
    "PruneData",
    "PruneOutcome",
    "PruneRecord",
    "PruneRequest",
    "check_feasible",
    "estimate_request_recovery",
    "eval_subset",
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
        model: a registry name or a directory written by ``save_pruned`` (opened with ``weights`` and
            ``num_classes``), or a model already built (a registry model carrying its preset; not modified).
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
        seed: seeds scoring, recovery and, unless given, the calibration and evaluation subsets.
        latency: time the unpruned and pruned models for the record.
        latency_batch_size: the batch size of that timing and of a latency target's per-block costs.
        num_workers: data-loading workers of the evaluation loader (None: automatic).
    """

    model: str | nn.Module
    data: str = "digits"
    weights: str | None = None
    num_classes: int | None = None
    download: bool = False
    calibration_samples: int = 500
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
        if isinstance(self.blocks, str):
            self._set("blocks", tuple(b.strip() for b in self.blocks.split(",") if b.strip()))
        elif self.blocks is not None:
            self._set("blocks", tuple(self.blocks))
        _positive_int("seed", self.seed, "give an integer seed such as 0", minimum=0)
        if isinstance(self.recovery, (str, int)) and not isinstance(self.recovery, bool):
            self._set("recovery", RecoveryConfig.parse(str(self.recovery), seed=self.seed))
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
                      "CKA needs at least 4 calibration images (500 is a good default)", minimum=4)
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
            return {"model": self.model, "weights": self.weights, "num_classes": self.num_classes}
        from .blocks import removed_blocks

        preset = self.model.cka_preset
        out = {"model": preset.arch, "weights": preset.weights, "num_classes": preset.num_classes,
               "removed_before": removed_blocks(self.model)}
        origin = getattr(self.model, "cka_origin", None)  # how the CLI opened it: what reopens it
        return {**out, "origin": dict(origin)} if origin else out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; :meth:`from_dict` rebuilds an equal request (a built model is named by its description)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "model":
                out.update(self.describe_model())
            elif f.name in ("weights", "num_classes"):
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
            kw["target"] = Target(kw["target"]["kind"], kw["target"]["value"])
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
        arch, criterion (None: blocks by hand), iterative, target (``{"kind", "value"}`` or None).
        removed: the blocks removed, in order. steps: :class:`~cka_analysis.pruning.PruneStep` per removal
            (step 0 = unpruned; per-step recovery records in ``steps[i].recovery``).
        base, after_removal, final: the unpruned model, the pruned one before the final recovery, and the result.
        recovery: the final recovery's record (config, images seen, history, ...), None when there was none.
        images_seen: training images drawn by all recoveries together (≤ the recovery budget).
        latency_ms: ``{"base", "pruned", "batch_size", "device"}`` (median ms), None when not measured; for a
            latency target also the predicted values (``predicted``, ``predicted_reduction``, ``measured_reduction``,
            ``error`` = measured − predicted reduction, ``relative_error``, ``quantile`` from
            :func:`cka_analysis.latency.check_prediction`).
        robustness: optional robustness results added by the caller.
        cancelled: the run was cancelled; what it finished is kept. seconds: wall time of the run.
    """

    request: dict[str, Any]
    arch: str
    criterion: str | None
    iterative: bool
    target: dict[str, Any] | None
    removed: list[str]
    steps: list[PruneStep]
    base: Measurement
    after_removal: Measurement
    final: Measurement
    recovery: dict[str, Any] | None = None
    images_seen: int = 0
    latency_ms: dict[str, Any] | None = None
    robustness: dict[str, Any] | None = None
    cancelled: bool = False
    seconds: float = 0.0

    @property
    def macs_reduction(self) -> float:
        return 1 - self.final.macs / self.base.macs if self.base.macs else 0.0

    @property
    def params_reduction(self) -> float:
        return 1 - self.final.params / self.base.params if self.base.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT, "request": self.request, "arch": self.arch, "criterion": self.criterion,
            "iterative": self.iterative, "target": self.target, "removed": list(self.removed),
            "steps": [s.to_dict() for s in self.steps], "base": self.base.to_dict(),
            "after_removal": self.after_removal.to_dict(),
            "final": {**self.final.to_dict(), "macs_reduction": self.macs_reduction,
                      "params_reduction": self.params_reduction, "removed": list(self.removed)},
            "recovery": self.recovery, "images_seen": self.images_seen, "latency_ms": self.latency_ms,
            "robustness": self.robustness, "cancelled": self.cancelled, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneRecord:
        """The record :meth:`to_dict` wrote (derived keys such as the reductions are recomputed)."""
        if d.get("format") != RECORD_FORMAT:
            raise ConfigError(f"not a pruning record (format {d.get('format')!r}, expected {RECORD_FORMAT!r})")
        return cls(
            request=dict(d["request"]), arch=d["arch"], criterion=d["criterion"], iterative=bool(d["iterative"]),
            target=d["target"], removed=list(d["removed"]), steps=[PruneStep.from_dict(s) for s in d["steps"]],
            base=Measurement.from_dict(d["base"]), after_removal=Measurement.from_dict(d["after_removal"]),
            final=Measurement.from_dict(d["final"]), recovery=d.get("recovery"),
            images_seen=int(d.get("images_seen", 0)), latency_ms=d.get("latency_ms"),
            robustness=d.get("robustness"), cancelled=bool(d.get("cancelled")), seconds=float(d.get("seconds", 0)),
        )

    # ------------------------------------------------------------------------------------------------ views
    def describe(self) -> str:
        """One line: how the blocks were chosen and how much (e.g. ``cka iterative, ≥ 50 % fewer MACs``)."""
        how = "by hand" if self.criterion is None else \
            f"{self.criterion} {'iterative' if self.iterative else 'one-shot'}"
        if self.target is None:
            return f"{how}, {len(self.removed)} chosen block(s)"
        return f"{how}, {Target(self.target['kind'], self.target['value']).describe()}"

    def recovery_name(self) -> str:
        """The recovery asked for, in words (``quick``, ``12,000 images``, ``none``)."""
        cfg = self.request.get("recovery") or {}
        name = (cfg.get("name") or f"{cfg['images']:,} images") if cfg.get("images") else "none"
        further = [f.get("config", {}) for f in (self.recovery or {}).get("further", [])]
        return name + "".join(f" + {f.get('name') or format(f.get('images', 0), ',') + ' images'}" for f in further)

    def summary(self) -> str:
        """The plain-text table the CLI prints: accuracy, MACs, parameters and latency before and after."""
        def acc(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f} %"

        lat = self.latency_ms or {}

        def ms(key: str) -> str:
            return f"{lat[key]:.2f} ms" if lat.get(key) is not None else "-"

        rows = [("original", self.base, ms("base")), ("removed", self.after_removal, ""),
                ("pruned", self.final, ms("pruned"))]
        lines = [f"removed {len(self.removed)} block(s): {', '.join(self.removed) or '-'}",
                 f"{'':<10}{'accuracy':>12}{'MACs':>12}{'params':>12}{'latency':>12}"]
        lines += [f"{name:<10}{acc(m.accuracy):>12}{_fmt_int(m.macs):>12}{_fmt_int(m.params):>12}{t:>12}"
                  for name, m, t in rows]
        lines.append(f"MACs −{100 * self.macs_reduction:.1f} %, parameters −{100 * self.params_reduction:.1f} %; "
                     f"recovery {self.recovery_name()}: {self.images_seen:,} training images"
                     + (" (cancelled: what finished was kept)" if self.cancelled else ""))
        if lat.get("predicted_reduction") is not None:
            lines.append(f"latency −{100 * lat['measured_reduction']:.1f} % measured at batch {lat['batch_size']} "
                         f"(predicted −{100 * lat['predicted_reduction']:.1f} %, error "
                         f"{100 * lat['error']:+.1f} points)")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The record as Markdown (the dashboard's report and ``report.md``)."""
        from .export import markdown_table

        out = [f"- Removed (in order): {', '.join(self.removed) or 'nothing'}",
               f"- How: {self.describe()}",
               f"- Recovery: {self.recovery_name()}, {self.images_seen:,} training images"
               + (" (cancelled)" if self.cancelled else ""), "",
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

    return open_model(request.model, weights=request.weights, num_classes=request.num_classes)


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


def estimate_request_recovery(request: PruneRequest, model: nn.Module) -> dict[str, Any]:
    """What ``request``'s recovery will cost on its device and what the same recipe and budget left on the
    reference benchmark (:func:`~cka_analysis.recovery.estimate_recovery`), for the unpruned ``model``: timed on
    :func:`recovery_stand_in`, distilling from ``model``."""
    from .recovery import estimate_recovery

    return estimate_recovery(request.recovery, recovery_stand_in(request, model), model, device=request.device,
                             macs_reduction=request.macs_target)


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

    def recover(self, model: nn.Module, config: RecoveryConfig, *, final: bool) -> dict[str, Any]:
        """Recover ``model`` in place with ``config``; the record of what it did."""
        from .recovery import recover

        self.progress(0, None, f"recovering the pruned model ({config.name or 'budget'}: {config.images:,} images)"
                      if final else f"recovering after the removal ({config.images:,} images)")
        ckpt = self.store.path("recovery.pt") if (final and self.store is not None) else None
        res = recover(model, self.data.train_augmented, config, teacher=self.base,
                      eval_data=self.test if final else None, device=self.device, progress=self.progress,
                      cancel=self.cancel, checkpoint_path=ckpt,
                      resume=bool(final and self.store is not None and self.store.resume))
        self.images_seen += int(res.images_seen)
        return {"config": config.to_dict(), **res.to_dict()}

    def after_removal(self, model: nn.Module, step: int) -> dict[str, Any] | None:
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

    def latency(self, pruned: nn.Module) -> dict[str, Any] | None:
        """Base and pruned latency timed interleaved (and, for a latency target, predicted vs measured)."""
        from .distributed import is_main_process
        from .latency import check_prediction, compare_latency

        if not self.request.latency or not is_main_process():
            return None
        self.progress(0, None, "timing the original and the pruned model")
        if self.costs is not None:
            c = check_prediction(self.base, pruned, self.costs, device=self.device)
            return {"base": c.base_ms, "pruned": c.pruned_ms, "batch_size": c.batch_size, "device": c.device,
                    "predicted": c.predicted_ms, "predicted_reduction": c.predicted_reduction,
                    "measured_reduction": c.measured_reduction, "error": c.error,
                    "relative_error": c.relative_error, "quantile": c.quantile, "repeats": c.repeats}
        t = compare_latency({"base": self.base, "pruned": pruned}, batch_size=self.request.latency_batch_size,
                            device=self.device)
        return {"base": t["base"].median_ms, "pruned": t["pruned"].median_ms,
                "batch_size": self.request.latency_batch_size, "device": t["base"].device}


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
    runner.images_seen = sum(int((s.recovery or {}).get("images_seen", 0)) for s in result.steps)
    return result


def _final_recovery(runner: _Runner, result: PruneResult) -> tuple[dict[str, Any] | None, bool]:
    cfg = runner.request.recovery
    left = cfg.images - runner.images_seen
    if result.cancelled or not result.removed or left <= 0:
        return None, False
    rec = runner.recover(result.model, cfg.with_images(left) if left != cfg.images else cfg, final=True)
    return rec, bool(rec.get("cancelled"))


def run_prune(
    request: PruneRequest,
    *,
    data: PruneData | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneOutcome:
    """Run ``request``: prune, recover, evaluate, time; returns the pruned model and its :class:`PruneRecord`.

    Bad input (an unknown model, block or data folder, a target out of reach) raises before anything is scored
    or written. ``data`` supplies splits already loaded (else they are loaded from ``request.data``).
    ``checkpoint_dir`` keeps the finished parts (scores, iterative steps, the recovery state) so that a killed run
    goes on with ``resume=True``; it is created only once there is something to keep. A cancel keeps what
    finished (the blocks removed so far, the recovered weights) and sets ``record.cancelled``.
    """
    progress = progress or no_progress
    start = time.perf_counter()
    base = _open(request)
    check_feasible(request, base)
    recovering = request.recovery.images > 0
    data = (data or PruneData()).filled(request, base.cka_preset, recovery=recovering, progress=progress)
    store = None if checkpoint_dir is None else ResumeStore(checkpoint_dir, request.resume_key(), resume=resume)
    runner = _Runner(request, base, data, progress, cancel, store)
    result = _prune_step(runner)
    after = result.steps[-1]
    recovery, cancelled = _final_recovery(runner, result)
    final_acc = after.accuracy if recovery is None else runner.evaluate(result.model, cancellable=False)
    final_macs, final_params = after.macs, after.params
    if any((s.recovery or {}).get("adaptors") for s in result.steps) or (recovery or {}).get("adaptors"):
        from .metrics import count_macs, count_params  # fitted adaptors stay in the model and cost MACs

        final_macs = count_macs(result.model, result.model.cka_preset.input_size)
        final_params = count_params(result.model)
    record = PruneRecord(
        request=request.to_dict(), arch=result.arch, criterion=result.criterion, iterative=result.iterative,
        target=None if result.target is None else result.target.to_dict(), removed=list(result.removed),
        steps=result.steps, base=Measurement(result.steps[0].macs, result.steps[0].params, result.steps[0].accuracy),
        after_removal=Measurement(after.macs, after.params, after.accuracy),
        final=Measurement(final_macs, final_params, final_acc), recovery=recovery, images_seen=runner.images_seen,
        latency_ms=runner.latency(result.model), cancelled=result.cancelled or cancelled,
    )
    record.seconds = time.perf_counter() - start
    return PruneOutcome(result.model, record)


def recover_further(
    model: nn.Module,
    record: PruneRecord,
    base: nn.Module,
    recovery: RecoveryConfig | str | int,
    *,
    data: PruneData | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> PruneOutcome:
    """Spend another recovery budget on a pruned model without pruning again (the dashboard's Compare page).

    ``model`` is not modified: a copy is recovered with ``base`` (the unpruned model) as the teacher, on the data
    and device of ``record``'s request, and evaluated on the same test images. The new record is ``record`` with
    the final accuracy, the costs (adaptors may be added), the images seen (the sum) and the recovery history
    (``record.recovery["further"]``, one entry per extra recovery) updated.
    """
    from dataclasses import replace as dc_replace

    from .metrics import count_macs, count_params
    from .recovery import RecoveryConfig, recover

    start = time.perf_counter()
    request = PruneRequest.from_dict(record.request, model=base)
    config = RecoveryConfig.parse(recovery, seed=request.seed) if isinstance(recovery, (str, int)) else recovery
    if config.images <= 0:
        raise ConfigError(f"recovery={recovery!r} spends no images; give a budget such as 'quick' or 25000")
    work = copy.deepcopy(model)
    data = (data or PruneData()).filled(request, base.cka_preset, recovery=True, progress=progress)
    runner = _Runner(request, base, data, progress or no_progress, cancel, None)
    res = recover(work, data.train_augmented, config, teacher=base, device=runner.device, progress=progress,
                  cancel=cancel)
    accuracy = runner.evaluate(work, cancellable=False)
    previous = dict(record.recovery or {})
    previous["further"] = [*previous.get("further", []), {"config": config.to_dict(), **res.to_dict()}]
    size = work.cka_preset.input_size
    new = dc_replace(record, final=Measurement(count_macs(work, size), count_params(work), accuracy),
                     recovery=previous, images_seen=record.images_seen + res.images_seen,
                     cancelled=record.cancelled or res.cancelled,
                     seconds=record.seconds + time.perf_counter() - start)
    return PruneOutcome(work, new)


def records_equal(a: PruneRecord | Mapping[str, Any], b: PruneRecord | Mapping[str, Any],
                  ignore: Sequence[str] = ("seconds", "latency_ms", "device")) -> bool:
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
