"""``results/recovery.md`` and the accuracy-vs-images plot from ``results/recovery.json`` (pure: data in, files out)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

BUDGET_NAMES = {0: "none", 25_000: "quick", 250_000: "standard"}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _minutes(s: float | None) -> str:
    return "–" if s is None else f"{s / 60:.1f} min"


def _wall(r: dict[str, Any]) -> str:
    """A row's wall time, with the GPU named where it ran on one (the others ran on the 2-core CPU)."""
    gpu = (r.get("env") or {}).get("gpu") if str((r.get("env") or {}).get("device", "")).startswith("cuda") else None
    return _minutes(r.get("seconds")) + (f" ({gpu})" if gpu else "")


def _is_validation_row(r: dict[str, Any]) -> bool:
    return r["id"].startswith(("methods-", "recipe-", "tune-"))


#: Fields of a recipe variant that the notes name, with how they read.
_VARIANT_FIELDS = {"lr": "lr {}", "batch_size": "batch {}", "kd_alpha": "KD weight {}", "kd_temperature": "T {}",
                   "weight_decay": "weight decay {}"}


def _mimic(r: dict[str, Any]) -> str:
    """Where a row's feature term compared student and teacher (rows before the option: each stage)."""
    return r.get("mimic") or (r.get("recipe") or {}).get("mimic") or "stages"


def _recovery_note(r: dict[str, Any]) -> str:
    """What a test row's recovery did differently from feature mimicking at the stage outputs."""
    notes = [f"{r['method']} recovery"] if r.get("method") not in (None, "feature") else []
    if _mimic(r) == "blocks":
        notes.append("block mimicking")
    if (r.get("recipe") or {}).get("feature_schedule") == "cosine":
        notes.append("decaying")
    notes += [label.format(r["recipe"][k]) for k, label in _VARIANT_FIELDS.items() if k in (r.get("recipe") or {})]
    return ", ".join(notes)


