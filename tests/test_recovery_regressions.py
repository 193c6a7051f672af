"""Tests that fail on the one-line regressions of issue 21 (each listed in ``tests/mutations.py``, which applies
them one at a time to a copy of the tree and checks that these tests catch every one).

They compare against values computed independently — the recovery objective rebuilt by hand from its documented
formula, the image budget counted from the recipe, the smallest block set that meets a target — rather than
checking ranges, which is what let the regressions through before.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cka_analysis.data as data_module
from cka_analysis.blocks import find_blocks, remove_blocks, removed_blocks
from cka_analysis.data import load_dataset
from cka_analysis.errors import ConfigError, TargetError
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.pruning import Target
from cka_analysis.recovery import RecoveryConfig, RecoveryObjective, _drop_at, feature_points, recover
from cka_analysis.workflow import PruneData, PruneRequest, recovery_stand_in, run_prune

REMOVED = ["layer1.0", "layer1.1", "layer2.1"]


@pytest.fixture(scope="module")
def pruned(demo: nn.Module) -> nn.Module:
    return remove_blocks(demo, REMOVED).eval()


@pytest.fixture(scope="module")
def batch(demo: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset("digits", "test", demo.cka_preset)
    images, labels = zip(*(test[i] for i in range(0, 360, 12)), strict=True)
    return torch.stack(images), torch.tensor(labels)


# ------------------------------------------------------------------------------------------- the objective
def _activations(model: nn.Module, points: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {point: activation}) of ``model`` on ``x``, with hooks of this test's own."""
    found: dict[str, torch.Tensor] = {}
    handles = []
    for p in points:
        name, _, side = p.partition(":")
        module = model.get_submodule(name)
        if side == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, p=p: found.__setitem__(p, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, p=p: found.__setitem__(p, out)))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, found


def _documented_loss(cfg: RecoveryConfig, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                     y: torch.Tensor, weight: float) -> torch.Tensor:
    """The recovery objective as the docs write it: (1 − α)·CE + α·T²·KL(teacher ‖ student at T)
    + β·Σ_points MSE(s, t) / mean(t²)."""
    points = feature_points(student, cfg.mimic) if cfg.method in ("feature", "adaptor") else []
    s_logits, s_feats = _activations(student, points, x)
    with torch.no_grad():
        t_logits, t_feats = _activations(teacher, points, x)
    ce = F.cross_entropy(s_logits, y)
    if cfg.method == "ce":
        return ce
    t = cfg.kd_temperature
    p_teacher = F.softmax(t_logits / t, -1)
    kl = (p_teacher * (F.log_softmax(t_logits / t, -1) - F.log_softmax(s_logits / t, -1))).sum(-1).mean()
    loss = (1 - cfg.kd_alpha) * ce + cfg.kd_alpha * t * t * kl
    if points:
        loss = loss + weight * sum(((s_feats[p] - t_feats[p]) ** 2).mean() / (t_feats[p] ** 2).mean()
                                   for p in points)
    return loss


@pytest.mark.parametrize("method", ["ce", "kd", "feature", "adaptor"])
def test_objective_on_a_fixed_batch_is_the_documented_combination(method, demo, pruned, batch) -> None:
    cfg = RecoveryConfig(method=method, kd_alpha=0.3, kd_temperature=3.0, feature_weight=2.5,
                         feature_schedule="constant")
    student = copy.deepcopy(pruned)
    objective = RecoveryObjective(cfg, student, demo)
    try:
        with torch.no_grad():
            got = objective(student, *batch)
    finally:
        objective.close()
    with torch.no_grad():
        expected = _documented_loss(cfg, student, demo, *batch, weight=2.5)
        ce = F.cross_entropy(student(batch[0]), batch[1])
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    if method != "ce":  # the distillation (and feature) terms change the loss: the check above can tell
        assert abs(expected.item() - ce.item()) > 1e-3


