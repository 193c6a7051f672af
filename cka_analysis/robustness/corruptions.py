"""Common corruptions on image tensors, in the style of CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich, ICLR 2019).

Eight corruptions at severities 1–5, implemented on batched torch tensors so that they run on the evaluation device.
The severity parameters are the published tables; which table applies is chosen from the image size (largest side
≤ 64 px → the CIFAR-10-C table, otherwise the ImageNet-C table). The noise corruptions draw from a local
``torch.Generator`` seeded by the caller, never from the process-wide RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from ..errors import ConfigError, DataError
from ._common import check_names, check_seed, device_generator

__all__ = [
    "CORRUPTIONS",
    "CORRUPTION_TABLES",
    "SEVERITIES",
    "SMALL_IMAGE_MAX_SIDE",
    "corrupt",
    "corruption_table_for",
    "disk_kernel",
    "hsv_to_rgb",
    "rgb_to_hsv",
]

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


def check_corruptions(corruptions: Iterable[str] | str) -> tuple[str, ...]:
    """Corruption names (a sequence or a comma-separated string), validated and de-duplicated in order."""
    return check_names(corruptions, CORRUPTIONS, field="corruptions", item="corruption")


def check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ConfigError(f"severity={severity!r} must be an integer from 1 to 5")
    return severity


def check_severities(severities: Iterable[int]) -> tuple[int, ...]:
    values = tuple(check_severity(s) for s in severities)
    if not values:
        raise ConfigError("severities is empty; use e.g. (1, 2, 3, 4, 5)")
    return tuple(dict.fromkeys(values))



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
    severity = check_severity(severity)
    seed = check_seed(seed)
    if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() not in (3, 4):
        raise DataError("images must be a float tensor (N, C, H, W) or (C, H, W) with values in [0, 1]")
    single = images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    work_dtype = torch.promote_types(batch.dtype, torch.float32)
    x = batch.to(work_dtype)
    table = CORRUPTION_TABLES[corruption_table_for(*x.shape[-2:])]
    param = table[name][severity - 1]

    if name in ("gaussian_noise", "shot_noise", "impulse_noise"):
        generator = device_generator(x.device, seed)
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

