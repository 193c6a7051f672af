"""Choosing which blocks go, and pruning: by hand, one-shot, or iteratively as the paper does.

* :class:`Target` — "remove N blocks", "≥ X % fewer MACs", "≥ X % fewer parameters" or "≥ X % lower latency"
  (predicted from per-block measured costs).
* :func:`plan` — the blocks a one-shot pruning removes for a target, lowest scores first, with the resulting
  MACs and parameters (the dashboard's live preview); :func:`check_reachable` says before any scoring whether a
  target can be met at all.
* :func:`prune` — one-shot (rank once, remove the lowest-scoring blocks until the target is met) or iterative
  (score, remove the best block, let the caller recover the network, rescore, repeat). The :class:`PruneResult`
  records the order of removal and every step's scores, MACs, parameters and accuracy.
* :class:`ResumeStore` — what a run finished (scores, each iterative step), kept on disk so a killed run goes on.

Recovery (fine-tuning) is not done here: the caller plugs it in through :class:`PruneHooks` (the workflow in
:mod:`cka_analysis.workflow` does, with :mod:`cka_analysis.recovery`).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .blocks import Block, find_blocks, remove_blocks
from .choices import parse_reduction
from .errors import Cancelled, CheckpointError, ConfigError, TargetError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress
from .records import RecoveryRecord
from .scoring import Scores, ScoringOptions, score_blocks

__all__ = [
    "Plan",
    "PruneHooks",
    "PruneResult",
    "PruneStep",
    "ResumeStore",
    "ScoringOptions",
    "Target",
    "check_reachable",
    "plan",
    "prune",
]

_KINDS = ("blocks", "macs", "params", "latency")
_KIND_WORDS = {"macs": "MACs", "params": "parameters"}


@dataclass(frozen=True)
class Target:
    """How much to prune: ``kind`` is ``"blocks"`` (value = a count), ``"macs"``, ``"params"`` or ``"latency"``
    (value = the fraction to remove, 0–1; latency is predicted from per-block measured costs given to
    :func:`plan`)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"target kind {self.kind!r} must be 'blocks', 'macs', 'params' or 'latency'")
        if self.kind == "blocks":
            if self.value != int(self.value) or self.value < 1:
                raise ConfigError(f"the number of blocks to remove must be a whole number ≥ 1, got {self.value}")
        elif not 0 < self.value < 1:
            what = {"macs": "MACS", "params": "parameter", "latency": "latency"}[self.kind]
            raise ConfigError(
                f"a {what} reduction must be a fraction between 0 and 1 (e.g. 0.5 for 50 %), got {self.value}"
            )

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"3"`` / ``"3 blocks"`` → 3 blocks; ``"macs:50%"``, ``"macs:0.5"``, ``"macs:50"``, ``"params:40%"``,
        ``"latency:30%"`` (the reduction read by :func:`~cka_analysis.choices.parse_reduction`, as the command
        line's ``--target-*-reduction``: a number above 1 is percent)."""
        t = text.strip().lower()
        m = re.fullmatch(r"(macs|params|latency)\s*[:=]\s*([0-9.]+\s*%?)", t)
        if m:
            return cls(m.group(1), parse_reduction(m.group(2)))
        m = re.fullmatch(r"(\d+)(\s*blocks?)?", t)
        if m:
            return cls("blocks", int(m.group(1)))
        raise ConfigError(f"target {text!r} is not understood; use e.g. '3 blocks', 'macs:50%' or 'params:0.4'")

    def met(self, removed: int, macs_reduction: float, params_reduction: float,
            latency_reduction: float = 0.0) -> bool:
        """Whether removing ``removed`` blocks with these reductions (fractions) meets the target."""
        if self.kind == "blocks":
            return removed >= self.value
        got = {"macs": macs_reduction, "params": params_reduction, "latency": latency_reduction}[self.kind]
        return got >= self.value - 1e-12

    def describe(self) -> str:
        if self.kind == "blocks":
            return f"remove {int(self.value)} block(s)"
        if self.kind == "latency":
            return f"≥ {self.value * 100:g} % lower latency"
        return f"≥ {self.value * 100:g} % fewer {_KIND_WORDS[self.kind]}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": int(self.value) if self.kind == "blocks" else self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        """The target :meth:`to_dict` wrote (``{"kind", "value"}``)."""
        return cls(str(d["kind"]), d["value"])


@dataclass
class Plan:
    """The outcome of removing ``blocks`` (in this order) from a model with ``base_macs``/``base_params``
    (and, for latency targets, ``base_latency`` in the unit of the block costs)."""

    blocks: list[str]
    base_macs: int
    base_params: int
    macs: int
    params: int
    base_latency: float | None = None
    latency: float | None = None

    @property
    def macs_reduction(self) -> float:
        return 1 - self.macs / self.base_macs if self.base_macs else 0.0

    @property
    def params_reduction(self) -> float:
        return 1 - self.params / self.base_params if self.base_params else 0.0

    @property
    def latency_reduction(self) -> float:
        if not self.base_latency or self.latency is None:
            return 0.0
        return 1 - self.latency / self.base_latency

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_reduction": self.macs_reduction, "params_reduction": self.params_reduction,
                "latency_reduction": self.latency_reduction}


