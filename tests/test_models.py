"""Tests for the model registry (cka_analysis.models): every family builds on CPU with random weights, presets say
what the model expects, named weight sources and local checkpoints load strictly (offline errors are clear), the
bundled digits demo reaches its recorded accuracy, and — with the shared data — the public ResNet-56 checkpoint
gives the accuracy its README states on the JPEG copy of CIFAR-10."""

from __future__ import annotations

import json
import urllib.request
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from cka_analysis.blocks import find_blocks
from cka_analysis.config import asset_path
from cka_analysis.data import calibration_subset, load_dataset, make_loader
from cka_analysis.errors import CheckpointError, ConfigError
from cka_analysis.metrics import count_params, evaluate
from cka_analysis.models import (
    Preset,
    available_models,
    build_model,
    get_preset,
    model_entry,
    weight_names,
)
from cka_analysis.models.cifar_resnet import CifarResNet, OptionAShortcut
from cka_analysis.models.preset import IMAGENET_MEAN, IMAGENET_STD

CIFAR = ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110"]
# Parameter counts: the akamaster README / shared weights README (CIFAR), torchvision's model docs (ImageNet).
PARAMS = {
    "cifar_resnet20": 269_722,
    "cifar_resnet32": 464_154,
    "cifar_resnet44": 658_586,
    "cifar_resnet56": 853_018,
    # ResNet-110 (1.7 M in the README): the per-block count of the depths above, extended to 18 blocks/stage
    "cifar_resnet110": 269_722 + (18 - 3) * (853_018 - 269_722) // (9 - 3),
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "mobilenet_v2": 3_504_872,
    "vit_b_16": 86_567_656,
}
# (model, forward input size): small inputs keep the CPU cost low; the ImageNet nets are fully convolutional.
FORWARD = [
    *[(n, (3, 32, 32)) for n in CIFAR],
    ("digits_resnet", (1, 8, 8)),
    ("resnet18", (3, 64, 64)),
    ("resnet34", (3, 64, 64)),
    ("resnet50", (3, 64, 64)),
    ("mobilenet_v2", (3, 64, 64)),
    ("vit_tiny", (3, 32, 32)),
]



# ----------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_family() -> None:
    names = available_models()
    assert names == sorted(names)
    expected = {*CIFAR, "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "vit_b_16", "vit_tiny",
                "digits_resnet"}
    assert expected <= set(names)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet5'.*resnet50"):
        build_model("resnet5")


@pytest.mark.parametrize(("name", "input_size"), FORWARD, ids=[n for n, _ in FORWARD])
def test_build_and_forward_with_random_weights(name: str, input_size: tuple[int, int, int]) -> None:
    model = build_model(name).eval()
    preset = get_preset(model)
    assert preset.arch == name
    assert preset.weights == "random"
    x = torch.randn(2, *input_size)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    feats: list[torch.Tensor] = []
    handle = classifier.register_forward_pre_hook(lambda m, args: feats.append(args[0]))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    assert out.shape == (2, preset.num_classes)
    assert classifier.out_features == preset.num_classes
    assert torch.isfinite(out).all()
    # the penultimate features depend on the input (the ViT head itself is zero-initialised by torchvision)
    assert not torch.equal(feats[0][0], feats[0][1])
    if name in PARAMS:
        assert count_params(model) == PARAMS[name]


@pytest.mark.parametrize(("name", "n_blocks", "n_removable"), [("resnet101", 33, 29), ("vit_b_16", 12, 12)])
def test_large_models_build(name: str, n_blocks: int, n_removable: int) -> None:
    model = build_model(name)
    preset = get_preset(model)
    assert preset.input_size == (3, 224, 224)
    assert preset.num_classes == 1000
    assert count_params(model) == PARAMS[name]
    # their residual blocks (checked here, where the model is built anyway, to save a second slow build)
    blocks = find_blocks(model, count_macs=False)
    assert (len(blocks), sum(b.removable for b in blocks)) == (n_blocks, n_removable)


