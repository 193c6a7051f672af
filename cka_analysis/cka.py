"""Centered Kernel Alignment (CKA): the similarity measure behind the heatmaps and the pruning criterion.

* :func:`linear_cka` and :func:`rbf_cka` compare two representations of the same n examples
  (Kornblith et al., ICML 2019), with an optional debiased estimator built on the unbiased HSIC of
  Song et al. (JMLR 2012).
* :class:`MinibatchCKA` streams CKA between many layers over many batches (Nguyen et al., ICLR 2021): one Gram
  matrix per layer per batch, every pair in one matrix product, unbiased HSIC summed in float64, so that the
  value does not depend on the batch size and accumulators from several processes can be merged.
* :func:`cka_matrix` is the layer × layer heatmap of one model (or model A vs model B) over a data loader.

Numerics: features are centred per batch in float64 before any product. Uncentred float32 ReLU features make the
HSIC estimate cancel catastrophically (it goes negative and CKA becomes NaN). When a representation has no
variance (a constant or dead layer) or the unbiased estimator is degenerate for it (0/0), CKA is defined as 0
rather than NaN or a ratio of rounding residues; values are clipped to [0, 1] (biased) or [−1, 1] (debiased).
NaN or Inf activations are a ConfigError, never a silent number. Tests: tests/test_cka_properties.py.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .capture import ActivationCapture
from .device import accumulation_device, autocast, resolve_device
from .errors import ConfigError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

__all__ = [
    "CKAMatrix",
    "CKAOptions",
    "MinibatchCKA",
    "cka_matrix",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "linear_cka",
    "rbf_cka",
]

MIN_SAMPLES = 4  # the unbiased HSIC divides by n(n-3)


def _as_2d_float64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """(n, ...) array → (n, features) float64 tensor; everything after the first axis is flattened."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise ConfigError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.dim() < 1 or t.shape[0] == 0:
        raise ConfigError(f"{name} must have shape (n, ...) with n ≥ 1, got {tuple(t.shape)}")
    if t.device.type == "mps":
        t = t.cpu()
    return t.reshape(t.shape[0], -1).to(torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor, *, debiased: bool) -> None:
    if x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"x and y must describe the same examples: x has {x.shape[0]} rows, y has {y.shape[0]}"
        )
    n = x.shape[0]
    need = MIN_SAMPLES if debiased else 2
    if n < need:
        raise ConfigError(
            f"CKA needs at least {need} examples{' for the debiased estimator' if debiased else ''}, got {n}"
        )
    if not torch.isfinite(x).all() or not torch.isfinite(y).all():
        raise ConfigError("x or y contains NaN or Inf values; CKA is undefined for them")


def _center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _center_scale(x: torch.Tensor) -> torch.Tensor:
    """Centre the features, zero those that are constant up to rounding, then divide by the largest magnitude.

    * A constant feature does not centre to exactly 0: the rounding error of its mean is left (~1e-17). Without
      the zeroing, a constant representation made of such residues gave an arbitrary CKA (the debiased estimate
      of a constant layer came out as −0.07 instead of 0). A feature whose spread is below what the mean's
      rounding can produce (4·n·eps of its magnitude) carries no information and is set to 0.
    * CKA does not change under isotropic scaling, but its fourth-order sums (‖XᵀX‖²·‖YᵀY‖²) overflow or
      underflow float64 for features beyond about 1e±75, which silently turned CKA into 0.
    * Centring before the RBF kernel keeps the pairwise distances of near-constant features from cancelling.
    """
    x = _center_clean(x)
    peak = x.abs().max()
    return x / peak if peak > 0 else x


