"""Tests for cka_analysis.pruning: targets, the one-shot planner (lowest scores first, stopping as soon as the target
is met), the reachability check before scoring, one-shot and iterative pruning of the digits demo with their records
and exact MACs/parameter bookkeeping, the resume store (one-shot and iterative resume against an uninterrupted run),
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
from cka_analysis.errors import CheckpointError, ConfigError, TargetError
from cka_analysis.export import load_pruned, save_pruned
from cka_analysis.metrics import count_macs, count_params, evaluate
from cka_analysis.models import build_model, get_preset
from cka_analysis.progress import CancelToken
from cka_analysis.pruning import (
    PruneHooks,
    PruneResult,
    PruneStep,
    ResumeStore,
    ScoringOptions,
    Target,
    check_reachable,
    plan,
    prune,
)
from cka_analysis.records import RecoveryRecord
from cka_analysis.recovery import RecoveryConfig
from cka_analysis.scoring import Scores, score_blocks


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
        ("macs:50", "macs", 0.5),  # as the command line's --target-macs-reduction 50: above 1 is percent
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


def test_check_reachable_uses_the_costs_only() -> None:
    check_reachable(BLOCKS, Target("macs", 0.5), **BASE)  # all four removable blocks: exactly 50 %
    with pytest.raises(TargetError, match="cannot be met"):
        check_reachable(BLOCKS, Target("macs", 0.51), **BASE)
    with pytest.raises(TargetError, match="remove 5 block"):
        check_reachable(BLOCKS, Target("blocks", 5), **BASE)


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
    test = load_dataset("digits", "test", preset)
    return {
        "calib": make_loader(calibration_subset(train, 128, seed=0), batch_size=128, num_workers=0),
        "test": make_loader(test, batch_size=360, num_workers=0),
    }


@pytest.fixture(scope="module")
def base_costs(demo: nn.Module) -> tuple[int, int, dict[str, Block]]:
    return count_macs(demo, (1, 8, 8)), count_params(demo), {b.name: b for b in find_blocks(demo)}


def _accuracy_hook(loader: DataLoader) -> PruneHooks:
    return PruneHooks(evaluate=lambda m: evaluate(m, loader, device="cpu").top1)


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
    assert (result.base["macs"], result.base["params"]) == (base_macs, base_params)


def test_one_shot_prune_with_a_block_target(demo, loaders, base_costs) -> None:
    before = {k: v.clone() for k, v in demo.state_dict().items()}
    result = prune(demo, loaders["calib"], target="3 blocks", criterion="cka", hooks=_accuracy_hook(loaders["test"]),
                   scoring=ScoringOptions(device="cpu"))
    scores = score_blocks(demo, loaders["calib"], "cka", options=ScoringOptions(device="cpu"))
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


def test_prune_never_runs_or_moves_the_callers_model(demo, loaders) -> None:
    """Scoring and evaluation move models to the device and memory format they run best in: prune works on a copy,
    so the caller's model is never the one that runs (a forward hook records which module object ran)."""
    ran: list[int] = []
    handle = demo.register_forward_hook(lambda module, inp, out: ran.append(id(module)))
    try:
        result = prune(demo, loaders["calib"], target="2", criterion="cka", hooks=_accuracy_hook(loaders["test"]),
                       scoring=ScoringOptions(device="cpu"))
    finally:
        handle.remove()
    assert ran, "the copy's forward passes should have been seen"
    assert id(demo) not in ran
    assert result.model is not demo and removed_blocks(demo) == []


def test_one_shot_prune_with_a_macs_target(demo, loaders, base_costs) -> None:
    base_macs, _, blocks = base_costs
    result = prune(demo, None, target=Target("macs", 0.2), criterion="weight_norm")
    scores = score_blocks(demo, None, "weight_norm")
    ranked = scores.ranking()
    # the shortest prefix of the ranking that saves ≥ 20 % of the MACs
    k = next(i for i in range(1, len(ranked) + 1) if sum(blocks[n].macs for n in ranked[:i]) >= 0.2 * base_macs)
    assert result.removed == ranked[:k]
    assert result.final["macs_reduction"] >= 0.2
    _check_costs(result, base_costs)
    assert result.final["accuracy"] is None  # no evaluate hook, no accuracy


def test_prune_chosen_blocks_by_hand(demo, base_costs) -> None:
    result = prune(demo, blocks_to_remove=["layer3.2", "layer1.1"])
    assert result.removed == ["layer3.2", "layer1.1"]
    assert result.criterion is None and result.steps[1].scores is None
    _check_costs(result, base_costs)


