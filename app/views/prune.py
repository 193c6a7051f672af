"""Step 4 — Prune: choose blocks or a target, preview the result live, prune, fine-tune; runs stay in the session."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st
from dashboard import compute, jobs, state
from dashboard.ui import MACS_NOTE, count, job_result, pct, plotly

from cka_analysis.figures import pruning_trajectory, score_bars
from cka_analysis.pruning import Target, plan, prune
from cka_analysis.scoring import CRITERIA
from cka_analysis.training import FinetuneConfig

st.title("Prune")
a = state.require_active()
dev = state.device()
st.caption("Remove whole residual blocks, then fine-tune briefly to recover accuracy. " + MACS_NOTE)

defaults = {
    "pr_mode": "target", "pr_target_kind": "macs", "pr_macs": 30, "pr_params": 30,
    "pr_blocks": min(2, max(1, len(a.removable))), "pr_chosen": [], "pr_criterion": "cka", "pr_iterative": False,
    "pr_ft_unit": "steps", "pr_ft_steps": 100, "pr_ft_epochs": 1.0, "pr_lr": 0.01, "pr_distill": True,
    "pr_step_steps": 0, "pr_eval_samples": min(len(a.test), 10_000),
}
for k, v in defaults.items():
    st.session_state.setdefault(k, v)
st.session_state["pr_chosen"] = [b for b in st.session_state["pr_chosen"] if b in a.removable]
if st.session_state["pr_blocks"] > max(1, len(a.removable)):
    st.session_state["pr_blocks"] = max(1, len(a.removable))

MODES = {"target": "Set a target", "manual": "Choose the blocks"}
mode = st.segmented_control("How", list(MODES), format_func=MODES.get, key="pr_mode", required=True) or "target"

left, right = st.columns([1, 1], gap="large")
target: Target | None = None
chosen: list[str] | None = None
criterion = st.session_state["pr_criterion"]
iterative = False
with left:
    if mode == "target":
        kinds = {"macs": "MACs reduction", "params": "parameter reduction", "blocks": "number of blocks"}
        tkind = st.radio("Target", list(kinds), format_func=kinds.get, key="pr_target_kind", horizontal=True)
        if tkind == "macs":
            value = st.slider("Remove at least this share of the MACs (%)", 1, 95, key="pr_macs")
            target = Target("macs", value / 100)
        elif tkind == "params":
            value = st.slider("Remove at least this share of the parameters (%)", 1, 95, key="pr_params")
            target = Target("params", value / 100)
        else:
            value = st.number_input("Blocks to remove", 1, max(1, len(a.removable)), key="pr_blocks")
            target = Target("blocks", int(value))
        criterion = st.selectbox("Criterion", list(CRITERIA), key="pr_criterion",
                                 help="Blocks go in increasing score order; cka is the paper's criterion")
        iterative = st.toggle("Iterative (rescore after each removal, as in the paper)", key="pr_iterative")
        if iterative:
            st.number_input("Fine-tuning steps after each removal (0 = none)", 0, 100_000, step=10,
                            key="pr_step_steps")
    else:
        chosen = st.multiselect("Blocks to remove", a.removable, key="pr_chosen",
                                help="Only blocks with an identity shortcut can be removed")
with right:
    units = {"none": "no fine-tuning", "steps": "steps", "epochs": "epochs"}
    unit = st.radio("Fine-tuning budget", list(units), format_func=units.get, key="pr_ft_unit", horizontal=True)
    if unit == "steps":
        st.number_input("Optimiser steps", 1, 1_000_000, step=50, key="pr_ft_steps")
    elif unit == "epochs":
        st.number_input("Epochs", 0.1, 1000.0, step=0.5, key="pr_ft_epochs")
    st.number_input("Learning rate", 1e-5, 1.0, format="%.4f", step=0.005, key="pr_lr")
    st.toggle("Distil from the original network", key="pr_distill",
              help="Knowledge distillation (Hinton et al.): the unpruned network teaches the pruned one")
    st.number_input("Test images for the accuracy numbers", 1, len(a.test), key="pr_eval_samples")

# ---------------------------------------------------------------------------------------------- live preview
st.subheader("Preview")
score_vals: dict | None = None
preview = None
if mode == "target":
    skey = {"model": a.model_key, "data": a.data_key, "criterion": criterion, "debiased": False, "device": dev}
    sres = job_result(
        "scores", skey, f"scoring blocks ({criterion}) for the preview",
        lambda: compute.cached_job(compute.scores, a.model_key, a.data_key, criterion, False, dev,
                                   _model=a.model, _loader=state.calib_loader(a)),
        button="Score the blocks for the preview", auto=state.small_work(a, len(a.calib) * len(a.removable)),
    )
    if sres is not None:
        score_vals = sres["scores"]
        with state.guard("planning") as g:
            preview = plan(a.blocks, score_vals, target, base_macs=a.macs, base_params=a.params)
elif chosen:
    with state.guard("planning") as g:
        preview = plan(a.blocks, None, base_macs=a.macs, base_params=a.params, chosen=chosen)
else:
    st.info("Choose at least one block.")

if preview is not None:
    c1, c2, c3 = st.columns(3)
    c1.metric("Blocks removed", f"{len(preview.blocks)} of {len(a.blocks)}")
    c2.metric("MACs", count(preview.macs), f"-{100 * preview.macs_reduction:.1f} %", delta_color="inverse")
    c3.metric("Parameters", count(preview.params), f"-{100 * preview.params_reduction:.1f} %",
              delta_color="inverse")
    st.markdown("Would remove: " + ", ".join(f"`{b}`" for b in preview.blocks))
    if iterative:
        st.caption("Iterative pruning rescores after each removal, so the blocks it removes can differ from this "
                   "one-shot preview.")
    names = [b.name for b in a.blocks]
    vals = [score_vals.get(n) if score_vals else (0.0 if b.removable else None) for n, b in zip(names, a.blocks,
                                                                                              strict=True)]
    if score_vals:
        plotly(score_bars(names, vals, removable=[b.removable for b in a.blocks], reasons=[b.reason for b in a.blocks],
                          highlight=preview.blocks, criterion=criterion, title=f"Scores ({criterion}); red = removed"),
               key="pr_preview_bars")


# ---------------------------------------------------------------------------------------------- run
def _finetune_config(steps: int | None, epochs: float) -> FinetuneConfig:
    return FinetuneConfig(steps=steps, epochs=epochs, lr=float(st.session_state["pr_lr"]),
                          distill=bool(st.session_state["pr_distill"]))


def _make_job():
    ss = st.session_state
    unit = ss["pr_ft_unit"]
    ft = None
    if unit == "steps":
        ft = _finetune_config(int(ss["pr_ft_steps"]), 0.0)
    elif unit == "epochs":
        ft = _finetune_config(None, float(ss["pr_ft_epochs"]))
    step_ft = _finetune_config(int(ss["pr_step_steps"]), 0.0) if iterative and ss["pr_step_steps"] else None
    needs_train = ft is not None or step_ft is not None
    kwargs = dict(
        target=target if mode == "target" else None,
        blocks_to_remove=list(chosen) if mode == "manual" else None,
        criterion=criterion, iterative=iterative and mode == "target",
        train_loader=state.train_loader(a) if needs_train else None,
        finetune_config=ft, step_finetune_config=step_ft, distill=bool(ss["pr_distill"]) and needs_train,
        eval_loader=state.test_loader(a), eval_samples=int(ss["pr_eval_samples"]),
        batch_size=state.CALIB_BATCH, device=dev,
    )
    calib = state.calib_loader(a)
    settings = {"mode": mode, "criterion": criterion if mode == "target" else None,
                "iterative": kwargs["iterative"], "target": None if target is None else target.describe(),
                "finetune": None if ft is None else ft.to_dict(), "eval_samples": kwargs["eval_samples"],
                "device": dev}

    def run(progress=None, cancel=None):
        result = prune(compute.private_copy(a.model), calib, progress=progress, cancel=cancel, **kwargs)
        return result, settings

    return run


can_run = preview is not None or (mode == "target" and iterative and target is not None)
pkey = {"model": a.model_key, "data": a.data_key}
job = jobs.take("prune", pkey)
if job is not None and job.result is not None and not job.result[0].removed:
    st.warning("Cancelled before any block was removed: nothing to keep.")
    jobs.clear()
elif job is not None and job.result is not None:
    result, settings = job.result
    n = len(state.runs()) + 1
    what = settings["target"] or f"{len(result.removed)} chosen block(s)"
    how = (f"{settings['criterion']} {'iterative' if settings['iterative'] else 'one-shot'}"
           if settings["criterion"] else "by hand")
    label = f"run {n}: {how}, {what}" + (" (cancelled)" if result.cancelled else "")
    run_id = state.new_run_id()
    state.runs().append({"id": run_id, "label": label, "model": result.model, "record": result.to_dict(),
                         "settings": settings, "created": time.strftime("%H:%M:%S")})
    st.session_state["pr_show_run"] = run_id
    if result.cancelled:
        st.warning("Cancelled: the blocks removed and the best fine-tuned weights so far are kept as "
                   f"“{label}”.")
    jobs.clear()
elif job is not None:
    jobs.show_outcome(job)

if not jobs.show_running("prune"):
    busy = jobs.busy()
    if busy:
        jobs.show_busy_note("prune")
    if st.button("Prune", type="primary", key="pr_run", disabled=busy or not can_run):
        jobs.start("prune", pkey, "pruning" + (" and fine-tuning" if st.session_state["pr_ft_unit"] != "none"
                                                else ""), _make_job())
        jobs.show_running("prune")

# ---------------------------------------------------------------------------------------------- results
runs = state.runs()
if runs:
    st.divider()
    st.subheader("Result")
    labels = {r["id"]: r["label"] for r in runs}
    if st.session_state.get("pr_show_run") not in labels:
        st.session_state["pr_show_run"] = runs[-1]["id"]
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="pr_show_run")
    run = next(r for r in runs if r["id"] == run_id)
    rec = run["record"]
    base, final = rec["base"], rec["final"]
    c1, c2, c3, c4 = st.columns(4)
    acc_delta = (None if base.get("accuracy") is None or final.get("accuracy") is None
                 else f"{final['accuracy'] - base['accuracy']:+.2f} pts")
    c1.metric("Test accuracy", pct(final.get("accuracy"), 2), acc_delta,
              help=f"before: {pct(base.get('accuracy'), 2)} on {run['settings']['eval_samples']} test images")
    c2.metric("MACs", count(final["macs"]), f"-{100 * final['macs_reduction']:.1f} %", delta_color="inverse")
    c3.metric("Parameters", count(final["params"]), f"-{100 * final['params_reduction']:.1f} %",
              delta_color="inverse")
    c4.metric("Time", f"{rec['seconds']:.1f} s")
    st.markdown("Removed, in order: " + ", ".join(f"`{b}`" for b in rec["removed"]))
    if len(rec["steps"]) > 1:
        tuned = rec["final"].get("accuracy") if rec.get("finetune") else None
        plotly(pruning_trajectory(rec["steps"], finetuned_accuracy=tuned), key="pr_trajectory")
    ft = rec.get("finetune")
    if ft and ft.get("history"):
        hist = pd.DataFrame(ft["history"])
        st.markdown(f"**Fine-tuning**: {ft.get('steps', '?')} steps, best accuracy "
                    f"{pct(ft.get('best_accuracy'), 2)} at step {ft.get('best_step')}")
        if "eval_top1" in hist:
            st.line_chart(hist.dropna(subset=["eval_top1"]).set_index("step")["eval_top1"], height=220)
    st.caption("Compare runs on the **Compare** page; download the pruned model on the **Export** page.")
