"""Step 6 — Export: the pruned model (safetensors + manifest, .pt2, ONNX) and the report (JSON, Markdown)."""

from __future__ import annotations

import json
import re

import streamlit as st
from dashboard import compute, report, state
from dashboard.ui import job_result

from cka_analysis.native import native_dir_name

FORMATS = {
    "safetensors": "safetensors + manifest (.zip; reload with cka_analysis.export.load_pruned or this app)",
    "native": "native format of hf:, timm: and torchvision models (.zip: a Hugging Face directory for "
              "from_pretrained, or a timm / torchvision state dict + config.json)",
    "pt2": "torch.export program (.pt2)",
    "onnx": "ONNX (checked against onnxruntime when installed)",
}
MIME = {"safetensors": "application/zip", "native": "application/zip", "pt2": "application/octet-stream", "onnx": "application/octet-stream"}

st.title("Export")
a = state.require_active()
choices = state.model_choices(a)
by_key = {c["key"]: c for c in choices}
if not state.runs():
    st.info("No pruning run yet: you can export the original network and the report, or prune first.")
if st.session_state.get("ex_model") not in by_key:
    st.session_state["ex_model"] = choices[-1]["key"]
native_ok = native_dir_name(a.model) is not None
st.session_state.setdefault("ex_formats", [f for f in FORMATS if f != "native" or native_ok])
key = st.selectbox("Model to export", list(by_key), format_func=lambda k: by_key[k]["label"], key="ex_model")
choice = by_key[key]
formats = st.multiselect("Formats", list(FORMATS), format_func=FORMATS.get, key="ex_formats")

rep = report.build(a, choice)
slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{a.preset.arch}-{choice['label'].split(':')[0]}").strip("-").lower()

st.subheader("Model files")
if formats:
    ekey = {"model": key, "formats": sorted(formats)}
    files = job_result(
        "export", ekey, "writing the export files",
        lambda: lambda progress=None, cancel=None: compute.build_exports(
            choice["model"], slug, {k: rep.get(k) for k in ("pruning", "scores", "test_accuracy", "data")},
            tuple(formats), progress=progress, cancel=cancel),
        button="Prepare the files",
    )
    if files is not None:
        st.session_state.setdefault("exports", {})[key] = files
        for fmt in formats:
            if fmt in files["files"]:
                name, data = files["files"][fmt]
                st.download_button(f"Download {name} ({len(data) / 1024:.0f} KB)", data, file_name=name,
                                   mime=MIME[fmt], key=f"ex_dl_{fmt}", on_click="ignore")
            elif fmt in files["errors"]:
                st.error(f"{fmt}: the export failed: {files['errors'][fmt]}")
        if files.get("onnx") and files["onnx"].get("checked"):
            st.caption(f"ONNX checked against onnxruntime: max |Δ logits| = {files['onnx']['max_abs_diff']:.2e}.")
else:
    st.info("Choose at least one format.")

st.subheader("Report")
st.caption("Everything this session computed for the model: blocks, scores, heatmap numbers, the pruning record, "
           "comparisons. The Markdown lists the numbers behind every figure.")
md = report.markdown(rep)
c1, c2 = st.columns(2)
c1.download_button("Download report.json", json.dumps(rep, indent=2), file_name=f"{slug}-report.json",
                   mime="application/json", key="ex_report_json", on_click="ignore")
c2.download_button("Download report.md", md, file_name=f"{slug}-report.md", mime="text/markdown",
                   key="ex_report_md", on_click="ignore")
with st.expander("Preview the Markdown report"):
    st.markdown(md)
