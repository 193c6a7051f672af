"""Run every benchmark and write the reproduction report: ``python -m benchmarks.run [--quick]``.

Stages (each also runs on its own, see the modules): ``cka`` (heatmap speed and memory), ``scoring`` (scoring
speed vs the plain loop and the floor), ``criteria`` (accuracy vs MACs reduction per criterion, ResNet-56 and
ResNet-20), ``robustness`` (base vs CKA-pruned under attacks and corruptions), then ``report``: JSON under
``benchmarks/results/``, ``results/REPORT.md`` (tables and plain-words conclusions) and the plots
(``results/criteria.png`` + ``criteria.html``, ``results/robustness.png`` + ``robustness.html``).
``--only report`` rebuilds the report from the JSON files already there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from cka_analysis.choices import CRITERIA
from cka_analysis.robustness import RobustnessResult

from .common import CACHE_DIR, env_info, log, read_json, results_dir, write_json

STAGES = ("criteria", "robustness", "scoring", "cka", "report")
#: The registry's criteria in its order, with the iterative CKA variant right after the paper's one-shot CKA.
CRITERION_ORDER = (CRITERIA[0], "cka_iterative", *CRITERIA[1:])
LABELS = {
    "cka": "CKA (one-shot)",
    "cka_iterative": "CKA (iterative)",
    "random": "random (3 seeds)",
    "weight_norm": "weight norm",
    "block_influence": "block influence",
    "angular": "angular distance",
    "taylor": "Taylor (gate)",
    "loss": "loss oracle",
    "cka_capacity": "capacity-aware CKA",
    "base": "unpruned",
}


# --------------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(m: float, s: float | None, digits: int = 2) -> str:
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def grouped(rows: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, dict[str, Any]]]:
    """(model, target) → criterion → {acc_no_ft, acc_ft (mean, std), macs_reduction, params_reduction, blocks}."""
    out: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r["criterion"] == "base":
            continue
        g = out.setdefault((r["model"], r["target"]), {}).setdefault(r["criterion"], {"rows": []})
        g["rows"].append(r)
    for per in out.values():
        for g in per.values():
            rs = g["rows"]
            for k in ("acc_no_ft", "acc_ft", "macs_reduction", "params_reduction"):
                g[k] = _mean_std([r[k] for r in rs])
    return out


def _short(blocks: list[str]) -> str:
    """layer1.3 → 1.3, sorted in forward order."""
    def key(b: str) -> tuple[int, int]:
        s, i = b.replace("layer", "").split(".")
        return int(s), int(i)

    return " ".join(b.replace("layer", "") for b in sorted(blocks, key=key))


def criteria_tables(crit: dict[str, Any]) -> str:
    rows = crit["rows"]
    lines: list[str] = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    groups = grouped(rows)
    for model in models:
        base = next(r for r in rows if r["model"] == model and r["criterion"] == "base")
        n_eval = base["eval_images"]
        lines.append(f"\n#### {model}: unpruned {base['acc_no_ft']:.2f} % top-1 on {n_eval:,} test images, "
                     f"{base['macs'] / 1e6:.1f} M MACs, {base['params'] / 1e3:.0f} k parameters\n")
        lines.append("| target | criterion | MACs ↓ | params ↓ | acc. no FT (%) | acc. after FT (%) | blocks removed |")
        lines.append("|---|---|---:|---:|---:|---:|---|")
        targets = sorted({t for (m, t) in groups if m == model})
        for t in targets:
            per = groups[(model, t)]
            best_no = max(g["acc_no_ft"][0] for c, g in per.items() if c != "loss")
            best_ft = max(g["acc_ft"][0] for c, g in per.items() if c != "loss")
            for c in CRITERION_ORDER:
                if c not in per:
                    continue
                g = per[c]
                no, ft = _fmt(*g["acc_no_ft"]), _fmt(*g["acc_ft"])
                if c != "loss" and abs(g["acc_no_ft"][0] - best_no) < 1e-9:
                    no = f"**{no}**"
                if c != "loss" and abs(g["acc_ft"][0] - best_ft) < 1e-9:
                    ft = f"**{ft}**"
                if c == "random":
                    blocks = "; ".join(f"s{r['seed']}: {_short(r['blocks_removed'])}" for r in g["rows"])
                else:
                    blocks = _short(g["rows"][0]["blocks_removed"])
                lines.append(
                    f"| ≈{100 * t:.0f} % | {LABELS.get(c, c)} | {100 * g['macs_reduction'][0]:.1f} % | "
                    f"{100 * g['params_reduction'][0]:.1f} % | {no} | {ft} | {blocks} |"
                )
    return "\n".join(lines)


def readme_table(crit: dict[str, Any]) -> str:
    """The compact table for the top-level README: acc. after FT (no FT) per criterion and target."""
    rows = crit["rows"]
    groups = grouped(rows)
    keys = sorted(groups, key=lambda k: (k[0] != "resnet56", k[1]))
    head = "| criterion | " + " | ".join(
        f"{m} −{100 * groups[(m, t)]['cka']['macs_reduction'][0]:.0f} % MACs" for m, t in keys) + " |"
    lines = [head, "|---|" + "---:|" * len(keys)]
    bases = {r["model"]: r["acc_no_ft"] for r in rows if r["criterion"] == "base"}
    lines.append("| unpruned | " + " | ".join(f"{bases[m]:.2f}" for m, _ in keys) + " |")
    for c in CRITERION_ORDER:
        if not any(c in groups[k] for k in keys):
            continue  # a criterion this run did not measure (e.g. added after it)
        cells = []
        for k in keys:
            g = groups[k].get(c)
            if g is None:
                cells.append("–")
                continue
            ft, no = g["acc_ft"], g["acc_no_ft"]
            cells.append(f"{_fmt(*ft, 1)} ({_fmt(*no, 1)})")
        lines.append(f"| {LABELS.get(c, c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conclusions(crit: dict[str, Any]) -> list[str]:
    """Plain-words statements derived from the numbers (no hand-picking): where CKA wins and where it does not."""
    out = []
    groups = grouped(crit["rows"])
    for (model, _t), per in sorted(groups.items(), key=lambda kv: (kv[0][0] != "resnet56", kv[0][1])):
        if "cka" not in per:
            continue
        red = 100 * per["cka"]["macs_reduction"][0]
        for key, what in (("acc_no_ft", "right after removal"), ("acc_ft", "after the short fine-tune")):
            ranked = sorted(((g[key][0], c) for c, g in per.items() if c != "loss"), reverse=True)
            cka = per["cka"][key][0]
            pos = 1 + sum(1 for v, c in ranked if v > cka + 1e-9)
            best_v, best_c = ranked[0]
            rnd = per.get("random")
            vs_rand = ""
            if rnd:
                m, s = rnd[key]
                vs_rand = (f"; random: {m:.1f} ± {(s or 0):.1f} %, so CKA is "
                           + ("above" if cka > m + (s or 0) else ("within one std of" if cka >= m - (s or 0)
                                                                 else "below")) + " random")
            oracle = per.get("loss")
            vs_oracle = f"; loss oracle {oracle[key][0]:.1f} %" if oracle else ""
            it = per.get("cka_iterative")
            vs_it = f"; iterative CKA {it[key][0]:.1f} %" if it else ""
            lead = "best" if pos == 1 else f"#{pos} of {len(ranked)}, best is {LABELS.get(best_c, best_c)} at {best_v:.1f} %"
            out.append(f"{model}, −{red:.0f} % MACs, {what}: one-shot CKA {cka:.1f} % ({lead}){vs_it}{vs_rand}"
                       f"{vs_oracle}.")
    return out


def robustness_table(rob: dict[str, Any]) -> str:
    eps = rob["eps"]
    head = ("| model | clean | " + " | ".join(f"FGSM {round(e * 255)}/255" for e in eps) + " | "
            + " | ".join(f"PGD {round(e * 255)}/255" for e in eps) + " | " + " | ".join(
                f"corr. s{s}" for s in range(1, 6)) + " |")
    lines = [head, "|---|" + "---:|" * (1 + 2 * len(eps) + 5)]
    for name, r in rob["models"].items():
        rec = RobustnessResult.from_dict(r)  # also reads results written before the typed records
        cells = [f"{rec.clean_accuracy:.1f}"]
        cells += [f"{rec.attack('fgsm').accuracy_at(e):.1f}" for e in eps]
        cells += [f"{rec.attack('pgd').accuracy_at(e):.1f}" for e in eps]
        cells += [f"{rec.corruptions.mean_at(s):.1f}" for s in range(1, 6)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def _plot_rows(rows: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """Rows of one model for plotting, each criterion line starting at the unpruned model (0 %)."""
    base = next(r for r in rows if r["model"] == model and r["criterion"] == "base")
    crits = list(dict.fromkeys(r["criterion"] for r in rows if r["model"] == model and r["criterion"] != "base"))
    out = [{**base, "criterion": LABELS.get(c, c), "seed": s} for c in crits
           for s in ([0, 1, 2] if c == "random" else [None])]
    out += [{**r, "criterion": LABELS.get(r["criterion"], r["criterion"])}
            for r in rows if r["model"] == model and r["criterion"] != "base"]
    return out


def plot_criteria(crit: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = crit["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.6 * len(models)), squeeze=False)
    styles = {c: (f"C{i}", "o-" if c.startswith("cka") else ("s--" if c == "loss" else ".-"))
              for i, c in enumerate(CRITERION_ORDER)}
    for mi, model in enumerate(models):
        base = next(r for r in rows if r["model"] == model and r["criterion"] == "base")
        per_target = grouped([r for r in rows if r["model"] == model])
        for ci, key in enumerate(("acc_no_ft", "acc_ft")):
            ax = axes[mi][ci]
            for c in CRITERION_ORDER:
                pts = [(0.0, base[key], 0.0)]
                for (_, _t), per in sorted(per_target.items(), key=lambda kv: kv[0][1]):
                    if c in per:
                        pts.append((100 * per[c]["macs_reduction"][0], per[c][key][0], per[c][key][1] or 0.0))
                if len(pts) == 1:
                    continue
                colour, style = styles[c]
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=style,
                            color=colour, label=LABELS.get(c, c), capsize=3, lw=2.2 if c == "cka" else 1.4, ms=5)
            n_eval = base["eval_images"]
            ax.set_title(f"{model}: {'without fine-tuning' if key == 'acc_no_ft' else 'after the short fine-tune'}"
                         f" ({n_eval:,} test images)", fontsize=10)
            ax.set_xlabel("achieved MACs reduction (%)")
            ax.set_ylabel("top-1 accuracy (%)")
            ax.grid(alpha=0.3)
        axes[mi][1].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Accuracy vs MACs reduction per removal criterion ({crit['mode']} run; random: mean ± std)")
    fig.tight_layout()
    png = results_dir() / "criteria.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    paths = [png]
    try:
        from cka_analysis.figures import criteria_accuracy_curves

        html = []
        for model in models:
            for key in ("acc_no_ft", "acc_ft"):
                f = criteria_accuracy_curves(_plot_rows(rows, model), y=key,
                                             title=f"{model}: accuracy {'without' if key == 'acc_no_ft' else 'after'}"
                                                   " fine-tuning vs MACs reduction")
                html.append(f.to_html(full_html=False, include_plotlyjs="cdn" if not html else False))
        p = results_dir() / "criteria.html"
        p.write_text("<html><body>" + "\n".join(html) + "</body></html>\n")
        paths.append(p)
    except Exception as exc:  # the PNG is the product; an HTML failure is reported, not fatal
        log(f"criteria.html not written: {exc}")
    return paths


def plot_robustness(rob: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, r) in enumerate(rob["models"].items()):
        rec = RobustnessResult.from_dict(r)
        for ax, kind in zip(axes[:2], ("fgsm", "pgd"), strict=True):
            pts = sorted(rec.attack(kind).points())
            ax.plot([0] + [e * 255 for e, _ in pts], [rec.clean_accuracy] + [a for _, a in pts], "o-",
                    color=f"C{i}", label=name)
            ax.set_title(f"{kind.upper()} ({rob['samples']} test images)")
            ax.set_xlabel("ε (/255)")
        corr = rec.corruptions
        axes[2].plot([0, *corr.severities], [rec.clean_accuracy, *corr.mean_per_severity()], "o-", color=f"C{i}",
                     label=name)
    axes[2].set_title("mean over 8 corruptions")
    axes[2].set_xlabel("severity (0 = clean)")
    for ax in axes:
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    png = results_dir() / "robustness.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    paths = [png]
    try:
        from cka_analysis.figures import adversarial_curves, corruption_curves

        adv = adversarial_curves(rob["models"])
        cor = corruption_curves(rob["models"])
        p = results_dir() / "robustness.html"
        p.write_text("<html><body>" + adv.to_html(full_html=False, include_plotlyjs="cdn")
                     + cor.to_html(full_html=False, include_plotlyjs=False) + "</body></html>\n")
        paths.append(p)
    except Exception as exc:
        log(f"robustness.html not written: {exc}")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _top_ops(profile: list[dict]) -> str:
    """The six most expensive operators of a torch.profiler summary, as "`op` share %" text."""
    return ", ".join(f"`{p['op']}` {100 * (p['share'] or 0):.0f} %" for p in profile[:6])


def _gb(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _recovery_images(budget: dict[str, Any]) -> int:
    """The recovery budget of a criteria run (older results: fine-tuning steps × batch)."""
    if "recovery" in budget:
        from cka_analysis.recovery import RecoveryConfig

        return RecoveryConfig.parse(budget["recovery"]).images
    return int(budget.get("ft_steps", 0)) * int(budget.get("ft_batch", 0))


def write_report(run_info: dict[str, Any] | None = None) -> Path:
    run_info = run_info or read_json("run.json") or {}
    crit, rob = read_json("criteria.json"), read_json("robustness.json")
    sc, ck = read_json("scoring.json"), read_json("cka.json")
    env = (crit or sc or ck or {}).get("env") or env_info()
    mode = run_info.get("mode") or (crit or {}).get("mode", "?")
    L: list[str] = []
    L.append("# CKA Prune: reproduction report\n")
    L.append(f"Generated by `python -m benchmarks.run{' --quick' if mode == 'quick' else ''}` ({mode} mode). "
             f"Device: **{env['device']}**, CPU {env['cpu']}, {env['logical_cpus']} logical CPUs, "
             f"{env['torch_threads']} torch threads, torch {env['torch']}, Python {env['python']}; "
             f"load average at start {env.get('loadavg_at_start')}. ")
    if not env.get("cuda_available"):
        L.append("**GPU figures missing**: no GPU was available to this run; every number below is CPU-only.\n")
    if run_info.get("stages"):
        L.append("Wall time per stage: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in run_info["stages"].items())
                 + f"; total {run_info.get('total_seconds', 0) / 60:.1f} min"
                 + (f" (note: {run_info['note']})" if run_info.get("note") else "") + ".\n")

    recovered = read_json("recovery.json")
    if recovered and recovered.get("rows"):
        from benchmarks.recovery_report import headline

        L.append("## 0. Headline: after a fair recovery (all 10,000 test images)\n")
        L.append("From `python -m benchmarks.recovery` (`results/recovery.md` has every row, the methods compared on "
                 "a validation split and the accuracy-vs-images plot). Each row is one `run_prune` request with the "
                 "default recovery, as `cka-prune prune --recovery quick|standard` runs it. The tables below it "
                 "(section 1) use a much smaller recovery and a 1,000-image test subset: they rank criteria right "
                 "after removal, not what a user ends up holding.\n")
        L.extend(headline(recovered["rows"]))
        L.append("")
    from benchmarks import deep, throughput

    L.extend(deep.report_lines())
    L.extend(throughput.report_lines())
    if crit:
        b = crit["budget"]
        L.append("## 1. Which blocks to remove: accuracy vs MACs reduction\n")
        L.append("Adapted CIFAR ResNets (weights fine-tuned to the shared JPEG-75 copy of CIFAR-10; see "
                 "`../shared/data/weights/README.md`). Every criterion ranks the removable blocks on the same "
                 f"{b['calibration_images']} class-balanced training images; the planner removes the lowest-scoring "
                 "blocks until the MACs target is met (all blocks of these networks cost the same MACs, so every "
                 "criterion removes the same number of blocks at a target). Every row is one "
                 "`cka_analysis.workflow.run_prune` request (the same call as `cka-prune prune`). *acc. no FT*: right "
                 "after removal; *acc. after FT*: after the same recovery for every row (a budget of "
                 f"{int(_recovery_images(b)):,} training images, seed 0; iterative CKA spends it on short "
                 "recoveries after each removal and a final one). Accuracies are top-1 on "
                 + ("all 10,000 test images" if not b["eval_images"] else f"a fixed class-balanced subset of "
                                                                          f"{b['eval_images']:,} test images")
                 + ". Bold: best criterion in the column (the loss oracle excluded, it is the reference). Blocks: "
                   "`s.i` = `layer{s}.{i}`.\n")
        for n in b.get("notes", []):
            L.append(f"- {n}")
        L.append(criteria_tables(crit))
        L.append("\n![accuracy vs MACs reduction](criteria.png)\n\nInteractive version: `criteria.html`.\n")
        L.append("### What the numbers say (generated from the table)\n")
        for s in conclusions(crit):
            L.append(f"- {s}")
        L.append("")
        L.append("### Compact table (acc. after FT, in brackets without FT)\n")
        L.append(readme_table(crit) + "\n")

    if rob:
        L.append("## 2. Robustness: base vs CKA-pruned\n")
        L.append(f"`cka_analysis.robustness.evaluate_robustness` on {rob['samples']} test images (class-balanced, "
                 f"fixed), L∞ FGSM and PGD-{rob['pgd_steps']} (random start, step 2.5·ε/steps) with ε in pixel units, "
                 "and the mean accuracy over eight CIFAR-10-C-style corruptions per severity. The pruned models are "
                 "those of the table after its fine-tune.\n")
        L.append(robustness_table(rob) + "\n")
        L.append("![robustness](robustness.png)\n")

    L.append("## 3. Speed\n")
    if sc:
        m = sc["macs_per_image"]
        L.append(f"### Scoring (`score_blocks(..., \"cka\")`), ResNet-56, {sc['calibration_images']} calibration images, "
                 f"batch {sc['batch_size']}\n")
        L.append("| path | seconds | × plain loop | × floor |")
        L.append("|---|---:|---:|---:|")
        L.append(f"| prefix reuse (`strategy=\"prefix\"`, the default) | {sc['prefix_seconds']:.1f} | "
                 f"{sc['ratio_prefix_vs_plain']:.2f} | {sc['ratio_prefix_vs_floor']:.2f} |")
        L.append(f"| plain loop (`strategy=\"full\"`, one full forward per candidate) | {sc['plain_loop_seconds']:.1f} | "
                 f"1.00 | {sc['plain_loop_seconds'] / sc['floor_seconds']:.2f} |")
        L.append(f"| floor: 1 full forward + Σ MACs after each candidate, at the measured rate | "
                 f"{sc['floor_seconds']:.1f} | {sc['floor_seconds'] / sc['plain_loop_seconds']:.2f} | 1.00 |")
        L.append(f"| floor at the MAC rate the plain loop achieved ({sc['plain_loop_mac_rate_gmacs']:.1f} GMAC/s) | "
                 f"{sc['floor_seconds_at_plain_loop_rate']:.1f} | "
                 f"{sc['floor_seconds_at_plain_loop_rate'] / sc['plain_loop_seconds']:.2f} | "
                 f"{sc['floor_seconds_at_plain_loop_rate'] / sc['floor_seconds']:.2f} |")
        L.append(f"| (brief's floor: suffixes only, without the prefix pass) | {sc['suffix_only_floor_seconds']:.1f} | "
                 f"{sc['suffix_only_floor_seconds'] / sc['plain_loop_seconds']:.2f} | "
                 f"{sc['suffix_only_floor_seconds'] / sc['floor_seconds']:.2f} |")
        L.append("")
        L.append(f"MACs per image: full forward {m['full_forward'] / 1e6:.1f} M, plain loop {m['plain_loop'] / 1e9:.2f} G "
                 f"({m['candidates']} candidates + the reference), prefix floor {m['prefix_floor'] / 1e9:.2f} G. "
                 f"Measured rate {sc['mac_rate_gmacs']:.1f} GMAC/s (fastest of {len(sc['forward_seconds'])} timed full "
                 f"forwards over the same batches, interleaved with the scoring runs; every time in this table is the "
                 f"minimum of {sc.get('repeats', 1)} interleaved repeats: "
                 f"prefix {', '.join(f'{t:.1f}' for t in sc.get('prefix_seconds_all', []))} s, plain "
                 f"{', '.join(f'{t:.1f}' for t in sc.get('plain_loop_seconds_all', []))} s). On a shared machine the "
                 f"rate moves with the load, so the floor is also given at the plain loop's own rate: "
                 f"{sc['ratio_prefix_vs_floor_at_plain_loop_rate']:.2f}× for the prefix path. Prefix / plain per "
                 f"repeat: " + ", ".join(f"{a / b:.2f}" for a, b in zip(sc.get('prefix_seconds_all', []),
                                                                         sc.get('plain_loop_seconds_all', []),
                                                                         strict=False))
                 + f". Scores of both paths agree to "
                 f"{sc['max_abs_score_difference']:.1e} "
                 f"(same ranking: {sc['same_ranking']}). Goals: ≤ 0.55 × plain loop — "
                 f"**{'met' if sc['meets_goal_vs_plain'] else 'NOT met'}** ({sc['ratio_prefix_vs_plain']:.2f}); "
                 f"≤ 1.15 × floor — at the timed-forward rate **{'met' if sc['meets_goal_vs_floor'] else 'NOT met'}** "
                 f"({sc['ratio_prefix_vs_floor']:.2f}), at the plain loop's rate "
                 f"**{'met' if sc['ratio_prefix_vs_floor_at_plain_loop_rate'] <= 1.15 else 'NOT met'}** "
                 f"({sc['ratio_prefix_vs_floor_at_plain_loop_rate']:.2f}).\n")
        prof = sc.get("profile_prefix_one_batch") or []
        if prof:
            L.append("Where the prefix path spends its time (torch.profiler, one batch, self CPU time): "
                     + _top_ops(prof) + ".\n")
    if ck:
        L.append(f"### CKA heatmap, ResNet-56, {ck['images']:,} test images, {len(ck['layers'])} layers, batch "
                 f"{ck['batch_size']}\n")
        L.append("| implementation | seconds (CKA only) | speed-up |")
        L.append("|---|---:|---:|")
        L.append(f"| `MinibatchCKA` (one Gram per layer per batch, all pairs in one matmul) | "
                 f"{ck['minibatch_cka_seconds']:.1f} | {ck['speedup_cka_only']:.1f}× |")
        extra = (f" — timed on {ck['pairs_timed_baseline']} of {ck['pairs_total']} pairs "
                 f"({ck['per_pair_seconds_measured']:.1f} s), extrapolated by its cost model"
                 if ck["baseline_extrapolated"] else "")
        L.append(f"| per-pair recomputation (torch_cka style){extra} | {ck['per_pair_seconds_full_matrix']:.1f} | 1× |")
        L.append("")
        L.append(f"The shared forward pass took {ck['forward_seconds']:.1f} s; including it the speed-up is "
                 f"{ck['speedup_including_forward']:.1f}×. Values agree to {ck['max_abs_difference']:.1e} "
                 f"(goal 1e-6: **{'met' if ck['values_equal_1e-6'] else 'NOT met'}**); speed-up goal ≥ 10×: "
                 f"**{'met' if ck['meets_goal_speedup'] else 'NOT met'}**.")
        prof = ck.get("profile_minibatch_update_one_batch") or []
        if prof:
            L.append(" Where one `MinibatchCKA.update` spends its time (torch.profiler, self CPU): "
                     + _top_ops(prof) + ".")
        mem = ck.get("memory") or {}
        if "peak_rss_bytes" in mem:
            L.append(f" Peak memory of a {mem['samples']:,}-image heatmap (`cka_matrix`, batch {mem['batch_size']}): "
                     f"{_gb(mem['peak_rss_bytes'])} peak RSS of the whole process (Python, torch and the model: "
                     f"{_gb(mem['peak_rss_before_bytes'])} before the heatmap started; "
                     f"+{_gb(mem['heatmap_peak_increase_bytes'])} during it; test JPEGs read from disk per batch; "
                     f"{mem['seconds']:.0f} s), measured as VmHWM (/proc/self/status) of a fresh child process; "
                     f"goal ≤ 2 GB: **{'met' if mem['meets_goal'] else 'NOT met'}**.\n")
        elif mem:
            L.append(f" Peak-memory child failed: `{mem.get('error', '')[-300:]}`\n")
    extra = results_dir() / "conclusions.md"
    if extra.exists():
        L.append("## Conclusions vs the paper's claim (hand-written reading of this run)\n")
        L.append(extra.read_text().strip() + "\n")
    L.append("## Reproduce\n")
    L.append("```\npython -m benchmarks.run --quick   # reduced tables (this report when mode = quick)\n"
             "python -m benchmarks.run           # full: 25/40/50 %, 10,000 test images, one-epoch fine-tune, "
             "per-step fine-tune in iterative CKA\npython -m benchmarks.run --only report   # rebuild this "
             "report from the JSON files\n```\n")
    path = results_dir() / "REPORT.md"
    path.write_text("\n".join(L) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced budgets (minutes on a 2-core CPU)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--only", default=None, help=f"comma-separated stages among {', '.join(STAGES)}")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # development smoke run
    ap.add_argument("--note", default=None, help="free text recorded in the report (e.g. machine load)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 can be faster on an oversubscribed machine)")
    args = ap.parse_args()
    if args.tiny:  # development runs never overwrite the committed results
        import os

        os.environ.setdefault("CKA_BENCH_RESULTS", str(CACHE_DIR / "tiny-results"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    stages = STAGES if not args.only else tuple(s.strip() for s in args.only.split(","))
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stage(s) {bad}; choose among {', '.join(STAGES)}")
    mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    info: dict[str, Any] = {"mode": mode, "env": env_info(args.device), "stages": {}, "note": args.note}
    t_all = time.perf_counter()
    crit_result = None
    for stage in stages:
        t0 = time.perf_counter()
        log(f"=== stage {stage} ===")
        try:
            crit_result = _run_stage(stage, args, crit_result)
        except Exception:  # keep going: the other stages' results are still worth having
            import traceback

            log(f"stage {stage} FAILED:\n{traceback.format_exc()}")
            info.setdefault("failed", {})[stage] = traceback.format_exc()[-3000:]
        info["stages"][stage] = time.perf_counter() - t0
        if stage != "report":
            info["total_seconds"] = time.perf_counter() - t_all
            if not args.only:
                write_json("run.json", info)
    info["total_seconds"] = time.perf_counter() - t_all
    if not args.only:
        write_json("run.json", info)
    path = write_report(None if args.only else info)
    log(f"report: {path}")


def _run_stage(stage: str, args: argparse.Namespace, crit_result: dict[str, Any] | None) -> dict[str, Any] | None:
    from . import bench_cka, bench_scoring, criteria, robustness

    if stage == "cka":
        bench_cka.run(args.quick, args.device, tiny=args.tiny)
    elif stage == "scoring":
        bench_scoring.run(args.quick, args.device, tiny=args.tiny)
    elif stage == "criteria":
        return criteria.run(args.quick, args.device, tiny=args.tiny)
    elif stage == "robustness":
        robustness.run(args.quick, args.device, criteria=crit_result, tiny=args.tiny)
    elif stage == "report":
        crit = read_json("criteria.json")
        if crit:
            plot_criteria(crit)
        rob = read_json("robustness.json")
        if rob:
            plot_robustness(rob)
    return crit_result


if __name__ == "__main__":
    main()
