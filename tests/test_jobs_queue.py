"""Two people, one dashboard (issue 13, point 3): the process-wide job queue and seeded work that does not leak.

The dashboard's jobs (app/dashboard/jobs.py) run library calls in worker threads. These tests drive the same job
runner the pages use, without a browser: jobs of two "sessions" are submitted at once, and the records they
produce must equal those of each job run alone.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "app"))

from dashboard import compute, jobs

from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.models import build_model
from cka_analysis.progress import Pace
from cka_analysis.robustness import evaluate_robustness
from cka_analysis.scoring import ScoringOptions, score_blocks
from cka_analysis.training import FinetuneConfig, finetune

WAIT = 300  # seconds: generous on a busy 2-core machine; the tests wait on events, not on these


def _hold(release: threading.Event, started: threading.Event):
    def fn(*, progress=None, cancel=None):
        started.set()
        assert release.wait(WAIT), "never released"
        return "held"

    return fn


def test_jobs_wait_in_one_queue_in_order_and_show_their_position():
    queue = jobs.JobQueue(slots=1)
    release, started = threading.Event(), threading.Event()
    first = jobs.submit("a", 1, "session A's work", _hold(release, started), queue=queue)
    assert started.wait(WAIT)
    ran = []
    second = jobs.submit("b", 2, "session B's work", lambda progress=None, cancel=None: ran.append("b") or "b",
                         queue=queue)
    third = jobs.submit("c", 3, "session C's work", lambda progress=None, cancel=None: ran.append("c") or "c",
                        queue=queue)
    # submit puts a job in line before its thread starts: its position is known at once, in submission order
    for job, pos in ((second, 1), (third, 2)):
        assert queue.position(job) == pos
        assert job.status == "queued" and job.running
    assert queue.running_labels() == ["session A's work"]
    assert jobs.progress_text(second) == "waiting in the queue"
    assert not ran  # nothing ran beside the first job
    release.set()
    assert first.wait(WAIT) and second.wait(WAIT) and third.wait(WAIT)
    assert [first.result, second.result, third.result] == ["held", "b", "c"]
    assert ran == ["b", "c"]  # first come, first served
    assert queue.position(second) is None and queue.running_labels() == []


def test_a_job_cancelled_while_queued_never_runs():
    queue = jobs.JobQueue(slots=1)
    release, started = threading.Event(), threading.Event()
    first = jobs.submit("a", 1, "first", _hold(release, started), queue=queue)
    assert started.wait(WAIT)
    ran = threading.Event()
    waiting = jobs.submit("b", 2, "second", lambda progress=None, cancel=None: ran.set(), queue=queue)
    waiting.token.cancel()
    assert waiting.wait(WAIT)
    assert waiting.status == "cancelled" and not ran.is_set()
    release.set()
    assert first.wait(WAIT) and first.status == "done"


def test_queue_slots_are_validated():
    with pytest.raises(ValueError, match="slots"):
        jobs.JobQueue(slots=0)


def test_time_left_comes_from_the_estimate_then_from_the_progress(monkeypatch):
    now = [1_000.0]  # the jobs module's clock, advanced by hand: exact, whatever the machine's load
    monkeypatch.setattr(jobs, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    job = jobs.Job(name="x", key=0, label="x", estimate=100.0, started=990.0)
    job.status = "running"
    assert job.seconds_left() == 90.0
    job.progress(50, 100, "half")
    assert job.seconds_left() == 10.0  # 10 s for half: 10 s left
    now[0] += 10.0
    job.progress(80, 100, "four fifths")
    assert job.seconds_left() == pytest.approx(5.0)  # 20 s for 80 %: 5 s left
    assert "left" in jobs.progress_text(job)


def test_time_left_follows_a_runs_phases_and_converges_when_the_estimate_is_wrong(monkeypatch):
    """A run estimated at 10 s before recovery, 20 s of recovery and 2 s of latency that takes twice as long:
    the time left counts its phases, scales the later ones by the overrun seen so far, and reaches zero with the
    work (the progress fraction restarts with every phase, so the fraction alone said "almost done" early)."""
    now = [0.0]
    monkeypatch.setattr(jobs, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    phases = jobs.run_phases({"scoring": 4.0, "evaluation": 5.0, "bookkeeping": 1.0, "recovery": 20.0,
                              "latency": 2.0})
    assert phases == [(jobs.FIRST_PHASE, 10.0), ("recovery", 20.0), ("latency", 2.0)]
    job = jobs.Job(name="prune", key=0, label="x", estimate=32.0, started=0.0, phases=phases)
    job.status = "running"
    assert job.seconds_left() == pytest.approx(32.0)
    now[0] = 8.0
    job.progress(90, 100, "evaluating")  # an evaluation almost done: not the run
    assert job.seconds_left() == pytest.approx(2.0 + 22.0)
    now[0] = 20.0  # the first phase took twice its estimate
    job.progress(0, None, "recovering the pruned model (quick: 1,000 images)")
    assert job.phase == 1
    assert job.seconds_left() == pytest.approx(2 * 20.0 + 2 * 2.0)
    now[0] = 40.0
    job.progress(50, 100, "step 50/100")  # the recovery's own rate: 20 s for half
    assert job.seconds_left() == pytest.approx(20.0 + 2 * 2.0)
    now[0] = 60.0
    job.progress(0, None, "timing the original and the pruned model")
    assert job.phase == 2 and job.seconds_left() == pytest.approx(4.0)
    now[0] = 64.0
    assert job.seconds_left() == pytest.approx(0.0)


def _job_in_recovery(monkeypatch) -> tuple[jobs.Job, list[float]]:
    """A run estimated at 10 s before its recovery and 20 s of recovery, which enters the recovery at 10 s (the
    clock is ``now[0]``)."""
    now = [0.0]
    monkeypatch.setattr(jobs, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    job = jobs.Job(name="prune", key=0, label="x", estimate=30.0, started=0.0,
                   phases=[(jobs.FIRST_PHASE, 10.0), ("recovery", 20.0)])
    job.status = "running"
    now[0] = 10.0
    job.progress(0, None, "recovering the pruned model (quick: 1,000 images)")
    return job, now


def test_time_left_of_a_recovery_resumed_part_way_follows_its_pace_from_there(monkeypatch):
    """A recovery that goes on from its checkpoint at half its steps (the trainer says so without a total, then
    counts on): the time left is the pace since it went on (20 steps in 8 s, 20 to go: 8 s), not the steps so
    far over the time in the phase (which said 2.5 s)."""
    job, now = _job_in_recovery(monkeypatch)
    job.progress(50, None, "training: resumed at step 50/100")
    now[0] = 12.0
    job.progress(60, 100, "training: step 60/100")
    now[0] = 20.0
    job.progress(80, 100, "training: step 80/100")
    assert job.seconds_left() == pytest.approx(8.0)


def test_time_left_is_paced_afresh_for_each_count_within_a_phase(monkeypatch):
    """An iterative run's recovery phase counts a short recovery after a removal, then the final one: each count
    is paced from its own start (a finished 10-step count must not freeze the pace at "done")."""
    job, now = _job_in_recovery(monkeypatch)
    job.progress(10, 10, "training: step 10/10")  # a short recovery's only report: already at its end
    now[0] = 12.0
    job.progress(10, 100, "training: step 10/100")  # the final recovery begins
    now[0] = 16.0
    job.progress(60, 100, "training: step 60/100")
    assert job.seconds_left() == pytest.approx(3.2)  # 50 steps in 4 s, 40 to go (the estimate said 14 s)


# ---------------------------------------------------------------------------------------------- seeded records
@pytest.fixture(scope="module")
def digits():
    model = build_model("digits_resnet", weights="demo").eval()
    preset = model.cka_preset
    train = load_dataset("digits", "train", preset, augment=True)
    plain = load_dataset("digits", "train", preset)
    test = load_dataset("digits", "test", preset)
    return model, train, plain, test


def _finetune_record(model, train, *, progress=None, cancel=None) -> dict:
    """Session A: a seeded fine-tune (augmented data, shuffled order) of a copy of the demo."""
    net = copy.deepcopy(model)
    loader = make_loader(train, batch_size=32, shuffle=True, seed=3)
    result = finetune(net, loader, FinetuneConfig(steps=6, lr=0.02, seed=3), device="cpu", cancel=cancel)
    return {"steps": result.steps, "weights": {k: v.clone() for k, v in net.state_dict().items()}}


def _robustness_record(model, test, *, progress=None, cancel=None) -> dict:
    """Session B: seeded robustness (PGD random start, noise corruptions) and seeded random scores."""
    net = copy.deepcopy(model)
    loader = make_loader(test, batch_size=64)
    rob = evaluate_robustness(net, loader, kinds=("pgd", "corruptions"), eps=(4 / 255,), max_samples=64,
                              pgd_steps=2, device="cpu", seed=5, cancel=cancel)
    calib = calibration_subset(test, 32, seed=1)
    scores = score_blocks(net, calib, "random", options=ScoringOptions(seed=7, device="cpu"))
    return {"robustness": repr(rob), "scores": dict(scores.scores)}


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "weights":
            for name in a[k]:
                torch.testing.assert_close(a[k][name], b[k][name], rtol=0, atol=0, msg=name)
        else:
            assert a[k] == b[k], k


def _noisy_neighbour(stop: threading.Event) -> threading.Thread:
    """A third session touching the process-wide RNG all the time, as unseeded code elsewhere would."""

    def run() -> None:
        while not stop.is_set():
            torch.manual_seed(int(torch.randint(0, 1000, ())))
            torch.rand(8)

    return threading.Thread(target=run, daemon=True)


@pytest.mark.parametrize("slots", [1, 2], ids=["dashboard-queue", "two-at-once"])
def test_two_sessions_seeded_jobs_at_once_give_the_records_each_gives_alone(digits, slots):
    """Slots 1 is the dashboard's queue; slots 2 runs both jobs truly at once (a GPU server's setting), with a
    neighbour reseeding the global RNG, so the library's seeded work itself must not depend on global state.

    Two at once uses un-augmented training data: torchvision's random crops and flips draw from the process-wide
    RNG when they run in the main process, which only the queue (one job at a time) keeps apart.
    """
    model, augmented, plain, test = digits
    train = augmented if slots == 1 else plain
    alone_a = _finetune_record(model, train)
    alone_b = _robustness_record(model, test)
    queue = jobs.JobQueue(slots=slots)
    stop = threading.Event()
    neighbour = _noisy_neighbour(stop)
    if slots > 1:
        neighbour.start()
    try:
        job_a = jobs.submit("prune", "A", "session A fine-tuning", _finetune_record, model, train, queue=queue)
        job_b = jobs.submit("compare", "B", "session B robustness", _robustness_record, model, test, queue=queue)
        assert job_a.wait(WAIT) and job_b.wait(WAIT)
    finally:
        stop.set()
        if neighbour.is_alive():
            neighbour.join(10)
    for job in (job_a, job_b):
        assert job.status == "done", (job.status, job.error, job.trace)
    _same(job_a.result, alone_a)
    _same(job_b.result, alone_b)


def test_a_session_whose_job_waits_sees_its_queue_position():
    """The dashboard itself: another session holds the process-wide queue, this session's heatmap job waits and
    the page says where it stands; when the other job ends, this one runs and the heatmap appears."""
    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
    at = AppTest.from_file(app, default_timeout=WAIT)
    at.run()
    release, started = threading.Event(), threading.Event()
    other = jobs.submit("prune", "other", "another session's pruning run", _hold(release, started))
    try:
        assert started.wait(WAIT)
        at.switch_page("views/heatmap.py").run()  # the digits heatmap starts by itself (small work)
        job = at.session_state["_job"]
        assert job.name == "heatmap" and job.status == "queued"
        shown = " ".join(c.value for c in at.caption)
        assert "Queued: position 1" in shown and "another session's pruning run" in shown, shown
        at.run()  # the sidebar is drawn before the page: the next run shows the queued job there
        assert job.status == "queued"
        sidebar = " ".join(c.value for c in at.sidebar.caption)
        assert "queued, position 1" in sidebar, sidebar
    finally:
        release.set()
    assert other.wait(WAIT) and job.wait(WAIT)
    assert job.status == "done"
    at.run()
    assert not at.exception


_EXIT_DURING_A_RUN = """
import sys
sys.path.insert(0, {tests!r})
from app_session import settle
from streamlit.testing.v1 import AppTest

