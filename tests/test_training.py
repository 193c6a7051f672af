"""Tests for cka_analysis.training on the digits demo: fine-tuning repairs a damaged (pruned) model within a few
steps, the step/epoch budget, the schedules, label smoothing, distillation, cancellation that keeps the best
weights, and FinetuneConfig validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cka_analysis.blocks import remove_blocks
from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.errors import ConfigError
from cka_analysis.metrics import evaluate
from cka_analysis.models import build_model, get_preset
from cka_analysis.progress import CancelToken
from cka_analysis.training import FinetuneConfig, TrainSpec, finetune, learning_rates


@pytest.fixture(scope="module")
def data(demo: nn.Module):
    preset = get_preset(demo)
    aug = load_dataset("digits", "train", preset, augment=True)
    test = load_dataset("digits", "test", preset)
    return {"train": aug, "small": calibration_subset(aug, 128, seed=0), "test": test}


def train_loader(data, which: str = "train", batch_size: int = 64, seed: int = 0) -> DataLoader:
    """A fresh seeded loader (a loader's shuffling generator advances with every pass, so runs that are compared
    each get their own)."""
    return make_loader(data[which], batch_size=batch_size, shuffle=True, seed=seed, num_workers=0)


@pytest.fixture(scope="module")
def test_loader(data) -> DataLoader:
    return make_loader(data["test"], batch_size=360, num_workers=0)


@pytest.fixture(scope="module")
def damaged(demo: nn.Module, test_loader: DataLoader) -> tuple[nn.Module, float]:
    """The demo without its two most important blocks (per the CKA scores): accuracy drops a lot."""
    model = remove_blocks(demo, ["layer1.0", "layer1.1"]).eval()
    return model, evaluate(model, test_loader, device="cpu").top1


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights only: batch-norm running statistics move on any forward pass in train mode, so a
    run whose optimiser never stepped would still change the state dict."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# what the optimiser adds, measured on the damaged demo below (19.2 %) after 24 steps: 94.4 % at lr 0.05 (95.3 %
# distilling), 42.2 % at lr 5e-9 (the running statistics alone); the bar sits between the two
REPAIR = 40


# ------------------------------------------------------------------------------------------- it repairs
def test_finetune_repairs_a_damaged_model(damaged, data, test_loader) -> None:
    model, before = damaged
    model = copy.deepcopy(model)
    assert before < 90  # the damage is real
    config = FinetuneConfig(steps=24, lr=0.05, seed=0)
    result = finetune(model, train_loader(data), config, eval_loader=test_loader, device="cpu")
    after = evaluate(model, test_loader, device="cpu").top1
    assert result.steps == 24 and not result.cancelled
    assert result.model is model
    assert not model.training
    assert result.history[0] == {**result.history[0], "step": 0, "eval_top1": before}
    assert after == result.best_accuracy  # the returned weights are the best ones seen
    assert after >= before + REPAIR
    evals = [h for h in result.history if "eval_top1" in h]
    assert [h["step"] for h in evals] == [0, 23, 24]  # start, once per epoch (23 batches), end
    losses = [h for h in result.history if "train_loss" in h]
    assert [h["step"] for h in losses] == [10, 20, 24]
    assert all(math.isfinite(h["train_loss"]) for h in losses)
    d = result.to_dict()
    assert d["steps"] == 24 and d["best_accuracy"] == after


def test_without_eval_loader_the_last_weights_are_kept(demo, data) -> None:
    model = copy.deepcopy(demo)
    start = params_of(model)
    result = finetune(model, train_loader(data, "small", 32), FinetuneConfig(steps=3, lr=0.01), device="cpu")
    assert result.best_accuracy is None and result.steps == 3
    assert any(not torch.equal(v, start[k]) for k, v in params_of(model).items())


# -------------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize(
    ("epochs", "steps", "expected"),
    [(1.0, None, 4), (0.5, None, 2), (1.5, None, 6), (2.0, None, 8), (5.0, 3, 3), (1.0, 6, 6), (0.0, None, 0)],
)
def test_step_budget_versus_epochs(demo, data, epochs: float, steps: int | None, expected: int) -> None:
    model = copy.deepcopy(demo)
    start = params_of(model)
    loader = train_loader(data, "small", 32)  # 128 images → 4 batches per epoch
    assert len(loader) == 4
    result = finetune(model, loader, FinetuneConfig(epochs=epochs, steps=steps, lr=1e-3), device="cpu")
    assert result.steps == expected
    changed = any(not torch.equal(v, start[k]) for k, v in params_of(model).items())
    assert changed == (expected > 0)


def test_zero_steps_budget(demo, data) -> None:
    model = copy.deepcopy(demo)
    start = state_of(model)
    result = finetune(model, train_loader(data, "small", 32), FinetuneConfig(steps=0), device="cpu")
    assert result.steps == 0
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ schedules
def test_schedules_shape() -> None:
    total, peak_lr = 200, 0.1
    cos = [r / peak_lr for r in learning_rates(TrainSpec(total, lr=peak_lr, schedule="cosine"))]
    warm = total // 20
    assert cos[0] == pytest.approx(1 / warm)
    assert cos[:warm] == sorted(cos[:warm])  # linear warm-up
    assert cos[warm - 1] == pytest.approx(1.0)
    decay = cos[warm - 1:]
    assert decay == sorted(decay, reverse=True)
    assert cos[total] == pytest.approx(0.0, abs=1e-6)
    assert cos[(warm + total) // 2] == pytest.approx(0.5, abs=0.02)

    one = [r / peak_lr for r in learning_rates(TrainSpec(total, lr=peak_lr, schedule="onecycle"))]
    top = max(range(total + 1), key=lambda i: one[i])
    assert one[0] == pytest.approx(0.04) and one[top] == pytest.approx(1.0, abs=1e-3)
    assert abs(top - 0.3 * total) <= 2
    assert one[: top + 1] == sorted(one[: top + 1])
    assert one[top:] == sorted(one[top:], reverse=True) and one[total] < 1e-3

    const = learning_rates(TrainSpec(total, lr=peak_lr, schedule="constant"))
    assert set(const) == {peak_lr}


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_schedule_drives_the_optimiser(demo, data, schedule: str) -> None:
    model = copy.deepcopy(demo)
    config = FinetuneConfig(steps=20, lr=0.02, schedule=schedule)
    result = finetune(model, train_loader(data, "small", 32), config, device="cpu")
    lrs = {h["step"]: h["lr"] for h in result.history if "lr" in h}
    assert set(lrs) == {10, 20}
    if schedule == "constant":
        assert lrs == {10: 0.02, 20: 0.02}
    else:  # the recorded lr is the one of the next step: 0 after the last
        assert lrs[20] == pytest.approx(0.0, abs=1e-6)
        assert 0 < lrs[10] < 0.02


# --------------------------------------------------------------------------------- smoothing, distillation
def _first_train_loss(model: nn.Module, data, config: FinetuneConfig, teacher: nn.Module | None = None) -> float:
    result = finetune(copy.deepcopy(model), train_loader(data, "small", 32), config, teacher=teacher, device="cpu")
    return next(h["train_loss"] for h in result.history if "train_loss" in h)


def test_label_smoothing_changes_the_loss(demo, data) -> None:
    # the demo is confident: smoothing adds ε·mean(−log p) over the wrong classes to a small cross-entropy
    kw = {"steps": 10, "lr": 1e-6, "schedule": "constant", "seed": 0}
    plain = _first_train_loss(demo, data, FinetuneConfig(**kw))
    smooth = _first_train_loss(demo, data, FinetuneConfig(label_smoothing=0.2, **kw))
    assert plain < 0.5
    assert smooth > plain + 0.2
    again = _first_train_loss(demo, data, FinetuneConfig(**kw))
    assert again == pytest.approx(plain, rel=1e-6)  # seeded: the same run gives the same loss


def test_distillation_uses_the_teacher(demo, damaged, data, test_loader) -> None:
    student, before = damaged
    kw = {"steps": 10, "lr": 1e-6, "schedule": "constant", "seed": 0}
    teacher_before = state_of(demo)
    # kd_alpha = 1: the loss is the distillation term only; a teacher identical to the student gives a loss near
    # 0 (BN batch statistics in training mode are the only difference), an unrelated teacher a large one
    same = _first_train_loss(demo, data, FinetuneConfig(distill=True, kd_alpha=1.0, **kw), teacher=demo)
    stranger = build_model("digits_resnet").eval()
    other = _first_train_loss(demo, data, FinetuneConfig(distill=True, kd_alpha=1.0, **kw), teacher=stranger)
    assert same < 0.5 < other
    # without config.distill a given teacher is ignored
    plain = _first_train_loss(demo, data, FinetuneConfig(**kw))
    ignored = _first_train_loss(demo, data, FinetuneConfig(**kw), teacher=stranger)
    assert ignored == pytest.approx(plain, rel=1e-6)
    # distilling from the unpruned model (no labels at all with kd_alpha = 1) repairs the pruned one
    model = copy.deepcopy(student)
    config = FinetuneConfig(steps=24, lr=0.05, distill=True, kd_alpha=1.0, seed=0, eval_every=10**6)
    result = finetune(model, train_loader(data), config, teacher=demo, eval_loader=test_loader, device="cpu")
    assert result.best_accuracy >= before + REPAIR
    assert all(torch.equal(v, teacher_before[k]) for k, v in demo.state_dict().items())
    assert not demo.training
    with pytest.raises(ConfigError, match="no teacher"):
        finetune(copy.deepcopy(student), train_loader(data, "small", 32), FinetuneConfig(steps=1, distill=True),
                 device="cpu")


# ---------------------------------------------------------------------------------------------------- cancel
def _cancel_after(token: CancelToken, steps: int):
    calls: list[int] = []

    def progress(done: int, total: int | None, message: str) -> None:
        calls.append(done)
        if done >= steps:
            token.cancel()

    return progress, calls


def test_cancel_keeps_the_best_weights(demo, data, test_loader) -> None:
    # a learning rate that wrecks the model: at the cancel the current weights are worse than the start,
    # so the returned model must be exactly the starting one
    model = copy.deepcopy(demo)
    start = state_of(model)
    start_acc = evaluate(model, test_loader, device="cpu").top1
    token = CancelToken()
    progress, calls = _cancel_after(token, 10)
    config = FinetuneConfig(steps=100, lr=5.0, schedule="constant", seed=0)
    result = finetune(model, train_loader(data, "train", 32), config, eval_loader=test_loader, device="cpu",
                      progress=progress, cancel=token)
    assert result.cancelled
    assert result.steps == 10 and calls == [10]
    assert result.best_step == 0 and result.best_accuracy == start_acc
    evals = [h for h in result.history if "eval_top1" in h]
    assert [h["step"] for h in evals] == [0, 10]  # the weights at the cancel were evaluated too ...
    assert evals[1]["eval_top1"] < start_acc  # ... and lost
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert not model.training


def test_cancel_keeps_progress_made_before_it(damaged, data, test_loader) -> None:
    model, before = damaged
    model = copy.deepcopy(model)
    token = CancelToken()
    progress, _ = _cancel_after(token, 20)
    config = FinetuneConfig(steps=200, lr=0.05, seed=0)
    result = finetune(model, train_loader(data), config, eval_loader=test_loader, device="cpu",
                      progress=progress, cancel=token)
    assert result.cancelled and result.steps == 20
    assert result.best_step == 20
    assert evaluate(model, test_loader, device="cpu").top1 == result.best_accuracy > before


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1.0}, "epochs=-1.0 must be ≥ 0"),
        ({"epochs": float("nan")}, "epochs=nan"),
        ({"steps": -5}, "steps=-5 must be ≥ 0"),
        ({"lr": 0.0}, "lr=0.0 must be positive"),
        ({"lr": -0.1}, "lr=-0.1 must be positive"),
        ({"schedule": "linear"}, "schedule='linear' must be 'cosine', 'onecycle' or 'constant'"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"kd_alpha": 1.5}, r"kd_alpha=1.5 must be in \[0, 1\]"),
    ],
)
def test_finetune_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kwargs)


def test_finetune_config_round_trip() -> None:
    config = FinetuneConfig(steps=7, lr=0.03, schedule="onecycle", label_smoothing=0.1, distill=True)
    assert FinetuneConfig(**config.to_dict()) == config
    assert FinetuneConfig(epochs=-1, steps=3).steps == 3  # a step budget makes epochs irrelevant


# ------------------------------------------------------------------------------------------ the fast data path
def _reference_augment(aug, x: torch.Tensor) -> torch.Tensor:
    """BatchAugment as it was before the gather: one slice per image, stacked (the reference the fast path must
    reproduce image for image)."""
    n, c, h, w = x.shape
    p = aug.padding
    if p > 0:
        padded = aug.fill.to(x.device, x.dtype).expand(n, c, h + 2 * p, w + 2 * p).clone()
        padded[:, :, p:p + h, p:p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n,), generator=aug.generator).tolist()
        dx = torch.randint(0, 2 * p + 1, (n,), generator=aug.generator).tolist()
        x = torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))])
    if aug.hflip:
        flip = (torch.rand(n, generator=aug.generator) < 0.5).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x


def _uint8_dataset():
    """A small CIFAR-shaped in-memory dataset of uint8 images (the cifar10jpeg case) with its preset."""
    from cka_analysis.data import ImageDataset, _TensorImages, build_transform

    preset = get_preset(build_model("cifar_resnet20"))
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (300, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,), generator=g).tolist()
    ds = ImageDataset(_TensorImages(images), labels, [str(i) for i in range(10)], build_transform(preset),
                      description="synthetic uint8")
    return ds, preset


@pytest.mark.parametrize("kind", ["digits", "uint8"])
def test_tensor_batches_give_the_same_batches_as_the_loader(demo, kind: str) -> None:
    """Same seed → same images, same order and same augmentation: the device-held batches with the gathered
    augmentation against the DataLoader with the per-image augmentation loop, over two epochs."""
    from torch.utils.data import Subset

    from cka_analysis.distributed import make_loader_for_world
    from cka_analysis.recovery import plain_and_augment
    from cka_analysis.training import BatchAugment, TensorBatches

    if kind == "digits":
        preset = get_preset(demo)
        data = load_dataset("digits", "train", preset, augment=True)
    else:
        data, preset = _uint8_dataset()
    data = Subset(data, list(range(7, 257)))  # a subset, as the validation split makes
    plain, augment = plain_and_augment(data, preset, seed=3)
    assert augment is not None
    loader = make_loader_for_world(plain, global_batch_size=32, shuffle=True, seed=3, drop_last=True)
    fast = TensorBatches.from_dataset(plain, preset, batch_size=32, sampler=loader.sampler, device="cpu")
    assert fast is not None and len(fast) == len(loader) == 250 // 32
    ref_aug, new_aug = BatchAugment.for_preset(preset, 3), BatchAugment.for_preset(preset, 3)
    assert augment.padding > 0 or kind == "digits"
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        pairs = list(zip(loader, fast, strict=True))
        for (x0, y0), (x1, y1) in pairs:
            assert torch.equal(y0, y1)
            assert torch.equal(x0, x1)  # the same images, scaled and normalised alike
            assert torch.equal(_reference_augment(ref_aug, x0), new_aug(x1))


def test_tensor_batches_refuse_what_they_cannot_hold(demo) -> None:
    from cka_analysis.training import TensorBatches

    preset = get_preset(demo)
    data = load_dataset("digits", "train", preset)
    assert TensorBatches.from_dataset(list(range(5)), preset, batch_size=4, sampler=range(5)) is None
    other = get_preset(build_model("cifar_resnet20"))  # images of another size: the loader path
    assert TensorBatches.from_dataset(data, other, batch_size=4, sampler=range(len(data))) is None


@pytest.mark.parametrize(("seconds", "written"), [(0.0, True), (3600.0, False)])
def test_checkpoints_wait_checkpoint_seconds(demo, data, tmp_path, seconds: float, written: bool) -> None:
    """A checkpoint every step unless the last one is younger than ``checkpoint_seconds`` (a fast GPU would
    otherwise stop to write one several times a second)."""
    from cka_analysis.training import Trainer, classification_objective

    path = tmp_path / "ckpt.pt"
    trainer = Trainer(copy.deepcopy(demo), train_loader(data, "small", 32), classification_objective(None),
                      TrainSpec(total_steps=3, amp="none"), device="cpu", checkpoint_path=path,
                      checkpoint_every=1, checkpoint_seconds=seconds)
    trainer.run()
    assert path.is_file() == written
