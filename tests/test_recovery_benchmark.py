"""The recovery benchmark's row bookkeeping (no training): the tuning winner, its test rows, and the guard that
keeps trial runs out of the committed results."""

from __future__ import annotations

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
