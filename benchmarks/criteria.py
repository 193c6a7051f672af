"""Quality: does CKA pick the right blocks? Accuracy vs MACs reduction for every removal criterion.

For the adapted CIFAR ResNet-56 and ResNet-20 (weights fine-tuned to the shared JPEG copy of CIFAR-10) and MACs
reduction targets of about 25 / 40 / 50 % (``--quick``: 25 / 50 %), every criterion ranks the removable blocks on
the same calibration images (training split, class-balanced, seed 0) and the planner
(:func:`cka_analysis.pruning.plan`) removes the lowest-scoring blocks until the target is met ("about 25 %": the
planner is given the nominal target minus half a block's share of the MACs, so the achieved reduction is the
achievable one closest to the nominal target; every block of these CIFAR ResNets costs the same MACs):

* ``cka`` — the paper's criterion, one-shot (rank once);
* ``cka_iterative`` — the paper's procedure: score, remove the best block, fine-tune briefly, rescore, … (in
  ``--quick`` mode WITHOUT the per-step fine-tune, which the CPU budget does not allow — the JSON says so);
* ``random`` (seeds 0, 1, 2: mean ± std), ``weight_norm``, ``block_influence``, ``angular``, ``taylor``, and the
  ``loss`` oracle (increase of calibration cross-entropy when the block alone is removed).

Each row records the blocks removed, the achieved MACs/parameter reduction, the top-1 accuracy right after removal
(``acc_no_ft``) and after the same fixed fine-tune (``acc_ft``; SGD + cosine, same seed and data order for every
row), both on the test split (all 10,000 images; ``--quick``: a fixed class-balanced subset of 1,000, recorded in
``eval_images``). Removal sets that two criteria share are evaluated and fine-tuned once (same set ⇒ same model
⇒ same numbers). Run: ``python -m benchmarks.criteria [--quick] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cka_analysis.blocks import find_blocks, remove_blocks
from cka_analysis.device import resolve_device
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.pruning import Target, plan
from cka_analysis.scoring import score_blocks
from cka_analysis.training import FinetuneConfig, finetune

from .common import accuracy, env_info, fast_format, load_model, log, stacked, train_loader, write_json

ONE_SHOT = ("cka", "weight_norm", "block_influence", "angular", "taylor", "loss")


@dataclass
class Budget:
    """What one run computes; ``quick()`` fits a 2-core CPU in minutes, ``full()`` is the documented run."""

    models: tuple[str, ...] = ("resnet56", "resnet20")
    targets: tuple[float, ...] = (0.25, 0.40, 0.50)
    calibration_images: int = 500
    iterative_calibration_images: int = 500
    eval_images: int | None = None  # None = the full test split (10,000)
    ft_steps: int = 390  # one epoch of batch 128
    ft_batch: int = 128
    ft_lr: float = 0.01
    step_ft_steps: int = 50  # fine-tune after each iterative removal (paper: brief fine-tune per step)
    random_seeds: tuple[int, ...] = (0, 1, 2)
    criteria: tuple[str, ...] = ("cka", "cka_iterative", "random", *ONE_SHOT[1:])
    notes: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls) -> Budget:
        return cls(
            targets=(0.25, 0.50),
            calibration_images=128,
            iterative_calibration_images=64,
            eval_images=1000,
            ft_steps=8,
            ft_batch=64,
            step_ft_steps=0,
            notes=[
                "quick mode: accuracies on a fixed class-balanced subset of 1,000 test images (not all 10,000): "
                "the standard error of one accuracy is about 1 point (more where accuracy is near 50 %)",
                "quick mode: fine-tune budget 8 SGD steps of batch 64 (512 images, 1 % of an epoch): it mostly "
                "re-estimates the batch-norm statistics and nudges the weights",
                "quick mode: 128 calibration images; iterative CKA rescoring on 64 calibration images after each "
                "removal, WITHOUT the per-step fine-tune of the paper",
            ],
        )

    @classmethod
    def tiny(cls) -> Budget:
        """For checking the code end to end in a minute (numbers meaningless)."""
        return cls(models=("resnet20",), targets=(0.25, 0.5), calibration_images=32, iterative_calibration_images=16,
                   eval_images=100, ft_steps=2, ft_batch=16, step_ft_steps=0, random_seeds=(0, 1),
                   notes=["tiny development mode: numbers are meaningless"])

    @classmethod
    def full(cls) -> Budget:
        return cls(notes=["full mode: all 10,000 test images; fine-tune one epoch (390 steps of batch 128)"])

    def ft_config(self, steps: int | None = None) -> FinetuneConfig:
        return FinetuneConfig(steps=self.ft_steps if steps is None else steps, lr=self.ft_lr, schedule="cosine",
                              seed=0)


class _Evaluator:
    """acc_no_ft / acc_ft of removal sets, each set computed once (cache keyed by the set of blocks)."""

    def __init__(self, base: nn.Module, budget: Budget, test: tuple[torch.Tensor, torch.Tensor],
                 device: torch.device):
        self.base, self.budget, self.test, self.device = base, budget, test, device
        self.cache: dict[frozenset[str], dict[str, Any]] = {}
        self.loader = None

    def _loader(self):
        if self.loader is None:
            self.loader = train_loader(self.budget.ft_batch, seed=0, device=self.device)
        return self.loader

    def run(self, pruned: nn.Module, removed: list[str], cacheable: bool = True) -> dict[str, Any]:
        key = frozenset(removed)
        if cacheable and key in self.cache:
            return {**self.cache[key], "shared_with_earlier_row": True}
        x, y = self.test
        pruned = fast_format(pruned, self.device).eval()
        acc0 = accuracy(pruned, x, y, self.device)
        tuned = copy.deepcopy(pruned)
        cfg = self.budget.ft_config()
        r = finetune(tuned, self._loader(), cfg, device=self.device)
        acc1 = accuracy(tuned, x, y, self.device)
        out = {"acc_no_ft": acc0, "acc_ft": acc1, "ft_seconds": r.seconds, "model": tuned}
        if cacheable:
            self.cache[key] = out
        return out


def _iterative(model: nn.Module, calib, targets: tuple[float, ...], effective: dict[float, float], base_macs: int,
               budget: Budget, device: torch.device) -> list[dict[str, Any]]:
    """The paper's iterative CKA: score, remove the best, (fine-tune), rescore; a snapshot per target met."""
    current = model
    removed: list[str] = []
    macs_of = {b.name: b.macs for b in find_blocks(model)}
    out = []
    pending = sorted(targets)
    seconds = 0.0
    loader = train_loader(budget.ft_batch, seed=1, device=device) if budget.step_ft_steps else None
    trace = []
    while pending:
        sc = score_blocks(current, calib, "cka", device=device)
        seconds += sc.seconds
        best = sc.ranking()[0]
        current = remove_blocks(current, [best])
        removed.append(best)
        if loader is not None:
            r = finetune(current, loader, budget.ft_config(budget.step_ft_steps), device=device)
            seconds += r.seconds
        red = sum(macs_of[b] for b in removed) / base_macs
        trace.append({"removed": best, "score": sc.scores[best], "macs_reduction": red})
        log(f"    iterative step {len(removed)}: {best} (1−CKA {sc.scores[best]:.4f}), {100 * red:.1f} % MACs")
        while pending and red >= effective[pending[0]] - 1e-12:
            out.append({"target": pending.pop(0), "removed": list(removed), "model": copy.deepcopy(current),
                        "score_seconds": seconds, "trace": list(trace)})
    return out


