"""The evaluation loop: clean, adversarial and corruption accuracy of a classifier in one pass over a loader.

Removing residual blocks can cost more robustness than clean accuracy shows, so the CLI
(``cka-prune evaluate --robustness fgsm,pgd,corruptions``) and the dashboard's Compare page measure both. Results
are typed records (:mod:`cka_analysis.robustness.results`) with accuracies in **percent**.

Every random choice (PGD's random start, the noise corruptions) comes from a local generator seeded from ``seed``
and what is being randomised (batch index, ε, corruption, severity), so a run repeats exactly on the same device,
whatever else the process draws; the process-wide RNG is neither seeded nor restored (two evaluations in two
threads cannot disturb each other). Iterating the caller's loader is the caller's business: a DataLoader draws its
base seed from the global generator unless it was given its own ``generator=``, as on every iteration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..choices import ROBUSTNESS_KINDS
from ..device import eval_mode, resolve_device
from ..errors import ConfigError, DataError
from ..progress import CancelToken, ProgressFn, check_cancel
from ._common import check_names, check_seed, derive_seed
from .attacks import (
    ATTACKS,
    DEFAULT_EPS,
    PixelSpaceModel,
    check_eps,
    check_pgd,
    normalisation_of,
    run_fgsm,
    run_pgd,
)
from .corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    SMALL_IMAGE_MAX_SIDE,
    check_corruptions,
    check_severities,
    corrupt,
    corruption_table_for,
)
from .results import AttackCurve, CorruptionResult, RobustnessResult

__all__ = ["RobustnessSpec", "adversarial_accuracy", "corruption_accuracy", "evaluate_robustness"]


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


def _check_max_samples(max_samples: int | None) -> int | None:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ConfigError(f"max_samples={max_samples!r} must be a positive integer or None (all samples)")
    return max_samples


def _check_kinds(kinds: Iterable[str] | str) -> tuple[str, ...]:
    return check_names(kinds, ROBUSTNESS_KINDS, field="kinds", item="robustness kind", lower=True)


@dataclass(frozen=True)
class RobustnessSpec:
    """What a robustness evaluation measures and how, validated once on construction.

    Attributes:
        kinds: among ``("fgsm", "pgd", "corruptions")`` (a comma-separated string works too).
        eps: L∞ budgets in pixel units of [0, 1] (a string such as ``"1/255,8/255"`` works too).
        pgd_steps: PGD iterations (10 is usual); ``pgd_step_size`` None = ``2.5·ε/pgd_steps`` (Madry-style).
        corruptions, severities: which common corruptions, at which severities (default: all eight, 1–5).
        max_samples: evaluate the first N samples in loader order (None = all).
        seed: seeds PGD's random start and the noise corruptions (local generators, see the module docstring).
        mean, std: the per-channel normalisation the loader applies; None = the model preset's.
    """

    kinds: tuple[str, ...] = ROBUSTNESS_KINDS
    eps: tuple[float, ...] = DEFAULT_EPS
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    max_samples: int | None = None
    seed: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        steps, step_size = check_pgd(self.pgd_steps, self.pgd_step_size)
        checked = {
            "kinds": _check_kinds(self.kinds), "eps": tuple(check_eps(self.eps)), "pgd_steps": steps,
            "pgd_step_size": step_size, "corruptions": check_corruptions(self.corruptions),
            "severities": check_severities(self.severities), "max_samples": _check_max_samples(self.max_samples),
            "seed": check_seed(self.seed),
            "mean": None if self.mean is None else tuple(self.mean),
            "std": None if self.std is None else tuple(self.std),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def make(cls, spec: RobustnessSpec | None = None, **overrides: Any) -> RobustnessSpec:
        """``spec`` (default: all defaults) with ``overrides`` applied; ConfigError naming an unknown field."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown robustness setting(s) {', '.join(unknown)}; choose from "
                              f"{', '.join(sorted(fields))}")
        return dataclasses.replace(spec or cls(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class _Plan:
    """What one pass over the loader measures, validated: the budgets of each attack, the corruptions and
    severities, PGD's settings, the normalisation to undo and redo, the seed and the sample cap."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    fgsm_eps: tuple[float, ...] = ()
    pgd_eps: tuple[float, ...] = ()
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = ()
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    seed: int = 0
    max_samples: int | None = None


# --------------------------------------------------------------------------------------------------------------
# One pass over the loader
# --------------------------------------------------------------------------------------------------------------


def _dataset_size(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


def _batches(loader: Iterable[Any], max_samples: int | None) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(batch_index, images, labels)`` for the first ``max_samples`` samples in loader order."""
    seen = 0
    for index, batch in enumerate(loader):
        if max_samples is not None and seen >= max_samples:
            return
        if isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise DataError("the loader must yield (images, labels) pairs")
        images, labels = batch[0], batch[1]
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise DataError(
                f"the loader yielded images of shape {tuple(getattr(images, 'shape', ()))}; "
                "expected a (N, C, H, W) tensor"
            )
        labels = torch.as_tensor(labels)
        if labels.shape != images.shape[:1]:
            raise DataError("the loader's labels do not match its images (expected shape (N,))")
        if max_samples is not None and seen + images.shape[0] > max_samples:
            keep = max_samples - seen
            images, labels = images[:keep], labels[:keep]
        seen += images.shape[0]
        if images.shape[0] > 0:
            yield index, images, labels



class _Counter:
    """Correct-prediction counts of one pass, accumulated on the evaluation device (one sync at the end)."""

    def __init__(self, model: nn.Module, plan: _Plan, device: torch.device) -> None:
        self.model, self.plan = model, plan
        self.wrapper = PixelSpaceModel(model, plan.mean, plan.std).to(device)
        self.samples = 0
        self.table: str | None = None
        self.clean = torch.zeros((), dtype=torch.long, device=device)
        self.fgsm = torch.zeros(len(plan.fgsm_eps), dtype=torch.long, device=device)
        self.pgd = torch.zeros(len(plan.pgd_eps), dtype=torch.long, device=device)
        self.corr = torch.zeros(len(plan.corruptions), len(plan.severities), dtype=torch.long, device=device)

    def _correct(self, pixels: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return (self.wrapper(pixels).argmax(dim=1) == y).sum()

    def add(self, batch_index: int, x: Tensor, y: Tensor, stop: Callable[[], None]) -> None:
        """Count one normalised batch ``x`` with labels ``y``; ``stop()`` raises when the user cancelled."""
        plan = self.plan
        with torch.no_grad():
            batch_clean = (self.model(x).argmax(dim=1) == y).sum()
        self.clean += batch_clean
        pixels = (x * self.wrapper.std + self.wrapper.mean).clamp(0.0, 1.0)
        for k, eps in enumerate(plan.fgsm_eps):
            self.fgsm[k] += batch_clean if eps == 0 else self._correct(run_fgsm(self.wrapper, pixels, y, eps), y)
        for k, eps in enumerate(plan.pgd_eps):
            stop()
            if eps == 0:
                self.pgd[k] += batch_clean
                continue
            adv = run_pgd(self.wrapper, pixels, y, eps, steps=plan.pgd_steps, step_size=plan.pgd_step_size,
                          seed=derive_seed(plan.seed, "pgd", batch_index, eps))
            self.pgd[k] += self._correct(adv, y)
        if plan.corruptions:
            self.table = corruption_table_for(*pixels.shape[-2:])
            for i, name in enumerate(plan.corruptions):
                stop()
                for j, severity in enumerate(plan.severities):
                    seed = derive_seed(plan.seed, name, severity, batch_index)
                    with torch.no_grad():
                        corrupted = corrupt(pixels, name, severity, seed=seed)
                    self.corr[i, j] += self._correct(corrupted, y)
        self.samples += int(x.shape[0])


def _run(model: nn.Module, loader: Iterable[Any], plan: _Plan, device: str | torch.device,
         progress: ProgressFn | None, cancel: CancelToken | None, what: str) -> _Counter:
    """One pass over the loader: clean, FGSM, PGD and corruption correct-counts (model in eval mode meanwhile)."""
    dev = resolve_device(device)
    model.to(dev)
    counter = _Counter(model, plan, dev)
    size = _dataset_size(loader)
    if plan.max_samples is None:
        total = size
    else:  # with an unsized loader, max_samples is an upper bound
        total = plan.max_samples if size is None else min(size, plan.max_samples)
    report: Callable[[int, int | None, str], None] = progress or (lambda done, total, message: None)
    report(0, total, f"{what}: starting")
    with eval_mode(model):
        for batch_index, images, labels in _batches(loader, plan.max_samples):
            check_cancel(cancel, what)
            if images.shape[1] != len(plan.mean):
                raise ConfigError(
                    f"the loader yields {images.shape[1]}-channel images but mean/std have {len(plan.mean)} "
                    "values; pass the model preset's per-channel statistics"
                )
            x = images.to(dev, non_blocking=True).float()
            y = labels.to(dev, non_blocking=True).long()
            counter.add(batch_index, x, y, lambda: check_cancel(cancel, what))
            n = counter.samples
            report(n, total, f"{what}: {n}" + (f"/{total}" if total else "") + " samples")
    if counter.samples == 0:
        raise DataError("the loader yielded no samples; check the data folder and max_samples")
    return counter


def _percent(correct: int, samples: int) -> float:
    return 100.0 * correct / samples


def _curve(attack: str, eps: Sequence[float], correct: Tensor, samples: int) -> AttackCurve:
    return AttackCurve(attack, tuple(eps), tuple(_percent(c, samples) for c in correct.tolist()))


def _corruption_result(counter: _Counter) -> CorruptionResult:
    counts = counter.corr.tolist()
    plan = counter.plan
    return CorruptionResult(
        plan.severities,
        {name: tuple(_percent(c, counter.samples) for c in counts[i]) for i, name in enumerate(plan.corruptions)},
        counter.table,
    )


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def adversarial_accuracy(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    attack: Literal["fgsm", "pgd"],
    spec: RobustnessSpec | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> AttackCurve:
    """Top-1 accuracy (%) under an L∞ attack at each budget, as an :class:`AttackCurve`.

    ``spec`` (a :class:`RobustnessSpec`) and/or its fields as keywords (``eps=``, ``pgd_steps=``,
    ``pgd_step_size=``, ``max_samples=``, ``seed=``, ``mean=``, ``std=``) say what to measure. ``loader`` yields
    ``(images, labels)`` with images normalised by ``mean``/``std`` (default: the model preset's, as
    :func:`cka_analysis.data.load_dataset` applies them). The attack works in pixel space: images are mapped back to
    [0, 1], perturbed by ``captum.robust.FGSM`` or ``captum.robust.PGD`` against a wrapper that normalises inside,
    with cross-entropy on the logits, and kept in [0, 1]. ε is in pixel units (``8/255`` = eight grey levels).
    ε = 0 is the clean accuracy exactly (no attack).

    PGD: ``pgd_steps`` steps of size ``pgd_step_size`` (default ``2.5·ε/pgd_steps``, Madry-style) from a
    uniformly random start in the ε-ball, drawn from a local generator seeded from ``seed``, the batch index and
    ε, so a run is repeatable and the process-wide RNG is not touched. ``max_samples`` evaluates the first N
    samples in loader order. The model is moved to ``device`` and put in eval mode; its train/eval state is
    restored afterwards. ``progress(done, total, message)`` is called after each batch; a set ``cancel`` token
    raises Cancelled.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"attack={attack!r} is not supported; choose one of {', '.join(ATTACKS)}")
    spec = RobustnessSpec.make(spec, **{"kinds": (attack,), **settings})
    counter = _run(model, loader, _plan(model, spec), device, progress, cancel, f"{attack.upper()} accuracy")
    return _curve(attack, spec.eps, counter.fgsm if attack == "fgsm" else counter.pgd, counter.samples)


def corruption_accuracy(
    model: nn.Module,
    loader: Iterable[Any],
    spec: RobustnessSpec | None = None,
    *,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> CorruptionResult:
    """Top-1 accuracy (%) under common corruptions (see :func:`~cka_analysis.robustness.corrupt`), as a
    :class:`CorruptionResult` (per corruption and severity, with the mean per severity).

    ``spec`` and/or its fields as keywords (``corruptions=``, ``severities=``, ``max_samples=``, ``seed=``,
    ``mean=``, ``std=``). Images from the (normalised) loader are mapped to pixel space, corrupted, and normalised
    again for the model. Noise is drawn from local generators seeded from ``seed``, the corruption, the severity
    and the batch index. Model handling, ``max_samples``, ``progress`` and ``cancel`` are as in
    :func:`adversarial_accuracy`.
    """
    spec = RobustnessSpec.make(spec, **{"kinds": ("corruptions",), **settings})
    counter = _run(model, loader, _plan(model, spec), device, progress, cancel, "corruption accuracy")
    return _corruption_result(counter)


def evaluate_robustness(
    model: nn.Module,
    loader: Iterable[Any],
    spec: RobustnessSpec | None = None,
    *,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    **settings: Any,
) -> RobustnessResult:
    """Clean accuracy plus the requested robustness measures, in one pass over the loader.

    What to measure is a :class:`RobustnessSpec` (``spec``) and/or its fields as keywords: ``kinds`` ⊆
    ``("fgsm", "pgd", "corruptions")`` (a comma-separated string works too; default all), ``eps`` (default
    {1,2,4,8}/255), ``pgd_steps`` (10), ``pgd_step_size`` (``2.5·ε/pgd_steps``), ``corruptions``/``severities``
    (all eight, 1–5), ``max_samples`` (the first N samples in loader order), ``seed``, ``mean``/``std`` (default
    the model preset's). Returns a :class:`RobustnessResult`: ``clean_accuracy``, ``fgsm``/``pgd``
    (:class:`AttackCurve`, ``accuracy_at(ε)``), ``corruptions`` (:class:`CorruptionResult`,
    ``mean_per_severity()``), ``samples`` and ``settings`` (everything needed to reproduce the numbers); kinds not
    requested are None. Accuracies are top-1 in percent; ``to_dict()`` is the JSON form. Semantics of each part:
    :func:`adversarial_accuracy` and :func:`corruption_accuracy`.
    """
    spec = RobustnessSpec.make(spec, **settings)
    plan = _plan(model, spec)
    dev = resolve_device(device)
    counter = _run(model, loader, plan, dev, progress, cancel, "robustness")
    return RobustnessResult(
        samples=counter.samples,
        clean_accuracy=_percent(int(counter.clean.item()), counter.samples),
        fgsm=_curve("fgsm", spec.eps, counter.fgsm, counter.samples) if "fgsm" in spec.kinds else None,
        pgd=_curve("pgd", spec.eps, counter.pgd, counter.samples) if "pgd" in spec.kinds else None,
        corruptions=_corruption_result(counter) if "corruptions" in spec.kinds else None,
        settings=_settings(plan, spec.kinds, dev, counter.table),
    )


def _plan(model: nn.Module, spec: RobustnessSpec) -> _Plan:
    """The pass a spec asks for, with the normalisation resolved against the model's preset."""
    mean, std = normalisation_of(model, spec.mean, spec.std)
    corrupts = "corruptions" in spec.kinds
    return _Plan(mean, std, fgsm_eps=spec.eps if "fgsm" in spec.kinds else (),
                 pgd_eps=spec.eps if "pgd" in spec.kinds else (),
                 corruptions=spec.corruptions if corrupts else (), severities=spec.severities if corrupts else (),
                 pgd_steps=spec.pgd_steps, pgd_step_size=spec.pgd_step_size, seed=spec.seed,
                 max_samples=spec.max_samples)


def _settings(plan: _Plan, kinds: tuple[str, ...], device: torch.device, table: str | None) -> dict[str, Any]:
    """Everything needed to reproduce an :func:`evaluate_robustness` run, JSON-ready."""
    settings: dict[str, Any] = {"kinds": list(kinds), "mean": list(plan.mean), "std": list(plan.std),
                                "max_samples": plan.max_samples, "seed": plan.seed, "device": str(device),
                                "accuracy_units": "percent"}
    if plan.fgsm_eps or plan.pgd_eps:
        settings.update({"eps": list(plan.fgsm_eps or plan.pgd_eps), "eps_units": "pixel values in [0, 1]",
                         "norm": "Linf", "loss": "cross-entropy on logits"})
    if "pgd" in kinds:
        settings.update({"pgd_steps": plan.pgd_steps,
                         "pgd_step_size": plan.pgd_step_size if plan.pgd_step_size is not None
                         else "2.5*eps/pgd_steps",
                         "pgd_random_start": True})
    if plan.corruptions:
        settings.update({"corruptions": list(plan.corruptions), "severities": list(plan.severities),
                         "corruption_table": table,
                         "corruption_table_rule": f"largest side <= {SMALL_IMAGE_MAX_SIDE} px: cifar10-c, "
                                                  "else imagenet-c"})
    return settings