def method_table(rows: list[dict[str, Any]]) -> list[str]:
    """The methods and recipes side by side on the validation split (same pruned model)."""
    rows = sorted((r for r in rows if _is_validation_row(r) and not r["id"].startswith("tune-")),
                  key=lambda r: (r["budget"], -r["val_acc"]))
    if not rows:
        return []
    out = ["| method | budget | lr | batch | KD weight | feature weight | mimic at | precision | images seen | "
           "validation top-1 % | Δ vs unpruned (pp) | MACs reduction | wall time |",
           "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cfg = r.get("recipe") or {}
        amp = {"bf16": "bfloat16", "none": "float32"}.get(r.get("amp"), "float32")  # rows without amp predate bf16
        out.append(f"| {r['method']} | {r['recovery']} | {cfg.get('lr', '?')} | {cfg.get('batch_size', '?')} | "
                   f"{cfg.get('kd_alpha', '?')} | {cfg.get('feature_weight', '?')}"
                   f"{' (cosine)' if cfg.get('feature_schedule') == 'cosine' else ''} | {_mimic(r)} | {amp} | "
                   f"{r['images_seen']:,} | "
                   f"{r['val_acc']:.2f} | {r['val_acc'] - r['val_base_acc']:+.2f} | "
                   f"{100 * r['macs_reduction']:.1f} % | {_wall(r)} |")
    base = rows[0]
    out += ["", f"Unpruned model on the same {base['validation_images']:,} validation images: "
            f"{base['val_base_acc']:.2f} % (it was trained on them, so the gap to it is larger than on the test "
            f"split: validation numbers rank methods and recipes, the test split below reports). Right after "
            f"removal: {base['val_acc_removed']:.2f} %. One validation accuracy near 90 % has a standard error of "
            "about 0.4 points: differences below ~1 point are noise."]
    return out


def report_table(rows: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in rows if not _is_validation_row(r)]
    if not rows:
        return []
    out = ["| model | criterion | target | recovery | seed | blocks | MACs −% | images seen | top-1 % "
           "(10,000 test) | Δ vs base (pp) | after removal % | BN only % | wall time |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["target"], -r["budget"], r["criterion"], r["seed"])):
        note = _recovery_note(r)
        crit = r["criterion"] + (" (iterative)" if r["iterative"] else "") + (f" [{note}]" if note else "")
        out.append(f"| {r['arch']} | {crit} | {r['target'].split(':')[1]} | {r['recovery']} | {r['seed']} | "
                   f"{r['blocks_removed']} | {100 * r['macs_reduction']:.1f} | {r['images_seen']:,} | "
                   f"{_fmt(r['acc'])} | {r['acc'] - r['base_acc']:+.2f} | {_fmt(r['acc_removed'])} | "
                   f"{_fmt(r.get('acc_bn_only'))} | {_wall(r)} |")
    return out


def _spread(values: list[float]) -> str:
    """``mean ± sample sd (n seeds)``, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.2f} % (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} % ({len(values)} seeds)"


def _default_rows(rows: list[dict[str, Any]], target: str, budget: str,
                  criterion: str | None = None) -> list[dict[str, Any]]:
    """The finished one-shot ResNet-56 test rows at ``target`` and ``budget`` with the default recipe (block
    mimicking, decaying weight), of one ``criterion`` or of all."""
    return [r for r in rows if r.get("arch") == "resnet56" and r.get("target") == target
            and r.get("recovery") == budget and r.get("acc") is not None and not r.get("iterative")
            and recipe_name(r) == "cosine" and r.get("method") in (None, "feature")
            and criterion in (None, r.get("criterion"))]


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, judged on the default recipe (mean over its seeds), with the best single row of any
    recipe beside it."""
    goals = [("macs:50%", "quick", 2.0), ("macs:50%", "standard", 0.5), ("macs:75%", "standard", 2.0)]
    out = ["| goal | default recipe | gap to base (pp) | reached | best single row, any recipe |",
           "|---|---|---:|---|---|"]
    for target, budget, allowed in goals:
        cands = [r for r in rows if r.get("arch") == "resnet56" and r.get("target") == target
                 and r.get("recovery") == budget and r.get("acc") is not None and not r.get("iterative")]
        goal = f"resnet56 {target.split(':')[1]} fewer MACs, {budget}: ≤ {allowed} pp below base"
        default_rows = _default_rows(rows, target, budget, "cka")
        default = [r["acc"] for r in default_rows]
        if not cands:
            out.append(f"| {goal} | not run yet | – | – | – |")
            continue
        best = max(cands, key=lambda r: r["acc"])
        note = _recovery_note(best)
        best_text = f"{best['criterion']}{f' [{note}]' if note else ''}, seed {best['seed']}: {best['acc']:.2f} %"
        if not default:
            out.append(f"| {goal} | not run yet | – | – | {best_text} |")
            continue
        gap = statistics.mean(r["base_acc"] - r["acc"] for r in default_rows)  # each against its own machine's base
        out.append(f"| {goal} | {_spread(default)} | {gap:.2f} | {'yes' if gap <= allowed else 'no'} | "
                   f"{best_text} |")
    return out


def tune_table(rows: list[dict[str, Any]]) -> list[str]:
    """The default recipe and its variations at the ``standard`` budget on the validation split, at −50 % and
    −75 % MACs (the ``tune-*`` rows), best mean first."""
    tune = [r for r in rows if r["id"].startswith("tune-") and r.get("val_acc") is not None
            and "criterion" not in r]  # rows with another criterion's blocks: see removed_sets_table
    if not tune:
        return []
    by_recipe: dict[str, dict[str, dict[str, Any]]] = {}
    for r in tune:
        by_recipe.setdefault(r["tune_recipe"], {})[r["target"]] = r
    targets_ = sorted({r["target"] for r in tune})

    def mean(name: str) -> float:
        got = by_recipe[name]
        return statistics.mean(got[t]["val_acc"] for t in got) if len(got) == len(targets_) else -1.0

    out = ["| recipe | changed from the default | " + " | ".join(f"top-1 % at −{t.split(':')[1]}" for t in targets_)
           + " | mean | wall time each |", "|---|---|" + "---:|" * (len(targets_) + 2)]
    default = next(iter(by_recipe.get("cosine", {}).values()), {}).get("recipe", {})
    for name in sorted(by_recipe, key=mean, reverse=True):
        got = by_recipe[name]
        first = next(iter(got.values()))
        changed = _recovery_note({"recipe": {k: v for k, v in first["recipe"].items()
                                             if k in _VARIANT_FIELDS and v != default.get(k)}})
        cells = " | ".join(f"{got[t]['val_acc']:.2f}" if t in got else "–" for t in targets_)
        out.append(f"| {name}{' (default)' if name == 'cosine' else ''} | {changed or '–'} | {cells} | "
                   f"{_fmt(mean(name)) if mean(name) >= 0 else '–'} | "
                   f"{_minutes(statistics.mean(r['seconds'] for r in got.values()))} |")
    base = tune[0]
    out += ["", f"{tune[0]['images_seen']:,} images each, on the validation split ({base['validation_images']:,} "
            f"training images held out; unpruned: {base['val_base_acc']:.2f} %). Measured on "
            f"{base.get('env', {}).get('gpu') or base.get('env', {}).get('device', '?')}, several rows at once "
            "(the wall times are shared). One validation accuracy has a standard error of 0.3 (at −50 %) to 0.5 points "
            "(at −75 %): only the lowest learning rate is clearly worse."]
    return out


def seeds_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Random's mean ± sample standard deviation over seeds next to the criteria at standard, −50 %, and the
    default recipe's spread over seeds at each target it was repeated at."""
    std = [r for r in rows if r.get("arch") == "resnet56" and r.get("target") == "macs:50%"
           and r.get("recovery") == "standard" and r.get("acc") is not None]
    rnd = [r["acc"] for r in std if r["criterion"] == "random" and not _recovery_note(r)]
    if not std:
        return []
    out = []
    if len(rnd) >= 2:
        out.append(f"Random blocks, {len(rnd)} seeds: {statistics.mean(rnd):.2f} ± {statistics.stdev(rnd):.2f} % "
                   "(mean ± sample standard deviation).")
    elif rnd:
        out.append(f"Random blocks, 1 seed so far: {rnd[0]:.2f} %.")
    for r in std:
        note = _recovery_note(r)
        if (r["criterion"] != "random" or note) and r["seed"] == 0:
            crit = r["criterion"] + (" iterative" if r["iterative"] else "") + (f" ({note})" if note else "")
            out.append(f"{crit}: {r['acc']:.2f} %.")
    for target in ("macs:50%", "macs:75%"):
        default = [r["acc"] for r in _default_rows(rows, target, "standard", "cka")]
        if len(default) >= 2:
            out.append(f"CKA with the default recipe at −{target.split(':')[1]}, `standard`: {_spread(default)}.")
    return out


def choice_at(rows: list[dict[str, Any]], target: str = "macs:75%") -> list[str]:
    """Each criterion's blocks at ``target`` with the default recipe, per budget (mean over seeds where there are
    several), with the accuracy right after removal: does the choice matter more when more blocks go?"""
    out = []
    for budget in ("quick", "standard"):
        got: dict[str, list[dict[str, Any]]] = {}
        for r in _default_rows(rows, target, budget):
            got.setdefault(r["criterion"], []).append(r)
        if "cka" not in got or len(got) < 2:
            continue
        parts = [f"{c} {_spread([r['acc'] for r in got[c]])} (right after removal "
                 f"{statistics.mean(r['acc_removed'] for r in got[c]):.2f} %)"
                 for c in sorted(got, key=lambda c: (c != "cka", c))]
        out.append(f"At −{target.split(':')[1]}, `{budget}`: " + "; ".join(parts) + ".")
    return out


def _kept(r: dict[str, Any]) -> str:
    """The candidate blocks a row kept, per stage (``layer1: 1 6 7``), from the blocks it removed (a later
    stage's first block changes shape and is never a candidate)."""
    removed = set(r.get("removed") or [])
    depth = {"resnet56": 9, "resnet20": 3}.get(r.get("arch", "resnet56"), 9)
    parts = []
    for s, stage in enumerate(("layer1", "layer2", "layer3")):
        kept = [str(i) for i in range(0 if s == 0 else 1, depth) if f"{stage}.{i}" not in removed]
        parts.append(f"{stage}: {' '.join(kept) or '–'}")
    return "; ".join(parts)


def removed_sets_table(rows: list[dict[str, Any]], target: str = "macs:75%") -> list[str]:
    """Every ResNet-56 ``standard`` test row at ``target`` with the default recipe, best first: which blocks stayed,
    the parameters kept and the accuracy. All blocks of a CIFAR ResNet cost the same MACs, but a last-stage block
    holds 16× the parameters of a first-stage one."""
    chosen = _default_rows(rows, target, "standard")
    if not chosen:
        return []
    out = ["| blocks chosen by | seed | candidate blocks kept | parameters kept | top-1 % (10,000 test) |",
           "|---|---:|---|---:|---:|"]
    for r in sorted(chosen, key=lambda r: -r["acc"]):
        out.append(f"| {r['criterion']} | {r['seed']} | {_kept(r)} | {100 * (1 - r['params_reduction']):.0f} % | "
                   f"{r['acc']:.2f} |")
    return out


#: One series per (criterion, where features were mimicked): label, colour, line style.
CURVES = {("cka", "blocks"): ("CKA, block mimicking (default)", "#1f77b4", "-"),
          ("random", "blocks"): ("random, block mimicking", "#d62728", "-"),
          ("cka", "stages"): ("CKA, stage mimicking (first default)", "#1f77b4", "--"),
          ("random", "stages"): ("random, stage mimicking", "#d62728", "--")}


def curve_points(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(images seen, top-1) per series of :data:`CURVES` for one-shot ResNet-56 at −50 % MACs, seed 0, in budget
    order; no recovery (0 images) does not depend on the recipe, so it starts every series."""
    def keep(r: dict[str, Any], crit: str) -> bool:
        return (r.get("arch") == "resnet56" and r.get("target") == "macs:50%" and r.get("criterion") == crit
                and not r.get("iterative") and r.get("seed") == 0 and r.get("acc") is not None
                and r.get("method") in (None, "feature"))

    out = {}
    for crit, mimic in CURVES:
        by_images: dict[int, dict[str, Any]] = {}
        for r in rows:
            if keep(r, crit) and (_mimic(r) == mimic or r["images_seen"] == 0):
                # one point per budget: the default recipe (decaying weight) where both weights were run
                if recipe_name(r) not in ("stages", "blocks", "cosine"):
                    continue  # the tuned variations are not on the curve
                old = by_images.get(r["images_seen"])
                if old is None or recipe_name(r) == "cosine":
                    by_images[r["images_seen"]] = r
        pts = sorted((n, r["acc"]) for n, r in by_images.items())
        out[(crit, mimic)] = pts if len(pts) > 1 else []
    return out


def _base_acc(rows: list[dict[str, Any]]) -> float | None:
    return next((r["base_acc"] for r in rows if r.get("arch") == "resnet56" and r.get("base_acc")), None)


def curve_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """The curve as a PNG (matplotlib, which needs nothing outside Python)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    base = _base_acc(rows)
    points = curve_points(rows)
    for ax, zoom in zip(axes, (False, True), strict=True):
        for key, pts in points.items():
            label, colour, style = CURVES[key]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o" + style, color=colour, label=label)
        if base is not None:
            ax.axhline(base, color="grey", linestyle=":", label=f"unpruned {base:.2f} %")
        ax.set_xscale("symlog", linthresh=5000)
        ax.set_xlim(left=0)
        ax.set_xlabel("training images drawn by recovery")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_ylim(80, 91)
            ax.set_title("the same, top-1 from 80 %")
        else:
            ax.set_ylabel("top-1 % (10,000 test images)")
            ax.set_title("ResNet-56, −52.6 % MACs: accuracy vs recovery budget")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curve_figure(rows: list[dict[str, Any]]):
    """Accuracy vs images seen for CKA- and random-pruned ResNet-56 at −50 % MACs (seed 0)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, pts in curve_points(rows).items():
        label, colour, style = CURVES[key]
        if pts:
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=label,
                            line={"color": colour, "dash": "solid" if style == "-" else "dash"})
    base = _base_acc(rows)
    if base is not None:
        fig.add_hline(y=base, line_dash="dot", annotation_text=f"unpruned {base:.2f} %")
    fig.update_layout(title="ResNet-56, −50 % MACs: top-1 (10,000 test images) vs training images of recovery",
                      xaxis_title="training images drawn by recovery", yaxis_title="top-1 %",
                      template="plotly_white", width=900, height=520)
    return fig


def recipe_name(r: dict[str, Any]) -> str:
    """``cosine`` (block mimicking with a decaying weight: the default), ``blocks`` (constant weight) or ``stages``
    (the first default), for the feature-mimicking rows; a tuned variation's own name (``cosine-lr0.05``) for the
    rows that carry one."""
    if r.get("recipe_name"):
        return r["recipe_name"]
    if _mimic(r) != "blocks":
        return "stages"
    return "cosine" if (r.get("recipe") or {}).get("feature_schedule") == "cosine" else "blocks"


#: The recipe fields a reference curve is keyed by (the rest of the recipe at the library's defaults); the stored
#: test rows before the ``recipe`` field mimicked at each stage's output with weight 1, constant.
CURVE_FIELDS = ("mimic", "feature_weight", "feature_schedule")
_FIRST_RECIPE = {"mimic": "stages", "feature_weight": 1.0, "feature_schedule": "constant"}


def reference_curves(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimate's reference (``cka_analysis.recovery.REFERENCE_DROP_PP``) from the test rows: top-1 points
    below the unpruned model after recovery, by budget, for ResNet-56 CKA one-shot, per measured MACs reduction and
    recipe (feature mimicking keyed by ``CURVE_FIELDS``, the rest of the recipe at its defaults); the mean where a
    row was repeated over seeds. A budget of 0 (no recovery: the accuracy right after removal, seed 0) holds for
    every recipe at that reduction."""
    keep = [r for r in rows if not _is_validation_row(r) and r.get("arch") == "resnet56" and r.get("criterion") == "cka"
            and not r.get("iterative") and r.get("acc") is not None and r.get("method") in (None, "feature")
            and set(r.get("recipe") or {}) <= set(CURVE_FIELDS)]
    drops: dict[tuple[float, tuple], dict[int, list[float]]] = {}
    removed: dict[float, list[float]] = {}
    ids: dict[tuple[float, tuple], list[str]] = {}
    for r in keep:
        reduction = round(r["macs_reduction"], 3)
        recipe = {**_FIRST_RECIPE, **(r.get("recipe") or {})}
        key = (reduction, ("feature", *(recipe[f] for f in CURVE_FIELDS)))
        if r.get("seed") == 0:  # other seeds calibrate on other images, and may remove other blocks
            removed.setdefault(reduction, []).append(r["base_acc"] - r["acc_removed"])
        if r["budget"] > 0:
            drops.setdefault(key, {}).setdefault(r["budget"], []).append(r["base_acc"] - r["acc"])
            ids.setdefault(key, []).append(r["id"])
    curves = []
    for (reduction, recipe), by_budget in sorted(drops.items()):
        curve = {0: statistics.mean(removed[reduction]),
                 **{b: statistics.mean(v) for b, v in sorted(by_budget.items())}}
        curves.append({"macs_reduction": reduction, "method": recipe[0],
                       **dict(zip(CURVE_FIELDS, recipe[1:], strict=True)),
                       "drop_pp": {str(b): round(v, 2) for b, v in curve.items()}, "rows": sorted(ids[(reduction, recipe)])})
    base = next((r["base_acc"] for r in keep), None)
    return {"format": "cka-prune-reference-curve/1",
            "what": "top-1 points below the unpruned model after recovery, by budget (training images)",
            "model": "cifar_resnet56 cifar10jpeg (89.51 % top-1), CKA one-shot, all 10,000 test images"
            if base is None else f"cifar_resnet56 cifar10jpeg ({base:.2f} % top-1), CKA one-shot, all 10,000 test "
            "images", "source": "benchmarks/results/recovery.json (python -m benchmarks.recovery --stage report)",
            "curves": curves}


def _readme_rows(rows: list[dict[str, Any]], recipe: str) -> list[dict[str, Any]]:
    return sorted((r for r in rows if not _is_validation_row(r) and r.get("acc") is not None
                   and recipe_name(r) == recipe and r.get("method") in (None, "feature")),
                  key=lambda r: (r["arch"] != "resnet56", r["target"], -r["budget"], r["criterion"] != "cka",
                                 r["criterion"], r["seed"]))


def readme_table(rows: list[dict[str, Any]], recipe: str = "cosine") -> list[str]:
    """The README's compact table: the finished test rows of one recipe (default: the default one), by criterion
    and seed within a model, target and budget."""
    chosen = _readme_rows(rows, recipe)
    if not chosen:
        return ["(no row finished yet)"]
    out = ["| model, target | blocks chosen by | recovery | images seen | top-1 % | Δ vs unpruned | MACs | "
           "wall time |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in chosen:
        crit = r["criterion"] + (" iterative" if r["iterative"] else "") + (f", seed {r['seed']}" if r["seed"] else "")
        out.append(f"| {r['arch']}, ≥ {r['target'].split(':')[1]} fewer MACs | {crit} | {r['recovery']} | "
                   f"{r['images_seen']:,} | {r['acc']:.2f} | {r['acc'] - r['base_acc']:+.2f} | "
                   f"−{100 * r['macs_reduction']:.1f} % | {_wall(r)} |")
    return out


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """The targets, the criteria after recovery and the seed spread: what REPORT.md leads with."""
    return ["### Targets", "", *targets(rows), "", "### Criteria after recovery", "", *report_table(rows), "",
            *seeds_summary(rows), "", *choice_at(rows), "", *removed_sets_table(rows)]


def bn_scoring_section(bn: dict[str, Any] | None) -> list[str]:
    """What ``benchmarks/bn_scoring.py`` found: does re-estimating batch norm inside scoring change CKA's choice?"""
    if not bn:
        return []
    chosen, acc = bn["chosen"], bn["acc_bn_only"]
    only = {k: sorted(set(v) - set(bn["common"])) for k, v in chosen.items()}
    return ["## Batch-norm re-estimation inside scoring", "",
            f"`python -m benchmarks.bn_scoring`: every candidate block of ResNet-56 scored by CKA on the same "
            f"{bn['calibration_images']} calibration images, once as the workflow does (the unpruned network's "
            f"batch-norm statistics) and once with the statistics re-estimated on {bn['bn_images']:,} training "
            "images for each candidate.", "",
            f"- Kendall τ between the two score vectors: **{bn['kendall_tau']:.2f}**: the order changes a lot;",
            f"- at {bn['target'].split(':')[1]} fewer MACs both remove {len(chosen['plain'])} blocks, "
            f"{len(bn['common'])} of them the same (as the workflow does only: {', '.join(only['plain']) or '–'}; "
            f"with re-estimation only: {', '.join(only['bn']) or '–'});",
            f"- top-1 on all {bn['test_images']:,} test images after batch-norm re-estimation alone: "
            f"{acc['plain']:.2f} % (as the workflow does) vs {acc['bn']:.2f} % (re-estimated in scoring).", "",
            "So re-estimating inside scoring costs one calibration pass per candidate and does not pick better "
            "blocks here; scoring stays as the paper defines it." if acc["bn"] <= acc["plain"] else
            "Re-estimating inside scoring picks blocks that start recovery higher here.", ""]


def write(data: dict[str, Any], out_dir: Path) -> Path:
    import json

    bn_path = out_dir / "bn_scoring.json"
    bn = json.loads(bn_path.read_text()) if bn_path.is_file() else None
    rows = data.get("rows", [])
    env = data.get("env") or (rows[0].get("env") if rows else {}) or {}
    lines = ["# Recovery benchmark", "",
             f"Machine: {env.get('cpu', '?')}, {env.get('torch_threads', '?')} torch threads, "
             f"device {env.get('device', '?')}, torch {env.get('torch', '?')}. Rows finished: {len(rows)}. "
             "Produced by `python -m benchmarks.recovery` (resumable; `--list` shows what is missing).", "",
             "## Targets", "", *targets(rows), "",
             "## Methods side by side (validation split, one pruned model)", "", *method_table(rows), "",
             "## The default recipe tuned at `standard` (validation split)", "", *tune_table(rows), "",
             "## Criteria after recovery (all 10,000 test images)", "", *report_table(rows), "",
             *seeds_summary(rows), "", *choice_at(rows), "", "## Which blocks at −75 % (`standard`, default recipe)", "",
             *removed_sets_table(rows), "", *bn_scoring_section(bn)]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "recovery.md"
    md.write_text("\n".join(lines))
    if any(r.get("criterion") in ("cka", "random") for r in rows):
        curve_figure(rows).write_html(out_dir / "recovery_curve.html", include_plotlyjs="cdn")
        curve_png(rows, out_dir / "recovery_curve.png")
    return md
