"""Tests for cka_analysis.metrics: accuracy, MACs per model and per module, parameters and latency."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cka_analysis import data as D
from cka_analysis.errors import Cancelled, ConfigError, DataError
from cka_analysis.metrics import (
    Accuracy,
    Latency,
    count_macs,
    count_params,
    evaluate,
    measure_latency,
    module_macs,
)
from cka_analysis.models.preset import Preset
from cka_analysis.progress import CancelToken


# --------------------------------------------------------------------------------------------- evaluate
class LookupModel(nn.Module):
    """Returns a fixed logit row per sample; the sample's index is stored in its first pixel."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.table[x[:, 0, 0, 0].long()] * self.scale


def ranked_logits(labels: list[int], ranks: list[int], num_classes: int) -> torch.Tensor:
    """Distinct logits per row such that row i's label has rank ``ranks[i]`` (0 = highest)."""
    base = torch.linspace(4.0, -4.0, num_classes)
    rows = []
    for label, rank in zip(labels, ranks, strict=True):
        others = [c for c in range(num_classes) if c != label]
        order = [*others[:rank], label, *others[rank:]]
        row = torch.empty(num_classes)
        row[order] = base
        rows.append(row)
    return torch.stack(rows)


def lookup_problem(num_classes: int, ranks: list[int]) -> tuple[LookupModel, TensorDataset, torch.Tensor]:
    n = len(ranks)
    labels = [i % num_classes for i in range(n)]
    logits = ranked_logits(labels, ranks, num_classes)
    images = torch.zeros(n, 1, 2, 2)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return LookupModel(logits), TensorDataset(images, torch.tensor(labels)), logits


RANKS = [0] * 8 + [2] * 6 + [7] * 6  # 8 top-1 hits, 14 top-5 hits, 20 samples


def expected_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z = logits.double()
    return float((torch.logsumexp(z, dim=1) - z[torch.arange(len(labels)), labels]).mean())


def test_evaluate_known_predictions_with_top5() -> None:
    model, data, logits = lookup_problem(20, RANKS)
    result = evaluate(model, DataLoader(data, batch_size=6), device="cpu")
    assert isinstance(result, Accuracy)
    assert result.samples == 20
    assert result.top1 == pytest.approx(40.0)
    assert result.top5 == pytest.approx(70.0)
    assert result.loss == pytest.approx(expected_loss(logits, data.tensors[1]), rel=1e-6)
    assert "top-1 40.00 %" in str(result)


def test_evaluate_top5_only_above_ten_classes() -> None:
    for classes, has_top5 in ((10, False), (11, True)):
        model, data, _ = lookup_problem(classes, RANKS)
        result = evaluate(model, DataLoader(data, batch_size=5), device="cpu")
        assert (result.top5 is not None) == has_top5
        assert result.top1 == pytest.approx(40.0)


def test_evaluate_max_samples_cuts_the_last_batch() -> None:
    model, data, logits = lookup_problem(20, RANKS)
    calls: list[tuple[int, int | None]] = []
    result = evaluate(
        model,
        DataLoader(data, batch_size=4),
        device="cpu",
        max_samples=10,
        progress=lambda done, total, _msg: calls.append((done, total)),
    )
    assert result.samples == 10
    assert result.top1 == pytest.approx(80.0)  # 8 of the first 10 are top-1 hits
    assert result.loss == pytest.approx(expected_loss(logits[:10], data.tensors[1][:10]), rel=1e-6)
    assert calls == [(4, 10), (8, 10), (10, 10)]
    assert len(model.modes) == 3  # stopped without running a fourth batch


def test_evaluate_restores_mode_and_runs_in_eval() -> None:
    model, data, _ = lookup_problem(20, RANKS)
    model.train()
    evaluate(model, DataLoader(data, batch_size=8), device="cpu")
    assert model.training
    assert model.modes and not any(model.modes)
    model.eval()
    evaluate(model, DataLoader(data, batch_size=8), device="cpu", amp="bf16")  # autocast is CUDA-only
    assert not model.training


