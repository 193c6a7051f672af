"""One rule, defined once, whatever the front end (issue 21): the request's seed reaches recovery unless the
caller's RecoveryConfig sets its own; "recover further" goes on with the run's own recipe; one calibration default
and one reading of a reduction; the recovery method on the Prune page as on the command line; provenance set
where the model is opened; block surgery (adaptors included) in one module."""

from __future__ import annotations

from pathlib import Path

import pytest
from app_session import TIMEOUT, settle
from streamlit.testing.v1 import AppTest
from torch import nn

from cka_analysis.blocks import remove_blocks, removed_blocks
from cka_analysis.choices import (
    DASHBOARD_CALIBRATION_IMAGES,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_RECOVERY_METHOD,
    RECOVERY_METHODS,
)
from cka_analysis.errors import ConfigError
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.workflow import PruneRequest, further_recovery, recover_further, run_prune

BLOCKS = ("layer1.0", "layer2.1")
APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


def _request(demo: nn.Module, **kw) -> PruneRequest:
    return PruneRequest(model=demo, data="digits", blocks=BLOCKS, latency=False, device="cpu", **kw)


@pytest.mark.parametrize("recovery", ["quick", 1_000, RecoveryConfig(images=1_000),
                                      RecoveryConfig(images=1_000, method="kd")])
def test_the_request_seed_seeds_recovery_given_as_text_or_as_a_config(recovery, demo) -> None:
    assert _request(demo, seed=3, recovery=recovery).recovery.seed == 3
    assert _request(demo, recovery=recovery).recovery.seed == 0


def test_a_seed_set_in_the_config_is_kept(demo) -> None:
    assert _request(demo, seed=3, recovery=RecoveryConfig(images=1_000, seed=1)).recovery.seed == 1
    assert _request(demo, seed=3, recovery=RecoveryConfig(images=1_000, seed=0)).recovery.seed == 0
    with pytest.raises(ConfigError, match="seed"):
        RecoveryConfig(seed=-1)


def test_recovery_runs_with_the_request_seed(demo) -> None:
    """What recover() used is recorded: a config without a seed ran with the request's, and the result
    equals a run whose config names that seed explicitly."""
    cfg = RecoveryConfig(images=400, bn_images=64, batch_size=32)
    implicit = run_prune(_request(demo, seed=2, recovery=cfg)).record
    explicit = run_prune(_request(demo, seed=2, recovery=RecoveryConfig(images=400, bn_images=64, batch_size=32,
                                                                         seed=2))).record
    other = run_prune(_request(demo, seed=2, recovery=RecoveryConfig(images=400, bn_images=64, batch_size=32,
                                                                      seed=0))).record
    assert implicit.recovery.config.seed == 2 and other.recovery.config.seed == 0
    assert implicit.final.accuracy == explicit.final.accuracy
    assert implicit.recovery.history == explicit.recovery.history
    assert implicit.recovery.history != other.recovery.history  # the seed reached the training run


def test_recover_further_goes_on_with_the_runs_recipe(demo) -> None:
    run = run_prune(_request(demo, seed=4, recovery=RecoveryConfig(images=300, method="kd", lr=0.02,
                                                                    bn_images=64, batch_size=32)))
    cfg = further_recovery(run.record, "1000")
    assert (cfg.images, cfg.method, cfg.lr, cfg.batch_size, cfg.seed) == (1_000, "kd", 0.02, 32, 4)
    assert further_recovery(run.record.to_dict(), "quick").name == "quick"
    more = recover_further(run.model, run.record, demo, 500)
    assert more.record.recovery.further[0].method == "kd"
    assert more.record.recovery.further[0].config.seed == 4


@pytest.mark.parametrize("text", ["0.5", "50%", "50", "37.5 %", "0.25"])
def test_a_reduction_reads_the_same_on_the_command_line_and_in_a_target(text) -> None:
    from cka_analysis.cli import _fraction
    from cka_analysis.pruning import Target

    assert Target.parse(f"macs:{text}").value == pytest.approx(_fraction(text))


def test_calibration_default_is_one_constant_and_the_dashboard_says_where_it_differs() -> None:
    """The library and the command line share one default; the dashboard's lower one is stated in its field."""
    from cka_analysis.cli import build_parser

    assert PruneRequest.__dataclass_fields__["calibration_samples"].default == DEFAULT_CALIBRATION_IMAGES
    for command in ("prune", "score"):
        args = [command, "--model", "m", "--data", "digits"] + (["--remove", "1"] if command == "prune" else [])
        assert build_parser().parse_args(args).samples == DEFAULT_CALIBRATION_IMAGES
    # the dashboard's default differs on purpose; the field says so, naming both numbers
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    settle(at)
    field = at.number_input(key="md_n_calib")
    assert field.value == DASHBOARD_CALIBRATION_IMAGES < DEFAULT_CALIBRATION_IMAGES
    assert f"{DASHBOARD_CALIBRATION_IMAGES} by default here" in field.help
    assert f"default to {DEFAULT_CALIBRATION_IMAGES}" in field.help


