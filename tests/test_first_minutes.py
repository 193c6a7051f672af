"""The dashboard's first ten minutes (issue 22) and its "one definition" parts (issue 21), library side first:

* a named recovery budget is capped to a few epochs of a small training split (the digits demo), recorded, and
  unchanged on CIFAR-10's size;
* one time estimate of a run (:func:`~cka_analysis.workflow.estimate_run`), kept in the record beside the actual time;
* one latency measurement, interleaved and paired, with the ratio to a reference and its spread: a model compared
  with itself gives 1 within the spread;
* the Compare page's original and pruned rows come from the same test images, and its latency is that measurement.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import pytest
import torch
from app_session import TIMEOUT, settle
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from cka_analysis.choices import RECOVERY_PRESETS
from cka_analysis.data import load_dataset
from cka_analysis.latency import TimingOptions, compare_latency
from cka_analysis.metrics import evaluate
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.workflow import (
    PruneData,
    PruneRecord,
    PruneRequest,
    estimate_run,
    eval_subset,
    further_recovery,
    load_probe,
    run_prune,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))
from dashboard.estimate import (
    Work,
    attack_seconds_per_image,
    cka_batch_seconds,
    compare_work,
    copy_seconds,
    estimate,
    load_rate,
    load_startup,
    robustness_attack_steps,
    robustness_evaluations,
    seconds_per_image,
    suffix_passes,
)

DEMO = {"model": "digits_resnet", "weights": "demo", "data": "digits", "device": "cpu", "latency": False}
APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


@pytest.fixture(scope="module")
def data(demo) -> PruneData:
    preset = demo.cka_preset
    return PruneData(train=load_dataset("digits", "train", preset), test=load_dataset("digits", "test", preset),
                     train_augmented=load_dataset("digits", "train", preset, augment=True))


# ---------------------------------------------------------------------------------------- budgets and the data
def test_quick_is_capped_to_a_few_epochs_of_a_small_split_only() -> None:
    quick = RecoveryConfig.parse("quick")
    demo = quick.fit_to(1_437)
    assert demo.images == 3 * 1_437 and demo.preset_images == RECOVERY_PRESETS["quick"] and demo.capped
    assert "capped at 3 epochs" in demo.describe() and "4,311 images instead of 25,000" in demo.describe()
    assert demo.fit_to(1_437) == demo  # fitting twice changes nothing
    assert quick.fit_to(50_000) == quick and quick.fit_to(45_000) == quick  # CIFAR-10: still 25,000 images
    assert RecoveryConfig.parse("standard").fit_to(50_000).images == 250_000
    assert RecoveryConfig.parse("3000").fit_to(100).images == 3_000  # a number is what the user asked for
    assert RecoveryConfig.from_dict(demo.to_dict()) == demo


def test_recovering_further_fits_the_new_budget_to_the_split_again() -> None:
    """A run's ``quick`` recovery on the demo was capped to 3 epochs; ``quick`` further is capped the same way,
    not spent in full because the run's recipe says it was fitted already."""
    run = RecoveryConfig.parse("quick").fit_to(1_437)
    further = further_recovery({"request": {"recovery": run.to_dict(), "seed": 0}}, "quick").fit_to(1_437)
    assert further.images == run.images < RecoveryConfig.parse("quick").images
    assert further.capped


def test_a_run_spends_the_capped_budget_and_says_so(demo, data) -> None:
    request = PruneRequest(**{**DEMO, "model": demo}, target="macs:30%", calibration_samples=64, eval_samples=100,
                           recovery="quick")
    est = estimate_run(request, demo, data)
    assert est.request.recovery.images == 3 * len(data.train_augmented)
    assert set(est.phases) >= {"scoring", "evaluation", "recovery"} and est.seconds == sum(est.phases.values())
    out = run_prune(request, data=data, estimated_seconds=est.seconds)
    rec = out.record
    assert rec.request["recovery"]["images"] == 3 * len(data.train_augmented)
    assert rec.request["recovery"]["preset_images"] == RECOVERY_PRESETS["quick"]
    assert 0 < rec.images_seen <= 3 * len(data.train_augmented)
    assert "capped" in rec.recovery_name()
    assert rec.final.accuracy > rec.after_removal.accuracy  # the short budget still recovers
    assert rec.estimated_seconds == est.seconds and rec.seconds > 0
    again = PruneRecord.from_dict(rec.to_dict())
    assert again.estimated_seconds == est.seconds


