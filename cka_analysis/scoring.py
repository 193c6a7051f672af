"""Removal scores: one number per removable block, lower = safer to remove.

The paper's criterion (``"cka"``, Pons et al. 2024) compares the penultimate features of the unpruned network
with those of the network without one block: ``score_b = 1 − CKA_linear(R, R⁻ᵇ)``. The other criteria are the
baselines the benchmarks compare it with:

========================  ============================================================================
``cka``                   1 − linear CKA(penultimate features, same without the block) (optionally debiased)
``cka_capacity``          ``cka`` × (block parameters / mean removable block parameters) ^ ``capacity_weight``:
                          capacity-aware, aimed at the accuracy after a long recovery (see
                          :func:`capacity_adjusted`)
``random``                seeded uniform noise: the floor any criterion must beat
``weight_norm``           mean |w| of the block's conv/linear weights
``block_influence``       1 − mean cosine(pooled block input, pooled block output) (ShortGPT, Men et al. 2024)
``angular``               mean arccos(cosine)/π of block input and output (Gromov et al. 2024)
``taylor``                |Σ ∂L/∂g| for a gate g on the block's residual, y = x + g·(block(x) − x), at g = 1:
                          first-order estimate of the loss change when the block goes (one backward pass)
``loss``                  oracle: increase of calibration cross-entropy when the block is removed
========================  ============================================================================

Speed: for the known families (see :class:`~cka_analysis.blocks.Topology`) the shared prefix runs once per
batch and, for each candidate, only the blocks after it run again (:class:`ScoringOptions` ``strategy="prefix"``);
the cost is the sum of the suffixes' MACs instead of one full forward per candidate (``strategy="full"``, the paper
code's loop, also the
path for custom models). Batches that run out of GPU memory are split in halves and retried.

Each criterion is a small :class:`Criterion` in :data:`REGISTRY`, keyed by the names of
:data:`cka_analysis.choices.CRITERION_INFO` (which holds the descriptions and whether a criterion needs data or
labels, importable without torch). Weight criteria score from the parameters alone; data criteria hand
:func:`score_blocks` an accumulator that it feeds the calibration batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed as dist_utils
from .blocks import Topology, find_blocks, forward_with_hooks, topology
from .choices import CRITERIA, CRITERION_INFO, DEFAULT_CAPACITY_WEIGHT, CriterionInfo, criterion_info
from .cka import linear_cka
from .device import autocast, eval_mode, is_out_of_memory, resolve_device
from .errors import ConfigError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

__all__ = [
    "CRITERIA",
    "REGISTRY",
    "AngularCriterion",
    "BlockInfluenceCriterion",
    "CKACapacityCriterion",
    "CKACriterion",
    "Criterion",
    "LossCriterion",
    "RandomCriterion",
    "Scores",
    "ScoringOptions",
    "TaylorCriterion",
    "WeightNormCriterion",
    "capacity_adjusted",
    "get_criterion",
    "score_blocks",
]


@dataclass
class Scores:
    """Per-block removal scores (lower = safer to remove) and how they were obtained."""

    criterion: str
    scores: dict[str, float]
    seconds: float
    samples: int
    options: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """Block names from safest to remove to least safe (ties keep forward order)."""
        order = {n: i for i, n in enumerate(self.scores)}
        return sorted(self.scores, key=lambda n: (self.scores[n], order[n]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "samples": self.samples,
            "seconds": self.seconds,
            "options": self.options,
            "scores": dict(self.scores),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scores:
        """Read :meth:`to_dict`'s form back (e.g. from ``score --json`` or a resume folder)."""
        try:
            return cls(str(d["criterion"]), {str(k): float(v) for k, v in d["scores"].items()}, float(d["seconds"]),
                       int(d["samples"]), dict(d.get("options") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"not a Scores record (criterion, scores, seconds, samples): {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------------------------


def _batches(calibration: Any, batch_size: int) -> tuple[Iterable, int | None]:
    """An iterable of (images, labels) batches and the number of samples when known."""
    if isinstance(calibration, DataLoader):
        n = len(calibration.dataset) if hasattr(calibration.dataset, "__len__") else None
        return calibration, n
    if isinstance(calibration, Dataset):
        return DataLoader(calibration, batch_size=batch_size, shuffle=False), len(calibration)  # type: ignore[arg-type]
    if isinstance(calibration, torch.Tensor):
        calibration = (calibration, torch.zeros(len(calibration), dtype=torch.long))
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2 and isinstance(calibration[0], torch.Tensor):
        x, y = calibration
        if len(x) != len(y):
            raise ConfigError(f"calibration images ({len(x)}) and labels ({len(y)}) differ in length")
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)], len(x)
    raise ConfigError(
        "calibration must be a DataLoader, a Dataset, an image tensor, or an (images, labels) pair of tensors; "
        f"got {type(calibration).__name__}"
    )


