"""Training a pruned model: one small :class:`Trainer` that both fine-tuning and recovery use.

The trainer owns the optimisation loop and nothing else: SGD with (Nesterov) momentum, a warm-up followed by a
cosine, one-cycle or constant schedule (``torch.optim.lr_scheduler``), AMP and channels_last on CUDA,
DistributedDataParallel under ``torchrun``, a budget in optimiser steps, the best weights seen at an evaluation
point, cooperative cancellation and a resumable checkpoint. *What* is minimised is an :data:`Objective` given to it
(cross-entropy, distillation from the unpruned model, feature mimicking: see :mod:`cka_analysis.recovery`).

Randomness is local: the data order comes from the loader's sampler or generator and batch augmentation from a
``torch.Generator`` seeded by the spec, so two trainings running in one process at once never touch each other's
(or the process's) random state.

:func:`finetune` is the classic entry point kept for ``cka-prune finetune``: an epoch or step budget with
cross-entropy and optional logit distillation.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .device import amp_dtype, describe_device, resolve_device, tune_cpu_allocator, use_channels_last
from .errors import Cancelled, CheckpointError, ConfigError, DivergedError
from .progress import CancelToken, ProgressFn, no_progress

__all__ = [
    "BatchAugment",
    "FinetuneConfig",
    "FinetuneResult",
    "Objective",
    "TensorBatches",
    "TrainSpec",
    "Trainer",
    "checkpoint_progress",
    "distillation_loss",
    "finetune",
    "learning_rates",
    "train_in_channels_last",
    "training_autocast",
    "training_dtype",
]

#: ``objective(net, x, y) -> scalar loss``: runs the (possibly DDP-wrapped) student ``net`` on a batch.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULES = ("cosine", "onecycle", "constant")
CHECKPOINT_FORMAT = "cka-prune-finetune/1"


@dataclass(frozen=True)
class TrainSpec:
    """How to optimise: budget in steps, the optimiser, the schedule, precision and evaluation points.

    ``warmup_steps`` = None picks 5 % of the steps (at most 200) for cosine; ``eval_every`` = None evaluates
    only at the start and the end. ``seed_global`` seeds torch's process-wide generator with ``seed`` for the
    run (and restores it afterwards): only for datasets whose own transforms draw random augmentations in this
    process; :class:`BatchAugment` and seeded loaders need no global state. ``keep_best`` ends with the best
    weights seen at an evaluation (when the evaluation data is a validation split); False keeps the last ones and
    evaluates only to report. ``clip_factor`` clips every step's gradient (global L2 norm) at that multiple of the first
    step's norm: a guard against runaway growth that a run whose gradients shrink as it learns never meets (so it
    changes nothing there, bit for bit); None: no clipping. Whatever it is set to, a loss or gradient that becomes
    NaN or infinite stops the run with :class:`~cka_analysis.errors.DivergedError` before that step is taken.
    """

    total_steps: int
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int | None = None
    amp: str = "auto"
    eval_every: int | None = None
    seed: int = 0
    seed_global: bool = False
    keep_best: bool = True
    clip_factor: float | None = None

    def __post_init__(self) -> None:
        if self.clip_factor is not None and not self.clip_factor > 0:
            raise ConfigError(f"clip_factor={self.clip_factor} must be positive (or None: no clipping)")
        if self.total_steps < 0:
            raise ConfigError(f"total_steps={self.total_steps} must be ≥ 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} must be one of {', '.join(SCHEDULES)}")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"eval_every={self.eval_every} must be ≥ 1 (or None: start and end only)")

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return max(1, min(self.warmup_steps, max(1, self.total_steps)))
        return max(1, min(self.total_steps // 20, 200))


@dataclass
class TrainResult:
    """What a training run did: history (losses, learning rates, evaluations), the best evaluation, the steps
    and images it took, whether it was cancelled, and its wall time.

    A resumed run's ``seconds`` include the time the run had spent before it was interrupted, as its checkpoint
    recorded it (``resumed_seconds``; the work between that checkpoint and the interruption is lost and not
    counted), and ``resumed_step`` is the step it went on from (None when it started from scratch).
    ``devices`` says where each stretch ran: ``{"from_step", "device"}`` per start and resume, in order (the
    checkpoint carries the earlier ones; one an older checkpoint did not record has device None).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    best_accuracy: float | None = None
    best_step: int = 0
    steps: int = 0
    images: int = 0
    cancelled: bool = False
    seconds: float = 0.0
    amp: str | None = None
    resumed_step: int | None = None
    resumed_seconds: float = 0.0
    devices: list[dict[str, Any]] = field(default_factory=list)


