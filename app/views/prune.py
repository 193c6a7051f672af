"""Step 4 — Prune: choose blocks or a target, preview the result live, prune and recover; runs stay in the session.

The page builds a :class:`~cka_analysis.workflow.PruneRequest` from its widgets and runs it with
:func:`~cka_analysis.workflow.run_prune`, the same call as ``cka-prune prune``: the same settings give the same record.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import streamlit as st
from dashboard import compute, estimate, jobs, state
from dashboard.ui import MACS_NOTE, count, job_result, pct, plotly

from cka_analysis.choices import (
    CRITERIA,
    CRITERION_INFO,
    DEFAULT_RECOVERY_METHOD,
    RECOVERY_METHODS,
    plan_advice,
)
from cka_analysis.errors import CheckpointError
from cka_analysis.figures import pruning_trajectory, score_bars
from cka_analysis.metrics import format_duration
from cka_analysis.pruning import Target, plan
from cka_analysis.recovery import RECOVERY_PRESETS, RecoveryConfig
from cka_analysis.training import checkpoint_progress
from cka_analysis.workflow import RECOVERY_CHECKPOINT, PruneData, PruneRecord, PruneRequest, run_prune

st.title("Prune")
a = state.require_active()
dev = state.device()
seed = int(a.data_spec.get("seed", 0))
st.caption("Remove whole residual blocks, then recover the accuracy with a short training run. " + MACS_NOTE)

defaults = {
    "pr_mode": "target", "pr_target_kind": "macs", "pr_macs": 30, "pr_params": 30, "pr_latency": 30,
    "pr_blocks": min(2, max(1, len(a.removable))), "pr_chosen": [], "pr_criterion": "cka", "pr_iterative": False,
    "pr_recovery": "quick", "pr_recovery_images": 5_000, "pr_recovery_method": DEFAULT_RECOVERY_METHOD,
    "pr_eval_samples": len(a.test),
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
        kinds = {"macs": "MACs reduction", "params": "parameter reduction", "latency": "latency reduction",
                 "blocks": "number of blocks"}
        tkind = st.radio("Target", list(kinds), format_func=kinds.get, key="pr_target_kind", horizontal=True)
        if tkind == "macs":
            value = st.slider("Remove at least this share of the MACs (%)", 1, 95, key="pr_macs")
            target = Target("macs", value / 100)
        elif tkind == "params":
            value = st.slider("Remove at least this share of the parameters (%)", 1, 95, key="pr_params")
            target = Target("params", value / 100)
        elif tkind == "latency":
            value = st.slider("Lower the predicted batch-1 latency by at least (%)", 1, 95, key="pr_latency",
                              help="Predicted from each block's latency measured on this device (once, cached); "
                                   "the pruned model is then timed and the run shows predicted vs measured")
            target = Target("latency", value / 100)
        else:
            value = st.number_input("Blocks to remove", 1, max(1, len(a.removable)), key="pr_blocks")
            target = Target("blocks", int(value))
        criterion = st.selectbox("Criterion", list(CRITERIA), key="pr_criterion",
                                 help=CRITERION_INFO[criterion].description
                                 + ". Blocks go in increasing score order; cka is the paper's criterion.")
        iterative = st.toggle("Iterative (rescore after each removal, as in the paper)", key="pr_iterative",
                              help="A share of the recovery budget is spent after each removal")
    else:
        chosen = st.multiselect("Blocks to remove", a.removable, key="pr_chosen",
                                help="Only blocks with an identity shortcut can be removed")
with right:
    presets = {name: f"{name} ({images:,} images)" if images else name for name, images in RECOVERY_PRESETS.items()}
    presets["custom"] = "custom"
    choice = st.segmented_control("Recovery (budget in training images)", list(presets), format_func=presets.get,
                                  key="pr_recovery", required=True) or "quick"
    if choice == "custom":
        st.number_input("Training images to draw", 1, 100_000_000, step=1_000, key="pr_recovery_images")
    if choice != "none":
        method = st.session_state["pr_recovery_method"]
        st.selectbox("Recovery method", list(RECOVERY_METHODS), key="pr_recovery_method",
                     help=f"{method}: {RECOVERY_METHODS[method]} (the same as `cka-prune prune --recovery-method`; "
                          f"{DEFAULT_RECOVERY_METHOD} is the default, chosen on a validation split)")
    st.number_input("Test images for the accuracy numbers", 1, len(a.test), key="pr_eval_samples",
                    help="A fixed class-balanced sample (the same as `cka-prune prune --eval-samples N`)")


def _request() -> PruneRequest:
    """The request the widgets describe (ConfigError when they describe an impossible one)."""
    ss = st.session_state
    budget = str(int(ss["pr_recovery_images"])) if ss["pr_recovery"] == "custom" else ss["pr_recovery"]
    recovery = RecoveryConfig.parse(budget, method=ss["pr_recovery_method"])  # the seed: the request's
    n_eval = int(ss["pr_eval_samples"])
    return PruneRequest(
        model=a.model, data=state.data_spec_string(a.data_spec), calibration_samples=len(a.calib),
        criterion=criterion, target=target if mode == "target" else None,
        blocks=tuple(chosen) if mode == "manual" and chosen else None, iterative=iterative and mode == "target",
        recovery=recovery, eval_samples=None if n_eval >= len(a.test) else n_eval, device=dev, seed=seed,
    )


def _run_data(req: PruneRequest) -> PruneData:
    """The splits the run reads: those the session holds (the same the estimate sizes its work by)."""
    return PruneData(train=a.train, test=a.test,
                     train_augmented=state.train_augmented(a) if req.recovery.images > 0 else None)


def _checkpoint_dir(req: PruneRequest) -> Path | None:
    """Where this model's run of ``req`` keeps what it finished (:func:`dashboard.compute.run_checkpoint_dir`), or
    None for a model that could not go on from it after a reload: random weights (drawn anew on each load) and
    uploads (unpacked to a new temporary folder on each load, which the run's settings name)."""
    w, kind = a.model_spec.get("weights"), a.model_spec.get("kind")
    if (kind == "registry" and w is None) or w == "random" or kind in ("checkpoint", "archive"):
        return None
    key = json.dumps({"request": req.to_dict(), "data": a.data_key}, sort_keys=True, default=str)
    return compute.run_checkpoint_dir(a.model_key, key)


def _run_estimate(req: PruneRequest) -> dict:
    """How long ``req``'s run will take here (``workflow.estimate_run``, as the CLI announces it; the record keeps
    it beside the actual time), cached per model and request; for a run that goes on from its checkpoint, what is
    left."""
    key = json.dumps({"target": str(req.target), "blocks": req.blocks, "device": str(req.device),
                      "recovery": req.recovery.to_dict(), "eval": req.eval_samples, "iterative": req.iterative,
                      "criterion": req.criterion, "data": a.data_key}, sort_keys=True)
    # what a run of these settings left (none while a run, of any session, is writing there)
    folder = _checkpoint_dir(req)
    folder = None if folder is None or compute.run_dir_in_use(folder) else folder
    left = None
    if folder is not None and folder.is_dir():
        done = checkpoint_progress(folder / RECOVERY_CHECKPOINT)
        steps = folder / "iterative.json"  # written whole (atomically) after each iterative step
        left = json.dumps({"scores": (folder / "scores.json").is_file(), "step": done and done[0],
                           "iterative": steps.stat().st_mtime if steps.is_file() else None})
    return compute.run_estimate(a.model_key, key, left, _request=req, _model=a.model, _data=_run_data(req),
                                _per_image_s=estimate.seconds_per_image(a.model, a.model_key, dev),
                                _resume_dir=folder if left is not None else None)


request: PruneRequest | None = None
if mode == "target" or chosen:
    with state.guard("checking the settings") as g:
        request = _request()
run_est: dict | None = None
if request is not None:
    with state.guard("estimating the run's time"):
        run_est = _run_estimate(request)
if request is not None and run_est is not None and request.recovery.images > 0:
    rec_est = run_est["recovery"] or {}
    drop = rec_est.get("reference_drop_pp")
    right.caption(f"Recovery {run_est['recovery_text']}. The run: about {format_duration(run_est['seconds'])} on "
                  f"this device ({format_duration(rec_est.get('seconds', 0.0))} of it recovery)"
                  + (f"; on {rec_est['reference']} this recipe ended {drop:.1f} points below the unpruned model"
                     if drop is not None else "") + ".")
    if run_est["recovery_config"].get("preset_images"):
        right.caption(f"A named budget is at most a few passes over the training split: here "
                      f"{run_est['recovery_config']['images']:,} training images instead of "
                      f"{run_est['recovery_config']['preset_images']:,} ({len(a.train):,} in the split). "
                      "Choose **custom** to spend more.")
    resumed = run_est.get("resumed")
    if resumed and (resumed.get("step") is not None or resumed.get("removals_done")):
        where = f"recovery step {resumed['step']:,} of {resumed['total']:,}" if resumed.get("step") is not None \
            else f"{resumed['removals_done']} iterative step{'s' if resumed['removals_done'] > 1 else ''} done"
        right.info(f"A run with these settings stopped at {where} (cancelled, or the server stopped): **Prune** "
                   f"goes on from there, about {format_duration(run_est['seconds'])} left.")
        if right.button("Start afresh instead", key="pr_discard_resume",
                        help="Delete what that run finished; the next Prune starts from the beginning"):
            folder = _checkpoint_dir(request)
            if folder is not None and not compute.run_dir_in_use(folder):
                shutil.rmtree(folder, ignore_errors=True)
            st.rerun()
    if request.recovery.name == "long" and str(dev).startswith("cpu"):
        right.warning(f"`long` draws {request.recovery.images:,} training images: about "
                      f"{run_est['seconds'] / 3600:.1f} h on this CPU. It is meant for a GPU.")

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
    lat_costs = None
    if target is not None and target.kind == "latency":
        with st.spinner("Measuring the latency of every block …"), state.guard("measuring block latency"):
            from cka_analysis.latency import measure_block_costs

            lat_costs = measure_block_costs(a.model, batch_size=1, device=dev)  # the run's costs (cached)
    if sres is not None:
        score_vals = sres["scores"]
        with state.guard("planning") as g:
            preview = plan(a.blocks, score_vals, target, base_macs=a.macs, base_params=a.params,
                           block_costs=None if lat_costs is None else lat_costs.block_ms,
                           base_latency=None if lat_costs is None else lat_costs.base_ms)
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
    advice = plan_advice(criterion, preview.macs_reduction) if mode == "target" else None
    if advice:
        st.info(f"Plan: {advice}.")
    if preview.latency is not None:
        st.caption(f"Predicted batch-1 latency {preview.latency:.2f} ms (−{100 * preview.latency_reduction:.1f} %), "
                   "from per-block latency measured on this device.")
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
def _make_job(req: PruneRequest, estimated: float | None):
    """The run of ``req``, resumable: what it finishes is kept in its checkpoint folder (:func:`_checkpoint_dir`)
    until it finishes, so that after a cancel, a stopped server or a failure **Prune** with the same settings goes
    on from there. Only one run at a time writes a folder (another session's run of the same settings runs
    without one); a folder it cannot go on from (another version wrote it) is deleted with a message."""
    data = _run_data(req)
    wanted = _checkpoint_dir(req)

    def run(progress=None, cancel=None):
        folder = wanted if wanted is not None and compute.claim_run_dir(wanted) else None
        try:
            if folder is not None:
                compute.clear_stale_run_dirs(folder.parent, keep=folder)
            try:
                outcome = run_prune(req, data=data, progress=progress, cancel=cancel, estimated_seconds=estimated,
                                    checkpoint_dir=folder, resume=folder is not None)
            except CheckpointError as exc:
                if folder is None:
                    raise
                shutil.rmtree(folder, ignore_errors=True)
                raise CheckpointError(f"what an earlier run of these settings saved could not be used ({exc}); it "
                                      "was deleted: press Prune again to start afresh") from exc
            if folder is not None and not outcome.record.cancelled:
                shutil.rmtree(folder, ignore_errors=True)
            return outcome
        finally:
            if folder is not None:
                compute.release_run_dir(folder)

    return run


can_run = request is not None and (preview is not None or (mode == "target" and iterative))
pkey = {"model": a.model_key, "data": a.data_key}
job = jobs.take("prune", pkey)
if job is not None and job.result is not None and not job.result.record.removed:
    st.warning("Cancelled before any block was removed: nothing to keep.")
    jobs.clear()
elif job is not None and job.result is not None:
    outcome = job.result
    record = outcome.record
    label = f"run {len(state.runs()) + 1}: {record.describe()}" + (" (cancelled)" if record.cancelled else "")
    run_id = state.new_run_id()
    state.runs().append({"id": run_id, "label": label, "model": outcome.model, "record": record.to_dict(),
                         "created": time.strftime("%H:%M:%S")})
    st.session_state["pr_show_run"] = run_id
    # a resumed run was estimated for what was left: compared with this part's time
    state.log_timing("prune", job.label, record.estimated_seconds, record.seconds - record.resumed_seconds)
    if record.cancelled:
        resumable = request is not None and _checkpoint_dir(request) is not None
        st.warning(f"Cancelled: the blocks removed and the recovered weights so far are kept as “{label}”."
                   + (" **Prune** with the same settings goes on from what the run finished (its scores and last "
                      "recovery checkpoint)." if resumable else ""))
    jobs.clear()
elif job is not None:
    jobs.show_outcome(job)

if not jobs.show_running("prune"):
    busy = jobs.busy()
    if busy:
        jobs.show_busy_note("prune")
    if st.button("Prune", type="primary", key="pr_run", disabled=busy or not can_run):
        seconds = None if run_est is None else float(run_est["seconds"])
        jobs.start("prune", pkey, "pruning" + (" and recovering" if request.recovery.images > 0 else ""),
                   _make_job(request, seconds), estimate=seconds,
                   phases=None if run_est is None else jobs.run_phases(run_est["phases"]))
        if not jobs.show_running("prune"):  # finished already: collect it now
            st.rerun()

# ---------------------------------------------------------------------------------------------- results
runs = state.runs()
if runs:
    st.divider()
    st.subheader("Result")
    labels = {r["id"]: r["label"] for r in runs}
    if st.session_state.get("pr_show_run") not in labels:
        st.session_state["pr_show_run"] = runs[-1]["id"]
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="pr_show_run")
    rec = PruneRecord.from_dict(next(r for r in runs if r["id"] == run_id)["record"])
    base, final = rec.base, rec.final
    n_eval = rec.request.get("eval_samples") or len(a.test)
    c1, c2, c3, c4 = st.columns(4)
    acc_delta = (None if base.accuracy is None or final.accuracy is None
                 else f"{final.accuracy - base.accuracy:+.2f} pts")
    c1.metric("Test accuracy", pct(final.accuracy, 2), acc_delta,
              help=f"before: {pct(base.accuracy, 2)}, right after removal: {pct(rec.after_removal.accuracy, 2)}; "
                   f"on {n_eval:,} test images")
    c2.metric("MACs", count(final.macs), f"-{100 * rec.macs_reduction:.1f} %", delta_color="inverse")
    c3.metric("Parameters", count(final.params), f"-{100 * rec.params_reduction:.1f} %", delta_color="inverse")
    c4.metric("Time", f"{rec.seconds:.1f} s", help="; ".join(
        ([] if rec.where() is None else [f"on {rec.where()}"])
        + ([] if rec.estimated_seconds is None else [f"estimated {rec.estimated_seconds:.1f} s before it started"]))
        or None)
    st.markdown("Removed, in order: " + ", ".join(f"`{b}`" for b in rec.removed))
    lat = rec.latency_ms
    if lat is not None and lat.predicted_reduction is not None:
        st.markdown(f"**Latency** at batch {lat.batch_size}: −{100 * lat.measured_reduction:.1f} % measured "
                    f"({lat.base:.2f} → {lat.pruned:.2f} ms, timed interleaved), −"
                    f"{100 * lat.predicted_reduction:.1f} % predicted: error {100 * lat.error:+.1f} points")
    if len(rec.steps) > 1:
        tuned = final.accuracy if rec.recovery else None
        plotly(pruning_trajectory([s.to_dict() for s in rec.steps], finetuned_accuracy=tuned), key="pr_trajectory")
    if rec.recovery:
        r = rec.recovery
        st.markdown(f"**Recovery** ({r.method}): {rec.images_seen:,} training images in {r.seconds:.1f} s")
        hist = pd.DataFrame(r.history)
        if {"step", "eval_top1"} <= set(hist.columns):
            st.line_chart(hist.dropna(subset=["eval_top1"]).set_index("step")["eval_top1"], height=220)
    st.caption("Compare runs on the **Compare** page; download the pruned model on the **Export** page.")
