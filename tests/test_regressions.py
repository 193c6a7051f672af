"""Tests that fail on the regression they are named after (issue 13, point 7).

Each test compares against an independent reference — the library on the same images, values typed in from the
paper, a separately computed rescoring — rather than checking keys and ranges, so that it would fail if the
thing it guards broke. Written against the public CLI and library API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
import torch
from torch import nn

from cka_analysis.blocks import remove_blocks
from cka_analysis.cka import CKAOptions, cka_matrix
from cka_analysis.cli import main
from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.errors import CheckpointError
from cka_analysis.export import open_model, save_pruned
from cka_analysis.metrics import evaluate
from cka_analysis.scoring import ScoringOptions, score_blocks

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--model", "digits_resnet", "--weights", "demo", "--data", "digits", "--device", "cpu"]
ON_CPU = ScoringOptions(device="cpu")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # always (not only when unset): a user's OMP_NUM_THREADS=16 would change the timing the kill tests rely on
    env["OMP_NUM_THREADS"] = os.environ.get("CKA_PRUNE_TEST_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def demo_data():
    model = open_model("digits_resnet", weights="demo")
    preset = model.cka_preset
    return model, load_dataset("digits", "train", preset), load_dataset("digits", "test", preset)


# ------------------------------------------------------------------------------------------ CLI = library
def test_cli_scores_equal_the_library_on_the_same_calibration_images(capsys, tmp_path, demo_data):
    model, train, _ = demo_data
    code, _, err = _cli(capsys, "score", *DEMO, "--samples", "96", "--criterion", "cka", "--json",
                        tmp_path / "s.json", "--quiet")
    assert code == 0, err
    cli = json.loads((tmp_path / "s.json").read_text())["scores"]
    lib = score_blocks(model, calibration_subset(train, 96, seed=0), "cka", options=ON_CPU).scores
    assert cli.keys() == lib.keys()
    assert max(abs(cli[k] - lib[k]) for k in lib) < 1e-9
    # and they are not the scores of other images (the comparison can tell calibration sets apart)
    other = score_blocks(model, calibration_subset(train, 96, seed=1), "cka", options=ON_CPU).scores
    assert max(abs(cli[k] - other[k]) for k in lib) > 1e-6


def test_cli_heatmap_equals_the_library_on_the_same_images(capsys, tmp_path, demo_data):
    model, _, test = demo_data
    code, _, err = _cli(capsys, "heatmap", *DEMO, "--samples", "96", "--out", tmp_path / "h.json", "--quiet")
    assert code == 0, err
    cli = json.loads((tmp_path / "h.json").read_text())
    lib = cka_matrix(model, make_loader(calibration_subset(test, 96, seed=0), batch_size=128),
                     options=CKAOptions(device="cpu"))
    assert cli["layers_a"] == list(lib.names_a)
    assert (torch.tensor(cli["matrix"], dtype=torch.float64) - lib.matrix.double()).abs().max() < 1e-9


def test_cli_evaluate_equals_the_library_on_the_same_test_images(capsys, tmp_path, demo_data):
    model, _, test = demo_data
    code, _, err = _cli(capsys, "evaluate", "digits_resnet", "--weights", "demo", "--data", "digits", "--device",
                        "cpu", "--samples", "100", "--no-latency", "--json", tmp_path / "e.json", "--quiet")
    assert code == 0, err
    cli = json.loads((tmp_path / "e.json").read_text())
    acc = evaluate(model, make_loader(calibration_subset(test, 100, seed=0), batch_size=128), device="cpu")
    assert cli["samples"] == acc.samples == 100
    assert cli["top1"] == acc.top1 and cli["loss"] == pytest.approx(acc.loss, abs=1e-12)


# ------------------------------------------------------------------------------------------ iterative rescoring
def test_iterative_pruning_rescores_the_pruned_model(capsys, tmp_path, demo_data):
    """Step 2's scores are those of the network without step 1's block — not step 1's scores reused."""
    _, train, _ = demo_data
    out = tmp_path / "it"
    code, _, err = _cli(capsys, "prune", *DEMO, "--samples", "64", "--remove", "2", "--criterion", "cka",
                        "--iterative", "--recovery", "none", "--eval-samples", "64", "--out", out, "--quiet")
    assert code == 0, err
    steps = [s for s in json.loads((out / "report.json").read_text())["steps"] if s.get("scores")]
    assert len(steps) == 2
    first, second = steps
    gone = first["removed"][-1]
    assert gone not in second["scores"] and set(second["scores"]) == set(first["scores"]) - {gone}
    calib = calibration_subset(train, 64, seed=0)
    expected = score_blocks(remove_blocks(open_model("digits_resnet", weights="demo"), [gone]), calib, "cka",
                            options=ON_CPU).scores
    assert max(abs(second["scores"][k] - expected[k]) for k in expected) < 1e-9
    reused = {k: v for k, v in first["scores"].items() if k != gone}
    assert max(abs(second["scores"][k] - reused[k]) for k in reused) > 1e-4  # reusing would be detected


