"""What a pruned network is worth: accuracy, compute (MACs), size (parameters) and latency.

* :func:`evaluate` — top-1 / top-5 accuracy and mean cross-entropy over a DataLoader, on any device.
* :func:`count_macs` / :func:`module_macs` — multiply-accumulates of one forward pass, in total and per
  module (so each residual block knows what removing it saves).
* :func:`count_params` — number of distinct parameters.
* :func:`measure_latency` — median wall-clock time of a forward pass, with honest device synchronisation.
* :func:`estimate_seconds` — how long work of N images × P forward passes will take, from a short measured probe
  (what the dashboard shows before it starts anything that may take more than a few seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .device import (
    accumulation_device,
    amp_dtype,
    autocast,
    describe_device,
    eval_mode,
    resolve_device,
    synchronize,
    use_channels_last,
)
from .errors import ConfigError, DataError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

__all__ = [
    "TRAIN_STEP_PASSES",
    "Accuracy",
    "Estimate",
    "Latency",
    "count_macs",
    "count_params",
    "estimate_seconds",
    "evaluate",
    "measure_latency",
    "module_macs",
]

TOP5_MIN_CLASSES = 11  # top-5 is reported only when there are more than 10 classes


@dataclass
class Accuracy:
    """Classification quality on a dataset.

    Attributes:
        top1: percent of samples whose highest logit is the label.
        top5: percent whose label is among the five highest logits; None with 10 classes or fewer,
            where it says little.
        loss: mean cross-entropy (nats per sample).
        samples: how many samples were evaluated.
    """

    top1: float
    top5: float | None
    loss: float
    samples: int

    def __str__(self) -> str:
        top5 = f", top-5 {self.top5:.2f} %" if self.top5 is not None else ""
        return f"top-1 {self.top1:.2f} %{top5}, loss {self.loss:.4f} ({self.samples:,} images)"


def _check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer ≥ {minimum}")
    return value


def _check_input_size(input_size: object) -> tuple[int, int, int]:
    if (
        not isinstance(input_size, (tuple, list))
        or len(input_size) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    ):
        raise ConfigError(f"input_size={input_size!r} must be (channels, height, width) of positive integers")
    return (int(input_size[0]), int(input_size[1]), int(input_size[2]))


def _dataset_length(loader: Iterable) -> int | None:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _capped_batches(loader: Iterable, max_samples: int | None,
                    cancel: CancelToken | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (images, labels) batches of ``loader``, labels as tensors, cut to ``max_samples`` samples in all (the
    last batch trimmed, empty batches skipped); ``cancel`` is checked before each batch."""
    seen = 0
    for batch in loader:
        check_cancel(cancel, "evaluation")
        images, labels = batch[0], batch[1]
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if max_samples is not None and seen + len(labels) > max_samples:
            keep = max_samples - seen
            images, labels = images[:keep], labels[:keep]
        if len(labels) == 0:
            continue
        yield images, labels
        seen += len(labels)
        if max_samples is not None and seen >= max_samples:
            break


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """ConfigError when a label is outside the model's outputs; checked on the host copy only (no device sync,
    no CUDA assert)."""
    if labels.device.type != "cpu":
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ConfigError(
            f"the data has label {high if high >= num_classes else low} but the model has "
            f"{num_classes} outputs; build the model with the data's number of classes "
            "(num_classes= / --num-classes)"
        )


