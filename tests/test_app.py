"""The dashboard driven by Streamlit's AppTest on the digits demo: every page, the exports, bad inputs, and the same
record as the CLI for the same pruning request.

Long work runs in background jobs (app/dashboard/jobs.py); :func:`settle` reruns the script until the session's
job has finished, as the page's polling fragment would in a browser.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from app_session import TIMEOUT, settle
from streamlit.testing.v1 import AppTest

from cka_analysis.cli import main
from cka_analysis.config import asset_path
from cka_analysis.export import load_pruned
from cka_analysis.workflow import records_equal

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch) -> None:
    """Each test's runs keep their checkpoint folders (a cancelled run's stays) in a cache of its own, never the
    user's, and never one a test before it left."""
    monkeypatch.setenv("CKA_PRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))


def assert_clean(at: AppTest, where: str, errors: bool = True) -> None:
    assert not at.exception, f"{where}: {[e.value for e in at.exception]}"
    if errors:
        assert not at.error, f"{where}: {[e.value for e in at.error]}"


def page(at: AppTest, name: str) -> AppTest:
    t = time.perf_counter()
    settle(at.switch_page(f"views/{name}.py"))
    print(f"page {name}: {time.perf_counter() - t:.1f} s")
    return at


def prune_settings(at: AppTest, *, macs: int, recovery: int, eval_samples: int) -> AppTest:
    """On the Prune page: a MACs target (%), a custom recovery budget (training images) and the test images."""
    at.slider(key="pr_macs").set_value(macs)
    at.segmented_control(key="pr_recovery").set_value("custom")
    at.run()
    at.number_input(key="pr_recovery_images").set_value(recovery)
    at.number_input(key="pr_eval_samples").set_value(eval_samples)
    return settle(at)


def start_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    settle(at)
    assert_clean(at, "start")
    return at


def load(at: AppTest) -> AppTest:
    at.button(key="md_load").click()
    return settle(at)


def test_walk_every_page_on_the_digits_demo(tmp_path: Path) -> None:
    at = start_app()
    # 1. Model & data: the demo is active, its blocks and test accuracy are shown; select it again with fewer
    #    calibration images (keeps the test fast).
    assert "digits_resnet" in at.session_state["active"].model_label
    assert at.dataframe[0].value.shape[0] == 9
    labels = {m.label: m.value for m in at.metric}
    assert labels["Test accuracy (top-1)"].endswith("%")
    at.selectbox(key="md_registry").set_value("digits_resnet")
    at.number_input(key="md_n_calib").set_value(64)
    load(at)
    assert_clean(at, "model & data")
    assert len(at.session_state["active"].calib) == 64
    sidebar = " ".join(m.value for m in at.sidebar.markdown)
    assert "digits_resnet" in sidebar and "digits" in sidebar and "cpu" in sidebar.lower()

    # 2. CKA heatmap (starts by itself on the demo), then the RBF kernel.
    page(at, "heatmap")
    assert_clean(at, "heatmap")
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    at.segmented_control(key="hm_kernel").set_value("rbf")
    settle(at)
    assert_clean(at, "heatmap rbf")
    assert len(at.get("plotly_chart")) == 2

    # 3. Removal scores: the paper's CKA by default, then a comparison of two criteria.
    page(at, "scores")
    assert_clean(at, "scores")
    ranking = at.dataframe[0].value
    assert len(ranking) == 7  # the removable blocks
    at.multiselect(key="sc_compare").set_value(["cka", "weight_norm"])
    at.button(key="run_compare_scores").click()
    settle(at)
    assert_clean(at, "compare criteria")
    assert at.dataframe[-1].value.shape[0] == 1

    # 4. Prune to ≥ 20 % fewer MACs with a recovery budget of 2,500 training images, on 64 test images.
    page(at, "prune")
    assert_clean(at, "prune")
    assert at.segmented_control(key="pr_recovery").value == "quick"  # the default, as in the CLI
    prune_settings(at, macs=20, recovery=2500, eval_samples=64)
    assert any("Recovery 2,500 images" in c.value and "s on this device" in c.value for c in at.caption)
    preview = {m.label: m.value for m in at.metric}
    assert preview["Blocks removed"].startswith(("1 of", "2 of", "3 of"))
    at.button(key="pr_run").click()
    settle(at)
    assert_clean(at, "prune run")
    runs = at.session_state["runs"]
    assert len(runs) == 1
    rec = runs[0]["record"]
    assert rec["final"]["macs_reduction"] >= 0.2 and rec["removed"]
    assert rec["recovery"]["config"]["images"] == 2500 and 0 < rec["images_seen"] <= 2500
    assert any(m.label == "Test accuracy" for m in at.metric)
    assert rec["device"].startswith("cpu (")  # where it ran, in the record and beside its time
    assert next(m for m in at.metric if m.label == "Time").help.startswith(f"on {rec['device']}; estimated ")

    # the original-vs-pruned heatmap now appears on the heatmap page
    page(at, "heatmap")
    assert_clean(at, "cross heatmap")
    assert len(at.get("plotly_chart")) == 3

    # 5. Compare: latency and FGSM on a few images.
    page(at, "compare")
    assert_clean(at, "compare")
    assert at.dataframe[0].value.shape[0] == 2
    at.multiselect(key="cmp_kinds").set_value(["fgsm"])
    at.number_input(key="cmp_samples").set_value(16)
    at.number_input(key="cmp_batch").set_value(4)
    at.number_input(key="cmp_repeats").set_value(3)
    at.button(key="run_compare").click()
    settle(at)
    assert_clean(at, "compare run")
    table = at.dataframe[0].value
    assert table["latency ms"].notna().all() and table["FGSM acc @8/255"].notna().all()
    assert len(at.get("plotly_chart")) == 2  # Pareto + adversarial curves

    # ... and a run recovered further (quick budget) becomes a new run, without pruning again.
    at.button(key="run_recover_further").click()
    settle(at)
    assert_clean(at, "recover further")
    further = at.session_state["runs"][-1]
    assert len(at.session_state["runs"]) == 2 and further["record"]["removed"] == rec["removed"]
    assert further["record"]["images_seen"] > rec["images_seen"]
    assert further["record"]["recovery"]["further"][0]["images_seen"] <= 25_000

    # 6. Export: safetensors + manifest and ONNX; the zip reloads with load_pruned and gives the same logits.
    page(at, "export")
    assert_clean(at, "export")
    at.multiselect(key="ex_formats").set_value(["safetensors", "onnx"])
    at.button(key="run_export").click()
    settle(at)
    assert_clean(at, "export run")
    labels = [b.label for b in at.get("download_button")]
    assert any(".zip" in x for x in labels) and any(".onnx" in x for x in labels)
    assert "Download report.md" in labels and "Download report.json" in labels
    run = at.session_state["runs"][-1]  # the export page offers the newest run first
    files = at.session_state["exports"][f"{at.session_state['active'].model_key}|run:{run['id']}"]
    name, data = files["files"]["safetensors"]
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    folder = tmp_path / name.removesuffix(".zip")
    reloaded = load_pruned(folder)
    assert reloaded.cka_manifest["removed"] == rec["removed"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), run["model"].cpu().eval()(x))

    # ... and the same archive opens again through the upload on the first page.
    page(at, "model_data")
    at.radio(key="md_source").set_value("archive")
    at.run()
    at.file_uploader(key="md_archive_file").set_value((name, data, "application/zip"))
    load(at)
    assert_clean(at, "reopen the export")
    assert at.session_state["active"].model_label.startswith("saved model")
    assert [b.name for b in at.session_state["active"].blocks if b.removable] == [
        b for b in ("layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2")
        if b not in rec["removed"]
    ]


