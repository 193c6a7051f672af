"""The recovery benchmark's report (pure functions: rows in, markdown lines out): targets judged against the base,
recipes told apart, seeds summarised only over rows of the same recipe."""

from __future__ import annotations

from typing import Any

from benchmarks.recovery_report import bn_scoring_section, readme_table, seeds_summary, targets


def row(criterion: str, acc: float, recovery: str = "standard", seed: int = 0, target: str = "macs:50%",
        **extra: Any) -> dict[str, Any]:
    budget = {"quick": 25_000, "standard": 250_000}[recovery]
    return {"id": f"{criterion}-{recovery}-{seed}-{extra.get('mimic', 'stages')}", "arch": "resnet56",
            "criterion": criterion, "target": target, "recovery": recovery, "seed": seed, "iterative": False,
            "acc": acc, "base_acc": 89.5, "budget": budget, "images_seen": budget - 16, "macs_reduction": 0.526,
            "seconds": 60.0, **extra}


def test_targets_take_the_best_row_and_judge_the_gap() -> None:
    lines = targets([row("cka", 88.0, "quick"), row("cka", 87.0, "quick", mimic="blocks"), row("cka", 89.1)])
    quick, standard, deep = lines[2:]
    assert "88.00 %" in quick and "| 1.50 |" in quick and quick.endswith("yes |")
    assert "89.10 %" in standard and standard.endswith("yes |")
    assert "not run yet" in deep


def test_block_mimicking_rows_are_labelled_and_kept_apart_from_the_seed_spread() -> None:
    rows = [row("random", 88.4, seed=0), row("random", 88.6, seed=1), row("random", 89.9, mimic="blocks"),
            row("cka", 89.0, mimic="blocks", recipe={"mimic": "blocks"})]
    summary = seeds_summary(rows)
    assert summary[0].startswith("Random blocks, 2 seeds: 88.50 ± 0.14 %")  # the blocks row is another recipe
    assert "random (block mimicking): 89.90 %." in summary and "cka (block mimicking): 89.00 %." in summary
    assert len(readme_table(rows, "blocks")) == 2 + 2 and len(readme_table(rows, "stages")) == 2 + 2
    assert readme_table(rows, "cosine") == ["(no row finished yet)"]
    decaying = row("cka", 89.2, mimic="blocks", recipe={"mimic": "blocks", "feature_schedule": "cosine"})
    assert "89.20" in readme_table([*rows, decaying])[-1]  # the default recipe's table


def test_bn_scoring_section_says_what_changed() -> None:
    bn = {"calibration_images": 500, "bn_images": 2048, "kendall_tau": 0.4, "target": "macs:50%",
          "chosen": {"plain": ["a", "b"], "bn": ["a", "c"]}, "common": ["a"], "acc_bn_only": {"plain": 60.0,
                                                                                            "bn": 55.0},
          "test_images": 10_000}
    text = "\n".join(bn_scoring_section(bn))
    assert "**0.40**" in text and "1 of them the same" in text and "only: b" in text and "only: c" in text
    assert "does not pick better blocks" in text
    assert bn_scoring_section(None) == []