def test_the_prune_page_offers_the_recovery_method_and_the_request_uses_it() -> None:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["device_choice"] = "cpu"
    settle(at)
    at.button(key="md_load").click()
    settle(at)
    settle(at.switch_page("views/prune.py"))
    method = at.selectbox(key="pr_recovery_method")
    assert method.value == DEFAULT_RECOVERY_METHOD and list(method.options) == list(RECOVERY_METHODS)
    method.set_value("kd")
    at.slider(key="pr_macs").set_value(20)
    at.segmented_control(key="pr_recovery").set_value("custom")
    at.run()
    at.number_input(key="pr_recovery_images").set_value(300)
    settle(at)
    at.button(key="pr_run").click()
    settle(at)
    assert not at.exception
    record = at.session_state["runs"][0]["record"]
    assert record["request"]["recovery"]["method"] == "kd" and record["recovery"]["method"] == "kd"


def test_open_model_records_the_provenance_the_record_keeps(tmp_path) -> None:
    """open_model — not each front end — sets cka_origin, so a library caller's record can be reopened too."""
    from cka_analysis.export import open_model, save_pruned

    model = open_model("digits_resnet", weights="demo")
    assert model.cka_origin == {"model": "digits_resnet", "weights": "demo", "num_classes": None}
    request = PruneRequest(model=model, data="digits", blocks=BLOCKS, recovery="none", latency=False)
    assert request.to_dict()["origin"] == model.cka_origin
    save_pruned(remove_blocks(model, list(BLOCKS)), tmp_path / "pruned")
    again = open_model(tmp_path / "pruned")
    assert again.cka_origin == {"model": str(tmp_path / "pruned"), "weights": None, "num_classes": None}
    assert removed_blocks(open_model(again.cka_origin["model"])) == list(BLOCKS)


def test_adaptors_are_block_surgery_and_export_does_not_need_recovery() -> None:
    import subprocess
    import sys

    from cka_analysis import blocks, recovery

    assert recovery.BlockAdaptor is blocks.BlockAdaptor and recovery.insert_adaptors is blocks.insert_adaptors
    code = "import sys, cka_analysis.export; print('cka_analysis.recovery' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stored_reports_load_as_typed_records_and_write_the_same_json() -> None:
    """report.json keeps its format: the committed CLI runs (older recipes included) load into typed records and
    write back exactly the JSON they were read from."""
    import json

    from cka_analysis.pruning import Target
    from cka_analysis.records import LatencyRecord, RecoveryRecord
    from cka_analysis.workflow import PruneRecord

    reports = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cli_runs")
                     .glob("*.report.json"))
    assert reports
    for path in reports:
        stored = json.loads(path.read_text())
        record = PruneRecord.from_dict(stored)
        assert isinstance(record.target, Target) and isinstance(record.recovery, RecoveryRecord)
        assert isinstance(record.latency_ms, LatencyRecord)
        assert json.loads(json.dumps(record.to_dict())) == stored, path.name
        assert Target.from_dict(stored["target"]) == record.target


def test_a_recovery_record_carries_every_fact_of_the_result_it_was_made_from() -> None:
    """RecoveryResult and RecoveryRecord share one set of fields (RecoveryFacts): every one of them, set to a value
    unlike its default, reaches the record and survives its JSON round trip."""
    from dataclasses import fields

    from cka_analysis.records import RecoveryRecord
    from cka_analysis.recovery import RecoveryFacts, RecoveryResult

    facts = {"images_seen": 640, "bn_images": 128, "adaptor_images": 64, "steps": 10, "seconds": 12.5,
             "accuracy": 81.25, "history": [{"step": 10, "images": 640, "eval_top1": 81.25}],
             "adaptors": ["layer2.1"], "cancelled": True, "amp": "bfloat16", "resumed_step": 4,
             "resumed_seconds": 3.5, "devices": [{"from_step": 0, "device": "cpu (1 threads)"},
                                                 {"from_step": 4, "device": "cuda (NVIDIA H200)"}]}
    assert set(facts) | {"config"} == {f.name for f in fields(RecoveryFacts)}, "a new fact needs a value here"
    result = RecoveryResult(model=nn.Linear(1, 1), config=RecoveryConfig(images=640, seed=3), **facts)
    record = RecoveryRecord.from_result(result)
    assert {k: getattr(record, k) for k in facts} == facts and record.config == result.config
    assert RecoveryRecord.from_dict(record.to_dict()) == record