class _Ledger:
    """Costs left after removing blocks one by one (MACs, parameters, predicted latency)."""

    def __init__(self, blocks: Mapping[str, Block], base_macs: int, base_params: int,
                 block_costs: Mapping[str, float] | None, base_latency: float | None) -> None:
        self.blocks, self.costs = blocks, block_costs
        self.base_macs, self.base_params, self.base_latency = base_macs, base_params, base_latency
        self.order: list[str] = []

    def add(self, name: str) -> None:
        self.order.append(name)

    def plan(self) -> Plan:
        macs = self.base_macs - sum(self.blocks[n].macs for n in self.order)
        params = self.base_params - sum(self.blocks[n].params for n in self.order)
        latency = None
        if self.base_latency is not None and self.costs is not None:
            latency = self.base_latency - sum(float(self.costs.get(n, 0.0)) for n in self.order)
        return Plan(list(self.order), self.base_macs, self.base_params, macs, params, self.base_latency, latency)

    def met(self, target: Target) -> bool:
        p = self.plan()
        return target.met(len(p.blocks), p.macs_reduction, p.params_reduction, p.latency_reduction)


def _check_latency_inputs(target: Target | None, block_costs: Mapping[str, float] | None,
                          base_latency: float | None) -> None:
    if target is not None and target.kind == "latency" and (block_costs is None or not base_latency):
        raise ConfigError("a latency target needs block_costs (measured latency of each block) and base_latency "
                          "(of the whole model); measure them with cka_analysis.latency")


def _check_chosen(by_name: Mapping[str, Block], chosen: Sequence[str]) -> list[str]:
    for n in chosen:
        if n not in by_name:
            raise ConfigError(
                f"{n!r} is not a block of this model; blocks are: " + ", ".join(list(by_name)[:12])
                + (" ..." if len(by_name) > 12 else "")
            )
        if not by_name[n].removable:
            raise ConfigError(f"block {n!r} cannot be removed: {by_name[n].reason}")
    if not chosen:
        raise ConfigError("the list of blocks to remove is empty; name at least one removable block")
    return list(dict.fromkeys(chosen))