def test_prune_argument_errors(demo) -> None:
    with pytest.raises(ConfigError, match="exactly one of target"):
        prune(demo, None)
    with pytest.raises(ConfigError, match="exactly one of target"):
        prune(demo, None, target="2", blocks_to_remove=["layer1.1"])
    with pytest.raises(ConfigError, match="not understood"):
        prune(demo, None, target="lots")
    with pytest.raises(ConfigError, match="cannot be removed"):
        prune(demo, blocks_to_remove=["layer2.0"])
    with pytest.raises(ConfigError, match=r"'layer9\.9' is not a block of this model; blocks are: "):
        prune(demo, blocks_to_remove=["layer9.9"])
    with pytest.raises(TargetError, match="cannot be met"):
        prune(demo, None, target="macs:90%", criterion="random")


def test_unreachable_target_is_refused_before_any_scoring(demo) -> None:
    """Known from the blocks' costs: no score is computed (cka without calibration data would fail otherwise)
    and nothing is written to the resume directory."""
    messages: list[str] = []
    for iterative in (False, True):
        with pytest.raises(TargetError, match="removing all 7 removable blocks"):
            prune(demo, None, target="macs:90%", criterion="cka", iterative=iterative,
                  progress=lambda d, t, m: messages.append(m))
    assert not any("scoring" in m for m in messages)


def test_iterative_prune_rescores_after_each_removal(demo, loaders, base_costs) -> None:
    calls: list[tuple[int, list[str]]] = []

    def recover(model: nn.Module, step: int) -> RecoveryRecord:
        calls.append((step, removed_blocks(model)))
        return RecoveryRecord(RecoveryConfig(images=10 * step), images_seen=10 * step)

    hooks = PruneHooks(evaluate=_accuracy_hook(loaders["test"]).evaluate, after_removal=recover)
    result = prune(demo, loaders["calib"], target="2 blocks", criterion="cka", iterative=True, hooks=hooks,
                   scoring=ScoringOptions(device="cpu"))
    assert result.iterative
    assert [s.step for s in result.steps] == [0, 1, 2]
    first, second = result.steps[1], result.steps[2]
    assert len(first.scores) == 7 and len(second.scores) == 6
    assert first.removed == [min(first.scores, key=first.scores.get)]
    assert second.removed == [min(second.scores, key=second.scores.get)]
    assert first.removed[0] not in second.scores
    assert result.removed == first.removed + second.removed
    # the first step's scores are those of the unpruned model; the second step's those of the pruned one
    direct = score_blocks(demo, loaders["calib"], "cka", options=ScoringOptions(device="cpu"))
    assert first.scores == pytest.approx(direct.scores, abs=1e-9)
    from cka_analysis.blocks import remove_blocks

    again = score_blocks(remove_blocks(demo, first.removed), loaders["calib"], "cka",
                         options=ScoringOptions(device="cpu"))
    assert second.scores == pytest.approx(again.scores, abs=1e-9)
    # the recovery hook ran after each removal, on the model with that step's blocks gone, and is recorded
    assert calls == [(1, first.removed), (2, result.removed)]
    assert first.recovery.images_seen == 10 and second.recovery.images_seen == 20
    assert PruneStep.from_dict(first.to_dict()) == first  # the step's JSON keeps its typed recovery
    assert all(s.accuracy is not None for s in result.steps)
    assert first.macs > second.macs and first.params > second.params
    assert result.steps[0].macs - first.macs == base_costs[2][first.removed[0]].macs
    _check_costs(result, base_costs)


def test_iterative_prune_to_a_params_target(demo, base_costs) -> None:
    _, base_params, blocks = base_costs
    result = prune(demo, None, target="params:30%", criterion="weight_norm", iterative=True)
    assert result.final["params_reduction"] >= 0.3
    # it stopped as soon as the target was met: one block fewer would not do
    assert sum(blocks[n].params for n in result.removed[:-1]) < 0.3 * base_params
    assert len(result.steps) == len(result.removed) + 1
    _check_costs(result, base_costs)


