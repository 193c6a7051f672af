"""Does re-estimating batch norm inside scoring change CKA's choice of blocks?

CKA scores a block by the penultimate features of the network with that block removed, with the batch-norm
statistics of the unpruned network. Recovery starts by re-estimating those statistics, which alone lifts the
pruned ResNet-56 from ~20 % to ~50 % top-1. So a block whose removal mostly shifts the statistics might look
worse to CKA than it is once recovery starts. This benchmark scores every candidate block of ResNet-56
(``cifar10jpeg``) both ways on the same 500 calibration images the workflow uses, and reports:

* Kendall's τ between the two score vectors and the blocks each would remove at −50 % MACs;
* top-1 on all 10,000 test images of each selection after batch-norm re-estimation alone (no training).

``python -m benchmarks.bn_scoring [--threads N]`` prints a table and writes ``results/bn_scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import dataset, env_info, log, results_dir
from cka_analysis.blocks import find_blocks, remove_blocks
from cka_analysis.capture import ActivationCapture
from cka_analysis.cka import linear_cka
from cka_analysis.data import calibration_subset, make_loader
from cka_analysis.metrics import count_macs, count_params, evaluate
from cka_analysis.models import build_model
from cka_analysis.pruning import Target, plan
from cka_analysis.recovery import recalibrate_batchnorm
from cka_analysis.scoring import ScoringOptions, score_blocks

CALIBRATION = 500  # PruneRequest's default calibration_samples (and seed 0)
BN_IMAGES = 2048  # RecoveryConfig's default bn_images
TARGET = "macs:50%"


@torch.no_grad()
def penultimate(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's input for ``images`` (what CKA compares)."""
    with ActivationCapture(model, ["penultimate"]) as cap:
        return torch.cat([next(iter(cap.run(chunk).values())).flatten(1) for chunk in images.split(250)])


def bn_scores(model: nn.Module, images: torch.Tensor, bn_data: Any, candidates: list[str]) -> dict[str, float]:
    """1 − CKA(R, R⁻ᵇ) where the network without b has its batch-norm statistics re-estimated first."""
    reference = penultimate(model, images)
    scores = {}
    for i, name in enumerate(candidates):
        variant = remove_blocks(model, [name])
        recalibrate_batchnorm(variant, bn_data, images=BN_IMAGES, device="cpu", seed=0)
        scores[name] = 1.0 - linear_cka(reference, penultimate(variant, images))
        log(f"bn-scoring {i + 1}/{len(candidates)} {name}: {scores[name]:.4f}")
    return scores


def selection_accuracy(model: nn.Module, chosen: list[str], bn_data: Any, test_loader: Any) -> float:
    pruned = remove_blocks(model, chosen)
    recalibrate_batchnorm(pruned, bn_data, images=BN_IMAGES, device="cpu", seed=0)
    return evaluate(pruned, test_loader, device="cpu").top1


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import kendalltau

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model("cifar_resnet56", weights="cifar10jpeg").eval()
    train = dataset("train", False, True)
    calib = calibration_subset(train, CALIBRATION, seed=0)
    images = torch.stack([calib[i][0] for i in range(len(calib))])
    blocks = find_blocks(model)
    candidates = [b.name for b in blocks if b.removable]
    log("scoring as the workflow does (unpruned batch-norm statistics)")
    plain = score_blocks(model, calib, "cka", options=ScoringOptions(device="cpu")).scores
    log("scoring with batch norm re-estimated for each candidate")
    with_bn = bn_scores(model, images, train, candidates)
    tau = kendalltau([plain[n] for n in candidates], [with_bn[n] for n in candidates]).statistic
    size = model.cka_preset.input_size
    costs = {"base_macs": count_macs(model, size), "base_params": count_params(model)}
    target = Target.parse(TARGET)
    chosen = {k: plan(blocks, s, target, **costs).blocks for k, s in (("plain", plain), ("bn", with_bn))}
    test_loader = make_loader(dataset("test", False, True), batch_size=500)
    acc = {k: selection_accuracy(model, c, train, test_loader) for k, c in chosen.items()}
    result = {
        "model": "cifar_resnet56", "weights": "cifar10jpeg", "calibration_images": CALIBRATION,
        "bn_images": BN_IMAGES, "target": TARGET, "kendall_tau": tau,
        "scores": {"plain": plain, "bn": with_bn}, "chosen": chosen,
        "common": sorted(set(chosen["plain"]) & set(chosen["bn"])),
        "acc_bn_only": acc, "test_images": len(test_loader.dataset), "seconds": time.perf_counter() - t0,
        "env": env_info("cpu"),
    }
    path = results_dir() / "bn_scoring.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"Kendall τ between the two CKA score vectors ({len(candidates)} blocks): {tau:.3f}")
    print(f"blocks removed at {TARGET}: {len(result['common'])} of {len(chosen['plain'])} in common")
    print("| scoring | blocks removed | top-1 after batch-norm re-estimation only |")
    print("|---|---|---:|")
    for k, label in (("plain", "as the workflow does"), ("bn", "batch norm re-estimated per candidate")):
        print(f"| {label} | {', '.join(chosen[k])} | {acc[k]:.2f} % |")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
