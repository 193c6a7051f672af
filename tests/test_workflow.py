"""The workflow layer on the digits demo: request validation (errors name the argument), the record's round trip,
one-shot and iterative runs with recovery inside one image budget, the same "N test images" as the CLI, and bad
input refused before anything is scored or written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cka_analysis.blocks import removed_blocks
from cka_analysis.data import calibration_subset, dataset_targets, load_dataset, make_loader
from cka_analysis.errors import CKAPruneError, ConfigError, TargetError
from cka_analysis.metrics import count_macs, evaluate
from cka_analysis.pruning import Target
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.workflow import (
    PruneData,
    PruneRecord,
    PruneRequest,
    estimate_run,
    eval_subset,
    records_equal,
    recovery_stand_in,
    resumed_phases,
    run_prune,
)

DEMO = {"model": "digits_resnet", "weights": "demo", "data": "digits", "device": "cpu", "latency": False}


@pytest.fixture(scope="module")
def data(demo) -> PruneData:
    preset = demo.cka_preset
    return PruneData(train=load_dataset("digits", "train", preset), test=load_dataset("digits", "test", preset),
                     train_augmented=load_dataset("digits", "train", preset, augment=True))


# -------------------------------------------------------------------------------------------------- requests
@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({}, ["exactly one of target", "blocks"]),
        ({"target": "2", "blocks": ("layer1.1",)}, ["exactly one of target"]),
        ({"target": "lots"}, ["'lots' is not understood"]),
        ({"target": "2", "criterion": "magic"}, ["criterion='magic'", "cka"]),
        ({"target": "2", "calibration_samples": 2}, ["calibration_samples=2", "at least 4"]),
        ({"target": "2", "eval_samples": 0}, ["eval_samples=0", "None"]),
        ({"target": "2", "batch_size": 0}, ["batch_size=0"]),
        ({"target": "2", "amp": "fp32"}, ["amp='fp32'", "bf16"]),
        ({"target": "2", "data": "mnist"}, ["not understood", "imagefolder"]),
        ({"blocks": ("layer1.1",), "iterative": True}, ["iterative=True needs a target"]),
        ({"blocks": ()}, ["at least one block"]),
        ({"target": "2", "model": ""}, ["model=''"]),
        ({"target": "2", "model": torch.nn.Linear(2, 2)}, ["carries its preset"]),
        ({"target": "2", "seed": -1}, ["seed=-1"]),
        ({"target": "2", "eval_split": "val"}, ["eval_split='val'", "validation"]),
        ({"target": "2", "capacity_weight": -1.0}, ["capacity_weight=-1.0", "≥ 0"]),
    ],
)
def test_bad_requests_name_the_argument(kwargs, words) -> None:
    with pytest.raises(ConfigError) as exc:
        PruneRequest(**{**DEMO, **kwargs})
    for w in words:
        assert w in str(exc.value), str(exc.value)


def test_request_normalises_and_round_trips() -> None:
    r = PruneRequest(**DEMO, target="macs:30%", recovery="quick", seed=3)
    assert r.target == Target("macs", 0.3)
    assert isinstance(r.recovery, RecoveryConfig) and r.recovery.images == 25_000
    assert r.calibration_seed == 3 and r.eval_seed == 3  # follow the seed unless given
    d = json.loads(json.dumps(r.to_dict()))
    assert PruneRequest.from_dict(d) == r
    hand = PruneRequest(**DEMO, blocks="layer1.1, layer3.2", recovery="none")
    assert hand.blocks == ("layer1.1", "layer3.2") and hand.recovery.images == 0
    assert PruneRequest.from_dict(hand.to_dict()) == hand
    assert not hand.needs_calibration and not PruneRequest(**DEMO, target="2", criterion="random").needs_calibration


def test_recovery_is_timed_on_a_model_of_the_size_the_request_leaves(demo, data) -> None:
    base = count_macs(demo, demo.cka_preset.input_size)
    for target in ("macs:50%", "params:30%", "2"):
        request = PruneRequest(**DEMO, target=target, recovery="quick")
        stand_in = recovery_stand_in(request, demo)
        assert removed_blocks(stand_in) and not removed_blocks(demo)  # the unpruned model is left alone
        if target == "macs:50%":
            assert count_macs(stand_in, demo.cka_preset.input_size) <= base / 2
    by_hand = PruneRequest(**DEMO, blocks="layer1.1", recovery="quick")
    assert removed_blocks(recovery_stand_in(by_hand, demo)) == ["layer1.1"]
    latency = PruneRequest(**DEMO, target="latency:30%", recovery="quick")
    assert recovery_stand_in(latency, demo) is demo  # block latencies are not measured yet: the whole model
    # a named budget on a split big enough to keep it: the reference benchmark's drop at the nearest cut is quoted
    unfitted = PruneData(train=data.train, test=data.test)
    est = estimate_run(PruneRequest(**DEMO, target="macs:75%", recovery="standard"), demo, unfitted).recovery
    assert est["seconds"] > 0 and "−75.2 % MACs" in est["reference"]


def test_eval_subset_is_the_cli_subset(data) -> None:
    test = data.test
    assert eval_subset(test, None) is test and eval_subset(test, len(test)) is test
    sub = eval_subset(test, 100, seed=2)
    assert sub.indices == calibration_subset(test, 100, seed=2).indices
    counts = torch.bincount(torch.tensor(dataset_targets(sub)), minlength=10)
    assert counts.min() == counts.max() == 10  # class-balanced
    assert len(eval_subset(test, 3)) == 3


# -------------------------------------------------------------------------------------------------- runs
def test_one_shot_run_records_costs_accuracies_and_round_trips(demo, data) -> None:
    before = {k: v.clone() for k, v in demo.state_dict().items()}
    request = PruneRequest(**{**DEMO, "model": demo}, target="3", calibration_samples=64, eval_samples=200,
                           recovery="none")
    outcome = run_prune(request, data=data)
    rec = outcome.record
    assert len(rec.removed) == 3 and removed_blocks(outcome.model) == rec.removed
    assert rec.final.macs == count_macs(outcome.model, (1, 8, 8)) < rec.base.macs
    assert rec.base.macs == count_macs(demo, (1, 8, 8))
    # accuracies on the same 200 test images an independent evaluation sees
    loader = torch.utils.data.DataLoader(eval_subset(data.test, 200), batch_size=256)
    assert rec.base.accuracy == pytest.approx(evaluate(demo, loader, device="cpu").top1)
    assert rec.after_removal.accuracy == rec.final.accuracy == pytest.approx(
        evaluate(outcome.model, loader, device="cpu").top1)
    assert rec.recovery is None and rec.images_seen == 0 and not rec.cancelled
    assert rec.request["model"] == "digits_resnet" and rec.request["weights"] == demo.cka_preset.weights
    # the caller's model is untouched
    assert removed_blocks(demo) == []
    assert all(torch.equal(v, before[k]) for k, v in demo.state_dict().items())
    d = json.loads(json.dumps(rec.to_dict()))
    again = PruneRecord.from_dict(d)
    assert again == rec and again.to_dict() == rec.to_dict()
    assert d["final"]["macs_reduction"] == pytest.approx(rec.macs_reduction)
    assert "original" in rec.summary() and "| after removal |" in rec.markdown()


def test_recovery_spends_at_most_the_budget(demo, data) -> None:
    request = PruneRequest(**DEMO, target="2", calibration_samples=64, eval_samples=100, recovery="512")
    rec = run_prune(request, data=data).record
    assert rec.recovery is not None and 0 < rec.images_seen <= 512
    assert rec.recovery.config == request.recovery
    assert rec.final.accuracy is not None and rec.after_removal.accuracy is not None


def test_where_a_run_ran_is_said_in_the_summary_and_the_markdown(demo, data) -> None:
    """A run on one device reads as that device; a run whose recovery a resume moved names the run's device, then
    each stretch of its recovery, through the report's round trip; an older report that did not record it, none."""
    request = PruneRequest(**DEMO, target="2", calibration_samples=64, eval_samples=100, recovery="4096")
    rec = run_prune(request, data=data).record
    assert rec.recovery is not None and rec.recovery.steps > 0 and rec.device is not None
    assert rec.recovery.devices == [{"from_step": 0, "device": rec.device}] and rec.where() == rec.device
    assert f"on {rec.device}" in rec.summary() and f"on {rec.device}" in rec.markdown()
    # a run whose recovery was resumed on another device names the run's device, then each stretch of the recovery
    moved = dataclasses.replace(rec, device="cuda (NVIDIA H200)", recovery=dataclasses.replace(
        rec.recovery, devices=[{"from_step": 0, "device": "cpu (1 threads)"},
                               {"from_step": 17_200, "device": "cuda (NVIDIA H200)"}]))
    said = "cuda (NVIDIA H200); its recovery: cpu (1 threads) to step 17,200, then cuda (NVIDIA H200)"
    assert moved.where() == said and said in moved.summary() and said in moved.markdown()
    assert PruneRecord.from_dict(json.loads(json.dumps(moved.to_dict()))).where() == said
    # a report written before the device was recorded says nothing about it
    assert dataclasses.replace(rec, device=None, recovery=dataclasses.replace(rec.recovery, devices=[])).where() is None