def plan(
    blocks: Sequence[Block],
    scores: Scores | Mapping[str, float] | None,
    target: Target | None = None,
    *,
    base_macs: int,
    base_params: int,
    chosen: Sequence[str] | None = None,
    block_costs: Mapping[str, float] | None = None,
    base_latency: float | None = None,
) -> Plan:
    """Which blocks a one-shot pruning removes, and what is left.

    Either ``chosen`` names the blocks (by hand) or ``target`` is met by taking removable blocks in increasing
    score order (ties: forward order). ``block_costs`` (measured latency of each block) and ``base_latency`` are
    needed for a latency target: the predicted latency is the base minus the removed blocks' costs. Raises
    TargetError when the target cannot be met with the removable blocks, saying how far they go.
    """
    by_name = {b.name: b for b in blocks}
    ledger = _Ledger(by_name, base_macs, base_params, block_costs, base_latency)
    if chosen is not None:
        for n in _check_chosen(by_name, chosen):
            ledger.add(n)
        return ledger.plan()
    if target is None:
        raise ConfigError("give either a target or the blocks to remove")
    _check_latency_inputs(target, block_costs, base_latency)
    vals = scores.scores if isinstance(scores, Scores) else (scores or {})
    removable = [b.name for b in blocks if b.removable]
    missing = [n for n in removable if n not in vals]
    if missing:
        raise ConfigError(f"no score for removable blocks {missing[:5]}")
    fwd = {n: i for i, n in enumerate(removable)}
    for n in sorted(removable, key=lambda n: (vals[n], fwd[n])):
        if ledger.met(target):
            break
        ledger.add(n)
    if not ledger.met(target):
        p = ledger.plan()
        raise TargetError(
            f"the target ({target.describe()}) cannot be met: removing all {len(removable)} removable blocks "
            f"gives {100 * p.macs_reduction:.1f} % fewer MACs and {100 * p.params_reduction:.1f} % fewer "
            "parameters; choose a smaller target"
        )
    return ledger.plan()


def check_reachable(
    blocks: Sequence[Block],
    target: Target,
    *,
    base_macs: int,
    base_params: int,
    block_costs: Mapping[str, float] | None = None,
    base_latency: float | None = None,
) -> None:
    """Raise TargetError when even removing every removable block cannot meet ``target``.

    Known from the blocks' costs alone, so a run can refuse an impossible target before scoring anything.
    """
    uniform = {b.name: 0.0 for b in blocks if b.removable}
    plan(blocks, uniform, target, base_macs=base_macs, base_params=base_params, block_costs=block_costs,
         base_latency=base_latency)


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PruneStep:
    """One step of a pruning run: what was removed and the state of the model after it (step 0 = unpruned).

    ``recovery`` is the :class:`~cka_analysis.records.RecoveryRecord` of the recovery run after this step's removal,
    when there was one.
    """

    step: int
    removed: list[str]
    macs: int
    params: int
    accuracy: float | None = None
    scores: dict[str, float] | None = None
    recovery: RecoveryRecord | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "removed": list(self.removed), "macs": self.macs, "params": self.params,
                "accuracy": self.accuracy, "scores": None if self.scores is None else dict(self.scores),
                "recovery": None if self.recovery is None else self.recovery.to_dict(), "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PruneStep:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if isinstance(known.get("recovery"), Mapping):
            known["recovery"] = RecoveryRecord.from_dict(known["recovery"])
        return cls(**known)


@dataclass
class PruneResult:
    """A pruned model and the record of how it was obtained (JSON-ready through :meth:`to_dict`).

    ``steps[0]`` is the unpruned model, ``steps[-1]`` the pruned one right after its last removal. ``seconds`` is
    the wall time; of a run resumed from a :class:`ResumeStore` it includes ``resumed_seconds``, the time the
    restored parts took when they ran (the saved iterative steps, or the reused scores of a one-shot run).
    """

    model: nn.Module
    arch: str
    criterion: str | None
    iterative: bool
    target: Target | None
    removed: list[str] = field(default_factory=list)
    steps: list[PruneStep] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0
    resumed_seconds: float = 0.0

    @property
    def base(self) -> dict[str, Any]:
        s = self.steps[0]
        return {"macs": s.macs, "params": s.params, "accuracy": s.accuracy}

    @property
    def final(self) -> dict[str, Any]:
        """Costs and accuracy right after the last removal, with the reductions (fractions)."""
        s, b = self.steps[-1], self.steps[0]
        return {"macs": s.macs, "params": s.params, "accuracy": s.accuracy,
                "macs_reduction": 1 - s.macs / b.macs if b.macs else 0.0,
                "params_reduction": 1 - s.params / b.params if b.params else 0.0,
                "removed": list(self.removed)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch, "criterion": self.criterion, "iterative": self.iterative,
            "target": None if self.target is None else self.target.to_dict(), "removed": list(self.removed),
            "steps": [s.to_dict() for s in self.steps], "base": self.base, "final": self.final,
            "cancelled": self.cancelled, "seconds": self.seconds,
        }