def _center_clean(x: torch.Tensor) -> torch.Tensor:
    """Centre (n, d) features and set to 0 those whose spread is within the rounding error of their mean.

    Centring twice removes the residual mean that the rounding of a large offset leaves (~eps·offset): the
    unbiased estimator assumes columns that sum to 0, and that residue was enough to turn an exact 0 into 1e-7.
    """
    size = x.abs().amax(dim=0)
    x = _center(_center(x))
    spread = x.abs().amax(dim=0)
    return x * (spread > 4 * x.shape[0] * torch.finfo(x.dtype).eps * size)


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel Gram matrix K = X Xᵀ."""
    return x @ x.T


def _median(v: torch.Tensor) -> torch.Tensor:
    """Median as numpy defines it (mean of the two middle values for an even count)."""
    n = v.numel()
    lo = torch.kthvalue(v, (n + 1) // 2).values
    hi = torch.kthvalue(v, n // 2 + 1).values
    return (lo + hi) / 2


def gram_rbf(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Gaussian kernel Gram matrix with σ = threshold · sqrt(median squared distance) (Kornblith et al. 2019).

    The median is taken over the full n × n matrix of squared distances, diagonal included, as in the paper's code.
    """
    if threshold <= 0:
        raise ConfigError(f"threshold={threshold} must be positive")
    dots = x @ x.T
    sq_norms = torch.diagonal(dots)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * dots).clamp_min(0)
    sq_median = _median(sq_dist.flatten())
    if sq_median <= 0:
        # every point identical: the kernel is constant and carries no information
        return torch.ones_like(sq_dist)
    return torch.exp(-sq_dist / (2 * threshold**2 * sq_median))