def test_num_classes_override() -> None:
    model = build_model("resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert get_preset(model).num_classes == 7
    cifar = build_model("cifar_resnet20", num_classes=100)
    assert cifar.linear.out_features == 100
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet18", num_classes=0)


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", CIFAR)
def test_cifar_preset_uses_imagenet_normalisation(name: str) -> None:
    preset = get_preset(build_model(name))
    assert preset.input_size == (3, 32, 32)
    assert preset.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert preset.std == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert preset.num_classes == 10
    assert "ImageNet" in preset.notes


def test_presets_of_other_families() -> None:
    digits = get_preset(build_model("digits_resnet"))
    assert digits.input_size == (1, 8, 8)
    assert len(digits.mean) == len(digits.std) == 1
    assert digits.hflip is False  # mirrored digits are other digits
    assert digits.num_classes == 10
    for name in ("resnet18", "mobilenet_v2"):
        p = model_entry(name).preset
        assert p.input_size == (3, 224, 224)
        assert p.resize_size == 256
        assert (p.mean, p.std, p.num_classes) == (IMAGENET_MEAN, IMAGENET_STD, 1000)
    tiny = model_entry("vit_tiny").preset
    assert tiny.input_size == (3, 32, 32)


def test_preset_round_trip_and_validation() -> None:
    p = get_preset(build_model("cifar_resnet20"))
    assert Preset.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ConfigError, match="channels"):
        Preset("x", (3, 32, 32), (0.5,), (0.5,), 10)
    with pytest.raises(ConfigError, match="unknown fields"):
        Preset.from_dict({**p.to_dict(), "colour": "red"})
    with pytest.raises(ConfigError, match="carries no preset"):
        get_preset(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------- CIFAR ResNets
def test_cifar_resnet_layout_and_option_a_shortcut() -> None:
    model = build_model("cifar_resnet20")
    assert isinstance(model, CifarResNet)
    children = [n for n, _ in model.named_children()]
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "linear"):
        assert name in children
    assert [len(getattr(model, f"layer{s}")) for s in (1, 2, 3)] == [3, 3, 3]
    # the shortcut of a downsampling block: stride-2 subsampling + zero channel padding, no parameters
    sc = model.layer2[0].shortcut
    assert isinstance(sc, OptionAShortcut)
    assert sum(p.numel() for p in sc.parameters()) == 0
    x = torch.randn(2, 16, 32, 32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert not any(k.startswith(("layer2.0.shortcut", "layer3.0.shortcut")) for k in model.state_dict())


def _akamaster_file(model: nn.Module, path: Path) -> Path:
    """Save ``model`` the way the public CIFAR checkpoints are stored: {'state_dict', 'best_prec1'},
    keys prefixed ``module.``, no ``num_batches_tracked``."""
    state = OrderedDict(
        (f"module.{k}", v.clone()) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    )
    torch.save({"state_dict": state, "best_prec1": 91.0}, path)
    return path


def test_public_checkpoint_layout_loads_strictly(tmp_path: Path) -> None:
    src = build_model("cifar_resnet20").eval()
    with torch.no_grad():  # non-trivial BN statistics so that a missed key would show in the outputs
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    path = _akamaster_file(src, tmp_path / "resnet20-test.th")
    loaded = build_model("cifar_resnet20", weights=path).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), src(x))
    assert get_preset(loaded).weights == str(path.resolve())
    # strict matching: wrong depth and wrong class count are refused with the likely cause
    with pytest.raises(CheckpointError, match="wrong depth"):
        build_model("cifar_resnet32", weights=path)
    with pytest.raises(CheckpointError, match="wrong number of classes"):
        build_model("cifar_resnet20", weights=path, num_classes=100)


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pt"
    torch.save(build_model("cifar_resnet20"), path)  # a pickled module, not a state dict
    with pytest.raises(CheckpointError, match="refused to load"):
        build_model("cifar_resnet20", weights=path)


def test_bad_weights_arguments() -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("cifar_resnet20", weights="/nonexistent/r20.th")
    with pytest.raises(ConfigError, match=r"named sources: DEFAULT, cifar10"):
        build_model("cifar_resnet20", weights="imagenet")
    with pytest.raises(ConfigError, match="10 classes but num_classes=100"):
        build_model("cifar_resnet56", weights="cifar10", num_classes=100)


# ---------------------------------------------------------------------------------- named weight sources
def test_named_weight_sources() -> None:
    assert weight_names("cifar_resnet56") == ["cifar10", "cifar10jpeg"]
    assert weight_names("cifar_resnet20") == ["cifar10", "cifar10jpeg"]
    assert weight_names("cifar_resnet110") == ["cifar10"]
    assert weight_names("resnet50") == ["IMAGENET1K_V1", "IMAGENET1K_V2"]
    assert weight_names("digits_resnet") == ["demo"]
    assert weight_names("vit_tiny") == []
    assert model_entry("resnet50").default_weights == "IMAGENET1K_V2"
    assert model_entry("cifar_resnet56").default_weights == "cifar10"
    src = model_entry("cifar_resnet56").weights["cifar10"]
    assert src.url is not None and src.url.endswith("resnet56-4bfd9763.th")
    assert src.sha256_prefix == "4bfd9763"
    tv = model_entry("resnet18").weights["IMAGENET1K_V1"]
    assert tv.torchvision == "ResNet18_Weights.IMAGENET1K_V1" and tv.num_classes == 1000