def test_bad_inputs_show_errors_and_the_session_keeps_working(tmp_path: Path) -> None:
    at = start_app()
    before = at.session_state["active"].model_key

    # a missing ImageFolder: a readable error, the demo stays active
    at.selectbox(key="md_data_kind").set_value("imagefolder")
    at.run()
    at.text_input(key="md_data_root").set_value(str(tmp_path / "no-such-folder"))
    load(at)
    assert_clean(at, "missing folder", errors=False)
    assert any("does not exist" in e.value for e in at.error)
    assert at.session_state["active"].model_key == before

    # a corrupt checkpoint upload
    at.selectbox(key="md_data_kind").set_value("digits")
    at.radio(key="md_source").set_value("checkpoint")
    at.run()
    at.file_uploader(key="md_ckpt_file").set_value(("weights.pt", b"not a checkpoint", "application/octet-stream"))
    load(at)
    assert_clean(at, "corrupt checkpoint", errors=False)
    assert any("'weights.pt'" in e.value and "corrupt" in e.value for e in at.error)

    # a checkpoint that does not fit the architecture (demo weights into a CIFAR ResNet-20)
    demo = asset_path("digits_resnet.safetensors").read_bytes()
    at.selectbox(key="md_ckpt_arch").set_value("cifar_resnet20")
    at.file_uploader(key="md_ckpt_file").set_value(("demo.safetensors", demo, "application/octet-stream"))
    load(at)
    assert any("does not fit cifar_resnet20" in e.value for e in at.error)
    assert at.session_state["active"].model_key == before

    # an archive that tries to escape its folder
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../manifest.json", "{}")
    at.radio(key="md_source").set_value("archive")
    at.run()
    at.file_uploader(key="md_archive_file").set_value(("evil.zip", buf.getvalue(), "application/zip"))
    load(at)
    assert any("outside the archive" in e.value for e in at.error)

    # the right checkpoint for the right architecture loads, and the pages still work
    at.radio(key="md_source").set_value("checkpoint")
    at.run()
    at.selectbox(key="md_ckpt_arch").set_value("digits_resnet")
    at.file_uploader(key="md_ckpt_file").set_value(("demo.safetensors", demo, "application/octet-stream"))
    load(at)
    assert_clean(at, "good checkpoint")
    assert at.session_state["active"].model_label == "digits_resnet + demo.safetensors"
    page(at, "heatmap")
    assert_clean(at, "heatmap after errors")
    assert len(at.get("plotly_chart")) == 2