# ---------------------------------------------------------------------------------------------------------------
# Resumable runs: what a killed run had finished
# ---------------------------------------------------------------------------------------------------------------


class ResumeStore:
    """The finished parts of one pruning run in a directory: ``scores.json`` (one-shot scores),
    ``iterative.json`` + ``iterative.safetensors`` (the model after the last finished iterative step), and
    whatever the caller names with :meth:`path` (the recovery checkpoint).

    ``key`` identifies the run's settings; a saved part written under another key is refused with a message.
    Nothing is created on disk until the first save, so a run that fails on bad input leaves no directory.
    Only the main process writes (torchrun).
    """

    def __init__(self, directory: str | Path, key: Mapping[str, Any], *, resume: bool = False) -> None:
        self.directory = Path(directory)
        self.key = json.loads(json.dumps(dict(key), default=str))
        self.resume = resume

    def path(self, name: str) -> Path:
        """Where the part ``name`` lives (the directory is created by the writer)."""
        return self.directory / name

    def clear(self) -> None:
        """Delete the directory (after a finished run)."""
        if self.directory.is_dir():
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------- writing
    def _writer(self) -> bool:
        from .distributed import is_main_process

        if not is_main_process():
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        return True

    def _write_json(self, name: str, payload: dict[str, Any]) -> None:
        if not self._writer():
            return
        tmp = self.path(name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, **payload}, indent=1, default=str))
        tmp.replace(self.path(name))

    def save_scores(self, scores: Scores) -> None:
        self._write_json("scores.json", {"scores": scores.to_dict()})

    def save_iterative(self, model: nn.Module, result: PruneResult) -> None:
        if not self._writer():
            return
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        tmp = self.path("iterative.safetensors.tmp")
        save_file(state, str(tmp))
        tmp.replace(self.path("iterative.safetensors"))
        self._write_json("iterative.json", {"removed": result.removed, "steps": [s.to_dict() for s in result.steps]})

    # ------------------------------------------------------------------------------------------------- reading
    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        if not self.resume or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot resume: {path} is unreadable ({exc}); delete it to start over") from exc
        if not isinstance(data, dict):
            return None
        if data.get("key") != self.key:
            raise CheckpointError(
                f"cannot resume: {path} was written by a run with other settings ({data.get('key')}); "
                "rerun with the same settings, or without --resume to start over"
            )
        return data

    def load_scores(self) -> Scores | None:
        saved = self._read("scores.json")
        if saved is None:
            return None
        return Scores.from_dict(saved["scores"])

    def iterative_removed(self) -> list[str] | None:
        """The blocks the saved iterative steps removed, without loading their weights (None when none saved)."""
        saved = self._read("iterative.json")
        return None if saved is None else list(saved["removed"])

    def load_iterative(self, model: nn.Module) -> tuple[nn.Module, list[str], list[PruneStep]] | None:
        """The model after the last saved step (``model`` with those blocks removed and the saved weights)."""
        saved = self._read("iterative.json")
        if saved is None:
            return None
        from .checkpoints import load_weights, read_state_dict

        current = remove_blocks(model, saved["removed"])
        load_weights(current, read_state_dict(self.path("iterative.safetensors")), source=str(self.directory))
        return current, list(saved["removed"]), [PruneStep.from_dict(s) for s in saved["steps"]]


