"""Recovery: give a pruned network back its accuracy for the least compute.

Removing blocks shifts every later layer's input statistics and representation. Recovery repairs that in stages,
each one cheap before the next one costs anything:

1. **Batch-norm re-estimation** (EagleEye's adaptive BN): the running statistics are recomputed on training images
   with the pruned network. Seconds; it alone lifts ResNet-56 at −52 % MACs from ~20 % to ~60 % top-1.
2. **Fitted adaptors** (method ``"adaptor"``, after PRACTISE): every run of consecutive removed blocks is replaced
   by a 1×1 convolution + ReLU fitted by ridge least squares so that the pruned network's features there
   reproduce the unpruned network's. Not foldable into neighbouring weights (a ReLU and the next block's shortcut
   sit between), so they stay, and are counted in MACs and parameters.
3. **Training** with a :class:`~cka_analysis.training.Trainer`: cross-entropy (``"ce"``, the control), logit
   distillation from the unpruned network (``"kd"``), or logit distillation plus feature mimicking (``"feature"``,
   after MiR and FitNets): the pruned network's features are pulled towards the unpruned one's at the input of
   every kept block, at each stage's output and at the penultimate features — the representation CKA compares —
   with a weight that decays to 0 over training.

The budget is counted in **training images drawn** (an image used twice counts twice; the images that
re-estimate batch norm count too), so ``quick`` and ``standard`` mean the same on any machine; wall time is
recorded beside it. Presets: :data:`RECOVERY_PRESETS`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .blocks import BlockAdaptor, adaptor_slots, insert_adaptors  # re-exported: they lived here first
from .choices import DEFAULT_RECOVERY_METHOD, RECOVERY_PRESET_MAX_EPOCHS
from .choices import RECOVERY_METHODS as _METHODS
from .choices import RECOVERY_PRESETS as _PRESETS
from .errors import ConfigError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

__all__ = [
    "DEFAULT_METHOD",
    "RECOVERY_METHODS",
    "RECOVERY_PRESETS",
    "BlockAdaptor",
    "RecoveryConfig",
    "RecoveryFacts",
    "RecoveryResult",
    "adaptor_slots",
    "estimate_recovery",
    "fit_adaptors",
    "insert_adaptors",
    "recalibrate_batchnorm",
    "recover",
]

#: Named budgets in training images drawn, and the recovery methods (declared torch-free for the CLI's help).
RECOVERY_PRESETS = dict(_PRESETS)
RECOVERY_METHODS = dict(_METHODS)
DEFAULT_METHOD = DEFAULT_RECOVERY_METHOD


MIMIC_POINTS = ("stages", "blocks")
#: The recovery estimate's probe batch is the recipe's, up to this many multiply-accumulates per batch.
PROBE_MACS = 8e9
FEATURE_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class RecoveryConfig:
    """What recovery may spend and how: ``images`` is the budget in training images drawn.

    Attributes:
        images: budget (training images drawn, repeats counted; batch-norm re-estimation images included).
        method: one of :data:`RECOVERY_METHODS`.
        batch_size, lr, momentum, weight_decay, warmup: SGD recipe (linear warm-up over ``warmup`` of the
            steps, then cosine to zero). The defaults (and the method) are the best of the recipes compared on a
            validation split carved from the training images at ``quick`` (``benchmarks/recovery.py``,
            ``recipe-*`` rows); at ``standard`` none of seven variations of learning rate, batch, distillation
            weight and temperature beat them beyond the noise (``tune-*`` rows), nor did lr 0.03, batch 128 with
            lr 0.05 or feature weight 30 at −75 % MACs on ``cka_capacity``'s blocks (``benchmarks/deep.py``,
            ``deep-recipe`` rows), so one recipe serves every budget and depth measured. Larger batches cost
            accuracy at a fixed budget: batch 512 (lr 0.04 or 0.08) ended 1.7–1.9 points lower there (one run
            each; batch 32 and 256 stayed within the noise).
        kd_alpha, kd_temperature: weight and temperature of logit distillation (``kd``, ``feature``, ``adaptor``).
        feature_weight: weight of the feature-mimicking term (``feature``, ``adaptor``).
        mimic: where the feature term compares student and teacher: ``"blocks"`` (the default: the input of every
            kept block, each stage's output and the penultimate features) or ``"stages"`` (only the last two, the
            first default). The dense signal recovers faster per image (validation split, ``recipe-*`` rows),
            and at −75 % MACs (``cka_capacity``'s blocks, ``standard``) ``"stages"`` ended 1.9 points lower
            (``benchmarks/deep.py``, ``deep-recipe`` rows).
        feature_schedule: ``"cosine"`` (the default): the feature weight falls from ``feature_weight`` to 0 over
            the training steps, so that mimicking speeds up the start and plain distillation has the end (with a
            constant weight, block mimicking ended 0.2 points lower after ``standard`` on ResNet-56, one seed
            each: within the noise); or ``"constant"``.
        fade: the fraction of the training steps over which the removed blocks fade out instead of vanishing at
            once: each removed block runs again as a frozen copy of the teacher's, its output blended with the
            identity, ``x + a·(block(x) − x)``, with ``a`` falling from 1 to 0 (cosine) over the first ``fade`` of
            the steps; after that the slots are plain identities again and steps cost what the pruned network
            costs. 0 (the default): the blocks are gone from the first step. Needs the teacher (every method but
            ``ce`` and ``bn``). The faded steps cost about what the unpruned network's training steps cost. Not
            the default because it did not pay: at −75 % MACs (``cka_capacity``'s blocks, ``standard``, validation
            split) ``fade=0.3`` recovered to 90.78 % against 91.22 % without (``benchmarks/deep.py``).
        clip_factor: every training step's gradient is clipped (global L2 norm) at this multiple of the first
            step's norm; None: no clipping. Recovery's gradients shrink as the pruned network relearns (on the CIFAR
            ResNets no later step's norm reached the first's: the clip never acts there, bit for bit), but on a
            network whose feature points follow unnormalised layers (timm's ConvNeXt: the downsampling convolutions
            and LayerNorm affines) the feature term's curvature exceeds what SGD at lr 0.01 can follow and the
            norm grew 120× in 4 steps until the loss was NaN; clipped, it trains. A loss that still becomes NaN or
            infinite stops recovery with :class:`~cka_analysis.errors.DivergedError`.
        bn_images: images that re-estimate the batch-norm statistics (capped by the budget).
        adaptor_images: images that fit the adaptors (``adaptor`` only; forward passes, counted in the budget).
        amp: ``"auto"`` (bfloat16 autocast on CUDA and on CPUs with native bfloat16 arithmetic, such as Xeons
            with AMX: about 2× faster steps there), ``"none"``, ``"fp16"`` or ``"bf16"``.
        seed: data order, augmentation and the images that re-estimate batch norm and fit adaptors. None (the
            default): the caller's seed — a :class:`~cka_analysis.workflow.PruneRequest`'s ``seed`` (which seeds
            everything in a run unless this is set explicitly), 0 when :func:`recover` is called directly.
        name: the preset this came from (``quick``, ``standard``, ``long``) or None for an explicit number.
        preset_images: set by :meth:`fit_to` when a preset's budget was capped to a few epochs of a small
            training split: the preset's full budget (``images`` is then the capped one). None otherwise.
    """

    images: int = RECOVERY_PRESETS["quick"]
    method: str = DEFAULT_METHOD
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    feature_weight: float = 10.0
    mimic: str = "blocks"
    feature_schedule: str = "cosine"
    fade: float = 0.0
    clip_factor: float | None = 10.0
    bn_images: int = 2048
    adaptor_images: int = 1024
    amp: str = "auto"
    seed: int | None = None
    name: str | None = None
    preset_images: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 0:
            raise ConfigError(f"images={self.images!r}: the recovery budget must be a whole number of images ≥ 0")
        if self.method not in RECOVERY_METHODS:
            raise ConfigError(f"method={self.method!r} must be one of {', '.join(RECOVERY_METHODS)}")
        for name in ("batch_size", "bn_images", "adaptor_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive whole number")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup={self.warmup} is a fraction of the steps in [0, 1)")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={self.kd_alpha} must be in [0, 1]")
        if self.feature_schedule not in FEATURE_SCHEDULES:
            raise ConfigError(f"feature_schedule={self.feature_schedule!r} must be one of "
                              f"{', '.join(FEATURE_SCHEDULES)}")
        if isinstance(self.fade, bool) or not isinstance(self.fade, (int, float)) or not 0 <= self.fade < 1:
            raise ConfigError(f"fade={self.fade!r} is the fraction of the training steps over which removed blocks "
                              "fade out, in [0, 1); 0 = removed at once")
        if self.fade and self.method in ("ce", "bn"):
            raise ConfigError(f"fade={self.fade} takes the removed blocks from the teacher, which method="
                              f"{self.method!r} does not use; choose 'kd', 'feature' or 'adaptor', or fade=0")
        if self.clip_factor is not None and not self.clip_factor > 0:
            raise ConfigError(f"clip_factor={self.clip_factor} must be positive, or None for no gradient clipping")
        if self.mimic not in MIMIC_POINTS:
            raise ConfigError(f"mimic={self.mimic!r} must be one of {', '.join(MIMIC_POINTS)}")
        if self.feature_weight < 0 or self.kd_temperature <= 0:
            raise ConfigError("feature_weight must be ≥ 0 and kd_temperature > 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ConfigError(f"seed={self.seed!r} must be a whole number ≥ 0, or None for the caller's seed")

    def seeded(self, seed: int) -> RecoveryConfig:
        """This config with ``seed`` where it leaves the seed to the caller (``seed=None``); an explicit seed
        stays. The one rule of :class:`~cka_analysis.workflow.PruneRequest` and :func:`recover`."""
        return self if self.seed is not None else replace(self, seed=int(seed))

    @classmethod
    def parse(cls, spec: str | int | RecoveryConfig, **overrides: Any) -> RecoveryConfig:
        """``"quick"``, ``"standard"``, ``"long"``, ``"none"`` or a number of images (``"12000"``, ``"12k"``),
        with keyword overrides of the recipe (``method="kd"``, ``seed=1``)."""
        if isinstance(spec, RecoveryConfig):
            return replace(spec, **overrides)
        if isinstance(spec, bool):
            raise ConfigError(f"recovery={spec!r}: use 'quick', 'standard', 'long', 'none' or a number of images")
        if isinstance(spec, int):
            return cls(images=spec, **overrides)
        text = str(spec).strip().lower().replace("_", "").replace(",", "")
        if text in RECOVERY_PRESETS:
            return cls(images=RECOVERY_PRESETS[text], name=text, **overrides)
        scale = 1000 if text.endswith("k") else 1
        digits = text[:-1] if scale > 1 else text
        if digits.isdigit():
            return cls(images=int(digits) * scale, **overrides)
        raise ConfigError(
            f"recovery={spec!r} is not understood; use 'quick' (≤ {RECOVERY_PRESETS['quick']:,} images), "
            f"'standard' (≤ {RECOVERY_PRESETS['standard']:,}), 'long' (≤ {RECOVERY_PRESETS['long']:,}), 'none', "
            "or a number of training images"
        )

    def with_images(self, images: int) -> RecoveryConfig:
        """The same recipe with another budget (the preset name is dropped unless the budget is the same)."""
        same = images == self.images
        return replace(self, images=int(images), name=self.name if same else None,
                       preset_images=self.preset_images if same else None)

    def fit_to(self, train_images: int) -> RecoveryConfig:
        """This budget for a training split of ``train_images`` images: a named preset is capped at
        :data:`~cka_analysis.choices.RECOVERY_PRESET_MAX_EPOCHS` passes over the split (``quick`` on the digits
        demo's 1,437 images: 3 epochs = 4,311 images instead of 25,000, 17 epochs of a network that needs far
        fewer), the preset's own budget kept in :attr:`preset_images`. A budget given as a number, a split large
        enough (CIFAR-10's 50,000 images for ``quick``) or a config already fitted is returned unchanged."""
        epochs = RECOVERY_PRESET_MAX_EPOCHS.get(self.name or "")
        if epochs is None or self.preset_images is not None or train_images < 1:
            return self
        cap = int(epochs * train_images)
        if cap >= self.images:
            return self
        return replace(self, images=cap, preset_images=self.images)

    @property
    def capped(self) -> bool:
        """True when :meth:`fit_to` capped a preset to a few epochs of a small training split."""
        return self.preset_images is not None

    def split_iterative(self, steps: int, share: float = 0.3) -> tuple[int, int]:
        """(images per pruning step, images for the final recovery) for iterative pruning with ``steps``
        removals: ``share`` of the budget goes to the per-step recoveries, the rest (at least the remainder)
        to the final one, so that everything together never exceeds :attr:`images`."""
        if steps < 1:
            return 0, self.images
        per_step = int(self.images * share) // steps
        return per_step, self.images - per_step * steps

    @property
    def train_steps(self) -> int:
        """Optimiser steps the budget pays for after batch-norm re-estimation (and adaptor fitting)."""
        if self.method == "bn":
            return 0
        spent = min(self.bn_images, self.images) + (self.adaptor_images if self.method == "adaptor" else 0)
        return max(0, self.images - spent) // self.batch_size

    def describe(self) -> str:
        what = self.name or f"{self.images:,} images"
        if self.capped:
            epochs = RECOVERY_PRESET_MAX_EPOCHS[self.name or ""]
            what += (f", capped at {epochs:g} epochs of the training split: {self.images:,} images instead of "
                     f"{self.preset_images:,}")
        return f"{what} ({self.method}: {RECOVERY_METHODS[self.method]})" if self.images else "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoveryConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class RecoveryFacts:
    """The model-free facts of one recovery, shared by :class:`RecoveryResult` (which adds the model) and
    :class:`~cka_analysis.records.RecoveryRecord` (which adds what a front end keeps): the recipe, images drawn
    (≤ budget; batch-norm re-estimation and adaptor fits counted apart), optimiser steps, wall time, the accuracy
    curve (when evaluation data was given), the adaptors inserted, whether it was cancelled and the precision it
    trained in. A run resumed from a checkpoint counts the training time its checkpoint recorded in ``seconds``
    (``resumed_seconds`` of them; ``resumed_step``: where it went on), and ``devices`` says where each stretch of
    its training ran (``{"from_step", "device"}`` per start and resume; empty when it did not train)."""

    config: RecoveryConfig
    images_seen: int = 0
    bn_images: int = 0
    adaptor_images: int = 0
    steps: int = 0
    seconds: float = 0.0
    accuracy: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    adaptors: list[str] = field(default_factory=list)
    cancelled: bool = False
    amp: str | None = None
    resumed_step: int | None = None
    resumed_seconds: float = 0.0
    devices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.config.method

    def facts(self) -> dict[str, Any]:
        """These fields as plain Python values (lists copied), to build the other type from."""
        out = {f.name: getattr(self, f.name) for f in fields(RecoveryFacts)}
        for name in ("images_seen", "bn_images", "adaptor_images", "steps"):
            out[name] = int(out[name])
        out.update(seconds=float(self.seconds), resumed_seconds=float(self.resumed_seconds),
                   cancelled=bool(self.cancelled), history=list(self.history), adaptors=list(self.adaptors),
                   devices=[dict(d) for d in self.devices])
        return out


@dataclass
class RecoveryResult(RecoveryFacts):
    """What :func:`recover` returns: the recovered ``model`` and what recovery did (:class:`RecoveryFacts`)."""

    model: nn.Module = field(kw_only=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of its model-free part, :class:`~cka_analysis.records.RecoveryRecord` (one format for both)."""
        from .records import RecoveryRecord  # records imports this module

        return RecoveryRecord.from_result(self).to_dict()


# ------------------------------------------------------------------------------------------------ data helpers
def _base_and_indices(data: Dataset) -> tuple[Dataset, list[int] | None]:
    indices: list[int] | None = None
    while isinstance(data, Subset):
        idx = list(data.indices)
        indices = idx if indices is None else [idx[i] for i in indices]
        data = data.dataset
    return data, indices


def plain_and_augment(data: Dataset, preset: Any, seed: int) -> tuple[Dataset, Any]:
    """(the data without per-image random transforms, a seeded batch augmentation) for small-image
    :class:`~cka_analysis.data.ImageDataset` data — augmentation then needs no process-wide random state;
    ``(data, None)`` for anything else (its own transforms augment)."""
    from .data import SMALL_IMAGE_MAX, ImageDataset, build_transform
    from .training import BatchAugment

    base, indices = _base_and_indices(data)
    if not isinstance(base, ImageDataset) or max(preset.input_size[1:]) > SMALL_IMAGE_MAX:
        return data, None
    plain = copy.copy(base)
    plain.transform = build_transform(preset, augment=False)
    out: Dataset = plain if indices is None else Subset(plain, indices)
    return out, BatchAugment.for_preset(preset, seed)


def _first_images(data: Dataset, n: int, seed: int) -> Subset:
    """``n`` images of ``data`` in a seeded order (for batch-norm statistics and adaptor fits)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + 7919))[:n]  # type: ignore[arg-type]
    return Subset(data, order.tolist())


def _images_loader(data: Dataset, batch_size: int) -> Any:
    from .data import make_loader

    return make_loader(data, batch_size=batch_size, shuffle=False, num_workers=0)


# -------------------------------------------------------------------------------------------------- batch norm
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Dataset, *, images: int = 2048, batch_size: int = 256,
                          device: str | torch.device = "auto", seed: int = 0,
                          cancel: CancelToken | None = None) -> int:
    """Recompute every batch-norm layer's running statistics on ``images`` training images passed through
    ``model`` (no weight changes): the running mean is the exact mean over the images, the running variance
    the size-weighted average of the per-batch variances. Returns the images used (0 without batch norm)."""
    from .device import resolve_device

    layers = [m for m in model.modules() if isinstance(m, _BN)]
    if not layers:
        return 0
    dev = resolve_device(device)
    n = min(int(images), len(data))  # type: ignore[arg-type]
    saved = [(m, m.momentum) for m in layers]
    was_training = model.training
    model.to(dev)
    for m in layers:
        m.reset_running_stats()
    model.train()
    seen = 0
    try:
        for x, *_ in _images_loader(_first_images(data, n, seed), batch_size):
            check_cancel(cancel, "batch-norm re-estimation")
            for m in layers:  # running = (seen·running + b·batch) / (seen + b)
                m.momentum = x.shape[0] / (seen + x.shape[0])
            model(x.to(dev))
            seen += x.shape[0]
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return n