def test_prune_can_be_cancelled_and_keeps_what_finished() -> None:
    at = start_app()
    page(at, "prune")
    at.segmented_control(key="pr_mode").set_value("manual")
    at.run()
    at.multiselect(key="pr_chosen").set_value(["layer3.2"])
    at.segmented_control(key="pr_recovery").set_value("custom")
    at.run()
    at.number_input(key="pr_recovery_images").set_value(50_000_000)
    at.number_input(key="pr_eval_samples").set_value(32)
    at.button(key="pr_run").click()
    at.run(timeout=TIMEOUT)
    job = at.session_state["_job"]
    deadline = time.perf_counter() + TIMEOUT
    while "training" not in job.message and job.running and time.perf_counter() < deadline:
        time.sleep(0.1)  # cancel once the block is gone and the recovery is training
    assert job.running, job.status
    at.run(timeout=TIMEOUT)
    at.button(key="cancel_prune").click()
    at.run(timeout=TIMEOUT)
    assert job.token.cancelled
    settle(at)
    assert_clean(at, "cancelled prune")
    runs = at.session_state["runs"]
    assert len(runs) == 1 and runs[0]["label"].endswith("(cancelled)")
    assert runs[0]["record"]["removed"] == ["layer3.2"]
    assert any("Cancelled" in w.value for w in at.warning)