def test_cancel_keeps_what_finished(demo, loaders) -> None:
    token = CancelToken()
    token.cancel()
    cancelled = prune(demo, loaders["calib"], target="2", criterion="cka", cancel=token)
    assert cancelled.cancelled
    assert cancelled.removed == [] and removed_blocks(cancelled.model) == []
    # iterative: a cancel during step 2's recovery keeps step 2's removal
    token = CancelToken()

    def recover(model: nn.Module, step: int) -> RecoveryRecord:
        if step == 2:
            token.cancel()
        return RecoveryRecord(RecoveryConfig(images=100), cancelled=step == 2)

    result = prune(demo, None, target="3", criterion="weight_norm", iterative=True,
                   hooks=PruneHooks(after_removal=recover), cancel=token)
    assert result.cancelled and len(result.removed) == 2 and removed_blocks(result.model) == result.removed


def test_progress_is_reported(demo, loaders) -> None:
    messages: list[str] = []
    prune(demo, loaders["calib"], target="1", criterion="angular", progress=lambda d, t, m: messages.append(m))
    assert any("scoring blocks (angular)" in m for m in messages)
    assert any(m.startswith("angular: batch") for m in messages)


# ----------------------------------------------------------------------------------------- resume store
def test_resume_store_writes_nothing_until_a_part_is_saved(tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "run" / ".resume", {"a": 1})
    assert store.load_scores() is None  # not resuming: nothing read
    assert not (tmp_path / "run").exists()
    store.save_scores(Scores("random", {"x": 0.5}, 0.1, 0, {"seed": 0}))
    again = ResumeStore(tmp_path / "run" / ".resume", {"a": 1}, resume=True).load_scores()
    assert again == Scores("random", {"x": 0.5}, 0.1, 0, {"seed": 0})
    with pytest.raises(CheckpointError, match="other settings"):
        ResumeStore(tmp_path / "run" / ".resume", {"a": 2}, resume=True).load_scores()
    (tmp_path / "run" / ".resume" / "scores.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        ResumeStore(tmp_path / "run" / ".resume", {"a": 1}, resume=True).load_scores()
    store.clear()
    assert not (tmp_path / "run" / ".resume").exists()


def test_one_shot_resume_reuses_the_saved_scores(demo, loaders, tmp_path: Path) -> None:
    store = ResumeStore(tmp_path / "r", {"run": 1})
    first = prune(demo, loaders["calib"], target="2", criterion="cka", hooks=PruneHooks(store=store))
    assert (tmp_path / "r" / "scores.json").is_file()
    messages: list[str] = []
    resumed = prune(demo, None, target="2", criterion="cka",  # no calibration: the scores must come from disk
                    hooks=PruneHooks(store=ResumeStore(tmp_path / "r", {"run": 1}, resume=True)),
                    progress=lambda d, t, m: messages.append(m))
    assert resumed.removed == first.removed and resumed.steps[1].scores == first.steps[1].scores
    assert any("reusing the cka scores" in m for m in messages)


def test_iterative_resume_goes_on_like_the_uninterrupted_run(demo, loaders, tmp_path: Path) -> None:
    whole = prune(demo, loaders["calib"], target="3", criterion="cka", iterative=True)
    token = CancelToken()

    def stop_after_first(model: nn.Module, step: int) -> None:
        token.cancel()  # the step is saved, then the run stops before scoring step 2

    store = ResumeStore(tmp_path / "it", {"run": 1})
    part = prune(demo, loaders["calib"], target="3", criterion="cka", iterative=True, cancel=token,
                 hooks=PruneHooks(after_removal=stop_after_first, store=store))
    assert part.cancelled and part.removed == whole.removed[:1]
    saved = json.loads((tmp_path / "it" / "iterative.json").read_text())
    assert saved["steps"][1]["seconds"] > 0
    saved["steps"][1]["seconds"] = 1000.0  # the saved step's time, made large to be seen in the resumed run's
    (tmp_path / "it" / "iterative.json").write_text(json.dumps(saved))
    messages: list[str] = []
    rest = prune(demo, loaders["calib"], target="3", criterion="cka", iterative=True,
                 hooks=PruneHooks(store=ResumeStore(tmp_path / "it", {"run": 1}, resume=True)),
                 progress=lambda d, t, m: messages.append(m))
    assert any(m.startswith("resumed after step 1") for m in messages)
    assert rest.removed == whole.removed and not rest.cancelled
    assert rest.resumed_seconds == 1000.0 and 1000.0 < rest.seconds < 1000.0 + 600  # the saved step's time counts
    for a, b in zip(rest.steps[2:], whole.steps[2:], strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-9)  # rescored on the restored model
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rest.model.eval()(x), whole.model.eval()(x))


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

    result = prune(r56, calib, target="macs:50%", criterion="cka", scoring=ScoringOptions(device="cpu"))
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