# ----------------------------------------------------------------------------------------------------- adaptors
def _removed_runs(model: nn.Module) -> list[list[str]]:
    """Maximal runs of consecutive removed slots within one stage, in forward order."""
    from .blocks import topology

    topo = topology(model)
    runs: list[list[str]] = []
    for i, name in enumerate(topo.slots):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Identity) or isinstance(module, BlockAdaptor):
            continue
        stage = name.rsplit(".", 1)[0]
        prev = topo.slots[i - 1] if i else None
        if runs and prev == runs[-1][-1] and prev.rsplit(".", 1)[0] == stage:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def _capture(module: nn.Module, pre: bool, store: dict[str, torch.Tensor]) -> Any:
    if pre:
        return module.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach()))
    return module.register_forward_hook(lambda m, args, out: store.__setitem__("x", out.detach()))


def _ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ‖xWᵀ + b − y‖² + ridge·n·‖W − I‖² (float64): pulls an ill-posed fit towards identity."""
    n, c = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    reg = ridge * n * torch.eye(c + 1, dtype=x.dtype)
    reg[-1, -1] = 0.0
    prior = torch.cat([torch.eye(c, dtype=x.dtype), torch.zeros(1, c, dtype=x.dtype)])
    sol = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y + reg @ prior)
    return sol[:c].T, sol[c]


@torch.no_grad()
def fit_adaptors(student: nn.Module, teacher: nn.Module, data: Dataset, *, images: int = 1024,
                 batch_size: int = 256, ridge: float = 1e-3, device: str | torch.device = "auto",
                 seed: int = 0) -> list[str]:
    """Replace each run of consecutive removed blocks of ``student`` (a pruned copy of ``teacher``) by a
    :class:`BlockAdaptor` fitted so that, on ``images`` training images, the student's activation after the run
    matches the teacher's. Runs are fitted in forward order on the student's own (already adapted) inputs, so
    each fit also corrects the errors upstream. Only 4-D (convolutional) slots are fitted. Returns the slots."""
    from .device import resolve_device

    dev = resolve_device(device)
    student.to(dev).eval()
    teacher.to(dev).eval()
    batch = torch.cat([x for x, *_ in _images_loader(_first_images(data, images, seed), batch_size)])
    fitted: dict[str, int] = {}
    for run in _removed_runs(student):
        s_in: dict[str, torch.Tensor] = {}
        t_out: dict[str, torch.Tensor] = {}
        hooks = [_capture(student.get_submodule(run[0]), True, s_in),
                 _capture(teacher.get_submodule(run[-1]), False, t_out)]
        xs, ys = [], []
        try:
            for chunk in batch.split(batch_size):
                student(chunk.to(dev))
                teacher(chunk.to(dev))
                xs.append(s_in["x"].double().cpu())
                ys.append(t_out["x"].double().cpu())
        finally:
            for h in hooks:
                h.remove()
        x, y = torch.cat(xs), torch.cat(ys)
        if x.dim() != 4 or x.shape != y.shape:
            continue
        c = x.shape[1]
        w, b = _ridge(x.permute(0, 2, 3, 1).reshape(-1, c), y.permute(0, 2, 3, 1).reshape(-1, c), ridge)
        insert_adaptors(student, {run[0]: c})
        conv = student.get_submodule(run[0]).conv
        conv.weight.copy_(w.view(c, c, 1, 1).to(conv.weight))
        conv.bias.copy_(b.to(conv.bias))
        fitted[run[0]] = c
    student.to(dev)
    return list(fitted)


# ----------------------------------------------------------------------------------------------- the objective
def feature_points(model: nn.Module, mimic: str = "blocks") -> list[str]:
    """Where ``feature`` recovery compares student and teacher: the output of every module that holds blocks
    (each stage) and the classifier's input (the penultimate features); with ``mimic="blocks"`` (the default) also
    the input of every kept block but a stage's first (``"name:in"``), where the pruned network should still agree
    with the unpruned one."""
    from .blocks import topology

    topo = topology(model)
    parents = list(dict.fromkeys(s.rsplit(".", 1)[0] for s in topo.slots if "." in s))
    kept = []
    if mimic == "blocks":
        kept = [f"{s}:in" for i, s in enumerate(topo.slots)
                if i and s.rsplit(".", 1)[0] == topo.slots[i - 1].rsplit(".", 1)[0]
                and not isinstance(model.get_submodule(s), nn.Identity)]
    return kept + parents + ([f"{topo.classifier}:in"] if topo.classifier else [])


class _Taps:
    """Forward hooks that keep the latest activation at each feature point."""

    def __init__(self, model: nn.Module, points: list[str]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = []
        for p in points:
            name, _, side = p.partition(":")
            module = model.get_submodule(name)
            if side == "in":
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, p=p: self.values.__setitem__(p, args[0])))
            else:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, p=p: self.values.__setitem__(p, out)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class _Fading(nn.Module):
    """A removed block back in its slot for the start of training: ``x + a·(block(x) − x)`` with ``a`` read from
    ``alpha`` at every call (``x`` alone once it is 0). The block is a frozen copy of the teacher's, kept in eval
    mode and *not registered* as a submodule, so the student's parameters, state dict and checkpoints are those of
    the pruned network throughout."""

    def __init__(self, block: nn.Module, alpha: Callable[[], float]) -> None:
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: see the class docstring
        self.alpha = alpha

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a = self.alpha()
        if a <= 0:
            return x
        out = self._block(x, *args, **kwargs)
        if isinstance(out, (tuple, list)):  # transformer layers: (hidden states, ...); a removed one returns x
            out = out[0]
        return x + a * (out - x)


def removed_slots(model: nn.Module) -> list[str]:
    """The block slots of ``model`` whose block was removed (an identity; fitted adaptors are not)."""
    from .blocks import topology

    return [name for name in topology(model).slots
            if isinstance(m := model.get_submodule(name), nn.Identity) and not isinstance(m, BlockAdaptor)]


class _Fade:
    """The removed blocks of ``student`` faded out over the first ``fraction`` of training (``progress`` in
    [0, 1]): :class:`_Fading` modules in the removed slots, frozen copies of ``teacher``'s blocks; :meth:`close`
    puts the identities back."""

    def __init__(self, student: nn.Module, teacher: nn.Module, fraction: float,
                 progress: Callable[[], float]) -> None:
        self.student, self.fraction, self.progress = student, fraction, progress
        self.slots = removed_slots(student)
        self.removed = {name: student.get_submodule(name) for name in self.slots}
        for name in self.slots:  # the teacher's device and memory format come with the copy
            block = copy.deepcopy(teacher.get_submodule(name)).eval().requires_grad_(False)
            _set_submodule(student, name, _Fading(block, self.alpha))

    def alpha(self) -> float:
        """The blocks' share now: cosine from 1 to 0 over the first ``fraction`` of training, then 0."""
        p = min(1.0, max(0.0, self.progress())) / self.fraction
        return 0.5 * (1 + math.cos(math.pi * p)) if p < 1 else 0.0

    def close(self) -> None:
        for name, module in self.removed.items():
            _set_submodule(self.student, name, module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class RecoveryObjective:
    """The loss of one recovery method: ``(1 − α)·CE + α·KD`` (``kd``), plus ``β·Σ MSE(s, t)/mean(t²)`` over the
    feature points (``feature``, ``adaptor``), or CE alone (``ce``); with ``config.fade`` the removed blocks fade
    out of the student over the first steps (:class:`_Fade`). Call :meth:`close` to remove its hooks and the
    fading blocks."""

    def __init__(self, config: RecoveryConfig, student: nn.Module, teacher: nn.Module | None) -> None:
        self.config, self.teacher = config, teacher
        uses_teacher = config.method != "ce"
        if uses_teacher and teacher is None:
            raise ConfigError(f"recovery method {config.method!r} distils from the unpruned model: give teacher=")
        feats = config.method in ("feature", "adaptor") and config.feature_weight > 0
        points = feature_points(student, config.mimic) if feats else []
        self.s_taps = _Taps(student, points) if feats else None
        self.t_taps = _Taps(teacher, points) if feats and teacher is not None else None
        #: the fraction of training done, in [0, 1] (set by the training stage; the feature schedule and the
        #: fading blocks read it)
        self.progress: Callable[[], float] = lambda: 0.0
        # after the taps: the feature points are those of the pruned network
        self.fade = _Fade(student, teacher, config.fade, lambda: self.progress()) \
            if config.fade and teacher is not None else None

    def feature_weight(self) -> float:
        """The feature term's weight now: constant, or cosine-decayed over training."""
        w = self.config.feature_weight
        if self.config.feature_schedule == "cosine":
            w *= 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, self.progress()))))
        return w

    def __call__(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from .training import distillation_loss

        c = self.config
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y)
        if c.method == "ce" or self.teacher is None:
            return loss
        with torch.no_grad():
            t_logits = self.teacher(x)
        loss = (1 - c.kd_alpha) * loss + c.kd_alpha * distillation_loss(logits, t_logits, c.kd_temperature)
        weight = self.feature_weight()
        if self.s_taps is not None and self.t_taps is not None and weight > 0:
            feat = sum(F.mse_loss(self.s_taps.values[k].float(), t.float()) / (t.float().pow(2).mean() + 1e-8)
                       for k, t in self.t_taps.values.items())
            loss = loss + weight * feat
        return loss

    def close(self) -> None:
        """Remove the hooks and put the removed blocks' identities back (the student is the pruned network)."""
        for taps in (self.s_taps, self.t_taps):
            if taps is not None:
                taps.close()
        if self.fade is not None:
            self.fade.close()
            self.fade = None


