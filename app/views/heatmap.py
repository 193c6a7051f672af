"""Step 2 — CKA heatmap: how similar the layers' representations are, and original vs pruned."""

from __future__ import annotations

import streamlit as st
from dashboard import compute, state
from dashboard.estimate import CROSS_HEATMAP_PASSES, HEATMAP_PASSES, Work
from dashboard.ui import job_result, plotly

from cka_analysis.figures import HEATMAP_SIZE, adjacent_similarity, cka_heatmap

st.title("CKA heatmap")
a = state.require_active()
st.caption(
    "Each cell is the CKA between two layers' outputs over the calibration images: 1 = the same "
    "representation up to rotation and scale, 0 = unrelated. Long bright squares along the diagonal are runs "
    "of blocks that change little, the candidates for removal."
)

st.session_state.setdefault("hm_kernel", "linear")
st.session_state.setdefault("hm_debiased", True)
st.session_state.setdefault("hm_size", HEATMAP_SIZE)
c1, c2, c3 = st.columns([1, 1, 2])
kernel = c1.segmented_control("Kernel", ["linear", "rbf"], key="hm_kernel", required=True,
                              help="linear CKA, or an RBF kernel with the median-distance bandwidth")
debiased = c2.toggle("Debiased (unbiased HSIC)", key="hm_debiased",
                     help="Removes the small-sample bias of CKA (Song et al. 2012); recommended below ~1,000 images")
size = c3.select_slider("Heatmap size (px)", [400, 500, 600, 720, 840, 960, 1200], key="hm_size",
                        help="Side of the matrix; cells stay square. Smaller for a narrow window, larger to read "
                             "a deep network (labels are thinned when cells are small; hover shows every name)")
kernel = kernel or "linear"
dev = state.device()
n = len(a.calib)

key = {"model": a.model_key, "data": a.data_key, "kernel": kernel, "debiased": debiased, "device": dev}
res = job_result(
    "heatmap", key, f"computing the CKA heatmap over {n} images",
    lambda: compute.cached_job(compute.heatmap, a.model_key, a.data_key, kernel, debiased, dev,
                               _model=a.model, _loader=state.calib_loader(a)),
    button="Compute the heatmap", auto=state.small_work(a, n),
    work=Work(a.model, a.model_key, n, HEATMAP_PASSES,
              f"{n:,} calibration images (one forward pass each, then the CKA of every pair of layers)",
              data=a.calib, data_key=a.data_key, cka_batch=state.CALIB_BATCH, cka_kernel=kernel,
              cka_debiased=bool(debiased)),
    more="Fewer calibration images (the Model & data page) are faster; the heatmap's noise grows as 1/√N.",
)
if res is not None:
    names = res["names_a"]
    title = f"{a.preset.arch}: {kernel} CKA{' (debiased)' if debiased else ''}, {n} calibration images"
    plotly(cka_heatmap(res["matrix"], names, title=title, size=int(size)), key="hm_fig", own_size=True)
    plotly(adjacent_similarity(res["matrix"], names), key="hm_adjacent")
    st.caption("Consecutive-layer CKA: a high value means the block between the two layers changed the "
               "representation little.")

st.divider()
st.subheader("Original vs pruned")
runs = state.runs()
if not runs:
    st.info("After a pruning run (the **Prune** page), this compares the original network's layers with the "
            "pruned network's layers over the same images.")
else:
    labels = {r["id"]: r["label"] for r in runs}
    if st.session_state.get("hm_cross_run") not in labels:
        st.session_state["hm_cross_run"] = runs[-1]["id"]
    run_id = st.selectbox("Pruning run", list(labels), format_func=labels.get, key="hm_cross_run")
    run = next(r for r in runs if r["id"] == run_id)
    ckey = {**key, "run": run_id}
    cross = job_result(
        "cross_heatmap", ckey, "computing the original-vs-pruned CKA",
        lambda: compute.cached_job(compute.cross_heatmap, a.model_key, run_id, a.data_key, kernel, debiased,
                                   dev, _model=a.model, _pruned=run["model"], _loader=state.calib_loader(a)),
        button="Compare original and pruned", auto=state.small_work(a, 2 * n),
        work=Work(a.model, a.model_key, n, CROSS_HEATMAP_PASSES,
                  f"{n:,} calibration images through both networks", data=a.calib, data_key=a.data_key,
                  cka_batch=state.CALIB_BATCH, cka_kernel=kernel, cka_debiased=bool(debiased), cka_models=2,
                  copies=2),
    )
    if cross is not None:
        plotly(cka_heatmap(cross["matrix"], cross["names_b"], cross["names_a"], size=int(size),
                           title=f"Original (rows) vs {run['label']} (columns)"), key="hm_cross_fig", own_size=True)
        st.caption("Rows: layers of the original network; columns: layers of the pruned one (the removed blocks "
                   f"{', '.join(run['record']['removed'])} are gone). A bright diagonal means the pruned network "
                   "still computes what the original did.")
