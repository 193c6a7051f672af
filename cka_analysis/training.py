"""Brief fine-tuning of a pruned model, with optional distillation from the unpruned one.

SGD with (Nesterov) momentum and a cosine or one-cycle schedule, label smoothing, knowledge distillation
(Hinton et al. 2015), AMP and channels_last on CUDA, an epoch or step budget, a progress callback and cooperative
cancellation. The best weights seen at an evaluation point (the starting weights included) are what is returned,
also after a cancel: nothing finished is lost.

Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in DistributedDataParallel, the loss and
accuracy are reduced across ranks, and only rank 0 reports progress; see :mod:`cka_analysis.distributed`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .device import amp_dtype, autocast, resolve_device, use_channels_last
from .errors import Cancelled, CheckpointError, ConfigError
from .progress import CancelToken, ProgressFn, no_progress

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune"]


@dataclass
class FinetuneConfig:
    """The fine-tuning budget and recipe.

    Attributes:
        epochs: passes over the training loader (fractions allowed); ignored when ``steps`` is set.
        steps: optimiser steps (takes precedence over ``epochs``).
        lr: peak learning rate. momentum, nesterov, weight_decay: SGD settings.
        schedule: ``"cosine"`` (decay to 0 with a short warm-up) or ``"onecycle"``.
        label_smoothing: cross-entropy label smoothing.
        distill: distil from a teacher (the unpruned model) when one is given to :func:`finetune`.
        kd_temperature, kd_alpha: distillation temperature and the weight of the distillation term.
        amp: ``"auto"`` (bfloat16/float16 autocast on CUDA, off elsewhere), ``"none"``, ``"fp16"`` or ``"bf16"``.
        eval_every: evaluate (and keep the best weights) every this many steps; default once per epoch and at
            the end.
        seed: for reproducible shuffling and dropout.
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
        if self.schedule not in ("cosine", "onecycle", "constant"):
            raise ConfigError(f"schedule={self.schedule!r} must be 'cosine', 'onecycle' or 'constant'")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"kd_alpha={self.kd_alpha} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    """The fine-tuned model (best weights), its history, and whether the run was cancelled."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_accuracy: float | None = None
    best_step: int = 0
    steps: int = 0
    cancelled: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best_accuracy": self.best_accuracy,
            "best_step": self.best_step,
            "steps": self.steps,
            "cancelled": self.cancelled,
            "seconds": self.seconds,
        }


def _total_steps(config: FinetuneConfig, loader: DataLoader) -> int:
    if config.steps is not None:
        return config.steps
    try:
        per_epoch = len(loader)
    except TypeError as exc:
        raise ConfigError("the training loader has no length: give the budget in steps") from exc
    return math.ceil(config.epochs * per_epoch)