class _Tally:
    """Correct top-1/top-5 counts and the summed loss of an evaluation, accumulated on the device so that the loop
    never waits for it; read once by :meth:`result`."""

    def __init__(self, dev: torch.device) -> None:
        self.acc_dev = accumulation_device(dev)
        self.correct1 = torch.zeros((), dtype=torch.int64, device=dev)
        self.correct5 = torch.zeros((), dtype=torch.int64, device=dev)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc_dev)
        self.seen = 0
        self.num_classes: int | None = None

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch (float logits, labels on the logits' device)."""
        assert self.num_classes is not None
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").to(self.acc_dev, torch.float64)
        self.correct1 += (logits.argmax(dim=1) == labels).sum()
        if self.num_classes >= TOP5_MIN_CLASSES:
            top5 = logits.topk(5, dim=1).indices
            self.correct5 += (top5 == labels[:, None]).any(dim=1).sum()
        self.seen += len(labels)

    def result(self) -> Accuracy:
        if self.seen == 0:
            raise DataError("the data loader produced no samples to evaluate; check the dataset and max_samples")
        assert self.num_classes is not None
        seen = self.seen
        top5 = 100.0 * int(self.correct5.item()) / seen if self.num_classes >= TOP5_MIN_CLASSES else None
        return Accuracy(top1=100.0 * int(self.correct1.item()) / seen, top5=top5,
                        loss=float(self.loss_sum.item()) / seen, samples=seen)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device = "auto",
    amp: str | torch.dtype | None = None,
    max_samples: int | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Accuracy:
    """Top-1 (and top-5 for more than 10 classes) accuracy and mean cross-entropy of ``model`` on ``loader``.

    The model is moved to ``device`` (and to channels_last on CUDA) and left there; its train/eval mode is
    restored afterwards. Counts are accumulated on the device, so the loop never waits for the GPU; the host
    reads them once at the end. ``amp`` ("fp16", "bf16" or a dtype) runs the forward pass under autocast on
    CUDA. ``max_samples`` stops after that many samples (the last batch is cut). ``cancel`` is checked
    between batches and raises Cancelled.

    Raises:
        ConfigError: bad arguments, or labels outside the model's outputs; DataError: an empty loader.
    """
    if max_samples is not None:
        _check_positive_int("max_samples", max_samples)
    dev = resolve_device(device)
    dtype = amp_dtype(amp)
    report = progress or no_progress
    channels_last = use_channels_last(dev)
    total = _dataset_length(loader)
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)

    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    tally = _Tally(dev)
    with eval_mode(model), torch.inference_mode():
        for images, labels in _capped_batches(loader, max_samples, cancel):
            images = images.to(dev, non_blocking=True)
            if channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(dev, dtype):
                logits = model(images)
            logits = logits.float()
            if tally.num_classes is None:
                tally.num_classes = int(logits.shape[1])
            _check_labels(labels, tally.num_classes)
            tally.add(logits, labels.to(dev, non_blocking=True))
            report(tally.seen, total, "evaluating")
    return tally.result()


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _extra_flop_formulas() -> dict:
    """Formulas FlopCounterMode lacks: scaled-dot-product attention's CPU kernel (counted like the GPU ones)."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    sdpa = getattr(flop_counter, "sdpa_flop_count", None)
    if op is None or sdpa is None:
        return {}

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa(query_shape, key_shape, value_shape)

    return {op: cpu_sdpa}


def _flop_pass(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[int, dict[str, int]]:
    """One FlopCounterMode forward pass of a zero image: (total FLOPs, FLOPs by counter module key)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = _check_input_size(input_size)
    device, dtype = _model_device_dtype(model)
    x = torch.zeros((1, *size), device=device, dtype=dtype)
    # nn.MultiheadAttention's (and TransformerEncoderLayer's) inference fast path runs one fused kernel that
    # FlopCounterMode does not see (a ViT-B/16 would count 11.3 G instead of 17.6 G MACs). The ordinary path does
    # the same math; it is taken for THIS call only by running with autograd on and an input that requires
    # grad (the fast path refuses tensors that need gradients). No process-wide switch is flipped
    # (torch.backends.mha.set_fastpath_enabled would change other threads' — other dashboard sessions' —
    # forward passes while the count runs). Only forward FLOPs are counted: nothing calls backward.
    # inference_mode(False): also when the caller runs under inference_mode, where enable_grad alone is not enough
    with eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        x = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            model(x)
    per_key = {key: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_key


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulate operations (MACs) of one forward pass for ONE image of ``input_size`` (C, H, W).

    This is the number the pruning literature (and the CKA block-pruning paper) reports as "FLOPs":
    PyTorch's FlopCounterMode counts a multiply-add as 2 FLOPs, and MACs = FLOPs / 2. Like that literature it
    covers convolutions and matrix products (linear layers, attention); batch norm, activations, pooling
    and additions are not counted. The pass runs a zero image of batch 1 in eval mode without gradients, on
    the device the model is on (CPU for the usual case), and restores the model's mode.
    """
    total, _ = _flop_pass(model, input_size)
    return total // 2


def module_macs(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    """MACs of one image per module, keyed by the names ``model.named_modules()`` uses ("" = the whole model).

    A module's MACs include everything run inside its forward (its submodules and functional calls), so a
    residual block's entry is what removing it saves. Modules not called in the forward pass get 0. Counted in
    one FlopCounterMode pass, like :func:`count_macs` (whose value is the ``""`` entry).
    """
    _, per_key = _flop_pass(model, input_size)
    # FlopCounterMode names modules "<RootClass>.<child>.<child>…" from named_children; a module reachable
    # under several names gets one of them. Map every alias back to the first name named_modules() uses.
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        canonical.setdefault(id(module), name)
        alias[name] = canonical[id(module)]
    result = {name: 0 for name, _ in model.named_modules()}
    root = type(model).__name__
    for key, flops in per_key.items():
        if key == root:
            relative = ""
        elif key.startswith(root + "."):
            relative = key[len(root) + 1 :]
        else:
            continue  # "Global", or modules outside the model
        name = alias.get(relative)
        if name is not None:
            result[name] = flops // 2
    return result


def count_params(model: nn.Module) -> int:
    """Number of parameter values; a parameter shared between modules (tied weights) is counted once."""
    unique = {id(p): p for p in model.parameters()}
    return int(sum(p.numel() for p in unique.values()))


@dataclass
class Latency:
    """Forward-pass timing of one batch.

    Attributes:
        median_ms, p10_ms, p90_ms: median and 10th/90th percentiles over the timed repeats, milliseconds.
        batch_size: images per forward pass.
        device: where it ran, e.g. ``"cpu (2 threads)"`` or ``"cuda (NVIDIA H100 80GB HBM3)"``.
        repeats: number of timed forward passes.
        reference, ratio, ratio_p10, ratio_p90: for a model timed interleaved with a reference model
            (:func:`cka_analysis.latency.compare_latency` with ``reference=``): the reference's label and the
            median, 10th and 90th percentile over the rounds of this model's time / the reference's time in the
            same round (a model compared with itself gives 1 within that spread). None otherwise.
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    batch_size: int
    device: str
    repeats: int
    reference: str | None = None
    ratio: float | None = None
    ratio_p10: float | None = None
    ratio_p90: float | None = None

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch_size * 1000.0 / self.median_ms if self.median_ms > 0 else float("inf")

    def __str__(self) -> str:
        return (
            f"{self.median_ms:.3f} ms median (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}) at batch "
            f"{self.batch_size} on {self.device}, {self.throughput:,.0f} images/s"
        )


def _timed_passes(model: nn.Module, x: torch.Tensor, dev: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` forward passes of ``model`` on ``x``, the device synchronised before and after each
    (GPU time, not launch time); run it inside the caller's eval/inference/autocast context."""
    times: list[float] = []
    for _ in range(repeats):
        synchronize(dev)
        start = time.perf_counter()
        model(x)
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return times


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int, int],
    *,
    batch_size: int = 1,
    device: str | torch.device = "auto",
    warmup: int = 10,
    repeats: int = 50,
    amp: str | torch.dtype | None = None,
    channels_last: bool | None = None,
) -> Latency:
    """Time ``repeats`` forward passes of a random batch after ``warmup`` untimed ones.

    The device is synchronised before and after every timed pass, so GPU time is measured, not launch time.
    The model is moved to ``device`` (and to channels_last when ``channels_last`` is true — by default on
    CUDA) and left there; it runs in eval mode under inference_mode, and its mode is restored afterwards.
    """
    size = _check_input_size(input_size)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("warmup", warmup, minimum=0)
    _check_positive_int("repeats", repeats)
    dev = resolve_device(device)
    dtype = amp_dtype(amp)
    use_cl = use_channels_last(dev) if channels_last is None else bool(channels_last)
    model.to(dev)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    _, param_dtype = _model_device_dtype(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *size), generator=gen).to(dev, param_dtype)
    if use_cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with eval_mode(model), torch.inference_mode(), autocast(dev, dtype):
        for _ in range(warmup):
            model(x)
        times = [t * 1000.0 for t in _timed_passes(model, x, dev, repeats)]
    p10, p50, p90 = torch.quantile(
        torch.tensor(times, dtype=torch.float64), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    ).tolist()
    return Latency(
        median_ms=p50,
        p10_ms=p10,
        p90_ms=p90,
        batch_size=batch_size,
        device=describe_device(dev),
        repeats=repeats,
    )


# A training step (forward + backward) or an attack step (forward + input gradient) costs about three forward
# passes: the backward pass is roughly twice the forward one (Kaplan et al. 2020; also the usual 1:2 rule).
TRAIN_STEP_PASSES = 3.0


@dataclass
class Estimate:
    """How long some work will take, from a measured probe.

    Attributes:
        seconds: the estimate for the whole work.
        per_image_s: measured seconds of one forward pass per image (at the probe's batch size).
        images, passes: the work: ``images`` images, ``passes`` forward-pass equivalents each.
        device: where it was measured, e.g. ``"cpu (2 threads)"``.
        probe_s: wall-clock time the probe itself took.
    """

    seconds: float
    per_image_s: float
    images: int
    passes: float
    device: str
    probe_s: float

    def __str__(self) -> str:
        return f"about {format_duration(self.seconds)} on {self.device}"


def format_duration(seconds: float) -> str:
    """``"8 s"``, ``"1 min 40 s"``, ``"2 h 05 min"``: a duration for people (rounded up to whole seconds)."""
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise ConfigError(f"seconds={seconds!r} must be a non-negative number")
    total = int(-(-seconds // 1))  # ceil
    if total < 60:
        return f"{max(total, 1)} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def estimate_seconds(
    model: nn.Module,
    images: int,
    passes: float = 1.0,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 32,
    input_size: tuple[int, int, int] | None = None,
    repeats: int = 2,
) -> Estimate:
    """Estimate the wall-clock time of ``images`` images × ``passes`` forward-pass equivalents on ``device``.

    A short probe measures it rather than guessing from MACs: one untimed warm-up and ``repeats`` timed forward
    passes of a batch of ``min(batch_size, images)`` images (seeded noise of the model's input size) under
    inference_mode, synchronised like :func:`measure_latency`; the fastest repeat gives the seconds per image.
    Pass ``passes`` as the forward-pass equivalents per image the work needs (a heatmap ≈ 1 plus its CKA
    arithmetic, a fine-tuning step ≈ :data:`TRAIN_STEP_PASSES`, a 10-step PGD attack ≈ 10 × that).

    The model is probed where the work will run and put back on the device (and in the mode) it was in, so
    calling this never changes a model that is shared with other work. The probe costs ``repeats + 1`` batches.
    """
    _check_positive_int("images", images)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("repeats", repeats)
    if not isinstance(passes, (int, float)) or isinstance(passes, bool) or not passes > 0:
        raise ConfigError(f"passes={passes!r} must be a positive number of forward-pass equivalents per image")
    if input_size is None:
        from .models.preset import get_preset

        input_size = get_preset(model).input_size
    size = _check_input_size(input_size)
    dev = resolve_device(device)
    home, param_dtype = _model_device_dtype(model)
    batch = min(int(batch_size), int(images))
    x = torch.randn((batch, *size), generator=torch.Generator().manual_seed(0)).to(dev, param_dtype)
    start = time.perf_counter()
    try:
        model.to(dev)
        with eval_mode(model), torch.inference_mode():
            model(x)
            times = _timed_passes(model, x, dev, repeats)
    finally:
        model.to(home)
    per_image = min(times) / batch
    return Estimate(seconds=per_image * images * float(passes), per_image_s=per_image, images=int(images),
                    passes=float(passes), device=describe_device(dev), probe_s=time.perf_counter() - start)