def run_model(arch: str, budget: Budget, device: torch.device) -> dict[str, Any]:
    base = fast_format(load_model(arch), device).to(device)
    size = base.cka_preset.input_size
    base_macs, base_params = count_macs(base, size), count_params(base)
    blocks = find_blocks(base)
    test = stacked("test", budget.eval_images, seed=0)
    calib = stacked("train", budget.calibration_images, seed=0)
    log(f"criteria: {arch}, {sum(b.removable for b in blocks)} removable blocks, base {base_macs / 1e6:.1f} MMACs")
    base_acc = accuracy(base, *test, device)
    log(f"  base accuracy {base_acc:.2f} % on {len(test[1])} test images")
    ev = _Evaluator(base, budget, test, device)
    ft_record = {**budget.ft_config().to_dict(), "batch_size": budget.ft_batch,
                 "images_seen": budget.ft_steps * budget.ft_batch}
    common = {"model": arch, "eval_images": len(test[1]), "calibration_images": budget.calibration_images,
              "finetune": ft_record}
    rows: list[dict[str, Any]] = [{
        **common, "criterion": "base", "variant": "unpruned", "seed": None, "target": 0.0, "macs_reduction": 0.0,
        "params_reduction": 0.0, "macs": base_macs, "params": base_params, "blocks_removed": [],
        "acc_no_ft": base_acc, "acc_ft": base_acc,
    }]
    scores: dict[str, Any] = {}
    models: dict[tuple[str, float], nn.Module] = {}

    def add_row(criterion: str, seed: int | None, target: float, removed: list[str], pruned: nn.Module,
                score_seconds: float, variant: str, cacheable: bool = True, extra: dict | None = None) -> None:
        macs, params = count_macs(pruned, size), count_params(pruned)
        res = ev.run(pruned, removed, cacheable)
        row = {
            **common, "criterion": criterion, "variant": variant, "seed": seed, "target": target,
            "macs_reduction": 1 - macs / base_macs, "params_reduction": 1 - params / base_params,
            "macs": macs, "params": params, "blocks_removed": list(removed), "acc_no_ft": res["acc_no_ft"],
            "acc_ft": res["acc_ft"], "score_seconds": score_seconds,
            "evaluation_shared_with_earlier_row": bool(res.get("shared_with_earlier_row")), **(extra or {}),
        }
        rows.append(row)
        if criterion.startswith("cka"):
            models[(criterion, target)] = res["model"]
        log(f"  {criterion:<16} seed={seed!s:<4} target {target:.2f}: {100 * row['macs_reduction']:.1f} % MACs, "
            f"{len(removed)} blocks, acc {row['acc_no_ft']:.2f} → {row['acc_ft']:.2f} %")

    jobs: list[tuple[str, int | None]] = []
    for c in budget.criteria:
        if c == "random":
            jobs += [("random", s) for s in budget.random_seeds]
        elif c != "cka_iterative":
            jobs.append((c, None))
    # "about 25 %": the planner removes blocks until ≥ the target; aim half a block below the nominal target so
    # that the achieved reduction is the one closest to it (ResNet-20: one block = 11.6 % of the MACs)
    half_block = 0.5 * min(b.macs for b in blocks if b.removable) / base_macs
    effective = {t: t - half_block for t in budget.targets}
    common["targets_effective"] = {str(t): v for t, v in effective.items()}
    for crit, seed in jobs:
        sc = score_blocks(base, calib, crit, seed=seed or 0, device=device)
        scores[crit if seed is None else f"{crit}_seed{seed}"] = {"seconds": sc.seconds, "scores": sc.scores,
                                                                   "ranking": sc.ranking()}
        log(f"  scored {crit} in {sc.seconds:.1f} s")
        for t in budget.targets:
            p = plan(blocks, sc, Target("macs", effective[t]), base_macs=base_macs, base_params=base_params)
            add_row(crit, seed, t, p.blocks, remove_blocks(base, p.blocks), sc.seconds, "one-shot")
    if "cka_iterative" in budget.criteria:
        icalib = calib if budget.iterative_calibration_images == budget.calibration_images else stacked(
            "train", budget.iterative_calibration_images, seed=0)
        log(f"  iterative CKA ({budget.iterative_calibration_images} calibration images, "
            f"step fine-tune {budget.step_ft_steps} steps)")
        snaps = _iterative(base, icalib, budget.targets, effective, base_macs, budget, device)
        for s in snaps:
            add_row("cka_iterative", None, s["target"], s["removed"], s["model"], s["score_seconds"],
                    "iterative" + (f" + {budget.step_ft_steps}-step fine-tune per removal" if budget.step_ft_steps
                                   else " (no per-step fine-tune)"),
                    cacheable=budget.step_ft_steps == 0,
                    extra={"iterative_calibration_images": budget.iterative_calibration_images,
                           "removal_order": [t["removed"] for t in s["trace"]]})
    return {"rows": rows, "scores": scores, "models": models, "base_accuracy": base_acc,
            "base_macs": base_macs, "base_params": base_params}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per model × criterion × target: random seeds as mean ± std."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["criterion"], r["target"]), []).append(r)
    out = []
    for (model, crit, target), members in groups.items():
        def stat(k: str, members=members) -> tuple[float, float | None]:
            v = [m[k] for m in members]
            return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)

        out.append({
            "model": model, "criterion": crit, "target": target, "seeds": len(members),
            "macs_reduction": stat("macs_reduction"), "params_reduction": stat("params_reduction"),
            "acc_no_ft": stat("acc_no_ft"), "acc_ft": stat("acc_ft"),
            "blocks_removed": [m["blocks_removed"] for m in members],
        })
    return out


