"""The bad-input catalogue of issue 8, library side: each case gives a clear error (checked by its key words)
and leaves the library usable — the next valid call works.

Data folders, channel mismatch, class count, calibration size, unreachable targets, non-removable blocks,
NaN/Inf activations, CUDA without CUDA, out-of-memory during scoring, unknown models, corrupt files.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cka_analysis.blocks import find_blocks, remove_blocks
from cka_analysis.cka import CKAOptions, MinibatchCKA, cka_matrix, linear_cka
from cka_analysis.data import (
    calibration_subset,
    check_num_classes,
    load_dataset,
    make_loader,
    parse_data_spec,
)
from cka_analysis.device import resolve_device
from cka_analysis.errors import (
    BlockError,
    CheckpointError,
    CKAPruneError,
    ConfigError,
    DataError,
    DeviceError,
    TargetError,
)
from cka_analysis.export import open_model
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.models import build_model
from cka_analysis.pruning import Target, plan, prune
from cka_analysis.scoring import ScoringOptions, score_blocks

ON_CPU = ScoringOptions(device="cpu")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits() -> torch.nn.Module:
    return open_model("digits_resnet", weights="demo")


@pytest.fixture(scope="module")
def calib(digits: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """32 class-balanced training images of the digits demo, as tensors."""
    subset = calibration_subset(load_dataset("digits", "train", digits.cka_preset), 32, seed=0)
    images = torch.stack([subset[i][0] for i in range(len(subset))])
    labels = torch.tensor([subset[i][1] for i in range(len(subset))])
    return images, labels


@pytest.fixture(scope="module")
def reference_cka(digits, calib) -> dict[str, float]:
    return score_blocks(digits, calib, "cka", options=ScoringOptions(device="cpu", batch_size=32)).scores


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _folder(root: Path, classes: dict[str, int], *, mode: str = "RGB", splits=("train", "test")) -> Path:
    for split in splits:
        for c, count in classes.items():
            for i in range(count):
                _image(root / split / c / f"{i}.png", mode, seed=hash((split, c, i)) % 1000)
    return root


# ------------------------------------------------------------------------------------------------ data folders
def test_missing_and_empty_data_folders(tmp_path: Path, digits) -> None:
    preset = digits.cka_preset
    with pytest.raises(DataError, match=r"does not exist.*expected .*train/<class>"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", "train", preset)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"has no train/ folder \(it holds: nothing\)"):
        load_dataset(f"imagefolder:{empty}", "train", preset)
    (empty / "train").mkdir()
    with pytest.raises(DataError, match="has no class folders"):
        load_dataset(f"imagefolder:{empty}", "train", preset)
    (empty / "train" / "a").mkdir()
    (empty / "train" / "b").mkdir()
    with pytest.raises(DataError, match="hold no images"):
        load_dataset(f"imagefolder:{empty}", "train", preset)
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset(f"imagefolder:{_image(tmp_path / 'x.png')}", "train", preset)
    with pytest.raises(ConfigError, match="needs a folder"):
        parse_data_spec("imagefolder")
    # a valid folder right after works
    good = _folder(tmp_path / "good", {"a": 2, "b": 2})
    assert len(load_dataset(f"imagefolder:{good}", "train", preset)) == 4


def test_folder_with_one_class(tmp_path: Path, digits) -> None:
    root = _folder(tmp_path / "one", {"only": 3})
    with pytest.raises(DataError, match=r"only one class folder \('only'\).*at least two"):
        load_dataset(f"imagefolder:{root}", "train", digits.cka_preset)
    _folder(root, {"second": 2})
    assert load_dataset(f"imagefolder:{root}", "train", digits.cka_preset).classes == ["only", "second"]


def test_non_image_files_among_images(tmp_path: Path, digits) -> None:
    """Files without an image extension are skipped; a file that claims to be an image but is not names itself."""
    root = _folder(tmp_path / "mixed", {"a": 2, "b": 2})
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "train" / "b" / "Thumbs.db").write_bytes(b"\x00" * 10)
    ds = load_dataset(f"imagefolder:{root}", "train", digits.cka_preset)
    assert len(ds) == 4 and all(ds[i][0].shape == (1, 8, 8) for i in range(4))
    fake = root / "train" / "b" / "fake.jpg"
    fake.write_text("<html>this is a web page saved as .jpg</html>")
    ds = load_dataset(f"imagefolder:{root}", "train", digits.cka_preset)
    bad = ds.paths.index(str(fake))
    with pytest.raises(DataError, match=r"cannot decode image file .*fake\.jpg.*corrupt or not an image"):
        ds[bad]
    with pytest.raises(DataError, match=r"fake\.jpg"):
        load_dataset(f"imagefolder:{root}", "train", digits.cka_preset, in_memory=True)
    assert ds[(bad + 1) % len(ds)][0].shape == (1, 8, 8)  # the other items still load


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_truncated_and_corrupt_images(tmp_path: Path, digits, cut: float) -> None:
    root = _folder(tmp_path / "trunc", {"a": 2, "b": 2})
    big = _image(root / "train" / "a" / "big.jpg", size=(64, 64), seed=5)
    Image.open(big).convert("RGB").save(big, quality=90)
    data = big.read_bytes()
    big.write_bytes(data[: int(len(data) * cut)])
    ds = load_dataset(f"imagefolder:{root}", "train", digits.cka_preset)
    with pytest.raises(DataError, match=r"big\.jpg"):
        ds[ds.paths.index(str(big))]
    big.write_bytes(data)  # repaired, it loads
    ds = load_dataset(f"imagefolder:{root}", "train", digits.cka_preset)
    assert ds[ds.paths.index(str(big))][0].shape == (1, 8, 8)


def test_grayscale_images_for_an_rgb_model_and_back(tmp_path: Path, digits) -> None:
    gray = _folder(tmp_path / "gray", {"a": 2, "b": 2}, mode="L")
    rgb_model = build_model("cifar_resnet20").eval()
    ds = load_dataset(f"imagefolder:{gray}", "train", rgb_model.cka_preset)
    image, raw = ds[0][0], ds.raw(0)
    assert image.shape == (3, 32, 32) and raw.shape[0] == 3
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[1], raw[2])  # the grey channel, repeated
    with torch.no_grad():
        assert rgb_model(image[None]).shape == (1, 10)
    rgb = _folder(tmp_path / "rgb", {"a": 2, "b": 2}, mode="RGB")
    ds1 = load_dataset(f"imagefolder:{rgb}", "train", digits.cka_preset)
    assert ds1[0][0].shape == (1, 8, 8)
    with torch.no_grad():
        assert digits(ds1[0][0][None]).shape == (1, 10)


def test_wrong_num_classes(tmp_path: Path, digits) -> None:
    root = _folder(tmp_path / "three", {"a": 2, "b": 2, "c": 2})
    ds = load_dataset(f"imagefolder:{root}", "train", digits.cka_preset)
    with pytest.raises(ConfigError) as info:
        check_num_classes(ds, 10)
    msg = str(info.value)
    assert "3 classes" in msg and "10 outputs" in msg and "num_classes=3" in msg and "--num-classes 3" in msg
    check_num_classes(ds, 3)
    three = build_model("digits_resnet", num_classes=3)
    check_num_classes(ds, three.cka_preset.num_classes)
    with pytest.raises(ConfigError, match="positive integer"):
        build_model("digits_resnet", num_classes=0)


def test_calibration_size(digits) -> None:
    ds = load_dataset("digits", "train", digits.cka_preset)
    for n in (0, 1, 3):
        with pytest.raises(ConfigError, match=f"n={n} calibration samples is too few.*at least 4"):
            calibration_subset(ds, n)
    with pytest.raises(ConfigError, match=rf"only {len(ds)} items; use n ≤ {len(ds)}"):
        calibration_subset(ds, len(ds) + 1)
    with pytest.raises(ConfigError, match="must be an integer"):
        calibration_subset(ds, 12.5)  # type: ignore[arg-type]
    assert len(calibration_subset(ds, 4)) == 4
    assert len(calibration_subset(ds, len(ds))) == len(ds)


def test_too_few_images_for_cka_scoring(digits, calib) -> None:
    x, y = calib
    with pytest.raises(ConfigError, match="at least 4 examples for the debiased estimator, got 3"):
        score_blocks(digits, (x[:3], y[:3]), "cka", options=ScoringOptions(debiased=True, device="cpu"))
    with pytest.raises(ConfigError, match="at least 2 examples, got 1"):
        score_blocks(digits, (x[:1], y[:1]), "cka", options=ON_CPU)
    with pytest.raises(ConfigError, match="yielded no images"):
        score_blocks(digits, (x[:0], y[:0]), "cka", options=ON_CPU)
    with pytest.raises(ConfigError, match="needs calibration images"):
        score_blocks(digits, None, "cka", options=ON_CPU)
    with pytest.raises(ConfigError, match=r"images \(32\) and labels \(5\) differ"):
        score_blocks(digits, (x, y[:5]), "cka", options=ON_CPU)
    debiased = ScoringOptions(debiased=True, device="cpu")
    assert len(score_blocks(digits, (x[:4], y[:4]), "cka", options=debiased).scores) == 7


# ------------------------------------------------------------------------------------------------ targets and blocks
def test_target_that_cannot_be_met(digits, calib, reference_cka) -> None:
    blocks = find_blocks(digits)
    macs, params = count_macs(digits, digits.cka_preset.input_size), count_params(digits)
    with pytest.raises(TargetError, match=r"cannot be met: removing all 7 removable blocks gives [\d.]+ % fewer MACs"):
        plan(blocks, reference_cka, Target("macs", 0.95), base_macs=macs, base_params=params)
    with pytest.raises(TargetError, match="remove 8 block"):
        plan(blocks, reference_cka, Target("blocks", 8), base_macs=macs, base_params=params)
    with pytest.raises(TargetError, match="fewer parameters"):
        prune(digits, calib, target="params:99%", criterion="random")
    with pytest.raises(TargetError, match="cannot be met"):
        prune(digits, calib, target="8 blocks", criterion="weight_norm", iterative=True)
    for text, words in (("macs:150%", "between 0 and 1"), ("0 blocks", "whole number ≥ 1"), ("half", "not understood")):
        with pytest.raises(ConfigError, match=words):
            Target.parse(text)
    ok = plan(blocks, reference_cka, Target("blocks", 7), base_macs=macs, base_params=params)
    assert len(ok.blocks) == 7


def test_selecting_a_non_removable_or_unknown_block(digits, reference_cka) -> None:
    with pytest.raises(BlockError, match=r"'layer2.0' cannot be removed: downsampling block"):
        remove_blocks(digits, ["layer1.0", "layer2.0"])
    with pytest.raises(BlockError, match=r"'layer9.9' is not a residual block.*layer1.0"):
        remove_blocks(digits, ["layer9.9"])
    once = remove_blocks(digits, ["layer1.0"])
    with pytest.raises(BlockError, match="already been removed"):
        remove_blocks(once, ["layer1.0"])
    blocks = find_blocks(digits)
    macs, params = count_macs(digits, digits.cka_preset.input_size), count_params(digits)
    with pytest.raises(CKAPruneError, match=r"'layer3.0' cannot be removed: downsampling"):
        plan(blocks, None, base_macs=macs, base_params=params, chosen=["layer3.0"])
    with pytest.raises(CKAPruneError, match="'conv1' is not a block"):
        plan(blocks, None, base_macs=macs, base_params=params, chosen=["conv1"])
    with pytest.raises(CKAPruneError, match="cannot be removed"):
        prune(digits, blocks_to_remove=["layer2.0"])
    with pytest.raises(ConfigError, match="not removable blocks"):
        score_blocks(digits, None, "random", candidates=["layer2.0"])
    assert [n for n in digits.state_dict() if n.startswith("layer2.0.")]  # the model was not touched
    assert prune(digits, blocks_to_remove=["layer1.0"]).removed == ["layer1.0"]


# ------------------------------------------------------------------------------------------------ NaN / Inf
def _with_nan(model: torch.nn.Module) -> torch.nn.Module:
    bad = copy.deepcopy(model)
    bad.layer2[1].bn1.running_var.fill_(math.nan)  # e.g. a diverged fine-tune
    return bad


@pytest.mark.parametrize("criterion", ["cka", "taylor", "block_influence", "angular", "loss"])
def test_nan_activations_are_an_error_not_a_score(digits, calib, criterion: str) -> None:
    with pytest.raises(ConfigError, match="NaN or Inf") as info:
        score_blocks(_with_nan(digits), calib, criterion, options=ON_CPU)
    msg = str(info.value)
    assert "weights" in msg and "amp" in msg
    if criterion != "cka":
        assert "layer2.1" in msg  # the first affected block is named
    x, y = calib
    assert math.isfinite(sum(score_blocks(digits, (x[:8], y[:8]), criterion, options=ON_CPU).scores.values()))


def test_nan_weights_and_nan_pixels(digits, calib) -> None:
    bad = copy.deepcopy(digits)
    with torch.no_grad():
        bad.layer3[1].conv2.weight[0, 0, 0, 0] = math.inf
    with pytest.raises(ConfigError, match=r"'weight_norm' scores of 1 block\(s\) \(layer3.1\) are NaN or Inf"):
        score_blocks(bad, None, "weight_norm")
    x, y = calib
    x = x.clone()
    x[5, 0, 3, 3] = math.nan
    with pytest.raises(ConfigError, match="NaN or Inf"):
        score_blocks(digits, (x, y), "cka", options=ON_CPU)
    with pytest.raises(ConfigError, match="NaN or Inf"):
        prune(digits, (x, y), target="2 blocks", scoring=ScoringOptions(device="cpu"))


def test_nan_activations_in_the_cka_heatmap(digits, calib) -> None:
    x, _ = calib
    with pytest.raises(ConfigError, match=r"activations of layer2\.1, layer2\.2.*contain NaN or Inf"):
        cka_matrix(_with_nan(digits), [x], options=CKAOptions(device="cpu"))
    with pytest.raises(ConfigError, match="NaN or Inf"):
        linear_cka(torch.full((8, 3), math.inf), torch.randn(8, 3))
    result = cka_matrix(digits, [x], options=CKAOptions(device="cpu"))
    assert torch.isfinite(result.matrix).all() and "layer2.1" in result.names_a


# ------------------------------------------------------------------------------------------------ devices
def test_cuda_requested_without_cuda(monkeypatch: pytest.MonkeyPatch, digits, calib) -> None:
    """Runs on GPU machines too: CUDA is reported absent, as on a CPU-only PyTorch build."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec in ("cuda", "cuda:1", "CUDA"):
        with pytest.raises(DeviceError, match=r"CUDA is not available.*--device cpu"):
            resolve_device(spec)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        score_blocks(digits, calib, "cka", options=ScoringOptions(device="cuda"))
    with pytest.raises(DeviceError, match="CUDA is not available"):
        prune(digits, calib, target="1 block", scoring=ScoringOptions(device="cuda"))
    with pytest.raises(DeviceError, match="CUDA is not available"):
        cka_matrix(digits, [calib[0]], options=CKAOptions(device="cuda"))
    with pytest.raises(DeviceError, match="CUDA is not available"):
        make_loader(torch.utils.data.TensorDataset(*calib), batch_size=8, device="cuda")
    with pytest.raises(ConfigError, match="not understood; choose one of auto, cpu, cuda, mps"):
        resolve_device("gpu")
    assert resolve_device("auto").type in ("cpu", "mps")
    x, y = calib
    assert len(score_blocks(digits, (x[:8], y[:8]), "cka", options=ScoringOptions(device="auto")).scores) == 7


