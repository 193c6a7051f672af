"""Recovery benchmark: which recovery buys the most accuracy per image, and does CKA's choice still matter after it?

Three parts, all resumable (rows are appended to ``results/recovery.json`` as they finish; a rerun skips the rows
already there, so a killed run goes on where it stopped):

* ``methods`` — the recovery methods side by side on ONE pruned model (ResNet-56 ``cifar10jpeg``, CKA one-shot,
  −52.6 % MACs) with the same budget. Methods and recipes are chosen here, on a **validation split carved from the
  training images** (5,000 held out, seeded; recovery trains on the other 45,000). The test split is not used.
  Each row is a ``PruneRequest(eval_split="validation")`` run by ``run_prune`` (rows recorded before ``code_path``
  was: the same split, calibration and pruned model, by hand; see :data:`METHOD_CODE_PATH`).
* ``tune`` — the default recipe and variations of it (``TUNE_VARIANTS``) at the ``standard`` budget on the same
  validation split, on CKA one-shot models at −50 % and −75 % MACs; the winner's test rows join ``report``.
* ``report`` — the reproduction rows through :func:`cka_analysis.workflow.run_prune`, the code path the CLI and
  the dashboard run, with the default recovery method, measured on **all 10,000 test images**: CKA one-shot and
  iterative, random (3 seeds), block influence, angular and Taylor at ≥ 50 % fewer MACs; CKA at ≥ 75 %;
  ResNet-20 at ≥ 25 / 50 %; and the accuracy-vs-images curve (CKA vs random, 0 → ``standard``).

``python -m benchmarks.recovery --list`` shows the rows and which are done; ``--rows ID,ID`` runs a subset in that
order; ``--stage methods|recipe|tune|report|all``; ``--write`` only rebuilds ``results/recovery.md``, the plot and
(from the committed rows) the recovery estimate's reference curve, ``cka_analysis/data_files/reference_curve.json``,
which every run also rewrites at its end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RowStore, env_info, log, results_dir, rows_to_run
from cka_analysis.data import VALIDATION_IMAGES
from cka_analysis.metrics import format_duration
from cka_analysis.progress import Pace

DATA = "imagefolder:{root}/cifar10-jpeg"
VALIDATION = VALIDATION_IMAGES  # held-out training images of the validation rows (the library's split)


# ------------------------------------------------------------------------------------------------------ rows
#: The recipes of the test rows, pinned so that a row means the same after the library's defaults move on:
#: ``stages`` is the first default (feature mimicking at each stage's output, weight 1), ``blocks`` mimics at every
#: kept block's input too (weight 10), ``cosine`` decays that term to 0 over training; chosen on the validation
#: split (the ``recipe-*`` rows).
RECIPES = {"stages": {"mimic": "stages", "feature_weight": 1.0, "feature_schedule": "constant"},
           "blocks": {"mimic": "blocks", "feature_weight": 10.0, "feature_schedule": "constant"},
           "cosine": {"mimic": "blocks", "feature_weight": 10.0, "feature_schedule": "cosine"}}

#: Variations of the ``cosine`` recipe tuned at the ``standard`` budget on the validation split (the ``tune-*``
#: rows), at −50 % and at −75 % MACs: the two targets that ``cosine`` misses on the test split. Each is the
#: ``cosine`` recipe with these fields changed; the name says which. (Run on a GPU, 12 processes at once.)
TUNE_VARIANTS: dict[str, dict[str, Any]] = {
    "cosine": {},
    "cosine-lr0.02": {"lr": 0.02},
    "cosine-lr0.05": {"lr": 0.05},
    "cosine-bs128-lr0.05": {"batch_size": 128, "lr": 0.05},
    "cosine-lr0.005": {"lr": 0.005},
    "cosine-bs128-lr0.02": {"batch_size": 128, "lr": 0.02},
    "cosine-a0.9": {"kd_alpha": 0.9},
    "cosine-t2": {"kd_temperature": 2.0},
}
RECIPES.update({name: {**RECIPES["cosine"], **changes} for name, changes in TUNE_VARIANTS.items()})
TUNE_TARGETS = ("macs:50%", "macs:75%")


def _report_rows() -> list[dict[str, Any]]:
    """The reproduction rows, most important first (a run that is stopped early has the headline ones)."""
    rows: list[dict[str, Any]] = []

    def add(arch: str, criterion: str, target: str, recovery: str, seed: int = 0, iterative: bool = False,
            method: str | None = None, recipe: str = "stages") -> None:
        rid = f"{arch}-{criterion}{'-it' if iterative else ''}-{target.replace(':', '').replace('%', '')}-" \
              f"{recovery}{'-' + method if method else ''}{'-' + recipe if recipe != 'stages' else ''}-s{seed}"
        rows.append({"id": rid, "arch": arch, "criterion": criterion, "target": target, "recovery": recovery,
                     "seed": seed, "iterative": iterative, "mimic": RECIPES[recipe]["mimic"],
                     "recipe": RECIPES[recipe], **({"recipe_name": recipe} if recipe != "stages" else {}),
                     **({"method": method} if method else {})})

    add("resnet56", "cka", "macs:50%", "quick")
    add("resnet56", "random", "macs:50%", "quick")
    add("resnet56", "cka", "macs:50%", "standard")
    add("resnet56", "random", "macs:50%", "standard")
    add("resnet56", "cka", "macs:50%", "quick", method="adaptor")
    add("resnet56", "cka", "macs:50%", "standard", method="adaptor")
    add("resnet56", "cka", "macs:75%", "standard")
    add("resnet56", "cka", "macs:50%", "standard", iterative=True)
    for crit in ("block_influence", "angular", "taylor"):
        add("resnet56", crit, "macs:50%", "standard")
    for seed in (1, 2):
        add("resnet56", "random", "macs:50%", "standard", seed=seed)
    for budget in ("none", "6250", "75000"):
        add("resnet56", "cka", "macs:50%", budget)
        add("resnet56", "random", "macs:50%", budget)
    add("resnet56", "cka", "macs:75%", "quick")
    for target in ("macs:25%", "macs:50%"):
        add("resnet20", "cka", target, "standard", recipe="cosine")
    # feature mimicking at every kept block's input too (chosen on the validation split: recipe-*-blocks-* rows)
    for criterion, target, recovery in (("cka", "macs:50%", "quick"), ("cka", "macs:50%", "standard"),
                                        ("cka", "macs:50%", "6250"), ("random", "macs:50%", "quick"),
                                        ("cka", "macs:75%", "standard"), ("cka", "macs:50%", "75000"),
                                        ("random", "macs:50%", "standard")):
        add("resnet56", criterion, target, recovery, recipe="blocks")
    # the same with the feature term decayed to 0 over training (recipe-*-cosine on the validation split)
    for criterion, target, recovery in (("cka", "macs:50%", "quick"), ("cka", "macs:50%", "standard"),
                                        ("cka", "macs:75%", "standard"), ("random", "macs:50%", "quick")):
        add("resnet56", criterion, target, recovery, recipe="cosine")
    # the seed spread of the default at the two targets it misses (the first seeds ran on the CPU, these on a GPU)
    for seed in (1, 2):
        for target in ("macs:50%", "macs:75%"):
            add("resnet56", "cka", target, "standard", seed=seed, recipe="cosine")
    # does the choice of blocks matter more when more of them go? CKA against random at −75 % (default recipe)
    add("resnet56", "cka", "macs:75%", "quick", recipe="cosine")
    add("resnet56", "random", "macs:75%", "quick", recipe="cosine")
    for seed in (0, 1, 2):
        add("resnet56", "random", "macs:75%", "standard", seed=seed, recipe="cosine")
    for seed in (0, 1):
        add("resnet56", "block_influence", "macs:75%", "standard", seed=seed, recipe="cosine")
    # the recipe that won the tune-* rows on the validation split, on the test split (once those rows exist)
    best = winning_recipe(load_results()["rows"])
    if best not in (None, "cosine"):
        for target, recovery in (("macs:50%", "standard"), ("macs:75%", "standard"), ("macs:50%", "quick")):
            add("resnet56", "cka", target, recovery, recipe=best)
    return rows


def winning_recipe(rows: list[dict[str, Any]]) -> str | None:
    """The ``TUNE_VARIANTS`` recipe with the best mean validation accuracy over ``TUNE_TARGETS``, among those
    finished at every target (None before any is); rows with another criterion's blocks do not compete."""
    acc: dict[str, list[float]] = {}
    for r in rows:
        if r["id"].startswith("tune-") and r.get("val_acc") is not None and "criterion" not in r:
            acc.setdefault(r["tune_recipe"], []).append(r["val_acc"])
    complete = {name: sum(v) / len(v) for name, v in acc.items() if len(v) == len(TUNE_TARGETS)}
    return max(complete, key=complete.__getitem__) if complete else None


