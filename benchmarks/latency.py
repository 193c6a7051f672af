"""Latency benchmark: does removing X % of the MACs remove X % of the latency, and can latency be planned?

For ResNet-56 and ResNet-20 (``cifar10jpeg`` weights, blocks ranked once by CKA on calibration images of the
training split, no fine-tuning — accuracy is not the question here):

1. per-block latency costs are measured (:func:`cka_analysis.latency.measure_block_costs`, eager torch, batch 1
   and 64);
2. the model is pruned to −25/−50/−75 % MACs, and to −25/−50 % *predicted* latency with the batch-1 and the
   batch-64 costs (the planner's latency target);
3. the base and every pruned model are timed in torch eager, the ``.pt2`` program and onnxruntime (CPU provider;
   CUDA provider on a GPU) at batch 1 and 64, all interleaved in one run (:func:`~cka_analysis.latency.time_runtimes`);
4. one row per model × runtime × batch goes to ``results/latency.json`` as soon as its stage finishes (rerun to
   resume: finished stages are skipped; ``--fresh`` starts over), then a table (stdout and ``results/latency.md``)
   and a plot (``results/latency.html``; ``latency.png`` with kaleido, else matplotlib).

    python -m benchmarks.latency                      # ≈ 5–10 min on 2 shared CPU cores, 1 thread
    python -m benchmarks.latency --criterion weight_norm --repeats 5 --archs resnet20   # a quicker look
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cka_analysis.blocks import find_blocks, remove_blocks
from cka_analysis.latency import (
    BlockCosts,
    TimingOptions,
    measure_block_costs,
    predicted_reduction,
    time_runtimes,
)
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.pruning import Target, plan
from cka_analysis.scoring import ScoringOptions, score_blocks

from .common import CACHE_DIR, env_info, load_model, log, read_json, results_dir, stacked, write_json

JSON_NAME = "latency.json"
MACS_TARGETS = (0.25, 0.50, 0.75)
LATENCY_TARGETS = (0.25, 0.50)
BATCHES = (1, 64)


# ---------------------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------------------


def _variants(model: nn.Module, scores: dict[str, float], costs: dict[int, BlockCosts]) -> dict[str, dict]:
    """Every pruned model of the benchmark: name → {target, plan_batch, removed, macs/params reduction}."""
    blocks = find_blocks(model)
    size = model.cka_preset.input_size
    base_macs, base_params = count_macs(model, size), count_params(model)
    out: dict[str, dict] = {"base": {"target": None, "plan_batch": None, "removed": []}}
    for t in MACS_TARGETS:
        p = plan(blocks, scores, Target("macs", t), base_macs=base_macs, base_params=base_params)
        out[f"macs-{t:.0%}"] = {"target": {"kind": "macs", "value": t}, "plan_batch": None, "removed": p.blocks}
    for b, c in costs.items():
        for t in LATENCY_TARGETS:
            p = plan(blocks, scores, Target("latency", t), base_macs=base_macs, base_params=base_params,
                     block_costs=c.block_ms, base_latency=c.base_ms)
            out[f"latency-{t:.0%}@b{b}"] = {"target": {"kind": "latency", "value": t}, "plan_batch": b,
                                            "removed": p.blocks}
    for v in out.values():
        pruned = remove_blocks(model, v["removed"])
        v["macs_reduction"] = 1 - count_macs(pruned, size) / base_macs
        v["params_reduction"] = 1 - count_params(pruned) / base_params
    return out


def _distinct(variants: dict[str, dict]) -> dict[str, str]:
    """Variant name → the name of the first variant with the same removed blocks (timed once)."""
    first: dict[tuple, str] = {}
    return {n: first.setdefault(tuple(sorted(v["removed"])), n) for n, v in variants.items()}


# ---------------------------------------------------------------------------------------------------------------
# Stages (each appends its rows and saves, so a killed run resumes after the last finished stage)
# ---------------------------------------------------------------------------------------------------------------


def _repeats(args: argparse.Namespace, batch: int) -> int:
    """Timed rounds at a batch size: batch-1 calls take milliseconds, so they get more rounds."""
    return args.repeats_batch1 if batch == 1 else args.repeats


def _timing(args: argparse.Namespace, batch: int) -> TimingOptions:
    """How the benchmark times at a batch size: its threads and quantile, 2 warm-up rounds, :func:`_repeats`."""
    return TimingOptions(threads=args.threads, warmup=2, repeats=_repeats(args, batch), quantile=args.quantile)


def _has(results: dict, kind: str, arch: str) -> bool:
    return any(r["kind"] == kind and r["arch"] == arch for r in results["rows"])


def _save(results: dict) -> None:
    write_json(JSON_NAME, results)


def _scores(results: dict, arch: str, model: nn.Module, args: argparse.Namespace) -> dict[str, float]:
    for r in results["rows"]:
        if r["kind"] == "scores" and r["arch"] == arch:
            return r["scores"]
    log(f"{arch}: {args.criterion} scores" + (f" on {args.calibration} calibration images"
                                              if args.criterion != "weight_norm" else ""))
    calib = stacked("train", args.calibration, seed=0) if args.criterion != "weight_norm" else None
    sc = score_blocks(model, calib, args.criterion, options=ScoringOptions(device="cpu", batch_size=100))
    results["rows"].append({"kind": "scores", "arch": arch, "criterion": args.criterion,
                            "samples": sc.samples, "seconds": sc.seconds, "scores": sc.scores})
    _save(results)
    return sc.scores


def _costs(results: dict, arch: str, model: nn.Module, args: argparse.Namespace) -> dict[int, BlockCosts]:
    out = {}
    for b in BATCHES:
        row = next((r for r in results["rows"] if r["kind"] == "costs" and r["arch"] == arch
                    and r["batch_size"] == b), None)
        if row is not None:
            out[b] = BlockCosts.from_dict(row["costs"])
            continue
        log(f"{arch}: per-block latency at batch {b} ({_repeats(args, b)} interleaved rounds)")
        c = measure_block_costs(model, batch_size=b, device="cpu", options=_timing(args, b), cache=False)
        blocks = {x.name: x for x in find_blocks(model)}
        results["rows"].append({"kind": "costs", "arch": arch, "batch_size": b, "costs": c.to_dict(),
                                "block_macs": {n: blocks[n].macs for n in c.block_ms}})
        _save(results)
        out[b] = c
    return out


def _timings(results: dict, arch: str, model: nn.Module, variants: dict[str, dict], costs: dict[int, BlockCosts],
             args: argparse.Namespace) -> None:
    if _has(results, "timing", arch):
        return
    same = _distinct(variants)
    models = {n: remove_blocks(model, v["removed"]) for n, v in variants.items() if same[n] == n}
    timings = []
    for b in BATCHES:
        log(f"{arch}: timing {len(models)} distinct models × {len(args.runtimes)} runtimes at batch {b}, "
            f"{_repeats(args, b)} interleaved rounds")
        t0 = time.perf_counter()
        timings += time_runtimes(models, batch_sizes=(b,), runtimes=args.runtimes, device="cpu",
                                 options=_timing(args, b), reference="base",
                                 workdir=CACHE_DIR / "latency-exports" / arch)
        log(f"{arch}: batch {b} exported and timed in {time.perf_counter() - t0:.0f} s")
    by = {(t.model, t.runtime, t.batch_size): t for t in timings}
    for name, v in variants.items():
        for (_, rt, b), t in sorted((k, t) for k, t in by.items() if k[0] == same[name]):
            base, base_median = by[("base", rt, b)].quantile_ms, by[("base", rt, b)].median_ms
            measured = 1 - t.relative  # paired per round: what a slow stretch of the machine does cancels
            pred = predicted_reduction(costs[b], v["removed"]) if b in costs else None
            results["rows"].append({
                "kind": "timing", "arch": arch, "variant": name, **v, "blocks_removed": len(v["removed"]),
                "timed_as": same[name], "runtime": rt, "batch_size": b, "ms": t.quantile_ms,
                "median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms, "base_ms": base,
                "measured_reduction": measured, "measured_reduction_quantile": 1 - t.quantile_ms / base,
                "measured_reduction_median": 1 - t.median_ms / base_median,
                "predicted_reduction": pred, "prediction_error": None if pred is None else measured - pred,
                "repeats": t.repeats, "threads": t.threads,
            })
    _save(results)


# ---------------------------------------------------------------------------------------------------------------
# Report: table and plot
# ---------------------------------------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def table(results: dict) -> str:
    """Markdown table: per model and variant, MACs reduction vs measured latency reduction in each runtime/batch,
    and the predicted reduction (eager costs) at each batch."""
    rows = [r for r in results["rows"] if r["kind"] == "timing"]
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    cols = [(rt, b) for b in BATCHES for rt in runtimes]
    head = ["model", "pruned to", "blocks", "MACs −%"] + [f"{rt} b{b} −%" for rt, b in cols] + \
        [f"predicted b{b} −%" for b in BATCHES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["arch"] == arch):
            if variant == "base":
                continue
            rs = {(r["runtime"], r["batch_size"]): r for r in rows if r["arch"] == arch and r["variant"] == variant}
            any_r = next(iter(rs.values()))
            pred = {b: next((r["predicted_reduction"] for r in rs.values() if r["batch_size"] == b), None)
                    for b in BATCHES}
            cells = [arch, variant, str(any_r["blocks_removed"]), _pct(any_r["macs_reduction"])]
            cells += [_pct(rs[c]["measured_reduction"]) if c in rs else "–" for c in cols]
            cells += [_pct(pred[b]) for b in BATCHES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_table(results: dict) -> str:
    """Markdown table of the latency targets: predicted (eager costs at the plan's batch) vs measured, per runtime."""
    rows = [r for r in results["rows"] if r["kind"] == "timing" and r["target"] and r["target"]["kind"] == "latency"
            and r["batch_size"] == r["plan_batch"]]
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    head = ["model", "target", "batch", "blocks", "MACs −%", "predicted −%", "measured eager −%",
            "error (points)"] + [f"measured {rt} −%" for rt in runtimes if rt != "torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in (r for r in rows if r["runtime"] == "torch"):
        others = {x["runtime"]: x for x in rows if x["arch"] == r["arch"] and x["variant"] == r["variant"]}
        cells = [r["arch"], f"−{100 * r['target']['value']:.0f} %", str(r["batch_size"]), str(r["blocks_removed"]),
                 _pct(r["macs_reduction"]), _pct(r["predicted_reduction"]), _pct(r["measured_reduction"]),
                 f"{100 * r['prediction_error']:+.1f}"]
        cells += [_pct(others[rt]["measured_reduction"]) if rt in others else "–" for rt in runtimes if rt != "torch"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def base_table(results: dict) -> str:
    """Markdown table of the unpruned models' latency (ms) per runtime and batch."""
    rows = [r for r in results["rows"] if r["kind"] == "timing" and r["variant"] == "base"]
    q = results["settings"]["quantile"]
    lines = [f"| model | runtime | batch | p{100 * q:g} ms | median ms | p10–p90 ms |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['runtime']} | {r['batch_size']} | {r['ms']:.2f} | {r['median_ms']:.2f} | "
                     f"{r['p10_ms']:.2f}–{r['p90_ms']:.2f} |")
    return "\n".join(lines)


def cost_summary(results: dict) -> str:
    """Per model and batch: measured per-block latency by stage (mean ms, share of the base) next to the MACs
    share — where the two disagree, MACs mislead."""
    lines = ["| model | batch | stage | blocks | MACs per block, % of model | latency per block, % of model |",
             "|---|---:|---|---:|---:|---:|"]
    macs_total = {r["arch"]: r.get("model_macs") for r in results["rows"] if r["kind"] == "model"}
    for r in (r for r in results["rows"] if r["kind"] == "costs"):
        c = BlockCosts.from_dict(r["costs"])
        stages: dict[str, list[str]] = {}
        for n in c.block_ms:
            stages.setdefault(n.split(".")[0], []).append(n)
        for stage, names in stages.items():
            lat = statistics.mean(c.block_ms[n] for n in names) / c.base_ms
            macs = statistics.mean(r["block_macs"][n] for n in names) / macs_total[r["arch"]]
            lines.append(f"| {r['arch']} | {r['batch_size']} | {stage} | {len(names)} | {100 * macs:.2f} | "
                         f"{100 * lat:.2f} |")
    return "\n".join(lines)


def plot(results: dict) -> list[Path]:
    """MACs reduction vs measured latency reduction (one panel per batch size), and predicted vs measured for the
    latency targets; HTML always, PNG through kaleido or matplotlib."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [r for r in results["rows"] if r["kind"] == "timing" and r["variant"] != "base"]
    fig = make_subplots(rows=1, cols=len(BATCHES) + 1, subplot_titles=[
        *(f"batch {b}: measured vs MACs reduction" for b in BATCHES), "latency targets: measured vs predicted"])
    symbols = {"torch": "circle", "pt2": "diamond", "onnxruntime-cpu": "square", "onnxruntime-cuda": "square"}
    for col, b in enumerate(BATCHES, 1):
        for arch in dict.fromkeys(r["arch"] for r in rows):
            for rt in dict.fromkeys(r["runtime"] for r in rows):
                rs = [r for r in rows if r["arch"] == arch and r["runtime"] == rt and r["batch_size"] == b]
                fig.add_trace(go.Scatter(
                    x=[100 * r["macs_reduction"] for r in rs], y=[100 * r["measured_reduction"] for r in rs],
                    mode="markers", marker={"symbol": symbols.get(rt, "circle"), "size": 9},
                    name=f"{arch} {rt}", legendgroup=f"{arch} {rt}", showlegend=col == 1,
                    text=[r["variant"] for r in rs]), row=1, col=col)
    lat = [r for r in rows if r["runtime"] == "torch" and r["target"] and r["target"]["kind"] == "latency"
           and r["batch_size"] == r["plan_batch"]]
    fig.add_trace(go.Scatter(x=[100 * r["predicted_reduction"] for r in lat],
                             y=[100 * r["measured_reduction"] for r in lat], mode="markers+text",
                             text=[_short(r) for r in lat], textposition="top center",
                             marker={"size": 10, "color": "black"}, name="latency targets (eager)"),
                  row=1, col=len(BATCHES) + 1)
    for col in range(1, len(BATCHES) + 2):
        fig.add_trace(go.Scatter(x=[0, 100], y=[0, 100], mode="lines", line={"dash": "dot", "color": "grey"},
                                 showlegend=False), row=1, col=col)
        fig.update_xaxes(title_text="predicted latency −%" if col > len(BATCHES) else "MACs −%", range=[0, 100],
                         row=1, col=col)
        fig.update_yaxes(title_text="measured latency −%", range=[0, 100], row=1, col=col)
    fig.update_layout(height=460, width=1350, title="Depth pruning: MACs vs measured latency (CPU)")
    out = results_dir()
    paths = [out / "latency.html"]
    fig.write_html(str(paths[0]), include_plotlyjs="cdn")
    png = out / "latency.png"
    try:
        fig.write_image(str(png))
        paths.append(png)
    except (ValueError, ImportError, RuntimeError):
        paths += _matplotlib_png(rows, lat, png)
    return paths


def _short(row: dict) -> str:
    """A point's label: ``R56 −50%@b1``."""
    return f"R{row['arch'].removeprefix('resnet')} −{100 * row['target']['value']:.0f}%@b{row['plan_batch']}"


def _matplotlib_png(rows: list[dict], lat: list[dict], png: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(BATCHES) + 1, figsize=(15, 4.8))
    markers = {"torch": "o", "pt2": "D", "onnxruntime-cpu": "s", "onnxruntime-cuda": "s"}
    for ax, b in zip(axes, BATCHES, strict=False):
        for arch in dict.fromkeys(r["arch"] for r in rows):
            for rt in dict.fromkeys(r["runtime"] for r in rows):
                rs = [r for r in rows if r["arch"] == arch and r["runtime"] == rt and r["batch_size"] == b]
                ax.scatter([100 * r["macs_reduction"] for r in rs], [100 * r["measured_reduction"] for r in rs],
                           marker=markers.get(rt, "o"), label=f"{arch} {rt}", alpha=0.8)
        ax.set_title(f"batch {b}: measured vs MACs reduction")
        ax.set_xlabel("MACs −%")
    ax = axes[-1]
    ax.scatter([100 * r["predicted_reduction"] for r in lat], [100 * r["measured_reduction"] for r in lat],
               color="black")
    for r in lat:
        ax.annotate(_short(r), (100 * r["predicted_reduction"], 100 * r["measured_reduction"]), fontsize=7,
                    xytext=(4, -3), textcoords="offset points")
    ax.set_title("latency targets (eager): measured vs predicted")
    ax.set_xlabel("predicted latency −%")
    for ax in axes:
        ax.plot([0, 100], [0, 100], ":", color="grey")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_ylabel("measured latency −%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [png]


def write_report(results: dict) -> Path:
    env = results["env"]
    text = "\n\n".join([
        "# Latency benchmark (`python -m benchmarks.latency`)",
        f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['torch']} with "
        f"{results['settings']['threads']} thread(s), onnxruntime {results['settings'].get('onnxruntime')}; "
        f"load average at start {env['loadavg_at_start']}, at the end {results.get('loadavg_at_end')} "
        "(a shared machine: other jobs ran throughout), "
        f"{env['date']}. Blocks ranked by `{results['settings']['criterion']}`; "
        f"{results['settings']['repeats_batch1']} (batch 1) / {results['settings']['repeats']} (batch 64) "
        "interleaved timed rounds after 2 warm-up rounds. A measured reduction is 1 − the median over rounds of "
        "pruned / base time within the same round (paired, so a slow stretch of the machine cancels); latencies "
        f"and block costs are the {100 * results['settings']['quantile']:g}th percentile of the rounds (calls "
        "preempted by the other jobs land in the upper part; medians are in latency.json). "
        f"Wall time {results.get('seconds', 0) / 60:.1f} min.",
        "## Latency reduction vs MACs reduction (%, vs the base model in the same runtime and batch)",
        table(results),
        "`predicted` = the eager-torch latency reduction predicted from the measured per-block costs at that batch "
        "(the planner's latency target uses it; `latency-X@bB` rows were planned with the batch-B costs).",
        "## Latency targets: predicted vs measured (at the batch the costs were measured at)",
        target_table(results),
        "## Base latency",
        base_table(results),
        "## Where the cost of a block is: MACs share vs measured latency share (eager torch)",
        cost_summary(results),
    ])
    path = results_dir() / "latency.md"
    path.write_text(text + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="resnet56,resnet20", help="comma-separated: resnet56,resnet20")
    p.add_argument("--criterion", default="cka", choices=("cka", "weight_norm"),
                   help="how blocks are ranked (cka on --calibration images; weight_norm needs no data)")
    p.add_argument("--calibration", type=int, default=500, help="calibration images for cka (default 500)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / onnxruntime threads (default 1: on 2 shared cores, 2 threads stall on each other)")
    p.add_argument("--repeats", type=int, default=15, help="interleaved timed rounds at batch 64 (default 15)")
    p.add_argument("--repeats-batch1", type=int, default=100,
                   help="interleaved timed rounds at batch 1 (default 100)")
    p.add_argument("--quantile", type=float, default=0.2,
                   help="quantile of the timed rounds used (default 0.2: robust to preemption on a shared machine)")
    p.add_argument("--runtimes", default="torch,pt2,onnxruntime", help="comma-separated runtimes to time")
    p.add_argument("--fresh", action="store_true", help="ignore results/latency.json and start over")
    args = p.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"criterion": args.criterion, "calibration": args.calibration, "threads": args.threads,
                "repeats": args.repeats, "repeats_batch1": args.repeats_batch1, "quantile": args.quantile, "runtimes": args.runtimes, "batches": list(BATCHES)}
    try:
        import onnxruntime

        settings["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        settings["onnxruntime"] = None
    results: dict[str, Any] | None = None if args.fresh else read_json(JSON_NAME)
    if results is None or results.get("settings") != settings:
        if results is not None:
            log("results/latency.json was written with other settings: starting over")
        results = {"env": env_info("cpu"), "settings": settings, "rows": [], "seconds": 0.0}
    start = time.perf_counter() - results.get("seconds", 0.0)
    rows_before = len(results["rows"])
    for arch in args.archs:
        model = load_model(arch)
        if not _has(results, "model", arch):
            results["rows"].append({"kind": "model", "arch": arch,
                                    "model_macs": count_macs(model, model.cka_preset.input_size),
                                    "model_params": count_params(model)})
        scores = _scores(results, arch, model, args)
        costs = _costs(results, arch, model, args)
        variants = _variants(model, scores, costs)
        _timings(results, arch, model, variants, costs, args)
        if len(results["rows"]) > rows_before:  # a rerun that only redraws keeps the measured run's time
            results["seconds"] = time.perf_counter() - start
            _save(results)
    if len(results["rows"]) > rows_before:
        results["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        _save(results)
    print(table(results))
    print()
    print(target_table(results))
    print()
    print(cost_summary(results))
    paths = [write_report(results), *plot(results)]
    log("wrote " + ", ".join(str(p) for p in [results_dir() / JSON_NAME, *paths]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