# ------------------------------------------------------------------------------------------------ out of memory
class _OOMAbove:
    """A forward hook that raises CUDA's out-of-memory error for batches larger than ``limit`` images.

    ``every`` > 1 raises only on every n-th call, so that an attempt fails part-way through a batch (after some
    candidates were already recorded), as real memory pressure does.
    """

    def __init__(self, module: torch.nn.Module, limit: int, every: int = 1) -> None:
        self.limit, self.every, self.calls = limit, every, 0
        self.sizes: list[int] = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        if not args[0].any():  # the zero image of find_blocks' MACs probe, not a calibration batch
            return out
        n = args[0].shape[0]
        self.sizes.append(n)
        if n > self.limit:
            self.calls += 1
            if self.calls % self.every == 0:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} MiB (test)")
        return out


@pytest.mark.parametrize(("criterion", "every"), [("cka", 1), ("cka", 3), ("loss", 4), ("taylor", 1)])
def test_out_of_memory_retries_with_smaller_batches(digits, calib, criterion: str, every: int) -> None:
    """A batch that runs out of memory is split in halves until it fits; the scores are those of a run that fit.

    ``every`` > 1 makes the failure happen after part of the batch was recorded: nothing may be counted twice.
    """
    ref = score_blocks(digits, calib, criterion, options=ScoringOptions(device="cpu", batch_size=32)).scores
    model = copy.deepcopy(digits)
    hook = _OOMAbove(model.avgpool, limit=8, every=every)
    try:
        got = score_blocks(model, calib, criterion, options=ScoringOptions(device="cpu", batch_size=32))
    finally:
        hook.handle.remove()
    assert max(hook.sizes) == 32 and min(hook.sizes) <= 8
    assert got.samples == 32
    for name, value in ref.items():
        assert got.scores[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name


def test_out_of_memory_even_for_one_image_is_a_message(digits, calib) -> None:
    model = copy.deepcopy(digits)
    hook = _OOMAbove(model.conv1, limit=0)
    with pytest.raises(ConfigError, match=r"out of memory while scoring even a single image.*--device cpu"):
        score_blocks(model, calib, "cka", options=ScoringOptions(device="cpu", batch_size=16))
    assert sorted(set(hook.sizes), reverse=True) == [16, 8, 4, 2, 1]
    hook.handle.remove()
    assert len(score_blocks(model, calib, "cka", options=ON_CPU).scores) == 7  # usable afterwards


def test_other_runtime_errors_are_not_taken_for_out_of_memory(digits, calib) -> None:
    model = copy.deepcopy(digits)

    def broken(module, args, out):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    handle = model.avgpool.register_forward_hook(broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        score_blocks(model, calib, "cka", options=ON_CPU)
    handle.remove()


# ------------------------------------------------------------------------------------------------ names and files
def test_unknown_model_and_weights_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnet5'\. Did you mean .*resnet50.*Available: "):
        build_model("resnet5")
    with pytest.raises(ConfigError, match=r"unknown model 'digit_resnet'. Did you mean digits_resnet"):
        open_model("digit_resnet")
    with pytest.raises(ConfigError, match=r"neither a file nor a named source of digits_resnet.*DEFAULT, demo"):
        open_model("digits_resnet", weights="imagenet")
    with pytest.raises(ConfigError, match="is not understood; accepted specs"):
        parse_data_spec("mnist")
    assert open_model("digits_resnet", weights="DEFAULT").cka_preset.arch == "digits_resnet"


def test_corrupt_or_truncated_files(tmp_path: Path, digits) -> None:
    good = tmp_path / "good.pt"
    torch.save(digits.state_dict(), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        open_model("digits_resnet", weights=cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        open_model("digits_resnet", weights=junk)
    assert torch.equal(open_model("digits_resnet", weights=good).linear.bias, digits.linear.bias)


def test_minibatch_cka_rejects_mismatched_layers_and_recovers() -> None:
    acc = MinibatchCKA()
    with pytest.raises(ConfigError, match="same examples"):
        acc.update([torch.randn(8, 3), torch.randn(6, 3)])
    acc.update([torch.randn(8, 3), torch.randn(8, 3)])
    assert acc.compute().shape == (2, 2)


def test_one_out_of_memory_detector() -> None:
    from cka_analysis.device import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not raised by an allocator


def test_eval_mode_gives_every_submodule_its_own_flag_back(digits) -> None:
    from cka_analysis.device import eval_mode

    model = copy.deepcopy(digits).train()
    model.bn1.eval()  # a deliberate mix: frozen BatchNorm in a training network
    before = {name: m.training for name, m in model.named_modules()}
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model) as inner:
        assert inner is model and not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == before


def test_every_evaluation_gives_a_mixed_train_eval_model_its_flags_back(digits, calib) -> None:
    """Frozen BatchNorm in a training network stays frozen, and the rest keeps training, after anything that runs
    the model in eval mode (``model.train(was_training)`` would switch the frozen layer back to training)."""
    from cka_analysis.blocks import find_blocks
    from cka_analysis.metrics import count_macs, evaluate, measure_latency

    model = copy.deepcopy(digits).train()
    model.layer1[0].bn1.eval()
    before = {name: m.training for name, m in model.named_modules()}
    x, y = calib
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16], y[:16]), batch_size=8)
    evaluate(model, loader, device="cpu")
    count_macs(model, (1, 8, 8))
    measure_latency(model, (1, 8, 8), batch_size=2, device="cpu", warmup=1, repeats=1)
    find_blocks(model)
    score_blocks(model, (x[:8], y[:8]), "block_influence", options=ON_CPU)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_train_mode_trains_inside_and_restores_each_flag(digits) -> None:
    from cka_analysis.device import train_mode

    model = copy.deepcopy(digits).eval()
    model.layer2.train()
    before = {name: m.training for name, m in model.named_modules()}
    with train_mode(model):
        assert all(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == before
