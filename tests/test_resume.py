"""Resumed runs end where uninterrupted ones do (issue 13, point 7).

The README promises that an interrupted fine-tune goes on "with the same data order": the check is the weights
of a resumed run against those of a run that was never interrupted, not a log message. Interruptions are
event-driven: a cancel at a known step (library), or a SIGKILL as soon as the checkpoint file exists (CLI).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cka_analysis.cli import main
from cka_analysis.data import load_dataset, make_loader
from cka_analysis.device import describe_device, describe_devices
from cka_analysis.export import load_pruned, open_model, save_pruned
from cka_analysis.progress import CancelToken
from cka_analysis.training import FinetuneConfig, checkpoint_progress, finetune

REPO = Path(__file__).resolve().parents[1]
WAIT = 600  # upper bound for events on a busy machine; nothing waits a fixed time


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # always (not only when unset): a user's OMP_NUM_THREADS=16 would change the timing the kill tests rely on
    env["OMP_NUM_THREADS"] = os.environ.get("CKA_PRUNE_TEST_THREADS", "1")
    return env


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """The demo without two blocks: fine-tuning has something to repair, so steps change the weights."""
    from cka_analysis.blocks import remove_blocks

    out = tmp_path_factory.mktemp("resume") / "init"
    save_pruned(remove_blocks(open_model("digits_resnet", weights="demo"), ["layer1.1", "layer3.2"]), out)
    return out


# ------------------------------------------------------------------------------------------ library
@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_finetune_resumed_after_a_cancel_ends_with_the_uninterrupted_weights(tmp_path, damaged, augment):
    base = load_pruned(damaged)
    train = load_dataset("digits", "train", base.cka_preset, augment=augment)
    config = FinetuneConfig(steps=24, lr=0.05, seed=3)

    def loader():
        return make_loader(train, batch_size=16, shuffle=True, seed=3)

    straight = copy.deepcopy(base)
    whole = finetune(straight, loader(), config, device="cpu")
    assert whole.resumed_step is None and whole.devices == [{"from_step": 0, "device": describe_device(torch.device("cpu"))}]

    ckpt = tmp_path / "ft.pt"
    token = CancelToken()

    def stop_after_the_second_checkpoint(done: int, total: int | None, message: str) -> None:
        if done >= 17:  # checkpoints at 8 and 16; the run stops at the next step, after step 16's checkpoint
            token.cancel()

    first = copy.deepcopy(base)
    cut = finetune(first, loader(), config, device="cpu", checkpoint_path=ckpt, checkpoint_every=8,
                   progress=stop_after_the_second_checkpoint, cancel=token)
    assert cut.cancelled and cut.steps < 24
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 16 and 0 < saved["seconds"] <= cut.seconds
    assert checkpoint_progress(ckpt) == (16, 24)  # what an estimate before resuming reads
    assert checkpoint_progress(tmp_path / "none.pt") is None and checkpoint_progress(damaged / "manifest.json") is None
    here = describe_device(torch.device("cpu"))
    assert saved["devices"] == [{"from_step": 0, "device": here}]  # where the part before the cancel ran
    # the time before the cancel, made large to be seen; and that part said to have run elsewhere, so that a
    # resume which forgot it (or recorded only where it went on) is seen
    torch.save({**saved, "seconds": 1000.0, "devices": [{"from_step": 0, "device": "cuda (NVIDIA H200)"}]}, ckpt)
    resumed = copy.deepcopy(base)  # a fresh process would start from the same saved model
    t0 = time.perf_counter()
    result = finetune(resumed, loader(), config, device="cpu", checkpoint_path=ckpt, checkpoint_every=8,
                      resume=True)
    assert result.steps == 24 and not result.cancelled
    # the wall time counts the part before the resume, as the checkpoint recorded it
    assert result.resumed_step == 16 and result.resumed_seconds == 1000.0
    assert 1000.0 < result.seconds <= 1000.0 + time.perf_counter() - t0
    assert result.devices == [{"from_step": 0, "device": "cuda (NVIDIA H200)"}, {"from_step": 16, "device": here}]
    _assert_same_weights(resumed.state_dict(), straight.state_dict())
    # the control: a resume that restores the weights, optimiser and schedule but starts the data order again
    # (the checkpoint's position in the epoch set back to its first batch) does not give these weights
    saved = torch.load(ckpt, weights_only=True)
    assert saved["batch"] > 0
    # (written as an older checkpoint, which did not record where it ran: that stretch's device is unknown)
    torch.save({**{k: v for k, v in saved.items() if k != "devices"}, "batch": 0}, ckpt)
    restarted = copy.deepcopy(base)
    again = finetune(restarted, loader(), config, device="cpu", checkpoint_path=ckpt, checkpoint_every=8,
                     resume=True)
    assert again.steps == 24 and again.devices == [{"from_step": 0, "device": None}, {"from_step": 16, "device": here}]
    assert not all(torch.equal(a, b) for a, b in zip(restarted.state_dict().values(),
                                                     straight.state_dict().values(), strict=True))


def test_where_a_resumed_run_ran_is_said_stretch_by_stretch() -> None:
    """One device reads as itself; a resume that moved the run names the step it moved at; repeats of one device
    are one stretch; a stretch an older checkpoint did not record is said to be unrecorded."""
    one, two, gpu = "cpu (1 threads)", "cpu (2 threads)", "cuda (NVIDIA H200)"
    assert describe_devices([]) is None
    assert describe_devices([{"from_step": 0, "device": two}]) == two
    assert describe_devices([{"from_step": 0, "device": two}, {"from_step": 9_400, "device": two}]) == two
    assert describe_devices([{"from_step": 0, "device": one}, {"from_step": 17_200, "device": two},
                             {"from_step": 20_000, "device": two}, {"from_step": 30_000, "device": gpu}]) == \
        f"{one} to step 17,200, then {two} to step 30,000, then {gpu}"
    assert describe_devices([{"from_step": 0, "device": None}, {"from_step": 50, "device": one}]) == \
        f"an unrecorded device to step 50, then {one}"


# ------------------------------------------------------------------------------------------ CLI
def _kill_when(cmd: list[str], path: Path) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``path`` exists; return the child's stderr.

    Polls the file system every 10 ms (the child keeps working after writing it, so the kill lands mid-run);
    fails with the child's stderr when it ends or stalls first.
    """
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + WAIT
    try:
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = path.exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    stderr = "".join(err)
    assert seen, f"no file at {path} (exit {proc.returncode}); child's stderr:\n{stderr}"
    assert proc.returncode == -signal.SIGKILL, f"the child ended by itself first; stderr:\n{stderr}"
    return stderr


