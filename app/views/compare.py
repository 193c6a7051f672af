"""Step 5 — Compare: original vs pruned runs on accuracy, compute, latency and robustness; Pareto plot."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st
from dashboard import compute, estimate, state
from dashboard.estimate import compare_work, latency_images, robustness_passes
from dashboard.ui import (
    COMPARE_ACTION_SECONDS,
    MACS_NOTE,
    accuracy_key,
    fit_samples,
    job_result,
    plotly,
    test_images,
    test_samples,
)

from cka_analysis.figures import adversarial_curves, corruption_curves, pareto
from cka_analysis.metrics import format_duration
from cka_analysis.robustness import DEFAULT_EPS, ROBUSTNESS_KINDS, RobustnessResult
from cka_analysis.workflow import PruneData, PruneRecord, further_recovery, recover_further

FURTHER_BUDGETS = {"quick": "quick (25,000 images)", "standard": "standard (250,000 images)"}


def speedup_text(lat: dict) -> str:
    """The original's time / this model's, per round: median (10th–90th percentile), e.g. ``1.42× (1.31–1.55)``."""
    return f"{1 / lat['ratio']:.2f}× ({1 / lat['ratio_p90']:.2f}–{1 / lat['ratio_p10']:.2f})"

st.title("Compare")
a = state.require_active()
dev = state.device()
choices = state.model_choices(a)
by_key = {c["key"]: c for c in choices}
runs = state.runs()
if not runs:
    st.info("No pruning run yet: the table shows the original network only. Prune on the **Prune** page, then "
            "come back to compare.")

# Every accuracy on this page is on "N test images": the seeded, class-balanced subset of workflow.eval_subset.
# A run's record holds the original's accuracy on the run's own images (measured by run_prune), so the original
# row uses that when every run was measured on the same images; else the Model & data page's measurement.
seed = int(a.data_spec.get("seed", 0))
run_images = {test_images(r["record"], len(a.test)) for r in runs}
if len(run_images) == 1 and runs[0]["record"]["base"].get("accuracy") is not None:
    orig_images = next(iter(run_images))
    orig_top1 = runs[0]["record"]["base"]["accuracy"]
else:
    orig_images = (test_samples(a), seed)
    orig_acc = state.result("accuracy", accuracy_key(a, dev, test_samples(a)))
    orig_top1 = orig_acc["top1"] if orig_acc else None


def _row(c: dict) -> dict:
    if c["run"] is None:
        return {"model": "original", "criterion": "original", "accuracy": orig_top1, "test images": orig_images[0],
                "macs": a.macs, "params": a.params, "removed": 0}
    rec = c["run"]["record"]
    return {"model": c["label"], "criterion": rec["criterion"] or "by hand", "accuracy": rec["final"]["accuracy"],
            "test images": test_images(rec, len(a.test))[0], "macs": rec["final"]["macs"],
            "params": rec["final"]["params"], "removed": len(rec["removed"])}


rows = {c["key"]: _row(c) for c in choices}

st.session_state.setdefault("cmp_kinds", list(ROBUSTNESS_KINDS))
if "cmp_samples" not in st.session_state:  # every model with the default kinds in about 10 s (16 to 256 images)
    n_models = len(choices)
    st.session_state["cmp_samples"] = fit_samples(
        a, dev, n_models * robustness_passes(ROBUSTNESS_KINDS, len(DEFAULT_EPS)), low=min(16, len(a.test)),
        high=min(256, len(a.test)), step=16, overhead_images=n_models * latency_images(32, 30),
        seconds=COMPARE_ACTION_SECONDS)
st.session_state.setdefault("cmp_batch", 32)
st.session_state.setdefault("cmp_repeats", 30)
if not set(st.session_state.get("cmp_models") or []) <= set(by_key):
    st.session_state.pop("cmp_models", None)
st.session_state.setdefault("cmp_models", list(by_key))
selected = st.multiselect("Models", list(by_key), format_func=lambda k: by_key[k]["label"], key="cmp_models")
c1, c2, c3, c4 = st.columns(4)
kinds = c1.multiselect("Robustness", list(ROBUSTNESS_KINDS), key="cmp_kinds",
                       help="FGSM and PGD (L∞, ε in pixel units of [0, 1]) and 8 common corruptions at severities 1–5")
samples = c2.number_input("Test images for robustness", 8, len(a.test), key="cmp_samples")
batch = c3.number_input("Latency batch size", 1, 4096, key="cmp_batch")
repeats = c4.number_input("Timed rounds", 1, 1000, key="cmp_repeats",
                          help="Each round times every model once, in a shuffled order, on the same input (after "
                               "3 untimed rounds); the median over the rounds is reported")

measured = None
if selected:
    kinds_t = tuple(k for k in ROBUSTNESS_KINDS if k in kinds)
    order = sorted(selected, key=lambda k: by_key[k]["run"] is not None)  # the original first: the reference
    entries = [{"key": k, "label": by_key[k]["label"], "model": by_key[k]["model"]} for k in order]
    mkey = {"models": selected, "data": a.data_key, "kinds": kinds_t, "samples": int(samples), "batch": int(batch),
            "repeats": int(repeats), "device": dev}
    measured = job_result(
        "compare", mkey, f"measuring latency and robustness of {len(selected)} model(s)",
        lambda: lambda progress=None, cancel=None: compute.compare_runs(
            entries, robustness_kinds=kinds_t, eps=tuple(DEFAULT_EPS), max_samples=int(samples),
            batch_size=int(batch), repeats=int(repeats), device=dev, data_key=a.data_key, loader=state.test_loader(a, int(samples)),
            mean=tuple(a.preset.mean), std=tuple(a.preset.std), progress=progress, cancel=cancel),
        button="Measure latency and robustness",
        help="Latency: every model timed interleaved, round by round, on the same input (as the CLI's report); "
             "robustness on a seeded, class-balanced sample of test images (the same N images as the Prune "
             "page and the CLI)",
        work=compare_work([(k, by_key[k]["model"]) for k in order], kinds=kinds_t, n_eps=len(DEFAULT_EPS),
                          samples=int(samples), batch=int(batch), repeats=int(repeats),
                          macs=[rows[k]["macs"] for k in order]),
        more="Fewer test images for robustness, fewer kinds or fewer timed passes are faster.",
    )

table = []
for k in selected or list(by_key):
    r = dict(rows[k])
    m = (measured or {}).get(k) or {}
    lat = m.get("latency")
    rob = RobustnessResult.from_dict(m["robustness"]) if m.get("robustness") else None
    r["latency ms"] = None if lat is None else lat["median_ms"]
    r["p10–p90 ms"] = None if lat is None else f"{lat['p10_ms']:.3f}–{lat['p90_ms']:.3f}"
    r["speed-up"] = None if lat is None or not lat.get("ratio") else speedup_text(lat)
    r["images/s"] = None if lat is None else lat["throughput"]
    for curve in (rob.fgsm, rob.pgd) if rob is not None else ():
        if curve is not None and curve.has(8 / 255):
            r[f"{curve.attack.upper()} acc @8/255"] = curve.accuracy_at(8 / 255)
    if rob is not None and rob.corruptions is not None:
        r["corruption acc (mean)"] = rob.corruptions.mean()
    table.append(r)
df = pd.DataFrame(table)
st.dataframe(df, hide_index=True, key="cmp_table", column_config={
    "accuracy": st.column_config.NumberColumn("accuracy %", format="%.2f"),
    "macs": st.column_config.NumberColumn("MACs", format="localized"),
    "params": st.column_config.NumberColumn(format="localized"),
    "latency ms": st.column_config.NumberColumn(format="%.3f"),
    "images/s": st.column_config.NumberColumn(format="%.0f"),
})
same = all(r["test images"] == orig_images[0] for r in rows.values())
st.caption(f"Accuracy: top-1 on the **test images** of each row: a seeded, class-balanced subset of the test split "
           f"(seed {seed}; all {len(a.test):,} when N is the whole split), "
           + ("the same images for every row. " if same else "**not the same N for every row**: compare "
              "accuracies only between rows with the same N (set it on the Prune page). ")
           + f"Latency on {state.device_description()}: every model timed interleaved, round by round, on the same "
           "input; the speed-up is the original's time / the model's in the same round (median and 10th–90th "
           f"percentile over the rounds: a model compared with itself gives 1 within that range). {MACS_NOTE}")

points = [{"label": r["model"], "macs": r["macs"], "accuracy": r["accuracy"], "criterion": r["criterion"],
           "params": r["params"]} for r in rows.values()]
if any(p["accuracy"] is not None for p in points):
    plotly(pareto(points, x="reduction", reference_macs=a.macs, title="Accuracy vs MACs reduction across runs"),
           key="cmp_pareto")
else:
    st.info("The Pareto plot needs accuracies: evaluate the original on the **Model & data** page or prune once.")

if measured:
    records = {by_key[k]["label"]: RobustnessResult.from_dict(measured[k]["robustness"]) for k in selected
               if (measured.get(k) or {}).get("robustness")}
    adv = {label: rec for label, rec in records.items() if rec.fgsm is not None or rec.pgd is not None}
    cor = {label: rec for label, rec in records.items() if rec.corruptions is not None}
    if adv:
        plotly(adversarial_curves(adv, attack_names=[n for n in ("fgsm", "pgd") if n in kinds_t]),
               key="cmp_adv")
    if cor:
        plotly(corruption_curves(cor), key="cmp_corr")
    if adv or cor:
        st.caption(f"Robustness on {int(samples)} test images, the seeded, class-balanced subset (seed {seed}) that "
                   f"the accuracy of a run on {int(samples)} test images uses; ε in pixel units (8/255 = eight grey "
                   f"levels). Corruptions: mean over 8 types (CIFAR-10-C / ImageNet-C parameters).")

# ---------------------------------------------------------------------------------------- recover further
if runs:
    st.divider()
    st.subheader("Recover a run further")
    st.caption("Spend another recovery budget on a pruned run, without pruning again, with the run's own "
               "recovery recipe (method, distillation from the original) on the training split, evaluated on "
               "the run's test images. The result is a new run.")
    run_labels = {r["id"]: r["label"] for r in runs}
    f1, f2 = st.columns([2, 1])
    further_id = f1.selectbox("Run", list(run_labels), format_func=run_labels.get, key="cmp_further_run")
    budget = f2.segmented_control("Budget", list(FURTHER_BUDGETS), format_func=FURTHER_BUDGETS.get,
                                  key="cmp_further_budget", default="quick", required=True) or "quick"
    chosen = next(r for r in runs if r["id"] == further_id)
    fest = None
    config = further_recovery(chosen["record"], budget)  # the run's own recipe (method, ...) with this budget
    further_key = {"run": further_id, "budget": budget, "device": dev}

    data = PruneData(train=a.train, test=a.test, train_augmented=state.train_augmented(a))
    with state.guard("estimating the recovery's time"):
        fest = compute.further_estimate(further_id, budget, _record=PruneRecord.from_dict(chosen["record"]),
                                        _model=chosen["model"], _base=a.model, _config=config, _data=data,
                                        _per_image_s=estimate.seconds_per_image(a.model, a.model_key, dev))
        f1.caption(f"{fest['recovery_text']}: about {format_duration(fest['seconds'])} on this device.")

    def _further_job():
        record = PruneRecord.from_dict(chosen["record"])
        seconds = fest["seconds"] if fest else None
        return lambda progress=None, cancel=None: recover_further(
            chosen["model"], record, a.model, config, data=data, progress=progress, cancel=cancel,
            estimated_seconds=seconds)

    outcome = job_result(
        "recover_further", further_key, f"recovering {run_labels[further_id]} further ({budget})", _further_job,
        button="Recover further", help=config.describe(),
        seconds=fest["seconds"] if fest else None,
    )
    if outcome is not None and not any(r.get("further_of") == (further_id, budget) for r in runs):
        rec = outcome.record
        runs.append({"id": state.new_run_id(), "label": f"run {len(runs) + 1}: {run_labels[further_id]} + "
                     f"{budget} recovery", "model": outcome.model, "record": rec.to_dict(),
                     "created": time.strftime("%H:%M:%S"), "further_of": (further_id, budget)})
        st.rerun()
    if outcome is not None:
        st.success(f"Recovered further: {outcome.record.final.accuracy:.2f} % top-1 after "
                   f"{outcome.record.images_seen:,} training images in all (was "
                   f"{chosen['record']['final']['accuracy']:.2f} %).")
