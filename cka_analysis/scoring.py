"""Removal scores: one number per removable block, lower = safer to remove.

The paper's criterion (``"cka"``, Pons et al. 2024) compares the penultimate features of the unpruned network
with those of the network without one block: ``score_b = 1 − CKA_linear(R, R⁻ᵇ)``. The other criteria are the
baselines the benchmarks compare it with:

========================  ============================================================================
``cka``                   1 − linear CKA(penultimate features, same without the block) (optionally debiased)
``random``                seeded uniform noise: the floor any criterion must beat
``weight_norm``           mean |w| of the block's conv/linear weights
``block_influence``       1 − mean cosine(pooled block input, pooled block output) (ShortGPT, Men et al. 2024)
``angular``               mean arccos(cosine)/π of block input and output (Gromov et al. 2024)
``taylor``                |Σ ∂L/∂g| for a gate g on the block's residual, y = x + g·(block(x) − x), at g = 1:
                          first-order estimate of the loss change when the block goes (one backward pass)
``loss``                  oracle: increase of calibration cross-entropy when the block is removed
========================  ============================================================================

Speed: for the known families (see :class:`~cka_analysis.blocks.Topology`) the shared prefix runs once per
batch and, for each candidate, only the blocks after it run again (``strategy="prefix"``); the cost is the sum of
the suffixes' MACs instead of one full forward per candidate (``strategy="full"``, the paper code's loop, also the
path for custom models). Batches that run out of GPU memory are split in halves and retried.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .blocks import Topology, find_blocks, topology
from .choices import CRITERIA
from .cka import linear_cka
from .device import autocast, resolve_device
from .errors import ConfigError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

__all__ = ["CRITERIA", "Scores", "score_blocks"]

_DATA_FREE = ("random", "weight_norm")


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


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def _split_on_oom(fn: Callable[[torch.Tensor, torch.Tensor], None], x: torch.Tensor, y: torch.Tensor) -> None:
    """Run ``fn`` on the batch; on out-of-memory, run it on each half instead (down to one image).

    ``fn`` must leave no partial result behind when it raises (see :meth:`_Runner.step`).
    """
    try:
        fn(x, y)
        return
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        if not _is_oom(exc):
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
# Criteria
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


def _weight_norm(model: nn.Module, names: Sequence[str]) -> dict[str, float]:
    out = {}
    for n in names:
        ws = [m.weight for m in model.get_submodule(n).modules()
              if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and m.weight is not None]
        ws += [p for name, p in model.get_submodule(n).named_parameters()
               if name.endswith("in_proj_weight")]  # attention projections
        if not ws:
            out[n] = 0.0
            continue
        total = sum(float(w.detach().abs().sum()) for w in ws)
        out[n] = total / sum(w.numel() for w in ws)
    return out


def score_blocks(
    model: nn.Module,
    calibration: Any = None,
    criterion: str = "cka",
    *,
    debiased: bool = False,
    candidates: Sequence[str] | None = None,
    blocks: Sequence[str] | str | None = None,
    batch_size: int = 128,
    strategy: str = "auto",
    device: str | torch.device = "auto",
    amp: torch.dtype | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Scores:
    """Score every removable block of ``model`` (lower = safer to remove).

    Args:
        model: a registry model (or a custom one with ``blocks``); it is not modified.
        calibration: the calibration images (training split): DataLoader, Dataset, image tensor, or
            (images, labels). Not needed for ``random`` and ``weight_norm``.
        criterion: one of :data:`CRITERIA`; ``"cka"`` is the paper's.
        debiased: for ``cka``, use debiased linear CKA.
        candidates: restrict to these block names (default: every removable block).
        blocks: residual blocks of a custom model (names or glob patterns).
        batch_size: when ``calibration`` is a Dataset or tensors.
        strategy: ``"prefix"`` (run the shared prefix once, then each candidate's suffix), ``"full"`` (one full
            forward per candidate), or ``"auto"`` (prefix when the architecture allows it).
        amp: autocast dtype on CUDA (features and CKA are still computed in float32/float64).
        seed: for ``random``.
        progress, cancel: see :mod:`cka_analysis.progress`.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion={criterion!r} is not known; choose one of {', '.join(CRITERIA)}")
    if strategy not in ("auto", "prefix", "full"):
        raise ConfigError(f"strategy={strategy!r} must be 'auto', 'prefix' or 'full'")
    progress = progress or no_progress
    start = time.perf_counter()
    topo = topology(model, blocks)
    found = find_blocks(model, blocks)
    removable = [b.name for b in found if b.removable]
    if candidates is None:
        cands = removable
    else:
        cands = list(dict.fromkeys(candidates))
        bad = [c for c in cands if c not in removable]
        if bad:
            raise ConfigError(f"candidates {bad} are not removable blocks of this model")
    if not cands:
        raise ConfigError("the model has no removable block to score")
    options: dict[str, Any] = {"strategy": strategy, "batch_size": batch_size}
    if criterion == "cka":
        options["debiased"] = debiased

    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        vals = torch.rand(len(cands), generator=g, dtype=torch.float64).tolist()
        options["seed"] = seed
        return Scores(criterion, dict(zip(cands, vals, strict=True)), time.perf_counter() - start, 0, options)
    if criterion == "weight_norm":
        values = _check_finite(criterion, _weight_norm(model, cands))
        return Scores(criterion, values, time.perf_counter() - start, 0, options)

    if calibration is None:
        raise ConfigError(f"criterion {criterion!r} needs calibration images")
    dev = resolve_device(device)
    from . import distributed as dist_utils

    # under torchrun every rank scores every K-th calibration image; finish() gathers features / sums the totals
    shard = dist_utils.is_distributed() and not isinstance(calibration, DataLoader)
    if shard:
        whole = _batches(calibration, batch_size)[1]
        calibration = _shard(calibration, dist_utils.rank(), dist_utils.world_size())
        options["world_size"] = dist_utils.world_size()
    batches, total_samples = _batches(calibration, batch_size)
    use_prefix = topo.chain and strategy != "full" and criterion in ("cka", "loss")
    if strategy == "prefix" and not topo.chain:
        raise ConfigError(f"{type(model).__name__} cannot be run in pieces; use strategy='full' or 'auto'")
    options["strategy"] = "prefix" if use_prefix else ("full" if criterion in ("cka", "loss") else "single-pass")

    was_training = {m: m.training for m in model.modules()}
    model.eval()
    model.to(dev)
    try:
        runner = _Runner(model, topo, cands, criterion, dev, amp, use_prefix, gather=shard)
        n_batches = len(batches) if hasattr(batches, "__len__") else None
        for i, batch in enumerate(batches):
            check_cancel(cancel, "scoring")
            x, y = batch[0], batch[1]
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            _split_on_oom(runner.step, x, y)
            progress(i + 1, n_batches, f"{criterion}: batch {i + 1}/{n_batches or '?'}")
        if runner.samples == 0:
            raise ConfigError("the calibration data yielded no images")
        values = _check_finite(criterion, runner.finish(debiased))
    finally:
        for m, mode in was_training.items():
            m.training = mode
    options["samples_expected"] = whole if shard else total_samples
    return Scores(criterion, values, time.perf_counter() - start, runner.samples, options)


