"""Recovery on a network whose default ``feature`` objective used to diverge (timm's ConvNeXt), and the guard that
stops any training whose loss becomes NaN or infinite instead of returning a broken model as if it had worked."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cka_analysis.blocks import remove_blocks
from cka_analysis.errors import ConfigError, DivergedError
from cka_analysis.export import open_model
from cka_analysis.recovery import RecoveryConfig, recover
from cka_analysis.training import Trainer, TrainSpec

pytest.importorskip("timm")

#: what CKA removed at −50 % MACs on the CIFAR-10 ConvNeXt-atto whose ``feature`` recovery went to NaN
CONVNEXT_REMOVED = ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.blocks.0", "stages.1.blocks.1",
                    "stages.2.blocks.1", "stages.2.blocks.2", "stages.2.blocks.4"]


@pytest.fixture(scope="module")
def convnext() -> tuple[nn.Module, nn.Module, TensorDataset]:
    """(teacher, pruned student, 32×32 images): a randomly initialised timm convnext_atto, built locally."""
    torch.manual_seed(0)
    teacher = open_model("timm:convnext_atto", num_classes=10, allow_download=False).eval()
    student = remove_blocks(teacher, CONVNEXT_REMOVED)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(640, 3, 32, 32, generator=g), torch.randint(0, 10, (640,), generator=g))
    return teacher, student, data


def _recover(convnext, **overrides) -> object:
    teacher, student, data = convnext
    cfg = RecoveryConfig(images=64 * 16, bn_images=64, amp="none", seed=0, **overrides)
    return recover(copy.deepcopy(student), data, cfg, teacher=teacher, device="cpu")


def test_default_feature_recovery_of_a_convnext_stays_finite(convnext) -> None:
    result = _recover(convnext)
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert result.config.method == "feature" and result.steps == 16 and losses
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_unclipped_convnext_recovery_stops_with_a_clear_error(convnext) -> None:
    with pytest.raises(DivergedError, match=r"training diverged at step \d+/16: the loss became (nan|inf)"):
        _recover(convnext, clip_factor=None)


def test_clip_factor_is_validated() -> None:
    with pytest.raises(ConfigError, match="clip_factor"):
        RecoveryConfig(clip_factor=0)
    with pytest.raises(ConfigError, match="clip_factor"):
        TrainSpec(total_steps=1, clip_factor=-1.0)


def test_a_loss_that_becomes_nan_stops_training_before_the_step() -> None:
    """A constructed case: the objective returns NaN at the third step; the trainer must raise, and the NaN must
    not have reached the weights (the step is never taken)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    data = TensorDataset(torch.randn(64, 3, 2, 2), torch.randint(0, 3, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    calls = []

    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        return loss * float("nan") if len(calls) == 3 else loss

    trainer = Trainer(net, loader, objective, TrainSpec(total_steps=6, amp="none"), device="cpu")
    with pytest.raises(DivergedError, match="step 3/6: the loss became nan"):
        trainer.run()
    assert len(calls) == 3
    assert all(torch.isfinite(p).all() for p in net.parameters())
