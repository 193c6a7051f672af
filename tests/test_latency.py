"""Latency planning on the digits demo: the block-cost cache, the planner's latency target (with injected costs,
so nothing here depends on how fast the machine is), predicted-vs-measured records and runtime timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cka_analysis.blocks import find_blocks, remove_blocks
from cka_analysis.errors import Cancelled, ConfigError, TargetError
from cka_analysis.latency import (
    BlockCosts,
    LatencyCheck,
    TimingOptions,
    check_prediction,
    compare_latency,
    latency_cache_dir,
    measure_block_costs,
    model_fingerprint,
    paired_ratio,
    predict_latency,
    time_runtimes,
)
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.progress import CancelToken
from cka_analysis.pruning import Target, plan

FAST = TimingOptions(warmup=0, repeats=2)
QUICK = {"device": "cpu", "options": FAST}


def _costs(block_ms: dict[str, float], base_ms: float = 10.0, **kw) -> BlockCosts:
    """Hand-made costs (what a measurement would return) for planner tests that must not depend on timing."""
    fields = {"arch": "digits_resnet", "fingerprint": "f", "removed": [], "device": "cpu: test", "batch_size": 1,
              "dtype": "float32", "threads": 1, "method": "blocks", "quantile": 0.5, "base_ms": base_ms, "base_p10_ms": base_ms,
              "base_p90_ms": base_ms, "floor_ms": 1.0, "block_ms": block_ms, "scale": 1.0, "warmup": 0, "repeats": 1, "seconds": 0.0,
              "created": "2026-01-01T00:00:00+00:00"}
    return BlockCosts(**{**fields, **kw})


# ---------------------------------------------------------------------------------------------------------------
# The cost cache
# ---------------------------------------------------------------------------------------------------------------


def test_costs_cover_removable_blocks_and_are_measured_once(demo, tmp_path):
    first = measure_block_costs(demo, cache_dir=tmp_path, **QUICK)
    removable = [b.name for b in find_blocks(demo, count_macs=False) if b.removable]
    assert sorted(first.block_ms) == sorted(removable)
    assert not first.from_cache
    assert first.base_ms > 0 and all(v > 0 for v in first.block_ms.values())
    assert (first.batch_size, first.dtype, first.threads, first.method) == (1, "float32", 1, "blocks")
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.startswith("digits_resnet-")

    again = measure_block_costs(demo, cache_dir=tmp_path, **QUICK)
    assert again.from_cache
    assert again == first  # the very numbers measured the first time
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_block_costs_add_up_to_the_saving_of_removing_them_all(demo):
    costs = measure_block_costs(demo, cache=False, **QUICK)
    assert costs.floor_ms > 0 and costs.scale > 0
    if costs.base_ms > costs.floor_ms:  # the scaling applies (always, unless the machine stalled the base)
        assert sum(costs.block_ms.values()) == pytest.approx(costs.base_ms - costs.floor_ms)
        assert predict_latency(costs, list(costs.block_ms)) == pytest.approx(costs.floor_ms)
    ablation = measure_block_costs(demo, cache=False, method="ablation", **QUICK)
    assert ablation.scale == 1.0


def test_cache_key_separates_batch_threads_method_and_structure(demo, tmp_path):
    base = measure_block_costs(demo, cache_dir=tmp_path, **QUICK)
    for kw in ({"batch_size": 4}, {"options": TimingOptions(warmup=0, repeats=2, threads=2)}, {"method": "ablation"},
               {"options": TimingOptions(warmup=0, repeats=2, quantile=0.0)}):
        other = measure_block_costs(demo, cache_dir=tmp_path, **{**QUICK, **kw})
        assert not other.from_cache, kw
    assert len(list(tmp_path.glob("*.json"))) == 5
    assert measure_block_costs(demo, cache_dir=tmp_path, batch_size=4, **QUICK).batch_size == 4

    pruned = remove_blocks(demo, ["layer1.0"])
    assert model_fingerprint(pruned) != model_fingerprint(demo)
    costs = measure_block_costs(pruned, cache_dir=tmp_path, **QUICK)
    assert not costs.from_cache and costs.removed == ["layer1.0"] and "layer1.0" not in costs.block_ms

    # other weights, same structure: same latency, so the cached costs are reused
    retrained = remove_blocks(demo, [])
    with torch.no_grad():
        for p in retrained.parameters():
            p.mul_(0.5)
    assert model_fingerprint(retrained) == model_fingerprint(demo)
    assert measure_block_costs(retrained, cache_dir=tmp_path, **QUICK) == base


def test_refresh_remeasures_and_a_corrupt_cache_is_replaced(demo, tmp_path):
    measure_block_costs(demo, cache_dir=tmp_path, **QUICK)
    assert not measure_block_costs(demo, cache_dir=tmp_path, refresh=True, **QUICK).from_cache
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    fresh = measure_block_costs(demo, cache_dir=tmp_path, **QUICK)
    assert not fresh.from_cache
    assert json.loads(path.read_text())["costs"]["base_ms"] == fresh.base_ms
    assert measure_block_costs(demo, cache_dir=tmp_path, **QUICK).from_cache


def test_cache_off_writes_nothing_and_env_var_sets_the_folder(demo, tmp_path, monkeypatch):
    measure_block_costs(demo, cache=False, cache_dir=tmp_path, **QUICK)
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("CKA_PRUNE_LATENCY_CACHE", str(tmp_path / "env"))
    assert latency_cache_dir() == tmp_path / "env"
    measure_block_costs(demo, **QUICK)
    assert len(list((tmp_path / "env").glob("*.json"))) == 1
    assert latency_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_block_costs_round_trip_and_bad_records(demo, tmp_path):
    costs = measure_block_costs(demo, cache_dir=tmp_path, method="ablation", **QUICK)
    d = json.loads(json.dumps(costs.to_dict()))
    assert "from_cache" not in d
    assert BlockCosts.from_dict(d) == costs
    with pytest.raises(ConfigError, match="block_ms"):
        BlockCosts.from_dict({k: v for k, v in d.items() if k != "block_ms"})
    with pytest.raises(ConfigError, match="wrong type"):
        BlockCosts.from_dict({**d, "batch_size": "one"})


@pytest.mark.parametrize(("kw", "match"), [
    ({"batch_size": 0}, "batch_size"),
    ({"method": "profile"}, "method"),
])
def test_bad_arguments_name_themselves(demo, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        measure_block_costs(demo, cache_dir=tmp_path, **{**QUICK, **kw})


@pytest.mark.parametrize(("kw", "match"), [
    ({"repeats": 0}, "repeats"),
    ({"warmup": -1}, "warmup"),
    ({"dtype": "int8"}, "dtype"),
    ({"threads": 0}, "threads"),
    ({"quantile": 1.5}, "quantile"),
])
def test_bad_timing_options_name_themselves(kw, match):
    with pytest.raises(ConfigError, match=match):
        TimingOptions(**kw)


def test_progress_is_reported_and_cancel_stops(demo, tmp_path):
    seen = []
    measure_block_costs(demo, cache=False, progress=lambda d, t, m: seen.append((d, t)), **QUICK)
    assert seen == [(1, 2), (2, 2)]
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        measure_block_costs(demo, cache_dir=tmp_path, cancel=token, **QUICK)
    assert not list(tmp_path.glob("*.json"))  # nothing half-measured is cached


# ---------------------------------------------------------------------------------------------------------------
# Prediction and the planner's latency target (injected costs: no timing dependence)
# ---------------------------------------------------------------------------------------------------------------


def test_predict_latency_subtracts_removed_block_costs():
    costs = _costs({"a": 1.0, "b": 2.5, "c": 0.5})
    assert predict_latency(costs, []) == 10.0
    assert predict_latency(costs, ["a", "b"]) == pytest.approx(6.5)
    assert predict_latency(costs, ["b", "b"]) == pytest.approx(7.5)  # a block removed once
    with pytest.raises(ConfigError, match="'z'"):
        predict_latency(costs, ["a", "z"])


def _plan_inputs(model):
    blocks = find_blocks(model)
    removable = [b.name for b in blocks if b.removable]
    size = model.cka_preset.input_size
    return blocks, removable, count_macs(model, size), count_params(model)


def test_latency_target_removes_lowest_scores_until_predicted_drop(demo):
    blocks, removable, macs, params = _plan_inputs(demo)
    scores = {n: float(i) for i, n in enumerate(removable)}  # forward order = removal order
    # stage 1 blocks cost 0.5 ms each, the later ones 2 ms each; the whole model 10 ms
    block_ms = {n: (0.5 if n.startswith("layer1") else 2.0) for n in removable}
    costs = _costs(block_ms)
    p = plan(blocks, scores, Target("latency", 0.3), base_macs=macs, base_params=params,
             block_costs=costs.block_ms, base_latency=costs.base_ms)
    # 3 × 0.5 ms (layer1) = 15 %, then 2 ms more = 35 % ≥ 30 %: four blocks, in score order
    assert p.blocks == removable[:4]
    assert p.latency_reduction == pytest.approx(0.35)
    assert p.latency == pytest.approx(predict_latency(costs, p.blocks))
    # a MACs target of the same size removes another number of blocks: every block has the same MACs here
    by_macs = plan(blocks, scores, Target("macs", 0.3), base_macs=macs, base_params=params)
    assert len(by_macs.blocks) != len(p.blocks)


def test_latency_target_follows_the_costs_not_the_macs(demo):
    blocks, removable, macs, params = _plan_inputs(demo)
    scores = {n: float(i) for i, n in enumerate(removable)}
    cheap_first = {n: (0.1 if i < 3 else 3.0) for i, n in enumerate(removable)}
    dear_first = {n: (3.0 if i < 3 else 0.1) for i, n in enumerate(removable)}
    kw = {"base_macs": macs, "base_params": params, "base_latency": 10.0}
    assert len(plan(blocks, scores, Target("latency", 0.25), block_costs=cheap_first, **kw).blocks) == 4
    assert len(plan(blocks, scores, Target("latency", 0.25), block_costs=dear_first, **kw).blocks) == 1


def test_latency_target_needs_costs_and_must_be_reachable(demo):
    blocks, removable, macs, params = _plan_inputs(demo)
    scores = {n: 0.0 for n in removable}
    with pytest.raises(ConfigError, match="block_costs"):
        plan(blocks, scores, Target("latency", 0.3), base_macs=macs, base_params=params)
    small = {n: 0.1 for n in removable}  # all removable blocks together save 7 % of 10 ms
    with pytest.raises(TargetError, match="latency"):
        plan(blocks, scores, Target("latency", 0.5), base_macs=macs, base_params=params, block_costs=small,
             base_latency=10.0)


def test_target_parses_latency():
    assert Target.parse("latency:40%") == Target("latency", 0.4)
    with pytest.raises(ConfigError, match="latency"):
        Target("latency", 1.5)


# ---------------------------------------------------------------------------------------------------------------
# Measured against predicted; deployed runtimes
# ---------------------------------------------------------------------------------------------------------------


def test_check_prediction_records_predicted_measured_and_error(demo, tmp_path):
    costs = measure_block_costs(demo, cache_dir=tmp_path, **QUICK)
    gone = ["layer1.0", "layer3.2"]
    pruned = remove_blocks(demo, gone)
    check = check_prediction(demo, pruned, costs, device="cpu", warmup=0, repeats=3)
    assert check.predicted_ms == pytest.approx(predict_latency(costs, gone))
    assert check.predicted_reduction == pytest.approx(1 - check.predicted_ms / costs.base_ms)
    # paired per round: close to, not equal to, 1 − pruned / base; its sign is a timing (a loaded machine can
    # make the smaller model slower for 3 repeats), so only the bound that holds for any timing is checked
    assert math.isfinite(check.measured_reduction) and check.measured_reduction < 1
    assert check.relative_error == pytest.approx((1 - check.predicted_reduction) / (1 - check.measured_reduction) - 1)
    assert check.error == pytest.approx(check.measured_reduction - check.predicted_reduction)
    assert (check.batch_size, check.threads, check.dtype, check.repeats, check.quantile) == (1, 1, "float32", 3, 0.5)
    d = json.loads(json.dumps(check.to_dict()))
    assert LatencyCheck.from_dict(d) == check
    with pytest.raises(ConfigError, match="error"):
        LatencyCheck.from_dict({k: v for k, v in d.items() if k != "error"})


def test_compare_latency_leaves_the_models_alone(demo):
    pruned = remove_blocks(demo, ["layer1.1"])
    before = {k: v.clone() for k, v in demo.state_dict().items()}
    t = compare_latency({"base": demo, "pruned": pruned}, device="cpu", batch_size=2,
                        options=TimingOptions(warmup=0, repeats=3))
    assert set(t) == {"base", "pruned"}
    assert all(v.batch_size == 2 and v.repeats == 3 and v.median_ms > 0 for v in t.values())
    assert all(torch.equal(before[k], v) for k, v in demo.state_dict().items())
    with pytest.raises(ConfigError, match="models"):
        compare_latency({}, device="cpu")


def test_runtime_timings_cover_every_model_runtime_and_batch(demo, tmp_path):
    pytest.importorskip("onnxruntime")
    pruned = remove_blocks(demo, ["layer1.1", "layer2.1"])
    rows = time_runtimes({"base": demo, "pruned": pruned}, batch_sizes=(1, 8), device="cpu", reference="base",
                         workdir=tmp_path, options=TimingOptions(threads=1, warmup=1, repeats=2))
    got = {(r.model, r.runtime, r.batch_size) for r in rows}
    assert got == {(m, rt, b) for m in ("base", "pruned") for rt in ("torch", "pt2", "onnxruntime-cpu")
                   for b in (1, 8)}
    assert all(r.median_ms > 0 and r.threads == 1 and r.repeats == 2 for r in rows)
    assert all(r.p10_ms <= r.median_ms <= r.p90_ms and r.quantile == 0.5 for r in rows)
    assert all(r.relative == 1.0 for r in rows if r.model == "base")
    assert all(r.relative is not None and r.relative > 0 for r in rows)
    assert {p.name for p in tmp_path.iterdir()} == {"base.pt2", "base.onnx", "pruned.pt2", "pruned.onnx"}
    with pytest.raises(ConfigError, match="runtimes"):
        time_runtimes({"base": demo}, runtimes=["tensorrt"], device="cpu")
    with pytest.raises(ConfigError, match="reference"):
        time_runtimes({"base": demo}, reference="original", device="cpu")
    with pytest.raises(ConfigError, match="float32"):
        time_runtimes({"base": demo}, device="cpu", options=TimingOptions(dtype="bf16"))


def test_paired_ratio_cancels_what_hits_both_calls_of_a_round():
    # a slow stretch (rounds 3–4: everything 3× slower) moves medians but not the per-round ratio
    base = [10.0, 10.0, 30.0, 30.0, 10.0]
    pruned = [5.0, 5.0, 15.0, 15.0, 5.0]
    assert paired_ratio(pruned, base) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="rounds"):
        paired_ratio([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------------------------
# The report of a pruning run with a latency target
# ---------------------------------------------------------------------------------------------------------------


def test_prune_run_with_latency_target_records_predicted_and_measured(demo, tmp_path, monkeypatch):
    from cka_analysis.workflow import PruneRecord, PruneRequest, run_prune

    monkeypatch.setenv("CKA_PRUNE_LATENCY_CACHE", str(tmp_path))
    request = PruneRequest(demo, data="digits", target="latency:30%", criterion="weight_norm", recovery="none",
                           eval_samples=64, device="cpu")
    outcome = run_prune(request)
    lat = outcome.record.latency_ms
    costs = measure_block_costs(demo, device="cpu")  # what the run measured, from the cache
    assert costs.from_cache
    assert lat.predicted == pytest.approx(predict_latency(costs, outcome.record.removed))
    assert lat.predicted_reduction >= 0.3 - 1e-9
    assert lat.error == pytest.approx(lat.measured_reduction - lat.predicted_reduction)
    # measured: its sign is a timing (a loaded machine can make the smaller model slower), so only the bound that
    # holds for any timing is checked; the prediction is what the run is about
    assert math.isfinite(lat.measured_reduction) and lat.measured_reduction < 1
    assert (lat.batch_size, lat.quantile) == (1, 0.5)
    report = json.loads(json.dumps(outcome.record.to_dict()))
    assert report["target"] == {"kind": "latency", "value": 0.3}
    assert PruneRecord.from_dict(report).latency_ms == lat
    assert "predicted" in outcome.record.summary()


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

DEMO_CLI = ["--model", "digits_resnet", "--weights", "demo", "--data", "digits", "--device", "cpu", "--quiet"]


def test_cli_score_shows_measured_latency_beside_macs(capsys, tmp_path, monkeypatch):
    from cka_analysis.cli import main

    monkeypatch.setenv("CKA_PRUNE_LATENCY_CACHE", str(tmp_path / "cache"))
    assert main(["score", *DEMO_CLI, "--criterion", "weight_norm", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "latency ms" in out and "MACs" in out
    data = json.loads((tmp_path / "s.json").read_text())
    costs = BlockCosts.from_dict(data["latency"])
    assert sorted(costs.block_ms) == sorted(data["scores"]) and costs.batch_size == 1
    assert main(["score", *DEMO_CLI, "--criterion", "weight_norm"]) == 0
    assert "(cached)" in capsys.readouterr().out  # measured once


def test_cli_prune_to_a_latency_target_reports_predicted_and_measured(capsys, tmp_path, monkeypatch):
    from cka_analysis.cli import main

    monkeypatch.setenv("CKA_PRUNE_LATENCY_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pruned"
    assert main(["prune", *DEMO_CLI, "--criterion", "weight_norm", "--target-latency-reduction", "25%",
                 "--recovery", "none", "--eval-samples", "32", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"kind": "latency", "value": 0.25}
    lat = report["latency_ms"]
    assert lat["predicted_reduction"] >= 0.25 - 1e-9
    assert lat["error"] == pytest.approx(lat["measured_reduction"] - lat["predicted_reduction"])
    assert {"base", "pruned", "predicted", "batch_size", "device", "relative_error"} <= set(lat)


# ---------------------------------------------------------------------------------------------------------------
# The dashboard's Prune page
# ---------------------------------------------------------------------------------------------------------------


def test_dashboard_prunes_to_a_latency_target(tmp_path, monkeypatch):
    from pathlib import Path

    from app_session import settle
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CKA_PRUNE_LATENCY_CACHE", str(tmp_path))
    app = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
    at = settle(AppTest.from_file(app, default_timeout=240))
    blocks = at.dataframe[0].value  # Model & data: measured latency beside MACs
    assert blocks["latency ms"].notna().sum() == 7 and blocks["latency ms"].isna().sum() == 2
    settle(at.switch_page("views/prune.py"))
    at.radio(key="pr_target_kind").set_value("latency")
    settle(at)
    at.slider(key="pr_latency").set_value(25)
    at.segmented_control(key="pr_recovery").set_value("none")
    at.number_input(key="pr_eval_samples").set_value(64)
    settle(at)
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    assert any("Predicted batch-1 latency" in c.value for c in at.caption)
    at.button(key="pr_run").click()
    settle(at)
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    (line,) = [m.value for m in at.markdown if m.value.startswith("**Latency**")]
    assert "measured" in line and "predicted" in line and "error" in line
    record = at.session_state["runs"][-1]["record"]
    assert record["target"] == {"kind": "latency", "value": 0.25}
    assert record["latency_ms"]["predicted_reduction"] >= 0.25 - 1e-9


def test_the_suite_keeps_its_latency_cache_private_and_removes_it(tmp_path):
    """A user's CKA_PRUNE_LATENCY_CACHE is neither read nor filled by the tests: the suite's conftest points it at
    a temporary folder for the session and removes that folder at the end."""
    import os
    import subprocess
    import sys

    user = tmp_path / "user-cache"
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\ndef test_probe():\n    print('CACHE=' + os.environ['CKA_PRUNE_LATENCY_CACHE'])\n")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "CKA_PRUNE_LATENCY_CACHE": str(user),
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-s", "-q",
                          str(probe)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    used = Path(next(line for line in out.stdout.splitlines() if "CACHE=" in line).split("CACHE=", 1)[1])
    assert used != user and used.name.startswith("cka-prune-test-latency-")
    assert not used.exists() and not user.exists()