def test_iterative_run_shares_one_budget_between_steps_and_the_end(demo, data) -> None:
    request = PruneRequest(**DEMO, target="3", iterative=True, calibration_samples=64, eval_samples=100,
                           recovery="768")
    messages: list[str] = []
    rec = run_prune(request, data=data, progress=lambda d, t, m: messages.append(m)).record
    assert [len(s.removed) for s in rec.steps] == [0, 1, 1, 1]
    per_step = [s.recovery.images_seen for s in rec.steps[1:] if s.recovery]
    assert len(per_step) == 3
    assert rec.images_seen == sum(per_step) + (rec.recovery.images_seen if rec.recovery else 0) <= 768
    assert any("step 2: scoring" in m for m in messages)


def test_bad_input_is_refused_before_anything_is_scored_or_written(demo, tmp_path: Path) -> None:
    """Issue 13: a run that fails on bad input leaves the file system as it was (no resume directory, no
    scores.json), and an unreachable target is known from the block costs, before any scoring."""
    out = tmp_path / "pruned" / ".resume"
    messages: list[str] = []
    for kwargs, error in (({"blocks": ("no.such.block",)}, ConfigError),
                          ({"blocks": ("layer2.0",)}, ConfigError),
                          ({"target": "macs:99%"}, TargetError),
                          ({"target": "macs:99%", "iterative": True}, TargetError)):
        with pytest.raises(error):
            run_prune(PruneRequest(**DEMO, **kwargs), checkpoint_dir=out,
                      progress=lambda d, t, m: messages.append(m))
    assert not (tmp_path / "pruned").exists()
    assert messages == []  # nothing was loaded, scored or recovered