def run(quick: bool = False, device: str = "auto", *, tiny: bool = False,
        models_subset: tuple[str, ...] | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    budget = Budget.tiny() if tiny else (Budget.quick() if quick else Budget.full())
    if models_subset:
        budget.models = tuple(models_subset)
    mode = "tiny" if tiny else ("quick" if quick else "full")
    result: dict[str, Any] = {"mode": mode, "env": env_info(dev), "budget": asdict(budget),
                              "rows": [], "scores": {}, "base": {}}
    models: dict[str, dict] = {}
    for arch in budget.models:
        r = run_model(arch, budget, dev)
        result["rows"] += r["rows"]
        result["scores"][arch] = r["scores"]
        result["base"][arch] = {"accuracy": r["base_accuracy"], "macs": r["base_macs"], "params": r["base_params"]}
        models[arch] = r["models"]
        result["summary"] = summarise(result["rows"])
        write_json("criteria.json", result)  # after each model: a partial result survives an interruption
    result["pruned_models"] = models  # in memory only (for the robustness benchmark); not written
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default=None, help="comma-separated subset, e.g. resnet20")
    ap.add_argument("--tiny", action="store_true", help="development smoke run (meaningless numbers)")
    args = ap.parse_args()
    run(args.quick, args.device, tiny=args.tiny, models_subset=tuple(args.models.split(",")) if args.models else None)


if __name__ == "__main__":
    main()