def test_feature_points_are_the_documented_ones(pruned) -> None:
    """Written out by hand (the objective test above takes its points from the library, so a wrong list would
    agree on both sides): each stage's output and the classifier's input; ``blocks`` adds the input of every
    kept block that is not a stage's first (the demo without layer1.0, layer1.1 and layer2.1)."""
    assert feature_points(pruned, "stages") == ["layer1", "layer2", "layer3", "linear:in"]
    assert feature_points(pruned, "blocks") == ["layer1.2:in", "layer2.2:in", "layer3.1:in", "layer3.2:in",
                                                "layer1", "layer2", "layer3", "linear:in"]


def test_feature_weight_follows_its_cosine_schedule_through_training(demo, pruned, monkeypatch) -> None:
    """The weight the objective uses at each training step is the schedule at step / total: full at the first
    step, near zero at the last (the trainer wires its progress into the objective)."""
    used: list[float] = []
    real = RecoveryObjective.feature_weight

    def spy(self: RecoveryObjective) -> float:
        used.append(real(self))
        return used[-1]

    monkeypatch.setattr(RecoveryObjective, "feature_weight", spy)
    cfg = RecoveryConfig(images=32 + 10 * 16, bn_images=32, batch_size=16, feature_weight=10.0,
                         feature_schedule="cosine")
    train = load_dataset("digits", "train", demo.cka_preset, augment=True)
    result = recover(copy.deepcopy(pruned), train, cfg, teacher=demo, device="cpu")
    total = result.steps
    assert total == 10 and len(used) == total
    expected = [10.0 * 0.5 * (1 + math.cos(math.pi * i / total)) for i in range(total)]
    assert used == pytest.approx(expected, abs=1e-9)
    assert used[0] == pytest.approx(10.0) and used[-1] < 0.3


@pytest.mark.parametrize("method", ["ce", "kd", "feature", "adaptor"])
def test_training_builds_the_runs_objective_with_the_unpruned_teacher(method, demo, pruned,
                                                                             monkeypatch) -> None:
    """recover() builds its training objective from the run's own recipe (values unlike the defaults, so the
    defaults cannot pass for it) and hands it a private copy of the unpruned teacher (none for plain
    cross-entropy, which does not distil)."""
    built: list[tuple[RecoveryConfig, nn.Module | None]] = []
    real = RecoveryObjective.__init__

    def spy(self: RecoveryObjective, config: RecoveryConfig, student: nn.Module, teacher: nn.Module | None) -> None:
        built.append((config, teacher))
        real(self, config, student, teacher)

    monkeypatch.setattr(RecoveryObjective, "__init__", spy)
    cfg = RecoveryConfig(images=96 + 4 * 16, bn_images=32, adaptor_images=64, batch_size=16, method=method,
                         kd_alpha=0.3, kd_temperature=2.0, feature_weight=7.0, feature_schedule="constant", seed=5)
    train = load_dataset("digits", "train", demo.cka_preset, augment=True)
    result = recover(copy.deepcopy(pruned), train, cfg, teacher=demo, device="cpu")
    assert result.steps > 0 and len(built) == 1
    config, teacher = built[0]
    assert config == cfg
    if method == "ce":
        assert teacher is None
        return
    assert teacher is not None and teacher is not demo
    expected = demo.state_dict()
    got = teacher.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


# ----------------------------------------------------------------------------------------- image accounting
def _spent(cfg: RecoveryConfig, train_images: int) -> int:
    """Images one recovery draws: batch-norm re-estimation, then whole batches of the rest of the budget."""
    bn = min(cfg.bn_images, cfg.images, train_images)
    return bn + (cfg.images - bn) // cfg.batch_size * cfg.batch_size


def test_one_shot_run_counts_every_image_exactly(demo) -> None:
    cfg = RecoveryConfig(images=1_000, bn_images=100, batch_size=64)
    rec = run_prune(PruneRequest(model=demo, data="digits", blocks=tuple(REMOVED), recovery=cfg, latency=False,
                                 device="cpu")).record
    assert rec.recovery.bn_images == 100
    assert rec.recovery.images_seen == rec.images_seen == 100 + (1_000 - 100) // 64 * 64