def test_evaluate_errors() -> None:
    model, data, _ = lookup_problem(10, RANKS)
    with pytest.raises(ConfigError, match="max_samples"):
        evaluate(model, DataLoader(data, batch_size=4), device="cpu", max_samples=0)
    with pytest.raises(DataError, match="no samples"):
        evaluate(model, [], device="cpu")
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        evaluate(model, DataLoader(data, batch_size=4), device="cpu", cancel=token)
    bad = TensorDataset(data.tensors[0], data.tensors[1] + 5)  # labels up to 14 for 10 outputs
    with pytest.raises(ConfigError, match="10 outputs"):
        evaluate(model, DataLoader(bad, batch_size=20), device="cpu")


def test_evaluate_a_trained_model_on_digits() -> None:
    preset = Preset(
        arch="logreg", input_size=(1, 8, 8), mean=D.DIGITS_MEAN, std=D.DIGITS_STD, num_classes=10, hflip=False
    )
    train = D.load_dataset("digits", "train", preset)
    test = D.load_dataset("digits", "test", preset)
    x_train = torch.stack([train[i][0] for i in range(len(train))])
    y_train = torch.tensor(train.targets)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        optimiser.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimiser.step()
    result = evaluate(model, D.make_loader(test, batch_size=64), device="cpu")
    x_test = torch.stack([test[i][0] for i in range(len(test))])
    y_test = torch.tensor(test.targets)
    with torch.no_grad():
        logits = model(x_test)
    assert result.samples == 360 and result.top5 is None
    assert result.top1 == pytest.approx(100.0 * (logits.argmax(1) == y_test).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(logits, y_test).item(), rel=1e-4)
    assert result.top1 > 85.0


# --------------------------------------------------------------------------------------------- MACs
def conv_macs(conv: nn.Conv2d, h_out: int, w_out: int) -> int:
    k_h, k_w = conv.kernel_size
    return conv.out_channels * conv.in_channels * k_h * k_w * h_out * w_out // conv.groups


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 8, 1))
        self.layer2 = nn.Sequential(Block(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# hand-computed for a 3×16×16 input
STEM = 8 * 3 * 9 * 16 * 16
LAYER1_BLOCK = 2 * (8 * 8 * 9 * 16 * 16)
LAYER2_BLOCK = 16 * 8 * 9 * 8 * 8 + 16 * 16 * 9 * 8 * 8 + 16 * 8 * 8 * 8
FC = 16 * 10
TINY_TOTAL = STEM + 2 * LAYER1_BLOCK + LAYER2_BLOCK + FC


def test_count_macs_conv_and_linear() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 16×16 out
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4),  # 8×8 out, grouped
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )
    expected = 8 * 3 * 9 * 16 * 16 + (8 * 8 * 9 * 8 * 8) // 4 + 8 * 8 * 8 * 10
    assert count_macs(model, (3, 16, 16)) == expected
    assert count_macs(nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False)), (3, 2, 2)) == 60


def test_count_macs_small_resnet_restores_mode_and_leaves_statistics() -> None:
    model = TinyResNet().train()
    running = model.bn.running_mean.clone()
    assert count_macs(model, (3, 16, 16)) == TINY_TOTAL
    assert model.training
    assert torch.equal(model.bn.running_mean, running)
    assert int(model.bn.num_batches_tracked) == 0


