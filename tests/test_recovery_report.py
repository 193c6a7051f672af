"""The recovery benchmark's report (pure functions: rows in, markdown lines out): targets judged against the base,
recipes told apart, seeds summarised only over rows of the same recipe."""

from __future__ import annotations

from typing import Any

from benchmarks.recovery_report import (
    bn_scoring_section,
    choice_at,
    readme_table,
    removed_sets_table,
    seeds_summary,
    targets,
    tune_table,
)


def row(criterion: str, acc: float, recovery: str = "standard", seed: int = 0, target: str = "macs:50%",
        **extra: Any) -> dict[str, Any]:
    budget = {"quick": 25_000, "standard": 250_000}[recovery]
    return {"id": f"{criterion}-{recovery}-{seed}-{extra.get('mimic', 'stages')}", "arch": "resnet56",
            "criterion": criterion, "target": target, "recovery": recovery, "seed": seed, "iterative": False,
            "acc": acc, "base_acc": 89.5, "budget": budget, "images_seen": budget - 16, "macs_reduction": 0.526,
            "seconds": 60.0, **extra}


COSINE = {"mimic": "blocks", "feature_schedule": "cosine"}


def test_targets_judge_the_default_recipe_over_its_seeds_and_show_the_best_row_beside_it() -> None:
    lines = targets([row("cka", 88.0, "quick", mimic="blocks", recipe=COSINE), row("cka", 87.0, "quick"),
                     row("cka", 89.1, recipe=COSINE), row("cka", 88.9, seed=1, recipe=COSINE),
                     row("cka", 89.3, recipe_name="cosine-lr0.05", recipe={**COSINE, "lr": 0.05}),
                     row("cka", 87.0, target="macs:75%")])
    quick, standard, deep = lines[2:]
    assert "| 88.00 % (1 seed) | 1.50 | yes |" in quick
    # judged on the mean of the default's seeds (89.0: 0.5 below), the better variation only shown beside it
    assert "| 89.00 ± 0.14 % (2 seeds) | 0.50 | yes |" in standard and "lr 0.05], seed 0: 89.30 %" in standard
    assert "| not run yet |" in deep and "87.00 %" in deep  # no default row there, the other recipe's row shown
    assert targets([])[2].startswith("| resnet56 50% fewer MACs, quick") and "not run yet" in targets([])[2]


def test_tune_table_ranks_recipes_by_their_mean_over_both_targets_and_names_what_changed() -> None:
    def tune(name: str, target: str, acc: float, **changes: Any) -> dict[str, Any]:
        recipe = {"lr": 0.01, "batch_size": 64, "kd_alpha": 0.5, **changes}
        return {"id": f"tune-{name}-{target}", "tune_recipe": name, "target": target, "val_acc": acc,
                "recipe": recipe, "seconds": 120.0, "images_seen": 249_984, "validation_images": 5000,
                "val_base_acc": 97.0, "env": {"gpu": "some GPU"}}

    table = tune_table([tune("cosine", "macs:50%", 94.4), tune("cosine", "macs:75%", 88.2),
                        tune("cosine-lr0.05", "macs:50%", 94.5, lr=0.05), tune("cosine-lr0.05", "macs:75%", 88.4,
                                                                                 lr=0.05),
                        tune("cosine-t2", "macs:50%", 99.0)])  # one target only: ranked last
    assert table[2].startswith("| cosine-lr0.05 | lr 0.05 | 94.50 | 88.40 | 91.45 |")
    assert table[3].startswith("| cosine (default) | – | 94.40 | 88.20 | 91.30 |")
    assert table[4].startswith("| cosine-t2 | – | 99.00 | – | – |") and "some GPU" in table[-1]
    assert tune_table([]) == []


def test_seeds_summary_gives_the_default_recipes_spread_per_target() -> None:
    rows = [row("cka", 88.8, recipe=COSINE), row("cka", 88.6, seed=1, recipe=COSINE),
            row("cka", 86.0, target="macs:75%", recipe=COSINE), row("cka", 86.4, seed=1, target="macs:75%",
                                                                     recipe=COSINE)]
    summary = seeds_summary(rows)
    assert "CKA with the default recipe at −50%, `standard`: 88.70 ± 0.14 % (2 seeds)." in summary
    assert "CKA with the default recipe at −75%, `standard`: 86.20 ± 0.28 % (2 seeds)." in summary


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


def test_choice_at_compares_the_criteria_per_budget_with_the_default_recipe_only() -> None:
    def at75(criterion: str, acc: float, recovery: str = "standard", seed: int = 0, **extra: Any) -> dict[str, Any]:
        return row(criterion, acc, recovery, seed, target="macs:75%", acc_removed=14.0 if criterion == "cka" else 10.0,
                   **({"recipe": COSINE} | extra))

    rows = [at75("cka", 86.2), at75("random", 85.0), at75("random", 85.4, seed=1),
            at75("random", 99.0, recipe={"mimic": "stages"}),  # another recipe: left out
            at75("cka", 80.0, "quick")]  # no random row at quick: no line
    lines = choice_at(rows)
    assert lines == ["At −75%, `standard`: cka 86.20 % (1 seed) (right after removal 14.00 %); random 85.20 ± 0.28 % "
                     "(2 seeds) (right after removal 10.00 %)."]
    assert choice_at(rows, "macs:50%") == []


def test_removed_sets_table_shows_the_blocks_kept_per_stage_and_the_parameters_best_first() -> None:
    removed = [f"layer1.{i}" for i in range(9)] + [f"layer2.{i}" for i in range(1, 9)] + ["layer3.1", "layer3.2"]
    deep = row("random", 87.5, seed=1, target="macs:75%", recipe=COSINE, removed=removed, params_reduction=0.48)
    early = row("cka", 86.2, target="macs:75%", recipe=COSINE, params_reduction=0.73,
                removed=[f"layer1.{i}" for i in (0, 2, 3, 4, 5, 8)] + [f"layer2.{i}" for i in range(1, 9)]
                + [f"layer3.{i}" for i in range(1, 7)])
    other_recipe = row("cka", 99.0, target="macs:75%", removed=removed, params_reduction=0.5)
    table = removed_sets_table([early, deep, other_recipe])
    assert table[2] == "| random | 1 | layer1: –; layer2: –; layer3: 3 4 5 6 7 8 | 52 % | 87.50 |"
    assert table[3] == "| cka | 0 | layer1: 1 6 7; layer2: –; layer3: 7 8 | 27 % | 86.20 |"
    assert len(table) == 4 and removed_sets_table([]) == []