def _lr_lambda(config: FinetuneConfig, total: int):
    warm = max(1, min(total // 20, 200))

    def cosine(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    def onecycle(step: int) -> float:
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 0.04 + 0.96 * step / peak
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - peak) / max(1, total - peak))))

    return {"cosine": cosine, "onecycle": onecycle, "constant": lambda step: 1.0}[config.schedule]


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
        train_loader: augmented training batches; under torchrun it should use a DistributedSampler
            (:func:`cka_analysis.distributed.make_train_loader`).
        config: budget and recipe (default :class:`FinetuneConfig`).
        teacher: the unpruned model for distillation (used when ``config.distill``).
        eval_loader: held-out batches; the best weights by top-1 are kept. Without it, the last weights are.
        eval_samples: evaluate on at most this many images.
        progress, cancel: see :mod:`cka_analysis.progress`. A cancel stops at the next step and keeps the best
            (or, without an eval loader, the current) weights; ``result.cancelled`` says so.
        checkpoint_path: write the whole training state (weights, optimiser, schedule, best weights, data order)
            here every ``checkpoint_every`` steps and at every evaluation, so a killed run can go on.
        resume: continue from ``checkpoint_path`` when it exists (same model, loader and config): the run picks
            up at the saved step with the same data order and ends as the uninterrupted run would.
    """
    from . import distributed as dist_utils
    from .metrics import evaluate

    config = config or FinetuneConfig()
    progress = progress or no_progress
    dev = resolve_device(device)
    total = _total_steps(config, train_loader)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    is_main = dist_utils.is_main_process()
    report = progress if is_main else no_progress

    model.to(dev)
    if use_channels_last(dev):
        model.to(memory_format=torch.channels_last)
    if config.distill and teacher is None:
        raise ConfigError("config.distill is set but no teacher model was given")
    if teacher is not None and config.distill:
        teacher.to(dev).eval()
    dtype = amp_dtype(config.amp) if config.amp != "auto" else (
        (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev.type == "cuda" else None
    )
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16 and dev.type == "cuda")
    net = dist_utils.wrap_ddp(model, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, max(total, 1)))

    result = FinetuneResult(model=model)
    best_state: dict[str, torch.Tensor] | None = None
    last_eval = -1
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    loader_gen = getattr(train_loader, "generator", None)
    epoch_state: dict[str, Any] = {}

    def save_state(step: int, epoch: int, batch: int) -> None:
        if ckpt is None or not is_main:
            return
        payload = {
            "format": "cka-prune-finetune/1",
            "step": step, "epoch": epoch, "batch": batch, "total": total,
            "model": _state_copy(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(), "best_state": best_state, "best_accuracy": result.best_accuracy,
            "best_step": result.best_step, "last_eval": last_eval, "history": result.history,
            "config": config.to_dict(), **epoch_state,
        }
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, ckpt)

    start_step, start_epoch, skip_batches = 0, 0, 0
    resumed = False
    if resume and ckpt is not None and ckpt.is_file():
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot resume from {ckpt}: {exc}") from exc
        if not isinstance(saved, dict) or saved.get("format") != "cka-prune-finetune/1":
            raise CheckpointError(f"{ckpt} is not a cka-prune fine-tuning checkpoint")
        if saved["total"] != total:
            raise CheckpointError(
                f"{ckpt} was written for a {saved['total']}-step run but this run has {total} steps; "
                "resume with the same budget and data, or delete the checkpoint to start over"
            )
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{ckpt} does not fit this model (different blocks removed?): {exc}") from exc
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        best_state = saved["best_state"]
        result.best_accuracy, result.best_step = saved["best_accuracy"], saved["best_step"]
        result.history = list(saved["history"])
        last_eval = saved["last_eval"]
        start_step, start_epoch, skip_batches = saved["step"], saved["epoch"], saved["batch"]
        if loader_gen is not None and saved.get("loader_generator") is not None:
            loader_gen.set_state(saved["loader_generator"])
        if saved.get("torch_rng") is not None:
            torch.set_rng_state(saved["torch_rng"])
        epoch_state = {"loader_generator": saved.get("loader_generator"), "torch_rng": saved.get("torch_rng")}
        resumed = True
        report(start_step, None, f"fine-tuning: resumed at step {start_step}/{total}")

    def checkpoint(step: int) -> None:
        nonlocal best_state
        if eval_loader is None:
            return
        nonlocal last_eval
        acc = dist_utils.reduce_accuracy(
            evaluate(model, eval_loader, device=dev, amp=dtype, max_samples=eval_samples), dev
        )
        top1, last_eval = acc.top1, step
        result.history.append({"step": step, "eval_top1": top1, "eval_loss": acc.loss})
        if result.best_accuracy is None or top1 > result.best_accuracy:
            result.best_accuracy, result.best_step = top1, step
            best_state = _state_copy(model)

    if not resumed:
        checkpoint(0)
    per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    eval_every = config.eval_every or per_epoch or total
    step, epoch = start_step, start_epoch
    running = torch.zeros((), device=dev)
    try:
        while step < total:
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if not (resumed and epoch == start_epoch):
                # the data order of this epoch, so that a resumed run sees the same batches
                epoch_state = {
                    "loader_generator": loader_gen.get_state() if loader_gen is not None else None,
                    "torch_rng": torch.get_rng_state(),
                }
            net.train()
            in_epoch = 0
            for batch in train_loader:
                if step >= total:
                    break
                if skip_batches:
                    skip_batches -= 1
                    in_epoch += 1
                    continue
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("fine-tuning was cancelled")
                x, y = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
                if use_channels_last(dev) and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev, dtype):
                    logits = net(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                    if teacher is not None and config.distill:
                        with torch.no_grad():
                            t_logits = teacher(x).float()
                        t = config.kd_temperature
                        kd = F.kl_div(F.log_softmax(logits.float() / t, -1), F.log_softmax(t_logits / t, -1),
                                      reduction="batchmean", log_target=True) * t * t
                        loss = (1 - config.kd_alpha) * loss + config.kd_alpha * kd
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                running += loss.detach()
                step += 1
                in_epoch += 1
                if step % 10 == 0 or step == total:
                    mean_loss = float(running) / (10 if step % 10 == 0 else step % 10)
                    running.zero_()
                    report(step, total, f"fine-tuning: step {step}/{total}, loss {mean_loss:.3f}")
                    result.history.append({"step": step, "train_loss": mean_loss, "lr": sched.get_last_lr()[0]})
                if step % eval_every == 0 and step < total:
                    checkpoint(step)
                    net.train()
                if ckpt is not None and (step % checkpoint_every == 0 or step % eval_every == 0) and step < total:
                    save_state(step, epoch, in_epoch)
            epoch += 1
        if total > 0:
            checkpoint(step)
    except Cancelled:
        result.cancelled = True
        if step > last_eval:
            checkpoint(step)  # the weights reached before the cancel compete with the best so far
    finally:
        result.steps = step
        model.eval()
        if best_state is not None:
            model.load_state_dict(best_state)
        if use_channels_last(dev):
            model.to(memory_format=torch.contiguous_format)
        result.seconds = time.perf_counter() - start
    return result


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy (weights, preset and removal record included)."""
    return copy.deepcopy(model)
