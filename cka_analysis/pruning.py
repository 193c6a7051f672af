"""Choosing which blocks go, and pruning: by hand, one-shot, or iteratively as the paper does.

* :class:`Target` — "remove N blocks", "≥ X % fewer MACs" or "≥ X % fewer parameters".
* :func:`plan` — the blocks a one-shot pruning would remove for a target, lowest scores first, with the resulting
  MACs and parameters (the dashboard's live preview).
* :func:`prune` — one-shot (rank once, remove the lowest-scoring blocks until the target is met) or iterative
  (score, remove the best block, fine-tune briefly, rescore, repeat), optionally followed by a final fine-tune.
  The :class:`PruneResult` records the order of removal and every step's scores, MACs, parameters and accuracy.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .blocks import Block, find_blocks, remove_blocks, removed_blocks
from .errors import Cancelled, CheckpointError, ConfigError, TargetError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress
from .scoring import Scores, score_blocks
from .training import FinetuneConfig, finetune

__all__ = ["Plan", "PruneResult", "PruneStep", "Target", "plan", "prune"]


@dataclass(frozen=True)
class Target:
    """How much to prune: ``kind`` is ``"blocks"`` (value = a count), ``"macs"`` or ``"params"`` (value = the
    fraction to remove, 0–1)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("blocks", "macs", "params"):
            raise ConfigError(f"target kind {self.kind!r} must be 'blocks', 'macs' or 'params'")
        if self.kind == "blocks":
            if self.value != int(self.value) or self.value < 1:
                raise ConfigError(f"the number of blocks to remove must be a whole number ≥ 1, got {self.value}")
        elif not 0 < self.value < 1:
            raise ConfigError(
                f"a {self.kind.upper() if self.kind == 'macs' else 'parameter'} reduction must be a fraction "
                f"between 0 and 1 (e.g. 0.5 for 50 %), got {self.value}"
            )

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"3"`` / ``"3 blocks"`` → 3 blocks; ``"macs:50%"``, ``"macs:0.5"``, ``"params:40%"``."""
        t = text.strip().lower()
        m = re.fullmatch(r"(macs|params)\s*[:=]\s*([0-9.]+)\s*(%?)", t)
        if m:
            v = float(m.group(2)) / (100 if m.group(3) else 1)
            return cls(m.group(1), v)
        m = re.fullmatch(r"(\d+)(\s*blocks?)?", t)
        if m:
            return cls("blocks", int(m.group(1)))
        raise ConfigError(f"target {text!r} is not understood; use e.g. '3 blocks', 'macs:50%' or 'params:0.4'")

    def met(self, removed: int, macs_reduction: float, params_reduction: float) -> bool:
        if self.kind == "blocks":
            return removed >= self.value
        return (macs_reduction if self.kind == "macs" else params_reduction) >= self.value - 1e-12

    def describe(self) -> str:
        if self.kind == "blocks":
            return f"remove {int(self.value)} block(s)"
        return f"≥ {self.value * 100:g} % fewer {'MACs' if self.kind == 'macs' else 'parameters'}"


@dataclass
class Plan:
    """The outcome of removing ``blocks`` (in this order) from a model with ``base_macs``/``base_params``."""

    blocks: list[str]
    base_macs: int
    base_params: int
    macs: int
    params: int

    @property
    def macs_reduction(self) -> float:
        return 1 - self.macs / self.base_macs if self.base_macs else 0.0

    @property
    def params_reduction(self) -> float:
        return 1 - self.params / self.base_params if self.base_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "macs_reduction": self.macs_reduction, "params_reduction": self.params_reduction}


def _model_costs(model: nn.Module) -> tuple[int, int]:
    from .metrics import count_macs, count_params

    return count_macs(model, model.cka_preset.input_size), count_params(model)


def plan(
    blocks: Sequence[Block],
    scores: Scores | dict[str, float] | None,
    target: Target | None = None,
    *,
    base_macs: int,
    base_params: int,
    chosen: Sequence[str] | None = None,
) -> Plan:
    """Which blocks a one-shot pruning removes, and what is left.

    Either ``chosen`` names the blocks (by hand) or ``target`` is met by taking removable blocks in increasing
    score order. Raises TargetError when the target cannot be met with the removable blocks, saying how far they go.
    """
    by_name = {b.name: b for b in blocks}
    if chosen is not None:
        for n in chosen:
            if n not in by_name:
                raise ConfigError(f"{n!r} is not a block of this model")
            if not by_name[n].removable:
                raise ConfigError(f"block {n!r} cannot be removed: {by_name[n].reason}")
        order = list(dict.fromkeys(chosen))
    else:
        if target is None:
            raise ConfigError("give either a target or the blocks to remove")
        vals = scores.scores if isinstance(scores, Scores) else (scores or {})
        removable = [b.name for b in blocks if b.removable]
        missing = [n for n in removable if n not in vals]
        if missing:
            raise ConfigError(f"no score for removable blocks {missing[:5]}")
        fwd = {n: i for i, n in enumerate(removable)}
        ranked = sorted(removable, key=lambda n: (vals[n], fwd[n]))
        order = []
        macs, params = base_macs, base_params
        for n in ranked:
            if target.met(len(order), 1 - macs / base_macs, 1 - params / base_params):
                break
            order.append(n)
            macs -= by_name[n].macs
            params -= by_name[n].params
        if not target.met(len(order), 1 - macs / base_macs, 1 - params / base_params):
            raise TargetError(
                f"the target ({target.describe()}) cannot be met: removing all {len(removable)} removable blocks "
                f"gives {100 * (1 - macs / base_macs):.1f} % fewer MACs and "
                f"{100 * (1 - params / base_params):.1f} % fewer parameters"
            )
    macs = base_macs - sum(by_name[n].macs for n in order)
    params = base_params - sum(by_name[n].params for n in order)
    return Plan(order, base_macs, base_params, macs, params)


@dataclass
class PruneStep:
    """One step of a pruning run: what was removed and the state of the model after it (step 0 = unpruned)."""

    step: int
    removed: list[str]
    macs: int
    params: int
    accuracy: float | None = None
    scores: dict[str, float] | None = None
    finetune: dict[str, Any] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    """A pruned model and the record of how it was obtained (JSON-ready through :meth:`to_dict`)."""

    model: nn.Module
    arch: str
    criterion: str | None
    iterative: bool
    target: Target | None
    removed: list[str]
    steps: list[PruneStep] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "criterion": self.criterion,
            "iterative": self.iterative,
            "target": None if self.target is None else asdict(self.target),
            "removed": self.removed,
            "steps": [s.to_dict() for s in self.steps],
            "base": self.base,
            "final": self.final,
            "finetune": self.finetune,
            "options": self.options,
            "cancelled": self.cancelled,
            "seconds": self.seconds,
        }


def _accuracy(model: nn.Module, loader: DataLoader | None, device: Any, samples: int | None) -> float | None:
    if loader is None:
        return None
    from .metrics import evaluate

    return evaluate(model, loader, device=device, max_samples=samples).top1


def prune(
    model: nn.Module,
    calibration: Any = None,
    *,
    target: Target | str | None = None,
    blocks_to_remove: Sequence[str] | None = None,
    criterion: str = "cka",
    iterative: bool = False,
    debiased: bool = False,
    train_loader: DataLoader | None = None,
    finetune_config: FinetuneConfig | None = None,
    step_finetune_config: FinetuneConfig | None = None,
    distill: bool = False,
    eval_loader: DataLoader | None = None,
    eval_samples: int | None = None,
    eval_steps: bool = True,
    batch_size: int = 128,
    device: str | torch.device = "auto",
    amp: torch.dtype | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> PruneResult:
    """Prune ``model`` (not modified) and return the pruned copy with its record.

    Args:
        model: a registry model (carrying its preset).
        calibration: calibration images from the training split (see :func:`score_blocks`); not needed when
            ``blocks_to_remove`` is given or for data-free criteria.
        target: :class:`Target` (or text for :meth:`Target.parse`): the reduction to reach.
        blocks_to_remove: remove exactly these blocks instead of following a target.
        criterion: removal criterion (:data:`~cka_analysis.scoring.CRITERIA`).
        iterative: rescore after each removal (and fine-tune briefly with ``step_finetune_config`` when a
            ``train_loader`` is given), as in the paper; otherwise rank once.
        train_loader, finetune_config: final fine-tune of the pruned model (skipped when either is None or the
            budget is zero).
        distill: distil from the unpruned model during fine-tuning.
        eval_loader, eval_samples, eval_steps: accuracy of the base model, after each step (when ``eval_steps``),
            and of the final model.
        progress, cancel: reported / honoured throughout; a cancel keeps the blocks removed so far and the best
            fine-tuned weights, and sets ``result.cancelled``.
        checkpoint_dir: keep the finished parts of the run here (scores, each iterative step's model, the
            fine-tuning state) so that a killed run can go on with ``resume=True`` from where it stopped.
        resume: reuse what ``checkpoint_dir`` holds from an earlier run with the same settings.
    """
    progress = progress or no_progress
    start = time.perf_counter()
    if isinstance(target, str):
        target = Target.parse(target)
    if (target is None) == (blocks_to_remove is None):
        raise ConfigError("give exactly one of target (how much to prune) or blocks_to_remove (which blocks)")
    arch = model.cka_preset.arch
    base_macs, base_params = _model_costs(model)
    base_acc = _accuracy(model, eval_loader, device, eval_samples)
    result = PruneResult(model=model, arch=arch, criterion=None if blocks_to_remove else criterion,
                         iterative=iterative, target=target, removed=[],
                         base={"macs": base_macs, "params": base_params, "accuracy": base_acc},
                         options={"debiased": debiased, "seed": seed, "distill": distill,
                                  "eval_samples": eval_samples})
    result.steps.append(PruneStep(0, [], base_macs, base_params, base_acc))
    score_kw = {"debiased": debiased, "batch_size": batch_size, "device": device, "amp": amp, "seed": seed}
    current = model
    current_acc = base_acc  # accuracy of ``current`` when known (None: not measured yet)
    teacher = model if distill else None
    if distill:  # ``distill`` turns distillation on for every fine-tune of this run
        finetune_config = None if finetune_config is None else replace(finetune_config, distill=True)
        step_finetune_config = None if step_finetune_config is None else replace(step_finetune_config, distill=True)
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
    run_key = {"arch": arch, "criterion": criterion, "debiased": debiased, "seed": seed, "iterative": iterative,
               "target": None if target is None else asdict(target), "removed_base": removed_blocks(model)}
    try:
        if not iterative or blocks_to_remove is not None:
            blocks = find_blocks(model)
            scores = None
            if blocks_to_remove is None:
                scores = _load_scores(ckdir, run_key) if resume else None
                if scores is None:
                    progress(0, None, f"scoring blocks ({criterion})")
                    scores = score_blocks(model, calibration, criterion, progress=progress, cancel=cancel,
                                          **score_kw)
                    _save_json(ckdir, "scores.json", {"key": run_key, "scores": scores.to_dict()})
                else:
                    progress(0, None, f"reusing the {criterion} scores of the interrupted run")
            p = plan(blocks, scores, target, base_macs=base_macs, base_params=base_params, chosen=blocks_to_remove)
            current = remove_blocks(model, p.blocks)
            macs, params = _model_costs(current)
            acc = current_acc = _accuracy(current, eval_loader, device, eval_samples) if eval_steps else None
            result.steps.append(PruneStep(1, list(p.blocks), macs, params, acc,
                                          None if scores is None else dict(scores.scores),
                                          seconds=0.0 if scores is None else scores.seconds))
            result.removed = list(p.blocks)
        else:
            step = 0
            if resume:
                restored = _load_iterative(ckdir, run_key, model)
                if restored is not None:
                    current, result.removed, saved_steps = restored
                    result.steps = [PruneStep(**d) for d in saved_steps]
                    current_acc = result.steps[-1].accuracy
                    step = len(result.steps) - 1
                    progress(step, None, f"resumed after step {step} ({', '.join(result.removed)} removed)")
            while True:
                macs, params = _model_costs(current)
                if target.met(len(result.removed), 1 - macs / base_macs, 1 - params / base_params):
                    break
                blocks = find_blocks(current)
                if not any(b.removable for b in blocks):
                    raise TargetError(
                        f"the target ({target.describe()}) cannot be met: no removable block is left after "
                        f"removing {len(result.removed)} ({100 * (1 - macs / base_macs):.1f} % fewer MACs)"
                    )
                check_cancel(cancel, "pruning")
                step += 1
                progress(step - 1, None, f"step {step}: scoring blocks ({criterion})")
                t0 = time.perf_counter()
                scores = score_blocks(current, calibration, criterion, progress=progress, cancel=cancel, **score_kw)
                best = scores.ranking()[0]
                current, current_acc = remove_blocks(current, [best]), None
                result.removed.append(best)
                ft = None
                if train_loader is not None and step_finetune_config is not None:
                    r = finetune(current, train_loader, step_finetune_config, teacher=teacher, device=device,
                                 progress=progress, cancel=cancel)
                    ft = r.to_dict()
                    if r.cancelled:
                        raise Cancelled("pruning was cancelled during a fine-tuning step")
                macs, params = _model_costs(current)
                acc = current_acc = _accuracy(current, eval_loader, device, eval_samples) if eval_steps else None
                result.steps.append(PruneStep(step, [best], macs, params, acc, dict(scores.scores), ft,
                                              time.perf_counter() - t0))
                _save_iterative(ckdir, run_key, current, result)
        if train_loader is not None and finetune_config is not None and (
            finetune_config.steps or (finetune_config.steps is None and finetune_config.epochs > 0)
        ):
            check_cancel(cancel, "pruning")
            progress(0, None, "fine-tuning the pruned model")
            r = finetune(current, train_loader, finetune_config, teacher=teacher, eval_loader=eval_loader,
                         eval_samples=eval_samples, device=device, progress=progress, cancel=cancel,
                         checkpoint_path=None if ckdir is None else ckdir / "finetune.pt", resume=resume)
            result.finetune = {"config": finetune_config.to_dict(), **r.to_dict()}
            result.cancelled = r.cancelled
            current_acc = None
    except Cancelled:
        result.cancelled = True
    result.model = current
    macs, params = _model_costs(current)
    # the last step's accuracy is the final one unless the model changed since (fine-tuning, a cancel mid-step)
    final_acc = current_acc if current_acc is not None else _accuracy(current, eval_loader, device, eval_samples)
    result.final = {
        "macs": macs,
        "params": params,
        "accuracy": final_acc,
        "macs_reduction": 1 - macs / base_macs,
        "params_reduction": 1 - params / base_params,
        "removed": removed_blocks(current),
    }
    result.seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------------------------
# Resumable runs: what a killed run had finished
# ---------------------------------------------------------------------------------------------------------------


def _save_json(ckdir: Path | None, name: str, payload: dict[str, Any]) -> None:
    if ckdir is None:
        return
    from .distributed import is_main_process

    if not is_main_process():
        return
    tmp = ckdir / (name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(ckdir / name)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot resume: {path} is unreadable ({exc}); delete it to start over") from exc
    return data if isinstance(data, dict) else None


def _check_same_run(saved: dict[str, Any], key: dict[str, Any], path: Path) -> None:
    if json.loads(json.dumps(key, default=str)) != saved.get("key"):
        raise CheckpointError(
            f"cannot resume: {path} was written by a run with other settings ({saved.get('key')}); "
            "rerun with the same settings, or without --resume to start over"
        )


def _load_scores(ckdir: Path | None, key: dict[str, Any]) -> Scores | None:
    if ckdir is None:
        return None
    path = ckdir / "scores.json"
    saved = _read_json(path)
    if saved is None:
        return None
    _check_same_run(saved, key, path)
    d = saved["scores"]
    return Scores(d["criterion"], {k: float(v) for k, v in d["scores"].items()}, float(d["seconds"]),
                  int(d["samples"]), dict(d.get("options", {})))


def _save_iterative(ckdir: Path | None, key: dict[str, Any], current: nn.Module, result: PruneResult) -> None:
    if ckdir is None:
        return
    from safetensors.torch import save_file

    from .distributed import is_main_process

    if not is_main_process():
        return
    state = {k: v.detach().cpu().contiguous().clone() for k, v in current.state_dict().items()}
    save_file(state, str(ckdir / "iterative.safetensors.tmp"))
    (ckdir / "iterative.safetensors.tmp").replace(ckdir / "iterative.safetensors")
    _save_json(ckdir, "iterative.json", {"key": key, "removed": result.removed,
                                         "steps": [s.to_dict() for s in result.steps]})


def _load_iterative(ckdir: Path | None, key: dict[str, Any], model: nn.Module):
    if ckdir is None:
        return None
    path = ckdir / "iterative.json"
    saved = _read_json(path)
    if saved is None:
        return None
    _check_same_run(saved, key, path)
    from .checkpoints import load_weights, read_state_dict

    current = remove_blocks(model, saved["removed"])
    load_weights(current, read_state_dict(ckdir / "iterative.safetensors"), source=str(ckdir))
    return current, list(saved["removed"]), saved["steps"]
