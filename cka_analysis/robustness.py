"""Robustness of a (pruned) classifier: adversarial accuracy and accuracy under common corruptions.

Removing residual blocks can cost more robustness than clean accuracy shows, so the CLI
(``cka-prune evaluate --robustness fgsm,pgd,corruptions``) and the dashboard report both:

* **Adversarial accuracy** under L∞ FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018), computed with
  ``captum.robust.FGSM`` / ``captum.robust.PGD``. Loaders in this project yield images that are already
  normalised with the model preset's ``mean``/``std``; the functions here map them back to pixel space
  (``x * std + mean``, clamped to [0, 1]) and attack a wrapper that normalises inside the forward pass. So ε is
  measured in pixel units of [0, 1] (8/255 means eight grey levels), every adversarial image stays in [0, 1],
  and the loss is the cross-entropy of the logits.
* **Common corruptions** in the style of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich, ICLR 2019):
  eight corruptions at severities 1–5, implemented on batched torch tensors so they run on the evaluation
  device. The severity parameters are the published tables; which table applies is chosen from the image size
  (largest side ≤ 64 px → the CIFAR-10-C table, otherwise the ImageNet-C table).

Every random choice (PGD's random start, the noise corruptions) is seeded, so a run can be repeated exactly on the
same device; the global RNG state is left as it was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .choices import ROBUSTNESS_KINDS
from .device import resolve_device
from .errors import ConfigError, DataError
from .progress import CancelToken, ProgressFn, check_cancel

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "CORRUPTION_TABLES",
    "DEFAULT_EPS",
    "ROBUSTNESS_KINDS",
    "SEVERITIES",
    "SMALL_IMAGE_MAX_SIDE",
    "adversarial_accuracy",
    "corrupt",
    "corruption_accuracy",
    "corruption_table_for",
    "disk_kernel",
    "evaluate_robustness",
    "fgsm_perturb",
    "hsv_to_rgb",
    "parse_eps",
    "pgd_perturb",
    "rgb_to_hsv",
]

ATTACKS: tuple[str, ...] = ("fgsm", "pgd")
DEFAULT_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "contrast",
    "brightness",
    "jpeg_compression",
    "pixelate",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Images whose largest side is at most this many pixels use the CIFAR-10-C table, larger ones ImageNet-C's.
SMALL_IMAGE_MAX_SIDE = 64

# Published severity parameters (Hendrycks & Dietterich 2019; make_cifar_c.py / make_imagenet_c.py), index = severity-1.
#   gaussian_noise: noise std in [0, 1] units      shot_noise: photons per unit intensity (Poisson rate)
#   impulse_noise: fraction of salt-and-pepper values   defocus_blur: (disk radius, Gaussian alias-blur sigma)
#   contrast: factor towards the per-channel mean   brightness: amount added to HSV value
#   jpeg_compression: JPEG quality   pixelate: resize factor
_CIFAR10_C: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "jpeg_compression": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
_IMAGENET_C: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "jpeg_compression": (25, 18, 15, 10, 7),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
}
#: The severity tables, read-only: ``CORRUPTION_TABLES[table][name][severity - 1]``.
CORRUPTION_TABLES: Mapping[str, Mapping[str, tuple[Any, ...]]] = MappingProxyType(
    {"cifar10-c": MappingProxyType(_CIFAR10_C), "imagenet-c": MappingProxyType(_IMAGENET_C)}
)

_CAPTUM_GRAD_WARNING = r"Input Tensor \d+ did not already require gradients"


# --------------------------------------------------------------------------------------------------------------
# Argument parsing and validation
# --------------------------------------------------------------------------------------------------------------


def parse_eps(text: str) -> list[float]:
    """Parse a comma-separated list of L∞ budgets, e.g. ``"1/255,2/255,0.01"`` → ``[0.0039…, 0.0078…, 0.01]``.

    Each item is a decimal number or a fraction ``a/b``. Budgets are in pixel units of [0, 1], so values must lie
    in [0, 1]; a value above 1 is almost always a forgotten ``/255`` and is rejected with that hint.
    """
    if not isinstance(text, str):
        raise ConfigError(f"eps must be a string such as '1/255,2/255,8/255', got {type(text).__name__}")
    if not text.strip():
        raise ConfigError("eps is empty; give comma-separated budgets such as '1/255,2/255,8/255'")
    values = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ConfigError(f"eps={text!r} has an empty item; separate budgets with single commas")
        values.append(_validate_one_eps(_parse_number(item, text), item))
    return values


def _parse_number(item: str, text: str) -> float:
    try:
        if "/" in item:
            numerator, denominator = (part.strip() for part in item.split("/", 1))
            den = float(denominator)
            if den == 0:
                raise ConfigError(f"eps item {item!r} in {text!r} divides by zero")
            return float(numerator) / den
        return float(item)
    except ValueError:
        raise ConfigError(
            f"eps item {item!r} in {text!r} is not a number; use decimals or fractions like 8/255"
        ) from None


def _validate_one_eps(value: float, label: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"eps value {label!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"eps value {label!r} is not finite")
    if value < 0:
        raise ConfigError(f"eps value {label!r} is negative; budgets are ≥ 0")
    if value > 1:
        raise ConfigError(
            f"eps value {label!r} is above 1; ε is in pixel units of [0, 1], so write e.g. 8/255 instead of 8"
        )
    return value


def _validate_eps_list(eps: Sequence[float] | str) -> list[float]:
    if isinstance(eps, str):
        return parse_eps(eps)
    if isinstance(eps, (int, float)):
        eps = [eps]
    values = [_validate_one_eps(e, e) for e in eps]
    if not values:
        raise ConfigError("eps is empty; give at least one budget such as 8/255")
    return values


def _validate_stats(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean_t = tuple(float(m) for m in mean)
        std_t = tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ConfigError(
            f"mean={mean!r} and std={std!r} must be per-channel sequences of numbers, e.g. (0.49, 0.48, 0.45)"
        ) from None
    if not mean_t or len(mean_t) != len(std_t):
        raise ConfigError(
            f"mean has {len(mean_t)} values and std {len(std_t)}; give one value per image channel to each"
        )
    if not all(math.isfinite(m) for m in mean_t) or not all(math.isfinite(s) and s > 0 for s in std_t):
        raise ConfigError(f"mean={mean_t} must be finite and std={std_t} strictly positive")
    return mean_t, std_t


def _stats_for(
    model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation to undo/redo around attacks: ``mean``/``std`` if given, else the model preset's."""
    if mean is None and std is None:
        from .models.preset import get_preset

        try:
            preset = get_preset(model)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; or pass mean=... and std=... (the per-channel normalisation the loader applies)"
            ) from None
        mean, std = preset.mean, preset.std
    elif mean is None or std is None:
        raise ConfigError(
            "give both mean and std (the loader's per-channel normalisation), or neither to use "
            "the model preset's"
        )
    return _validate_stats(mean, std)


