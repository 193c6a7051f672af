"""How long a dashboard action will take, said before it starts.

Every page describes its long actions as :class:`Work` — N images × P forward-pass equivalents of a model — and
hands it to :func:`~dashboard.ui.job_result` (or calls :func:`estimate` and :func:`show` itself). The seconds per
image come from the library's probe (:func:`cka_analysis.workflow.forward_seconds_per_image`, the same one a
run's estimate uses) of this model on this device, run once per model and device and then kept for the whole
server process, so a page rerun costs nothing. A pruning run and a further recovery are estimated by
:func:`cka_analysis.workflow.estimate_run` / :func:`~cka_analysis.workflow.estimate_further` instead (timed
training steps; what the CLI announces). The job's progress bar then counts down from the estimate
(``Job.estimate``) until the work reports its own progress.

The pass counts below are forward-pass equivalents per image: a training or attack step (forward + backward) is
:data:`~cka_analysis.metrics.TRAIN_STEP_PASSES`; a CKA heatmap is one forward pass plus the Gram matrices of
every layer, about half a pass more on ResNets (measured on ResNet-56: 256 images, 29 layers).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st
from torch import nn

from cka_analysis.metrics import TRAIN_STEP_PASSES, Estimate, format_duration
from cka_analysis.workflow import forward_seconds_per_image, load_seconds_per_image

LONG_SECONDS = 10.0  # actions expected to take longer than this show the estimate before they start
SLOW_SECONDS = 60.0  # ... and a warning with the sizes to lower above this

HEATMAP_PASSES = 1.5
CROSS_HEATMAP_PASSES = 2 * HEATMAP_PASSES  # two networks over the same images
EVALUATE_PASSES = 1.0
CORRUPTION_TYPES = 8
CORRUPTION_SEVERITIES = 5


@dataclass(frozen=True)
class Work:
    """What an action does, for its estimate: ``images`` × ``passes`` forward-pass equivalents of ``model``.

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

    def __post_init__(self) -> None:
        if self.images < 1 or self.passes <= 0:
            raise ValueError(f"Work needs images >= 1 and passes > 0, got images={self.images}, "
                             f"passes={self.passes}")


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
LOAD_PROBE_IMAGES = (16, 80)


def load_rate(data: Any, data_key: str) -> float:
    """Measured seconds to read and transform one image of ``data`` (the library's
    :func:`~cka_analysis.workflow.load_seconds_per_image`, as a run's estimate uses); probed once per process
    and dataset (``data_key``). The slope between two probe sizes: the loader's own start-up is paid once per
    action, not per image (one 32-image probe of CIFAR-10's JPEG test split said 2.5 ms an image, which made
    ResNet-56's accuracy on 10,000 images an estimated 50 s for 31 s)."""
    with _lock:
        if data_key in _loads:
            return _loads[data_key]
    small, large = LOAD_PROBE_IMAGES
    t_small = load_seconds_per_image(data, small) * small
    t_large = load_seconds_per_image(data, large) * large
    n = len(data)
    rate = (t_large - t_small) / (large - small) if n > large else t_large / max(1, min(large, n))
    if rate <= 0:
        rate = t_large / max(1, min(large, n))
    with _lock:
        _loads[data_key] = rate
    return rate


def estimate(work: Work, device: str) -> Estimate:
    """The estimate of ``work`` on ``device``: the forward passes at the probed rate (a measured probe the first
    time for this model and device) plus reading its images once when ``work.data`` is given."""
    per_image = seconds_per_image(work.model, work.model_key, device)
    load = load_rate(work.data, work.data_key) if work.data is not None else 0.0
    from cka_analysis.device import describe_device, resolve_device

    return Estimate(seconds=(per_image * work.passes + load) * work.images, per_image_s=per_image,
                    images=work.images, passes=work.passes, device=describe_device(resolve_device(device)),
                    probe_s=0.0)


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
    """Forward-pass equivalents per test image of the robustness evaluation of ``kinds``.

    FGSM: one gradient step and one evaluation per ε; PGD: ``pgd_steps`` gradient steps and one evaluation per
    ε; corruptions: one evaluation per type and severity; plus the clean evaluation.
    """
    passes = EVALUATE_PASSES
    if "fgsm" in kinds:
        passes += n_eps * (TRAIN_STEP_PASSES + EVALUATE_PASSES)
    if "pgd" in kinds:
        passes += n_eps * (pgd_steps * TRAIN_STEP_PASSES + EVALUATE_PASSES)
    if "corruptions" in kinds:
        passes += CORRUPTION_TYPES * CORRUPTION_SEVERITIES * EVALUATE_PASSES
    return passes


def latency_images(batch: int, repeats: int) -> int:
    """Images the latency measurement pushes through per model: (3 warm-up + ``repeats``) batches."""
    return (3 + repeats) * batch


def compare_work(models: Sequence[tuple[str, nn.Module]], *, kinds: Sequence[str], n_eps: int, samples: int,
                 batch: int, repeats: int, pgd_steps: int = 10, macs: Sequence[float] | None = None) -> Work:
    """The Compare page's measurement: latency (warm-up + timed batches) and robustness of every model.

    Expressed as forward passes of the first model; ``macs`` (one per model) weighs each model's passes by its
    MACs relative to the first's (a pruned model's pass is cheaper; without them every model costs as much).
    """
    if not models:
        raise ValueError("compare_work needs at least one model")
    key, model = models[0]
    latency = latency_images(batch, repeats)
    per_model = latency + (samples * robustness_passes(kinds, n_eps, pgd_steps) if kinds else 0)
    weight = len(models) if not macs else sum(m / macs[0] for m in macs)
    what = (f"{len(models)} model(s): latency ({repeats} timed batches of {batch})"
            + (f" and {', '.join(kinds)} on {samples} test images" if kinds else ""))
    return Work(model=model, model_key=key, images=max(1, int(weight * per_model)), passes=1.0, what=what)
