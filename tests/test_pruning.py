"""Tests for cka_analysis.pruning: targets, the one-shot planner (lowest scores first, stopping as soon as the target
is met), one-shot and iterative pruning of the digits demo with their records, exact MACs/parameter bookkeeping,
and — with the shared data — the adapted ResNet-56 pruned to half its MACs, saved and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cka_analysis.blocks import Block, find_blocks, removed_blocks
from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.errors import ConfigError, TargetError
from cka_analysis.export import load_pruned, save_pruned
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.models import build_model, get_preset
from cka_analysis.progress import CancelToken
from cka_analysis.pruning import PruneResult, Target, plan, prune
from cka_analysis.scoring import Scores, score_blocks
from cka_analysis.training import FinetuneConfig


# -------------------------------------------------------------------------------------------------- Target
@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("3", "blocks", 3),
        ("3 blocks", "blocks", 3),
        ("1 block", "blocks", 1),
        (" 12BLOCKS ", "blocks", 12),
        ("macs:50%", "macs", 0.5),
        ("macs:0.5", "macs", 0.5),
        ("MACs = 37.5 %", "macs", 0.375),
        ("params:40%", "params", 0.4),
        ("params=0.25", "params", 0.25),
    ],
)
def test_target_parse(text: str, kind: str, value: float) -> None:
    t = Target.parse(text)
    assert t.kind == kind
    assert t.value == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not understood"),
        ("flops:50%", "not understood"),
        ("half", "not understood"),
        ("-2", "not understood"),
        ("macs:", "not understood"),
        ("0", "whole number ≥ 1"),
        ("0 blocks", "whole number ≥ 1"),
        ("macs:150%", "MACS reduction must be a fraction between 0 and 1"),
        ("macs:1", "between 0 and 1"),
        ("params:0%", "parameter reduction must be a fraction"),
        ("params:100", "between 0 and 1"),
    ],
)
def test_target_parse_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Target.parse(text)


def test_target_construction_and_met() -> None:
    with pytest.raises(ConfigError, match="target kind 'flops'"):
        Target("flops", 0.5)
    with pytest.raises(ConfigError, match="whole number"):
        Target("blocks", 2.5)
    t = Target("blocks", 2)
    assert not t.met(1, 0.9, 0.9) and t.met(2, 0.0, 0.0)
    m = Target("macs", 0.3)
    assert not m.met(10, 0.29, 0.9) and m.met(0, 0.3, 0.0)
    p = Target("params", 0.3)
    assert not p.met(10, 0.9, 0.29) and p.met(0, 0.0, 0.31)
    assert Target.parse("macs:50%").describe() == "≥ 50 % fewer MACs"
    assert Target.parse("2").describe() == "remove 2 block(s)"


# ---------------------------------------------------------------------------------------------------- plan
def blk(name: str, macs: int, params: int, removable: bool = True, index: int = 0) -> Block:
    return Block(name, index, "s", "B", removable, None if removable else "downsampling", macs, params)


BLOCKS = [
    blk("a", 100, 10, index=0),
    blk("b", 200, 20, index=1),
    blk("down", 300, 30, removable=False, index=2),
    blk("c", 300, 40, index=3),
    blk("d", 400, 50, index=4),
]
SCORES = {"a": 0.4, "b": 0.1, "c": 0.3, "d": 0.2}  # ranking: b, d, c, a
BASE = {"base_macs": 2000, "base_params": 300}


def test_plan_removes_the_lowest_scores_first() -> None:
    p = plan(BLOCKS, SCORES, Target("blocks", 2), **BASE)
    assert p.blocks == ["b", "d"]
    assert (p.macs, p.params) == (2000 - 600, 300 - 70)
    assert p.macs_reduction == pytest.approx(0.3) and p.params_reduction == pytest.approx(70 / 300)
    d = p.to_dict()
    assert d["blocks"] == ["b", "d"] and d["macs_reduction"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (Target("macs", 0.10), ["b"]),  # 200/2000 = 10 % exactly: met, stop
        (Target("macs", 0.11), ["b", "d"]),  # 600 → 30 %
        (Target("macs", 0.30), ["b", "d"]),
        (Target("macs", 0.31), ["b", "d", "c"]),  # 900 → 45 %
        (Target("params", 0.05), ["b"]),  # 20/300
        (Target("params", 0.24), ["b", "d", "c"]),  # 70/300 = 23.3 % is short, 110/300 = 36.7 %
        (Target("blocks", 4), ["b", "d", "c", "a"]),
    ],
)
def test_plan_stops_as_soon_as_the_target_is_met(target: Target, expected: list[str]) -> None:
    p = plan(BLOCKS, Scores("x", SCORES, 0.0, 0), target, **BASE)
    assert p.blocks == expected
    assert p.macs == 2000 - sum(b.macs for b in BLOCKS if b.name in expected)


def test_plan_ties_keep_forward_order() -> None:
    p = plan(BLOCKS, dict.fromkeys(SCORES, 0.5), Target("blocks", 3), **BASE)
    assert p.blocks == ["a", "b", "c"]


def test_plan_unmeetable_target() -> None:
    with pytest.raises(TargetError, match=r"cannot be met: removing all 4 removable blocks gives 50\.0 % fewer MACs"):
        plan(BLOCKS, SCORES, Target("macs", 0.6), **BASE)
    with pytest.raises(TargetError, match="remove 5 block"):
        plan(BLOCKS, SCORES, Target("blocks", 5), **BASE)


def test_plan_chosen_blocks() -> None:
    p = plan(BLOCKS, None, chosen=["c", "a", "c"], **BASE)
    assert p.blocks == ["c", "a"]
    assert (p.macs, p.params) == (1600, 250)
    with pytest.raises(ConfigError, match=r"block 'down' cannot be removed: downsampling"):
        plan(BLOCKS, None, chosen=["down"], **BASE)
    with pytest.raises(ConfigError, match=r"'zz' is not a block"):
        plan(BLOCKS, None, chosen=["zz"], **BASE)
    with pytest.raises(ConfigError, match="either a target or the blocks"):
        plan(BLOCKS, SCORES, None, **BASE)
    with pytest.raises(ConfigError, match=r"no score for removable blocks \['c'\]"):
        plan(BLOCKS, {"a": 1.0, "b": 1.0, "d": 1.0}, Target("blocks", 1), **BASE)


# ---------------------------------------------------------------------------------------- pruning the demo


@pytest.fixture(scope="module")
def loaders(demo: nn.Module) -> dict[str, DataLoader]:
    preset = get_preset(demo)
    train = load_dataset("digits", "train", preset)
    aug = load_dataset("digits", "train", preset, augment=True)
    test = load_dataset("digits", "test", preset)
    return {
        "calib": make_loader(calibration_subset(train, 128, seed=0), batch_size=128, num_workers=0),
        "train": make_loader(calibration_subset(aug, 256, seed=1), batch_size=64, shuffle=True, num_workers=0),
        "test": make_loader(test, batch_size=360, num_workers=0),
    }


@pytest.fixture(scope="module")
def base_costs(demo: nn.Module) -> tuple[int, int, dict[str, Block]]:
    return count_macs(demo, (1, 8, 8)), count_params(demo), {b.name: b for b in find_blocks(demo)}


def _check_costs(result: PruneResult, base_costs) -> None:
    base_macs, base_params, blocks = base_costs
    removed = result.removed
    assert removed_blocks(result.model) == removed
    expected_macs = base_macs - sum(blocks[n].macs for n in removed)
    expected_params = base_params - sum(blocks[n].params for n in removed)
    assert count_macs(result.model, (1, 8, 8)) == expected_macs
    assert count_params(result.model) == expected_params
    assert (result.final["macs"], result.final["params"]) == (expected_macs, expected_params)
    assert result.final["macs_reduction"] == pytest.approx(1 - expected_macs / base_macs)
    assert result.final["params_reduction"] == pytest.approx(1 - expected_params / base_params)
    assert result.steps[-1].macs == expected_macs and result.steps[-1].params == expected_params
    assert result.base == {**result.base, "macs": base_macs, "params": base_params}


def test_one_shot_prune_with_a_block_target(demo, loaders, base_costs) -> None:
    before = {k: v.clone() for k, v in demo.state_dict().items()}
    result = prune(demo, loaders["calib"], target="3 blocks", criterion="cka", eval_loader=loaders["test"],
                   device="cpu")
    scores = score_blocks(demo, loaders["calib"], "cka", device="cpu")
    assert result.removed == scores.ranking()[:3]
    assert result.criterion == "cka" and not result.iterative and not result.cancelled
    assert [s.step for s in result.steps] == [0, 1]
    assert result.steps[0].removed == [] and result.steps[0].scores is None
    assert result.steps[1].removed == result.removed
    assert result.steps[1].scores == pytest.approx(scores.scores, abs=1e-9)
    assert result.base["accuracy"] == pytest.approx(98.89, abs=0.3)
    assert result.steps[0].accuracy == result.base["accuracy"]
    assert result.steps[1].accuracy == result.final["accuracy"]
    assert 50 < result.final["accuracy"] <= 100
    _check_costs(result, base_costs)
    assert removed_blocks(demo) == []  # the input model is not modified
    for k, v in demo.state_dict().items():
        assert torch.equal(v, before[k])
    record = json.loads(json.dumps(result.to_dict()))  # JSON-ready, to reproduce and plot
    assert record["removed"] == result.removed
    assert record["target"] == {"kind": "blocks", "value": 3}
    assert record["steps"][1]["scores"].keys() == scores.scores.keys()


def test_one_shot_prune_with_a_macs_target(demo, loaders, base_costs) -> None:
    base_macs, _, blocks = base_costs
    result = prune(demo, None, target=Target("macs", 0.2), criterion="weight_norm", device="cpu")
    scores = score_blocks(demo, None, "weight_norm")
    ranked = scores.ranking()
    # the shortest prefix of the ranking that saves ≥ 20 % of the MACs
    k = next(i for i in range(1, len(ranked) + 1) if sum(blocks[n].macs for n in ranked[:i]) >= 0.2 * base_macs)
    assert result.removed == ranked[:k]
    assert result.final["macs_reduction"] >= 0.2
    _check_costs(result, base_costs)
    assert result.final["accuracy"] is None  # no eval loader, no accuracy


def test_prune_chosen_blocks_by_hand(demo, base_costs) -> None:
    result = prune(demo, blocks_to_remove=["layer3.2", "layer1.1"], device="cpu")
    assert result.removed == ["layer3.2", "layer1.1"]
    assert result.criterion is None and result.steps[1].scores is None
    _check_costs(result, base_costs)


def test_prune_argument_errors(demo) -> None:
    with pytest.raises(ConfigError, match="exactly one of target"):
        prune(demo, None, device="cpu")
    with pytest.raises(ConfigError, match="exactly one of target"):
        prune(demo, None, target="2", blocks_to_remove=["layer1.1"], device="cpu")
    with pytest.raises(ConfigError, match="not understood"):
        prune(demo, None, target="lots", device="cpu")
    with pytest.raises(ConfigError, match="cannot be removed"):
        prune(demo, blocks_to_remove=["layer2.0"], device="cpu")
    with pytest.raises(TargetError, match="cannot be met"):
        prune(demo, None, target="macs:90%", criterion="random", device="cpu")


def test_iterative_prune_rescores_after_each_removal(demo, loaders, base_costs) -> None:
    step_ft = FinetuneConfig(steps=2, lr=0.01, seed=0)
    result = prune(demo, loaders["calib"], target="2 blocks", criterion="cka", iterative=True,
                   train_loader=loaders["train"], step_finetune_config=step_ft, eval_loader=loaders["test"],
                   device="cpu")
    assert result.iterative
    assert [s.step for s in result.steps] == [0, 1, 2]
    first, second = result.steps[1], result.steps[2]
    assert len(first.scores) == 7 and len(second.scores) == 6
    assert first.removed == [min(first.scores, key=first.scores.get)]
    assert second.removed == [min(second.scores, key=second.scores.get)]
    assert first.removed[0] not in second.scores
    assert result.removed == first.removed + second.removed
    # the first step's scores are those of the unpruned model
    direct = score_blocks(demo, loaders["calib"], "cka", device="cpu")
    assert first.scores == pytest.approx(direct.scores, abs=1e-9)
    assert first.finetune is not None and first.finetune["steps"] == 2
    assert all(s.accuracy is not None for s in result.steps)
    assert first.macs > second.macs and first.params > second.params
    assert result.steps[0].macs - first.macs == base_costs[2][first.removed[0]].macs
    _check_costs(result, base_costs)


def test_iterative_prune_to_a_params_target_without_finetuning(demo, base_costs) -> None:
    _, base_params, blocks = base_costs
    result = prune(demo, None, target="params:30%", criterion="weight_norm", iterative=True, device="cpu")
    assert result.final["params_reduction"] >= 0.3
    # it stopped as soon as the target was met: one block fewer would not do
    assert sum(blocks[n].params for n in result.removed[:-1]) < 0.3 * base_params
    assert len(result.steps) == len(result.removed) + 1
    _check_costs(result, base_costs)
    with pytest.raises(TargetError, match="no removable block is left"):
        prune(demo, None, target="macs:90%", criterion="random", iterative=True, device="cpu")


def test_prune_with_final_finetune_and_cancel(demo, loaders, base_costs) -> None:
    ft = FinetuneConfig(steps=4, lr=0.01, seed=0)
    result = prune(demo, None, blocks_to_remove=["layer1.0"], train_loader=loaders["train"], finetune_config=ft,
                   eval_loader=loaders["test"], device="cpu")
    assert result.finetune is not None and result.finetune["steps"] == 4
    assert result.finetune["config"]["steps"] == 4
    # fine-tuning keeps the best weights it saw, the pruned-only starting point included
    assert result.final["accuracy"] >= result.steps[1].accuracy
    _check_costs(result, base_costs)
    # a cancel during scoring keeps what was finished (nothing removed) and says so
    token = CancelToken()
    token.cancel()
    cancelled = prune(demo, loaders["calib"], target="2", criterion="cka", device="cpu", cancel=token)
    assert cancelled.cancelled
    assert cancelled.removed == [] and removed_blocks(cancelled.model) == []


def test_progress_is_reported(demo, loaders) -> None:
    messages: list[str] = []
    prune(demo, loaders["calib"], target="1", criterion="angular", device="cpu",
          progress=lambda d, t, m: messages.append(m))
    assert any("scoring blocks (angular)" in m for m in messages)
    assert any(m.startswith("angular: batch") for m in messages)


# ------------------------------------------------------------------------------- adapted ResNet-56 (data)
@pytest.mark.data
def test_resnet56_half_the_macs_matches_removed_blocks_and_reloads(shared_data: Path, tmp_path: Path) -> None:
    r56 = build_model("cifar_resnet56", weights=shared_data / "weights" / "resnet56-cifar10jpeg.th").eval()
    preset = get_preset(r56)
    root = shared_data / "cifar10-jpeg"
    train = load_dataset(f"imagefolder:{root}", "train", preset)
    calib = make_loader(calibration_subset(train, 256, seed=0), batch_size=128, num_workers=0)
    blocks = {b.name: b for b in find_blocks(r56)}
    base_macs, base_params = count_macs(r56, preset.input_size), count_params(r56)

    result = prune(r56, calib, target="macs:50%", criterion="cka", device="cpu")
    assert result.final["macs_reduction"] >= 0.5
    assert all(blocks[n].removable for n in result.removed)
    pruned_macs = count_macs(result.model, preset.input_size)
    pruned_params = count_params(result.model)
    assert pruned_macs == base_macs - sum(blocks[n].macs for n in result.removed) == result.final["macs"]
    assert pruned_params == base_params - sum(blocks[n].params for n in result.removed) == result.final["params"]
    # one block fewer (the last one the ranking added) would not have met the target
    assert base_macs - sum(blocks[n].macs for n in result.removed[:-1]) > 0.5 * base_macs

    out = save_pruned(result.model, tmp_path / "r56_half", report=result.to_dict())
    again = load_pruned(out)
    test = load_dataset(f"imagefolder:{root}", "test", preset)
    x = torch.stack([test[i][0] for i in range(0, 10_000, 157)])
    with torch.no_grad():
        assert torch.equal(again(x), result.model.eval()(x))
    assert removed_blocks(again) == result.removed
    assert count_macs(again, preset.input_size) == pruned_macs
