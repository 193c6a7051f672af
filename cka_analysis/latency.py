"""Latency you can plan for: what each block costs on *this* device, and timings where models are deployed.

MACs are a proxy for speed that breaks where blocks differ in memory traffic, resolution or kernel efficiency,
and between batch 1 and a large batch. This module measures instead:

* :func:`measure_block_costs` — for a model, a device, a batch size, a dtype and a thread count, the latency each
  removable block contributes (:class:`BlockCosts`), measured once and cached on disk
  (``$CKA_PRUNE_LATENCY_CACHE``, default ``~/.cache/cka-prune/latency``). Two methods:

  - ``"blocks"`` (default, about three forward passes per round): each block is timed on its own real input,
    captured in one forward pass of the model; the whole model and the model without every removable block (the
    floor) are timed in the same rounds, and the block times are scaled to add up to base − floor (a block timed
    alone misses the warm cache its input has inside the model, and pays a call's overhead).
  - ``"ablation"`` (one forward pass per block per repeat): the model is timed with each block removed; a
    block's cost is the base latency minus that. Slower, but it sees everything removal changes.

  Both warm up, synchronise the device around every timed call, and *interleave* the candidates in a shuffled
  order each round, so that machine noise (other jobs, frequency changes) hits all candidates alike; the median
  over the rounds is kept (:class:`TimingOptions` ``quantile=0.5``). On a machine shared with other jobs, a call
  is preempted with a probability that grows with its duration, which inflates the median of long calls more than
  that of short ones; a low quantile (e.g. 0.2) then estimates the undisturbed latency better — the records say
  which was used. :class:`TimingOptions` holds these knobs (dtype, threads, rounds, quantile, input, seed) for
  every timing function.
* :func:`predict_latency` — the latency of the model with some blocks removed: base minus their costs. The
  planner's latency target (:class:`~cka_analysis.pruning.Target` ``("latency", fraction)``) uses it.
* :func:`compare_latency` / :func:`check_prediction` — several models timed interleaved on the same input; the
  predicted vs measured latency of a pruned model and the prediction error.
* :func:`time_runtimes` — torch eager, the ``.pt2`` program (``torch.export``) and the ONNX model under
  onnxruntime (CPU provider; CUDA provider when present), for several models and batch sizes, same input, same
  threads, interleaved repeats.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import find_blocks, forward_with_hooks, model_input_size, remove_blocks, removed_blocks
from .device import describe_device, resolve_device, synchronize, use_channels_last
from .errors import ConfigError
from .metrics import Latency
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

__all__ = [
    "BLOCK_COSTS_TIMING",
    "COMPARE_TIMING",
    "METHODS",
    "RUNTIMES",
    "RUNTIMES_TIMING",
    "BlockCosts",
    "LatencyCheck",
    "RuntimeTiming",
    "TimingOptions",
    "available_runtimes",
    "check_prediction",
    "compare_latency",
    "latency_cache_dir",
    "measure_block_costs",
    "model_fingerprint",
    "paired_ratio",
    "predict_latency",
    "time_runtimes",
]

CACHE_ENV = "CKA_PRUNE_LATENCY_CACHE"
METHODS = ("blocks", "ablation")
RUNTIMES = ("torch", "pt2", "onnxruntime")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_FORMAT = "cka-prune-latency/2"


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class BlockCosts:
    """What each removable block of one model costs in latency, measured on one device.

    Attributes:
        arch: the model's architecture (registry name).
        fingerprint: :func:`model_fingerprint` of the measured model (architecture, removed blocks, shapes).
        removed: blocks already removed from the measured model.
        device: where it was measured, in words (CPU model or GPU name).
        batch_size, dtype, threads: the batch size, parameter dtype and torch intra-op threads of the timing.
        method: ``"blocks"`` or ``"ablation"`` (see the module docstring).
        quantile: the quantile of the timed rounds kept (0.5 = median).
        base_ms, base_p10_ms, base_p90_ms: that quantile and the 10th/90th percentile latency of the whole model.
        floor_ms: latency of the model without every removable block (stem, fixed blocks, head), same rounds.
        block_ms: per removable block, the milliseconds its removal is expected to save.
        scale: the factor the ``"blocks"`` method's raw block times were multiplied by so that they add up to
            ``base_ms − floor_ms`` (1.0 for ``"ablation"``); far from 1 says the blocks behave differently alone.
        warmup, repeats: untimed and timed rounds.
        seconds: wall time of the measurement.
        created: when it was measured (UTC, ISO 8601).
        from_cache: True when this record was read from the cache rather than measured now (not stored).
    """

    arch: str
    fingerprint: str
    removed: list[str]
    device: str
    batch_size: int
    dtype: str
    threads: int
    method: str
    quantile: float
    base_ms: float
    base_p10_ms: float
    base_p90_ms: float
    floor_ms: float
    block_ms: dict[str, float]
    scale: float
    warmup: int
    repeats: int
    seconds: float
    created: str
    from_cache: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("from_cache")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockCosts:
        """Rebuild from :meth:`to_dict`; raises ConfigError naming a missing or mistyped field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"block costs must be a JSON object, got {type(d).__name__}")
        names = [f for f in cls.__dataclass_fields__ if f != "from_cache"]
        missing = [f for f in names if f not in d]
        if missing:
            raise ConfigError(f"block costs lack the field(s) {missing}; measure them again")
        try:
            return cls(
                arch=str(d["arch"]), fingerprint=str(d["fingerprint"]), removed=[str(n) for n in d["removed"]],
                device=str(d["device"]), batch_size=int(d["batch_size"]), dtype=str(d["dtype"]),
                threads=int(d["threads"]), method=str(d["method"]), quantile=float(d["quantile"]), base_ms=float(d["base_ms"]),
                base_p10_ms=float(d["base_p10_ms"]), base_p90_ms=float(d["base_p90_ms"]),
                floor_ms=float(d["floor_ms"]), block_ms={str(k): float(v) for k, v in d["block_ms"].items()},
                scale=float(d["scale"]), warmup=int(d["warmup"]),
                repeats=int(d["repeats"]), seconds=float(d["seconds"]), created=str(d["created"]),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"block costs have a field of the wrong type ({exc}); measure them again") from exc

    def fractions(self) -> dict[str, float]:
        """Each block's cost as a fraction of the base latency (what removing it alone would save)."""
        return {n: (ms / self.base_ms if self.base_ms > 0 else 0.0) for n, ms in self.block_ms.items()}