def test_cli_and_dashboard_give_the_same_record(tmp_path: Path) -> None:
    """Issue 12: the same request (digits demo, 64 calibration images, ≥ 20 % fewer MACs, a 1,500-image
    recovery, 100 test images, seed 0) gives the same record from the Prune page and from `cka-prune prune`:
    same blocks, scores, accuracies, recovery record and images seen (wall-clock fields aside)."""
    at = start_app()
    at.session_state["device_choice"] = "cpu"
    at.number_input(key="md_n_calib").set_value(64)
    load(at)
    page(at, "prune")
    prune_settings(at, macs=20, recovery=1500, eval_samples=100)
    at.button(key="pr_run").click()
    settle(at)
    assert_clean(at, "prune run")
    dashboard = at.session_state["runs"][0]["record"]

    out = tmp_path / "cli"
    code = main(["prune", "--model", "digits_resnet", "--weights", "demo", "--data", "digits", "--device", "cpu",
                 "--samples", "64", "--target-macs-reduction", "20%", "--recovery", "1500", "--eval-samples", "100",
                 "--out", str(out), "--quiet"])
    assert code == 0
    cli = json.loads((out / "report.json").read_text())
    assert cli["request"] == dashboard["request"]
    assert cli["images_seen"] > 0 and cli["recovery"]["history"] is not None
    assert records_equal(cli, dashboard), (cli, dashboard)


def test_prune_page_offers_the_capacity_aware_plan_and_warns_about_long_on_the_cpu() -> None:
    """The Prune page: ``cka_capacity`` is a criterion with its reason beside the preview, and ``long`` on the CPU
    is announced with its estimate in hours."""
    at = start_app()
    page(at, "prune")
    at.slider(key="pr_macs").set_value(30)
    at.selectbox(key="pr_criterion").set_value("cka_capacity")
    settle(at)
    assert_clean(at, "cka_capacity preview")
    assert any("cka_capacity plans for the network after recovery" in i.value for i in at.info), \
        [i.value for i in at.info]
    at.segmented_control(key="pr_recovery").set_value("long")
    settle(at)
    assert_clean(at, "long recovery")
    assert any("`long` draws 2,500,000 training images" in w.value and "h on this CPU" in w.value
               for w in at.warning), [w.value for w in at.warning]


def test_a_cancelled_prune_goes_on_from_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Cancelled during recovery (after a checkpoint), the same settings show the step it stopped at and the time
    left, and **Prune** goes on from there: the new run's recovery says where it resumed and the folder is gone."""
    monkeypatch.setenv("CKA_PRUNE_CACHE", str(tmp_path))
    at = start_app()
    at.session_state["device_choice"] = "cpu"
    page(at, "prune")
    prune_settings(at, macs=20, recovery=12_000, eval_samples=32)
    at.button(key="pr_run").click()
    at.run(timeout=TIMEOUT)
    job = at.session_state["_job"]
    runs_dir, folder = tmp_path / "cka-prune" / "dashboard-runs", None
    deadline = time.perf_counter() + TIMEOUT
    while job.running and time.perf_counter() < deadline:
        folder = next(iter(runs_dir.glob("*")), None) if runs_dir.is_dir() else None
        if folder is not None and (folder / "recovery.pt").exists():
            job.token.cancel()  # as the Cancel button does, at once: the run must not finish first
            break
        time.sleep(0.01)
    assert job.token.cancelled and folder is not None, job.status
    settle(at)
    assert_clean(at, "cancelled prune")
    step = torch.load(folder / "recovery.pt", weights_only=True)["step"]
    assert step > 0 and len(at.session_state["runs"]) == 1
    assert any(f"stopped at recovery step {step:,} of" in i.value and "left" in i.value for i in at.info), \
        [i.value for i in at.info]
    copy = tmp_path / "kept"  # the folder as the cancel left it, to go on from after trying "Start afresh"
    shutil.copytree(folder, copy)
    at.button(key="pr_discard_resume").click()
    settle(at)
    assert not folder.exists() and not any("stopped at recovery step" in i.value for i in at.info)
    shutil.copytree(copy, folder)
    at.run(timeout=TIMEOUT)
    at.button(key="pr_run").click()
    settle(at)
    assert_clean(at, "resumed prune")
    runs = at.session_state["runs"]
    assert len(runs) == 2 and not runs[1]["record"]["cancelled"]
    assert runs[1]["record"]["recovery"]["resumed_step"] == step
    assert runs[1]["record"]["removed"] == runs[0]["record"]["removed"]
    assert not folder.exists()
