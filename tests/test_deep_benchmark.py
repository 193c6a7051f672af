"""benchmarks/deep.py: the plain-words findings follow the rows (targets, random's noise)."""

from __future__ import annotations

from typing import Any

from benchmarks import deep


def row(criterion: str, acc: float, *, split: str = "test", target: str = "macs:75%", recovery: str = "long",
        seed: int = 0, base: float = 89.51) -> dict[str, Any]:
    return {"criterion": criterion, "iterative": False, "acc": acc, "base_acc": base, "split": split,
            "target": target, "recovery": recovery, "seed": seed, "macs_reduction": 0.752}


def test_the_target_is_judged_on_the_best_plan_of_its_group() -> None:
    met = deep.findings_lines([row("cka", 88.0), row("cka_capacity", 89.2)])
    assert len(met) == 1 and "Target (at most 0.5 pp below the base): met — best cka_capacity at −0.31 pp" in met[0]
    missed = deep.findings_lines([row("cka", 88.0, recovery="standard")])
    assert "Target (at most 1.5 pp below the base): not met" in missed[0]
    above = deep.findings_lines([row("cka", 89.4, target="macs:50%")])
    assert "at or above the base): not met" in above[0]
    assert "Target" not in deep.findings_lines([row("cka", 80.0, split="validation")])[0]  # validation chooses


def test_a_plan_beats_random_only_beyond_two_of_its_standard_deviations() -> None:
    rand = [row("random", a, seed=s) for s, a in enumerate((86.0, 87.0, 88.0))]  # mean 87, sd 1
    lines = deep.findings_lines([*rand, row("cka", 88.9), row("block_influence", 89.1)])
    assert "random 87.00 ± 1.00 % (3 seeds)" in lines[0]
    assert "beyond two standard deviations of random: block_influence." in lines[0]
    none = deep.findings_lines([*rand, row("cka", 88.9)])
    assert "no plan beats random by more than two of its standard deviations" in none[0]


def test_groups_are_split_by_split_target_and_recovery_and_recipe_rows_left_out() -> None:
    rows = [row("cka", 88.0), row("cka", 90.0, split="validation", base=96.98), row("cka", 87.0, recovery="standard"),
            {**row("cka", 50.0), "recipe_name": "bs512-lr0.08"}]
    lines = deep.findings_lines(rows)
    assert len(lines) == 3 and lines[0].startswith("- **validation")
    assert not any("50.00" in line for line in lines)