def predict_latency(costs: BlockCosts, removed: Sequence[str]) -> float:
    """Predicted latency (ms) of the measured model with the blocks ``removed`` taken out: base minus their costs.

    Raises ConfigError naming a block the costs do not cover (not removable, or already removed when measured).
    """
    names = list(dict.fromkeys(removed))
    unknown = [n for n in names if n not in costs.block_ms]
    if unknown:
        raise ConfigError(
            f"no measured latency for block(s) {unknown}: the costs cover {sorted(costs.block_ms)[:8]}"
            f"{' ...' if len(costs.block_ms) > 8 else ''}; measure the costs of this model (removed: "
            f"{costs.removed or 'none'})"
        )
    return max(0.0, costs.base_ms - sum(costs.block_ms[n] for n in names))


def predicted_reduction(costs: BlockCosts, removed: Sequence[str]) -> float:
    """Predicted latency reduction (fraction of the base latency) when ``removed`` are taken out."""
    if costs.base_ms <= 0:
        return 0.0
    return 1 - predict_latency(costs, removed) / costs.base_ms


@dataclass
class LatencyCheck:
    """Predicted vs measured latency of a pruned model (base and pruned timed interleaved in one run).

    ``base_ms``/``pruned_ms`` are the costs' quantile of the rounds. ``measured_reduction`` is 1 − the median over
    rounds of pruned / base time *within the round* (paired: a slow stretch of the machine hits both calls of a
    round, and cancels). ``error`` is measured minus predicted reduction (fractions: +0.02 means the model got 2
    points *more* reduction than predicted); ``relative_error`` is the predicted over the measured pruned/base
    ratio − 1 (+0.05: the prediction said 5 % slower than it is).
    """

    base_ms: float
    pruned_ms: float
    predicted_ms: float
    predicted_reduction: float
    measured_reduction: float
    error: float
    relative_error: float
    quantile: float
    batch_size: int
    dtype: str
    threads: int
    device: str
    repeats: int
    costs_method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyCheck:
        missing = [f for f in cls.__dataclass_fields__ if f not in d]
        if missing:
            raise ConfigError(f"latency check lacks the field(s) {missing}")
        return cls(**{f: d[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RuntimeTiming:
    """Latency of one model in one runtime at one batch size (see :func:`time_runtimes`): median, 10th/90th
    percentile and the requested ``quantile`` of the timed rounds (``quantile_ms``); ``relative`` is the
    :func:`paired_ratio` to the reference model in the same runtime and batch (None without a reference)."""

    model: str
    runtime: str
    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    quantile: float
    quantile_ms: float
    relative: float | None
    repeats: int
    threads: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TimingOptions:
    """How candidates are timed: the input, the thread count and the rounds (the same knobs for every timing
    function, so that one object describes a measurement and can be passed along).

    Attributes:
        dtype: parameter and input dtype (``"float32"``, ``"float16"``, ``"bfloat16"`` or a torch dtype).
        threads: torch intra-op threads during the timing (None: the current setting).
        warmup, repeats: untimed and timed interleaved rounds.
        quantile: which quantile of the rounds is kept (0.5 = the median; lower on a machine shared with other
            jobs, see the module docstring).
        input_size: (channels, height, width) of the random input; None: the model's preset.
        seed: seeds the random input and the shuffled order of the rounds.

    The fields are checked when the object is made (ConfigError naming the field). The functions' defaults
    differ in the rounds only: :data:`BLOCK_COSTS_TIMING`, :data:`COMPARE_TIMING`, :data:`RUNTIMES_TIMING`.
    """

    dtype: str | torch.dtype = "float32"
    threads: int | None = None
    warmup: int = 5
    repeats: int = 20
    quantile: float = 0.5
    input_size: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _dtype_name(self.dtype)
        if self.threads is not None:
            _positive_int("threads", self.threads)
        _positive_int("warmup", self.warmup, minimum=0)
        _positive_int("repeats", self.repeats)
        object.__setattr__(self, "quantile", _check_quantile(self.quantile))
        if self.input_size is not None:
            object.__setattr__(self, "input_size", tuple(self.input_size))

    @property
    def torch_dtype(self) -> torch.dtype:
        """:attr:`dtype` as a torch dtype."""
        return _DTYPES[_dtype_name(self.dtype)]


# ---------------------------------------------------------------------------------------------------------------
# Validation and small helpers
# ---------------------------------------------------------------------------------------------------------------


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number ≥ {minimum}, got {value!r}")
    return value


def _dtype_name(dtype: str | torch.dtype) -> str:
    """Canonical dtype name (``"float32"``, ``"float16"``, ``"bfloat16"``) from a name, alias or torch dtype."""
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = _DTYPE_ALIASES.get(str(dtype).strip().lower(), str(dtype).strip().lower())
    if name not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported for timing; choose one of {', '.join(_DTYPES)}")
    return name


def _threads(threads: int | None) -> int:
    return torch.get_num_threads() if threads is None else _positive_int("threads", threads)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads, restoring the caller's setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The hardware behind a device, e.g. ``"cpu: Intel(R) Xeon(R) ..."`` or ``"cuda: NVIDIA H200"``: latency
    measured on one CPU model or GPU does not hold on another, so it is part of the cache key."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu: {_cpu_name()}"
    return describe_device(device)


def model_fingerprint(model: nn.Module, input_size: Sequence[int] | None = None) -> str:
    """A hash of what decides a model's latency: architecture, input size, removed blocks, module types and
    parameter shapes — not the weight values, so a fine-tuned copy shares its costs with the model it came from."""
    preset = getattr(model, "cka_preset", None)
    size = tuple(input_size) if input_size is not None else (tuple(preset.input_size) if preset else ())
    h = hashlib.sha256()
    h.update(json.dumps({"arch": preset.arch if preset else type(model).__qualname__, "input_size": size,
                         "removed": removed_blocks(model)}).encode())
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:24]


def latency_cache_dir(path: str | Path | None = None) -> Path:
    """Where block costs are cached: ``path`` when given, else ``$CKA_PRUNE_LATENCY_CACHE``, else
    ``~/.cache/cka-prune/latency``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cka-prune" / "latency"


def _cache_key(fingerprint: str, device: str, batch_size: int, dtype: str, threads: int, method: str,
               quantile: float) -> dict:
    return {"format": _FORMAT, "fingerprint": fingerprint, "device": device, "batch_size": batch_size,
            "dtype": dtype, "threads": threads, "method": method, "quantile": quantile}


def _cache_file(root: Path, arch: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe_arch = "".join(c if c.isalnum() or c in "-_" else "_" for c in arch)
    return root / f"{safe_arch}-{digest}.json"


def _read_cache(path: Path, key: dict) -> BlockCosts | None:
    """The cached costs for ``key``, or None when absent, unreadable or written for another key."""
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") != key:
            return None
        costs = BlockCosts.from_dict(saved["costs"])
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    costs.from_cache = True
    return costs


def _write_cache(path: Path, key: dict, costs: BlockCosts) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "costs": costs.to_dict()}, indent=1))
    tmp.replace(path)


def _quantile(times: Sequence[float], q: float) -> float:
    """The ``q`` quantile (linear interpolation) of a list of timings."""
    return float(torch.quantile(torch.tensor(list(times), dtype=torch.float64), q))


def paired_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of ``times[r] / reference[r]``: two candidates' timings from the same interleaved round
    share the machine's state at that moment, so their ratio is steadier than a ratio of two medians."""
    if len(times) != len(reference) or not times:
        raise ConfigError(f"paired timings need the same number of rounds (got {len(times)} and {len(reference)})")
    return float(torch.tensor([t / r for t, r in zip(times, reference, strict=True)], dtype=torch.float64)
                 .median())


def _percentiles(times: Sequence[float], q: float = 0.5) -> tuple[float, float, float]:
    """(p10, the ``q`` quantile, p90) of a list of timings."""
    return _quantile(times, 0.1), _quantile(times, q), _quantile(times, 0.9)


def _check_quantile(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
        raise ConfigError(f"quantile must be a number between 0 and 1 (0.5 = median, 0 = fastest), got {q!r}")
    return float(q)


BLOCK_COSTS_TIMING = TimingOptions(warmup=5, repeats=20)
"""What :func:`measure_block_costs` times with by default."""
COMPARE_TIMING = TimingOptions(warmup=3, repeats=20)
"""What :func:`compare_latency` times with by default."""
RUNTIMES_TIMING = TimingOptions(warmup=3, repeats=10)
"""What :func:`time_runtimes` times with by default."""


def _interleaved_times(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    options: TimingOptions,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    what: str = "timing",
) -> dict[str, list[float]]:
    """Milliseconds of every call of each candidate: ``options.warmup`` untimed rounds, then ``options.repeats``
    rounds that call every candidate once in a freshly shuffled order (seeded by ``options.seed``), synchronising
    the device around each timed call."""
    progress = progress or no_progress
    names = list(fns)
    repeats = options.repeats
    for _ in range(options.warmup):
        check_cancel(cancel, what)
        for n in names:
            fns[n]()
    synchronize(device)
    rng = random.Random(options.seed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        check_cancel(cancel, what)
        order = names[:]
        rng.shuffle(order)
        for n in order:
            synchronize(device)
            start = time.perf_counter()
            fns[n]()
            synchronize(device)
            times[n].append((time.perf_counter() - start) * 1000.0)
        progress(r + 1, repeats, f"{what}: round {r + 1}/{repeats}")
    return times


def _prepared(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device`` in ``dtype`` (channels_last where it helps); the caller's model
    is left where it was."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if use_channels_last(device):
        m = m.to(memory_format=torch.channels_last)
    return m


def _example_input(input_size: Sequence[int], batch_size: int, device: torch.device, dtype: torch.dtype,
                   seed: int = 0, *, channels_last: bool | None = None) -> torch.Tensor:
    """The seeded random batch every candidate is timed on (channels_last by default where models run so)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_size), generator=g).to(device=device, dtype=dtype)
    cl = use_channels_last(device) if channels_last is None else channels_last
    if cl and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    return model_input_size(model, input_size, purpose="(in TimingOptions) to time it")


# ---------------------------------------------------------------------------------------------------------------
# Block costs
# ---------------------------------------------------------------------------------------------------------------


def _capture_block_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named block receives in one forward pass of ``model`` on ``x``."""
    inputs: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, args[0].detach().clone())
        return fn

    forward_with_hooks(model, x, {n: hook(n) for n in names}, pre=True)
    return inputs


_BASE, _FLOOR = "\0base", "\0floor"  # candidates beside the blocks (names no module can have)


def _time_blocks(model: nn.Module, names: Sequence[str], x: torch.Tensor, dev: torch.device,
                 options: TimingOptions, **kw: Any) -> tuple[list[float], float, float, dict[str, float]]:
    """Method "blocks": each block timed on its captured input; the whole model and the model without every
    removable block (the floor) in the same rounds.

    The block times are scaled so that they add up to base − floor: timed alone, a block misses the warm cache
    its input has inside the model (large batches) and pays a call's overhead (small ones), so the raw times are
    right relative to each other but not in total. Returns (base times, floor, scale, scaled costs)."""
    inputs = _capture_block_inputs(model, names, x)
    fns: dict[str, Callable[[], object]] = {_BASE: functools.partial(model, x),
                                            _FLOOR: functools.partial(remove_blocks(model, names), x)}
    for n in names:
        fns[n] = functools.partial(model.get_submodule(n), inputs[n])
    times = _interleaved_times(fns, dev, options, **kw)
    q = options.quantile
    base, floor = _quantile(times[_BASE], q), _quantile(times[_FLOOR], q)
    raw = {n: _quantile(times[n], q) for n in names}
    total = sum(raw.values())
    scale = (base - floor) / total if total > 0 and base > floor else 1.0
    return times[_BASE], floor, scale, {n: v * scale for n, v in raw.items()}


def _time_ablation(model: nn.Module, names: Sequence[str], x: torch.Tensor, dev: torch.device,
                   options: TimingOptions, **kw: Any) -> tuple[list[float], float, float, dict[str, float]]:
    """Method "ablation": the model timed whole, without each block, and without all of them (the floor);
    cost = base − without the block (unscaled). Returns (base times, floor, 1.0, costs)."""
    fns: dict[str, Callable[[], object]] = {_BASE: functools.partial(model, x),
                                            _FLOOR: functools.partial(remove_blocks(model, names), x)}
    for n in names:
        fns[n] = functools.partial(remove_blocks(model, [n]), x)
    times = _interleaved_times(fns, dev, options, **kw)
    q = options.quantile
    base = _quantile(times[_BASE], q)
    return times[_BASE], _quantile(times[_FLOOR], q), 1.0, {n: base - _quantile(times[n], q) for n in names}


def measure_block_costs(
    model: nn.Module,
    *,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    method: str = "blocks",
    options: TimingOptions = BLOCK_COSTS_TIMING,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> BlockCosts:
    """The latency each removable block of ``model`` contributes on ``device`` (``model`` is not modified).

    Args:
        model: a registry model (or any model with ``cka_preset``, or give ``options.input_size``); may be pruned
            already.
        batch_size: the batch size to time. Costs differ between batch 1 and a large batch, so plan with the
            batch you serve.
        method: ``"blocks"`` (each block timed on its own input; cheap) or ``"ablation"`` (model timed without
            each block; one forward pass per block per round).
        options: dtype, threads, rounds, quantile, input size and seed (:class:`TimingOptions`; default
            :data:`BLOCK_COSTS_TIMING`: 5 warm-up and 20 timed rounds, the median, float32, current threads).
        cache, cache_dir, refresh: read and write the on-disk cache (:func:`latency_cache_dir`), keyed by
            (:func:`model_fingerprint`, device hardware, batch size, dtype, threads, method, quantile); ``refresh``
            measures again and overwrites.
        progress, cancel: reported per round / honoured between rounds (raises Cancelled).
    """
    _positive_int("batch_size", batch_size)
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not a way to measure block costs; choose one of {METHODS}")
    dev = resolve_device(device)
    dtype_name, n_threads = _dtype_name(options.dtype), _threads(options.threads)
    size = _input_size(model, options.input_size)
    preset = getattr(model, "cka_preset", None)
    arch = preset.arch if preset is not None else type(model).__name__
    fingerprint = model_fingerprint(model, size)
    hardware = device_name(dev)
    key = _cache_key(fingerprint, hardware, batch_size, dtype_name, n_threads, method, options.quantile)
    path = _cache_file(latency_cache_dir(cache_dir), arch, key)
    if cache and not refresh:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    start = time.perf_counter()
    names = [b.name for b in find_blocks(model, input_size=size, count_macs=False) if b.removable]
    with _torch_threads(n_threads), torch.inference_mode():
        m = _prepared(model, dev, options.torch_dtype)
        x = _example_input(size, batch_size, dev, options.torch_dtype, options.seed)
        timer = _time_blocks if method == "blocks" else _time_ablation
        base_times, floor, scale, block_ms = timer(m, names, x, dev, options, progress=progress, cancel=cancel,
                                                   what="measuring block latency")
    p10, pq, p90 = _percentiles(base_times, options.quantile)
    costs = BlockCosts(
        arch=arch, fingerprint=fingerprint, removed=removed_blocks(model), device=hardware,
        batch_size=batch_size, dtype=dtype_name, threads=n_threads, method=method, quantile=options.quantile,
        base_ms=pq, base_p10_ms=p10, base_p90_ms=p90, floor_ms=floor, block_ms=block_ms, scale=scale,
        warmup=options.warmup, repeats=options.repeats,
        seconds=time.perf_counter() - start, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if cache:
        _write_cache(path, key, costs)
    return costs


# ---------------------------------------------------------------------------------------------------------------
# Whole models, interleaved
# ---------------------------------------------------------------------------------------------------------------


def compare_latency(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    options: TimingOptions = COMPARE_TIMING,
    reference: str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Latency]:
    """Latency of several models (e.g. base and pruned) timed interleaved on the same input, same threads: the one
    latency measurement of the CLI's ``report.json``, the dashboard's Compare page and the benchmarks.

    ``options``: dtype, threads, rounds, input size and seed (default :data:`COMPARE_TIMING`: 3 warm-up and 20
    timed rounds; the records hold the median whatever ``options.quantile`` says). ``reference`` names one of
    ``models``: every model's :class:`~cka_analysis.metrics.Latency` then also holds its time relative to the
    reference's in the same round (median and 10th/90th percentile of the per-round ratios: a speed-up with its
    spread, steadier than a ratio of two medians). The models are not modified (copies are moved to the device).
    Returns ``{label: Latency}``.
    """
    if reference is not None and reference not in models:
        raise ConfigError(f"reference={reference!r} is not one of the models to time ({', '.join(models)})")
    times, desc = _model_times(models, batch_size, device, options, progress, cancel)
    out = {}
    for k, t in times.items():
        p10, p50, p90 = _percentiles(t)
        ratio: dict[str, Any] = {}
        if reference is not None:
            r10, r50, r90 = _percentiles([a / b for a, b in zip(t, times[reference], strict=True)])
            ratio = {"reference": reference, "ratio": r50, "ratio_p10": r10, "ratio_p90": r90}
        out[k] = Latency(median_ms=p50, p10_ms=p10, p90_ms=p90, batch_size=batch_size, device=desc,
                         repeats=options.repeats, **ratio)
    return out


def _model_times(models: Mapping[str, nn.Module], batch_size: int, device: str | torch.device,
                 options: TimingOptions, progress: ProgressFn | None,
                 cancel: CancelToken | None) -> tuple[dict[str, list[float]], str]:
    """Every timed call (ms) of each model, interleaved; and the device description."""
    if not models:
        raise ConfigError("models must name at least one model to time")
    _positive_int("batch_size", batch_size)
    dev = resolve_device(device)
    size = _input_size(next(iter(models.values())), options.input_size)
    with _torch_threads(_threads(options.threads)), torch.inference_mode():
        prepared = {k: _prepared(m, dev, options.torch_dtype) for k, m in models.items()}
        x = _example_input(size, batch_size, dev, options.torch_dtype, options.seed)
        fns = {k: functools.partial(m, x) for k, m in prepared.items()}
        times = _interleaved_times(fns, dev, options, progress, cancel, what="timing models")
        return times, describe_device(dev)


def check_prediction(
    base: nn.Module,
    pruned: nn.Module,
    costs: BlockCosts,
    *,
    device: str | torch.device = "auto",
    warmup: int = 3,
    repeats: int = 30,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> LatencyCheck:
    """Time ``base`` and ``pruned`` interleaved in the setting ``costs`` were measured in (batch, dtype, threads,
    quantile of the rounds) and compare the measured reduction with the one :func:`predict_latency` gave for the
    blocks removed."""
    gone = [n for n in removed_blocks(pruned) if n not in set(removed_blocks(base))]
    predicted = predict_latency(costs, gone)
    options = TimingOptions(dtype=costs.dtype, threads=costs.threads, warmup=warmup, repeats=repeats, seed=seed)
    times, desc = _model_times({"base": base, "pruned": pruned}, costs.batch_size, device, options, progress,
                               cancel)
    b, p = _quantile(times["base"], costs.quantile), _quantile(times["pruned"], costs.quantile)
    pred_red = 1 - predicted / costs.base_ms if costs.base_ms > 0 else 0.0
    ratio = paired_ratio(times["pruned"], times["base"])
    return LatencyCheck(
        base_ms=b, pruned_ms=p, predicted_ms=predicted, predicted_reduction=pred_red, measured_reduction=1 - ratio,
        error=(1 - ratio) - pred_red, relative_error=(1 - pred_red) / ratio - 1 if ratio > 0 else 0.0,
        quantile=costs.quantile,
        batch_size=costs.batch_size, dtype=costs.dtype, threads=costs.threads, device=desc,
        repeats=repeats, costs_method=costs.method,
    )


# ---------------------------------------------------------------------------------------------------------------
# Deployed runtimes
# ---------------------------------------------------------------------------------------------------------------


def _onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort


def available_runtimes(device: str | torch.device = "cpu") -> list[str]:
    """The runtimes :func:`time_runtimes` can use here: torch and pt2 always, onnxruntime when installed."""
    resolve_device(device)
    return ["torch", "pt2", *(["onnxruntime"] if _onnxruntime() is not None else [])]


def _pt2_runner(model: nn.Module, path: Path, dev: torch.device) -> Callable[[torch.Tensor], object]:
    from .export import export_pt2

    export_pt2(copy.deepcopy(model), path)
    program = torch.export.load(str(path)).module().to(dev)
    return program


def _onnx_runner(model: nn.Module, path: Path, dev: torch.device, threads: int):
    """An onnxruntime session for ``model`` (CUDA provider on a CUDA device when available) and the provider
    name; inputs are bound on the device so that no host copy is timed on a GPU."""
    from .export import export_onnx

    ort = _onnxruntime()
    if ort is None:
        raise ConfigError("onnxruntime is not installed: pip install 'cka-prune[onnx]', or leave it out of runtimes")
    export_onnx(copy.deepcopy(model), path, check=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    cuda = dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if not cuda:
        return (lambda x: sess.run(None, {"input": x.cpu().numpy()})), "onnxruntime-cpu"

    def run(x: torch.Tensor) -> object:
        binding = sess.io_binding()
        binding.bind_input("input", "cuda", dev.index or 0, _np_dtype(x), tuple(x.shape), x.data_ptr())
        binding.bind_output("logits", "cuda", dev.index or 0)
        sess.run_with_iobinding(binding)
        return binding

    return run, "onnxruntime-cuda"


def _np_dtype(x: torch.Tensor):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16}[x.dtype]


def time_runtimes(
    models: Mapping[str, nn.Module],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    runtimes: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    reference: str | None = None,
    workdir: str | Path | None = None,
    options: TimingOptions = RUNTIMES_TIMING,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> list[RuntimeTiming]:
    """Latency of each model in each runtime, where users deploy: torch eager, the ``.pt2`` program
    (``torch.export``) and the exported ONNX model under onnxruntime.

    For each batch size, every (model, runtime) pair is timed on the same seeded input with the same thread
    count, interleaved in a shuffled order each round; each row holds the median, the 10th/90th percentiles and
    the ``options.quantile`` asked for, and with ``reference`` (a key of ``models``, e.g. the unpruned model) the
    :func:`paired_ratio` of each model to it in the same runtime. Exports go to ``workdir`` (default: a temporary
    folder). ``options``: threads, rounds, quantile, input size and seed (default :data:`RUNTIMES_TIMING`: 3
    warm-up and 10 timed rounds); float32 only (the exported programs are float32). Returns one
    :class:`RuntimeTiming` per model × runtime × batch size.
    """
    sizes, chosen = _check_runtime_request(models, batch_sizes, runtimes, device, reference, options)
    dev = resolve_device(device)
    n_threads = _threads(options.threads)
    size = _input_size(next(iter(models.values())), options.input_size)
    desc = device_name(dev)
    rows: list[RuntimeTiming] = []
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_torch_threads(n_threads))
        stack.enter_context(torch.inference_mode())
        runners = _runtime_runners(models, chosen, root, dev, n_threads, cancel)
        for bs in sizes:
            # the same values for every runner; eager torch gets them in its own memory format (see _prepared)
            xs = {"torch": _example_input(size, bs, dev, torch.float32, options.seed),
                  "other": _example_input(size, bs, dev, torch.float32, options.seed, channels_last=False)}
            fns = {k: functools.partial(f, xs["torch" if k[1] == "torch" else "other"]) for k, f in runners.items()}
            times = _interleaved_times(fns, dev, options, progress, cancel, what=f"timing runtimes at batch {bs}")
            for (label, rt), t in times.items():
                p10, p50, p90 = _percentiles(t)
                rel = None if reference is None else paired_ratio(t, times[(reference, rt)])
                rows.append(RuntimeTiming(model=label, runtime=rt, batch_size=bs, median_ms=p50, p10_ms=p10,
                                          p90_ms=p90, quantile=options.quantile,
                                          quantile_ms=_quantile(t, options.quantile), relative=rel,
                                          repeats=options.repeats, threads=n_threads, device=desc))
    return rows


def _check_runtime_request(models: Mapping[str, nn.Module], batch_sizes: Sequence[int],
                           runtimes: Sequence[str] | None, device: str | torch.device, reference: str | None,
                           options: TimingOptions) -> tuple[list[int], list[str]]:
    """The batch sizes and runtimes :func:`time_runtimes` was asked for, checked (ConfigError naming the bad one)."""
    if not models:
        raise ConfigError("models must name at least one model to time")
    if reference is not None and reference not in models:
        raise ConfigError(f"reference={reference!r} is not one of the models ({', '.join(models)})")
    if _dtype_name(options.dtype) != "float32":
        raise ConfigError(f"options.dtype={options.dtype!r}: runtimes are timed in float32 only (the exported "
                          "programs are float32)")
    sizes = [_positive_int("batch_sizes", b) for b in batch_sizes]
    if not sizes:
        raise ConfigError("batch_sizes must hold at least one batch size, e.g. (1, 64)")
    chosen = list(runtimes) if runtimes is not None else available_runtimes(device)
    bad = [r for r in chosen if r not in RUNTIMES]
    if bad or not chosen:
        raise ConfigError(f"runtimes {bad or chosen} are not known; choose from {RUNTIMES}")
    return sizes, chosen


def _runtime_runners(models: Mapping[str, nn.Module], runtimes: Sequence[str], root: Path, dev: torch.device,
                     threads: int, cancel: CancelToken | None) -> dict[tuple[str, str], Callable[[torch.Tensor], object]]:
    """One callable per (model label, runtime name): the eager copy, the loaded ``.pt2`` program or an
    onnxruntime session, exported under ``root``."""
    runners: dict[tuple[str, str], Callable[[torch.Tensor], object]] = {}
    for label, model in models.items():
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
        for rt in runtimes:
            check_cancel(cancel, "exporting models")
            if rt == "torch":
                runners[(label, "torch")] = _prepared(model, dev, torch.float32)
            elif rt == "pt2":
                runners[(label, "pt2")] = _pt2_runner(model, root / f"{safe}.pt2", dev)
            else:
                run, name = _onnx_runner(model, root / f"{safe}.onnx", dev, threads)
                runners[(label, name)] = run
    return runners