def _split_on_oom(fn: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor, y: torch.Tensor) -> None:
    """Run ``fn`` on the batch; on out-of-memory, run it on each half instead (down to one image).

    ``fn`` must leave no partial result behind when it raises (see :meth:`_Accumulator.step`).
    """
    try:
        fn(x, y)
        return
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        if len(x) <= 1:
            raise ConfigError(
                "out of memory while scoring even a single image; use a smaller model input, --device cpu, "
                "or --amp fp16/bf16"
            ) from exc
    # Retry outside the except block: the exception's traceback keeps the failed attempt's activations alive,
    # so retrying inside it would run the halves with that memory still held.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(x) // 2
    _split_on_oom(fn, x[:half], y[:half])
    _split_on_oom(fn, x[half:], y[half:])


def _check_finite(criterion: str, values: dict[str, float]) -> dict[str, float]:
    """ConfigError when a score is NaN or Inf: a silent NaN would sort arbitrarily and prune the wrong block."""
    bad = [n for n, v in values.items() if not math.isfinite(v)]
    if bad:
        raise ConfigError(
            f"the {criterion!r} scores of {len(bad)} block(s) ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}) "
            "are NaN or Inf: the model produces non-finite activations, losses or weights. Check the weights "
            "(a corrupt or diverged checkpoint), the calibration images (NaN pixels) and, on CUDA, try without "
            "amp (float16 overflow); nothing was pruned"
        )
    return values


# ---------------------------------------------------------------------------------------------------------------
# Hooks the criteria share
# ---------------------------------------------------------------------------------------------------------------


def _pool(t: torch.Tensor) -> torch.Tensor:
    """Global average over spatial axes for (N, C, H, W); tokens (N, T, D) and vectors stay as they are."""
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t


