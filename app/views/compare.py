"""Step 5 — Compare: original vs pruned runs on accuracy, compute, latency and robustness; Pareto plot."""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st
from dashboard import compute, state
from dashboard.estimate import Work, compare_work, latency_images, robustness_passes
from dashboard.ui import MACS_NOTE, accuracy_key, fit_samples, job_result, plotly, test_samples

from cka_analysis.figures import adversarial_curves, corruption_curves, pareto
from cka_analysis.metrics import TRAIN_STEP_PASSES
from cka_analysis.robustness import DEFAULT_EPS, ROBUSTNESS_KINDS, RobustnessResult
from cka_analysis.workflow import PruneData, PruneRecord, further_recovery, recover_further

FURTHER_BUDGETS = {"quick": "quick (25,000 images)", "standard": "standard (250,000 images)"}

st.title("Compare")
a = state.require_active()
dev = state.device()
choices = state.model_choices(a)
by_key = {c["key"]: c for c in choices}
runs = state.runs()
if not runs:
    st.info("No pruning run yet: the table shows the original network only. Prune on the **Prune** page, then "
            "come back to compare.")

# Accuracy of the original: the full test split from the first page, else the base of the first run.
acc_key = accuracy_key(a, dev, test_samples(a))
orig_acc = state.result("accuracy", acc_key)
orig_top1 = orig_acc["top1"] if orig_acc else (runs[0]["record"]["base"].get("accuracy") if runs else None)


def _row(c: dict) -> dict:
    if c["run"] is None:
        return {"model": "original", "criterion": "original", "accuracy": orig_top1, "macs": a.macs,
                "params": a.params, "removed": 0}
    rec = c["run"]["record"]
    return {"model": c["label"], "criterion": rec["criterion"] or "by hand", "accuracy": rec["final"]["accuracy"],
            "macs": rec["final"]["macs"], "params": rec["final"]["params"], "removed": len(rec["removed"])}


rows = {c["key"]: _row(c) for c in choices}

st.session_state.setdefault("cmp_kinds", list(ROBUSTNESS_KINDS))
if "cmp_samples" not in st.session_state:  # as many as fit in about 45 s with the default kinds (≤ 256)
    st.session_state["cmp_samples"] = fit_samples(a, dev, robustness_passes(ROBUSTNESS_KINDS, len(DEFAULT_EPS)),
                                                  low=min(16, len(a.test)), high=min(256, len(a.test)), step=16,
                                                  overhead_images=latency_images(32, 30))
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
repeats = c4.number_input("Timed forward passes", 1, 1000, key="cmp_repeats",
                          help="The median of these is reported (after as many warm-up passes, at most 10)")

measured = None
if selected:
    kinds_t = tuple(k for k in ROBUSTNESS_KINDS if k in kinds)
    entries = [{"key": k, "label": by_key[k]["label"], "model": by_key[k]["model"]} for k in selected]
    mkey = {"models": selected, "data": a.data_key, "kinds": kinds_t, "samples": int(samples), "batch": int(batch),
            "repeats": int(repeats), "device": dev}
    measured = job_result(
        "compare", mkey, f"measuring latency and robustness of {len(selected)} model(s)",
        lambda: lambda progress=None, cancel=None: compute.compare_runs(
            entries, robustness_kinds=kinds_t, eps=tuple(DEFAULT_EPS), max_samples=int(samples),
            batch_size=int(batch), repeats=int(repeats), device=dev, data_key=a.data_key, loader=state.test_loader(a, int(samples)),
            mean=tuple(a.preset.mean), std=tuple(a.preset.std), progress=progress, cancel=cancel),
        button="Measure latency and robustness",
        help="Latency: median of the timed forward passes; robustness on a fixed class-balanced sample of test "
             "images (the same N images as the Prune page and the CLI)",
        work=compare_work([(k, by_key[k]["model"]) for k in selected], kinds=kinds_t, n_eps=len(DEFAULT_EPS),
                          samples=int(samples), batch=int(batch), repeats=int(repeats)),
        more="Fewer test images for robustness, fewer kinds or fewer timed passes are faster.",
    )

table = []
for k in selected or list(by_key):
    r = dict(rows[k])
    m = (measured or {}).get(k) or {}
    lat = m.get("latency")
    rob = RobustnessResult.from_dict(m["robustness"]) if m.get("robustness") else None
    r["latency ms"] = None if lat is None else lat["median_ms"]
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
st.caption(f"Accuracy: top-1 on the test split (pruned runs: on the number of test images chosen on the Prune "
           f"page). Latency on {state.device_description()}. {MACS_NOTE}")

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
        st.caption(f"Robustness on the first {int(samples)} test images; ε in pixel units (8/255 = eight grey "
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
    config = further_recovery(chosen["record"], budget)  # the run's own recipe (method, ...) with this budget
    further_key = {"run": further_id, "budget": budget, "device": dev}

    def _further_job():
        record = PruneRecord.from_dict(chosen["record"])
        data = PruneData(train=a.train, test=a.test, train_augmented=state.train_augmented(a))
        return lambda progress=None, cancel=None: recover_further(
            chosen["model"], record, a.model, config, data=data, progress=progress, cancel=cancel)

    outcome = job_result(
        "recover_further", further_key, f"recovering {run_labels[further_id]} further ({budget})", _further_job,
        button="Recover further", help=config.describe(),
        work=Work(chosen["model"], state.run_key(a, chosen), config.images, TRAIN_STEP_PASSES,
                  f"{config.images:,} training images of recovery"),
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
