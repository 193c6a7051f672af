"""The ``cka-prune`` command line on the bundled digits demo: every command, every criterion, bad input, resume,
and multi-process fine-tuning with torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cka_analysis.blocks import find_blocks
from cka_analysis.cli import main
from cka_analysis.export import load_pruned, open_model
from cka_analysis.scoring import CRITERIA
from cka_analysis.workflow import PruneRecord

DEMO = ["--model", "digits_resnet", "--weights", "demo", "--data", "digits", "--device", "cpu"]
# torchrun as a module of this interpreter: runs wherever torch is installed, whether or not `torchrun` is on PATH
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    # always (not only when unset): a user's OMP_NUM_THREADS=16 would change the timing the kill tests rely on
    env["OMP_NUM_THREADS"] = os.environ.get("CKA_PRUNE_TEST_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "pruned"
    code = main(["prune", *DEMO, "--samples", "128", "--target-macs-reduction", "30%", "--recovery", "2500",
                 "--eval-samples", "200", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "cka-prune" in capsys.readouterr().out
    code, _, err = run(capsys)
    assert code == 2 and "COMMAND" in err


def test_module_entry_point_is_the_cli():
    r = subprocess.run([sys.executable, "-m", "cka_analysis", "--version"], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("cka-prune ")


def test_models_lists_the_registry(capsys, tmp_path):
    code, out, _ = run(capsys, "models", "--json", tmp_path / "models.json", "--quiet")
    assert code == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "models.json").read_text())}
    assert rows["cifar_resnet56"]["removable"] == 25 and rows["cifar_resnet56"]["blocks"] == 27
    assert rows["digits_resnet"]["weights"] == ["demo"]
    assert "cifar_resnet56" in out and "FLOPs/2" in out


@pytest.mark.parametrize("criterion", CRITERIA)
def test_score_every_criterion_writes_the_documented_json(capsys, tmp_path, criterion):
    path = tmp_path / "scores.json"
    code, out, _ = run(capsys, "score", *DEMO, "--samples", "64", "--criterion", criterion, "--json", path)
    assert code == 0, out
    data = json.loads(path.read_text())
    assert data["criterion"] == criterion
    assert data["seconds"] >= 0
    removable = [b.name for b in find_blocks(open_model("digits_resnet", weights="demo")) if b.removable]
    assert sorted(data["scores"]) == sorted(removable)
    assert all(isinstance(v, float) and v == v for v in data["scores"].values())
    assert data["samples"] == (0 if criterion in ("random", "weight_norm") else 64)
    assert "not removable" in out  # the stride-2 blocks are listed with their reason


def test_score_is_seeded(capsys, tmp_path):
    for name in ("a", "b"):
        assert run(capsys, "score", *DEMO, "--samples", "32", "--criterion", "random", "--seed", "3",
                   "--json", tmp_path / f"{name}.json")[0] == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["scores"] for n in "ab")
    assert a == b


def test_heatmap_json_and_html(capsys, tmp_path, pruned_dir):
    code, _, _ = run(capsys, "heatmap", *DEMO, "--samples", "96", "--out", tmp_path / "h.json")
    assert code == 0
    data = json.loads((tmp_path / "h.json").read_text())
    m = torch.tensor(data["matrix"])
    assert m.shape == (len(data["layers_a"]), len(data["layers_b"]))
    assert data["layers_a"][-1] == "penultimate" and torch.allclose(m.diagonal(), torch.ones(len(m)), atol=1e-6)
    code, _, _ = run(capsys, "heatmap", *DEMO, "--samples", "64", "--compare", pruned_dir,
                     "--out", tmp_path / "h.html")
    assert code == 0
    assert "plotly" in (tmp_path / "h.html").read_text()


def test_prune_writes_a_loadable_model_and_report(pruned_dir):
    report = json.loads((pruned_dir / "report.json").read_text())
    model = load_pruned(pruned_dir)
    base = open_model("digits_resnet", weights="demo")
    blocks = {b.name: b for b in find_blocks(base)}
    assert report["removed"] and report["final"]["macs_reduction"] >= 0.30
    assert report["final"]["macs"] == report["base"]["macs"] - sum(blocks[n].macs for n in report["removed"])
    assert report["final"]["params"] == report["base"]["params"] - sum(blocks[n].params for n in report["removed"])
    assert model.cka_manifest["removed"] == report["removed"]
    assert report["format"] == "cka-prune-record/1" and PruneRecord.from_dict(report).removed == report["removed"]
    assert report["recovery"]["config"]["images"] == 2500 and 0 < report["images_seen"] <= 2500
    assert report["request"]["eval_samples"] == 200 and report["request"]["recovery"]["images"] == 2500
    assert report["latency_ms"]["base"] > 0 and report["latency_ms"]["pruned"] > 0
    assert not (pruned_dir / ".resume").exists()


def test_recover_continues_a_pruned_run_like_the_dashboard(capsys, tmp_path, pruned_dir):
    from cka_analysis.workflow import recover_further

    code, _, err = run(capsys, "recover", pruned_dir, "--recovery", "1500", "--out", tmp_path / "more")
    assert code == 0, err
    assert "1,500 training images, about" in err  # the estimate comes first
    report = json.loads((tmp_path / "more" / "report.json").read_text())
    first = json.loads((pruned_dir / "report.json").read_text())
    assert report["removed"] == first["removed"]
    assert report["images_seen"] == first["images_seen"] + report["recovery"]["further"][0]["images_seen"]
    assert report["request"]["origin"] == {"model": "digits_resnet", "weights": "demo", "num_classes": None}
    # the same numbers as the library call the dashboard's Compare page makes
    lib = recover_further(load_pruned(pruned_dir), PruneRecord.from_dict(first),
                          open_model("digits_resnet", weights="demo"), "1500")
    assert lib.record.final.accuracy == report["final"]["accuracy"]
    # without --recovery-method the run's own recipe goes on (as on the Compare page); with it, that method
    assert report["recovery"]["further"][0]["config"] == {**first["request"]["recovery"], "images": 1500,
                                                           "name": None}
    code, _, err = run(capsys, "recover", pruned_dir, "--recovery", "300", "--recovery-method", "bn",
                       "--out", tmp_path / "bn")
    assert code == 0, err
    assert json.loads((tmp_path / "bn" / "report.json").read_text())["recovery"]["further"][0]["method"] == "bn"
    code, _, err = run(capsys, "recover", pruned_dir, "--recovery", "none", "--out", tmp_path / "none")
    assert code == 2 and "no images" in err


def test_prune_by_hand_and_iterative(capsys, tmp_path):
    code, out, _ = run(capsys, "prune", *DEMO, "--blocks", "layer3.2,layer1.2", "--recovery", "none",
                       "--eval-samples", "100", "--out", tmp_path / "hand")
    assert code == 0, out
    assert load_pruned(tmp_path / "hand").cka_manifest["removed"] == ["layer3.2", "layer1.2"]
    code, out, _ = run(capsys, "prune", *DEMO, "--samples", "64", "--remove", "2", "--iterative",
                       "--recovery", "1000", "--eval-samples", "100",
                       "--out", tmp_path / "iter")
    assert code == 0, out
    report = json.loads((tmp_path / "iter" / "report.json").read_text())
    assert len(report["removed"]) == 2 and [len(s["removed"]) for s in report["steps"]] == [0, 1, 1]
    assert report["steps"][1]["scores"] and report["steps"][2]["recovery"]["images_seen"] > 0
    # the per-step recoveries and the final one share the one budget
    per_step = sum(s["recovery"]["images_seen"] for s in report["steps"][1:])
    assert report["images_seen"] == per_step + report["recovery"]["images_seen"] <= 1000


def test_prune_with_the_capacity_aware_plan(capsys, tmp_path):
    """``--criterion cka_capacity`` with its knob: the plan, its reason on stderr and the report that names both;
    ``--capacity-weight 0`` is plain cka order; ``--recovery long`` is a budget the CLI reads."""
    code, out, err = run(capsys, "prune", *DEMO, "--samples", "128", "--remove", "1", "--criterion", "cka_capacity",
                         "--recovery", "none", "--eval-samples", "100", "--out", tmp_path / "cap")
    assert code == 0, out
    report = json.loads((tmp_path / "cap" / "report.json").read_text())
    assert report["criterion"] == "cka_capacity" and report["request"]["capacity_weight"] == 1.0
    assert report["removed"] == ["layer1.2"]
    assert "cka_capacity plans for the network after recovery" in err
    code, out, _ = run(capsys, "prune", *DEMO, "--samples", "128", "--remove", "1", "--criterion", "cka_capacity",
                       "--capacity-weight", "0", "--recovery", "none", "--eval-samples", "100",
                       "--out", tmp_path / "zero")
    assert code == 0, out
    assert json.loads((tmp_path / "zero" / "report.json").read_text())["removed"] == ["layer3.2"]
    from cka_analysis.cli import _prune_request, build_parser
    from cka_analysis.models import build_model

    args = build_parser().parse_args(["prune", *DEMO, "--remove", "1", "--recovery", "long"])
    request = _prune_request(args, build_model("digits_resnet", weights="demo"), "cpu")
    assert request.recovery.name == "long" and request.recovery.images == 2_500_000


def test_finetune_evaluate_export(capsys, tmp_path, pruned_dir):
    out = tmp_path / "ft"
    code, text, _ = run(capsys, "finetune", pruned_dir, "--data", "digits", "--steps", "4", "--device", "cpu",
                        "--eval-samples", "100", "--out", out)
    assert code == 0, text
    model = load_pruned(out)
    assert model.cka_manifest["removed"] == load_pruned(pruned_dir).cka_manifest["removed"]
    ran = json.loads((out / "report.json").read_text())["finetune"]["devices"]
    assert [d["from_step"] for d in ran] == [0] and ran[0]["device"].startswith("cpu (")  # where it ran
    assert f"process(es), {ran[0]['device']}; best" in text

    path = tmp_path / "eval.json"
    code, text, _ = run(capsys, "evaluate", out, "--data", "digits", "--samples", "64", "--device", "cpu",
                        "--robustness", "fgsm,pgd,corruptions", "--eps", "0,2/255,0.05", "--pgd-steps", "3",
                        "--json", path)
    assert code == 0, text
    data = json.loads(path.read_text())
    rob = data["robustness"]
    assert data["samples"] == 64 and 0 <= data["top1"] <= 100 and data["macs"] > 0
    assert rob["fgsm"]["eps"] == [0.0, 2 / 255, 0.05]
    assert rob["fgsm"]["accuracy"][0] == pytest.approx(rob["clean_accuracy"])
    assert set(rob["corruptions"]["accuracy"]) >= {"gaussian_noise", "jpeg_compression", "pixelate"}
    assert rob["corruptions"]["severities"] == [1, 2, 3, 4, 5]
    assert len(rob["corruptions"]["mean_per_severity"]) == 5

    for fmt, name in (("onnx", "model.onnx"), ("pt2", "model.pt2")):
        code, text, _ = run(capsys, "export", out, "--format", fmt)
        assert code == 0, text
        assert (out / name).stat().st_size > 0
    x = torch.randn(3, *model.cka_preset.input_size)
    exported = torch.export.load(out / "model.pt2").module()
    torch.testing.assert_close(exported(x), model(x))
    code, text, _ = run(capsys, "export", out, "--format", "safetensors", "--out", tmp_path / "copy")
    assert code == 0
    torch.testing.assert_close(load_pruned(tmp_path / "copy")(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["score", "--model", "resnet9000", "--data", "digits"], ["unknown model", "resnet9000"]),
        (["score", "--model", "digits_resnet", "--data", "imagefolder:/no/such/folder"], ["/no/such/folder"]),
        (["score", "--model", "digits_resnet", "--data", "mnist"], ["not understood", "imagefolder"]),
        (["score", "--model", "digits_resnet", "--weights", "demo", "--data", "digits", "--device", "cuda"]
         if not torch.cuda.is_available() else ["score", "--model", "x"], ["CUDA"] if not torch.cuda.is_available()
         else ["unknown model"]),
        (["prune", *DEMO, "--blocks", "layer2.0"], ["layer2.0", "cannot be removed"]),
        (["prune", *DEMO, "--blocks", "layer9.9"], ["layer9.9"]),
        (["prune", *DEMO, "--samples", "32", "--target-macs-reduction", "0.95", "--recovery", "none"],
         ["cannot be met"]),
        (["prune", *DEMO, "--remove", "2", "--recovery", "lots"], ["recovery='lots'", "quick"]),
        (["prune", *DEMO, "--remove", "2", "--samples", "2"], ["calibration_samples=2", "at least 4"]),
        (["score", *DEMO, "--samples", "2"], ["at least 4"]),
        (["score", *DEMO, "--samples", "99999"], ["only", "items"]),
        (["score", "--model", "digits_resnet", "--weights", "/no/such/file.pt", "--data", "digits"],
         ["/no/such/file.pt"]),
        (["score", "--model", "digits_resnet", "--num-classes", "7", "--data", "digits"], ["10 classes", "7"]),
        (["evaluate", "/no/such/dir", "--data", "digits"], ["/no/such/dir"]),
        (["evaluate", "digits_resnet", "--weights", "demo", "--data", "digits", "--robustness", "fgsm",
          "--eps", "nope"], ["nope"]),
        (["heatmap", *DEMO, "--out", "map.txt"], [".json", ".html"]),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv, "--quiet")
    assert code == 2
    # one error line (a "note:" about default weights may come before it)
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert list(tmp_path.iterdir()) == []  # issue 13: bad input leaves no ./pruned/.resume debris


def test_argparse_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", *DEMO, "--target-macs-reduction", "150%"])
    assert exc.value.code == 2
    assert "fraction" in capsys.readouterr().err


def test_debug_shows_the_traceback(capsys):
    from cka_analysis.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["score", "--model", "resnet9000", "--data", "digits", "--debug", "--quiet"])


def test_killed_prune_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL a prune run during recovery, rerun with --resume: it goes on from the saved step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cka_analysis", "prune", *DEMO, "--samples", "64", "--remove", "2",
           "--recovery", "40000", "--eval-samples", "64", "--out", str(out)]
    # event-driven: the child's stderr goes to a file (an unread pipe could fill and stall it) and is shown on
    # failure; the checkpoint is looked for every 10 ms and the child killed as soon as it exists
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    ckpt = out / ".resume" / "recovery.pt"
    deadline = time.monotonic() + 600
    try:
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = ckpt.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen and proc.returncode == -signal.SIGKILL, (
        f"no recovery checkpoint before the child ended or stalled (exit {proc.returncode}); its stderr:\n"
        + log.read_text())
    assert not (out / "manifest.json").exists()
    assert (out / ".resume" / "scores.json").exists()
    saved = torch.load(ckpt, weights_only=True)
    saved_step = saved["step"]
    assert saved_step > 0 and saved["seconds"] > 0  # the checkpoint carries the training time so far
    # the time before the kill counts in the report: made large here, so that this part alone cannot reach it
    torch.save({**saved, "seconds": 1000.0}, ckpt)
    r = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "reusing the cka scores" in r.stderr and f"resumed at step {saved_step}/" in r.stderr
    # the estimate said beforehand is for what is left, read from the same checkpoint
    assert "the rest of the run: about" in r.stderr and "the saved scores reused" in r.stderr, r.stderr
    assert f"recovery going on from step {saved_step:,}/{saved['total']:,}" in r.stderr, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] > saved_step and len(report["removed"]) == 2
    assert report["recovery"]["resumed_step"] == saved_step and report["recovery"]["resumed_seconds"] == 1000.0
    # where it ran: the run's device, and each stretch of its recovery (the killed one and the resumed one)
    assert report["device"].startswith("cpu (") and [d["from_step"] for d in report["recovery"]["devices"]] == \
        [0, saved_step] and all(d["device"] == report["device"] for d in report["recovery"]["devices"])
    assert f" on {report['device']}\n" in r.stdout, r.stdout  # and the summary says it
    assert 1000.0 < report["recovery"]["seconds"] <= report["seconds"] < 1000.0 + 600
    assert report["images_seen"] <= 40000
    load_pruned(out)


def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo processes with a global batch of 64 end where 1 process with batch 64 does (per-rank BatchNorm
    statistics are the only difference), and rank 0 saves a loadable model."""
    # the demo with three blocks removed: fine-tuning repairs it, so the kept (best) weights are the trained ones
    from cka_analysis.blocks import remove_blocks
    from cka_analysis.export import save_pruned

    save_pruned(remove_blocks(open_model("digits_resnet", weights="demo"), ["layer1.0", "layer1.1", "layer3.2"]),
                tmp_path / "init")
    common = ["-m", "cka_analysis", "finetune", str(tmp_path / "init"), "--data", "digits",
              "--steps", "12", "--batch-size", "64", "--lr", "0.05", "--no-augment", "--device", "cpu",
              "--eval-samples", "200", "--quiet"]
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    # control: one process, another data order; the 2-process run must be much closer than this one
    other = subprocess.run([sys.executable, *common, "--seed", "1", "--out", str(tmp_path / "other")], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr
    multi = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *common, "--out",
                            str(tmp_path / "two")], env=_env(), capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    assert "on 2 process(es)" in multi.stdout
    one, two = load_pruned(tmp_path / "one"), load_pruned(tmp_path / "two")
    base = load_pruned(tmp_path / "init")
    sa, sb, s0 = one.state_dict(), two.state_dict(), base.state_dict()
    params = [n for n, _ in one.named_parameters()]

    def dist(a, b):
        return sum(float((a[k] - b[k]).norm() ** 2) for k in params) ** 0.5

    moved = dist(sa, s0)
    assert moved > 0
    control = dist(sa, load_pruned(tmp_path / "other").state_dict())
    print(f"2 ranks vs 1: {dist(sa, sb):.4f}; other data order: {control:.4f}; training moved {moved:.4f}")
    assert dist(sa, sb) < 0.4 * moved, (dist(sa, sb), moved)
    assert dist(sa, sb) < 0.6 * control, (dist(sa, sb), control)
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())["finetune"]
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())["finetune"]
    assert r2["steps"] == r1["steps"] == 12
    assert r1["best_step"] == r2["best_step"] == 12, (r1["history"], r2["history"])
    assert abs(r1["best_accuracy"] - r2["best_accuracy"]) <= 2.0


