"""Data-parallel helpers: the same code runs alone or under ``torchrun --nproc_per_node=K``.

``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; :func:`init_from_env` then starts the process group (NCCL
on CUDA, Gloo on CPU) and pins each rank to its GPU. Training wraps the model in DistributedDataParallel, loaders
shard the data with a DistributedSampler, metrics and minibatch-CKA sums are all-reduced, and only rank 0 logs and
saves. Without torchrun every function here is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .device import resolve_device

__all__ = [
    "all_reduce_cka",
    "barrier",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "make_loader_for_world",
    "rank",
    "reduce_accuracy",
    "shutdown",
    "world_size",
    "wrap_ddp",
]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device = "auto") -> torch.device:
    """Start the process group when launched by torchrun and return this rank's device.

    NCCL is used when the device is CUDA (each rank takes GPU ``LOCAL_RANK``), Gloo otherwise.
    """
    dev = resolve_device(device)
    if not launched_by_torchrun():
        return dev
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev


def shutdown(synchronise: bool = False) -> None:
    """End the process group (a no-op outside torchrun). ``synchronise``: on Gloo, wait (at most a minute) until
    every rank got here first. A rank that tears Gloo down while a peer is still exiting can abort in Gloo's native
    threads ("terminate called without an active exception", exit code -6) although its work is done; only on the
    success path, so that a rank that failed never waits for the others."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronise and dist.get_backend() == "gloo":
        with contextlib.suppress(RuntimeError):  # a peer is gone or failed: nothing left to wait for
            dist.monitored_barrier(timeout=timedelta(seconds=60))
    dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` under torchrun, the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def make_loader_for_world(
    dataset: Dataset,
    *,
    global_batch_size: int,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    device: torch.device | None = None,
) -> DataLoader:
    """A loader whose per-rank batch is ``global_batch_size / world_size`` and that shards the data by rank.

    Alone it uses the same seeded DistributedSampler with one replica, so a K-process run and a 1-process run
    see the same global batches (``sampler.set_epoch`` reshuffles each epoch).
    """
    ws = world_size()
    if global_batch_size % ws:
        from .errors import ConfigError

        raise ConfigError(f"batch size {global_batch_size} is not divisible by the {ws} processes")
    pin = device is not None and device.type == "cuda"
    # the same sampler alone and under torchrun: the K ranks' batches together are the 1-process batch
    sampler = DistributedSampler(dataset, num_replicas=ws, rank=rank(), shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    return DataLoader(dataset, batch_size=global_batch_size // ws, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin, drop_last=drop_last, persistent_workers=num_workers > 0)


def reduce_accuracy(acc: Any, device: torch.device) -> Any:
    """Combine per-rank :class:`~cka_analysis.metrics.Accuracy` results, weighting by samples."""
    if not is_distributed():
        return acc
    t = torch.tensor(
        [acc.top1 * acc.samples, (acc.top5 or 0.0) * acc.samples, acc.loss * acc.samples, acc.samples],
        dtype=torch.float64, device=device,
    )
    dist.all_reduce(t)
    n = float(t[3])
    return type(acc)(top1=float(t[0]) / n, top5=None if acc.top5 is None else float(t[1]) / n,
                     loss=float(t[2]) / n, samples=int(n))


def all_reduce_cka(acc: Any) -> Any:
    """Sum the HSIC accumulators of a :class:`~cka_analysis.cka.MinibatchCKA` across ranks (in place)."""
    if is_distributed():
        for t in acc.state_tensors():
            dist.all_reduce(t)
        if acc.samples:
            n = torch.tensor([acc.samples], dtype=torch.float64, device=acc.state_tensors()[0].device)
            dist.all_reduce(n)
            acc.samples = int(n)
    return acc