# ------------------------------------------------------------------------------------------------- recover()
def recover(
    model: nn.Module,
    train_data: Dataset,
    config: RecoveryConfig | str | int = "quick",
    *,
    teacher: nn.Module | None = None,
    eval_data: Dataset | None = None,
    eval_samples: int | None = None,
    eval_points: int = 0,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
) -> RecoveryResult:
    """Recover the pruned ``model`` in place within ``config.images`` training images; see the module docstring.

    Args:
        model: the pruned network (a copy of ``teacher`` with blocks removed).
        train_data: the training split (augmented or not: small-image data is augmented per batch here; held
            in memory, it is moved to the device once and batched there, :class:`~cka_analysis.training.TensorBatches`).
        config: a :class:`RecoveryConfig` or what :meth:`RecoveryConfig.parse` reads (``"quick"``).
        teacher: the unpruned network (every method but ``ce`` and ``bn`` distils from it).
        eval_data, eval_samples: measure top-1 at the end (and at ``eval_points`` evenly spaced points for an
            accuracy-vs-images curve). They only report: the last weights are kept, never the best on this data.
        progress, cancel: reported and honoured; a cancel keeps the weights reached so far.
        checkpoint_path, resume: a resumable training state (see :class:`~cka_analysis.training.Trainer`).
    """
    from .data import make_loader
    from .device import resolve_device

    cfg = RecoveryConfig.parse(config).seeded(0)
    if teacher is None and cfg.method not in ("bn", "ce") and cfg.images:
        raise ConfigError(f"recovery method {cfg.method!r} distils from the unpruned model: give teacher=")
    dev = resolve_device(device)
    start = time.perf_counter()
    result = RecoveryResult(model=model, config=cfg)
    if cfg.images == 0:
        return result
    if teacher is not None:
        teacher.to(dev).eval()
    plain, augment = plain_and_augment(train_data, model.cka_preset, cfg.seed)
    _prepare(model, teacher, plain, cfg, dev, progress or no_progress, cancel, result)
    steps = 0 if cfg.method == "bn" else \
        max(0, cfg.images - result.bn_images - result.adaptor_images) // cfg.batch_size
    eval_loader = None if eval_data is None else make_loader(eval_data, batch_size=256, num_workers=0)
    if steps:
        from .training import TrainSpec

        spec = TrainSpec(total_steps=steps, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                         warmup_steps=max(1, int(cfg.warmup * steps)), amp=cfg.amp, seed=cfg.seed,
                         eval_every=max(1, steps // eval_points) if eval_points else None,
                         seed_global=augment is None, keep_best=False, clip_factor=cfg.clip_factor)
        io = _TrainIO(plain, augment, eval_loader, eval_samples, progress, cancel, checkpoint_path, resume)
        _train(model, teacher, cfg, spec, dev, io, result)
    elif eval_loader is not None:
        from .metrics import evaluate

        result.accuracy = evaluate(model, eval_loader, device=dev, max_samples=eval_samples).top1
    model.eval()
    result.seconds = time.perf_counter() - start + result.resumed_seconds
    return result


def _prepare(model: nn.Module, teacher: nn.Module | None, plain: Dataset, cfg: RecoveryConfig, dev: torch.device,
             report: ProgressFn, cancel: CancelToken | None, result: RecoveryResult) -> None:
    """The training-free stages: batch-norm re-estimation, and for ``adaptor`` the fitted adaptors (followed by
    a second re-estimation on the same images, which the budget already paid for)."""
    report(0, None, "recovery: re-estimating batch-norm statistics")
    result.bn_images = recalibrate_batchnorm(model, plain, images=min(cfg.bn_images, cfg.images), device=dev,
                                             seed=cfg.seed, cancel=cancel)
    result.images_seen = result.bn_images
    if cfg.method == "adaptor" and teacher is not None and cfg.images > result.bn_images + cfg.adaptor_images:
        report(0, None, "recovery: fitting adaptors for the removed blocks")
        result.adaptors = fit_adaptors(model, teacher, plain, images=cfg.adaptor_images, device=dev, seed=cfg.seed)
        result.adaptor_images = cfg.adaptor_images if result.adaptors else 0
        result.images_seen += result.adaptor_images
        recalibrate_batchnorm(model, plain, images=result.bn_images, device=dev, seed=cfg.seed, cancel=cancel)


@dataclass
class _TrainIO:
    """What the training stage reads and reports to: the data, the evaluation, progress and resumption."""

    plain: Dataset
    augment: Any
    eval_loader: Any
    eval_samples: int | None
    progress: ProgressFn | None
    cancel: CancelToken | None
    checkpoint_path: str | Path | None
    resume: bool


def _train(model: nn.Module, teacher: nn.Module | None, cfg: RecoveryConfig, spec: Any, dev: torch.device,
           io: _TrainIO, result: RecoveryResult) -> None:
    """The training stage: the method's objective minimised by a :class:`~cka_analysis.training.Trainer`."""
    from .data import default_num_workers
    from .distributed import make_loader_for_world
    from .training import Trainer

    plain, augment = io.plain, io.augment
    workers = 0 if augment is not None else default_num_workers(plain)
    loader = make_loader_for_world(plain, global_batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                   drop_last=True, num_workers=workers, device=dev)
    if augment is not None:  # in-memory small images: held on the device, batches gathered there
        from .training import TensorBatches

        loader = TensorBatches.from_dataset(plain, model.cka_preset, batch_size=loader.batch_size,
                                            sampler=loader.sampler, drop_last=True, device=dev) or loader
    # a private copy of the teacher: feature mimicking hooks it, and it runs in the trainer's memory format
    tap_teacher = None if teacher is None or cfg.method == "ce" else copy.deepcopy(teacher).eval()
    if tap_teacher is not None and dev.type in ("cpu", "cuda"):
        tap_teacher.to(memory_format=torch.channels_last)
    objective = RecoveryObjective(cfg, model, tap_teacher)
    try:
        trainer = Trainer(model, loader, objective, spec, device=dev, eval_loader=io.eval_loader,
                          eval_samples=io.eval_samples, augment=augment, progress=io.progress, cancel=io.cancel,
                          checkpoint_path=io.checkpoint_path,
                          checkpoint_seconds=30.0 if dev.type == "cuda" else 0.0)
        objective.progress = lambda: trainer.step / max(1, spec.total_steps)
        tr = trainer.run(resume=io.resume)
    finally:
        objective.close()
    spent = result.images_seen
    result.steps, result.cancelled, result.amp = tr.steps, tr.cancelled, tr.amp
    result.resumed_step, result.resumed_seconds, result.devices = tr.resumed_step, tr.resumed_seconds, tr.devices
    result.history = [{**h, "images": h.get("images", 0) + spent} for h in tr.history]
    result.accuracy = next((h["eval_top1"] for h in reversed(tr.history) if "eval_top1" in h), None)
    result.images_seen = spent + tr.images


# ---------------------------------------------------------------------------------------------------- estimate
def estimate_recovery(config: RecoveryConfig | str | int, model: nn.Module, teacher: nn.Module | None = None,
                      *, device: str | torch.device = "auto", probe_steps: int = 3,
                      macs_reduction: float | None = None) -> dict[str, Any]:
    """Expected wall time of ``recover`` on this machine, from timing ``probe_steps`` training steps of the
    method on random input (the model is not changed), and the accuracy drop measured for the same recipe and
    budget on the reference benchmark (ResNet-56, CIFAR-10) at the measured MACs reduction nearest
    ``macs_reduction`` (−52.6 % when it is not given), when there is one.

    Returns ``{"seconds", "seconds_per_image", "images", "reference_drop_pp", "reference"}``.
    """
    from .device import resolve_device, synchronize, tune_cpu_allocator

    cfg = RecoveryConfig.parse(config)
    dev = resolve_device(device)
    if dev.type == "cpu":  # as the trainer will run
        tune_cpu_allocator()
    steps = cfg.train_steps if cfg.images else 0
    forward_images = min(cfg.bn_images, cfg.images) + (cfg.adaptor_images if cfg.method == "adaptor" else 0)
    # the recipe's own batch (throughput per image depends on it), fewer images only where a batch would cost
    # more than PROBE_MACS multiply-accumulates (large ImageNet models on a CPU)
    from .metrics import count_macs
    from .training import train_in_channels_last, training_autocast, training_dtype

    per_image_macs = max(1, count_macs(model, model.cka_preset.input_size))
    n = int(min(cfg.batch_size, max(8, PROBE_MACS // per_image_macs)))
    x = torch.randn(n, *model.cka_preset.input_size, device=dev)
    y = torch.zeros(n, dtype=torch.long, device=dev)
    student = copy.deepcopy(model).to(dev)
    if train_in_channels_last(dev, student):  # as the trainer runs it: memory format and precision
        student.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = training_dtype(cfg.amp, dev)

    def timed(fn: Any) -> float:
        times = []
        for _ in range(probe_steps + 1):
            t0 = time.perf_counter()
            fn()
            synchronize(dev)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[len(times[1:]) // 2] / n

    per_forward = per_train = 0.0
    if cfg.images:
        with torch.no_grad():
            per_forward = timed(lambda: student(x))
    if steps:
        probe_teacher = copy.deepcopy(teacher) if teacher is not None else None
        if probe_teacher is not None and x.is_contiguous(memory_format=torch.channels_last):
            probe_teacher.to(dev, memory_format=torch.channels_last)
        objective = RecoveryObjective(cfg, student.train(), probe_teacher)
        opt = torch.optim.SGD(student.parameters(), lr=1e-9)

        def train_step() -> None:
            opt.zero_grad()
            with training_autocast(dev, dtype):
                loss = objective(student, x, y)
            loss.backward()
            opt.step()

        try:
            per_train = timed(train_step)  # progress 0: with fading blocks, every one of them at full weight
            if objective.fade is not None:  # the faded share of the steps at that cost, the rest without them
                objective.progress = lambda: 1.0
                per_train = cfg.fade * per_train + (1 - cfg.fade) * timed(train_step)
        finally:
            objective.close()
    seconds = per_train * steps * cfg.batch_size + per_forward * forward_images
    found = _reference_curve(cfg, macs_reduction)
    ref = _drop_at(found[1], cfg.images) if found else None
    return {"seconds": seconds, "seconds_per_image": per_train, "images": cfg.images,
            "reference_drop_pp": ref, "reference": reference_note(found[0]) if ref is not None else None}


#: Where the reference curves live: written by ``python -m benchmarks.recovery --stage report`` from its test rows
#: (``benchmarks/results/recovery.json``), shipped inside the package.
REFERENCE_CURVE_FILE = Path(__file__).resolve().parent / "data_files" / "reference_curve.json"


def load_reference_curves(path: str | Path = REFERENCE_CURVE_FILE
                          ) -> dict[float, dict[tuple[str, str, float, str], dict[int, float]]]:
    """{MACs reduction: {(method, mimic, feature weight, schedule): {budget: drop in top-1 points}}} from the file
    the recovery benchmark writes (empty when it is missing: the estimate then quotes no reference)."""
    p = Path(path)
    if not p.is_file():
        return {}
    out: dict[float, dict[tuple[str, str, float, str], dict[int, float]]] = {}
    for c in json.loads(p.read_text())["curves"]:
        key = (c["method"], c["mimic"], float(c["feature_weight"]), c["feature_schedule"])
        out.setdefault(float(c["macs_reduction"]), {})[key] = {int(b): float(v) for b, v in c["drop_pp"].items()}
    return out


#: Measured with ``benchmarks/recovery.py`` (ResNet-56 ``cifar10jpeg``, CKA one-shot, all 10,000 test images):
#: top-1 points below the unpruned model (89.51 %) after recovery, by budget, at each MACs reduction measured, for
#: each recipe measured there (keyed by method, where features are mimicked, the feature weight and its schedule; the
#: rest of the recipe at its defaults). Where a row was repeated over seeds, the mean. Read from
#: :data:`REFERENCE_CURVE_FILE`, which the benchmark writes — never typed in by hand.
REFERENCE_DROP_PP: dict[float, dict[tuple[str, str, float, str], dict[int, float]]] = load_reference_curves()
REFERENCE_MACS_REDUCTION = 0.526  # what an estimate quotes when the request's MACs reduction is not known


def reference_note(macs_reduction: float) -> str:
    """Where a reference drop was measured."""
    return (f"ResNet-56 on CIFAR-10 (JPEG copy), CKA one-shot at −{100 * macs_reduction:.1f} % MACs, "
            "same recovery recipe")


def _reference_curve(cfg: RecoveryConfig, macs_reduction: float | None = None
                     ) -> tuple[float, dict[int, float]] | None:
    """(the reduction it was measured at, the measured drop-by-budget curve) of ``cfg``'s recipe at the measured
    MACs reduction nearest ``macs_reduction`` (budget and seed aside), if the recipe was measured."""
    default = RecoveryConfig()
    same_rest = all(getattr(cfg, f.name) == getattr(default, f.name) for f in fields(cfg)
                    if f.name not in ("images", "seed", "name", "amp", "method", "mimic", "feature_weight",
                                      "feature_schedule"))
    key = (cfg.method, cfg.mimic, cfg.feature_weight, cfg.feature_schedule)
    measured = [r for r, curves in REFERENCE_DROP_PP.items() if key in curves]
    if not same_rest or not measured:
        return None
    wanted = REFERENCE_MACS_REDUCTION if macs_reduction is None else macs_reduction
    nearest = min(measured, key=lambda r: abs(r - wanted))
    return nearest, REFERENCE_DROP_PP[nearest][key]


def _reference_drop(cfg: RecoveryConfig, macs_reduction: float | None = None) -> float | None:
    """The reference drop at ``cfg.images`` (at the measured MACs reduction nearest ``macs_reduction``)."""
    found = _reference_curve(cfg, macs_reduction)
    return _drop_at(found[1], cfg.images) if found else None


def _drop_at(curve: dict[int, float], images: int) -> float | None:
    """``curve`` at ``images``, interpolated on a log scale between the measured budgets."""
    budgets = sorted(curve)
    if images in curve:
        return curve[images]
    if images <= budgets[0]:
        return curve[budgets[0]]
    if images > budgets[-1]:  # beyond the longest recovery measured (e.g. ``long``): nothing honest to quote
        return None
    hi = next(b for b in budgets if b >= images)
    lo = budgets[budgets.index(hi) - 1]
    if lo == 0:  # nothing between no recovery and the first budget: no honest interpolation
        return None
    t = (math.log(images) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return curve[lo] + t * (curve[hi] - curve[lo])