# ------------------------------------------------------------------------------------------ corruptions
# Hendrycks & Dietterich (ICLR 2019), make_cifar_c.py and make_imagenet_c.py, severities 1–5, typed in from the
# published reference code (not read from this project's module).
PUBLISHED = {
    "cifar10-c": {
        "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
        "shot_noise": (500, 250, 100, 75, 50),
        "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
        "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
        "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
        "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
        "jpeg_compression": (80, 65, 58, 50, 40),
        "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    },
    "imagenet-c": {
        "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
        "shot_noise": (60, 25, 12, 5, 3),
        "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
        "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
        "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
        "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
        "jpeg_compression": (25, 18, 15, 10, 7),
        "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    },
}


def test_corruption_parameters_are_the_published_ones():
    from cka_analysis.robustness.corruptions import CORRUPTION_TABLES

    for table, published in PUBLISHED.items():
        ours = {name: tuple(tuple(v) if isinstance(v, tuple) else v for v in values)
                for name, values in CORRUPTION_TABLES[table].items()}
        assert ours == published, table


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_corruptions_apply_the_published_strength(severity):
    """The parameters are used, not only listed: measured effects on a flat grey image match them."""
    from cka_analysis.robustness import corrupt

    grey = torch.full((64, 3, 32, 32), 0.5)
    sigma = PUBLISHED["cifar10-c"]["gaussian_noise"][severity - 1]
    noisy = corrupt(grey, "gaussian_noise", severity, seed=0)
    assert float((noisy - grey).std()) == pytest.approx(sigma, rel=0.03)
    rate = PUBLISHED["cifar10-c"]["impulse_noise"][severity - 1]
    salted = corrupt(grey, "impulse_noise", severity, seed=0)
    assert float((salted != grey).float().mean()) == pytest.approx(rate, rel=0.15)
    photons = PUBLISHED["cifar10-c"]["shot_noise"][severity - 1]
    shot = corrupt(grey, "shot_noise", severity, seed=0)
    assert float((shot - grey).std()) == pytest.approx((0.5 / photons) ** 0.5, rel=0.05)  # Poisson(λx)/λ
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    c = PUBLISHED["cifar10-c"]["contrast"][severity - 1]
    mean = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(x, "contrast", severity), ((x - mean) * c + mean).clamp(0, 1),
                               atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ Ctrl-C
def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    save_pruned(open_model("digits_resnet", weights="demo"), tmp_path / "init")
    cmd = [sys.executable, "-m", "cka_analysis", "finetune", str(tmp_path / "init"), "--data", "digits",
           "--steps", "100000", "--batch-size", "16", "--device", "cpu", "--eval-samples", "32",
           "--out", str(tmp_path / "out")]
    # Ctrl-C's default action in the child, as in a terminal: a suite started as a background job of a
    # non-interactive shell (`pytest &`) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    training = threading.Event()
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        buf = ""
        while chunk := proc.stderr.read(1):
            buf += chunk
            if chunk in "\r\n":
                err.append(buf.strip())
                if "step" in buf:
                    training.set()  # the training loop is running
                buf = ""
        if buf.strip():
            err.append(buf.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert training.wait(300), f"no training progress; stderr:\n{chr(10).join(err)}"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    lines = [line for line in err if line and not line.startswith("[")]
    assert code == 130, "\n".join(err)
    assert lines[-1] == "cka-prune finetune: interrupted (rerun with --resume to go on)", lines
    assert not any("Traceback" in line for line in err)


# ------------------------------------------------------------------------------------------ out of memory
class _DeviceOutOfMemory(nn.Module):
    """A plug-in architecture whose forward pass fails the way a full GPU does."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total)")


def _register_oom_model() -> str:
    from cka_analysis.models import ModelEntry, Preset, available_models, register_model

    name = "test_device_oom"
    if name not in available_models():
        register_model(ModelEntry(name=name, family="test", builder=_DeviceOutOfMemory,
                                  preset=Preset(name, (1, 8, 8), (0.3,), (0.4,), 10),
                                  description="raises CUDA out of memory in forward"))
    return name


def test_cli_out_of_memory_is_one_actionable_line(capsys):
    name = _register_oom_model()
    code, _, err = _cli(capsys, "evaluate", name, "--weights", "random", "--data", "digits", "--device", "cpu",
                        "--samples", "32", "--no-latency", "--quiet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "out of memory" in lines[0] and "--batch-size" in lines[0] and "Traceback" not in err


def test_dashboard_job_out_of_memory_is_an_error_with_advice_not_a_crash():
    sys.path.insert(0, str(REPO / "app"))
    from dashboard import jobs

    name = _register_oom_model()
    model = open_model(name, weights="random")
    test = load_dataset("digits", "test", model.cka_preset)

    def work(*, progress=None, cancel=None):
        return evaluate(model, make_loader(test, batch_size=16), device="cpu", progress=progress, cancel=cancel)

    job = jobs.submit("accuracy", 1, "evaluating on the test split", work, queue=jobs.JobQueue(1))
    assert job.wait(120)
    assert job.status == "error" and job.exception is None
    assert "ran out of memory while evaluating on the test split" in job.error
    assert "calibration images" in job.error and "CPU" in job.error


# ------------------------------------------------------------------------------------------ upload limits
def _uploads():
    sys.path.insert(0, str(REPO / "app"))
    from dashboard import uploads

    return uploads


def _upload_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("cka-prune-upload-*")}


def test_upload_limit_matches_the_server_setting_and_is_enforced():
    uploads = _uploads()
    config = (REPO / ".streamlit" / "config.toml").read_text()
    assert f"maxUploadSize = {uploads.MAX_UPLOAD_BYTES // 1024**2}" in config
    before = _upload_dirs()
    too_big = bytes(uploads.MAX_UPLOAD_BYTES + 1)
    with pytest.raises(CheckpointError, match="limited to 200 MB"):
        uploads.model_from_checkpoint("big.pt", too_big, "digits_resnet", None)
    with pytest.raises(CheckpointError, match="limited to 200 MB"):
        uploads.model_from_archive("big.zip", too_big)
    with pytest.raises(CheckpointError, match=r"extension \.pkl"):
        uploads.model_from_checkpoint("model.pkl", b"data", "digits_resnet", None)
    with pytest.raises(CheckpointError, match="empty"):
        uploads.model_from_checkpoint("model.pt", b"", "digits_resnet", None)
    assert _upload_dirs() == before  # nothing written for a refused upload


def _zip(members: dict[str, bytes]) -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_archive_limits_refuse_bombs_and_paths_outside(tmp_path):
    uploads = _uploads()
    before = _upload_dirs()
    many = _zip({f"m{i}.safetensors": b"x" for i in range(uploads.MAX_MEMBERS + 1)})
    with pytest.raises(CheckpointError, match="entries"):
        uploads.model_from_archive("many.zip", many)
    # a member whose directory entry claims 2 GiB: refused before anything is unpacked
    small = bytearray(_zip({"manifest.json": b"{}"}))
    central = small.index(b"PK\x01\x02")
    small[central + 24:central + 28] = (2**31 - 1).to_bytes(4, "little")  # uncompressed size field
    with pytest.raises(CheckpointError, match="unpacks to"):
        uploads.model_from_archive("bomb.zip", bytes(small))
    with pytest.raises(CheckpointError, match="outside the archive"):
        uploads.model_from_archive("evil.zip", _zip({"../manifest.json": b"{}"}))
    with pytest.raises(CheckpointError, match=r"only manifest\.json"):
        uploads.model_from_archive("code.zip", _zip({"run.py": b"print(1)"}))
    assert _upload_dirs() == before  # every private folder was removed