# ---------------------------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PruneHooks:
    """What a caller plugs into :func:`prune`.

    Attributes:
        evaluate: accuracy (%) of a model on the caller's test images; None skips accuracies.
        evaluate_steps: also evaluate after every step (otherwise only the unpruned model and the last step).
        after_removal: called with the model and the step number after each iterative removal (e.g. a short
            recovery run, in place); returns a JSON-ready record of what it did (stored in the step) and may
            raise Cancelled.
        store: keep finished parts here so that a killed run can go on (:class:`ResumeStore`).
        block_costs, base_latency: measured per-block latency and the whole model's, for a latency target.
    """

    evaluate: Callable[[nn.Module], float | None] | None = None
    evaluate_steps: bool = True
    after_removal: Callable[[nn.Module, int], RecoveryRecord | None] | None = None
    store: ResumeStore | None = None
    block_costs: Mapping[str, float] | None = None
    base_latency: float | None = None


def _model_costs(model: nn.Module) -> tuple[int, int]:
    from .metrics import count_macs, count_params

    return count_macs(model, model.cka_preset.input_size), count_params(model)


class _Run:
    """The state one :func:`prune` call works on: the scorer, the hooks and the result being filled in."""

    def __init__(self, model: nn.Module, calibration: Any, criterion: str, scoring: ScoringOptions,
                 hooks: PruneHooks, progress: ProgressFn, cancel: CancelToken | None) -> None:
        self.calibration, self.criterion, self.scoring = calibration, criterion, scoring
        self.hooks, self.progress, self.cancel = hooks, progress, cancel
        self.blocks = find_blocks(model)
        self.base_macs, self.base_params = _model_costs(model)

    def score(self, model: nn.Module) -> Scores:
        return score_blocks(model, self.calibration, self.criterion, options=self.scoring, progress=self.progress,
                            cancel=self.cancel)

    def accuracy(self, model: nn.Module, *, step: bool = True) -> float | None:
        if self.hooks.evaluate is None or (step and not self.hooks.evaluate_steps):
            return None
        return self.hooks.evaluate(model)

    def ledger(self) -> _Ledger:
        return _Ledger({b.name: b for b in self.blocks}, self.base_macs, self.base_params,
                       self.hooks.block_costs, self.hooks.base_latency)


def _one_shot(run: _Run, model: nn.Module, result: PruneResult, target: Target | None,
              chosen: Sequence[str] | None) -> None:
    """Rank once (unless the blocks are chosen), remove the plan's blocks, record step 1."""
    scores = None
    if chosen is None:
        store = run.hooks.store
        scores = store.load_scores() if store is not None else None
        if scores is None:
            run.progress(0, None, f"scoring blocks ({run.criterion})")
            scores = run.score(model)
            if store is not None:
                store.save_scores(scores)
        else:
            run.progress(0, None, f"reusing the {run.criterion} scores of the interrupted run")
            result.resumed_seconds = float(scores.seconds)
    p = plan(run.blocks, scores, target, base_macs=run.base_macs, base_params=run.base_params, chosen=chosen,
             block_costs=run.hooks.block_costs, base_latency=run.hooks.base_latency)
    pruned = remove_blocks(model, p.blocks)
    macs, params = _model_costs(pruned)
    result.model, result.removed = pruned, list(p.blocks)
    result.steps.append(PruneStep(1, list(p.blocks), macs, params, run.accuracy(pruned, step=False),
                                  None if scores is None else dict(scores.scores),
                                  seconds=0.0 if scores is None else scores.seconds))


def _resume_iterative(run: _Run, model: nn.Module, result: PruneResult) -> nn.Module:
    store = run.hooks.store
    restored = store.load_iterative(model) if store is not None else None
    if restored is None:
        return model
    current, result.removed, result.steps = restored
    result.model = current
    result.resumed_seconds = float(sum(s.seconds for s in result.steps))
    run.progress(len(result.steps) - 1, None,
                 f"resumed after step {len(result.steps) - 1} ({', '.join(result.removed)} removed)")
    return current