def _validate_max_samples(max_samples: int | None) -> int | None:
    if max_samples is None:
        return None
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ConfigError(f"max_samples={max_samples!r} must be a positive integer or None (all samples)")
    return max_samples


def _validate_pgd(steps: int, step_size: float | None) -> tuple[int, float | None]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"pgd_steps={steps!r} must be a positive integer (10 is usual)")
    if step_size is not None:
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise ConfigError(f"pgd_step_size={step_size!r} must be a positive number or None")
        if not (math.isfinite(step_size) and step_size > 0):
            raise ConfigError(f"pgd_step_size={step_size!r} must be a positive number or None")
        step_size = float(step_size)
    return steps, step_size


def _validate_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    return seed


def _validate_corruptions(corruptions: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(corruptions, str):
        corruptions = [c.strip() for c in corruptions.split(",") if c.strip()]
    names = tuple(corruptions)
    if not names:
        raise ConfigError(f"corruptions is empty; choose from {', '.join(CORRUPTIONS)}")
    for name in names:
        if name not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    return tuple(dict.fromkeys(names))


def _validate_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ConfigError(f"severity={severity!r} must be an integer from 1 to 5")
    return severity


def _validate_severities(severities: Iterable[int]) -> tuple[int, ...]:
    values = tuple(_validate_severity(s) for s in severities)
    if not values:
        raise ConfigError("severities is empty; use e.g. (1, 2, 3, 4, 5)")
    return tuple(dict.fromkeys(values))


def _validate_kinds(kinds: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    names = tuple(k.strip().lower() for k in kinds)
    if not names:
        raise ConfigError(f"kinds is empty; choose from {', '.join(ROBUSTNESS_KINDS)}")
    for name in names:
        if name not in ROBUSTNESS_KINDS:
            raise ConfigError(f"unknown robustness kind {name!r}; choose from {', '.join(ROBUSTNESS_KINDS)}")
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------------------
# Adversarial attacks (captum.robust)
# --------------------------------------------------------------------------------------------------------------


class _PixelSpaceModel(nn.Module):
    """``model`` preceded by the preset normalisation, so attacks act on [0, 1] pixels."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model((pixels - self.mean) / self.std)


def _per_sample_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    # captum differentiates each element of the returned loss (torch.unbind), so it must be per sample.
    return F.cross_entropy(logits.float(), target, reduction="none")


def _pgd_step_size(eps: float, steps: int, step_size: float | None) -> float:
    return step_size if step_size is not None else 2.5 * eps / steps


@contextlib.contextmanager
def _preserved_rng(device: torch.device) -> Iterator[None]:
    """Run the block on a fork of the global RNG: the CPU generator and ``device``'s are restored afterwards.

    Besides PGD's random start, iterating a caller's DataLoader draws a base seed from the global CPU generator
    (even with ``shuffle=False``), so an evaluation would otherwise shift everyone else's random stream. With the
    fork, a loader that shuffles with the global generator sees the same stream on every call, so repeated
    evaluations also visit the samples in the same order.
    """
    cpu_state = torch.get_rng_state()
    restore_device: Callable[[], None] | None = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda_state = torch.cuda.get_rng_state(index)
        restore_device = functools.partial(torch.cuda.set_rng_state, cuda_state, index)
    elif device.type == "mps":
        mps_state = torch.mps.get_rng_state()
        restore_device = functools.partial(torch.mps.set_rng_state, mps_state)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if restore_device is not None:
            restore_device()


@contextlib.contextmanager
def _seeded_device_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the default generator of ``device`` for the block, on a fork of the global RNG (see _preserved_rng).

    captum's PGD draws its random start with ``torch.rand_like``, i.e. from the global generator of the input's
    device; seeding that generator on a fork makes the attack repeatable without disturbing anyone else's
    random stream.
    """
    with _preserved_rng(device):
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield


def _fgsm(wrapper: nn.Module, pixels: Tensor, labels: Tensor, eps: float) -> Tensor:
    from captum.robust import FGSM

    attack = FGSM(wrapper, loss_func=_per_sample_cross_entropy, lower_bound=0.0, upper_bound=1.0)
    # captum skips pixels whose |gradient| ≤ 1e-6; a confidently classified sample has tiny but informative
    # gradients, so only an exactly-zero gradient (sign 0) should leave a pixel unchanged, as in the FGSM paper.
    attack.zero_thresh = 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CAPTUM_GRAD_WARNING)
        adv = attack.perturb(pixels.detach().clone().requires_grad_(True), epsilon=eps, target=labels)
    return adv.detach()


def _pgd(
    wrapper: nn.Module,
    pixels: Tensor,
    labels: Tensor,
    eps: float,
    *,
    steps: int,
    step_size: float | None,
    seed: int,
) -> Tensor:
    from captum.robust import PGD

    attack = PGD(wrapper, loss_func=_per_sample_cross_entropy, lower_bound=0.0, upper_bound=1.0)
    attack.fgsm.zero_thresh = 0.0  # see _fgsm
    with warnings.catch_warnings(), _seeded_device_rng(pixels.device, seed):
        warnings.filterwarnings("ignore", message=_CAPTUM_GRAD_WARNING)
        adv = attack.perturb(
            pixels.detach().clone().requires_grad_(True),
            radius=eps,
            step_size=_pgd_step_size(eps, steps, step_size),
            step_num=steps,
            target=labels,
            random_start=True,
            norm="Linf",
        )
    return adv.detach()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own train/eval flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _prepare_pixels(pixels: Tensor, labels: Tensor, n_channels: int) -> None:
    if not isinstance(pixels, Tensor) or pixels.dim() != 4 or not pixels.is_floating_point():
        raise DataError("pixels must be a float tensor of shape (N, C, H, W) with values in [0, 1]")
    if pixels.shape[1] != n_channels:
        raise ConfigError(
            f"images have {pixels.shape[1]} channels but mean/std have {n_channels} values; "
            "pass the model preset's per-channel statistics"
        )
    if not isinstance(labels, Tensor) or labels.shape != pixels.shape[:1]:
        raise DataError("labels must be a tensor of shape (N,) matching the images")


def fgsm_perturb(
    model: nn.Module,
    pixels: Tensor,
    labels: Tensor,
    eps: float,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """FGSM adversarial images in pixel space: ``clamp(x + ε·sign(∇ₓ CE), 0, 1)`` via ``captum.robust.FGSM``.

    ``pixels`` are un-normalised images in [0, 1] on the model's device; ``mean``/``std`` are the normalisation
    the model expects (default: the model preset's), applied inside the attacked forward pass. The model runs in eval mode (its train/eval state is
    restored). Returns a detached tensor with ``|adv - pixels| ≤ ε`` and values in [0, 1].
    """
    mean_t, std_t = _stats_for(model, mean, std)
    eps = _validate_one_eps(eps, eps)
    _prepare_pixels(pixels, labels, len(mean_t))
    wrapper = _PixelSpaceModel(model, mean_t, std_t).to(pixels.device)
    with _eval_mode(model):
        return _fgsm(wrapper, pixels.float(), labels, eps)


def pgd_perturb(
    model: nn.Module,
    pixels: Tensor,
    labels: Tensor,
    eps: float,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
) -> Tensor:
    """L∞ PGD adversarial images in pixel space via ``captum.robust.PGD`` (Madry et al. 2018).

    Starts from a uniform random point of the ε-ball (seeded by ``seed``; the device's global RNG state is
    restored afterwards), then takes ``steps`` signed-gradient steps of size ``step_size`` (default
    ``2.5·ε/steps``, Madry-style, so the walk can cross the ball), projecting onto the ε-ball and [0, 1] after
    each. Inputs and outputs are as for :func:`fgsm_perturb`.
    """
    mean_t, std_t = _stats_for(model, mean, std)
    eps = _validate_one_eps(eps, eps)
    steps, step_size = _validate_pgd(steps, step_size)
    seed = _validate_seed(seed)
    _prepare_pixels(pixels, labels, len(mean_t))
    wrapper = _PixelSpaceModel(model, mean_t, std_t).to(pixels.device)
    with _eval_mode(model):
        return _pgd(wrapper, pixels.float(), labels, eps, steps=steps, step_size=step_size, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Common corruptions on tensors
# --------------------------------------------------------------------------------------------------------------


def corruption_table_for(height: int, width: int) -> Literal["cifar10-c", "imagenet-c"]:
    """Which severity table applies: ``"cifar10-c"`` when the largest side is ≤ 64 px, else ``"imagenet-c"``.

    CIFAR-10-C's parameters were tuned for 32×32 images and ImageNet-C's for 224×224; a small image corrupted with
    ImageNet-C strengths would be destroyed, a large one with CIFAR strengths barely touched.
    """
    return "cifar10-c" if max(int(height), int(width)) <= SMALL_IMAGE_MAX_SIDE else "imagenet-c"


def rgb_to_hsv(images: Tensor) -> Tensor:
    """RGB → HSV for float tensors ``(..., 3, H, W)`` in [0, 1]; hue is in [0, 1) (as in scikit-image).

    Hue ties are resolved like ``skimage.color.rgb2hsv`` (blue over green over red); grey pixels get hue 0 and
    black pixels saturation 0.
    """
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ConfigError(f"rgb_to_hsv needs 3 channels at dim -3, got shape {tuple(images.shape)}")
    r, g, b = images.unbind(dim=-3)
    value = torch.maximum(torch.maximum(r, g), b)
    delta = value - torch.minimum(torch.minimum(r, g), b)
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)
    saturation = torch.where(
        grey, torch.zeros_like(delta), delta / torch.where(grey, torch.ones_like(value), value)
    )
    hue = (g - b) / safe_delta
    hue = torch.where(g == value, 2.0 + (b - r) / safe_delta, hue)
    hue = torch.where(b == value, 4.0 + (r - g) / safe_delta, hue)
    hue = torch.remainder(hue / 6.0, 1.0)
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack((hue, saturation, value), dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV → RGB, the inverse of :func:`rgb_to_hsv` (the six-sector formula of ``skimage.color.hsv2rgb``)."""
    if hsv.dim() < 3 or hsv.shape[-3] != 3:
        raise ConfigError(f"hsv_to_rgb needs 3 channels at dim -3, got shape {tuple(hsv.shape)}")
    h, s, v = hsv.unbind(dim=-3)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = torch.remainder(sector, 6).long().unsqueeze(0)
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    r = torch.stack((v, q, p, p, t, v)).gather(0, sector).squeeze(0)
    g = torch.stack((t, v, v, q, p, p)).gather(0, sector).squeeze(0)
    b = torch.stack((p, p, t, v, v, q)).gather(0, sector).squeeze(0)
    return torch.stack((r, g, b), dim=-3)


def _gaussian_kernel_1d(ksize: int, sigma: float) -> Tensor:
    offsets = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma * sigma))
    return weights / weights.sum()


@functools.lru_cache(maxsize=64)
def _disk_kernel_cached(radius: float, alias_blur: float) -> Tensor:
    if radius <= 8:
        coords = torch.arange(-8, 9, dtype=torch.float64)
        ksize = 3
    else:
        coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
        ksize = 5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).to(torch.float64)
    disk = disk / disk.sum()
    # Anti-alias the disk with a separable Gaussian (cv2.GaussianBlur: explicit sigma, reflect-101 border).
    g = _gaussian_kernel_1d(ksize, alias_blur)
    pad = ksize // 2
    img = F.pad(disk[None, None], (pad, pad, pad, pad), mode="reflect")
    img = F.conv2d(img, g.view(1, 1, 1, ksize))
    img = F.conv2d(img, g.view(1, 1, ksize, 1))
    kernel = img[0, 0]
    # Drop all-zero outer rows/columns: same filter, smaller convolution (and it fits small images).
    rows = torch.nonzero(kernel.abs().sum(dim=1)).flatten()
    cols = torch.nonzero(kernel.abs().sum(dim=0)).flatten()
    radius_r = max(int(rows.max()) - kernel.shape[0] // 2, kernel.shape[0] // 2 - int(rows.min()))
    radius_c = max(int(cols.max()) - kernel.shape[1] // 2, kernel.shape[1] // 2 - int(cols.min()))
    keep = max(radius_r, radius_c)
    centre = kernel.shape[0] // 2
    return kernel[centre - keep : centre + keep + 1, centre - keep : centre + keep + 1].contiguous()


def disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The defocus kernel of ImageNet-C: a normalised disk of ``radius`` px, anti-aliased by a Gaussian.

    As in the reference, the disk lives on a 17×17 grid (radius ≤ 8; 3×3 Gaussian) or a ``2r+1`` grid (5×5
    Gaussian); all-zero borders are trimmed. Returns a float64 ``(k, k)`` tensor, symmetric, summing to ≈ 1.
    """
    if not (math.isfinite(radius) and radius > 0 and math.isfinite(alias_blur) and alias_blur > 0):
        raise ConfigError(f"disk_kernel needs radius > 0 and alias_blur > 0, got {radius!r}, {alias_blur!r}")
    return _disk_kernel_cached(float(radius), float(alias_blur)).clone()


def _filter2d(images: Tensor, kernel: Tensor) -> Tensor:
    """Depthwise 2-D filtering with a reflect-101 border (OpenCV's default), keeping the image size."""
    channels = images.shape[1]
    k = kernel.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < min(images.shape[-2:]) else "replicate"
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    weight = kernel.to(device=images.device, dtype=images.dtype).expand(channels, 1, k, k)
    return F.conv2d(padded, weight, groups=channels)


@functools.lru_cache(maxsize=64)
def _pil_box_weights(in_size: int, out_size: int) -> Tensor:
    """The ``(out, in)`` matrix of Pillow's BOX resampling along one axis (float64).

    Pillow samples the box filter at input pixel centres over the output pixel's footprint (support 0.5 × scale,
    never less than one input pixel); downscaling averages the covered pixels, upscaling picks the nearest one.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out_index in range(out_size):
        centre = (out_index + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), in_size)
        row = [
            1.0 if -0.5 < (x - centre + 0.5) / filterscale <= 0.5 else 0.0  # box(x) on (-0.5, 0.5]
            for x in range(lo, hi)
        ]
        total = sum(row)
        if total > 0:
            weights[out_index, lo:hi] = torch.tensor(row, dtype=torch.float64) / total
    return weights


def _pixelate(images: Tensor, factor: float) -> Tensor:
    height, width = images.shape[-2:]
    small_h, small_w = max(1, int(height * factor)), max(1, int(width * factor))
    rows = _pil_box_weights(small_h, height) @ _pil_box_weights(height, small_h)  # (H, H): down then up
    cols = _pil_box_weights(small_w, width) @ _pil_box_weights(width, small_w)  # (W, W)
    rows = rows.to(device=images.device, dtype=images.dtype)
    cols = cols.to(device=images.device, dtype=images.dtype)
    return rows @ images @ cols.T


def _jpeg(images: Tensor, quality: int) -> Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

    if images.shape[1] not in (1, 3):
        raise DataError(f"jpeg_compression needs 1 or 3 channels, got {images.shape[1]}")
    if images.shape[0] == 0:
        return images.clone()
    as_bytes = (images * 255.0).round().clamp(0, 255).to(torch.uint8).cpu()
    encoded = encode_jpeg(list(as_bytes.unbind(0)), quality=int(quality))
    decoded = decode_jpeg(encoded, mode=ImageReadMode.UNCHANGED)
    return torch.stack(decoded).to(device=images.device, dtype=images.dtype) / 255.0


def _brightness(images: Tensor, amount: float) -> Tensor:
    if images.shape[1] == 1:  # grey: H and S are 0, the value is the intensity itself
        return (images + amount).clamp(0.0, 1.0)
    if images.shape[1] != 3:
        raise DataError(f"brightness needs 1 or 3 channels, got {images.shape[1]}")
    hsv = rgb_to_hsv(images.clamp(0.0, 1.0))
    h, s, v = hsv.unbind(dim=1)
    return hsv_to_rgb(torch.stack((h, s, (v + amount).clamp(0.0, 1.0)), dim=1))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generator: draw on the CPU and move
        generator = torch.Generator()
    return generator.manual_seed(seed)


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0) -> Tensor:
    """Apply one common corruption at ``severity`` (1–5) to a batch of images in [0, 1].

    ``images``: float tensor ``(N, C, H, W)`` (or a single ``(C, H, W)`` image) on any device. The parameter
    table is chosen by :func:`corruption_table_for` (largest side ≤ 64 px → CIFAR-10-C, else ImageNet-C).
    Semantics follow the reference implementation:

    * ``gaussian_noise``: ``x + N(0, σ²)``; ``shot_noise``: ``Poisson(x·λ)/λ``; ``impulse_noise``: each value
      becomes 0 or 1 (equal odds) with the table's probability, per channel, as ``skimage``'s ``s&p``.
    * ``defocus_blur``: :func:`disk_kernel` filter, reflect-101 border, per channel.
    * ``contrast``: ``(x − m)·c + m`` with ``m`` the per-image, per-channel mean.
    * ``brightness``: add to V in HSV (grey images: to the intensity).
    * ``jpeg_compression``: a real JPEG encode/decode at the table's quality (libjpeg on the CPU, via torchvision).
    * ``pixelate``: Pillow-BOX resize to ``int(side·c)`` and BOX back up (which is nearest-neighbour).

    The noise corruptions draw from a ``torch.Generator`` seeded with ``seed`` on the images' device, so equal
    inputs and seed give equal outputs (on the same device type); the global RNG is not touched. The result has
    the input's shape and dtype, clamped to [0, 1]. Unlike the published datasets, values are not quantised to
    8 bits (except by JPEG itself).
    """
    if name not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    severity = _validate_severity(severity)
    seed = _validate_seed(seed)
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() not in (3, 4):
        raise DataError("images must be a float tensor (N, C, H, W) or (C, H, W) with values in [0, 1]")
    single = images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    work_dtype = torch.promote_types(batch.dtype, torch.float32)
    x = batch.to(work_dtype)
    table = CORRUPTION_TABLES[corruption_table_for(*x.shape[-2:])]
    param = table[name][severity - 1]

    if name in ("gaussian_noise", "shot_noise", "impulse_noise"):
        generator = _generator(x.device, seed)
        drawn_on = generator.device
        if name == "gaussian_noise":
            noise = torch.randn(x.shape, generator=generator, device=drawn_on, dtype=work_dtype)
            out = x + noise.to(x.device) * param
        elif name == "shot_noise":
            rate = (x.clamp(0.0, 1.0) * param).to(drawn_on)
            out = (torch.poisson(rate, generator=generator) / param).to(x.device)
        else:
            u = torch.rand(x.shape, generator=generator, device=drawn_on, dtype=work_dtype).to(x.device)
            out = torch.where(u < param / 2, torch.zeros_like(x), x)
            out = torch.where((u >= param / 2) & (u < param), torch.ones_like(x), out)
    elif name == "defocus_blur":
        radius, alias_blur = param
        out = _filter2d(x, _disk_kernel_cached(float(radius), float(alias_blur)))
    elif name == "contrast":
        means = x.mean(dim=(-2, -1), keepdim=True)
        out = (x - means) * param + means
    elif name == "brightness":
        out = _brightness(x, param)
    elif name == "jpeg_compression":
        out = _jpeg(x.clamp(0.0, 1.0), param)
    else:  # pixelate
        out = _pixelate(x, param)

    out = out.clamp(0.0, 1.0).to(batch.dtype)
    return out.squeeze(0) if single else out


# --------------------------------------------------------------------------------------------------------------
# Evaluation over a loader
# --------------------------------------------------------------------------------------------------------------


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the run seed and what is being randomised (batch, ε, corruption...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


@dataclass
class _Counts:
    samples: int
    clean: int
    fgsm: list[int]
    pgd: list[int]
    corruptions: list[list[int]]
    table: str | None


def _run(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    fgsm_eps: Sequence[float],
    pgd_eps: Sequence[float],
    corruptions: Sequence[str],
    severities: Sequence[int],
    pgd_steps: int,
    pgd_step_size: float | None,
    max_samples: int | None,
    device: str | torch.device,
    seed: int,
    progress: ProgressFn | None,
    cancel: CancelToken | None,
    what: str,
) -> _Counts:
    """One pass over the loader: clean, FGSM, PGD and corruption correct-counts, accumulated on the device."""
    dev = resolve_device(device)
    model.to(dev)
    wrapper = _PixelSpaceModel(model, mean, std).to(dev)
    mean_t = wrapper.mean
    std_t = wrapper.std
    size = _dataset_size(loader)
    if max_samples is None:
        total = size
    else:  # with an unsized loader, max_samples is an upper bound
        total = max_samples if size is None else min(size, max_samples)
    report: Callable[[int, int | None, str], None] = progress or (lambda done, total, message: None)

    clean = torch.zeros((), dtype=torch.long, device=dev)
    fgsm = torch.zeros(len(fgsm_eps), dtype=torch.long, device=dev)
    pgd = torch.zeros(len(pgd_eps), dtype=torch.long, device=dev)
    corr = torch.zeros(len(corruptions), len(severities), dtype=torch.long, device=dev)
    samples = 0
    table: str | None = None

    report(0, total, f"{what}: starting")
    with _eval_mode(model), _preserved_rng(dev):
        for batch_index, images, labels in _batches(loader, max_samples):
            check_cancel(cancel, what)
            if images.shape[1] != len(mean):
                raise ConfigError(
                    f"the loader yields {images.shape[1]}-channel images but mean/std have {len(mean)} values; "
                    "pass the model preset's per-channel statistics"
                )
            x = images.to(dev, non_blocking=True).float()
            y = labels.to(dev, non_blocking=True).long()
            with torch.no_grad():
                batch_clean = (model(x).argmax(dim=1) == y).sum()
            clean += batch_clean
            pixels = (x * std_t + mean_t).clamp(0.0, 1.0)

            for k, eps in enumerate(fgsm_eps):
                if eps == 0:
                    fgsm[k] += batch_clean
                    continue
                adv = _fgsm(wrapper, pixels, y, eps)
                with torch.no_grad():
                    fgsm[k] += (wrapper(adv).argmax(dim=1) == y).sum()
            for k, eps in enumerate(pgd_eps):
                check_cancel(cancel, what)
                if eps == 0:
                    pgd[k] += batch_clean
                    continue
                adv = _pgd(
                    wrapper,
                    pixels,
                    y,
                    eps,
                    steps=pgd_steps,
                    step_size=pgd_step_size,
                    seed=_derive_seed(seed, "pgd", batch_index, eps),
                )
                with torch.no_grad():
                    pgd[k] += (wrapper(adv).argmax(dim=1) == y).sum()
            if corruptions:
                table = corruption_table_for(*pixels.shape[-2:])
                with torch.no_grad():
                    for i, name in enumerate(corruptions):
                        check_cancel(cancel, what)
                        for j, severity in enumerate(severities):
                            corrupted = corrupt(
                                pixels, name, severity, seed=_derive_seed(seed, name, severity, batch_index)
                            )
                            corr[i, j] += (wrapper(corrupted).argmax(dim=1) == y).sum()

            samples += int(images.shape[0])
            report(samples, total, f"{what}: {samples}" + (f"/{total}" if total else "") + " samples")

    if samples == 0:
        raise DataError("the loader yielded no samples; check the data folder and max_samples")
    return _Counts(
        samples=samples,
        clean=int(clean.item()),
        fgsm=fgsm.tolist(),
        pgd=pgd.tolist(),
        corruptions=corr.tolist(),
        table=table,
    )


def _percent(correct: int, samples: int) -> float:
    return 100.0 * correct / samples


def _corruption_results(
    counts: _Counts, corruptions: Sequence[str], severities: Sequence[int]
) -> tuple[dict[str, dict[int, float]], dict[int, float]]:
    per = {
        name: {sev: _percent(counts.corruptions[i][j], counts.samples) for j, sev in enumerate(severities)}
        for i, name in enumerate(corruptions)
    }
    mean_per_severity = {
        sev: sum(per[name][sev] for name in corruptions) / len(corruptions) for sev in severities
    }
    return per, mean_per_severity


def adversarial_accuracy(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    attack: Literal["fgsm", "pgd"],
    eps: Sequence[float],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    max_samples: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> dict[float, float]:
    """Top-1 accuracy (%) under an L∞ attack for each budget: ``{ε: accuracy}``.

    ``loader`` yields ``(images, labels)`` with images normalised by ``mean``/``std`` (default: the model
    preset's, as :func:`cka_analysis.data.load_dataset` applies them). The attack works in pixel space: images are mapped back to [0, 1], perturbed by ``captum.robust.FGSM`` or
    ``captum.robust.PGD`` against a wrapper that normalises inside, with cross-entropy on the logits, and kept
    in [0, 1]. ε is in pixel units (``8/255`` = eight grey levels). ε = 0 is the clean accuracy exactly (no attack).

    PGD: ``pgd_steps`` steps of size ``pgd_step_size`` (default ``2.5·ε/pgd_steps``, Madry-style) from a
    uniformly random start in the ε-ball; the start is seeded from ``seed``, the batch index and ε, so a run is
    repeatable, and the global RNG (CPU and ``device``) is left as it was, also by the loader's iteration.
    ``max_samples`` evaluates the first N samples in loader
    order. The model is moved to ``device`` and put in eval mode; its train/eval state is restored afterwards.
    ``progress(done, total, message)`` is called after each batch; a set ``cancel`` token raises Cancelled.
    """
    if attack not in ATTACKS:
        raise ConfigError(f"attack={attack!r} is not supported; choose one of {', '.join(ATTACKS)}")
    eps_list = _validate_eps_list(eps)
    mean_t, std_t = _stats_for(model, mean, std)
    steps, step_size = _validate_pgd(pgd_steps, pgd_step_size)
    counts = _run(
        model,
        loader,
        mean=mean_t,
        std=std_t,
        fgsm_eps=eps_list if attack == "fgsm" else [],
        pgd_eps=eps_list if attack == "pgd" else [],
        corruptions=(),
        severities=(),
        pgd_steps=steps,
        pgd_step_size=step_size,
        max_samples=_validate_max_samples(max_samples),
        device=device,
        seed=_validate_seed(seed),
        progress=progress,
        cancel=cancel,
        what=f"{attack.upper()} accuracy",
    )
    correct = counts.fgsm if attack == "fgsm" else counts.pgd
    return {e: _percent(c, counts.samples) for e, c in zip(eps_list, correct, strict=True)}


def corruption_accuracy(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    max_samples: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy (%) under common corruptions (see :func:`corrupt`) for each name and severity.

    Returns ``{"per_corruption": {name: {severity: acc}}, "mean_per_severity": {severity: mean acc over the
    corruptions}}``. Images from the (normalised) loader are mapped to pixel space, corrupted, and normalised again
    for the model. Noise is seeded from ``seed``, the corruption, the severity and the batch index. Model handling,
    ``max_samples``, ``progress`` and ``cancel`` are as in :func:`adversarial_accuracy`.
    """
    names = _validate_corruptions(corruptions)
    sevs = _validate_severities(severities)
    mean_t, std_t = _stats_for(model, mean, std)
    counts = _run(
        model,
        loader,
        mean=mean_t,
        std=std_t,
        fgsm_eps=[],
        pgd_eps=[],
        corruptions=names,
        severities=sevs,
        pgd_steps=1,
        pgd_step_size=None,
        max_samples=_validate_max_samples(max_samples),
        device=device,
        seed=_validate_seed(seed),
        progress=progress,
        cancel=cancel,
        what="corruption accuracy",
    )
    per, mean_per_severity = _corruption_results(counts, names, sevs)
    return {"per_corruption": per, "mean_per_severity": mean_per_severity}


def evaluate_robustness(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    kinds: Sequence[str] = ROBUSTNESS_KINDS,
    eps: Sequence[float] = DEFAULT_EPS,
    max_samples: int | None = None,
    device: str | torch.device = "auto",
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Clean accuracy plus the requested robustness measures, in one pass over the loader (JSON-ready).

    ``kinds`` ⊆ ``("fgsm", "pgd", "corruptions")`` (a comma-separated string works too). Returns
    ``{"clean_accuracy", "fgsm": {ε: acc}, "pgd": {ε: acc}, "corruptions": {name: {severity: acc}},
    "corruption_mean_per_severity": {severity: acc}, "samples", "settings"}`` with only the requested kinds;
    accuracies are top-1 in %. Dict keys are floats/ints (``json.dumps`` turns them into strings). ``settings``
    records everything needed to reproduce the numbers. Semantics of each part: :func:`adversarial_accuracy`
    (defaults: ε ∈ {1,2,4,8}/255, ``pgd_steps=10``, step size ``2.5·ε/pgd_steps``, random start) and
    :func:`corruption_accuracy` (all eight corruptions, severities 1–5). ``mean``/``std`` default to the model
    preset's. ``max_samples`` caps the evaluation at the first N samples in loader order.
    """
    kinds_t = _validate_kinds(kinds)
    mean_t, std_t = _stats_for(model, mean, std)
    wants_attack = "fgsm" in kinds_t or "pgd" in kinds_t
    eps_list = _validate_eps_list(eps) if wants_attack else []
    steps, step_size = _validate_pgd(pgd_steps, pgd_step_size)
    samples_cap = _validate_max_samples(max_samples)
    seed = _validate_seed(seed)
    dev = resolve_device(device)
    counts = _run(
        model,
        loader,
        mean=mean_t,
        std=std_t,
        fgsm_eps=eps_list if "fgsm" in kinds_t else [],
        pgd_eps=eps_list if "pgd" in kinds_t else [],
        corruptions=CORRUPTIONS if "corruptions" in kinds_t else (),
        severities=SEVERITIES if "corruptions" in kinds_t else (),
        pgd_steps=steps,
        pgd_step_size=step_size,
        max_samples=samples_cap,
        device=dev,
        seed=seed,
        progress=progress,
        cancel=cancel,
        what="robustness",
    )
    result: dict[str, Any] = {"clean_accuracy": _percent(counts.clean, counts.samples)}
    if "fgsm" in kinds_t:
        result["fgsm"] = {e: _percent(c, counts.samples) for e, c in zip(eps_list, counts.fgsm, strict=True)}
    if "pgd" in kinds_t:
        result["pgd"] = {e: _percent(c, counts.samples) for e, c in zip(eps_list, counts.pgd, strict=True)}
    if "corruptions" in kinds_t:
        per, mean_per_severity = _corruption_results(counts, CORRUPTIONS, SEVERITIES)
        result["corruptions"] = per
        result["corruption_mean_per_severity"] = mean_per_severity
    result["samples"] = counts.samples
    settings: dict[str, Any] = {
        "kinds": list(kinds_t),
        "mean": list(mean_t),
        "std": list(std_t),
        "max_samples": samples_cap,
        "seed": seed,
        "device": str(dev),
    }
    if wants_attack:
        settings.update(
            {
                "eps": eps_list,
                "eps_units": "pixel values in [0, 1]",
                "norm": "Linf",
                "loss": "cross-entropy on logits",
            }
        )
    if "pgd" in kinds_t:
        settings.update(
            {
                "pgd_steps": steps,
                "pgd_step_size": step_size if step_size is not None else "2.5*eps/pgd_steps",
                "pgd_random_start": True,
            }
        )
    if "corruptions" in kinds_t:
        settings.update(
            {
                "corruptions": list(CORRUPTIONS),
                "severities": list(SEVERITIES),
                "corruption_table": counts.table,
                "corruption_table_rule": f"largest side <= {SMALL_IMAGE_MAX_SIDE} px: cifar10-c, else imagenet-c",
            }
        )
    result["settings"] = settings
    return result