def _cosine(inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of pooled input and output, one value per example (token-averaged for sequences)."""
    a, b = _pool(inp).float(), _pool(out).float()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return cos.mean(dim=-1) if cos.dim() > 1 else cos


class _Gate:
    """Forward hooks that turn ``block(x)`` into ``x + g·(block(x) − x)``, or into ``x`` (g = 0, removed)."""

    def __init__(self, model: nn.Module, names: Sequence[str], gates: dict[str, torch.Tensor] | None = None):
        self.handles = []
        for n in names:
            g = None if gates is None else gates[n]
            self.handles.append(model.get_submodule(n).register_forward_hook(self._hook(g)))

    @staticmethod
    def _hook(g: torch.Tensor | None):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return x if g is None else x + g * (out - x)

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Features:
    """Penultimate features via a pre-hook on the classifier (the generic path)."""

    def __init__(self, model: nn.Module, classifier: str | None):
        if classifier is None:
            raise ConfigError(
                f"{type(model).__name__} has no nn.Linear classifier, so its penultimate features are unknown"
            )
        self.value: torch.Tensor | None = None
        self.handle = model.get_submodule(classifier).register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Accumulators: one data criterion over calibration batches
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    """What an accumulator works on: the model (in eval mode, on ``device``), its topology and the candidates.

    ``prefix``: run the shared prefix once and only each candidate's suffix again (removal criteria on a chain).
    """

    model: nn.Module
    topo: Topology
    cands: list[str]
    device: torch.device
    amp: torch.dtype | None
    prefix: bool
    debiased: bool
    capacity_weight: float = DEFAULT_CAPACITY_WEIGHT


class _Accumulator:
    """Per-candidate float64 sums over calibration batches; subclasses say what a batch adds and what it means.

    :meth:`step` is all or nothing, so that an out-of-memory retry on the batch's halves does not count twice.
    """

    def __init__(self, setup: _Setup) -> None:
        self.setup = setup
        self.samples = 0
        self.sums = torch.zeros(len(setup.cands), dtype=torch.float64, device=setup.device)
        self.index = {c: i for i, c in enumerate(setup.cands)}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch of images ``x`` with labels ``y``; on any error the state is as before the call."""
        saved = self._save()
        try:
            self._add(x, y)
        except BaseException:
            self._restore(saved)
            raise
        self.samples += len(x)

    def _save(self) -> Any:
        return self.sums.clone()

    def _restore(self, saved: Any) -> None:
        self.sums.copy_(saved)

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        raise NotImplementedError

    def merge_ranks(self) -> None:
        """Combine the shards of all ranks (under torchrun): sum the sample counts, then :meth:`_merge`."""

        n = torch.tensor([self.samples], dtype=torch.float64, device=self.setup.device)
        dist.all_reduce(n)
        self.samples = int(n)
        self._merge()

    def _merge(self) -> None:

        dist.all_reduce(self.sums)

    def finish(self) -> dict[str, float]:
        """The score of every candidate (lower = safer to remove)."""
        return dict(zip(self.setup.cands, self._final(self.sums.cpu(), self.samples).tolist(), strict=True))

    def _final(self, sums: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError


class _RemovalAccumulator(_Accumulator):
    """Criteria that compare the network with and without each candidate (``cka``, ``loss``).

    Each batch runs the whole network once and the network without each candidate once, and hands every outcome
    to :meth:`_record` (``name`` None = the whole network): the prefix path on a chain topology, a gated full
    forward otherwise.
    """

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(self.setup.device, self.setup.amp):
            if self.setup.prefix:
                self._run_prefix(x, y)
            else:
                self._run_full(x, y)

    def _record(self, name: str | None, feats: torch.Tensor, logits: Callable[[], torch.Tensor],
                y: torch.Tensor) -> None:
        """Record one outcome: penultimate ``feats`` and a thunk for the logits (computed only when needed)."""
        raise NotImplementedError

    def _run_prefix(self, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.setup
        topo, model = s.topo, s.model
        h = topo.stem(model, x)
        for i, slot in enumerate(topo.slots):
            if slot in self.index:
                feats = topo.head(model, topo.run_blocks(model, h, start=i + 1))
                self._record(slot, feats, lambda f=feats: topo.classify(model, f), y)
            h = model.get_submodule(slot)(h)
        feats = topo.head(model, h)
        self._record(None, feats, lambda: topo.classify(model, feats), y)

    def _run_full(self, x: torch.Tensor, y: torch.Tensor) -> None:
        model = self.setup.model
        feats = _Features(model, self.setup.topo.classifier)
        try:
            logits = model(x)
            self._record(None, feats.value, lambda: logits, y)
            for c in self.setup.cands:
                gate = _Gate(model, [c])
                try:
                    without = model(x)
                finally:
                    gate.remove()
                self._record(c, feats.value, lambda out=without: out, y)
        finally:
            feats.remove()


class _CKAAccumulator(_RemovalAccumulator):
    """Keeps the penultimate features of the whole network and of each removal; CKA needs all samples at once."""

    def __init__(self, setup: _Setup) -> None:
        super().__init__(setup)
        self.full: list[torch.Tensor] = []
        self.minus: dict[str, list[torch.Tensor]] = {c: [] for c in setup.cands}

    def _record(self, name: str | None, feats: torch.Tensor, logits: Callable[[], torch.Tensor],
                y: torch.Tensor) -> None:
        (self.full if name is None else self.minus[name]).append(feats.float())

    def _save(self) -> Any:
        return len(self.full), {c: len(v) for c, v in self.minus.items()}

    def _restore(self, saved: Any) -> None:
        del self.full[saved[0]:]
        for c, n in saved[1].items():
            del self.minus[c][n:]

    def _merge(self) -> None:
        self.full = [_all_gather_rows(torch.cat(self.full))]
        for c in self.setup.cands:
            self.minus[c] = [_all_gather_rows(torch.cat(self.minus[c]))]

    def finish(self) -> dict[str, float]:
        full = torch.cat(self.full)
        if not bool(torch.isfinite(full).all()):
            raise ConfigError(
                "the model's penultimate features contain NaN or Inf on the calibration images, so no block "
                "can be scored: check the weights (a corrupt or diverged checkpoint), the images (NaN pixels) "
                "and, on CUDA, try without amp (float16 overflow)"
            )
        out = {}
        for c in self.setup.cands:
            minus = torch.cat(self.minus[c])
            # NaN (reported by _check_finite with the block's name) rather than linear_cka's generic error
            out[c] = 1.0 - linear_cka(full, minus, debiased=self.setup.debiased) \
                if bool(torch.isfinite(minus).all()) else math.nan
        return out


class _LossAccumulator(_RemovalAccumulator):
    """Summed cross-entropy of the whole network and of each removal; the score is the mean increase."""

    def __init__(self, setup: _Setup) -> None:
        super().__init__(setup)
        self.base_loss = torch.zeros((), dtype=torch.float64, device=setup.device)

    def _record(self, name: str | None, feats: torch.Tensor, logits: Callable[[], torch.Tensor],
                y: torch.Tensor) -> None:
        loss = F.cross_entropy(logits().float(), y, reduction="sum")
        if name is None:
            self.base_loss += loss
        else:
            self.sums[self.index[name]] += loss

    def _save(self) -> Any:
        return super()._save(), self.base_loss.clone()

    def _restore(self, saved: Any) -> None:
        super()._restore(saved[0])
        self.base_loss.copy_(saved[1])

    def _merge(self) -> None:

        super()._merge()
        dist.all_reduce(self.base_loss)

    def _final(self, sums: torch.Tensor, n: int) -> torch.Tensor:
        return (sums - self.base_loss.cpu()) / n


class _SimilarityAccumulator(_Accumulator):
    """Sums a per-sample function of cos(pooled block input, pooled block output) over one plain forward pass."""

    def __init__(self, setup: _Setup, per_sample: Callable[[torch.Tensor], torch.Tensor],
                 final: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        super().__init__(setup)
        self.per_sample, self.final = per_sample, final

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        model = self.setup.model
        store: dict[str, torch.Tensor] = {}

        def hook(c: str) -> Callable:
            def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                store[c] = self.per_sample(_cosine(args[0], out).double()).sum()
            return fn

        with torch.inference_mode(), autocast(self.setup.device, self.setup.amp):
            forward_with_hooks(model, x, {c: hook(c) for c in self.setup.cands})
            self.sums += torch.stack([store[c] for c in self.setup.cands])

    def _final(self, sums: torch.Tensor, n: int) -> torch.Tensor:
        return self.final(sums, n)


class _TaylorAccumulator(_Accumulator):
    """Sums ∂L/∂g of a gate g = 1 on each candidate's residual branch (one backward pass per batch)."""

    def _add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.setup
        gates = {c: torch.ones((), device=s.device, requires_grad=True) for c in s.cands}
        gate = _Gate(s.model, s.cands, gates)
        try:
            with torch.enable_grad(), autocast(s.device, s.amp):
                loss = F.cross_entropy(s.model(x).float(), y, reduction="sum")
            grads = torch.autograd.grad(loss, [gates[c] for c in s.cands])
        finally:
            gate.remove()
        self.sums += torch.stack(grads).double()

    def _final(self, sums: torch.Tensor, n: int) -> torch.Tensor:
        return sums.abs() / n


# ---------------------------------------------------------------------------------------------------------------
# Criteria: the registry
# ---------------------------------------------------------------------------------------------------------------


class Criterion:
    """A removal criterion: its :class:`~cka_analysis.choices.CriterionInfo` (name, description, whether it needs
    data and labels) and how it scores. Lower scores are always safer to remove.

    Weight criteria (``needs_data`` False) implement :meth:`score_weights`; data criteria implement
    :meth:`accumulator`, which :func:`score_blocks` feeds calibration batches.
    """

    info: ClassVar[CriterionInfo]
    #: Whether the criterion compares the network with and without each block, so that it can run the shared
    #: prefix once and only the suffix after each candidate again (``strategy="prefix"``).
    removal: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.info.name

    def options(self, *, debiased: bool, seed: int) -> dict[str, Any]:
        """The criterion's own settings recorded in :attr:`Scores.options`."""
        return {}

    def score_weights(self, model: nn.Module, cands: Sequence[str], *, seed: int) -> dict[str, float]:
        raise NotImplementedError(f"{self.name} needs calibration data")

    def accumulator(self, setup: _Setup) -> _Accumulator:
        raise NotImplementedError(f"{self.name} reads only the weights")


class RandomCriterion(Criterion):
    """Seeded uniform noise in [0, 1): the floor any criterion must beat."""

    info = CRITERION_INFO["random"]

    def options(self, *, debiased: bool, seed: int) -> dict[str, Any]:
        return {"seed": seed}

    def score_weights(self, model: nn.Module, cands: Sequence[str], *, seed: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(seed)
        vals = torch.rand(len(cands), generator=g, dtype=torch.float64).tolist()
        return dict(zip(cands, vals, strict=True))


class WeightNormCriterion(Criterion):
    """Mean |w| over the block's conv/linear weights (and attention input projections)."""

    info = CRITERION_INFO["weight_norm"]

    def score_weights(self, model: nn.Module, cands: Sequence[str], *, seed: int) -> dict[str, float]:
        out = {}
        for n in cands:
            block = model.get_submodule(n)
            ws = [m.weight for m in block.modules()
                  if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight is not None]
            ws += [p for name, p in block.named_parameters() if name.endswith("in_proj_weight")]  # attention
            if not ws:
                out[n] = 0.0
                continue
            total = sum(float(w.detach().abs().sum()) for w in ws)
            out[n] = total / sum(w.numel() for w in ws)
        return out


class CKACriterion(Criterion):
    """The paper's: 1 − linear CKA(penultimate features, the same without the block), optionally debiased."""

    info = CRITERION_INFO["cka"]
    removal = True

    def options(self, *, debiased: bool, seed: int) -> dict[str, Any]:
        return {"debiased": debiased}

    def accumulator(self, setup: _Setup) -> _Accumulator:
        return _CKAAccumulator(setup)


#: Floor of a ``cka`` score before the capacity factor: a score of exactly 0 (or a tiny negative debiased one)
#: would otherwise erase the factor and the order among such blocks.
CAPACITY_SCORE_FLOOR = 1e-6


def capacity_adjusted(scores: Mapping[str, float], params: Mapping[str, int], weight: float) -> dict[str, float]:
    """The ``cka_capacity`` score of every block: ``max(s_b, 1e-6) · (p_b / p̄) ** weight``.

    ``s_b`` is the block's ``cka`` score (the damage right after removal), ``p_b`` its parameters and ``p̄`` the
    mean over the scored blocks. After a long recovery the accuracy follows the weights kept, while the ``cka``
    score only sees the network right after removal; the factor makes a block that holds many weights more
    expensive to remove, so that among blocks of equal MACs (all of a CIFAR ResNet's) the ones with few
    parameters *and* a low score go first. ``weight`` is the one knob: 0 gives plain ``cka`` order, 1 (the
    default) trades a factor of two in score against a factor of two in parameters.
    """
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"capacity_weight={weight!r} must be a number ≥ 0 (0: plain cka order; default "
                          f"{DEFAULT_CAPACITY_WEIGHT:g})")
    mean = sum(params[n] for n in scores) / max(1, len(scores))
    out = {}
    for n, v in scores.items():
        ratio = params[n] / mean if mean > 0 else 1.0
        out[n] = max(v, CAPACITY_SCORE_FLOOR) * ratio ** weight
    return out


class _CKACapacityAccumulator(_CKAAccumulator):
    """The ``cka`` accumulator whose scores are scaled by each block's share of the parameters."""

    def finish(self) -> dict[str, float]:
        model = self.setup.model
        params = {c: sum(p.numel() for p in model.get_submodule(c).parameters()) for c in self.setup.cands}
        return capacity_adjusted(super().finish(), params, self.setup.capacity_weight)


class CKACapacityCriterion(CKACriterion):
    """Capacity-aware CKA (:func:`capacity_adjusted`): the ``cka`` score times the block's parameter ratio to the
    power ``capacity_weight``; a plan for the network after recovery rather than right after removal."""

    info = CRITERION_INFO["cka_capacity"]

    def options(self, *, debiased: bool, seed: int) -> dict[str, Any]:
        return {"debiased": debiased}

    def accumulator(self, setup: _Setup) -> _Accumulator:
        return _CKACapacityAccumulator(setup)


class LossCriterion(Criterion):
    """Oracle: mean increase of the calibration cross-entropy when the block is removed."""

    info = CRITERION_INFO["loss"]
    removal = True

    def accumulator(self, setup: _Setup) -> _Accumulator:
        return _LossAccumulator(setup)


class BlockInfluenceCriterion(Criterion):
    """ShortGPT's block influence: 1 − mean cosine(pooled block input, pooled block output)."""

    info = CRITERION_INFO["block_influence"]

    def accumulator(self, setup: _Setup) -> _Accumulator:
        return _SimilarityAccumulator(setup, per_sample=lambda cos: cos, final=lambda sums, n: 1.0 - sums / n)


class AngularCriterion(Criterion):
    """Gromov et al.'s angular distance: mean arccos(cosine)/π of pooled block input and output."""

    info = CRITERION_INFO["angular"]

    def accumulator(self, setup: _Setup) -> _Accumulator:
        return _SimilarityAccumulator(setup, per_sample=lambda cos: torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi,
                                      final=lambda sums, n: sums / n)


class TaylorCriterion(Criterion):
    """|Σ ∂L/∂g| / N for a gate g on the block's residual at g = 1: first-order loss change of removing it."""

    info = CRITERION_INFO["taylor"]

    def accumulator(self, setup: _Setup) -> _Accumulator:
        return _TaylorAccumulator(setup)


#: The implementation of every criterion of :data:`~cka_analysis.choices.CRITERION_INFO`, under the same names.
REGISTRY: Mapping[str, Criterion] = MappingProxyType({c.name: c for c in (
    CKACriterion(), RandomCriterion(), WeightNormCriterion(), BlockInfluenceCriterion(), AngularCriterion(),
    TaylorCriterion(), LossCriterion(), CKACapacityCriterion(),
)})
if tuple(REGISTRY) != CRITERIA:  # a criterion declared in choices.py without an implementation, or the reverse
    raise ImportError(f"scoring.REGISTRY {tuple(REGISTRY)} does not match choices.CRITERIA {CRITERIA}")


def get_criterion(name: str) -> Criterion:
    """The :class:`Criterion` called ``name``; ConfigError listing the known ones otherwise."""
    criterion_info(name)  # the error message for an unknown name
    return REGISTRY[name]


# ---------------------------------------------------------------------------------------------------------------
# score_blocks
# ---------------------------------------------------------------------------------------------------------------


def _candidates(model: nn.Module, blocks: Sequence[str] | str | None, candidates: Sequence[str] | None) -> list[str]:
    """The blocks to score: ``candidates`` (each must be removable) or every removable block."""
    removable = [b.name for b in find_blocks(model, blocks) if b.removable]
    if candidates is None:
        cands = removable
    else:
        cands = list(dict.fromkeys(candidates))
        bad = [c for c in cands if c not in removable]
        if bad:
            raise ConfigError(f"candidates {bad} are not removable blocks of this model")
    if not cands:
        raise ConfigError("the model has no removable block to score")
    return cands


@dataclass(frozen=True)
class ScoringOptions:
    """How blocks are scored, one object for :func:`score_blocks` and :func:`~cka_analysis.pruning.prune`.

    Attributes:
        debiased: for ``cka``, use debiased linear CKA.
        batch_size: when the calibration images are a Dataset or tensors.
        strategy: ``"prefix"`` (run the shared prefix once, then each candidate's suffix), ``"full"`` (one full
            forward per candidate), or ``"auto"`` (prefix when the architecture allows it).
        device: where to score (``"auto"``: CUDA when available).
        amp: autocast dtype on CUDA (features and CKA are still computed in float32/float64).
        seed: for ``random``.
        capacity_weight: for ``cka_capacity``, the exponent of the parameter ratio (:func:`capacity_adjusted`).
    """

    debiased: bool = False
    batch_size: int = 128
    strategy: str = "auto"
    device: str | torch.device = "auto"
    amp: torch.dtype | None = None
    seed: int = 0
    capacity_weight: float = DEFAULT_CAPACITY_WEIGHT


def score_blocks(
    model: nn.Module,
    calibration: Any = None,
    criterion: str = "cka",
    *,
    options: ScoringOptions | None = None,
    candidates: Sequence[str] | None = None,
    blocks: Sequence[str] | str | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Scores:
    """Score every removable block of ``model`` (lower = safer to remove).

    Args:
        model: a registry model (or a custom one with ``blocks``); it is not modified.
        calibration: the calibration images (training split): DataLoader, Dataset, image tensor, or
            (images, labels). Not needed for the criteria whose ``needs_data`` is False (``random``,
            ``weight_norm``; see :data:`~cka_analysis.choices.CRITERION_INFO`).
        criterion: one of :data:`CRITERIA`; ``"cka"`` is the paper's. Implementations: :data:`REGISTRY`.
        options: debiased CKA, batch size, strategy, device, autocast dtype, seed (:class:`ScoringOptions`;
            default: its defaults).
        candidates: restrict to these block names (default: every removable block).
        blocks: residual blocks of a custom model (names or glob patterns).
        progress, cancel: see :mod:`cka_analysis.progress`.
    """
    opts = options if options is not None else ScoringOptions()
    debiased, batch_size, strategy, seed = opts.debiased, opts.batch_size, opts.strategy, opts.seed
    if criterion not in REGISTRY:
        raise ConfigError(f"criterion={criterion!r} is not known; choose one of {', '.join(CRITERIA)}")
    if strategy not in ("auto", "prefix", "full"):
        raise ConfigError(f"strategy={strategy!r} must be 'auto', 'prefix' or 'full'")
    crit = REGISTRY[criterion]
    start = time.perf_counter()
    topo = topology(model, blocks)
    cands = _candidates(model, blocks, candidates)
    options: dict[str, Any] = {"strategy": strategy, "batch_size": batch_size,
                               **crit.options(debiased=debiased, seed=seed)}
    if isinstance(crit, CKACapacityCriterion):
        capacity_adjusted({}, {}, opts.capacity_weight)  # a bad knob fails before any scoring
        options["capacity_weight"] = opts.capacity_weight
    if not crit.info.needs_data:
        values = _check_finite(criterion, crit.score_weights(model, cands, seed=seed))
        return Scores(criterion, values, time.perf_counter() - start, 0, options)
    if calibration is None:
        raise ConfigError(f"criterion {criterion!r} needs calibration images")
    if strategy == "prefix" and not topo.chain:
        raise ConfigError(f"{type(model).__name__} cannot be run in pieces; use strategy='full' or 'auto'")
    use_prefix = topo.chain and strategy != "full" and crit.removal
    options["strategy"] = "prefix" if use_prefix else ("full" if crit.removal else "single-pass")
    dev = resolve_device(opts.device)
    setup = _Setup(model, topo, cands, dev, opts.amp, use_prefix, debiased, opts.capacity_weight)
    values, samples = _score_on_data(crit, setup, calibration, batch_size, options,
                                     progress or no_progress, cancel)
    return Scores(criterion, values, time.perf_counter() - start, samples, options)


def _score_on_data(crit: Criterion, setup: _Setup, calibration: Any, batch_size: int, options: dict[str, Any],
                   progress: ProgressFn, cancel: CancelToken | None) -> tuple[dict[str, float], int]:
    """Feed the calibration batches to the criterion's accumulator; the scores and the samples seen.

    Under torchrun every rank scores every K-th calibration image and the accumulator merges the ranks' shards
    (features gathered, sums reduced), so the scores equal a one-process run. Records ``world_size`` and
    ``samples_expected`` in ``options``.
    """

    shard = dist_utils.is_distributed() and not isinstance(calibration, DataLoader)
    if shard:
        whole = _batches(calibration, batch_size)[1]
        calibration = _shard(calibration, dist_utils.rank(), dist_utils.world_size())
        options["world_size"] = dist_utils.world_size()
    batches, total_samples = _batches(calibration, batch_size)
    model, dev = setup.model, setup.device
    with eval_mode(model):
        model.to(dev)
        acc = crit.accumulator(setup)
        n_batches = len(batches) if hasattr(batches, "__len__") else None
        for i, batch in enumerate(batches):
            check_cancel(cancel, "scoring")
            x = batch[0].to(dev, non_blocking=True)
            y = batch[1].to(dev, non_blocking=True)
            _split_on_oom(acc.step, x, y)
            progress(i + 1, n_batches, f"{crit.name}: batch {i + 1}/{n_batches or '?'}")
        if acc.samples == 0:
            raise ConfigError("the calibration data yielded no images")
        if shard:
            acc.merge_ranks()
        values = _check_finite(crit.name, acc.finish())
    options["samples_expected"] = whole if shard else total_samples
    return values, acc.samples


def _shard(calibration: Any, rank: int, world: int) -> Any:
    """Every ``world``-th item of the calibration data, starting at ``rank`` (no padding, no duplicates)."""

    if isinstance(calibration, Dataset):
        return Subset(calibration, list(range(rank, len(calibration), world)))  # type: ignore[arg-type]
    if isinstance(calibration, torch.Tensor):
        return calibration[rank::world]
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2:
        return calibration[0][rank::world], calibration[1][rank::world]
    return calibration


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every rank (ranks may hold different numbers of rows)."""

    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    longest = int(max(int(x) for x in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes, strict=True)])
