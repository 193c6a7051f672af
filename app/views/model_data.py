"""Step 1 — Model & data: pick or upload a model, pick the data, see the blocks and the test accuracy."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from dashboard import compute, state, uploads
from dashboard.estimate import EVALUATE_PASSES, Work
from dashboard.ui import MACS_NOTE, accuracy_key, count, default_test_samples, job_result, pct

from cka_analysis.choices import DASHBOARD_CALIBRATION_IMAGES, DEFAULT_CALIBRATION_IMAGES
from cka_analysis.data import DATA_KINDS
from cka_analysis.models import available_models, model_entry, weight_names

st.title("Model & data")
st.caption(
    "Choose the network to make shallower and the images to measure it with. CKA (Centered Kernel Alignment) "
    "compares what layers compute; blocks whose removal barely changes the final features can go."
)

SOURCES = {
    "registry": "Model from the registry",
    "timm": "timm model by name (timm extra)",
    "hf": "Hugging Face image classifier (a directory on the server, or a hub id)",
    "checkpoint": "Upload a checkpoint (.pt/.pth/.th/.safetensors)",
    "archive": "Upload a saved pruned model (.zip of manifest.json + model.safetensors)",
}
FACTORY = state.server_factory()
if FACTORY:  # only when the person who started the server passed it (never from an upload or a URL)
    SOURCES = {"factory": f"Your model: {FACTORY} (the server's --model-factory)", **SOURCES}
DATA_LABELS = {"digits": "digits (bundled, offline)", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
               "imagefolder": "ImageFolder (train/ and test/ or val/)"}

models = available_models()
left, right = st.columns(2, gap="large")

with left:
    st.subheader("Model")
    st.session_state.setdefault("md_source", "registry")
    source = st.radio("Source", list(SOURCES), format_func=SOURCES.get, key="md_source")
    model_spec: dict = {}
    upload = None
    file = None
    if source == "registry":
        st.session_state.setdefault("md_registry", "digits_resnet")
        name = st.selectbox("Architecture", models, key="md_registry")
        st.caption(model_entry(name).description)
        names = weight_names(name)
        options = [*names, state.RANDOM_WEIGHTS]
        if st.session_state.get("md_weights") not in options:
            st.session_state.pop("md_weights", None)
        weights = st.selectbox("Weights", options, key="md_weights",
                               help="Named weights of the architecture; random initialisation for experiments")
        w = None if weights == state.RANDOM_WEIGHTS else weights
        if w is not None:
            src = model_entry(name).weights[w]
            if src.notes:
                st.caption(src.notes)
        else:
            st.warning("Random initialisation: accuracy will be at chance level and CKA scores say nothing about "
                       "a trained network. Pick named weights or upload a checkpoint to prune a real model.",
                       icon=":material/casino:")
        st.session_state.setdefault("md_classes", 0)
        classes = st.number_input("Number of classes (0 = the weights' own)", 0, 100_000, key="md_classes")
        st.session_state.setdefault("md_weights_download", False)
        allow = st.toggle("Allow downloading weights", key="md_weights_download",
                          help="Named weights that are not cached yet are downloaded once into the torch hub cache")
        model_spec = {"kind": "registry", "name": name, "weights": w, "num_classes": int(classes) or None,
                      "allow_download": allow}
    elif source in ("timm", "hf", "factory"):
        if source == "timm":
            st.session_state.setdefault("md_timm_name", "convnext_atto")
            name = st.text_input("timm model name", key="md_timm_name", help="Any name timm.list_models() shows; "
                                 "the preset (input size, mean/std) comes from timm's pretrained config or the "
                                 "weights file's metadata")
            st.session_state.setdefault("md_ext_weights", "random")
            w = st.text_input("Weights: a file on the server (.safetensors/.pth), a timm tag, or random",
                              key="md_ext_weights")
        elif source == "hf":
            st.session_state.setdefault("md_hf_dir", "")
            name = st.text_input("Directory holding config.json (or a hub id where the hub can be reached)",
                                 key="md_hf_dir", help="Loaded with AutoModelForImageClassification; "
                                 "trust_remote_code is never turned on")
            st.session_state.setdefault("md_hf_random", False)
            w = "random" if st.toggle("Random initialisation (its config only)", key="md_hf_random") else None
        else:
            name, w = FACTORY, None
            st.caption("Built by the function the server was started with; weights: what the function loads.")
        if w == "random":
            st.warning("Random initialisation: accuracy will be at chance level.", icon=":material/casino:")
        st.session_state.setdefault("md_ext_classes", 0)
        classes = st.number_input("Number of classes (0 = the model's own)", 0, 100_000, key="md_ext_classes")
        st.session_state.setdefault("md_ext_patterns", "")
        patterns = st.text_input("Blocks (optional): module names or patterns, comma-separated", key="md_ext_patterns",
                                 help="Empty: the residual blocks are found by probing the network; the proposal "
                                      "is shown below, where you can edit it")
        model_spec = {"kind": source, "name": name, "factory": FACTORY if source == "factory" else None,
                      "weights": (w or None) if source != "hf" else w, "num_classes": int(classes) or None,
                      "allow_download": False,
                      "block_patterns": [x.strip() for x in patterns.split(",") if x.strip()] or None}
    elif source == "checkpoint":
        st.session_state.setdefault("md_ckpt_arch", "digits_resnet")
        arch = st.selectbox("Architecture of the checkpoint", models, key="md_ckpt_arch")
        st.session_state.setdefault("md_ckpt_classes", 0)
        classes = st.number_input("Number of classes (0 = the architecture's default)", 0, 100_000,
                                  key="md_ckpt_classes")
        file = st.file_uploader("Checkpoint file", type=list(uploads.CHECKPOINT_TYPES), key="md_ckpt_file",
                                help="A state dict; torch files are read with weights_only=True (no code runs)")
        model_spec = {"kind": "checkpoint", "arch": arch, "num_classes": int(classes) or None}
    else:
        file = st.file_uploader("Saved model (.zip)", type=list(uploads.ARCHIVE_TYPES), key="md_archive_file",
                                help="The .zip the Export page downloads (manifest.json + model.safetensors)")
        model_spec = {"kind": "archive"}
    if file is not None:
        upload = (file.name, file.getvalue())

with right:
    st.subheader("Data")
    st.session_state.setdefault("md_data_kind", "digits")
    kind = st.selectbox("Dataset", list(DATA_KINDS), format_func=DATA_LABELS.get, key="md_data_kind")
    root = ""
    download = False
    if kind in ("cifar10", "cifar100"):
        st.session_state.setdefault("md_data_root", "")
        root = st.text_input("Root folder (empty: the download cache)", key="md_data_root")
        st.session_state.setdefault("md_download", False)
        download = st.toggle("Allow download", key="md_download",
                             help=f"Fetch {kind} (about 170 MB) into the root folder when it is not there")
    elif kind == "imagefolder":
        st.session_state.setdefault("md_data_root", "")
        root = st.text_input("Folder with train/ and test/ (or val/), one subfolder per class", key="md_data_root")
    st.session_state.setdefault("md_n_calib", state.DEMO_DATA["n_calib"])
    n_calib = st.number_input("Calibration images (from the training split)", 4, 50_000, step=64,
                              key="md_n_calib",
                              help="CKA heatmaps and removal scores use this class-balanced, seeded subset. "
                                   f"{DASHBOARD_CALIBRATION_IMAGES} by default here, so that they recompute "
                                   "quickly; `cka-prune` and `PruneRequest` default to "
                                   f"{DEFAULT_CALIBRATION_IMAGES}.")
    st.session_state.setdefault("md_seed", 0)
    seed = st.number_input("Seed", 0, 2**31 - 1, key="md_seed")
    data_spec = {"kind": kind, "root": root, "download": download, "n_calib": int(n_calib), "seed": int(seed)}

if st.button("Load model and data", type="primary", key="md_load"):
    if model_spec["kind"] in ("checkpoint", "archive") and upload is None:
        st.error("Choose a file to upload first.")
    elif kind == "imagefolder" and not root.strip():
        st.error("Enter the ImageFolder path (a folder holding train/ and test/ or val/).")
    else:
        with st.spinner("Loading …"), state.guard("loading the model and data") as g:
            state.activate(model_spec, data_spec, upload)
        if not g.failed:
            st.session_state["md_loaded_ok"] = True
            st.rerun()

a = state.active()
if a is None:
    st.stop()
if st.session_state.pop("md_loaded_ok", False):
    st.success(f"Loaded {a.model_label} with {a.data_label}.")

st.divider()
st.subheader(f"Active: {a.model_label}")
p = a.preset
c1, c2, c3, c4 = st.columns(4)
c1.metric("MACs per image", count(a.macs), help=MACS_NOTE)
c2.metric("Parameters", count(a.params))
c3.metric("Removable blocks", f"{len(a.removable)} / {len(a.blocks)}",
          help="Residual blocks whose shortcut is the identity (the others change the shape)")
acc_box = c4.empty()
st.caption(f"{state.describe_model(a)} · input {p.input_size[0]}×{p.input_size[1]}×{p.input_size[2]}, "
           f"{p.num_classes} classes · weights: {p.weights}. {MACS_NOTE}")

st.markdown("**Blocks** (in forward order). A block is removable when its shortcut is the identity, so the "
            "network stays valid without it.")
table = pd.DataFrame([
    {"block": b.name, "stage": b.stage, "removable": b.removable, "MACs": b.macs,
     "MACs %": 100 * b.macs / a.macs if a.macs else 0.0, "params": b.params, "why not removable": b.reason or ""}
    for b in a.blocks
])
with st.spinner("Measuring the latency of every block (once per model and device; cached) …"), \
        state.guard("measuring block latency") as lat_guard:
    from cka_analysis.latency import measure_block_costs

    costs = measure_block_costs(a.model, batch_size=1, device=state.device())
if not lat_guard.failed:  # measured latency beside MACs: where they disagree, MACs mislead
    table["latency ms"] = [costs.block_ms.get(b.name) for b in a.blocks]
    table["latency %"] = [100 * costs.block_ms[b.name] / costs.base_ms if b.name in costs.block_ms else None
                          for b in a.blocks]
    st.caption(f"Latency: what removing the block saves at batch 1 on {costs.device} ({costs.threads} threads; "
               f"whole model {costs.base_ms:.2f} ms, p10–p90 {costs.base_p10_ms:.2f}–{costs.base_p90_ms:.2f} ms — a "
               "wide range means other jobs disturbed the timing), measured per block with interleaved repeats.")
st.dataframe(table, hide_index=True, key="md_blocks", column_config={
    "MACs %": st.column_config.NumberColumn(format="%.1f %%"),
    "MACs": st.column_config.NumberColumn(format="localized"),
    "params": st.column_config.NumberColumn(format="localized"),
    "latency ms": st.column_config.NumberColumn(format="%.3f"),
    "latency %": st.column_config.NumberColumn(format="%.1f %%"),
})

candidates = getattr(a.model, "cka_candidates", None)
if a.model_spec.get("kind") in state.EXTERNAL_KINDS:
    st.markdown("**Proposed blocks.** Found by probing the network: modules whose input and output have the same "
                "shape, with a residual connection around them (zeroing their weights leaves their input), that the "
                "network runs without. Untick a row (or type patterns above) and apply to score other blocks.")
    if candidates:
        proposal = pd.DataFrame([{"use": True, "block": c.name, "kind": c.kind, "shape": "×".join(map(str, c.shape)),
                                  "params": c.params, "output change without it": c.output_change}
                                 for c in candidates])
        edited = st.data_editor(proposal, hide_index=True, key="md_proposal", disabled=[
            "block", "kind", "shape", "params", "output change without it"], column_config={
            "output change without it": st.column_config.NumberColumn(format="%.3f")})
        chosen = [r["block"] for r in edited.to_dict("records") if r["use"]]
        if chosen != [c.name for c in candidates] and st.button("Apply the chosen blocks", key="md_apply_blocks"):
            with state.guard("declaring the blocks") as g:
                state.activate({**a.model_spec, "block_patterns": chosen}, a.data_spec)
            if not g.failed:
                st.rerun()
    else:
        st.caption(f"Blocks named by hand: {', '.join(a.model_spec.get('block_patterns') or [])}.")

st.markdown("**Accuracy on the test split**")
dev = state.device()
if st.session_state.get("md_test_for") != (a.model_key, a.test_key, dev):  # a new model, data or device
    st.session_state["md_test_for"] = (a.model_key, a.test_key, dev)
    st.session_state["md_test_samples"] = default_test_samples(a, dev)
n_test = st.number_input(
    f"Test images (of {len(a.test):,})", 1, len(a.test), key="md_test_samples",
    help="A seeded, class-balanced sample of the test split: the same N images (and seed) as a pruning run's "
         "accuracies and the Compare page's, in the CLI too. The default is all of it when that takes under "
         "about 45 s on this device, else as many as fit (the sampling error of top-1 is about ±1.5 points at "
         "1,000 images); more on demand.",
)
n_test = int(n_test)
acc = job_result(
    "accuracy", accuracy_key(a, dev, n_test), f"evaluating on {n_test:,} test images",
    lambda: compute.cached_job(compute.test_accuracy, a.model_key, a.test_key, dev, n_test,
                               _model=a.model, _loader=state.test_loader(a, n_test)),
    button="Evaluate on the test split", auto=state.small_work(a, n_test),
    work=Work(a.model, a.model_key, n_test, EVALUATE_PASSES, f"{n_test:,} test images, one forward pass each",
              data=a.test, data_key=a.test_key),
    more="Fewer test images are faster (set above).",
)
if acc is not None:
    top5 = f", top-5 {acc['top5']:.2f} %" if acc.get("top5") is not None else ""
    acc_box.metric("Test accuracy (top-1)", pct(acc["top1"], 2), help=f"{acc['samples']:,} images{top5}")
    st.caption(f"top-1 {acc['top1']:.2f} %{top5}, mean cross-entropy {acc['loss']:.4f} over "
               f"{acc['samples']:,} test images.")
