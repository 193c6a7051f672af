"""How long a dashboard action will take, said before it starts.

Every page describes its long actions as :class:`Work` — N images × P forward-pass equivalents of a model — and
hands it to :func:`~dashboard.ui.job_result` (or calls :func:`estimate` and :func:`show` itself). The seconds per
image come from the library's probe (:func:`cka_analysis.workflow.forward_seconds_per_image`, the same one a
run's estimate uses) of this model on this device, run once per model and device and then kept for the whole
server process, so a page rerun costs nothing. A pruning run and a further recovery are estimated by
:func:`cka_analysis.workflow.estimate_run` / :func:`~cka_analysis.workflow.estimate_further` instead (timed
training steps; what the CLI announces). The job's progress bar then counts down from the estimate
(``Job.estimate``) until the work reports its own progress.

The pass counts below are forward passes per image. Two kinds of work are not forward passes and are probed
themselves, once per model and device, rather than counted in passes: an attack step (a forward pass and the
gradient with respect to the input only, no weight gradients: about two passes on the digits demo, 1.6 on
ResNet-56, :func:`attack_seconds_per_image`), and a CKA heatmap's Gram matrices and pair products of every layer
(float64, quadratic in the batch; on ResNet-56 over 256 images 1.1 s beside 0.6 s of forward passes,
:func:`cka_batch_seconds`), timed by the library's own accumulator on features of the model's real shapes; and
the removal scores' rest of the network after each candidate, timed per block (:func:`suffix_passes`). Fixed costs
per action are timed too: the job's private copy of the model and the loader's start-up.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st
import torch
import torch.nn.functional as F
from torch import nn

from cka_analysis.capture import ActivationCapture
from cka_analysis.cka import MinibatchCKA
from cka_analysis.device import describe_device, resolve_device
from cka_analysis.metrics import TRAIN_STEP_PASSES, Estimate, count_macs, format_duration
from cka_analysis.workflow import PROBE_BATCH, PROBE_MACS, forward_seconds_per_image, load_probe

LONG_SECONDS = 10.0  # actions expected to take longer than this show the estimate before they start
SLOW_SECONDS = 60.0  # ... and a warning with the sizes to lower above this

HEATMAP_PASSES = 1.0  # one forward pass; the Gram matrices and pair products are Work.cka_batch's probe
CROSS_HEATMAP_PASSES = 2 * HEATMAP_PASSES  # two networks over the same images
EVALUATE_PASSES = 1.0
CORRUPTION_TYPES = 8
CORRUPTION_SEVERITIES = 5


@dataclass(frozen=True)
class Work:
    """What an action does, for its estimate: ``images`` × ``passes`` forward-pass equivalents of ``model``.

    ``attack_steps`` per image are adversarial gradient steps (:func:`attack_seconds_per_image`), on top of the
    passes. ``cka_batch`` > 0 adds a CKA heatmap's Gram arithmetic of every layer over batches of that size with
    ``cka_kernel``/``cka_debiased`` (:func:`cka_batch_seconds`), ``cka_models`` times (two networks: 2).
    ``copies`` is how many private copies of the model the job makes (one per model it runs; each copy is timed,
    :func:`copy_seconds`).
    ``suffixes_of`` names blocks after each of which a removal score runs the rest of the network again
    (``suffix_runs`` times: once per criterion), timed per block (:func:`suffix_passes`).
    ``what`` says it in words for the user ("500 calibration images, one forward pass each"). ``data`` (with
    ``data_key``, what identifies it) is the dataset the work reads its ``images`` from once each: reading and
    decoding them is timed too (:func:`load_rate`), which the forward-pass probe does not see (ResNet-56's
    accuracy on CIFAR-10's 10,000 JPEG test images was estimated at 25 s without it and took 43 s).
    """

    model: nn.Module
    model_key: str
    images: int
    passes: float
    what: str
    data: Any = None
    data_key: str = ""
    attack_steps: float = 0.0
    cka_batch: int = 0
    cka_kernel: str = "linear"
    cka_debiased: bool = True
    cka_models: int = 1
    copies: int = 1
    suffixes_of: tuple[str, ...] = ()
    suffix_runs: int = 1

    def __post_init__(self) -> None:
        if self.images < 1 or self.passes <= 0 or self.attack_steps < 0 or self.cka_batch < 0:
            raise ValueError(f"Work needs images >= 1, passes > 0, attack_steps >= 0 and cka_batch >= 0, got "
                             f"images={self.images}, passes={self.passes}, attack_steps={self.attack_steps}, "
                             f"cka_batch={self.cka_batch}")


_rates: dict[tuple[str, str], float] = {}
_lock = threading.Lock()


def seconds_per_image(model: nn.Module, model_key: str, device: str) -> float:
    """Measured seconds of one forward pass per image of ``model`` on ``device``; probed once per process.

    The probe runs on a private copy, so a model that a job of any session is using is never moved.
    """
    key = (model_key, str(device))
    with _lock:
        if key in _rates:
            return _rates[key]
    from .compute import private_copy

    rate = forward_seconds_per_image(private_copy(model), device)
    with _lock:
        _rates[key] = rate
    return rate


_loads: dict[str, float] = {}
_startups: dict[str, float] = {}


def load_rate(data: Any, data_key: str) -> float:
    """Measured seconds to read and transform one image of ``data`` (the library's
    :func:`~cka_analysis.workflow.load_probe`, as a run's estimate uses); probed once per process
    and dataset (``data_key``). The slope between two probe sizes: the loader's own start-up is paid once per
    action, not per image (one 32-image probe of CIFAR-10's JPEG test split said 2.5 ms an image, which made
    ResNet-56's accuracy on 10,000 images an estimated 50 s for 31 s)."""
    with _lock:
        if data_key in _loads:
            return _loads[data_key]
    rate, startup = load_probe(data)
    with _lock:
        _loads[data_key] = rate
        _startups[data_key] = startup
    return rate



def load_startup(data: Any, data_key: str) -> float:
    """The loader's start-up, paid once per action that reads ``data``: what the smaller of :func:`load_rate`'s
    two probes took beyond its images at the per-image rate (probed with it, once per dataset)."""
    load_rate(data, data_key)
    with _lock:
        return _startups.get(data_key, 0.0)


_copies: dict[str, float] = {}


def copy_seconds(model: nn.Module, model_key: str) -> float:
    """Measured seconds of the private copy every dashboard job makes of its model before it starts
    (:func:`~dashboard.compute.private_copy`, a deep copy); timed once per process and model. A fixed cost per
    action that the per-image probes do not see: on the digits demo it is a quarter of a 20 ms evaluation."""
    with _lock:
        if model_key in _copies:
            return _copies[model_key]
    from .compute import private_copy

    start = time.perf_counter()
    private_copy(model)
    seconds = time.perf_counter() - start
    with _lock:
        _copies[model_key] = seconds
    return seconds


_attacks: dict[tuple[str, str], float] = {}
_grams: dict[tuple[str, str, int, str, bool], float] = {}


def _probe_batch(model: nn.Module) -> int:
    """The forward-pass probe's batch (:data:`~cka_analysis.workflow.PROBE_MACS` / the model's MACs, clamped to
    :data:`~cka_analysis.workflow.PROBE_BATCH`), so that the attack probe runs at the same batch."""
    macs = max(1, count_macs(model, model.cka_preset.input_size))
    low, high = PROBE_BATCH
    return int(min(high, max(low, PROBE_MACS // macs)))


def attack_seconds_per_image(model: nn.Module, model_key: str, device: str) -> float:
    """Measured seconds of one adversarial step per image of ``model`` on ``device``; probed once per process.

    What FGSM and PGD do per step (:mod:`cka_analysis.robustness`, through captum): a forward pass with the input
    requiring grad and the gradient of the loss with respect to the input only, so no weight gradients, unlike a
    training step (:data:`~cka_analysis.metrics.TRAIN_STEP_PASSES`, which overestimated the attacks by half). One
    untimed warm-up, then the faster of two timed steps of the forward probe's batch, on a private copy.
    """
    key = (model_key, str(device))
    with _lock:
        if key in _attacks:
            return _attacks[key]
    from .compute import private_copy

    dev = resolve_device(device)
    net = private_copy(model).to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    batch = _probe_batch(model)
    x = torch.rand((batch, *net.cka_preset.input_size), generator=torch.Generator().manual_seed(0)).to(dev)
    y = torch.zeros(batch, dtype=torch.long, device=dev)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        xi = x.clone().requires_grad_(True)
        loss = F.cross_entropy(net(xi).float(), y, reduction="none")
        torch.autograd.grad(loss.sum(), xi)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    rate = min(times[1:]) / batch
    with _lock:
        _attacks[key] = rate
    return rate


def cka_batch_seconds(model: nn.Module, model_key: str, device: str, batch: int, kernel: str = "linear",
                      debiased: bool = True) -> float:
    """Measured seconds of a CKA heatmap's arithmetic for one batch of ``batch`` images of ``model``: the Gram
    matrix of every captured layer and the products of every pair (float64, :class:`~cka_analysis.cka.MinibatchCKA`,
    the accumulator :func:`~cka_analysis.cka.cka_matrix` uses), besides the forward pass; probed once per process.

    The layer shapes come from one forward pass of two images through the same hooks
    (:class:`~cka_analysis.capture.ActivationCapture`); the accumulator is then timed on seeded features of those
    shapes at ``batch`` images. It grows with batch² × the layers' sizes, which a forward-pass count cannot say
    (on ResNet-56, 256 images at batch 128: 1.1 s of Grams beside 0.6 s of forward passes).
    """
    key = (model_key, str(device), int(batch), kernel, bool(debiased))
    with _lock:
        if key in _grams:
            return _grams[key]
    from .compute import private_copy

    dev = resolve_device(device)
    net = private_copy(model).to(dev).eval()
    x = torch.rand((2, *net.cka_preset.input_size), generator=torch.Generator().manual_seed(0)).to(dev)
    with ActivationCapture(net) as cap, torch.inference_mode():
        shapes = {name: tuple(f.shape[1:]) for name, f in cap.run(x).items()}
    gen = torch.Generator().manual_seed(0)
    feats = {name: torch.rand((int(batch), *shape), generator=gen).to(dev) for name, shape in shapes.items()}
    acc = MinibatchCKA(kernel=kernel, debiased=debiased)
    with torch.inference_mode():
        start = time.perf_counter()
        acc.update(feats)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    with _lock:
        _grams[key] = seconds
    return seconds


_suffixes: dict[tuple[str, str, tuple[str, ...]], float] = {}


def suffix_passes(model: nn.Module, model_key: str, device: str, blocks: Sequence[str]) -> float:
    """Forward passes of the whole network that running the rest of it after each of ``blocks`` adds up to (the
    removal scores' suffixes, :mod:`cka_analysis.scoring`'s ``prefix`` strategy), from one timed forward pass of
    the probe's batch with every block's end marked by a hook; probed once per process, model and device.

    Counted in time, not MACs: on a CPU the late stages of a CNN run faster per MAC (ResNet-56's three stages, about
    equal in MACs, took 149, 72 and 49 ms at batch 128), and the suffixes are mostly late stages: 10.6 passes in
    time where the MACs say 14. A block that is not found adds half a pass.
    """
    key = (model_key, str(device), tuple(blocks))
    with _lock:
        if key in _suffixes:
            return _suffixes[key]
    from .compute import private_copy

    dev = resolve_device(device)
    net = private_copy(model).to(dev).eval()
    ends: dict[str, float] = {}
    modules = dict(net.named_modules())

    def mark(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            ends[name] = time.perf_counter()
        return hook

    handles = [modules[b].register_forward_hook(mark(b)) for b in blocks if b in modules]
    x = torch.rand((_probe_batch(model), *net.cka_preset.input_size), generator=torch.Generator().manual_seed(0))
    x = x.to(dev)
    try:
        with torch.inference_mode():
            net(x)  # warm-up
            ends.clear()
            start = time.perf_counter()
            net(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            end = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    total = max(end - start, 1e-12)
    passes = sum((end - ends[b]) / total if b in ends else 0.5 for b in blocks)
    with _lock:
        _suffixes[key] = passes
    return passes


def estimate(work: Work, device: str) -> Estimate:
    """The estimate of ``work`` on ``device``: the forward passes at the probed rate (a measured probe the first
    time for this model and device), its attack steps at theirs, a heatmap's Gram arithmetic per batch, plus
    reading its images once (and the loader's start-up) when ``work.data`` is given, plus the job's private
    copies of the model."""
    per_image = seconds_per_image(work.model, work.model_key, device)
    load = load_rate(work.data, work.data_key) if work.data is not None else 0.0
    attack = attack_seconds_per_image(work.model, work.model_key, device) if work.attack_steps else 0.0
    seconds = (per_image * work.passes + attack * work.attack_steps + load) * work.images
    seconds += work.copies * copy_seconds(work.model, work.model_key)
    if work.suffixes_of:
        seconds += (per_image * work.images * work.suffix_runs
                    * suffix_passes(work.model, work.model_key, device, work.suffixes_of))
    if work.data is not None:
        seconds += load_startup(work.data, work.data_key)
    if work.cka_batch:
        batches = math.ceil(work.images / work.cka_batch)
        full, last = divmod(work.images, work.cka_batch)
        seconds += work.cka_models * (
            full * cka_batch_seconds(work.model, work.model_key, device, work.cka_batch, work.cka_kernel,
                                     work.cka_debiased)
            + (cka_batch_seconds(work.model, work.model_key, device, last, work.cka_kernel, work.cka_debiased)
               if last and batches > full else 0.0))
    passes = seconds / max(per_image * work.images, 1e-12)  # forward-pass equivalents, for the record
    return Estimate(seconds=seconds, per_image_s=per_image, images=work.images, passes=passes,
                    device=describe_device(resolve_device(device)), probe_s=0.0)


def show(est: Estimate, work: Work, *, more: str = "") -> None:
    """Say before an action starts how long it will take: a caption, or a warning above :data:`SLOW_SECONDS`.

    Silent below :data:`LONG_SECONDS`. ``more`` names the setting that trades time for precision.
    """
    if est.seconds < LONG_SECONDS:
        return
    text = (f"Estimated time: **{format_duration(est.seconds)}** on {est.device} for {work.what} "
            f"(measured by a short probe of this model on this device).")
    if more:
        text += f" {more}"
    if est.seconds > SLOW_SECONDS:
        st.warning(text, icon=":material/schedule:")
    else:
        st.caption(text)


def robustness_passes(kinds: Sequence[str], n_eps: int, pgd_steps: int = 10) -> float:
    """Forward-pass equivalents per test image of the robustness evaluation of ``kinds``, counting an attack step
    as a training step (:data:`~cka_analysis.metrics.TRAIN_STEP_PASSES`): a deliberate upper bound, used to size
    the Compare page's default number of images before any attack probe has run. The estimate itself counts the
    evaluations (:func:`robustness_evaluations`) and the attack steps (:func:`robustness_attack_steps`) apart.
    """
    passes = EVALUATE_PASSES
    if "fgsm" in kinds:
        passes += n_eps * (TRAIN_STEP_PASSES + EVALUATE_PASSES)
    if "pgd" in kinds:
        passes += n_eps * (pgd_steps * TRAIN_STEP_PASSES + EVALUATE_PASSES)
    if "corruptions" in kinds:
        passes += CORRUPTION_TYPES * CORRUPTION_SEVERITIES * EVALUATE_PASSES
    return passes


def robustness_evaluations(kinds: Sequence[str], n_eps: int) -> float:
    """Forward passes (no gradient) per test image of the robustness evaluation of ``kinds``: the clean one, one
    per ε of FGSM and of PGD (of the attacked images), one per corruption type and severity."""
    passes = EVALUATE_PASSES
    passes += n_eps * EVALUATE_PASSES * (("fgsm" in kinds) + ("pgd" in kinds))
    if "corruptions" in kinds:
        passes += CORRUPTION_TYPES * CORRUPTION_SEVERITIES * EVALUATE_PASSES
    return passes


def robustness_attack_steps(kinds: Sequence[str], n_eps: int, pgd_steps: int = 10) -> float:
    """Attack steps (forward + input gradient, :func:`attack_seconds_per_image`) per test image: one per ε for
    FGSM, ``pgd_steps`` per ε for PGD."""
    return n_eps * (("fgsm" in kinds) + ("pgd" in kinds) * pgd_steps)


def latency_images(batch: int, repeats: int) -> int:
    """Images the latency measurement pushes through per model: (3 warm-up + ``repeats``) batches."""
    return (3 + repeats) * batch


def compare_work(models: Sequence[tuple[str, nn.Module]], *, kinds: Sequence[str], n_eps: int, samples: int,
                 batch: int, repeats: int, pgd_steps: int = 10, macs: Sequence[float] | None = None) -> Work:
    """The Compare page's measurement: latency (warm-up + timed batches) and robustness of every model.

    Expressed as work of the first model: forward passes (the latency batches; the clean, attacked and corrupted
    evaluations) and attack steps, per image of the latency batches and the robustness sample; ``macs`` (one per
    model) weighs each model's work by its MACs relative to the first's (a pruned model's pass is cheaper;
    without them every model costs as much).
    """
    if not models:
        raise ValueError("compare_work needs at least one model")
    key, model = models[0]
    weight = len(models) if not macs else sum(m / macs[0] for m in macs)
    images = max(1, round(weight * (latency_images(batch, repeats) + (samples if kinds else 0))))
    evaluations = (latency_images(batch, repeats) + samples * robustness_evaluations(kinds, n_eps)
                   if kinds else latency_images(batch, repeats))
    steps = samples * robustness_attack_steps(kinds, n_eps, pgd_steps) if kinds else 0.0
    what = (f"{len(models)} model(s): latency ({repeats} timed batches of {batch})"
            + (f" and {', '.join(kinds)} on {samples} test images" if kinds else ""))
    per_model = latency_images(batch, repeats) + (samples if kinds else 0)
    return Work(model=model, model_key=key, images=images, passes=evaluations / per_model,
                what=what, attack_steps=steps / per_model, copies=len(models) if kinds else 0)
