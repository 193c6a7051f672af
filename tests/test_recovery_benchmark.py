"""The recovery benchmark's row bookkeeping (no training): the tuning winner, its test rows, and the guard that
keeps trial runs out of the committed results."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import recovery as bench


def tune(name: str, target: str, acc: float) -> dict[str, Any]:
    return {"id": f"tune-{name}-{target}", "tune_recipe": name, "target": target, "val_acc": acc}


def test_the_winner_has_the_best_mean_over_both_targets_among_complete_recipes() -> None:
    rows = [tune("cosine", "macs:50%", 94.4), tune("cosine", "macs:75%", 88.2),
            tune("cosine-lr0.02", "macs:50%", 94.0), tune("cosine-lr0.02", "macs:75%", 88.8),  # mean 91.4 > 91.3
            tune("cosine-t2", "macs:50%", 99.0)]  # one target only: not a candidate yet
    assert bench.winning_recipe(rows) == "cosine-lr0.02"
    assert bench.winning_recipe(rows[:1]) is None and bench.winning_recipe([]) is None


def test_every_tune_row_is_a_known_recipe_at_both_targets_with_the_recipe_it_names() -> None:
    recipes = [r for r in bench.TUNE_ROWS if "criterion" not in r]  # the others: other criteria's blocks
    assert len(recipes) == len(bench.TUNE_VARIANTS) * len(bench.TUNE_TARGETS)
    assert len({r["id"] for r in bench.TUNE_ROWS}) == len(bench.TUNE_ROWS)
    for r in recipes:
        changes = bench.TUNE_VARIANTS[r["tune_recipe"]]
        assert r["recipe"] == {**bench.RECIPES["cosine"], **changes} and r["recovery"] == "standard"


def test_the_winners_test_rows_join_the_report_once_it_is_known(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [tune("cosine-lr0.05", "macs:50%", 95.0), tune("cosine-lr0.05", "macs:75%", 90.0)]
    monkeypatch.setattr(bench, "load_results", lambda: {"rows": rows})
    ids = {r["id"]: r for r in bench._report_rows()}
    row = ids["resnet56-cka-macs75-standard-cosine-lr0.05-s0"]
    assert row["recipe"]["lr"] == 0.05 and row["recipe_name"] == "cosine-lr0.05"
    monkeypatch.setattr(bench, "load_results", lambda: {"rows": []})
    assert not any("lr0.05" in i for i in (r["id"] for r in bench._report_rows()))


def test_a_trial_budget_needs_a_results_folder_of_its_own(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CKA_BENCH_RESULTS", raising=False)
    with pytest.raises(SystemExit):
        bench.main(["--budget", "512", "--rows", "tune-cosine-macs50-standard"])
    assert "CKA_BENCH_RESULTS" in capsys.readouterr().err


@pytest.mark.parametrize("row_id", ["methods-kd-quick-bf16", "recipe-feature-lr0.01-bs64-a0.5-blocks-fw10-cosine",
                                    "tune-cosine-lr0.02-macs75-standard", "tune-cosine-block_influence-macs75-standard"])
def test_validation_rows_are_requests_on_the_validation_split(row_id: str) -> None:
    """The methods/recipe/tune rows are PruneRequests (run by run_prune, as the CLI runs them): accuracies on the
    library's validation split, 500 calibration images, the row's recipe, criterion and target."""
    spec = next(r for r in bench.METHOD_ROWS + bench.RECIPE_ROWS + bench.TUNE_ROWS if r["id"] == row_id)
    request = bench.method_request(spec, "cpu")
    assert request.eval_split == "validation" and request.calibration_samples == 500 and request.seed == 0
    assert request.recovery.method == spec["method"] and request.recovery.amp == spec["amp"]
    assert all(getattr(request.recovery, k) == v for k, v in spec.get("recipe", {}).items())
    assert request.criterion == spec.get("criterion", "cka")
    assert request.target.value == float(spec.get("target", "macs:50%").split(":")[1].rstrip("%")) / 100


@pytest.mark.slow
@pytest.mark.data
def test_a_validation_row_runs_end_to_end(shared_data, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CKA_BENCH_RESULTS", str(tmp_path))
    spec = {**bench.METHOD_ROWS[0], "recovery": "2100"}  # bn: batch-norm re-estimation on 2,048 images
    row = bench.run_method_row(spec, "cpu")
    assert row["code_path"] == "run_prune" and row["validation_images"] == 5_000
    assert row["images_seen"] == 2_048 and row["val_acc"] > row["val_acc_removed"]
    assert 0.5 < row["macs_reduction"] < 0.55


def test_rows_to_run_skips_finished_and_claimed_rows_and_stops_at_until() -> None:
    """The row loop both benchmarks share: finished rows are re-read before each row (another process may have
    finished one meanwhile), rows another process claimed are skipped, --budget replaces each row's recovery,
    and no row starts after --until."""
    import time

    from benchmarks.common import rows_to_run

    todo = [{"id": i, "recovery": "standard"} for i in "abcd"]
    done: set[str] = {"a"}

    def finished() -> set[str]:
        return set(done)

    ran = []
    for spec in rows_to_run(todo, finished, lambda i: i != "c", budget=500):
        ran.append(spec)
        done.add("d")  # another process finishes d while this one runs b
    assert [s["id"] for s in ran] == ["b"] and ran[0]["recovery"] == "500"
    assert list(rows_to_run(todo, lambda: set(), lambda i: True, until=time.time() - 1)) == []


def test_the_row_log_says_the_time_left_at_the_pace_since_the_phase_began(monkeypatch) -> None:
    """A recovery resumed at step 500 of 1,000 that does 100 steps in 60 s has 4 min left (not the 40 s that
    pacing from step 0 would say); a new phase (another total) is paced afresh; a phase without a total, none."""
    now, lines = [0.0], []
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(bench, "log", lines.append)
    report = bench._progress("row")
    report(0, None, "re-estimating batch-norm statistics")
    report(500, 1000, "training: resumed at step 500/1000")
    now[0] = 60.0
    report(600, 1000, "training: step 600/1000")
    assert lines[-1] == "row: training: step 600/1000 (about 4 min 00 s left)"
    now[0] = 100.0
    report(10, 20, "evaluating")
    now[0] = 140.0
    report(15, 20, "evaluating")
    assert lines[-1] == "row: evaluating (about 40 s left)"
