"""Step 3 — Removal scores: which blocks are safest to remove, under the paper's CKA and other criteria."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from dashboard import compute, state
from dashboard.estimate import Work
from dashboard.ui import job_result, plotly

from cka_analysis.choices import CRITERIA, CRITERION_INFO
from cka_analysis.figures import rank_agreement, rank_agreement_heatmap, rank_comparison, score_bars

st.title("Removal scores")
a = state.require_active()
st.caption(
    "One score per removable block; **lower = safer to remove**. The paper's criterion compares the network's "
    "final features with and without each block (1 − CKA): a block whose removal leaves them almost unchanged "
    "does little. Grey blocks cannot be removed (their shortcut changes the shape); hover for the reason."
)
dev = state.device()
n = len(a.calib)

st.session_state.setdefault("sc_criterion", "cka")
st.session_state.setdefault("sc_debiased", False)
c1, c2 = st.columns([2, 1])
criterion = c1.selectbox("Criterion", list(CRITERIA), key="sc_criterion",
                         format_func=lambda c: f"{c} — {CRITERION_INFO[c].description}")
debiased = c2.toggle("Debiased CKA", key="sc_debiased", disabled=criterion != "cka",
                     help="Use the debiased CKA estimator for the cka criterion")
deb = bool(debiased) and criterion == "cka"


def _key(c: str) -> dict:
    return {"model": a.model_key, "data": a.data_key, "criterion": c,
            "debiased": bool(debiased) and c == "cka", "device": dev}


res = job_result(
    "scores", _key(criterion), f"scoring blocks ({criterion})",
    lambda: compute.cached_job(compute.scores, a.model_key, a.data_key, criterion, deb, dev,
                               _model=a.model, _loader=state.calib_loader(a)),
    button="Compute the scores", auto=state.small_work(a, n * len(a.removable)),
    work=Work(a.model, a.model_key, n, 1.0,
              f"{n} calibration images: the shared prefix once, the rest after each of {len(a.removable)} blocks",
              data=a.calib, data_key=a.data_key, suffixes_of=tuple(a.removable)),
    more="Fewer calibration images (Model & data page) are faster.",
)
if res is not None:
    vals = res["scores"]
    names = [b.name for b in a.blocks]
    fig = score_bars(names, [vals.get(b) for b in names], removable=[b.removable for b in a.blocks],
                     reasons=[b.reason for b in a.blocks], criterion=criterion,
                     title=f"Removal scores ({criterion}{', debiased' if deb else ''})")
    plotly(fig, key="sc_bars")
    ranking = sorted(vals, key=lambda b: vals[b])
    macs = {b.name: b.macs for b in a.blocks}
    st.dataframe(pd.DataFrame([
        {"rank": i + 1, "block": b, "score": vals[b], "MACs saved %": 100 * macs[b] / a.macs}
        for i, b in enumerate(ranking)
    ]), hide_index=True, key="sc_table", column_config={
        "score": st.column_config.NumberColumn(format="%.5f"),
        "MACs saved %": st.column_config.NumberColumn(format="%.1f %%"),
    })
    st.caption(f"{res['samples']} calibration images, {res['seconds']:.2f} s.")

st.divider()
st.subheader("Compare criteria")
st.caption("Ranks of every block under several criteria side by side (1 = removed first), and how much the "
           "rankings agree (Kendall's τ-b: 1 = same order, 0 = unrelated, −1 = reversed).")
st.session_state.setdefault("sc_compare", ["cka", "block_influence", "weight_norm", "random"])
chosen = st.multiselect("Criteria", list(CRITERIA), key="sc_compare")
if len(chosen) < 2:
    st.info("Choose at least two criteria.")
else:
    chosen = [c for c in CRITERIA if c in chosen]  # the paper's CKA first
    ckey = {"model": a.model_key, "data": a.data_key, "criteria": chosen, "debiased": bool(debiased), "device": dev}
    many = job_result(
        "compare_scores", ckey, f"scoring blocks under {len(chosen)} criteria",
        lambda: lambda progress=None, cancel=None: compute.many_scores(
            a.model_key, a.data_key, chosen, bool(debiased), dev, model=a.model, loader=state.calib_loader(a),
            progress=progress, cancel=cancel),
        button="Compare the criteria",
        work=Work(a.model, a.model_key, n, len(chosen), f"{n} calibration images under {len(chosen)} criteria",
                  suffixes_of=tuple(a.removable), suffix_runs=len(chosen)),
        more="Fewer criteria or fewer calibration images are faster.",
    )
    if many is not None:
        by_crit = {c: many[c]["scores"] for c in chosen}
        left, right = st.columns(2)
        with left:
            plotly(rank_comparison(by_crit), key="sc_ranks")
        with right:
            plotly(rank_agreement_heatmap(by_crit), key="sc_agreement")
        tau = rank_agreement(by_crit)
        st.dataframe(pd.DataFrame([{"criteria": f"{x} vs {y}", "Kendall τ-b": v} for (x, y), v in tau.items()]),
                     hide_index=True, key="sc_tau")
        for c in chosen:  # the single-criterion view reuses these
            state.store("scores", _key(c), many[c])
