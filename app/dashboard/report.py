"""The session's evidence as a report: JSON (everything) and Markdown (the numbers behind every figure).

The pruning part is the library's record (:class:`cka_analysis.workflow.PruneRecord`: ``to_dict`` for the JSON,
``markdown`` for the text), the same as ``cka-prune prune``'s ``report.json``; this module only adds what the
session computed around it (scores, heatmaps, comparisons).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from typing import Any

import torch

from cka_analysis._version import __version__
from cka_analysis.export import jsonable, markdown_table
from cka_analysis.figures import format_count
from cka_analysis.workflow import PruneRecord

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
        rep["pruning"] = {"label": run["label"], **run["record"]}
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
    out += [markdown_table(header, rows), "", "Scores: lower = safer to remove."]
    for h in rep.get("heatmaps", []):
        names = h["names_a"]
        mat = h["matrix"]
        out += ["", f"## CKA heatmap ({h['kernel']}{', debiased' if h['debiased'] else ''})", "",
                "Consecutive-layer CKA:", "",
                markdown_table(["from", "to", "CKA"], [[names[i], names[i + 1], mat[i][i + 1]] for i in range(len(names) - 1)]),
                "", "Full matrix (rows and columns in forward order):", "",
                markdown_table(["layer", *names], [[names[i], *mat[i]] for i in range(len(names))])]
    p = rep.get("pruning")
    if p:
        record = PruneRecord.from_dict({k: v for k, v in p.items() if k != "label"})
        out += ["", f"## Pruning: {p['label']}", "", record.markdown()]
        for h in rep.get("cross_heatmaps", []):
            out += ["", f"### Original (rows) vs pruned (columns) CKA ({h['kernel']}"
                    f"{', debiased' if h['debiased'] else ''})", "",
                    markdown_table(["layer", *h["names_b"]], [[h["names_a"][i], *row] for i, row in enumerate(h["matrix"])])]
    for c in rep.get("comparisons", []):
        out += ["", "## Comparison", "", f"Settings: {c['settings']}", ""]
        rows = []
        for label, v in c["models"].items():
            lat = v.get("latency") or {}
            rob = v.get("robustness") or {}
            rows.append([label, lat.get("median_ms"), rob.get("clean_accuracy"),
                         *(", ".join(f"{e * 255:g}/255: {acc:.2f}" for e, acc in zip(rob[k]["eps"], rob[k]["accuracy"],
                                                                                   strict=True))
                           if rob.get(k) else None for k in ("fgsm", "pgd")),
                         json.dumps(rob["corruptions"]["mean_per_severity"]) if rob.get("corruptions") else None])
        out.append(markdown_table(["model", "latency ms", "clean acc %", "FGSM acc % by ε", "PGD acc % by ε",
                           "corruption acc % by severity"], rows))
    return "\n".join(out) + "\n"