at = AppTest.from_file({app!r}, default_timeout=240)
at.session_state["device_choice"] = "cpu"
settle(at)
at.button(key="md_load").click()
settle(at)
settle(at.switch_page("views/prune.py"))
at.segmented_control(key="pr_recovery").set_value("custom")
at.run()
at.number_input(key="pr_recovery_images").set_value(50_000_000)  # still running when the script ends
at.run()
at.button(key="pr_run").click()
at.run()
job = at.session_state["_job"]
assert job.running, job.status
print("exiting with the job", job.status, flush=True)
"""


def test_the_process_exits_cleanly_while_a_dashboard_run_is_in_progress(tmp_path):
    """A run still in its worker thread when the process ends (a test, the server stopping) is cancelled and
    joined at exit; a daemon thread left inside torch would abort the process ("terminate called without an
    active exception", exit code 134)."""
    import os
    import subprocess

    tests = Path(__file__).resolve().parent
    script = tmp_path / "exit_during_run.py"
    script.write_text(_EXIT_DURING_A_RUN.format(tests=str(tests), app=str(tests.parent / "app" / "streamlit_app.py")))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("CKA_PRUNE_TEST_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join([str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=WAIT)
    assert "exiting with the job" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 0 and "terminate called" not in out.stderr, (out.returncode, out.stderr[-2000:])


def test_stop_all_cancels_and_joins_running_jobs():
    release, started = threading.Event(), threading.Event()
    seen = []

    def work(progress=None, cancel=None):
        started.set()
        while not cancel.cancelled:
            threading.Event().wait(0.01)
        seen.append("cancelled")
        return "stopped"

    job = jobs.submit("w", 1, "work that runs until cancelled", work, queue=jobs.JobQueue(1))
    assert started.wait(WAIT)
    assert jobs.stop_all(timeout=WAIT) == []
    assert not job.thread.is_alive() and seen == ["cancelled"] and job.result == "stopped"
    release.set()


def test_run_folders_left_untouched_for_two_weeks_are_removed(tmp_path: Path) -> None:
    """A cancelled run's checkpoint folder stays for a resume; one with nothing written for 14 days goes when
    another run starts (the Prune page calls this), one written since stays."""
    old, recent = tmp_path / "old", tmp_path / "recent"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "scores.json").write_text("{}")
    weeks_ago = time.time() - 15 * 86400
    os.utime(old / "scores.json", (weeks_ago, weeks_ago))
    assert compute.clear_stale_run_dirs(tmp_path, keep=old) == []  # the run about to go on from it
    assert compute.claim_run_dir(old) and not compute.claim_run_dir(old)  # one writer at a time
    assert compute.run_dir_in_use(old) and compute.clear_stale_run_dirs(tmp_path) == []  # a run is writing it
    compute.release_run_dir(old)
    assert not compute.run_dir_in_use(old)
    assert compute.clear_stale_run_dirs(tmp_path) == [old]
    assert not old.exists() and recent.is_dir()
    assert compute.clear_stale_run_dirs(tmp_path / "missing") == []


def test_a_pace_starts_afresh_when_its_count_goes_back() -> None:
    """Two counts of the same total in a row (two evaluations): the second is paced from its own start."""
    pace = Pace()
    pace.observe(1, 10, 0.0)
    pace.observe(10, 10, 9.0)  # the first count: 1 s per step
    pace.observe(1, 10, 100.0)  # the next one begins
    pace.observe(5, 10, 104.0)
    assert pace.seconds_left(5, 104.0) == pytest.approx(5.0)  # 4 steps in 4 s, 5 to go
    assert Pace().seconds_left(3, 1.0) is None