def test_iterative_run_gives_each_of_k_steps_its_share_and_counts_every_image(demo) -> None:
    cfg = RecoveryConfig(images=1_000, bn_images=50, batch_size=64)
    rec = run_prune(PruneRequest(model=demo, data="digits", target="2 blocks", iterative=True, recovery=cfg,
                                 latency=False, device="cpu")).record
    train = 1_437  # the digits training split
    per_step = cfg.with_images(int(cfg.images * 0.3) // 2)  # 30 % of the budget shared by the k = 2 steps
    steps = [s.recovery for s in rec.steps[1:]]
    assert len(steps) == 2 and all(s.config.images == per_step.images == 150 for s in steps)
    assert all(s.images_seen == _spent(per_step, train) for s in steps)
    final = cfg.with_images(cfg.images - 2 * _spent(per_step, train))  # what the steps left unspent goes on
    assert rec.recovery.config.images == final.images
    assert rec.recovery.images_seen == _spent(final, train)
    assert rec.images_seen == 2 * _spent(per_step, train) + _spent(final, train) <= cfg.images


# ------------------------------------------------------------------------------------------- the stand-in
@pytest.mark.parametrize("target", ["macs:20%", "macs:45%", "params:30%", "2 blocks"])
def test_stand_in_is_the_smallest_removal_that_meets_the_target(target, demo) -> None:
    request = PruneRequest(model=demo, data="digits", target=target, latency=False, device="cpu")
    stand_in = recovery_stand_in(request, demo)
    removed = removed_blocks(stand_in)
    size = demo.cka_preset.input_size
    base_macs, base_params = count_macs(demo, size), count_params(demo)

    def meets(blocks: list[str]) -> bool:
        model = remove_blocks(demo, blocks)
        return Target.parse(target).met(len(blocks), 1 - count_macs(model, size) / base_macs,
                                        1 - count_params(model) / base_params)

    removable = [b.name for b in find_blocks(demo) if b.removable]
    assert removed and meets(removed)
    assert not meets(removed[:-1]), "one block fewer already meets the target: the stand-in is too small"
    assert len(removed) < len(removable)


# ------------------------------------------------------------------------------- validation before loading
@pytest.mark.parametrize("bad", [{"blocks": ("layer9.9",)}, {"blocks": ("layer2.0",)}, {"target": "9 blocks"}])
def test_bad_blocks_and_targets_are_refused_before_any_data_is_loaded(bad, demo, monkeypatch) -> None:
    loads: list[tuple] = []
    real_load, real_filled = data_module.load_dataset, PruneData.filled

    def spy_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    def spy_filled(self, *args, **kwargs):
        loads.append(("filled",))
        return real_filled(self, *args, **kwargs)

    monkeypatch.setattr(data_module, "load_dataset", spy_load)
    monkeypatch.setattr(PruneData, "filled", spy_filled)
    with pytest.raises((ConfigError, TargetError)):
        run_prune(PruneRequest(model=demo, data="digits", recovery="none", latency=False, device="cpu", **bad))
    assert loads == [], "the request was checked only after its data was loaded"


# --------------------------------------------------------------------------------- the reference curve
def test_reference_curve_is_interpolated_on_a_log_scale() -> None:
    curve = {0: 60.0, 10_000: 10.0, 1_000_000: 0.0}
    assert _drop_at(curve, 100_000) == pytest.approx(5.0)  # halfway on a log axis (linear: 9.09)
    assert _drop_at(curve, 10 ** 5.5) == pytest.approx(2.5)
    assert _drop_at(curve, 10_000) == 10.0
    assert _drop_at(curve, 2_000_000) is None  # beyond the longest budget measured: nothing to quote
    assert _drop_at(curve, 5_000) is None  # between no recovery and the first budget: nothing honest