def _iterative(run: _Run, model: nn.Module, result: PruneResult, target: Target) -> None:
    """Score, remove the best block, let ``after_removal`` recover, rescore … until the target is met."""
    current = _resume_iterative(run, model, result)
    ledger = run.ledger()
    for name in result.removed:
        ledger.add(name)
    while not ledger.met(target):
        check_cancel(run.cancel, "pruning")
        if not any(b.removable for b in find_blocks(current, count_macs=False)):
            p = ledger.plan()
            raise TargetError(
                f"the target ({target.describe()}) cannot be met: no removable block is left after removing "
                f"{len(result.removed)} ({100 * p.macs_reduction:.1f} % fewer MACs)"
            )
        step = len(result.steps)
        run.progress(step - 1, None, f"step {step}: scoring blocks ({run.criterion})")
        t0 = time.perf_counter()
        scores = run.score(current)
        best = scores.ranking()[0]
        current = remove_blocks(current, [best])
        result.model = current
        result.removed.append(best)
        ledger.add(best)
        record = PruneStep(step, [best], *_model_costs(current), scores=dict(scores.scores))
        result.steps.append(record)
        if run.hooks.after_removal is not None:
            record.recovery = run.hooks.after_removal(current, step)
        record.accuracy = run.accuracy(current, step=not ledger.met(target))
        # a step whose recovery went on from a checkpoint: its time before the resume too
        record.seconds = time.perf_counter() - t0 + (record.recovery.resumed_seconds if record.recovery else 0.0)
        if run.hooks.store is not None:
            run.hooks.store.save_iterative(current, result)
        if record.recovery is not None and record.recovery.cancelled:
            raise Cancelled("pruning was cancelled during a recovery step")


def prune(
    model: nn.Module,
    calibration: Any = None,
    *,
    target: Target | str | None = None,
    blocks_to_remove: Sequence[str] | None = None,
    criterion: str = "cka",
    iterative: bool = False,
    scoring: ScoringOptions | None = None,
    hooks: PruneHooks | None = None,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> PruneResult:
    """Prune a copy of ``model`` and return it with its record; ``model`` itself is not modified or moved.

    Args:
        model: a registry model (carrying its preset).
        calibration: calibration images from the training split (see :func:`score_blocks`); not needed when
            ``blocks_to_remove`` is given or for data-free criteria.
        target: :class:`Target` (or text for :meth:`Target.parse`): the reduction to reach; checked against the
            blocks' costs before any scoring (TargetError when out of reach).
        blocks_to_remove: remove exactly these blocks instead of following a target.
        criterion: removal criterion (:data:`~cka_analysis.scoring.CRITERIA`).
        iterative: rescore after each removal (calling ``hooks.after_removal`` in between), as in the paper;
            otherwise rank once.
        scoring: how to score (:class:`ScoringOptions`).
        hooks: accuracy, per-step recovery, resume store, latency costs (:class:`PruneHooks`).
        progress, cancel: reported / honoured throughout; a cancel keeps the blocks removed so far and sets
            ``result.cancelled``.
    """
    if isinstance(target, str):
        target = Target.parse(target)
    if (target is None) == (blocks_to_remove is None):
        raise ConfigError("give exactly one of target (how much to prune) or blocks_to_remove (which blocks)")
    start = time.perf_counter()
    work = copy.deepcopy(model)  # scoring and evaluation move models to the device: never the caller's
    hooks = hooks or PruneHooks()
    run = _Run(work, calibration, criterion, scoring or ScoringOptions(), hooks, progress or no_progress, cancel)
    if blocks_to_remove is not None:
        _check_chosen({b.name: b for b in run.blocks}, list(blocks_to_remove))
    else:
        _check_latency_inputs(target, hooks.block_costs, hooks.base_latency)
        check_reachable(run.blocks, target, base_macs=run.base_macs, base_params=run.base_params,
                        block_costs=hooks.block_costs, base_latency=hooks.base_latency)
    result = PruneResult(model=work, arch=work.cka_preset.arch, criterion=None if blocks_to_remove else criterion,
                         iterative=iterative and blocks_to_remove is None, target=target)
    result.steps.append(PruneStep(0, [], run.base_macs, run.base_params, run.accuracy(work, step=False)))
    try:
        if result.iterative:
            _iterative(run, work, result, target)
        else:
            _one_shot(run, work, result, target, blocks_to_remove)
    except Cancelled:
        result.cancelled = True
    result.seconds = time.perf_counter() - start + result.resumed_seconds
    return result