def test_torchrun_heatmap_merges_the_hsic_sums_of_both_ranks(tmp_path):
    common = ["-m", "cka_analysis", "heatmap", "--model", "digits_resnet", "--weights", "demo", "--data", "digits",
              "--split", "train", "--samples", "1400", "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, *common, "--batch-size", "64", "--out", str(tmp_path / "one.json")],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *common, "--batch-size", "32",
                          "--out", str(tmp_path / "two.json")], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["layers_a"] == b["layers_a"] and b["samples"] == 1400
    # same global batches of 64 images, split 32 + 32 across the ranks: minibatch CKA agrees to its noise level
    assert (torch.tensor(a["matrix"]) - torch.tensor(b["matrix"])).abs().max() < 0.02


def test_torchrun_scoring_shards_the_calibration_images(tmp_path):
    common = ["-m", "cka_analysis", "score", "--model", "digits_resnet", "--weights", "demo", "--data", "digits",
              "--samples", "200", "--device", "cpu", "--quiet"]
    one = subprocess.run([sys.executable, *common, "--json", str(tmp_path / "one.json")], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", *common, "--json",
                          str(tmp_path / "two.json")], env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["options"]["world_size"] == 2 and b["samples"] == 200
    # the features of both halves are gathered: the same CKA as one process
    assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) < 1e-9


def test_sample_limits_take_a_class_balanced_subset():
    """Image folders list files class by class: `--samples N` must not mean "the first N" (one class)."""
    import argparse

    from torch.utils.data import TensorDataset

    from cka_analysis.cli import _subset
    from cka_analysis.data import dataset_targets

    labels = torch.arange(4).repeat_interleave(25)  # sorted by class, like an ImageFolder
    ds = TensorDataset(torch.zeros(100, 1, 8, 8), labels)
    sub = _subset(argparse.Namespace(seed=0), ds, 20)
    assert sorted(dataset_targets(sub)) == sorted([0, 1, 2, 3] * 5)
    assert _subset(argparse.Namespace(seed=0), ds, None) is ds