# The first comparison of the methods, with the first recipe (lr 0.02, distillation weight 0.9), in float32 and
# bfloat16; the recipe rows below then tuned the recipe.
FIRST_RECIPE = {"lr": 0.02, "batch_size": 64, "kd_alpha": 0.9}
METHOD_ROWS = [{"id": f"methods-{m}-quick", "method": m, "recovery": "quick", "amp": "none", "recipe": FIRST_RECIPE}
               for m in ("bn", "ce", "kd", "feature", "adaptor")] + \
              [{"id": f"methods-{m}-quick-bf16", "method": m, "recovery": "quick", "amp": "bf16",
                "recipe": FIRST_RECIPE} for m in ("kd", "feature")] + \
              [{"id": f"methods-{m}-standard", "method": m, "recovery": "standard", "amp": "auto"}
               for m in ("kd", "feature")]


# The recipe on the validation split: learning rate, batch size and distillation weight (bfloat16, quick budget).
RECIPE_ROWS = [{"id": f"recipe-{m}-lr{lr:g}-bs{bs}-a{a:g}", "method": m, "recovery": "quick", "amp": "bf16",
                "recipe": {"lr": lr, "batch_size": bs, "kd_alpha": a}}
               for m, lr, bs, a in (("feature", 0.01, 64, 0.9), ("feature", 0.005, 64, 0.9),
                                    ("feature", 0.01, 128, 0.9), ("feature", 0.01, 64, 0.5),
                                    ("feature", 0.005, 32, 0.9), ("adaptor", 0.01, 64, 0.9),
                                    ("feature", 0.0025, 64, 0.9), ("kd", 0.005, 64, 0.9), ("ce", 0.005, 64, 0.9),
                                    ("adaptor", 0.005, 64, 0.9), ("feature", 0.005, 64, 0.5))] + \
              [{"id": f"recipe-feature-lr0.005-bs64-a0.9-fw{w:g}", "method": "feature", "recovery": "quick",
                "amp": "bf16", "recipe": {"lr": 0.005, "batch_size": 64, "kd_alpha": 0.9, "feature_weight": w}}
               for w in (0.3, 3.0)] + \
              [{"id": f"recipe-{m}-lr0.01-bs64-a0.5{'-' + mimic if mimic != 'stages' else ''}-fw{w:g}",
                "method": m, "recovery": "quick", "amp": "bf16",
                "recipe": {"lr": 0.01, "batch_size": 64, "kd_alpha": 0.5, "feature_weight": w, "mimic": mimic}}
               # the defaults (lr 0.01, α 0.5) with a heavier feature term, and mimicking at every kept block
               for m, mimic, w in (("feature", "stages", 3.0), ("feature", "blocks", 1.0), ("feature", "blocks", 3.0),
                                   ("feature", "blocks", 10.0), ("feature", "blocks", 30.0),
                                   ("adaptor", "blocks", 10.0))] + \
              [{"id": "recipe-feature-lr0.01-bs64-a0.5-blocks-fw10-cosine", "method": "feature", "recovery": "quick",
                "amp": "bf16", "recipe": {"lr": 0.01, "batch_size": 64, "kd_alpha": 0.5, "feature_weight": 10.0,
                                          "mimic": "blocks", "feature_schedule": "cosine"}}]