def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache and shared-data folder, and every HTTP(S) request routed to a closed local port."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CKA_PRUNE_CACHE", str(cache))
    monkeypatch.setenv("CKA_PRUNE_DATA", str(tmp_path / "no_shared_data"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # rebuild the opener with the proxy settings above
    return cache


def test_uncached_named_weights_offline_give_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = _offline(monkeypatch, tmp_path)
    with pytest.raises(CheckpointError) as info:
        build_model("cifar_resnet110", weights="cifar10")
    msg = str(info.value)
    assert "resnet110-1d1ed7c2.th" in msg
    assert "not cached" in msg
    assert str(cache / "checkpoints" / "resnet110-1d1ed7c2.th") in msg
    assert "could not be downloaded" in msg
    assert not (cache / "checkpoints" / "resnet110-1d1ed7c2.th").exists()  # no partial file left behind
    # torchvision weights go through the same cache; with downloads disabled nothing is attempted
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth are not cached .*downloads are disabled"):
        build_model("resnet18", weights="IMAGENET1K_V1", allow_download=False)
    # weights only the shared data folder holds: the error says where they were expected
    with pytest.raises(CheckpointError, match=r"resnet56-cifar10jpeg\.th.*CKA_PRUNE_DATA"):
        build_model("cifar_resnet56", weights="cifar10jpeg")


def test_cached_named_weights_load_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = _offline(monkeypatch, tmp_path)
    src = build_model("cifar_resnet20").eval()
    (cache / "checkpoints").mkdir(parents=True)
    _akamaster_file(src, cache / "checkpoints" / "resnet20-12fca82f.th")
    model = build_model("cifar_resnet20", weights="DEFAULT", allow_download=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    preset = get_preset(model)
    assert "cifar10" in preset.weights and "resnet20-12fca82f.th" in preset.weights
    assert "akamaster" in preset.notes


# ------------------------------------------------------------------------------------------- digits demo
@pytest.fixture(scope="module")
def digits_demo() -> nn.Module:
    return build_model("digits_resnet", weights="demo").eval()


def test_digits_demo_reaches_recorded_accuracy(digits_demo: nn.Module) -> None:
    meta = json.loads(asset_path("digits_resnet.json").read_text())
    preset = get_preset(digits_demo)
    assert preset.weights == "bundled digits_resnet.safetensors"
    test = load_dataset("digits", "test", preset)
    assert len(test) == 360
    acc = evaluate(digits_demo, make_loader(test, batch_size=180, num_workers=0), device="cpu")
    assert acc.samples == 360
    assert acc.top1 == pytest.approx(meta["test_top1"], abs=0.3)  # ≤ 1 image of 360 may differ across CPUs
    assert acc.top1 > 95
    assert count_params(digits_demo) == meta["params"]


def test_digits_demo_default_weights_are_the_bundled_ones(digits_demo: nn.Module) -> None:
    again = build_model("digits_resnet", weights="DEFAULT")
    for (k, a), b in zip(digits_demo.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------- public ResNet-56 (shared data)
def _public_r56(shared_data: Path) -> Path:
    files = sorted((shared_data / "weights").glob("resnet56-*.th"))
    public = [f for f in files if "cifar10jpeg" not in f.name]
    assert [f.name for f in public] == ["resnet56-4bfd9763.th"]
    return public[0]


@pytest.mark.data
def test_public_resnet56_checkpoint_keys_match_strictly(shared_data: Path) -> None:
    path = _public_r56(shared_data)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"state_dict", "best_prec1"}
    keys = list(raw["state_dict"])
    assert len(keys) == 277 and all(k.startswith("module.") for k in keys)
    model = build_model("cifar_resnet56")
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert {k.removeprefix("module.") for k in keys} == own
    loaded = build_model("cifar_resnet56", weights="cifar10")
    for k, v in raw["state_dict"].items():
        assert torch.equal(loaded.state_dict()[k.removeprefix("module.")], v), k
    assert "resnet56-4bfd9763.th" in get_preset(loaded).weights


@pytest.fixture(scope="module")
def cifar_test(shared_data: Path):
    r56 = build_model("cifar_resnet56", weights="cifar10").eval()
    test = load_dataset(f"imagefolder:{shared_data / 'cifar10-jpeg'}", "test", get_preset(r56))
    return r56, test


@pytest.mark.data
def test_public_resnet56_on_500_jpeg_test_images(cifar_test) -> None:
    r56, test = cifar_test
    sub = calibration_subset(test, 500, seed=0)  # 50 per class
    acc = evaluate(r56, make_loader(sub, batch_size=250, num_workers=0), device="cpu")
    assert acc.samples == 500
    assert acc.top1 > 70


@pytest.mark.data
def test_public_resnet56_accuracy_matches_readme(cifar_test) -> None:
    r56, test = cifar_test
    assert len(test) == 10_000
    acc = evaluate(r56, make_loader(test, batch_size=500), device="cpu")
    assert acc.samples == 10_000
    assert acc.top1 == pytest.approx(83.20, abs=0.1)  # the weights README's figure for the JPEG copy


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "weights", "expected"),
    [
        ("cifar_resnet20", "cifar10", 81.03),
        ("cifar_resnet20", "cifar10jpeg", 87.88),
        ("cifar_resnet56", "cifar10jpeg", 89.51),
    ],
)
def test_other_shared_checkpoints_match_their_readme(shared_data: Path, name: str, weights: str,
                                                     expected: float) -> None:
    """The figures the shared weights README states for the JPEG test copy (named sources resolve to the
    shared folder first)."""
    model = build_model(name, weights=weights).eval()
    test = load_dataset(f"imagefolder:{shared_data / 'cifar10-jpeg'}", "test", get_preset(model), in_memory=True)
    acc = evaluate(model, make_loader(test, batch_size=500), device="cpu")
    assert acc.samples == 10_000
    assert acc.top1 == pytest.approx(expected, abs=0.1)