class BatchAugment:
    """The standard small-image training augmentation (zero-padded random crop, horizontal flip) applied to a
    normalised batch with a local generator: seeded, thread-safe, and cheaper than per-image transforms.

    ``fill`` is the normalised value of a black pixel (−mean/std per channel), which is what padding the raw
    image with zeros before normalising gives.
    """

    def __init__(self, padding: int, hflip: bool, fill: torch.Tensor, seed: int = 0) -> None:
        self.padding, self.hflip, self.fill = int(padding), bool(hflip), fill.float().view(1, -1, 1, 1)
        self._fills: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(int(seed))

    @classmethod
    def for_preset(cls, preset: Any, seed: int = 0) -> BatchAugment:
        mean, std = torch.tensor(preset.mean), torch.tensor(preset.std)
        return cls(preset.crop_padding, preset.hflip, -mean / std, seed)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random numbers of one batch of ``n`` images, from the generator in a fixed order (row offsets,
        column offsets, flips): what makes two runs with the same seed augment alike."""
        p = self.padding
        if p > 0:
            dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator)
        else:
            dy = dx = torch.zeros(n, dtype=torch.long)
        flip = (torch.rand(n, generator=self.generator) < 0.5) if self.hflip else torch.zeros(n, dtype=torch.bool)
        return dy, dx, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Augment the batch ``x`` ``[N, C, H, W]`` on its own device, without a host synchronisation: the
        random numbers are drawn on the CPU (:meth:`draw`), sent in one pinned, non-blocking copy, and the crops
        are one gather from the padded batch."""
        n, c, h, w = x.shape
        p = self.padding
        dy, dx, flip = self.draw(n)
        r = torch.stack([dy, dx, flip.long()])
        if x.device.type == "cuda":
            r = r.pin_memory().to(x.device, non_blocking=True)
        dy, dx, flip = r[0], r[1], r[2].bool()
        if p > 0:
            key = (x.device, x.dtype)  # the fill on the batch's device, copied there once (not once per batch)
            if key not in self._fills:
                self._fills[key] = self.fill.to(x.device, x.dtype)
            padded = self._fills[key].expand(n, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
            rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
            cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
            x = padded[torch.arange(n, device=x.device).view(n, 1, 1, 1),
                       torch.arange(c, device=x.device).view(1, c, 1, 1), rows, cols]
        if self.hflip:
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        return x


class TensorBatches:
    """Training batches of an in-memory small-image dataset, held as one tensor on the training device.

    What :class:`~torch.utils.data.DataLoader` over the same data gives (the same images in the same order:
    ``sampler`` draws the indices, and the per-image transform is the evaluation transform, scaling to [0, 1] and
    normalising), without a per-image Python call, a collate, a worker or a host-to-device copy per step: the raw
    pixels (uint8, or [0, 1] floats) go to the device once, an epoch's order goes there once, and each batch is a
    gather, a scale and a normalisation on the device. Augment with :class:`BatchAugment` afterwards.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, mean: Any, std: Any, batch_size: int,
                 sampler: Any, drop_last: bool = True, device: str | torch.device = "cpu") -> None:
        dev = resolve_device(device)
        self.images, self.labels = images.to(dev), labels.to(dev)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        self.batch_size, self.sampler, self.drop_last, self.device = batch_size, sampler, drop_last, dev
        self.generator = None  # the order is the sampler's (seed + epoch): nothing else to save for a resume

    @classmethod
    def from_dataset(cls, dataset: Any, preset: Any, *, batch_size: int, sampler: Any, drop_last: bool = True,
                     device: str | torch.device = "cpu") -> TensorBatches | None:
        """The batches of ``dataset`` (an in-memory :class:`~cka_analysis.data.ImageDataset`, or a Subset of
        one) whose images all have the preset's size; None when it is anything else (use a DataLoader)."""
        from torch.utils.data import Subset

        from .data import ImageDataset

        indices: list[int] | None = None
        base = dataset
        while isinstance(base, Subset):
            idx = list(base.indices)
            indices = idx if indices is None else [idx[i] for i in indices]
            base = base.dataset
        if not isinstance(base, ImageDataset) or not base.in_memory:
            return None
        order = range(len(base)) if indices is None else indices
        raws = [base.raw(i) for i in order]
        size = tuple(preset.input_size)
        if not raws or any(tuple(r.shape) != size for r in raws):
            return None
        labels = torch.tensor([base.targets[i] for i in order], dtype=torch.long)
        return cls(torch.stack(raws), labels, mean=preset.mean, std=preset.std, batch_size=batch_size,
                   sampler=sampler, drop_last=drop_last, device=device)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (scaled and normalised as the evaluation transform does) and labels at positions ``idx``."""
        raw = self.images[idx]
        x = raw.float() if raw.is_floating_point() else raw.to(torch.float32).mul_(1.0 / 255)
        return x.sub_(self.mean).div_(self.std), self.labels[idx]

    def __iter__(self) -> Any:
        order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        if self.device.type == "cuda":
            order = order.pin_memory()
        order = order.to(self.device, non_blocking=True)
        for i in range(len(self)):
            yield self.batch(order[i * self.batch_size:(i + 1) * self.batch_size])


def _scheduler(opt: torch.optim.Optimizer, spec: TrainSpec) -> torch.optim.lr_scheduler.LRScheduler:
    from torch.optim import lr_scheduler as S

    total = max(spec.total_steps, 1)
    if spec.schedule == "constant":
        return S.ConstantLR(opt, factor=1.0, total_iters=0)
    if spec.schedule == "onecycle":
        return S.OneCycleLR(opt, max_lr=spec.lr, total_steps=total + 1, pct_start=0.3, anneal_strategy="cos",
                            cycle_momentum=False, div_factor=25.0, final_div_factor=1e4)
    warm = spec.warmup
    warmup = S.LinearLR(opt, start_factor=1.0 / warm, end_factor=1.0, total_iters=warm - 1 if warm > 1 else 0)
    cosine = S.CosineAnnealingLR(opt, T_max=max(1, total - warm + 1), eta_min=0.0)
    return S.SequentialLR(opt, [warmup, cosine], milestones=[warm - 1 if warm > 1 else 0])


def learning_rates(spec: TrainSpec) -> list[float]:
    """The learning rate of every step of ``spec`` (``total_steps + 1`` values: before each step, and after the
    last), as the trainer's scheduler produces them."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.lr)
    sched = _scheduler(opt, spec)
    rates = [opt.param_groups[0]["lr"]]
    for _ in range(spec.total_steps):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    return rates


def train_in_channels_last(dev: torch.device, model: nn.Module) -> bool:
    """Train convolutional models in channels_last: tensor cores on CUDA, and 15–20 % faster oneDNN
    convolutions on the CPU for the CIFAR ResNets (measured; the arithmetic is the same)."""
    if use_channels_last(dev):
        return True
    return dev.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def checkpoint_progress(path: str | Path) -> tuple[int, int] | None:
    """``(step, total steps)`` of the training checkpoint at ``path``, or None when there is none there (or it is
    not a readable cka-prune checkpoint: the run that resumes from it says why). Read with memory mapping, so that
    the tensors (weights, optimiser state) stay on disk; for estimates and messages before a resumed run starts."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # advisory only: the resume itself reports a broken checkpoint
        return None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        return None
    return int(saved["step"]), int(saved["total"])


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AMX tiles or AVX-512 BF16): there, autocast
    to bfloat16 makes training steps about 2× faster (ResNet-56 on a Xeon with AMX, measured)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def training_dtype(spec_amp: str, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training run: ``auto`` = bfloat16 (or float16) on CUDA, bfloat16 on CPUs with
    native bfloat16 arithmetic, none elsewhere."""
    if spec_amp != "auto":
        return amp_dtype(spec_amp)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def training_autocast(dev: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast for training on CUDA and on the CPU (evaluation keeps full precision on the CPU)."""
    import contextlib

    if dtype is None or dev.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


class Trainer:
    """Minimise ``objective`` over ``loader`` for ``spec.total_steps`` steps; see the module docstring.

    The model is trained in place and ends with the best weights seen at an evaluation point (the starting
    weights included) when ``eval_loader`` is given, else with the last ones — also after a cancel. The checkpoint
    is written every ``checkpoint_every`` steps, but not sooner than ``checkpoint_seconds`` after the last one
    (writing it synchronises with the device and copies every weight to the host: on a fast GPU, every 50 steps
    would be several times a second).
    ``images_per_step`` is counted from the batches drawn (times the number of processes under torchrun).
    """

    def __init__(self, model: nn.Module, loader: DataLoader, objective: Objective, spec: TrainSpec, *,
                 device: str | torch.device = "auto", eval_loader: DataLoader | None = None,
                 eval_samples: int | None = None, augment: BatchAugment | None = None,
                 progress: ProgressFn | None = None, cancel: CancelToken | None = None,
                 checkpoint_path: str | Path | None = None, checkpoint_every: int = 50,
                 checkpoint_seconds: float = 0.0) -> None:
        from . import distributed as dist_utils

        self.model, self.loader, self.objective, self.spec = model, loader, objective, spec
        self.dev = resolve_device(device)
        self.eval_loader, self.eval_samples, self.augment = eval_loader, eval_samples, augment
        self.is_main = dist_utils.is_main_process()
        self.world = dist_utils.world_size()
        self.report = (progress or no_progress) if self.is_main else no_progress
        self.cancel = cancel
        self.ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every, self.checkpoint_seconds = checkpoint_every, float(checkpoint_seconds)
        self._last_save = self._start = time.perf_counter()
        if self.dev.type == "cpu":  # no page faults on every step's activations
            tune_cpu_allocator()
        model.to(self.dev)
        self.channels_last = train_in_channels_last(self.dev, model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.dtype = training_dtype(spec.amp, self.dev)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16 and self.dev.type == "cuda")
        self.net = dist_utils.wrap_ddp(model, self.dev)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(
            [{"params": [p for p in params if p.dim() > 1], "weight_decay": spec.weight_decay},
             {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
            lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov and spec.momentum > 0,
        )
        self.sched = _scheduler(self.opt, spec)
        self.result = TrainResult(amp=None if self.dtype is None else str(self.dtype).replace("torch.", ""))
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_eval = -1
        self.step = self.epoch = self.skip = 0
        self.epoch_state: dict[str, Any] = {}
        self._pending: tuple | None = None
        #: the first step's gradient norm, which ``spec.clip_factor`` multiplies (saved with a checkpoint)
        self.grad_norm_ref: float | None = None
        #: on CUDA, whether every step so far had a finite loss and gradient (a device flag, read at each log
        #: point instead of after every step, so that the loop never waits for the GPU)
        self._finite: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------ checkpoints
    def _payload(self, in_epoch: int) -> dict[str, Any]:
        r = self.result
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "epoch": self.epoch, "batch": in_epoch,
            "total": self.spec.total_steps, "model": _state_copy(self.model), "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
            "best_state": self.best_state, "best_accuracy": r.best_accuracy, "best_step": r.best_step,
            "last_eval": self.last_eval, "history": r.history, "images": r.images, "grad_norm_ref": self.grad_norm_ref,
            "augment": None if self.augment is None else self.augment.state(), "settings": self._settings(),
            "seconds": self._elapsed(), "devices": r.devices,
            **self.epoch_state,
        }

    def _elapsed(self) -> float:
        """The run's wall time so far: this process's part and, for a resumed run, the checkpointed time before."""
        return self.result.resumed_seconds + time.perf_counter() - self._start

    def _settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (the recipe and the batch size)."""
        return {**asdict(self.spec), "batch_size": getattr(self.loader, "batch_size", None)}

    def save(self, in_epoch: int) -> None:
        """Write the whole training state atomically (rank 0 only)."""
        if self.ckpt is None or not self.is_main:
            return
        self._check_finite()  # never checkpoint weights that diverged
        self._flush_log()
        self._last_save = time.perf_counter()
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        torch.save(self._payload(in_epoch), tmp)
        os.replace(tmp, self.ckpt)

    def restore(self) -> bool:
        """Continue from the checkpoint when one exists; False when there is none."""
        if self.ckpt is None or not self.ckpt.is_file():
            return False
        try:
            saved = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {self.ckpt}: {exc}") from exc
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{self.ckpt} is not a cka-prune training checkpoint")
        if saved["total"] != self.spec.total_steps:
            raise CheckpointError(
                f"{self.ckpt} was written for a {saved['total']}-step run but this run has "
                f"{self.spec.total_steps} steps; resume with the same budget and data, or delete it to start over"
            )
        settings, now = saved.get("settings"), self._settings()
        if settings is not None and {**dict.fromkeys(now), **settings} != {**dict.fromkeys(settings), **now}:
            # a setting missing on one side counts as None (checkpoints written before it existed)
            diff = ", ".join(f"{k} {settings.get(k)!r} → {now.get(k)!r}" for k in sorted(set(settings) | set(now))
                             if settings.get(k) != now.get(k))
            raise CheckpointError(
                f"{self.ckpt} was written with other settings ({diff}); resume with the same settings, or delete "
                "it to start over"
            )
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{self.ckpt} does not fit this model (other blocks removed?): {exc}") from exc
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.best_state = saved["best_state"]
        r = self.result
        r.best_accuracy, r.best_step, r.history = saved["best_accuracy"], saved["best_step"], list(saved["history"])
        r.images = int(saved.get("images", 0))
        self.last_eval = saved["last_eval"]
        self.grad_norm_ref = saved.get("grad_norm_ref")
        self.step, self.epoch, self.skip = saved["step"], saved["epoch"], saved["batch"]
        r.resumed_step, r.resumed_seconds = self.step, float(saved.get("seconds") or 0.0)  # older: no time saved
        r.devices = [dict(d) for d in saved.get("devices") or [{"from_step": 0, "device": None}]]
        self._set_epoch_state(saved)
        if self.augment is not None and saved.get("augment") is not None:
            self.augment.set_state(saved["augment"])
        self.report(self.step, None, f"training: resumed at step {self.step}/{self.spec.total_steps}")
        return True

    def _epoch_state(self) -> dict[str, Any]:
        gen = getattr(self.loader, "generator", None)
        return {"loader_generator": gen.get_state() if gen is not None else None,
                "torch_rng": torch.get_rng_state() if self.spec.seed_global else None}

    def _set_epoch_state(self, saved: dict[str, Any]) -> None:
        gen = getattr(self.loader, "generator", None)
        if gen is not None and saved.get("loader_generator") is not None:
            gen.set_state(saved["loader_generator"])
        if self.spec.seed_global and saved.get("torch_rng") is not None:
            torch.set_rng_state(saved["torch_rng"])
        self.epoch_state = {"loader_generator": saved.get("loader_generator"), "torch_rng": saved.get("torch_rng")}

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> None:
        """Evaluate the current weights and keep them when they are the best so far."""
        self._flush_log()
        if self.eval_loader is None:
            return
        from . import distributed as dist_utils
        from .metrics import evaluate

        acc = dist_utils.reduce_accuracy(
            evaluate(self.model, self.eval_loader, device=self.dev, amp=self.dtype, max_samples=self.eval_samples),
            self.dev,
        )
        r = self.result
        self.last_eval = self.step
        r.history.append({"step": self.step, "images": r.images, "eval_top1": acc.top1, "eval_loss": acc.loss})
        if r.best_accuracy is None or acc.top1 > r.best_accuracy:
            r.best_accuracy, r.best_step = acc.top1, self.step
            if self.spec.keep_best:
                self.best_state = _state_copy(self.model)

    # ---------------------------------------------------------------------------------------------- the loop
    def _train_step(self, batch: Any) -> torch.Tensor:
        x = batch[0].to(self.dev, non_blocking=True)
        y = batch[1].to(self.dev, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with training_autocast(self.dev, self.dtype):
            loss = self.objective(self.net, x, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        finite = torch.isfinite(loss.detach())
        if self.spec.clip_factor is not None:
            self.scaler.unscale_(self.opt)
            limit = math.inf if self.grad_norm_ref is None else self.spec.clip_factor * self.grad_norm_ref
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), limit)
            if self.grad_norm_ref is None and math.isfinite(float(norm)):
                self.grad_norm_ref = float(norm)
            if not self.scaler.is_enabled():  # fp16's scaler skips steps with non-finite gradients itself
                finite = finite & torch.isfinite(norm)
        if self.dev.type == "cuda":  # checked at the next log point (_check_finite): no host sync per step
            self._finite = finite if self._finite is None else self._finite & finite
        elif not bool(finite):  # on the CPU at once, before the step that would spread NaN to every weight
            value = float(loss.detach())
            self._diverged(f"the loss became {value:g}" if not math.isfinite(value) else
                           f"the gradient norm became {float(norm):g}")
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        self.result.images += x.shape[0] * self.world
        return loss.detach()

    def _check_finite(self) -> None:
        """On CUDA: stop (DivergedError) if any step since the last check had a non-finite loss or gradient. The
        weights may already hold NaN then, but the run never returns them as a trained model."""
        if self._finite is not None and not bool(self._finite):
            self._finite = None
            self._diverged("the loss or the gradient became NaN or infinite in the last 10 steps")

    def _diverged(self, what: str) -> None:
        """Stop a run whose loss or gradient is no longer finite, before the step that would spread it to every
        weight: its weights are not a usable model, so nothing may return as if training had finished."""
        lr = self.sched.get_last_lr()[0]
        raise DivergedError(
            f"training diverged at step {self.step + 1}/{self.spec.total_steps}: {what} (learning rate {lr:g}); "
            "the weights are not usable. Lower the learning rate (lr=), or for recovery try method='kd' or a "
            "smaller clip_factor")

    def _epoch(self, running: torch.Tensor) -> None:
        total, eval_every = self.spec.total_steps, self.spec.eval_every
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if not self.skip:  # the data order of this epoch, so that a resumed run sees the same batches
            self.epoch_state = self._epoch_state()
        self.net.train()
        in_epoch = 0
        for batch in self.loader:
            if self.step >= total:
                break
            if in_epoch < self.skip:
                in_epoch += 1
                continue
            if self.cancel is not None and self.cancel.cancelled:
                raise Cancelled("training was cancelled")
            running += self._train_step(batch)
            self.step += 1
            in_epoch += 1
            self._log(running)
            if eval_every and self.step % eval_every == 0 and self.step < total:
                self.evaluate()
                self.net.train()
            if self.ckpt is not None and self.step % self.checkpoint_every == 0 and self.step < total \
                    and time.perf_counter() - self._last_save >= self.checkpoint_seconds:
                self.save(in_epoch)
        self.skip = 0
        self.epoch += 1

    def _log(self, running: torch.Tensor) -> None:
        """Every 10 steps, the mean training loss of those steps. On CUDA without waiting for the device: the
        mean is copied to the host asynchronously and reported at the next log point (or evaluation, checkpoint,
        end), so progress lags by 10 steps there; on the CPU at once."""
        step, total = self.step, self.spec.total_steps
        if step % 10 == 0 or step == total:
            mean = running / (10 if step % 10 == 0 else step % 10)
            running.zero_()
            self._flush_log()
            event = None
            if mean.device.type == "cuda":
                host = torch.empty((), dtype=mean.dtype, pin_memory=True)
                host.copy_(mean, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host = mean
            self._pending = (step, total, self.result.images, self.sched.get_last_lr()[0], host, event)
            if event is None:  # on the CPU the value is there already: report it now
                self._flush_log()

    def _flush_log(self, check: bool = True) -> None:
        """Report the loss logged last (waiting, at most, for the steps since it was logged); ``check``: first
        stop a run that diverged since the last check (:meth:`_check_finite`)."""
        if self._pending is None:
            return
        if check:
            self._check_finite()
        step, total, images, lr, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        mean_loss = float(host)
        self.report(step, total, f"training: step {step}/{total}, loss {mean_loss:.3f}")
        self.result.history.append({"step": step, "images": images, "train_loss": mean_loss, "lr": lr})

    def run(self, *, resume: bool = False) -> TrainResult:
        """Train to the budget (or a cancel) and return the record; the model holds the kept weights."""
        self._start = time.perf_counter()
        with torch.random.fork_rng(devices=[], enabled=self.spec.seed_global):
            if self.spec.seed_global:
                torch.manual_seed(self.spec.seed)
            return self._run(resume)

    def _run(self, resume: bool) -> TrainResult:
        resumed = self.restore() if resume else False
        self.result.devices.append({"from_step": self.step, "device": describe_device(self.dev)})
        if not resumed:
            self.evaluate()
        running = torch.zeros((), device=self.dev)
        try:
            while self.step < self.spec.total_steps:
                self._epoch(running)
            self._check_finite()
            if self.spec.total_steps > 0 and self.step > self.last_eval:
                self.evaluate()
        except Cancelled:
            self.result.cancelled = True
            if self.step > self.last_eval:
                self.evaluate()  # the weights reached before the cancel compete with the best so far
        finally:
            self._flush_log(check=False)  # a divergence was raised above; nothing may mask another error here
            self.result.steps = self.step
            self.model.eval()
            if self.best_state is not None:
                self.model.load_state_dict(self.best_state)
            if self.channels_last:
                self.model.to(memory_format=torch.contiguous_format)
            self.result.seconds = self._elapsed()
        return self.result


# ---------------------------------------------------------------------------------------------------- losses
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(teacher ‖ student) on temperature-softened outputs, scaled by T² (batch mean)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def classification_objective(teacher: nn.Module | None, *, kd_alpha: float = 0.5, kd_temperature: float = 4.0,
                             label_smoothing: float = 0.0) -> Objective:
    """Cross-entropy, mixed with logit distillation from ``teacher`` (weight ``kd_alpha``) when one is given."""

    def objective(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if teacher is None:
            return loss
        with torch.no_grad():
            t_logits = teacher(x)
        return (1 - kd_alpha) * loss + kd_alpha * distillation_loss(logits, t_logits, kd_temperature)

    return objective


# ------------------------------------------------------------------------------------------------ finetune()
@dataclass
class FinetuneConfig:
    """The fine-tuning budget and recipe of :func:`finetune` (``cka-prune finetune``).

    Attributes:
        epochs: passes over the training loader (fractions allowed); ignored when ``steps`` is set.
        steps: optimiser steps (takes precedence over ``epochs``).
        lr: peak learning rate. momentum, nesterov, weight_decay: SGD settings.
        schedule: ``"cosine"`` (decay to 0 after a short warm-up), ``"onecycle"`` or ``"constant"``.
        label_smoothing: cross-entropy label smoothing.
        distill: distil from a teacher (the unpruned model) when one is given to :func:`finetune`.
        kd_temperature, kd_alpha: distillation temperature and the weight of the distillation term.
        amp: ``"auto"`` (bfloat16/float16 autocast on CUDA, bfloat16 on CPUs with native bfloat16 arithmetic,
            off elsewhere), ``"none"``, ``"fp16"`` or ``"bf16"``.
        eval_every: evaluate (and keep the best weights) every this many steps; default once per epoch and at
            the end.
        seed: for the reproducible data order.
    """

    epochs: float = 1.0
    steps: int | None = None
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    distill: bool = False
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    amp: str = "auto"
    eval_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and not (self.epochs >= 0):
            raise ConfigError(f"epochs={self.epochs} must be ≥ 0")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps={self.steps} must be ≥ 0")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} must be 'cosine', 'onecycle' or 'constant'")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={self.kd_alpha} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult(TrainResult):
    """:class:`TrainResult` of :func:`finetune` with the fine-tuned model (best weights)."""

    model: nn.Module | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "model"}


def _total_steps(config: FinetuneConfig, loader: DataLoader) -> int:
    if config.steps is not None:
        return config.steps
    try:
        per_epoch = len(loader)
    except TypeError as exc:
        raise ConfigError("the training loader has no length: give the budget in steps") from exc
    return math.ceil(config.epochs * per_epoch)


def finetune(
    model: nn.Module,
    train_loader: DataLoader,
    config: FinetuneConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    eval_loader: DataLoader | None = None,
    eval_samples: int | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` in place and return it with the best weights seen at an evaluation point.

    Args:
        model: the (pruned) network; trained in place, then given the best weights.
        train_loader: augmented training batches; under torchrun it should shard the data
            (:func:`cka_analysis.distributed.make_loader_for_world`).
        config: budget and recipe (default :class:`FinetuneConfig`).
        teacher: the unpruned model for distillation (used when ``config.distill``).
        eval_loader: held-out batches; the best weights by top-1 are kept. Without it, the last weights are.
        eval_samples: evaluate on at most this many images.
        progress, cancel: see :mod:`cka_analysis.progress`. A cancel stops at the next step and keeps the best
            (or, without an eval loader, the current) weights; ``result.cancelled`` says so.
        checkpoint_path: write the whole training state (weights, optimiser, schedule, best weights, data order)
            here every ``checkpoint_every`` steps, so a killed run can go on.
        resume: continue from ``checkpoint_path`` when it exists (same model, loader and config): the run picks
            up at the saved step with the same data order and ends as the uninterrupted run would.
    """
    config = config or FinetuneConfig()
    if config.distill and teacher is None:
        raise ConfigError("config.distill is set but no teacher model was given")
    dev = resolve_device(device)
    use_teacher = teacher if config.distill else None
    if use_teacher is not None:
        use_teacher.to(dev).eval()
    total = _total_steps(config, train_loader)
    per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    spec = TrainSpec(total_steps=total, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                     weight_decay=config.weight_decay, schedule=config.schedule, amp=config.amp,
                     eval_every=config.eval_every or per_epoch or None, seed=config.seed,
                     seed_global=getattr(train_loader, "num_workers", 0) == 0)
    objective = classification_objective(use_teacher, kd_alpha=config.kd_alpha,
                                         kd_temperature=config.kd_temperature,
                                         label_smoothing=config.label_smoothing)
    trainer = Trainer(model, train_loader, objective, spec, device=dev, eval_loader=eval_loader,
                      eval_samples=eval_samples, progress=progress, cancel=cancel,
                      checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every)
    return FinetuneResult(model=model, **vars(trainer.run(resume=resume)))
