"""The whole flow on models that are not ours: a timm ConvNeXt-atto and a Hugging Face ViT trained on CIFAR-10.

``python -m benchmarks.your_models [--recovery quick|standard] [--recovery-method M] [--models convnext,vit]``

The base models come from ``scripts/train_base.py`` (seeded; ``--base`` is where it wrote them, default
``/work/artifacts/base``). For each model, through the same path as the CLI (``PruneRequest`` → ``run_prune`` with
``timm:convnext_atto --weights FILE`` or ``hf:DIR``):

1. the residual blocks found by probing (:func:`cka_analysis.blocks.discover_blocks`);
2. the scores of every criterion on 500 calibration images (seconds per criterion);
3. pruning to −50 % MACs with the default criterion (CKA), then the recovery preset;
4. ``save_pruned``, which also writes the native format (a Hugging Face directory, or a timm state dict + kwargs);
5. reloading the native format with timm / transformers alone, the largest logit difference from ``load_pruned``,
   and the accuracy of the reloaded model on all 10,000 test images; latency (median, batch 1) from the record.

Rows are appended to ``benchmarks/results/your_models.json`` one at a time (a rerun replaces the row with the same
model, recovery and method), and the table is printed. A run whose recovery diverged (non-finite weights: no
native export passes its logit check) is still recorded, with the reason.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cka_analysis.blocks import discover_blocks
from cka_analysis.choices import CRITERIA, DEFAULT_RECOVERY_METHOD, RECOVERY_METHODS
from cka_analysis.cka import CKAOptions, cka_matrix
from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.export import load_pruned, markdown_table, open_model, save_pruned
from cka_analysis.metrics import evaluate
from cka_analysis.models.external import HFImageClassifier
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.scoring import score_blocks
from cka_analysis.workflow import PruneRequest, eval_subset, run_prune

from .common import env_info, log, read_json, write_json

RESULT = "your_models.json"
DATA = "imagefolder:../shared/data/cifar10-jpeg"
MODELS = {
    "convnext": ("timm:convnext_atto", "convnext_atto_cifar10.safetensors", "timm ConvNeXt-atto (patch 2)"),
    "vit": ("hf:{base}/vit_cifar10_hf", None, "Hugging Face ViT (patch 4, width 96, 6 layers)"),
}


def native_model(folder: Path, manifest: dict[str, Any]) -> nn.Module:
    """The pruned model reloaded from its native directory with timm or transformers only."""
    native = manifest["native"]
    if not native.get("format"):
        raise RuntimeError(f"{folder}: no native export ({native.get('reason')})")
    where = folder / native["dir"]
    if native["format"] == "huggingface":
        from transformers import AutoModelForImageClassification

        return HFImageClassifier(AutoModelForImageClassification.from_pretrained(where)).eval()
    import timm
    from safetensors.torch import load_file

    cfg = json.loads((where / "config.json").read_text())
    model = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"])
    model.load_state_dict(load_file(str(where / "model.safetensors")))
    return model.eval()


def heatmap(key: str, base: Path, device: str, samples: int = 1000) -> dict[str, Any]:
    """The base model's layer × layer CKA heatmap (:func:`cka_analysis.cka.cka_matrix`, the dashboard's and
    ``cka-prune heatmap``'s computation: the stem, every discovered block's output and the penultimate features) on
    ``samples`` class-balanced training images, with the CKA of each block's output with the next layer's: the
    similarity of neighbours that makes a block removable."""
    source, weights_file, _ = MODELS[key]
    weights = str(base / weights_file) if weights_file else None
    model = open_model(source.format(base=base), weights=weights)
    train = load_dataset(DATA, "train", model.cka_preset)
    loader = make_loader(calibration_subset(train, samples, seed=0), batch_size=100, num_workers=0)
    t0 = time.time()
    m = cka_matrix(model, loader, options=CKAOptions(device=device))
    seconds = time.time() - t0
    mat = m.matrix
    neighbours = {m.names_a[i]: round(float(mat[i, i + 1]), 4) for i in range(len(m.names_a) - 1)}
    return {"model": key, "samples": samples, "seconds": round(seconds, 2), "layers": m.names_a,
            "matrix": [[round(float(v), 4) for v in row] for row in mat], "neighbour_cka": neighbours}


def run_one(key: str, recovery: str, base: Path, out_root: Path, device: str,
            eval_samples: int | None = None, method: str = DEFAULT_RECOVERY_METHOD) -> dict[str, Any]:
    source, weights_file, label = MODELS[key]
    source = source.format(base=base)
    weights = str(base / weights_file) if weights_file else None
    trained = read_json_file(base / f"{key}.json")
    model = open_model(source, weights=weights)
    preset = model.cka_preset
    t0 = time.time()
    found = discover_blocks(model)
    discover_s = time.time() - t0
    log(f"{key}: {len(found)} blocks found in {discover_s:.1f} s")

    train = load_dataset(DATA, "train", preset)
    calib = calibration_subset(train, 500, seed=0)
    scores: dict[str, Any] = {}
    for crit in CRITERIA:
        try:
            s = score_blocks(model, make_loader(calib, batch_size=100, num_workers=0), crit)
            scores[crit] = {"seconds": round(s.seconds, 2), "ranking": s.ranking()}
        except Exception as exc:  # a criterion this model cannot use: say which and why
            scores[crit] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{key}: scored {crit}: {scores[crit].get('seconds', scores[crit].get('error'))}")

    request = PruneRequest(model=source, weights=weights, data=DATA, target="macs:50%", criterion="cka",
                           recovery=RecoveryConfig.parse(recovery, method=method, seed=0), device=device, eval_samples=eval_samples, seed=0)
    outcome = run_prune(request, progress=None)
    record = outcome.record
    folder = out_root / f"{key}-{recovery}-{method}"
    save_pruned(outcome.model, folder, report=record.to_dict())
    manifest = json.loads((folder / "manifest.json").read_text())
    reloaded = load_pruned(folder)
    test = eval_subset(load_dataset(DATA, "test", preset, in_memory=eval_samples is None), eval_samples)
    try:
        native = native_model(folder, manifest)
    except RuntimeError as exc:  # e.g. a recovery that diverged: the row says so instead of losing the run
        log(str(exc))
        native, diff, native_acc = None, None, None
    if native is not None:
        x = torch.stack([test[i][0] for i in range(min(64, len(test)))])
        with torch.no_grad():
            diff = float((reloaded(x) - native(x)).abs().max())
        native_acc = evaluate(native, make_loader(test, batch_size=256, num_workers=0), device=device).top1
    row = {
        "model": key, "label": label, "source": source, "recovery": recovery, "recovery_method": method,
        "base_train": {k: trained.get(k) for k in ("test_top1", "train_seconds", "recipe", "seed")},
        "blocks_found": [c.name for c in found], "discover_seconds": round(discover_s, 2),
        "scores": scores,
        "removed": record.removed,
        "base_top1": record.base.accuracy, "removed_top1": record.after_removal.accuracy,
        "pruned_top1": record.final.accuracy, "native_top1": native_acc,
        "native_format": manifest["native"].get("format"), "native_config": manifest["native"].get("config_changes"),
        "native_note": manifest["native"].get("reason"),
        "native_max_logit_diff": diff,
        "base_macs": record.base.macs, "pruned_macs": record.final.macs,
        "macs_reduction": record.macs_reduction, "params_reduction": record.params_reduction,
        "latency_ms": None if record.latency_ms is None else record.latency_ms.to_dict(),
        "prune_seconds": round(record.seconds, 1),
        "images_seen": record.images_seen,
    }
    return row


def read_json_file(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _method(row: dict[str, Any]) -> str:
    return row.get("recovery_method") or DEFAULT_RECOVERY_METHOD  # rows written before the field: the default


def table(rows: list[dict[str, Any]]) -> str:
    """The README table: one line per model and recovery."""
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f} %"

    body = []
    for r in rows:
        lat = r.get("latency_ms") or {}
        body.append([
            r["label"], f"{r['recovery']} ({_method(r)})", pct(r["base_top1"]), pct(r["pruned_top1"]),
            pct(r["native_top1"]),
            f"{r['base_macs'] / 1e6:.1f} M → {r['pruned_macs'] / 1e6:.1f} M (−{100 * r['macs_reduction']:.1f} %)",
            f"{lat.get('base', float('nan')):.2f} → {lat.get('pruned', float('nan')):.2f}",
            f"{len(r['removed'])}/{len(r['blocks_found'])}",
            f"{r['native_format']} (Δ {r['native_max_logit_diff']:.1e})" if r["native_format"] else "none: " + str(
                r.get("native_note")),
        ])
    return markdown_table(["architecture", "recovery", "base top-1", "pruned top-1", "native reload top-1",
                           "MACs", "latency ms (b=1)", "blocks removed", "native format (max logit Δ)"], body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnext,vit")
    parser.add_argument("--recovery", default="quick", help="quick | standard (or a number of images, for a smoke run)")
    parser.add_argument("--eval-samples", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--recovery-method", default=DEFAULT_RECOVERY_METHOD, choices=list(RECOVERY_METHODS),
                        help=f"recovery method (default {DEFAULT_RECOVERY_METHOD}, as the CLI)")
    parser.add_argument("--base", type=Path, default=Path("/work/artifacts/base"))
    parser.add_argument("--out", type=Path, default=Path("/work/artifacts/your_models"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--table", action="store_true", help="only print the table of the stored rows")
    parser.add_argument("--heatmap", action="store_true",
                        help="only compute the base models' CKA heatmaps (stored under 'heatmaps')")
    args = parser.parse_args()
    stored = read_json(RESULT) or {"rows": []}
    if args.heatmap:
        for key in args.models.split(","):
            stored.setdefault("heatmaps", {})[key] = heatmap(key, args.base.resolve(), args.device)
            log(f"{key}: heatmap of {len(stored['heatmaps'][key]['layers'])} layers in "
                f"{stored['heatmaps'][key]['seconds']} s")
            write_json(RESULT, stored)
        for key, h in stored.get("heatmaps", {}).items():
            low = sorted(h["neighbour_cka"].items(), key=lambda kv: -kv[1])[:3]
            print(f"{key}: {len(h['layers'])} layers; most similar neighbours: "
                  + ", ".join(f"{n} {v:.3f}" for n, v in low))
        return
    if not args.table:
        for key in args.models.split(","):
            log(f"{key}: {args.recovery}")
            row = run_one(key, args.recovery, args.base.resolve(), args.out, args.device, args.eval_samples,
                          args.recovery_method)
            same = (key, args.recovery, args.recovery_method)
            stored["rows"] = [r for r in stored["rows"]
                              if (r["model"], r["recovery"], _method(r)) != same] + [row]
            stored["env"] = env_info(args.device)
            write_json(RESULT, stored)
    print(table(sorted(stored["rows"], key=lambda r: (r["model"], r["recovery"], _method(r)))))


if __name__ == "__main__":
    main()
