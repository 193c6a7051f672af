"""Adversarial attacks in pixel space: L∞ FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018).

The attacks are ``captum.robust.FGSM`` / ``captum.robust.PGD``. Loaders in this project yield images that are
already normalised with the model preset's ``mean``/``std``; the functions here take un-normalised pixels in
[0, 1] and attack a wrapper (:class:`PixelSpaceModel`) that normalises inside the forward pass. So ε is measured
in pixel units of [0, 1] (8/255 means eight grey levels), every adversarial image stays in [0, 1], and the loss is
the cross-entropy of the logits. PGD's random start is drawn from a local generator seeded by the caller; the
process-wide RNG is neither read nor seeded nor restored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from captum.robust import FGSM, PGD
from torch import Tensor, nn

from ..device import eval_mode
from ..errors import ConfigError, DataError
from ..models.preset import get_preset
from ._common import check_seed, device_generator

__all__ = [
    "ATTACKS",
    "DEFAULT_EPS",
    "PixelSpaceModel",
    "check_eps",
    "fgsm_perturb",
    "normalisation_of",
    "parse_eps",
    "pgd_perturb",
]

ATTACKS: tuple[str, ...] = ("fgsm", "pgd")
#: The default L∞ budgets, in pixel units of [0, 1]: 1, 2, 4 and 8 grey levels.
DEFAULT_EPS: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)

_CAPTUM_GRAD_WARNING = r"Input Tensor \d+ did not already require gradients"



# --------------------------------------------------------------------------------------------------------------
# Arguments
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


def check_eps(eps: Sequence[float] | float | str) -> list[float]:
    """Budgets as a list of floats in [0, 1] from a list, one number, or a string for :func:`parse_eps`."""
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


def normalisation_of(
    model: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation to undo/redo around attacks: ``mean``/``std`` if given, else the model preset's."""
    if mean is None and std is None:

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


def check_pgd(steps: int, step_size: float | None) -> tuple[int, float | None]:
    """PGD's step count (≥ 1) and step size (> 0, or None for the default ``2.5·ε/steps``), validated."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"pgd_steps={steps!r} must be a positive integer (10 is usual)")
    if step_size is not None:
        if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
            raise ConfigError(f"pgd_step_size={step_size!r} must be a positive number or None")
        if not (math.isfinite(step_size) and step_size > 0):
            raise ConfigError(f"pgd_step_size={step_size!r} must be a positive number or None")
        step_size = float(step_size)
    return steps, step_size



# --------------------------------------------------------------------------------------------------------------
# Attacks (captum.robust)
# --------------------------------------------------------------------------------------------------------------


class PixelSpaceModel(nn.Module):
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


def run_fgsm(wrapper: nn.Module, pixels: Tensor, labels: Tensor, eps: float) -> Tensor:
    """FGSM images for validated arguments: ``wrapper`` is a :class:`PixelSpaceModel` in eval mode."""

    attack = FGSM(wrapper, loss_func=_per_sample_cross_entropy, lower_bound=0.0, upper_bound=1.0)
    # captum skips pixels whose |gradient| ≤ 1e-6; a confidently classified sample has tiny but informative
    # gradients, so only an exactly-zero gradient (sign 0) should leave a pixel unchanged, as in the FGSM paper.
    attack.zero_thresh = 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CAPTUM_GRAD_WARNING)
        adv = attack.perturb(pixels.detach().clone().requires_grad_(True), epsilon=eps, target=labels)
    return adv.detach()


def _linf_random_point(generator: torch.Generator, center: Tensor, radius: float, norm: str,
                       mask: Tensor | int) -> Tensor:
    """captum's L∞ random start, ``center + U(−r, r)·mask``, drawn from ``generator`` instead of the global RNG."""
    if norm != "Linf":
        raise ConfigError(f"norm={norm!r}: only the L∞ random start is implemented")
    u = torch.rand(center.shape, generator=generator, device=generator.device, dtype=center.dtype)
    return center + ((u.to(center.device) * radius * 2 - radius) * mask)


def run_pgd(wrapper: nn.Module, pixels: Tensor, labels: Tensor, eps: float, *, steps: int, step_size: float | None,
        seed: int) -> Tensor:
    """PGD images for validated arguments (see :func:`run_fgsm`); the random start is seeded by ``seed``."""

    attack = PGD(wrapper, loss_func=_per_sample_cross_entropy, lower_bound=0.0, upper_bound=1.0)
    attack.fgsm.zero_thresh = 0.0  # see run_fgsm
    # captum draws the start with torch.rand_like (the process-wide generator); this instance draws from its own
    generator = device_generator(pixels.device, seed)
    attack._random_point = lambda *args: _linf_random_point(generator, *args)  # type: ignore[method-assign]
    with warnings.catch_warnings():
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


def _pixel_model(model: nn.Module, pixels: Tensor, labels: Tensor, mean: Sequence[float] | None,
                 std: Sequence[float] | None) -> PixelSpaceModel:
    """``model`` behind its normalisation, on the pixels' device, after checking the pixels and labels."""
    mean_t, std_t = normalisation_of(model, mean, std)
    _prepare_pixels(pixels, labels, len(mean_t))
    return PixelSpaceModel(model, mean_t, std_t).to(pixels.device)


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
    the model expects (default: the model preset's), applied inside the attacked forward pass. The model runs in
    eval mode (its train/eval state is restored). Returns a detached tensor with ``|adv - pixels| ≤ ε`` and values
    in [0, 1].
    """
    wrapper = _pixel_model(model, pixels, labels, mean, std)
    eps = _validate_one_eps(eps, eps)
    with eval_mode(model):
        return run_fgsm(wrapper, pixels.float(), labels, eps)


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

    Starts from a uniform random point of the ε-ball (drawn from a local generator seeded by ``seed``; the
    process-wide RNG is not touched), then takes ``steps`` signed-gradient steps of size ``step_size`` (default
    ``2.5·ε/steps``, Madry-style, so the walk can cross the ball), projecting onto the ε-ball and [0, 1] after
    each. Inputs and outputs are as for :func:`fgsm_perturb`.
    """
    wrapper = _pixel_model(model, pixels, labels, mean, std)
    eps = _validate_one_eps(eps, eps)
    steps, step_size = check_pgd(steps, step_size)
    seed = check_seed(seed)
    with eval_mode(model):
        return run_pgd(wrapper, pixels.float(), labels, eps, steps=steps, step_size=step_size, seed=seed)