class _Runner:
    """Accumulates one criterion over calibration batches."""

    def __init__(self, model: nn.Module, topo: Topology, cands: list[str], criterion: str,
                 device: torch.device, amp: torch.dtype | None, prefix: bool, gather: bool = False):
        self.model, self.topo, self.cands, self.criterion = model, topo, cands, criterion
        self.device, self.amp, self.prefix, self.gather = device, amp, prefix, gather
        self.samples = 0
        self.full: list[torch.Tensor] = []
        self.minus: dict[str, list[torch.Tensor]] = {c: [] for c in cands}
        self.sums = torch.zeros(len(cands), dtype=torch.float64, device=device)
        self.base_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.cand_index = {c: i for i, c in enumerate(cands)}
        self.slot_index = {s: i for i, s in enumerate(topo.slots)}

    # one batch ---------------------------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch; all or nothing, so that an out-of-memory retry on its halves does not count twice."""
        saved = (len(self.full), {c: len(v) for c, v in self.minus.items()}, self.sums.clone(),
                 self.base_loss.clone())
        try:
            self._step(x, y)
        except BaseException:
            del self.full[saved[0]:]
            for c, n in saved[1].items():
                del self.minus[c][n:]
            self.sums.copy_(saved[2])
            self.base_loss.copy_(saved[3])
            raise

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.criterion in ("cka", "loss"):
            with torch.inference_mode(), autocast(self.device, self.amp):
                if self.prefix:
                    self._removal_prefix(x, y)
                else:
                    self._removal_full(x, y)
        elif self.criterion in ("block_influence", "angular"):
            with torch.inference_mode(), autocast(self.device, self.amp):
                self._similarity(x)
        elif self.criterion == "taylor":
            self._taylor(x, y)
        self.samples += len(x)

    def _record(self, name: str | None, feats: torch.Tensor, y: torch.Tensor) -> None:
        if self.criterion == "cka":
            (self.full if name is None else self.minus[name]).append(feats.float())
        else:  # loss: logits
            loss = F.cross_entropy(self.topo.classify(self.model, feats).float(), y, reduction="sum")
            if name is None:
                self.base_loss += loss
            else:
                self.sums[self.cand_index[name]] += loss

    def _removal_prefix(self, x: torch.Tensor, y: torch.Tensor) -> None:
        topo, model = self.topo, self.model
        h = topo.stem(model, x)
        for i, slot in enumerate(topo.slots):
            if slot in self.cand_index:
                self._record(slot, topo.head(model, topo.run_blocks(model, h, start=i + 1)), y)
            h = model.get_submodule(slot)(h)
        self._record(None, topo.head(model, h), y)

    def _removal_full(self, x: torch.Tensor, y: torch.Tensor) -> None:
        feats = _Features(self.model, self.topo.classifier)
        try:
            logits = self.model(x)
            self._record_full(None, feats.value, logits, y)
            for c in self.cands:
                gate = _Gate(self.model, [c])
                try:
                    logits = self.model(x)
                finally:
                    gate.remove()
                self._record_full(c, feats.value, logits, y)
        finally:
            feats.remove()

    def _record_full(self, name: str | None, feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        if self.criterion == "cka":
            (self.full if name is None else self.minus[name]).append(feats.float())
        else:
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            if name is None:
                self.base_loss += loss
            else:
                self.sums[self.cand_index[name]] += loss

    def _similarity(self, x: torch.Tensor) -> None:
        store: dict[str, torch.Tensor] = {}
        handles = []
        for c in self.cands:
            def hook(module, args, out, c=c):
                cos = _cosine(args[0], out).double()
                if self.criterion == "angular":
                    cos = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi
                store[c] = cos.sum()
            handles.append(self.model.get_submodule(c).register_forward_hook(hook))
        try:
            self.model(x)
        finally:
            for h in handles:
                h.remove()
        self.sums += torch.stack([store[c] for c in self.cands])

    def _taylor(self, x: torch.Tensor, y: torch.Tensor) -> None:
        gates = {c: torch.ones((), device=self.device, requires_grad=True) for c in self.cands}
        gate = _Gate(self.model, self.cands, gates)
        try:
            with torch.enable_grad(), autocast(self.device, self.amp):
                loss = F.cross_entropy(self.model(x).float(), y, reduction="sum")
            grads = torch.autograd.grad(loss, [gates[c] for c in self.cands])
        finally:
            gate.remove()
        self.sums += torch.stack(grads).double()

    # result -----------------------------------------------------------------------------------------------------
    def _merge_ranks(self) -> None:
        """Combine the shards of all ranks: gather the features (CKA needs all samples), sum the rest."""
        import torch.distributed as dist

        n = torch.tensor([self.samples], dtype=torch.float64, device=self.device)
        dist.all_reduce(n)
        self.samples = int(n)
        if self.criterion == "cka":
            self.full = [_all_gather_rows(torch.cat(self.full))]
            for c in self.cands:
                self.minus[c] = [_all_gather_rows(torch.cat(self.minus[c]))]
        else:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.base_loss)

    def finish(self, debiased: bool) -> dict[str, float]:
        if self.gather:
            self._merge_ranks()
        n = self.samples
        if self.criterion == "cka":
            full = torch.cat(self.full)
            if not bool(torch.isfinite(full).all()):
                raise ConfigError(
                    "the model's penultimate features contain NaN or Inf on the calibration images, so no block "
                    "can be scored: check the weights (a corrupt or diverged checkpoint), the images (NaN pixels) "
                    "and, on CUDA, try without amp (float16 overflow)"
                )
            out = {}
            for c in self.cands:
                minus = torch.cat(self.minus[c])
                # NaN (reported by _check_finite with the block's name) rather than linear_cka's generic error
                out[c] = 1.0 - linear_cka(full, minus, debiased=debiased) if bool(torch.isfinite(minus).all()) \
                    else math.nan
            return out
        vals = self.sums.cpu()
        if self.criterion == "loss":
            vals = (vals - self.base_loss.cpu()) / n
        elif self.criterion == "block_influence":
            vals = 1.0 - vals / n
        elif self.criterion == "angular":
            vals = vals / n
        elif self.criterion == "taylor":
            vals = vals.abs() / n
        return dict(zip(self.cands, vals.tolist(), strict=True))


def _shard(calibration: Any, rank: int, world: int) -> Any:
    """Every ``world``-th item of the calibration data, starting at ``rank`` (no padding, no duplicates)."""
    from torch.utils.data import Subset

    if isinstance(calibration, Dataset):
        return Subset(calibration, list(range(rank, len(calibration), world)))  # type: ignore[arg-type]
    if isinstance(calibration, torch.Tensor):
        return calibration[rank::world]
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2:
        return calibration[0][rank::world], calibration[1][rank::world]
    return calibration


def _all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate the rows of ``t`` from every rank (ranks may hold different numbers of rows)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=t.device))
    longest = int(max(int(x) for x in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(k)] for p, k in zip(parts, sizes, strict=True)])
