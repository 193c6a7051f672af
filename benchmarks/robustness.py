"""Robustness: base vs CKA-pruned models under FGSM / PGD and common corruptions.

For the models of the criteria table (``benchmarks/results/criteria.json``): the unpruned base and the CKA-pruned
model (one-shot and iterative) at the largest MACs target, after the table's fine-tune. Measured with
:func:`cka_analysis.robustness.evaluate_robustness`: FGSM and PGD (L∞, random start, step 2.5·ε/steps) at
ε ∈ {1, 2, 4, 8}/255 in pixel units, and the mean accuracy over eight CIFAR-10-C-style corruptions per severity 1–5
(accuracies in percent; each model's entry in ``robustness.json`` is a ``RobustnessResult.to_dict()``).
Full mode: ResNet-56 and ResNet-20, 1,000 test images, PGD-10. ``--quick``: ResNet-56 only, base and one-shot CKA,
the first 100 images of the table's fixed class-balanced test subset, PGD-5 (accuracies then move in steps of 1 %,
and the sampling error is about ±4–5 points: a coarse comparison). Run: ``python -m benchmarks.robustness [--quick] [--device cpu]`` (after
``benchmarks.criteria``).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from torch import nn

from cka_analysis.blocks import remove_blocks
from cka_analysis.device import resolve_device
from cka_analysis.recovery import RecoveryConfig, recover
from cka_analysis.robustness import DEFAULT_EPS, evaluate_robustness

from .common import (
    dataset,
    env_info,
    fast_format,
    load_model,
    log,
    read_json,
    stacked,
    tensor_loader,
    write_json,
)


def _rebuild(row: dict[str, Any], device) -> nn.Module:
    """The recovered pruned model of a one-shot criteria row, recomputed from its blocks and recovery config."""
    base = fast_format(load_model(row["model"]), device)
    pruned = remove_blocks(base, row["blocks_removed"])
    recover(pruned, dataset("train", True, True), RecoveryConfig.from_dict(row["recovery"]), teacher=base,
            device=device)
    return pruned.eval()


def run(quick: bool = False, device: str = "auto", criteria: dict[str, Any] | None = None, *,
        tiny: bool = False) -> dict[str, Any]:
    dev = resolve_device(device)
    criteria = criteria or read_json("criteria.json")
    if not criteria or not criteria.get("rows"):
        raise SystemExit("run benchmarks.criteria first: benchmarks/results/criteria.json is missing")
    in_memory = criteria.get("pruned_models", {})
    samples = 20 if tiny else (100 if quick else 1000)
    pgd_steps = 5 if quick else 10
    archs = [a for a in ("resnet56", "resnet20") if any(r["model"] == a for r in criteria["rows"])]
    archs = archs[:1] if quick or tiny else archs
    which = ["cka"] if quick or tiny else ["cka", "cka_iterative"]
    x, y = stacked("test", criteria["budget"]["eval_images"], seed=0)  # the table's test subset
    x, y = x[:samples], y[:samples]
    out: dict[str, Any] = {"mode": "tiny" if tiny else ("quick" if quick else "full"), "env": env_info(dev), "samples": samples,
                           "pgd_steps": pgd_steps, "eps": list(DEFAULT_EPS), "models": {}}
    for arch in archs:
        rows = [r for r in criteria["rows"] if r["model"] == arch]
        target = max(r["target"] for r in rows)
        models: dict[str, tuple[nn.Module, dict[str, Any]]] = {
            f"{arch} base": (fast_format(load_model(arch), dev), {"blocks_removed": [], "macs_reduction": 0.0})}
        for crit in which:
            row = next((r for r in rows if r["criterion"] == crit and r["target"] == target), None)
            if row is None:
                continue
            model = in_memory.get(arch, {}).get((crit, target))
            if model is None and "per removal" in str(row.get("variant", "")):
                log(f"  skipping {crit}: its per-step fine-tuned model is only available inside the criteria run")
                continue
            model = copy.deepcopy(model) if model is not None else _rebuild(row, dev)
            models[f"{arch} {crit} −{100 * row['macs_reduction']:.0f} % MACs"] = (model, row)
        for name, (model, row) in models.items():
            log(f"robustness: {name} on {samples} images")
            preset = load_model(arch).cka_preset
            res = evaluate_robustness(model, tensor_loader(x, y, 100), mean=preset.mean, std=preset.std,
                                      max_samples=samples, device=dev, pgd_steps=pgd_steps, seed=0)
            # the record's JSON form (RobustnessResult.from_dict reads it back) plus where the model came from
            out["models"][name] = {**res.to_dict(), "blocks_removed": row["blocks_removed"],
                                   "macs_reduction": row["macs_reduction"], "acc_ft_table": row.get("acc_ft")}
            curves = "; ".join(f"{c.attack.upper()} " + ", ".join(f"{e * 255:g}/255: {a:.1f} %" for e, a in c.points())
                               for c in (res.fgsm, res.pgd) if c is not None)
            log(f"  clean {res.clean_accuracy:.1f} %; {curves}")
            write_json("robustness.json", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    run(args.quick, args.device)


if __name__ == "__main__":
    main()
