"""Quality: does CKA pick the right blocks? Accuracy vs MACs reduction for every removal criterion.

For the adapted CIFAR ResNet-56 and ResNet-20 (weights fine-tuned to the shared JPEG copy of CIFAR-10) and MACs
reduction targets of about 25 / 40 / 50 % (``--quick``: 25 / 50 %), every row is one
:class:`~cka_analysis.workflow.PruneRequest` run by :func:`~cka_analysis.workflow.run_prune` — the same call as
``cka-prune prune`` and the dashboard — with the same calibration images (training split, class-balanced, seed 0),
the same test subset and the same recovery budget. "About 25 %": the request's target is the nominal one minus
half a block's share of the MACs, so the achieved reduction is the achievable one closest to the nominal target
(every block of these CIFAR ResNets costs the same MACs). Criteria:

* ``cka`` — the paper's criterion, one-shot (rank once);
* ``cka_iterative`` — the paper's procedure: score, remove the best block, recover briefly, rescore, … (the
  per-step recoveries and the final one share the row's recovery budget);
* ``random`` (seeds 0, 1, 2: mean ± std), ``weight_norm``, ``block_influence``, ``angular``, ``taylor``, and the
  ``loss`` oracle (increase of calibration cross-entropy when the block alone is removed).

Each row records the blocks removed, the achieved MACs/parameter reduction, the top-1 accuracy right after removal
(``acc_no_ft``) and after the recovery (``acc_ft``; the same budget, recipe and seed for every row), both on the
test split (all 10,000 images; ``--quick``: a fixed class-balanced subset of 1,000, recorded in ``eval_images``),
and the run's full record. Run: ``python -m benchmarks.criteria [--quick] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from cka_analysis.blocks import find_blocks
from cka_analysis.choices import CRITERIA
from cka_analysis.device import resolve_device
from cka_analysis.pruning import Target
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.workflow import PruneData, PruneRecord, PruneRequest, run_prune

from .common import data_spec, dataset, env_info, fast_format, load_model, log, write_json

#: Every registered criterion ranked once; "random" is run with several seeds instead (Budget.random_seeds).
ONE_SHOT = tuple(c for c in CRITERIA if c != "random")


@dataclass
class Budget:
    """What one run computes; ``quick()`` fits a 2-core CPU in minutes, ``full()`` is the documented run.

    ``recovery`` is the recovery budget of every row in training images (:class:`RecoveryConfig`, seed 0).
    """

    models: tuple[str, ...] = ("resnet56", "resnet20")
    targets: tuple[float, ...] = (0.25, 0.40, 0.50)
    calibration_images: int = 500
    iterative_calibration_images: int = 500
    eval_images: int | None = None  # None = the full test split (10,000)
    recovery: str = "50000"  # one epoch of CIFAR-10
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
            recovery="2560",
            notes=[
                "quick mode: accuracies on a fixed class-balanced subset of 1,000 test images (not all 10,000): "
                "the standard error of one accuracy is about 1 point (more where accuracy is near 50 %)",
                "quick mode: recovery budget 2,560 training images (2,048 re-estimate the batch-norm statistics, "
                "then 8 SGD steps of batch 64): it mostly repairs the statistics and nudges the weights",
                "quick mode: 128 calibration images; iterative CKA rescoring on 64 calibration images after each "
                "removal, its per-step recoveries taken from the same 2,560-image budget",
            ],
        )

    @classmethod
    def tiny(cls) -> Budget:
        """For checking the code end to end in a minute (numbers meaningless)."""
        return cls(models=("resnet20",), targets=(0.25, 0.5), calibration_images=32, iterative_calibration_images=16,
                   eval_images=100, recovery="256", random_seeds=(0, 1),
                   notes=["tiny development mode: numbers are meaningless"])

    @classmethod
    def full(cls) -> Budget:
        return cls(notes=["full mode: all 10,000 test images; recovery budget 50,000 training images (one epoch)"])

    def recovery_config(self) -> RecoveryConfig:
        return RecoveryConfig.parse(self.recovery, seed=0)


def _data() -> PruneData:
    """The shared splits, loaded once: plain training split (calibration), augmented one (recovery), test."""
    return PruneData(train=dataset("train", False, False), test=dataset("test", False, True),
                     train_augmented=dataset("train", True, True))


def _row(record: PruneRecord, criterion: str, seed: int | None, target: float, variant: str,
         common: dict[str, Any]) -> dict[str, Any]:
    return {
        **common, "criterion": criterion, "variant": variant, "seed": seed, "target": target,
        "macs_reduction": record.macs_reduction, "params_reduction": record.params_reduction,
        "macs": record.final.macs, "params": record.final.params, "blocks_removed": list(record.removed),
        "acc_no_ft": record.after_removal.accuracy, "acc_ft": record.final.accuracy,
        "score_seconds": sum(s.seconds for s in record.steps), "images_seen": record.images_seen,
        "removal_order": list(record.removed), "record": record.to_dict(),
    }


def _requests(base: nn.Module, budget: Budget, effective: dict[float, float], device: str):
    """(criterion, seed, target, variant, request) for every row: one-shot criteria, random seeds, iterative CKA."""
    common = {"model": base, "data": data_spec(), "eval_samples": budget.eval_images, "eval_seed": 0,
              "calibration_seed": 0, "recovery": budget.recovery_config(), "device": device, "latency": False}
    for c in budget.criteria:
        seeds = budget.random_seeds if c == "random" else (None,)
        for seed in seeds:
            for t in budget.targets:
                iterative = c == "cka_iterative"
                req = PruneRequest(**common, criterion="cka" if iterative else c, target=Target("macs", effective[t]),
                                   iterative=iterative, seed=seed or 0,
                                   calibration_samples=budget.iterative_calibration_images if iterative
                                   else budget.calibration_images)
                yield c, seed, t, "iterative" if iterative else "one-shot", req


def run_model(arch: str, budget: Budget, device) -> dict[str, Any]:
    base = fast_format(load_model(arch), device)
    blocks = find_blocks(base)
    data = _data()
    log(f"criteria: {arch}, {sum(b.removable for b in blocks)} removable blocks")
    # "about 25 %": aim half a block below the nominal target so that the achieved reduction is the one closest to
    # it (ResNet-20: one block = 11.6 % of the MACs)
    from cka_analysis.metrics import count_macs

    base_macs = count_macs(base, base.cka_preset.input_size)
    half_block = 0.5 * min(b.macs for b in blocks if b.removable) / base_macs
    effective = {t: t - half_block for t in budget.targets}
    common = {"model": arch, "eval_images": budget.eval_images or len(data.test),
              "calibration_images": budget.calibration_images, "recovery": budget.recovery_config().to_dict(),
              "targets_effective": {str(t): v for t, v in effective.items()}}
    rows: list[dict[str, Any]] = []
    models: dict[tuple[str, float], nn.Module] = {}
    base_record = None
    for crit, seed, t, variant, req in _requests(base, budget, effective, str(device)):
        outcome = run_prune(req, data=data)
        rec = outcome.record
        base_record = base_record or rec
        rows.append(_row(rec, crit, seed, t, variant, common))
        if crit.startswith("cka"):
            models[(crit, t)] = outcome.model
        log(f"  {crit:<16} seed={seed!s:<4} target {t:.2f}: {100 * rec.macs_reduction:.1f} % MACs, "
            f"{len(rec.removed)} blocks, acc {rec.after_removal.accuracy:.2f} → {rec.final.accuracy:.2f} % "
            f"({rec.images_seen:,} recovery images)")
    b = base_record.base
    rows.insert(0, {**common, "criterion": "base", "variant": "unpruned", "seed": None, "target": 0.0,
                    "macs_reduction": 0.0, "params_reduction": 0.0, "macs": b.macs, "params": b.params,
                    "blocks_removed": [], "acc_no_ft": b.accuracy, "acc_ft": b.accuracy})
    scores = {f"{r['criterion']}" + (f"_seed{r['seed']}" if r["seed"] is not None else "") + f"@{r['target']}":
              r["record"]["steps"][1]["scores"] for r in rows[1:] if r["variant"] == "one-shot"}
    return {"rows": rows, "scores": scores, "models": models, "base_accuracy": b.accuracy,
            "base_macs": b.macs, "base_params": b.params}


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
