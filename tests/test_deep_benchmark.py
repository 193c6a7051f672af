"""benchmarks/deep.py: the plain-words findings follow the rows (targets, random's noise)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import deep

ROOT = Path(__file__).resolve().parents[1]


def row(criterion: str, acc: float, *, split: str = "test", target: str = "macs:75%", recovery: str = "long",
        seed: int = 0, base: float = 89.51) -> dict[str, Any]:
    return {"criterion": criterion, "iterative": False, "acc": acc, "base_acc": base, "split": split,
            "target": target, "recovery": recovery, "seed": seed, "macs_reduction": 0.752, "params_reduction": 0.48,
            "images_seen": 249_984, "seconds": 600.0, "device": "cpu (1 threads)"}


def test_the_target_is_judged_on_the_best_plan_of_its_group() -> None:
    met = deep.findings_lines([row("cka", 88.0), row("cka_capacity", 89.2)])
    assert len(met) == 1 and "Target (at most 0.5 pp below the base): met — best cka_capacity at −0.31 pp" in met[0]
    missed = deep.findings_lines([row("cka", 88.0, recovery="standard")])
    assert "Target (at most 1.5 pp below the base): not met" in missed[0]
    above = deep.findings_lines([row("cka", 89.4, target="macs:50%")])
    assert "at or above the base): not met" in above[0]
    assert "Target" not in deep.findings_lines([row("cka", 80.0, split="validation")])[0]  # validation chooses


def test_a_plan_beats_random_only_beyond_random_noise_when_the_draws_spread_wide() -> None:
    """Three draws a point apart: two of their standard deviations (2 points) is the bar, above the standard
    error of the difference of the means."""
    rand = [row("random", a, seed=s) for s, a in enumerate((86.0, 87.0, 88.0))]  # mean 87, sd 1
    lines = deep.findings_lines([*rand, row("cka", 88.9), row("block_influence", 89.1)])
    assert "random 87.00 ± 1.00 % (3 seeds)" in lines[0]
    assert "beyond random's noise: block_influence." in lines[0]
    none = deep.findings_lines([*rand, row("cka", 88.9)])
    assert "no plan beats random by more than its noise." in none[0]


def test_two_random_draws_that_land_close_do_not_make_every_plan_a_winner() -> None:
    """Random's spread from two draws 0.08 apart is smaller than one accuracy's own noise on 10,000 images (about
    0.3 points): a plan beats random only beyond two standard errors of the difference too (0.76 points here)."""
    rand = [row("random", 88.90, seed=1, target="macs:50%"), row("random", 89.02, seed=2, target="macs:50%")]
    assert deep.random_noise([89.69], [88.90, 89.02], 10_000) == pytest.approx(0.76, abs=0.01)
    close = deep.findings_lines([*rand, row("cka_capacity", 89.69, target="macs:50%")])[0]
    assert "random 88.96 ± 0.08 % (2 seeds); no plan beats random by more than its noise (two draws" in close
    clear = deep.findings_lines([*rand, row("cka_capacity", 89.80, target="macs:50%")])[0]
    assert "beyond random's noise: cka_capacity (two draws" in clear
    # seeds of a plan average its noise down: two runs at 89.69 clear the bar that one did not
    assert deep.random_noise([89.69, 89.69], [88.90, 89.02], 10_000) < 0.73


def test_how_closely_top1_follows_the_weights_kept_is_measured_per_group() -> None:
    """Spearman's ρ on ranks (ties share their mean rank) and the least-squares slope per 10 points kept; said
    only with five rows or more and at least three distinct shares kept."""
    def kept(share: float, acc: float, seed: int = 0) -> dict[str, Any]:
        return {**row("random", acc, seed=seed), "params_reduction": 1 - share}

    rising = [kept(s, 86.0 + 5 * s, seed=i) for i, s in enumerate((0.2, 0.4, 0.6, 0.8, 1.0))]
    rho, slope, n = deep.weights_kept_correlation(rising)
    assert rho == pytest.approx(1.0) and slope == pytest.approx(0.5) and n == 5
    # the order reversed at one end: one swapped pair of five ranks, ρ = 1 − 6·2 / (5·24) = 0.9
    swapped = [*rising[:3], kept(0.8, 90.5, 3), kept(1.0, 89.9, 4)]
    assert deep.weights_kept_correlation(swapped)[0] == pytest.approx(0.9)
    # two rows keeping the same weights with the same accuracy share one rank: ρ from mean ranks, not 1
    tied = [kept(0.2, 87.0), kept(0.2, 87.0, 1), kept(0.5, 86.0, 2), kept(0.8, 88.0, 3), kept(0.8, 89.0, 4)]
    assert deep.weights_kept_correlation(tied)[0] == pytest.approx(0.6489, abs=1e-4)  # as scipy.stats.spearmanr gives
    assert deep.weights_kept_correlation(rising[:4]) is None  # too few rows
    assert deep.weights_kept_correlation([kept(0.5, 86.0 + i, i) for i in range(5)]) is None  # one share kept
    assert "Spearman ρ +1.00, +0.50 pp per 10 points of weights kept" in deep.findings_lines(rising)[0]
    assert "Spearman" not in deep.findings_lines(rising[:4])[0]


def test_groups_are_split_by_split_target_and_recovery_and_recipe_rows_left_out() -> None:
    rows = [row("cka", 88.0), row("cka", 90.0, split="validation", base=96.98), row("cka", 87.0, recovery="standard"),
            {**row("cka", 50.0), "recipe_name": "bs512-lr0.08"}]
    lines = deep.findings_lines(rows)
    assert len(lines) == 3 and lines[0].startswith("- **validation")
    assert not any("50.00" in line for line in lines)


def _merge(tmp_path: Path, incoming: list[dict[str, Any]], *, dry: bool) -> subprocess.CompletedProcess:
    came_back = tmp_path / "files_at"
    (came_back / "results").mkdir(parents=True)
    (came_back / "results" / "deep.json").write_text(json.dumps({"rows": incoming}))
    if dry:
        (came_back / "DRY_RUN").write_text("rows on a budget of 320 images")
    env = {**os.environ, "CKA_BENCH_RESULTS": str(tmp_path / "results"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "merge", str(came_back)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_gpu_session_merge_adds_the_rows_that_came_back_and_refuses_a_dry_run(tmp_path: Path) -> None:
    ours = {**row("cka", 88.0), "id": "a", "params_reduction": 0.7, "images_seen": 1, "seconds": 60, "device": "x"}
    theirs = {**ours, "id": "b", "criterion": "cka_capacity", "acc": 89.0}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "deep.json").write_text(json.dumps({"rows": [ours]}))
    refused = _merge(tmp_path, [ours, theirs], dry=True)
    assert refused.returncode == 2 and "dry run" in refused.stderr
    assert [r["id"] for r in json.loads((tmp_path / "results" / "deep.json").read_text())["rows"]] == ["a"]
    shutil.rmtree(tmp_path / "files_at")
    merged = _merge(tmp_path, [ours, theirs], dry=False)
    assert merged.returncode == 0, merged.stderr
    assert [r["id"] for r in json.loads((tmp_path / "results" / "deep.json").read_text())["rows"]] == ["a", "b"]
    assert "cka_capacity 89.00 %" in (tmp_path / "results" / "deep.md").read_text()


def test_recipe_rows_are_judged_against_the_default_recipe_of_the_same_plan() -> None:
    default = row("cka_capacity", 91.22, split="validation", recovery="standard", base=96.98)
    tuned = [{**default, "recipe_name": name, "acc": acc}
             for name, acc in (("lr0.03", 91.50), ("mimic-stages", 92.90))]
    lines = deep.recipe_findings_lines([default, row("cka", 88.0, split="validation", recovery="standard"), *tuned])
    assert len(lines) == 1
    assert "mimic-stages 92.90 %, lr0.03 91.50 %; the default 91.22 %" in lines[0]
    assert "mimic-stages leads it by 1.68 pp, more than two standard errors (1.08)" in lines[0]
    close = deep.recipe_findings_lines([default, tuned[0]])
    assert "No variation leads it by more than two standard errors" in close[0] and "+0.28 pp" in close[0]
    assert "worse" not in close[0]
    worse = deep.recipe_findings_lines([default, {**default, "recipe_name": "stages", "acc": 89.34}])
    assert "worse than it by more than two standard errors: stages (−1.88 pp)" in worse[0]
    assert "missing" in deep.recipe_findings_lines(tuned)[0]
    assert deep.recipe_findings_lines([default]) == []


def test_every_recipe_row_parses_into_a_recovery_config() -> None:
    from cka_analysis.recovery import RecoveryConfig

    for spec in deep.DEEP_RECIPE_ROWS + deep.LONG_RECIPE_ROWS:
        config = RecoveryConfig.parse(spec["recovery"], **spec["recipe"])
        assert all(getattr(config, k) == v for k, v in spec["recipe"].items())
    assert len(deep.ROWS) == sum(len(rows) for rows in deep.STAGES.values())  # ids unique


def test_a_reference_network_is_compared_with_the_pruned_rows_that_cost_no_more_macs() -> None:
    ref = {"id": "r", "reference": "cifar_resnet20", "split": "test", "acc": 87.88, "macs_reduction": 0.677,
           "params_reduction": 0.684}
    rows = [ref, row("cka_capacity", 88.07), row("cka", 87.41), row("cka_capacity", 87.37, recovery="standard"),
            {**row("cka", 89.0, target="macs:50%"), "macs_reduction": 0.526},  # more MACs than the reference
            row("cka", 95.0, split="validation")]
    lines = deep.reference_lines(rows)
    assert len(lines) == 1 and "87.88 % on all 10,000 test images with 67.7 % fewer MACs" in lines[0]
    assert "cka_capacity at −75.2 % after `long` 88.07 % (+0.19 pp)" in lines[0]
    assert "after `standard` 87.37 % (−0.51 pp)" in lines[0]
    assert "89.00" not in lines[0] and "95.00" not in lines[0] and "87.41" not in lines[0]
    assert len(deep.findings_lines(rows)) == 4 and len(deep.table_lines(rows)) == 2 + 5  # the reference row left out


def test_a_plan_with_several_seeds_is_ranked_and_judged_by_its_mean() -> None:
    rows = [row("cka", 88.0), row("cka", 89.0, seed=1), row("cka_capacity", 88.4)]
    line = deep.findings_lines(rows)[0]
    assert line.index("cka 88.50 ± 0.71 % (2 seeds; −1.01 pp)") < line.index("cka_capacity 88.40 %")
    assert "not met — best cka at −1.01 pp" in line


def test_the_shipped_plan_evidence_is_what_the_committed_rows_say() -> None:
    committed = json.loads((ROOT / "benchmarks" / "results" / "deep.json").read_text())["rows"]
    shipped = json.loads(deep.EVIDENCE_FILE.read_text())
    assert shipped == json.loads(json.dumps(deep.plan_evidence(committed))), \
        "run `python -m benchmarks.deep --write` after adding rows"


def test_plan_evidence_and_the_advice_it_feeds() -> None:
    from cka_analysis.choices import deep_reason

    rows = [row("cka", 88.0, split="validation", recovery="standard"),
            row("cka", 89.0, split="validation", recovery="standard", seed=1),
            {**row("cka_capacity", 91.2, split="validation", recovery="standard"), "params_reduction": 0.484},
            *[row("random", a, split="validation", recovery="standard", seed=s) for s, a in enumerate((86., 88.))],
            {**row("cka_capacity", 99.0, split="validation", recovery="standard"), "recipe_name": "fw30"},
            {**row("cka_capacity", 95.0, split="validation", recovery="standard", target="macs:50%"),
             "macs_reduction": 0.526},
            row("cka_capacity", 88.0)]
    ev = deep.plan_evidence(rows)
    assert [(g["split"], g["target"], g["recovery"]) for g in ev["groups"]] == [
        ("test", "macs:75%", "long"), ("validation", "macs:50%", "standard"), ("validation", "macs:75%", "standard")]
    g = ev["groups"][2]
    assert g["plans"]["cka"] == {"acc": 88.5, "seeds": 2, "params_kept": 0.52}
    assert g["plans"]["cka_capacity"]["acc"] == 91.2 and g["random"] == {"acc": 87.0, "seeds": 2,
                                                                          "params_kept": 0.52, "sd": 1.41}
    reason = deep_reason(ev)
    assert "at −75.2 % MACs" in reason and "5,000 held-out training images" in reason
    assert reason.index("cka_capacity recovered to 91.20 % (52 % of the parameters kept)") < \
        reason.index("cka's to 88.50 %")
    assert "random blocks to 87.00 ± 1.41 % (2 seeds)" in reason and "several seeds" in reason
    assert "99.00" not in reason  # recipe rows stay out
    assert reason.endswith("; at −52.6 %: cka_capacity 95.00 %; the mean where a plan ran with several seeds, one "
                           "accuracy ±0.5 points")  # the shallower group in brief, after the deepest
    one_draw = {**g, "random": {"acc": 86.0, "seeds": 1, "params_kept": 0.2, "sd": None}}
    assert "random blocks to 86.00 % (one seed)" in deep_reason({"groups": [one_draw]})  # no spread from one draw
    assert deep_reason({"groups": []}) == "deep cuts: the accuracy after recovery follows the weights kept"


def test_a_resumed_row_says_so_beside_its_wall_time() -> None:
    """A row that went on from a checkpoint names the step (its time before it is in ``seconds``); a row resumed
    before checkpoints carried their time shows its note instead; an uninterrupted row shows the time alone."""
    whole = row("cka", 88.0)
    resumed = {**row("cka", 88.0, seed=1), "resumed_step": 21_800, "resumed_seconds": 3_000.0}
    untimed = {**row("cka", 88.0, seed=2), "resumed_step": 1_700, "resumed_seconds": 0.0}
    older = {**row("cka", 88.0, seed=3), "wall_note": "resumed; the time before it is not in the row"}
    lines = deep.table_lines([whole, resumed, untimed, older])[2:]
    assert lines[0].endswith("| 10.0 min | cpu (1 threads) |")
    assert "| 10.0 min (resumed at step 21,800, the time before it included) |" in lines[1]
    assert "| 10.0 min (resumed at step 1,700, the time before it not recorded) |" in lines[2]
    assert "| 10.0 min (resumed; the time before it is not in the row) |" in lines[3]
    earlier = {k: v for k, v in untimed.items() if k != "resumed_seconds"}  # a row from before that field
    assert "| 10.0 min (resumed at step 1,700) |" in deep.table_lines([earlier])[2]
    moved = {**resumed, "device": "cpu (2 threads)", "devices": [{"from_step": 0, "device": "cpu (1 threads)"},
                                                                 {"from_step": 21_800, "device": "cpu (2 threads)"}]}
    assert deep.table_lines([moved])[2].endswith("| cpu (1 threads) to step 21,800, then cpu (2 threads) |")


def test_the_time_a_long_row_takes_is_read_from_the_rows_that_timed_it_all() -> None:
    """The span quoted beside the rows still to run comes from finished CPU `long` rows, leaving out a row whose
    time before a resume was not recorded, a row with a note instead, a GPU row and the shorter recoveries."""
    timed = [{**row("cka", 88.0), "seconds": 5_040.0}, {**row("bi", 88.0), "seconds": 12_960.0, "resumed_seconds": 9.0}]
    left_out = [{**row("a", 88.0), "seconds": 60.0, "resumed_step": 1_700, "resumed_seconds": 0.0},
                {**row("b", 88.0), "seconds": 60.0, "wall_note": "resumed"},
                {**row("c", 88.0), "seconds": 60.0, "device": "cuda (NVIDIA H200)"},
                {**row("d", 88.0, recovery="standard"), "seconds": 60.0}]
    assert deep.long_hours(timed + left_out) == "1.4–3.6 h"
    assert deep.long_hours(left_out) is None