def test_a_finished_run_writes_its_resume_parts_only_when_asked(demo, data, tmp_path: Path) -> None:
    out = tmp_path / "r"
    request = PruneRequest(**DEMO, target="2", calibration_samples=64, eval_samples=50, recovery="none")
    first = run_prune(request, data=data, checkpoint_dir=out)
    assert (out / "scores.json").is_file()
    again = run_prune(request, data=data, checkpoint_dir=out, resume=True)
    assert records_equal(first.record, again.record)
    other = PruneRequest(**DEMO, target="3", calibration_samples=64, eval_samples=50, recovery="none")
    with pytest.raises(CKAPruneError, match="other settings"):
        run_prune(other, data=data, checkpoint_dir=out, resume=True)


# -------------------------------------------------------------------------------------------------- packaging
def test_the_library_and_cli_run_without_the_dashboard_stack() -> None:
    """`pip install cka-prune` has no streamlit/plotly: no module of the library imports streamlit, and plotly is
    imported only by cka_analysis.figures (loaded on demand)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1] / "cka_analysis"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import streamlit" not in text and "from streamlit" not in text, path
        if path.name != "figures.py":
            assert "import plotly" not in text and "from plotly" not in text, path
    code = ("import sys, cka_analysis.workflow, cka_analysis.cli, cka_analysis.pruning, cka_analysis.export, "
            "cka_analysis.recovery, cka_analysis.scoring, cka_analysis.metrics\n"
            "bad = [m for m in ('streamlit', 'plotly') if m in sys.modules]\n"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=root.parent)
    assert r.returncode == 0, r.stderr


def test_validation_split_holds_out_training_images_from_calibration_and_recovery(demo) -> None:
    """eval_split="validation": accuracies on training images that neither calibration nor recovery draws, the
    same images every time, and the base accuracy measured on exactly those images."""
    request = PruneRequest(**DEMO, target="1", recovery=600, eval_split="validation")
    filled = PruneData().filled(request, demo.cka_preset, recovery=True)
    held, keep = set(filled.test.indices), set(filled.train.indices)
    assert len(held) == 1437 // 10 and not held & keep and len(held | keep) == 1437
    assert filled.train_augmented.indices == filled.train.indices
    assert PruneData().filled(request, demo.cka_preset, recovery=True).test.indices == filled.test.indices
    record = run_prune(request).record
    assert record.request["eval_split"] == "validation"
    loader = make_loader(filled.test, batch_size=256, num_workers=0)
    assert record.base.accuracy == pytest.approx(evaluate(demo, loader, device="cpu").top1)


def test_capacity_aware_plan_runs_through_the_workflow(data) -> None:
    """``cka_capacity`` through run_prune: on the demo (blocks of equal MACs, 4× the parameters per stage) it
    removes a small first-stage block where plain ``cka`` removes the last, parameter-heavy one; the knob at 0 is
    plain ``cka``; the record names the criterion and the knob."""
    cap = run_prune(PruneRequest(**DEMO, target="1", criterion="cka_capacity", recovery="none",
                                 calibration_samples=128), data=data).record
    plain = run_prune(PruneRequest(**DEMO, target="1", criterion="cka", recovery="none",
                                   calibration_samples=128), data=data).record
    zero = run_prune(PruneRequest(**DEMO, target="1", criterion="cka_capacity", capacity_weight=0.0,
                                  recovery="none", calibration_samples=128), data=data).record
    assert plain.removed == ["layer3.2"] and zero.removed == plain.removed
    assert cap.removed == ["layer1.2"]
    assert cap.criterion == "cka_capacity" and cap.request["capacity_weight"] == 1.0
    assert cap.final.params > plain.final.params  # it keeps more of the weights


def test_a_resumed_run_is_estimated_for_what_is_left() -> None:
    """Saved one-shot scores take the scoring out of the estimate; a recovery checkpoint at step 30 of 40 leaves a
    quarter of the recovery; the other phases stay whole."""
    phases = {"scoring": 10.0, "evaluation": 5.0, "recovery": 100.0, "latency": 1.0, "bookkeeping": 0.5}
    assert resumed_phases(phases, scores_saved=True, step=30, total=40) == {**phases, "scoring": 0.0, "recovery": 25.0}
    assert resumed_phases(phases, scores_saved=False, step=None, total=None) == phases
    assert resumed_phases({"evaluation": 5.0}, scores_saved=True, step=3, total=4) == {"evaluation": 5.0}
    # iterative, 4 removals planned, 30 % of the budget for the per-step recoveries: 3 steps saved leave a quarter
    # of the scoring and of the per-step share, and the whole final recovery; with the final one half done, half of it
    assert resumed_phases(phases, scores_saved=False, step=None, total=None, removals=4, removals_done=3,
                          step_share=0.3) == {**phases, "scoring": 2.5, "recovery": pytest.approx(77.5)}
    assert resumed_phases(phases, scores_saved=False, step=50, total=100, removals=4, removals_done=4,
                          step_share=0.3) == {**phases, "scoring": 0.0, "recovery": pytest.approx(35.0)}


def test_the_estimate_of_a_resumed_run_reads_its_checkpoint_folder(demo, data, tmp_path: Path) -> None:
    """A run cancelled late in its recovery leaves its scores and a recovery checkpoint: the estimate for resuming
    it leaves out the scoring and most of the recovery (the whole-run estimate of the same request keeps both)."""
    from cka_analysis.progress import CancelToken

    request = PruneRequest(**DEMO, target="2", recovery="12800", calibration_samples=64, eval_samples=64)
    token = CancelToken()

    def cancel_late(done: int, total: int | None, message: str) -> None:
        if message.startswith("training: step") and total and done >= 0.8 * total:
            token.cancel()

    run_prune(request, data=data, progress=cancel_late, cancel=token, checkpoint_dir=tmp_path)
    saved = torch.load(tmp_path / "recovery.pt", weights_only=True)
    step, total = saved["step"], saved["total"]
    assert 0 < step < total
    whole = estimate_run(request, demo, data, per_image_s=1e-4)
    left = estimate_run(request, demo, data, per_image_s=1e-4, resume_dir=tmp_path)
    assert whole.resumed is None
    assert left.resumed == {"scores": True, "step": step, "total": total, "removals_done": 0}
    assert whole.phases["scoring"] > 0 and left.phases["scoring"] == 0.0
    share = 1 - step / total  # the share of the recovery left
    assert left.phases["recovery"] < (share + 0.3) * whole.phases["recovery"]  # each estimate probes its own timing
    assert left.phases.keys() == whole.phases.keys() and left.seconds < whole.seconds
    # scores saved by a run with other settings are not counted as saved (the run refuses them)
    other = PruneRequest(**DEMO, target="2", recovery="12800", calibration_samples=64, eval_samples=64, seed=1)
    assert estimate_run(other, demo, data, per_image_s=1e-4, resume_dir=tmp_path).resumed["scores"] is False


def test_the_estimate_of_a_resumed_iterative_run_leaves_out_its_saved_steps(demo, data, tmp_path: Path) -> None:
    """An iterative run cancelled once its first removal is saved: the estimate for resuming it counts that step
    as done (half the scoring of two planned steps), and the whole-run estimate does not."""
    from cka_analysis.progress import CancelToken

    request = PruneRequest(**DEMO, target="2", iterative=True, recovery="4800", calibration_samples=64,
                           eval_samples=64)
    token = CancelToken()

    def cancel_after_the_first_step(done: int, total: int | None, message: str) -> None:
        if (tmp_path / "iterative.json").exists():
            token.cancel()

    run_prune(request, data=data, progress=cancel_after_the_first_step, cancel=token, checkpoint_dir=tmp_path)
    removed = json.loads((tmp_path / "iterative.json").read_text())["removed"]
    assert len(removed) == 1
    whole = estimate_run(request, demo, data, per_image_s=1e-4)
    left = estimate_run(request, demo, data, per_image_s=1e-4, resume_dir=tmp_path)
    assert whole.resumed is None and left.resumed["removals_done"] == 1 and left.resumed["step"] is None
    assert left.phases["scoring"] == pytest.approx(whole.phases["scoring"] / 2, rel=0.5)
    assert left.phases["scoring"] < 0.75 * whole.phases["scoring"]
