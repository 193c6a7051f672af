"""Device selection and the mixed-precision helpers every compute path shares.

Nothing assumes a GPU and nothing ignores one: ``"auto"`` picks CUDA, then Apple MPS, then the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, DeviceError

__all__ = [
    "DEVICE_CHOICES",
    "accumulation_device",
    "amp_dtype",
    "autocast",
    "describe_device",
    "describe_devices",
    "eval_mode",
    "is_out_of_memory",
    "resolve_device",
    "synchronize",
    "train_mode",
    "tune_cpu_allocator",
    "use_channels_last",
]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda[:i]" | "mps"`` (or a torch.device) into an available torch.device.

    Raises DeviceError when the requested accelerator is absent, instead of failing later inside a kernel.
    """
    if isinstance(device, torch.device):
        spec = str(device)
    else:
        spec = (device or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={spec!r} was requested but CUDA is not available on this machine "
                "(no NVIDIA GPU or a CPU-only PyTorch build); use --device cpu or --device auto"
            )
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device={spec!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return dev
    if spec == "mps":
        if not _mps_available():
            raise DeviceError("device='mps' was requested but Apple MPS is not available; use --device cpu")
        return torch.device("mps")
    raise ConfigError(f"device={device!r} is not understood; choose one of {', '.join(DEVICE_CHOICES)}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_device(device: torch.device) -> str:
    """A short human description, e.g. ``"cuda (NVIDIA H100)"`` or ``"cpu (2 threads)"``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def describe_devices(stretches: Sequence[Mapping[str, Any]]) -> str | None:
    """Where a training run ran, in words, from its stretches (``{"from_step": int, "device": str | None}``, one
    per start or resume, in order): ``"cpu (2 threads)"`` when it ran on one device, ``"cpu (1 threads) to step
    17,200, then cpu (2 threads)"`` when a resume moved it. A device an older checkpoint did not record reads
    "an unrecorded device"; consecutive stretches on the same device are one. None when there are no stretches.
    """
    merged: list[tuple[int, str]] = []
    for s in stretches:
        name = s.get("device") or "an unrecorded device"
        if not merged or merged[-1][1] != name:
            merged.append((int(s.get("from_step") or 0), name))
    if not merged:
        return None
    return ", then ".join(name if i + 1 == len(merged) else f"{name} to step {merged[i + 1][0]:,}"
                          for i, (_, name) in enumerate(merged))


def accumulation_device(device: torch.device) -> torch.device:
    """Where float64 statistics are accumulated: on the device itself, except MPS (no float64) → CPU."""
    return torch.device("cpu") if device.type == "mps" else device


def amp_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """Parse an autocast precision: None/"none"/"fp32" → None, "fp16"/"bf16" → the torch dtype."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    table = {
        "none": None,
        "fp32": None,
        "float32": None,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    key = spec.strip().lower()
    if key not in table:
        raise ConfigError(f"amp={spec!r} is not understood; choose none, fp16 or bf16")
    return table[key]


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed precision on CUDA when a dtype is given; a no-op on other devices or without a dtype."""
    if dtype is not None and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=dtype):
            yield
    else:
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def use_channels_last(device: torch.device) -> bool:
    """channels_last memory format helps convolutions on CUDA (tensor cores); on CPU it is left off."""
    return device.type == "cuda"


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` says a device ran out of memory.

    CUDA raises :class:`torch.cuda.OutOfMemoryError`; MPS and older CUDA paths raise a plain ``RuntimeError`` whose
    message contains "out of memory". Every caller that turns this into advice or a retry (scoring's batch
    halving, the CLI's one-line error, the dashboard's job runner) asks here, so they agree on what counts.
    """
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in training (or, with ``training=False``, eval) mode for the block, and give every submodule
    back its own train/eval flag afterwards.

    Restoring per submodule (not ``model.train(was_training)``) keeps a caller's deliberate mix, e.g. a network in
    training mode with frozen BatchNorm layers in eval mode, exactly as it was, also when the block raises.
    """
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """``model`` in eval mode for the block, each submodule's own flag restored afterwards (see :func:`train_mode`).

    Every evaluation in the project (metrics, scoring, capture, robustness, block probing) runs under it.
    """
    return train_mode(model, False)


#: ``mallopt`` parameters of glibc (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest mmap threshold glibc accepts on 64-bit Linux (``DEFAULT_MMAP_THRESHOLD_MAX``).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
#: Freed memory at the top of the heap that glibc keeps instead of returning it to the system.
_TRIM_THRESHOLD = 1 << 30
#: The environment setting that turns :func:`tune_cpu_allocator` off (``default``: glibc's own settings).
CPU_ALLOCATOR_ENV = "CKA_PRUNE_CPU_ALLOCATOR"


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep the memory that freed tensors give back inside the process (glibc on Linux), once per process.

    Why: training on the CPU allocates and frees the same activation-sized blocks at every step, and glibc's
    defaults hand the large ones back to the system (unmapping them, trimming the heap), so their pages are
    faulted in again at the next step, in the kernel's time (``python -m benchmarks.throughput --allocator
    both`` counts the page faults per step and the images/s of both settings in one run). This raises glibc's
    mmap threshold to its maximum (32 MiB) and its trim threshold to 1 GiB; the cost is a resident size that
    stays at its peak. The trainer and the recovery estimate call it when they run on the CPU.
    ``CKA_PRUNE_CPU_ALLOCATOR=default`` (read at the first call) leaves the allocator as it is.

    Returns whether the setting is in effect (False on other C libraries and platforms, or when turned off).
    """
    if os.environ.get(CPU_ALLOCATOR_ENV, "tuned").strip().lower() == "default" or \
            not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt  # glibc only (musl has none)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
