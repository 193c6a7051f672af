"""The session's evidence as a report: JSON (everything) and Markdown (the numbers behind every figure)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from typing import Any

import torch

from cka_analysis._version import __version__
from cka_analysis.export import jsonable
from cka_analysis.figures import format_count

from . import state


def _results_of(kind: str, model_key: str) -> list[tuple[dict, Any]]:
    out = []
    for k, v in state.results().get(kind, {}).items():
        key = json.loads(k)
        if key.get("model") == model_key:
            out.append((key, v))
    return out


def build(a: state.Active, choice: dict) -> dict[str, Any]:
    """Everything the session knows about the active model and the chosen export (``state.model_choices``)."""
    run = choice.get("run")
    rep: dict[str, Any] = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"cka_prune": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": state.device_description(),
        "model": {
            "label": a.model_label, "arch": a.preset.arch, "preset": a.preset.to_dict(), "macs": a.macs,
            "params": a.params, "blocks": [b.to_dict() for b in a.blocks],
            "macs_note": "MACs = multiply-accumulates of one forward pass for one image (FLOPs / 2)",
        },
        "data": {"label": a.data_label, **a.data_spec},
        "exported": choice["label"],
    }
    acc = _results_of("accuracy", a.model_key)
    if acc:
        rep["test_accuracy"] = acc[0][1]
    rep["heatmaps"] = [{"kernel": k["kernel"], "debiased": k["debiased"], **v} for k, v in
                       _results_of("heatmap", a.model_key)]
    rep["scores"] = {k["criterion"] + (" (debiased)" if k.get("debiased") else ""): v
                     for k, v in _results_of("scores", a.model_key)}
    if run is not None:
        rep["pruning"] = {"label": run["label"], "settings": run["settings"], **run["record"]}
        rep["cross_heatmaps"] = [{"kernel": k["kernel"], "debiased": k["debiased"], **v}
                                 for k, v in _results_of("cross_heatmap", a.model_key) if k.get("run") == run["id"]]
    comparisons = state.results().get("compare", {})
    if comparisons:
        labels = {c["key"]: c["label"] for c in state.model_choices(a)}
        rep["comparisons"] = [
            {"settings": {k: v for k, v in json.loads(key).items() if k != "models"},
             "models": {labels.get(m, m): v for m, v in res.items()}}
            for key, res in comparisons.items()
        ]
    return jsonable(rep)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(rep: dict[str, Any]) -> str:
    """A readable report with the numbers of every figure the dashboard drew."""
    m = rep["model"]
    out = [f"# CKA Prune report: {rep['exported']}", "",
           f"Generated {rep['generated']} with cka-prune {rep['versions']['cka_prune']} "
           f"(torch {rep['versions']['torch']}) on {rep['device']}.", "",
           "## Model and data", "",
           f"- Model: {m['label']}, {format_count(m['macs'])} MACs, "
           f"{format_count(m['params'])} parameters. {m['macs_note']}.",
           f"- Data: {rep['data']['label']}, seed {rep['data'].get('seed', 0)}."]
    if rep.get("test_accuracy"):
        t = rep["test_accuracy"]
        out.append(f"- Test accuracy of the original: top-1 {t['top1']:.2f} % on {t['samples']} images.")
    out += ["", "### Blocks", ""]
    crits = list(rep.get("scores", {}))
    header = ["block", "stage", "removable", "MACs", "params", *[f"score: {c}" for c in crits]]
    rows = []
    for b in m["blocks"]:
        rows.append([b["name"], b["stage"], "yes" if b["removable"] else f"no ({b['reason']})", b["macs"],
                     b["params"], *[rep["scores"][c]["scores"].get(b["name"]) for c in crits]])
    out += [_table(header, rows), "", "Scores: lower = safer to remove."]
    for h in rep.get("heatmaps", []):
        names = h["names_a"]
        mat = h["matrix"]
        out += ["", f"## CKA heatmap ({h['kernel']}{', debiased' if h['debiased'] else ''})", "",
                "Consecutive-layer CKA:", "",
                _table(["from", "to", "CKA"], [[names[i], names[i + 1], mat[i][i + 1]] for i in range(len(names) - 1)]),
                "", "Full matrix (rows and columns in forward order):", "",
                _table(["layer", *names], [[names[i], *mat[i]] for i in range(len(names))])]
    p = rep.get("pruning")
    if p:
        base, final = p["base"], p["final"]
        out += ["", f"## Pruning: {p['label']}", "",
                f"- Removed (in order): {', '.join(p['removed']) or 'nothing'}",
                f"- Target: {p['settings'].get('target') or 'blocks chosen by hand'}; "
                f"{'iterative' if p['iterative'] else 'one-shot'}; criterion {p['criterion'] or '–'}",
                f"- Fine-tuning: {p['settings'].get('finetune') or 'none'}", "",
                _table(["", "accuracy %", "MACs", "params"],
                       [["original", base.get("accuracy"), base["macs"], base["params"]],
                        ["pruned", final.get("accuracy"), final["macs"], final["params"]]]),
                "", f"MACs reduction {100 * final['macs_reduction']:.1f} %, parameter reduction "
                f"{100 * final['params_reduction']:.1f} %.", "", "### Trajectory", "",
                _table(["step", "removed", "MACs", "params", "accuracy %"],
                       [[s["step"], ", ".join(s["removed"]), s["macs"], s["params"], s.get("accuracy")]
                        for s in p["steps"]])]
        for h in rep.get("cross_heatmaps", []):
            out += ["", f"### Original (rows) vs pruned (columns) CKA ({h['kernel']}"
                    f"{', debiased' if h['debiased'] else ''})", "",
                    _table(["layer", *h["names_b"]], [[h["names_a"][i], *row] for i, row in enumerate(h["matrix"])])]
    for c in rep.get("comparisons", []):
        out += ["", "## Comparison", "", f"Settings: {c['settings']}", ""]
        rows = []
        for label, v in c["models"].items():
            lat = v.get("latency") or {}
            rob = v.get("robustness") or {}
            rows.append([label, lat.get("median_ms"), rob.get("clean_accuracy"),
                         json.dumps(rob.get("fgsm")) if rob.get("fgsm") else None,
                         json.dumps(rob.get("pgd")) if rob.get("pgd") else None,
                         json.dumps(rob.get("corruption_mean_per_severity"))
                         if rob.get("corruption_mean_per_severity") else None])
        out.append(_table(["model", "latency ms", "clean acc %", "FGSM acc % by ε", "PGD acc % by ε",
                           "corruption acc % by severity"], rows))
    return "\n".join(out) + "\n"