# The recipe at the standard budget on the validation split, at both targets (most informative first).
TUNE_ROWS = [{"id": f"tune-{name}-{target.replace(':', '').replace('%', '')}-standard", "method": "feature",
              "recovery": "standard", "amp": "auto", "target": target, "tune_recipe": name,
              "recipe": dict(RECIPES[name])}
             for name in TUNE_VARIANTS for target in TUNE_TARGETS] + \
    [{"id": f"tune-cosine-{criterion}-macs75-standard", "method": "feature", "recovery": "standard", "amp": "auto",
      "target": "macs:75%", "criterion": criterion, "tune_recipe": f"cosine-{criterion}",
      "recipe": dict(RECIPES["cosine"])}
     # the blocks other criteria remove at −75 %, with the default recipe: at −75 % the removed set decides more
     for criterion in ("block_influence",)]


# --------------------------------------------------------------------------------------------------- storage
#: The rows file (several processes may finish rows at once: see common.save_row).
STORE = RowStore("recovery.json")
load_results, finished_ids, save_row = STORE.load, STORE.finished_ids, STORE.save


def _claim(row_id: str) -> bool:
    """Take a row for this process (several processes can share one list: each runs the rows nobody else has
    claimed). A claim whose process is gone is taken over."""
    claims = results_dir() / ".claims"
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / row_id
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
            os.kill(pid, 0)
            return pid == os.getpid()
        except (ValueError, ProcessLookupError, PermissionError):
            path.unlink(missing_ok=True)
            return _claim(row_id)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