def test_module_macs_maps_to_qualified_names() -> None:
    model = TinyResNet()
    macs = module_macs(model, (3, 16, 16))
    assert set(macs) == {name for name, _ in model.named_modules()}
    assert macs[""] == TINY_TOTAL == count_macs(model, (3, 16, 16))
    assert macs["stem"] == STEM
    assert macs["layer1.0"] == macs["layer1.1"] == LAYER1_BLOCK
    assert macs["layer2.0"] == LAYER2_BLOCK
    assert macs["layer1"] == 2 * LAYER1_BLOCK
    assert macs["layer2.0.conv1"] == conv_macs(model.layer2[0].conv1, 8, 8)
    assert macs["layer2.0.shortcut.0"] == conv_macs(model.layer2[0].shortcut[0], 8, 8)
    assert macs["layer1.0.conv2"] == conv_macs(model.layer1[0].conv2, 16, 16)
    assert macs["fc"] == FC
    assert macs["layer1.0.bn1"] == 0 and macs["pool"] == 0
    blocks = [macs[name] for name in ("layer1.0", "layer1.1", "layer2.0")]
    assert sum(blocks) <= macs[""]


def test_module_macs_with_a_shared_module() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Conv2d(2, 2, 1, bias=False)
            self.second = self.first  # the same module under two names

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    model = Twice()
    macs = module_macs(model, (2, 3, 3))
    single = 2 * 2 * 3 * 3
    assert set(macs) == {"", "first"}
    assert macs == {"": 2 * single, "first": 2 * single}


def test_macs_reject_bad_input_size() -> None:
    with pytest.raises(ConfigError, match="input_size"):
        count_macs(nn.Identity(), (3, 32))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="input_size"):
        module_macs(nn.Identity(), (3, 0, 8))


# --------------------------------------------------------------------------------------------- params
def test_count_params_counts_shared_parameters_once() -> None:
    a, b = nn.Linear(5, 5), nn.Linear(5, 5)
    b.weight = a.weight  # tied weights
    assert count_params(nn.Sequential(a, b)) == 25 + 5 + 5
    assert count_params(nn.Sequential(a, nn.ReLU(), a)) == 30
    assert count_params(TinyResNet()) == sum(p.numel() for p in TinyResNet().parameters())
    assert count_params(nn.ReLU()) == 0


# --------------------------------------------------------------------------------------------- latency
def test_measure_latency_gives_sane_numbers() -> None:
    model = TinyResNet().train()
    latency = measure_latency(model, (3, 16, 16), batch_size=4, device="cpu", warmup=2, repeats=7)
    assert isinstance(latency, Latency)
    assert 0 < latency.p10_ms <= latency.median_ms <= latency.p90_ms < 10_000
    assert latency.batch_size == 4 and latency.repeats == 7
    assert latency.device.startswith("cpu")
    assert math.isclose(latency.throughput, 4 * 1000.0 / latency.median_ms)
    assert model.training
    assert "images/s" in str(latency)


def test_measure_latency_validates_arguments() -> None:
    model = nn.Conv2d(3, 3, 1)
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(model, (3, 4, 4), device="cpu", repeats=0)
    with pytest.raises(ConfigError, match="batch_size"):
        measure_latency(model, (3, 4, 4), device="cpu", batch_size=0)
    with pytest.raises(ConfigError, match="warmup"):
        measure_latency(model, (3, 4, 4), device="cpu", warmup=-1)
    with pytest.raises(ConfigError, match="input_size"):
        measure_latency(model, (3, 4), device="cpu")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ attention MACs