def _read_complete(path: Path, read: Callable[[Path], Any], errors: tuple[type[Exception], ...], stderr: str) -> Any:
    """``read(path)`` once the file is complete: the kill may land while it is being replaced, so reads that raise
    ``errors`` are retried for up to 5 s."""
    for _ in range(100):
        try:
            return read(path)
        except errors:
            time.sleep(0.05)
    raise AssertionError(f"unreadable file {path}; child's stderr:\n{stderr}")


def _kill_at_first_checkpoint(cmd: list[str], checkpoint: Path) -> tuple[int, str]:
    """Start ``cmd``, SIGKILL it as soon as ``checkpoint`` exists; return the saved step and the child's stderr."""
    stderr = _kill_when(cmd, checkpoint)
    step = _read_complete(checkpoint, lambda p: int(torch.load(p, weights_only=True)["step"]),
                          (EOFError, RuntimeError), stderr)
    return step, stderr


def test_cli_finetune_resume_matches_the_uninterrupted_run_and_refuses_other_settings(tmp_path, damaged, capsys):
    steps = 160
    common = ["finetune", str(damaged), "--data", "digits", "--steps", str(steps), "--batch-size", "16",
              "--lr", "0.05", "--no-augment", "--device", "cpu", "--eval-samples", "64"]
    assert main([*common, "--out", str(tmp_path / "straight"), "--quiet"]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cka_analysis", *common, "--out", str(out)]
    ckpts = list((out / ".resume").glob("*.pt")) if (out / ".resume").exists() else []
    assert not ckpts
    saved, _ = _kill_at_first_checkpoint(cmd, out / ".resume" / "finetune.pt")
    assert 0 < saved < steps
    assert not (out / "manifest.json").exists()
    capsys.readouterr()
    # other settings: refused with one line, and the checkpoint is kept for the right command
    other = [("0.1" if a == "0.05" else a) for a in common]  # another learning rate
    code = main([*other, "--out", str(out), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "other settings" in err and "lr 0.05 → 0.1" in err, err
    assert (out / ".resume" / "finetune.pt").exists()
    # the same settings: goes on from the saved step and ends with the uninterrupted run's weights
    code = main([*common, "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{saved}/{steps}" in err
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] == steps if "recovery" in report else report["finetune"]["steps"] == steps
    _assert_same_weights(load_pruned(out).state_dict(), load_pruned(tmp_path / "straight").state_dict())


def test_cli_iterative_prune_resumed_after_a_kill_ends_with_the_uninterrupted_record(tmp_path, capsys):
    """Killed after an iterative step, the rerun starts after that step (not from scratch) and ends with the same
    removals, the same per-step scores and the same weights; other calibration settings are refused."""
    common = ["prune", "--model", "digits_resnet", "--weights", "demo", "--data", "digits", "--device", "cpu",
              "--samples", "64", "--remove", "3", "--criterion", "cka", "--iterative", "--recovery", "3000",
              "--batch-size", "32", "--eval-samples", "64"]
    assert main([*common, "--out", str(tmp_path / "straight"), "--quiet"]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cka_analysis", *common, "--out", str(out)]
    saved_file = out / ".resume" / "iterative.json"
    stderr = _kill_when(cmd, saved_file)
    done = _read_complete(saved_file, lambda p: json.loads(p.read_text())["steps"], (json.JSONDecodeError, OSError),
                          stderr)
    finished = len([s for s in done if s.get("removed")])
    assert 1 <= finished < 3
    # the saved steps' time, made large to be seen: the report's wall time counts it (they ran, and took it)
    saved = json.loads(saved_file.read_text())
    for st in saved["steps"][1:]:
        st["seconds"] = 1000.0
    saved_file.write_text(json.dumps(saved))
    capsys.readouterr()
    other = [("96" if a == "64" and i == common.index("--samples") + 1 else a) for i, a in enumerate(common)]
    code = main([*other, "--out", str(out), "--resume", "--quiet"])
    refused = capsys.readouterr().err
    assert code == 2 and len(refused.strip().splitlines()) == 1, refused
    assert "cannot resume" in refused and "other settings" in refused, refused
    code = main([*common, "--out", str(out), "--resume"])
    log = capsys.readouterr().err
    assert code == 0, log
    assert f"resumed after step {finished}" in log, log
    assert "the rest of the run: about" in log and f"{finished} iterative step" in log, log  # the estimate knew
    a = json.loads((tmp_path / "straight" / "report.json").read_text())
    b = json.loads((out / "report.json").read_text())
    assert a["removed"] == b["removed"] and len(b["removed"]) == 3
    assert b["resumed_seconds"] >= 1000.0 * finished and b["seconds"] > b["resumed_seconds"]
    assert [s["seconds"] for s in b["steps"][1:finished + 1]] == [1000.0] * finished
    for sa, sb in zip(a["steps"], b["steps"], strict=True):
        assert sa["removed"] == sb["removed"]
        if sa.get("scores"):
            assert max(abs(sa["scores"][k] - sb["scores"][k]) for k in sa["scores"]) < 1e-9
    _assert_same_weights(load_pruned(out).state_dict(), load_pruned(tmp_path / "straight").state_dict())