# ------------------------------------------------------------------------------------------------ report rows
def run_report_row(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """One row through the workflow (what ``cka-prune prune ... --recovery R`` runs), on all test images."""
    from cka_analysis.config import shared_data_dir
    from cka_analysis.workflow import PruneRequest, run_prune

    arch = {"resnet56": "cifar_resnet56", "resnet20": "cifar_resnet20"}[spec["arch"]]
    from cka_analysis.recovery import RecoveryConfig

    recovery = RecoveryConfig.parse(spec["recovery"], seed=spec["seed"], **spec.get("recipe", RECIPES["stages"]),
                                    **({"method": spec["method"]} if spec.get("method") else {}))
    request = PruneRequest(model=arch, weights="cifar10jpeg", data=DATA.format(root=shared_data_dir()),
                           criterion=spec["criterion"], target=spec["target"], iterative=spec["iterative"],
                           recovery=recovery, seed=spec["seed"], device=device, latency=True)
    t0 = time.perf_counter()
    outcome = run_prune(request, progress=_progress(spec["id"]))
    rec = outcome.record
    recovery = rec.recovery.to_dict() if rec.recovery is not None else {}
    bn_acc = next((h["eval_top1"] for h in recovery.get("history", []) if h.get("step") == 0
                   and "eval_top1" in h), None)
    return {
        **spec, "acc": rec.final.accuracy, "base_acc": rec.base.accuracy, "acc_removed": rec.after_removal.accuracy,
        "acc_bn_only": bn_acc, "images_seen": rec.images_seen, "budget": request.recovery.images,
        "method": request.recovery.method, "macs_reduction": rec.macs_reduction,
        "params_reduction": rec.params_reduction, "blocks_removed": len(rec.removed), "removed": rec.removed,
        "adaptors": recovery.get("adaptors", []), "recovery_seconds": recovery.get("seconds"),
        "seconds": time.perf_counter() - t0,
        "latency_ms": None if rec.latency_ms is None else rec.latency_ms.to_dict(), "test_images": 10_000,
    }


def _progress(tag: str):
    """A progress callback that logs at most every 30 s, with the time left of a counted phase (a recovery's
    steps) at its pace since its first report (so a run resumed part-way is paced from there)."""
    state: dict[str, Any] = {"t": 0.0}
    pace = Pace()

    def report(done: int, total: int | None, message: str) -> None:
        now = time.perf_counter()
        pace.observe(done, total, now)
        if now - state["t"] > 30 or (total and done == total):
            state["t"] = now
            left = pace.seconds_left(done, now) if total and done < total else None
            log(f"{tag}: {message}" + ("" if left is None else f" (about {format_duration(left)} left)"))

    return report


# ---------------------------------------------------------------------------------------------- method rows
#: How the validation rows are produced, recorded in each row as ``code_path``. Rows without it (every
#: ``methods-*``, ``recipe-*`` and ``tune-*`` row committed before this field) ran the earlier hand-written path:
#: prune once per target, then ``recover`` and ``evaluate`` called directly on the same 45,000/5,000 split
#: (:func:`cka_analysis.data.validation_indices`), the same 500 calibration images and the same pruned model.
METHOD_CODE_PATH = "run_prune"


@lru_cache(maxsize=1)
def _validation_data() -> Any:
    """The splits of every validation row (decoded once per process): what ``run_prune`` loads for a request
    with ``eval_split="validation"`` — recovery and calibration on 45,000 training images, accuracies on the
    5,000 held out."""
    from cka_analysis.config import shared_data_dir
    from cka_analysis.models import build_model
    from cka_analysis.workflow import PruneData, PruneRequest

    request = PruneRequest(model="cifar_resnet56", weights="cifar10jpeg", data=DATA.format(root=shared_data_dir()),
                           target="macs:50%", eval_split="validation")
    preset = build_model("cifar_resnet56", weights="random").cka_preset
    return PruneData().filled(request, preset, recovery=True)


def method_request(spec: dict[str, Any], device: str) -> Any:
    """The :class:`~cka_analysis.workflow.PruneRequest` of a validation row: ResNet-56 ``cifar10jpeg``, one-shot
    ``criterion`` (CKA) at ``target`` (−50 % MACs) on 500 calibration images, the row's recovery recipe, and
    accuracies on the validation split."""
    from cka_analysis.config import shared_data_dir
    from cka_analysis.recovery import RecoveryConfig
    from cka_analysis.workflow import PruneRequest

    cfg = RecoveryConfig.parse(spec["recovery"], method=spec["method"], amp=spec.get("amp", "auto"),
                               **spec.get("recipe", {}))
    return PruneRequest(model="cifar_resnet56", weights="cifar10jpeg", data=DATA.format(root=shared_data_dir()),
                        criterion=spec.get("criterion", "cka"), target=spec.get("target", "macs:50%"),
                        calibration_samples=500, recovery=cfg, eval_split="validation", seed=0, device=device,
                        latency=False)


def run_method_row(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """One validation row through :func:`~cka_analysis.workflow.run_prune` (the CLI's and the dashboard's code
    path) with ``eval_split="validation"``."""
    from cka_analysis.workflow import run_prune

    request = method_request(spec, device)
    rec = run_prune(request, data=_validation_data(), progress=_progress(spec["id"])).record
    recovery = rec.recovery.to_dict() if rec.recovery is not None else {}
    return {**spec, "val_acc": rec.final.accuracy, "val_base_acc": rec.base.accuracy,
            "val_acc_removed": rec.after_removal.accuracy, "images_seen": rec.images_seen,
            "budget": request.recovery.images, "steps": recovery.get("steps", 0),
            "seconds": recovery.get("seconds", 0.0), "macs_reduction": rec.macs_reduction,
            "params_reduction": rec.params_reduction, "adaptors": recovery.get("adaptors", []),
            "history": recovery.get("history", []), "recipe": request.recovery.to_dict(),
            "validation_images": VALIDATION, "removed": rec.removed, "code_path": METHOD_CODE_PATH}


# ---------------------------------------------------------------------------------------------------- report
#: The estimate's reference curve, inside the package so that an installed library finds it; written from the
#: committed rows only (never from a ``$CKA_BENCH_RESULTS`` trial run).
REFERENCE_CURVE = Path(__file__).resolve().parents[1] / "cka_analysis" / "data_files" / "reference_curve.json"


def write_report() -> Path:
    """``results/recovery.md`` (tables + plain words), ``results/recovery_curve.png/.html`` and, from the
    committed results, the estimate's reference curve (:data:`REFERENCE_CURVE`)."""
    from benchmarks.common import RESULTS_DIR
    from benchmarks.recovery_report import reference_curves, write

    data = load_results()
    if results_dir() == RESULTS_DIR:
        REFERENCE_CURVE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE_CURVE.write_text(json.dumps(reference_curves(data["rows"]), indent=1) + "\n")
    return write(data, results_dir())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["methods", "recipe", "tune", "report", "all"], default="all",
                    help="tune: the standard-budget recipe rows (validation split); report includes the winner's "
                         "test rows once every tune row of it is done")
    ap.add_argument("--rows", help="comma-separated row ids to run, in this order")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--list", action="store_true", help="list the rows and whether they are done")
    ap.add_argument("--write", action="store_true", help="only rebuild recovery.md and the plot")
    ap.add_argument("--no-write", action="store_true", help="do not rebuild recovery.md and the plot at the end")
    ap.add_argument("--until", type=float, default=None,
                    help="start no new row after this Unix time (rows already started finish)")
    ap.add_argument("--budget", type=int, default=None,
                    help="replace every row's budget by this many images, to try the benchmark end to end in "
                         "minutes; needs $CKA_BENCH_RESULTS (such rows never go into the committed results)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.budget is not None and not os.environ.get("CKA_BENCH_RESULTS"):
        ap.error("--budget writes rows that are not the benchmark's: set CKA_BENCH_RESULTS to another folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    done = {r["id"] for r in load_results()["rows"]}
    todo = (METHOD_ROWS if args.stage in ("methods", "all") else []) + \
        (RECIPE_ROWS if args.stage in ("recipe", "all") else []) + \
        (TUNE_ROWS if args.stage in ("tune", "all") else []) + \
        (_report_rows() if args.stage in ("report", "all") else [])
    if args.rows:
        by_id = {r["id"]: r for r in METHOD_ROWS + RECIPE_ROWS + TUNE_ROWS + _report_rows()}
        unknown = [i for i in args.rows.split(",") if i not in by_id]
        if unknown:
            ap.error(f"unknown row ids {unknown}; see --list")
        todo = [by_id[i] for i in args.rows.split(",")]
    if args.list:
        for r in todo:
            print(("done  " if r["id"] in done else "todo  ") + r["id"])
        return 0
    if not args.write:
        for spec in rows_to_run(todo, finished_ids, _claim, args.until, args.budget):
            log(f"row {spec['id']}")
            if spec["id"].startswith(("methods-", "recipe-", "tune-")):
                row = run_method_row(spec, args.device)
            else:
                row = run_report_row(spec, args.device)
            row["env"] = env_info(args.device)
            row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            save_row(row)
            log(f"row {spec['id']} done: " + ", ".join(f"{k}={row[k]}" for k in ("acc", "val_acc", "images_seen",
                                                                                   "seconds") if k in row))
    if not args.no_write:
        write_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