def test_the_run_estimate_follows_the_work(demo, data) -> None:
    small = PruneRequest(**{**DEMO, "model": demo}, target="macs:30%", eval_samples=100, recovery="1000")
    large = PruneRequest(**{**DEMO, "model": demo}, target="macs:30%", eval_samples=100, recovery="8000")
    rate = 1e-3  # a fixed forward rate: only the recovery probe varies
    a = estimate_run(small, demo, data, per_image_s=rate)
    b = estimate_run(large, demo, data, per_image_s=rate)
    assert b.phases["recovery"] > 3 * a.phases["recovery"]
    assert a.phases["evaluation"] == pytest.approx(b.phases["evaluation"], rel=0.5)
    none = estimate_run(PruneRequest(**{**DEMO, "model": demo}, blocks=("layer1.1",), recovery="none"), demo, data,
                        per_image_s=rate)
    assert "recovery" not in none.phases and "scoring" not in none.phases


class _ColdStart(torch.utils.data.Dataset):
    """3 ms per image, and 0.3 s more for the first (index 0, which every probe reads): a loader's start-up."""

    def __len__(self) -> int:
        return 1_000

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        time.sleep(0.3 if i == 0 else 0.003)
        return torch.zeros(3, 8, 8), 0


def test_the_page_estimates_time_reading_an_image_without_the_loaders_start_up() -> None:
    rate = load_rate(_ColdStart(), "cold-start test data")
    assert 0.002 < rate < 0.0045, rate  # the per-image cost, not (0.3 s + 80 images) / 80 = 6.75 ms
    startup = load_startup(_ColdStart(), "cold-start test data")
    assert 0.2 < startup < 0.4, startup  # ... and the start-up, once per action: the 0.3 s first image
    rate, startup = load_probe(_ColdStart())  # what a run's estimate (estimate_run) counts per image drawn
    assert 0.002 < rate < 0.0045 and 0.2 < startup < 0.4, (rate, startup)


def test_the_compare_estimate_counts_attack_steps_at_their_own_probed_rate(demo) -> None:
    """FGSM/PGD steps are a forward pass and an input gradient (no weight gradients): probed, not counted as
    training steps (which made the Compare estimate 1.5x too long on the demo and on ResNet-56)."""
    assert robustness_attack_steps(("fgsm", "pgd"), 4, 10) == 44 and robustness_attack_steps(("corruptions",), 4) == 0
    assert robustness_evaluations(("fgsm", "pgd", "corruptions"), 4) == 1 + 4 + 4 + 40
    work = compare_work([("attack-test", demo)], kinds=("pgd",), n_eps=4, samples=64, batch=8, repeats=1)
    est = estimate(work, "cpu")
    forward = seconds_per_image(demo, "attack-test", "cpu")
    attack = attack_seconds_per_image(demo, "attack-test", "cpu")
    assert attack > forward > 0  # a step is a forward pass and a backward one
    assert work.images * work.attack_steps == 64 * 40
    copy = copy_seconds(demo, "attack-test")
    assert work.copies == 1 and copy > 0  # the job's private copy of the model, timed once
    assert est.seconds == pytest.approx((forward * work.passes + attack * work.attack_steps) * work.images + copy)


def test_the_heatmap_estimate_counts_the_gram_arithmetic_of_every_batch(demo) -> None:
    """A heatmap's Gram matrices and pair products (float64, quadratic in the batch) are timed on the model's
    real layer shapes per batch, besides the forward passes: 300 images at batch 128 are two full batches and
    one of 44."""
    work = Work(demo, "gram-test", 300, 1.0, "test", cka_batch=128)
    est = estimate(work, "cpu")
    full = cka_batch_seconds(demo, "gram-test", "cpu", 128)
    last = cka_batch_seconds(demo, "gram-test", "cpu", 44)
    assert full > last > 0
    forward = seconds_per_image(demo, "gram-test", "cpu")
    copy = copy_seconds(demo, "gram-test")
    assert est.seconds == pytest.approx(forward * 300 + 2 * full + last + copy)
    cross = estimate(Work(demo, "gram-test", 300, 2.0, "test", cka_batch=128, cka_models=2, copies=2), "cpu")
    assert cross.seconds == pytest.approx(forward * 600 + 2 * (2 * full + last) + 2 * copy)