def _center_gram(k: torch.Tensor) -> torch.Tensor:
    """H K H: the doubly centred Gram matrix of the biased HSIC."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def _u_center_gram(k: torch.Tensor) -> torch.Tensor:
    """U-centring (Székely & Rizzo 2014): ⟨U(K), U(L)⟩ / (n(n−3)) is the unbiased HSIC of Song et al. 2012.

    Works on a stack (..., n, n).
    """
    n = k.shape[-1]
    k = k.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    row = k.sum(dim=-1, keepdim=True)  # (..., n, 1)
    col = k.sum(dim=-2, keepdim=True)  # (..., 1, n)
    total = row.sum(dim=-2, keepdim=True)  # (..., 1, 1)
    k = k - row / (n - 2) - col / (n - 2) + total / ((n - 1) * (n - 2))
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


def hsic(k: torch.Tensor, l: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """HSIC of two Gram matrices: biased (tr(KHLH)/(n−1)²) or unbiased (Song et al. 2012)."""
    n = k.shape[0]
    if debiased:
        if n < MIN_SAMPLES:
            raise ConfigError(f"the unbiased HSIC needs at least {MIN_SAMPLES} examples, got {n}")
        return (_u_center_gram(k) * _u_center_gram(l)).sum() / (n * (n - 3))
    return (_center_gram(k) * _center_gram(l)).sum() / (n - 1) ** 2


def _ratio(num: torch.Tensor, den_sq: torch.Tensor, *, lower: float = -1.0) -> float:
    """num / sqrt(den_sq), with 0 for a representation without variance (instead of NaN).

    The value is clipped to [lower, 1]: by Cauchy–Schwarz CKA lies in [0, 1] (biased, ``lower=0``) or [−1, 1]
    (debiased), and rounding must not push it past the bounds (a score 1 − CKA of −2e-16 looks like a bug).
    """
    den_sq = float(den_sq)
    if not den_sq > 0:
        return 0.0
    return min(1.0, max(lower, float(num) / den_sq**0.5))


def _degenerate(self_hsic: torch.Tensor, energy: torch.Tensor, n: int) -> bool:
    """Whether an unbiased self-HSIC is 0 up to rounding, relative to the Gram energy ‖K‖² it was computed from.

    The unbiased HSIC of some non-constant representations is exactly 0 (e.g. one example that differs from
    the n − 1 others): CKA is then 0/0, and the rounding residue in both terms made it an arbitrary number.
    """
    return not float(self_hsic) > 64 * n * torch.finfo(torch.float64).eps * float(energy)


def _cka_from_grams(k: torch.Tensor, l: torch.Tensor, debiased: bool) -> float:
    if debiased:
        ku, lu = _u_center_gram(k), _u_center_gram(l)
        kk, ll = (ku * ku).sum(), (lu * lu).sum()
        n = k.shape[0]
        if _degenerate(kk, (k * k).sum(), n) or _degenerate(ll, (l * l).sum(), n):
            return 0.0
        return _ratio((ku * lu).sum(), kk * ll)
    kc, lc = _center_gram(k), _center_gram(l)
    return _ratio((kc * lc).sum(), (kc * kc).sum() * (lc * lc).sum(), lower=0.0)


def linear_cka(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, debiased: bool = False
) -> float:
    """Linear CKA between two representations of the same n examples, in [0, 1] for the biased estimator.

    Args:
        x: (n, ...) activations; everything after the first axis is flattened.
        y: (n, ...) activations of the same examples.
        debiased: use the unbiased HSIC estimator (Song et al. 2012), which removes the upward bias of CKA
            for small n and wide layers; it can be slightly negative for unrelated representations.

    The feature-space form (d × d products) is used when both representations have fewer features than
    examples, the Gram form (n × n) otherwise; both give the same value.
    """
    x = _as_2d_float64(x, "x")
    y = _as_2d_float64(y, "y").to(x.device)
    _check_pair(x, y, debiased=debiased)
    n = x.shape[0]
    x, y = _center_scale(x), _center_scale(y)
    if max(x.shape[1], y.shape[1]) >= n:
        return _cka_from_grams(gram_linear(x), gram_linear(y), debiased)
    if not debiased:
        return _ratio((y.T @ x).square().sum(), (x.T @ x).square().sum() * (y.T @ y).square().sum(), lower=0.0)
    # Unbiased HSIC in feature space. With centred features 1ᵀK1 = 0, so for K̃ = K − diag(K):
    # n(n−3)·HSIC_u = ‖XᵀY‖² − n/(n−2)·⟨d_x, d_y⟩ + ‖X‖²‖Y‖²/((n−1)(n−2)), d = row squared norms.
    dx, dy = x.square().sum(1), y.square().sum(1)
    nx, ny = dx.sum(), dy.sum()

    def unbiased(xty_sq: torch.Tensor, da: torch.Tensor, db: torch.Tensor, na: torch.Tensor, nb: torch.Tensor):
        return xty_sq - n / (n - 2) * (da @ db) + na * nb / ((n - 1) * (n - 2))

    ex, ey = (x.T @ x).square().sum(), (y.T @ y).square().sum()  # ‖K‖², ‖L‖²
    xy = unbiased((x.T @ y).square().sum(), dx, dy, nx, ny)
    xx = unbiased(ex, dx, dx, nx, nx)
    yy = unbiased(ey, dy, dy, ny, ny)
    if _degenerate(xx, ex, n) or _degenerate(yy, ey, n):
        return 0.0
    return _ratio(xy, xx * yy)


def rbf_cka(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    *,
    threshold: float = 1.0,
    debiased: bool = False,
) -> float:
    """CKA with a Gaussian kernel, σ = threshold · sqrt(median squared pairwise distance) (Kornblith et al. 2019).

    Smaller thresholds emphasise local neighbourhoods; large thresholds approach linear CKA.
    """
    x = _as_2d_float64(x, "x")
    y = _as_2d_float64(y, "y").to(x.device)
    _check_pair(x, y, debiased=debiased)
    x, y = _center_scale(x), _center_scale(y)  # distances are unchanged; see _center_scale
    if not x.any() or not y.any():  # a constant representation: its kernel centres to 0 (up to rounding)
        return 0.0
    return _cka_from_grams(gram_rbf(x, threshold), gram_rbf(y, threshold), debiased)


class MinibatchCKA:
    """Streaming CKA between every layer of list A and every layer of list B (Nguyen et al. 2021).

    Call :meth:`update` once per batch with the activations of each layer (tensors of shape (m, ...), the same
    m examples for every layer) and :meth:`compute` at the end. With ``feats_b`` omitted, B is A itself and the
    result is the symmetric layer × layer matrix.

    Per batch, each layer's features are centred in float64 and turned into one Gram matrix; the Gram matrices
    are U-centred and stacked so that the HSIC of every (A, B) pair is one matrix product. Unbiased HSIC values are
    summed in float64 over batches: their mean is an unbiased estimate whatever the batch size, so the result is
    stable across batch sizes, and :meth:`merge` (or an ``all_reduce`` of :meth:`state_tensors`) combines
    accumulators of data-parallel workers exactly.

    Args:
        kernel: ``"linear"`` (default) or ``"rbf"`` (σ from each batch's median distance × ``threshold``).
        debiased: unbiased HSIC (default). The biased per-batch HSIC is available for comparison with the
            heatmaps of other tools but depends on the batch size.
        threshold: RBF bandwidth multiplier.
        device: where the float64 sums live; default the device of the first batch (CPU for MPS).

    Batches smaller than 4 examples are held back and folded into the next batch; a remainder left at
    :meth:`compute` is dropped with a warning (or raises when no batch at all was complete).
    """

    def __init__(
        self,
        *,
        kernel: str = "linear",
        debiased: bool = True,
        threshold: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        if kernel not in ("linear", "rbf"):
            raise ConfigError(f"kernel={kernel!r} must be 'linear' or 'rbf'")
        if threshold <= 0:
            raise ConfigError(f"threshold={threshold} must be positive")
        self.kernel = kernel
        self.debiased = debiased
        self.threshold = threshold
        self.device = torch.device(device) if device is not None else None
        self.symmetric: bool | None = None
        self.num_a = 0
        self.num_b = 0
        self.hsic_ab: torch.Tensor | None = None
        self.hsic_aa: torch.Tensor | None = None
        self.hsic_bb: torch.Tensor | None = None
        self.energy_a: torch.Tensor | None = None  # Σ ‖K‖²·scale per layer: the rounding yardstick of hsic_aa
        self.energy_b: torch.Tensor | None = None
        self.batches: torch.Tensor | None = None
        self.samples = 0
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor] | None] | None = None

    # -- accumulation -------------------------------------------------------------------------------------------
    def _init_state(self, num_a: int, num_b: int, symmetric: bool, device: torch.device) -> None:
        self.symmetric = symmetric
        self.num_a, self.num_b = num_a, num_b
        self.device = accumulation_device(self.device or device)
        kw = {"dtype": torch.float64, "device": self.device}
        self.hsic_ab = torch.zeros(num_a, num_b, **kw)
        self.hsic_aa = torch.zeros(num_a, **kw)
        self.hsic_bb = torch.zeros(num_b, **kw)
        self.energy_a = torch.zeros(num_a, **kw)
        self.energy_b = torch.zeros(num_b, **kw)
        self.batches = torch.zeros((), **kw)

    def _grams(self, feats: Sequence[torch.Tensor], names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """U-centred (or H-centred) Gram matrices of every layer, stacked: (L, m, m) float64, and their ‖K‖².

        A layer whose activations hold NaN or Inf (or values too large to square in float64) raises a
        ConfigError naming it: left alone, NaN would make its CKA silently 0 (see :meth:`compute`).
        """
        grams = []
        for f in feats:
            x = _center_clean(f.detach().reshape(f.shape[0], -1).to(self.device, torch.float64))
            if self.kernel == "linear":
                grams.append(gram_linear(x))
            else:  # a constant layer's kernel is constant: use 0, which centres to exactly 0
                grams.append(gram_rbf(x, self.threshold) if x.any() else torch.zeros_like(gram_linear(x)))
        k = torch.stack(grams)
        finite = torch.isfinite(k.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            bad = [n for n, ok in zip(names, finite.tolist(), strict=True) if not ok]
            raise ConfigError(
                f"the activations of {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} contain NaN or Inf "
                "(or values too large for float64), so their CKA is undefined; the model's weights are probably "
                "corrupt or diverged, the images hold NaN, or float16 autocast overflowed (try without amp)"
            )
        energy = k.square().flatten(1).sum(1)
        if self.debiased:
            return _u_center_gram(k), energy
        k = k - k.mean(dim=-2, keepdim=True)
        return k - k.mean(dim=-1, keepdim=True), energy

    def update(
        self,
        feats_a: Sequence[torch.Tensor],
        feats_b: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Add one batch: ``feats_a[i]`` is layer i's activations (m, ...) for the batch's m examples."""
        names_a = [str(k) for k in feats_a] if isinstance(feats_a, dict) else None
        names_b = [str(k) for k in feats_b] if isinstance(feats_b, dict) else None
        feats_a = list(feats_a.values()) if isinstance(feats_a, dict) else list(feats_a)
        if feats_b is not None:
            feats_b = list(feats_b.values()) if isinstance(feats_b, dict) else list(feats_b)
        names_a = names_a or [f"feats_a[{i}]" for i in range(len(feats_a))]
        names_b = names_b or [f"feats_b[{i}]" for i in range(len(feats_b or []))]
        if not feats_a or (feats_b is not None and not feats_b):
            raise ConfigError("update() needs at least one layer in feats_a (and in feats_b when given)")
        m = feats_a[0].shape[0]
        for name, group in (("feats_a", feats_a), ("feats_b", feats_b or [])):
            for i, f in enumerate(group):
                if f.shape[0] != m:
                    raise ConfigError(
                        f"{name}[{i}] has {f.shape[0]} examples but feats_a[0] has {m}: every layer must "
                        "describe the same examples"
                    )
        symmetric = feats_b is None
        if self.symmetric is None:
            self._init_state(len(feats_a), len(feats_a) if symmetric else len(feats_b), symmetric,
                             feats_a[0].device)
        elif symmetric != self.symmetric or len(feats_a) != self.num_a or (
            not symmetric and len(feats_b) != self.num_b
        ):
            raise ConfigError(
                f"this accumulator holds {self.num_a}×{self.num_b} layers "
                f"({'A vs A' if self.symmetric else 'A vs B'}); every update must pass the same layers"
            )
        if self._pending is not None:  # fold a too-small previous batch into this one
            pa, pb = self._pending
            self._pending = None
            feats_a = [torch.cat([p.to(f.device), f]) for p, f in zip(pa, feats_a, strict=True)]
            if feats_b is not None:
                feats_b = [torch.cat([p.to(f.device), f]) for p, f in zip(pb, feats_b, strict=True)]
            m = feats_a[0].shape[0]
        if m < MIN_SAMPLES:
            self._pending = ([f.detach() for f in feats_a], None if feats_b is None else [f.detach() for f in feats_b])
            return
        ka, ea = self._grams(feats_a, names_a)
        kb, eb = (ka, ea) if feats_b is None else self._grams(feats_b, names_b)
        ka, kb = ka.flatten(1), kb.flatten(1)  # (La, m²), (Lb, m²)
        scale = 1.0 / (m * (m - 3)) if self.debiased else 1.0 / (m - 1) ** 2
        self.hsic_ab += (ka @ kb.T) * scale
        self.hsic_aa += ka.square().sum(1) * scale
        self.hsic_bb += kb.square().sum(1) * scale
        self.energy_a += ea * scale
        self.energy_b += eb * scale
        self.batches += 1
        self.samples += m

    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add another accumulator's sums (e.g. from another data-parallel worker) into this one."""
        if other.symmetric is None:
            return self
        if self.symmetric is None:
            self._init_state(other.num_a, other.num_b, other.symmetric, other.hsic_ab.device)
        if (self.num_a, self.num_b, self.symmetric) != (other.num_a, other.num_b, other.symmetric):
            raise ConfigError(
                f"cannot merge a {other.num_a}×{other.num_b} accumulator into a {self.num_a}×{self.num_b} one"
            )
        if (self.kernel, self.debiased, self.threshold) != (other.kernel, other.debiased, other.threshold):
            raise ConfigError("cannot merge accumulators with different kernel/debiased/threshold settings")
        for name in ("hsic_ab", "hsic_aa", "hsic_bb", "energy_a", "energy_b", "batches"):
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.samples += other.samples
        return self

    def state_tensors(self) -> list[torch.Tensor]:
        """The float64 sums, in place: ``all_reduce(SUM)`` each of them to merge data-parallel workers."""
        if self.symmetric is None:
            raise ConfigError("no batch has been added yet")
        return [self.hsic_ab, self.hsic_aa, self.hsic_bb, self.energy_a, self.energy_b, self.batches]

    def compute(self) -> torch.Tensor:
        """The (len A × len B) CKA matrix, float64 on the CPU. Pairs involving a layer without variance are 0."""
        if self._pending is not None:
            left = self._pending[0][0].shape[0]
            if self.symmetric is None or float(self.batches) == 0:
                raise ConfigError(
                    f"only {left} example(s) were seen; minibatch CKA needs at least {MIN_SAMPLES} per batch"
                )
            warnings.warn(
                f"the last {left} example(s) formed a batch smaller than {MIN_SAMPLES} and were not used",
                stacklevel=2,
            )
        if self.symmetric is None or float(self.batches) == 0:
            raise ConfigError("no batch has been added yet: call update() before compute()")
        sums = (self.hsic_ab, self.hsic_aa, self.hsic_bb, self.energy_a, self.energy_b)
        if not all(bool(torch.isfinite(t).all()) for t in sums):
            raise ConfigError(
                "the CKA sums overflowed float64: some activations are too large (beyond about 1e75); "
                "the model's weights are probably diverged"
            )
        # a layer whose summed self-HSIC is 0 up to rounding (constant, or degenerate for the unbiased
        # estimator, see _degenerate) gets CKA 0 instead of a ratio of rounding residues
        tol = 64 * torch.finfo(torch.float64).eps * (self.samples / float(self.batches))
        aa = torch.where(self.hsic_aa > tol * self.energy_a, self.hsic_aa, torch.zeros_like(self.hsic_aa))
        bb = torch.where(self.hsic_bb > tol * self.energy_b, self.hsic_bb, torch.zeros_like(self.hsic_bb))
        # sqrt(aa)·sqrt(bb) rather than sqrt(aa·bb): the product of two sums overflows far sooner
        den = aa.sqrt()[:, None] * bb.sqrt()[None, :]
        ok = den > 0
        out = torch.where(ok, self.hsic_ab / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(den))
        # CKA lies in [0, 1] (biased) or [-1, 1] (debiased); keep rounding from crossing the bounds
        return out.clamp(-1.0 if self.debiased else 0.0, 1.0).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Heatmap of a model over a data loader
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CKAOptions:
    """How :func:`cka_matrix` computes: the estimator (see :class:`MinibatchCKA`) and where the models run.

    Attributes:
        kernel: ``"linear"`` (default) or ``"rbf"``.
        debiased: unbiased HSIC (default).
        threshold: RBF bandwidth multiplier.
        device: where the models run (``"auto"``: CUDA when available).
        amp: optional autocast dtype on CUDA (CKA itself stays in float64).
    """

    kernel: str = "linear"
    debiased: bool = True
    threshold: float = 1.0
    device: str | torch.device = "auto"
    amp: torch.dtype | None = None


class CKAMatrix(NamedTuple):
    """A CKA heatmap: ``matrix[i, j]`` compares layer ``names_a[i]`` with layer ``names_b[j]``."""

    matrix: torch.Tensor
    names_a: list[str]
    names_b: list[str]


def _images_of(batch: object) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and "image" in batch:
        return batch["image"]
    raise ConfigError(
        "the data loader must yield image tensors, (images, labels) pairs or dicts with an 'image' key; "
        f"got {type(batch).__name__}"
    )


def _dataset_length(loader: Iterable) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


def _capped_images(loader: Iterable, max_samples: int | None, cancel: CancelToken | None) -> Iterable[torch.Tensor]:
    """The image batches of ``loader``, cut to ``max_samples`` images in all (the last batch trimmed)."""
    seen = 0
    for batch in loader:
        check_cancel(cancel, "the CKA heatmap")
        x = _images_of(batch)
        if max_samples is not None and seen + x.shape[0] > max_samples:
            x = x[: max_samples - seen]
        if x.shape[0] == 0:
            return
        yield x
        seen += x.shape[0]
        if max_samples is not None and seen >= max_samples:
            return


def cka_matrix(
    model: nn.Module,
    loader: Iterable,
    *,
    model_b: nn.Module | None = None,
    layers: Sequence[str | type] | None = None,
    layers_b: Sequence[str | type] | None = None,
    max_samples: int | None = None,
    options: CKAOptions | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    reducer: object | None = None,
) -> CKAMatrix:
    """Layer × layer CKA heatmap of ``model`` (or of ``model`` vs ``model_b``) over the images of ``loader``.

    Args:
        model: the network; activations are captured with forward hooks (see :class:`ActivationCapture`).
        loader: yields images, (images, labels) pairs, or dicts with an ``"image"`` key.
        model_b: a second network (e.g. the pruned one) fed the same images; the matrix is then A × B.
        layers, layers_b: qualified module names, glob patterns (``"layer2.*"``) or module types; default: the
            stem, the output of every residual block, and the pooled penultimate features.
        max_samples: stop after this many images.
        options: kernel, debiased, threshold (see :class:`MinibatchCKA`), device and autocast dtype
            (:class:`CKAOptions`; default: its defaults, debiased linear CKA).
        reducer: optional callable applied to the accumulator before computing (data-parallel merge,
            see :mod:`cka_analysis.distributed`).

    Returns:
        :class:`CKAMatrix` with the matrix (float64, CPU) and the layer names in forward order. A module called
        several times in one forward pass appears once per call (``name#1``, ``name#2``, ...).
    """

    opts = options if options is not None else CKAOptions()
    dev = resolve_device(opts.device)
    progress = progress or no_progress
    acc = MinibatchCKA(kernel=opts.kernel, debiased=opts.debiased, threshold=opts.threshold)
    total = max_samples if max_samples is not None else _dataset_length(loader)
    seen = 0
    names_a: list[str] | None = None
    names_b: list[str] | None = None
    cap_b = ActivationCapture(model_b, layers_b) if model_b is not None else None
    with ActivationCapture(model, layers) as cap_a, (cap_b if cap_b is not None else contextlib.nullcontext()):
        models = [model] + ([model_b] if model_b is not None else [])
        for m in models:
            m.to(dev)
        with torch.inference_mode():
            for x in _capped_images(loader, max_samples, cancel):
                x = x.to(dev, non_blocking=True)
                with autocast(dev, opts.amp):
                    feats_a = cap_a.run(x)
                    feats_b = cap_b.run(x) if cap_b is not None else None
                names_a = list(feats_a)
                if feats_b is not None:
                    names_b = list(feats_b)
                acc.update(feats_a, feats_b)  # dicts: an error names the layer
                seen += x.shape[0]
                progress(seen, total, f"CKA over {seen} images")
    if names_a is None:
        raise ConfigError("the data loader yielded no images")
    if reducer is not None:
        reducer(acc)  # type: ignore[operator]
    matrix = acc.compute()
    return CKAMatrix(matrix, names_a, names_b if names_b is not None else list(names_a))