def _vit_tiny_macs_by_hand() -> int:
    """vit_tiny: 32×32×3 input, patch 8, width 64, 4 heads, MLP 128, 4 blocks, 10 classes (see the registry)."""
    patches, width, mlp, blocks, classes = (32 // 8) ** 2, 64, 128, 4, 10
    tokens = patches + 1  # + the class token
    patch_embedding = width * patches * (3 * 8 * 8)  # a stride-8 8×8 conv: one dot product per output value
    qkv = tokens * width * 3 * width
    scores = tokens * tokens * width  # Q·Kᵀ over all heads: heads × tokens² × (width / heads)
    weighted = tokens * tokens * width  # softmax(QKᵀ)·V
    out_proj = tokens * width * width
    mlp_macs = 2 * tokens * width * mlp
    head = width * classes  # the class token only
    return patch_embedding + blocks * (qkv + scores + weighted + out_proj + mlp_macs) + head


def test_attention_macs_match_a_hand_computed_reference() -> None:
    """The fused inference fast path hides attention from FlopCounterMode; the count must not lose it."""
    from cka_analysis.models import build_model

    model = build_model("vit_tiny", weights="random").eval()
    assert count_macs(model, (3, 32, 32)) == _vit_tiny_macs_by_hand() == 2_573_440
    # the same under no_grad/inference mode, which is where the fast path would be taken
    with torch.inference_mode():
        assert count_macs(model, (3, 32, 32)) == 2_573_440


def test_counting_macs_never_switches_the_attention_fast_path_off_for_other_threads() -> None:
    """Another session's forward passes keep the fast path while MACs are counted in a worker thread."""
    import threading

    from cka_analysis.models import build_model

    mha = torch.backends.mha
    assert mha.get_fastpath_enabled()
    model = build_model("vit_tiny", weights="random").eval()
    seen_off = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not mha.get_fastpath_enabled():
                seen_off.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    counter = threading.Thread(target=lambda: [count_macs(model, (3, 32, 32)) for _ in range(15)])
    counter.start()
    counter.join(120)
    stop.set()
    watcher.join(10)
    assert not seen_off.is_set(), "count_macs switched torch.backends.mha's fast path off process-wide"
    assert mha.get_fastpath_enabled()


# ------------------------------------------------------------------------------------------------ estimates
def test_estimate_seconds_scales_with_the_work_and_leaves_the_model_alone() -> None:
    from cka_analysis.metrics import TRAIN_STEP_PASSES, estimate_seconds
    from cka_analysis.models import build_model

    model = build_model("digits_resnet", weights="demo").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = estimate_seconds(model, 100, 1.0, "cpu", batch_size=16)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert one.per_image_s > 0 and one.seconds == pytest.approx(one.per_image_s * 100)
    assert one.device.startswith("cpu") and one.probe_s > 0
    train = estimate_seconds(model, 100, TRAIN_STEP_PASSES, "cpu", batch_size=16)
    assert train.seconds == pytest.approx(train.per_image_s * 100 * TRAIN_STEP_PASSES)
    assert "on cpu" in str(one)


def test_estimate_seconds_tracks_the_real_cost_of_a_bigger_model() -> None:
    """ResNet-56 has ~50× the MACs of the digits demo: the probe must see that it is slower per image."""
    from cka_analysis.metrics import estimate_seconds
    from cka_analysis.models import build_model

    # the fastest of 5 repeats each, and a 3× margin for a 50× MAC ratio: load spikes on a shared machine cannot
    # flip the comparison
    small = estimate_seconds(build_model("digits_resnet", weights="random"), 64, 1.0, "cpu", batch_size=16,
                             repeats=5)
    big = estimate_seconds(build_model("cifar_resnet56", weights="random"), 64, 1.0, "cpu", batch_size=16,
                           repeats=5)
    assert big.per_image_s > 3 * small.per_image_s, (small.per_image_s, big.per_image_s)


def test_estimate_seconds_validates_its_arguments() -> None:
    from cka_analysis.metrics import estimate_seconds, format_duration
    from cka_analysis.models import build_model

    model = build_model("digits_resnet", weights="random")
    with pytest.raises(ConfigError, match="images"):
        estimate_seconds(model, 0)
    with pytest.raises(ConfigError, match="passes"):
        estimate_seconds(model, 10, passes=0)
    with pytest.raises(ConfigError, match="batch_size"):
        estimate_seconds(model, 10, batch_size=0)
    assert [format_duration(s) for s in (0.2, 8.1, 100, 7260)] == ["1 s", "9 s", "1 min 40 s", "2 h 01 min"]
    with pytest.raises(ConfigError, match="seconds"):
        format_duration(-1)