def test_the_scores_estimate_times_the_network_after_each_candidate(demo) -> None:
    """A removal score runs the network after its candidate again: timed per block (late stages of a CNN run faster
    per MAC than the early ones, so half a network per candidate overestimated ResNet-56's scores by 1.5x)."""
    from cka_analysis.blocks import find_blocks

    blocks = tuple(b.name for b in find_blocks(demo) if b.removable)
    first = suffix_passes(demo, "suffix-test", "cpu", blocks[:1])
    last = suffix_passes(demo, "suffix-test", "cpu", blocks[-1:])
    assert 0 < last < first < 1  # the rest of the network after a block: less after a later one
    every = suffix_passes(demo, "suffix-test", "cpu", blocks)
    assert 0 < every < len(blocks)
    work = Work(demo, "suffix-test", 100, 1.0, "test", suffixes_of=blocks, suffix_runs=2)
    forward = seconds_per_image(demo, "suffix-test", "cpu")
    copy = copy_seconds(demo, "suffix-test")
    assert estimate(work, "cpu").seconds == pytest.approx(forward * 100 * (1 + 2 * every) + copy)


# ---------------------------------------------------------------------------------------- one latency measurement
def test_a_model_compared_with_itself_is_one_within_the_spread(demo) -> None:
    lat = compare_latency({"a": demo, "b": demo}, batch_size=8, device="cpu", reference="a",
                          options=TimingOptions(warmup=2, repeats=15))
    b = lat["b"]
    assert b.reference == "a" and b.ratio_p10 <= 1.0 <= b.ratio_p90
    assert lat["a"].ratio == lat["a"].ratio_p10 == 1.0  # the reference against itself, round by round
    with pytest.raises(Exception, match="reference='c'"):
        compare_latency({"a": demo}, reference="c")


# ---------------------------------------------------------------------------------------- the Compare page
def test_compare_rows_come_from_the_same_test_images(demo) -> None:
    """Model & data measures the original on 120 test images, the run on 100: the Compare page's original row
    must be the run's images' number (the record's base accuracy on them), not the other page's."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    settle(at)
    at.number_input(key="md_test_samples").set_value(120)
    settle(at)
    settle(at.switch_page("views/prune.py"))
    at.segmented_control(key="pr_recovery").set_value("none")
    at.number_input(key="pr_eval_samples").set_value(100)
    settle(at)
    at.button(key="pr_run").click()
    settle(at)
    rec = at.session_state["runs"][0]["record"]
    settle(at.switch_page("views/compare.py"))
    at.multiselect(key="cmp_kinds").set_value([])
    at.number_input(key="cmp_repeats").set_value(5)
    settle(at)
    table = at.dataframe[0].value
    original, pruned = table.iloc[0], table.iloc[1]
    assert original["test images"] == pruned["test images"] == 100
    a = at.session_state["active"]
    from cka_analysis.data import make_loader

    same = evaluate(demo, make_loader(eval_subset(a.test, 100, 0), batch_size=256), device="cpu").top1
    assert original["accuracy"] == pytest.approx(same) == pytest.approx(rec["base"]["accuracy"])
    assert any("the same images for every row" in c.value for c in at.caption)

    # the latency: one interleaved measurement of both, the original the reference (speed-up 1 for itself)
    at.button(key="run_compare").click()
    settle(at)
    table = at.dataframe[0].value
    assert table.iloc[0]["speed-up"].startswith("1.00×")
    assert table["latency ms"].notna().all() and table.iloc[1]["speed-up"].endswith(")")
    assert not at.exception


# ---------------------------------------------------------------------------------------- reruns while a job runs
def test_reruns_while_a_job_runs_do_not_walk_the_whole_heap() -> None:
    """A running job's progress box reruns twice a second; Streamlit's full garbage collection after each run
    (0.6 s with the GIL held, over ~500,000 objects once torch is imported) made jobs 4-6x slower in the browser.
    AppTest never collects after a run (why the slowness showed only in the browser), so this checks what the
    server honours: after the page has run with a job in progress, the option is off (whatever the config file
    says: the first check breaks when app/dashboard/state.py's configure_gc does not switch it off) and the
    long-lived heap is frozen, so that Python's own collections stay cheap too."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    st_config.set_option("runner.postScriptGC", True)  # as without .streamlit/config.toml (another launcher)
    settle(at)
    settle(at.switch_page("views/prune.py"))
    at.button(key="pr_run").click()
    at.run()
    job = at.session_state["_job"]
    assert job is not None
    for _ in range(3):  # what the progress box's polling does while the job runs
        at.run()
    job.wait(TIMEOUT)
    assert st_config.get_option("runner.postScriptGC") is False
    assert gc.get_freeze_count() > len(gc.get_objects()), "the long-lived heap is not frozen"
    assert not at.exception
