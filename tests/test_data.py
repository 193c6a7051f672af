"""Tests for cka_analysis.data: spec parsing, the digits/CIFAR/imagefolder loaders, transforms and helpers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.transforms.v2 import functional as TF

from cka_analysis import data as D
from cka_analysis.errors import Cancelled, ConfigError, DataError
from cka_analysis.models.preset import Preset
from cka_analysis.progress import CancelToken

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_preset(
    channels: int = 3,
    size: int | tuple[int, int] = 8,
    *,
    mean: float | tuple[float, ...] = 0.0,
    std: float | tuple[float, ...] = 1.0,
    resize_size: int | None = None,
    hflip: bool = True,
    crop_padding: int = 4,
    num_classes: int = 10,
) -> Preset:
    h, w = (size, size) if isinstance(size, int) else size
    mean_t = mean if isinstance(mean, tuple) else (mean,) * channels
    std_t = std if isinstance(std, tuple) else (std,) * channels
    return Preset(
        arch="test",
        input_size=(channels, h, w),
        mean=mean_t,
        std=std_t,
        num_classes=num_classes,
        resize_size=resize_size,
        hflip=hflip,
        crop_padding=crop_padding,
    )


DIGITS_PRESET = make_preset(1, 8, mean=D.DIGITS_MEAN, std=D.DIGITS_STD, hflip=False, crop_padding=1)


def random_pixels(rng: np.random.Generator, width: int, height: int, mode: str) -> np.ndarray:
    shape = (height, width) if mode == "L" else (height, width, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def make_folder(
    root: Path,
    layout: dict[str, dict[str, int]],
    *,
    size: tuple[int, int] = (12, 10),
    mode: str = "RGB",
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Write ``layout[split][class] = count`` random images of ``size`` (width, height) under ``root``."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(random_pixels(rng, *size, mode)).save(folder / f"{i:03d}.{fmt}")
    return root


TWO_SPLITS = {"train": {"cat": 3, "dog": 2, "fox": 2}, "test": {"cat": 1, "dog": 2, "fox": 1}}


# --------------------------------------------------------------------------------------------- spec parsing
@pytest.mark.parametrize(
    ("text", "kind", "root"),
    [
        ("digits", "digits", None),
        ("  Digits ", "digits", None),
        ("cifar10", "cifar10", None),
        ("cifar10:/data/cifar", "cifar10", Path("/data/cifar")),
        ("CIFAR100:/x/y", "cifar100", Path("/x/y")),
        ("imagefolder:/data/pets", "imagefolder", Path("/data/pets")),
        ("imagefolder:C:/data/pets", "imagefolder", Path("C:/data/pets")),
    ],
)
def test_parse_data_spec_accepts(text: str, kind: str, root: Path | None) -> None:
    spec = D.parse_data_spec(text)
    assert spec == D.DataSpec(kind, root)
    assert D.parse_data_spec(str(spec)) == spec
    assert D.parse_data_spec(spec) is spec


def test_parse_data_spec_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert D.parse_data_spec("imagefolder:~/pets").root == tmp_path / "pets"


@pytest.mark.parametrize(
    "text", ["", "mnist", "imagefolder", "imagefolder:", "imagefolder:  ", "cifar10:", "digits:/tmp/x", "svhn:/x"]
)
def test_parse_data_spec_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        D.parse_data_spec(text)
    assert D.SPEC_FORMS in str(err.value)


def test_parse_data_spec_rejects_non_string() -> None:
    with pytest.raises(ConfigError, match="spec string"):
        D.parse_data_spec(42)  # type: ignore[arg-type]


def test_parse_data_spec_hints_imagefolder_for_a_bare_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"imagefolder:{tmp_path}"):
        D.parse_data_spec(str(tmp_path))


def test_dataspec_validates_directly() -> None:
    with pytest.raises(ConfigError, match="needs a folder"):
        D.DataSpec("imagefolder", None)
    assert D.DataSpec("cifar10", "/a/b").root == Path("/a/b")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- digits
def test_digits_split_sizes_and_determinism() -> None:
    train = D.load_dataset("digits", "train", DIGITS_PRESET)
    test = D.load_dataset("digits", "test", DIGITS_PRESET)
    assert (len(train), len(test)) == (1437, 360)
    again = D.load_dataset("digits", "train", DIGITS_PRESET)
    assert again.targets == train.targets
    assert torch.equal(torch.stack([again.raw(i) for i in range(20)]), torch.stack([train.raw(i) for i in range(20)]))
    assert D.dataset_classes(train) == [str(d) for d in range(10)]


def test_digits_split_is_stratified_and_complete() -> None:
    from sklearn.datasets import load_digits

    full = Counter(int(t) for t in load_digits().target)
    train = Counter(D.load_dataset("digits", "train", DIGITS_PRESET).targets)
    test = Counter(D.load_dataset("digits", "test", DIGITS_PRESET).targets)
    for label, count in full.items():
        assert train[label] + test[label] == count
        assert abs(test[label] - 0.2 * count) <= 1.0


def test_digits_values_and_statistics() -> None:
    train = D.load_dataset("digits", "train", DIGITS_PRESET)
    raw = torch.stack([train.raw(i) for i in range(len(train))])
    assert raw.dtype == torch.float32 and raw.shape == (1437, 1, 8, 8)
    assert raw.min() == 0.0 and raw.max() == 1.0
    assert torch.equal(raw * 16, (raw * 16).round())  # 17 grey levels, /16
    assert D.DIGITS_MEAN[0] == pytest.approx(raw.double().mean().item(), abs=1e-7)
    assert D.DIGITS_STD[0] == pytest.approx(raw.double().std(unbiased=False).item(), abs=1e-7)
    items = torch.stack([train[i][0] for i in range(len(train))])
    assert items.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert items.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    image, label = train[5]
    assert isinstance(label, int) and label == train.targets[5]
    assert image.dtype == torch.float32


# --------------------------------------------------------------------------------------------- transforms
def test_digits_follow_an_rgb_preset() -> None:
    preset = make_preset(3, 32, mean=0.5, std=0.5)
    ds = D.load_dataset("digits", "test", preset)
    image, _ = ds[0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert image.min() >= -1.0 - 1e-6 and image.max() <= 1.0 + 1e-6


def test_normalisation_of_constant_images(tmp_path: Path) -> None:
    colours = {"a": (128, 64, 200), "b": (0, 255, 30)}
    for name, colour in colours.items():
        for split in ("train", "test"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (6, 6), colour).save(tmp_path / split / name / "x.png")
    mean, std = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "test", make_preset(3, 6, mean=mean, std=std))
    for index, colour in enumerate(colours.values()):
        image, label = ds[index]
        assert label == index
        expected = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, mean, std, strict=True)])
        assert torch.allclose(image, expected[:, None, None].expand(3, 6, 6), atol=1e-6)


def test_rgb_images_become_pil_grayscale_for_one_channel_presets(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(8, 8))
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(1, 8))
    for index in range(len(ds)):
        image, _ = ds[index]
        assert image.shape == (1, 8, 8)
        gray = np.asarray(Image.open(ds.paths[index]).convert("L"), dtype=np.float32) / 255
        assert torch.allclose(image[0], torch.from_numpy(gray), atol=1e-6)


def test_gray_images_repeat_for_rgb_presets(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(8, 8), mode="L")
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "test", make_preset(3, 8))
    image, _ = ds[0]
    gray = np.asarray(Image.open(ds.paths[0]), dtype=np.float32) / 255
    assert image.shape == (3, 8, 8)
    for c in range(3):
        assert torch.allclose(image[c], torch.from_numpy(gray), atol=1e-6)


def test_images_are_resized_to_the_preset(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(20, 12))
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(3, 8))
    image, _ = ds[0]
    assert image.shape == (3, 8, 8)
    raw = TF.pil_to_tensor(Image.open(ds.paths[0]).convert("RGB"))
    expected = TF.resize(raw, [8, 8], antialias=True).float() / 255
    assert torch.allclose(image, expected, atol=1e-6)


def test_resize_size_then_center_crop(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(40, 30))
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "test", make_preset(3, 16, resize_size=20))
    image, _ = ds[1]
    raw = TF.pil_to_tensor(Image.open(ds.paths[1]).convert("RGB"))
    expected = TF.center_crop(TF.resize(raw, [20], antialias=True), [16, 16]).float() / 255
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image, expected, atol=1e-6)


def test_images_of_the_right_size_are_not_resampled(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(10, 10))
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(3, 10, resize_size=12))
    raw = TF.pil_to_tensor(Image.open(ds.paths[2]).convert("RGB")).float() / 255
    assert torch.allclose(ds[2][0], raw, atol=1e-6)


def test_augmentation_changes_small_images_but_keeps_shape() -> None:
    preset = make_preset(1, 8, mean=D.DIGITS_MEAN, std=D.DIGITS_STD, hflip=True, crop_padding=2)
    plain = D.load_dataset("digits", "train", preset)
    augmented = D.load_dataset("digits", "train", preset, augment=True)
    reference = plain[3][0]
    assert torch.equal(reference, plain[3][0])  # evaluation is deterministic
    draws = [augmented[3][0] for _ in range(12)]
    assert all(d.shape == (1, 8, 8) for d in draws)
    assert any(not torch.equal(d, reference) for d in draws)
    assert len({tuple(d.flatten().tolist()) for d in draws}) > 1


def test_augmentation_respects_no_flip_no_padding() -> None:
    preset = make_preset(1, 8, mean=D.DIGITS_MEAN, std=D.DIGITS_STD, hflip=False, crop_padding=0)
    plain = D.load_dataset("digits", "train", preset)
    augmented = D.load_dataset("digits", "train", preset, augment=True)
    for i in range(5):
        assert torch.equal(plain[i][0], augmented[i][0])


def test_augmentation_of_large_images_uses_random_resized_crop(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(100, 90))
    spec = f"imagefolder:{tmp_path}"
    preset = make_preset(3, 80, hflip=False)
    augmented = D.load_dataset(spec, "train", preset, augment=True)
    assert "RandomResizedCrop" in repr(augmented.transform)
    draws = [augmented[0][0] for _ in range(6)]
    assert all(d.shape == (3, 80, 80) for d in draws)
    assert len({tuple(d.flatten()[:50].tolist()) for d in draws}) > 1


def test_build_transform_rejects_unsupported_channel_counts() -> None:
    preset = Preset(arch="t", input_size=(2, 8, 8), mean=(0, 0), std=(1, 1), num_classes=2)
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        D.load_dataset("digits", "train", preset)


def test_match_channels() -> None:
    rgb = torch.tensor([[[10]], [[200]], [[30]]], dtype=torch.uint8)
    pil = Image.new("RGB", (1, 1), (10, 200, 30)).convert("L").getpixel((0, 0))
    assert D.match_channels(rgb, 1).item() == pil
    gray = torch.full((1, 2, 2), 77, dtype=torch.uint8)
    assert torch.equal(D.match_channels(gray, 3), torch.full((3, 2, 2), 77, dtype=torch.uint8))
    assert torch.equal(D.match_channels(D.match_channels(gray, 3), 1), gray)  # grey survives a round trip
    with pytest.raises(DataError):
        D.match_channels(torch.zeros(2, 3, 3), 3)


def test_split_must_be_train_or_test() -> None:
    with pytest.raises(ConfigError, match="split"):
        D.load_dataset("digits", "val", DIGITS_PRESET)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_reads_classes_and_ignores_non_images(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "README.md").write_text("a file next to the class folders")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(3, 8))
    assert len(ds) == 7
    assert ds.classes == ["cat", "dog", "fox"] == D.dataset_classes(ds)
    assert ds.targets == [0, 0, 0, 1, 1, 2, 2] == D.dataset_targets(ds)
    assert all(p.endswith(".png") for p in ds.paths)
    assert not ds.in_memory
    image, label = ds[6]
    assert image.shape == (3, 8, 8) and label == 2


def test_imagefolder_falls_back_to_val(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 3}})
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "test", make_preset(3, 8))
    assert len(ds) == 4 and ds.targets == [0, 1, 1, 1]
    assert "val" in ds.description


def test_imagefolder_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        D.load_dataset(f"imagefolder:{tmp_path / 'nope'}", "train", make_preset())
    assert str(tmp_path / "nope") in str(err.value)


def test_imagefolder_missing_split_lists_what_is_there(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train": {"a": 1, "b": 1}})
    (tmp_path / "validation").mkdir()
    with pytest.raises(DataError) as err:
        D.load_dataset(f"imagefolder:{tmp_path}", "test", make_preset())
    message = str(err.value)
    assert "test/ or val/" in message and "train/" in message and "validation/" in message


def test_imagefolder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(DataError, match="no class folders"):
        D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset())


def test_imagefolder_one_class(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train": {"only": 3}})
    with pytest.raises(DataError, match="a classifier needs at least two") as err:
        D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset())
    assert "'only'" in str(err.value)


def test_imagefolder_empty_class(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "train" / "c" / "labels.csv").write_text("x")
    with pytest.raises(DataError, match="hold no images") as err:
        D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset())
    assert str(tmp_path / "train" / "c") in str(err.value)


def test_imagefolder_class_names_must_match_between_splits(tmp_path: Path) -> None:
    make_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "test": {"a": 1, "b": 1, "d": 1}})
    for split in ("train", "test"):
        with pytest.raises(DataError, match="same class folders") as err:
            D.load_dataset(f"imagefolder:{tmp_path}", split, make_preset())  # type: ignore[arg-type]
        assert "['c']" in str(err.value) and "['d']" in str(err.value)


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_imagefolder_corrupt_file_fails_when_loaded(tmp_path: Path, content: str) -> None:
    make_folder(tmp_path, TWO_SPLITS, fmt="jpg")
    bad = tmp_path / "train" / "dog" / "001.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"this is not a jpeg" if content == "garbage" else data[: len(data) // 2])
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset())
    assert ds[0][0].shape == (3, 8, 8)  # the good files still load
    index = ds.paths.index(str(bad))
    with pytest.raises(DataError, match="corrupt") as err:
        ds[index]
    assert str(bad) in str(err.value)
    with pytest.raises(DataError) as err:
        D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(), in_memory=True)
    assert str(bad) in str(err.value)


def test_in_memory_equals_on_the_fly(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(11, 9), fmt="jpg")
    gray = tmp_path / "train" / "dog" / "gray.png"
    Image.fromarray(random_pixels(np.random.default_rng(1), 11, 9, "L")).save(gray)
    spec = f"imagefolder:{tmp_path}"
    for preset in (make_preset(3, 8, mean=0.4, std=0.3), make_preset(1, 11, resize_size=None)):
        calls: list[tuple[int, int | None]] = []
        disk = D.load_dataset(spec, "train", preset)
        memory = D.load_dataset(
            spec, "train", preset, in_memory=True, progress=lambda done, total, _m, calls=calls: calls.append((done, total))
        )
        assert memory.in_memory and not disk.in_memory
        assert memory.targets == disk.targets and memory.classes == disk.classes
        assert calls[-1] == (len(disk), len(disk))
        for i in range(len(disk)):
            assert torch.equal(memory[i][0], disk[i][0])
            assert torch.equal(memory.raw(i), disk.raw(i))


def test_in_memory_with_mixed_sizes(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS, size=(12, 10))
    Image.new("RGB", (30, 20), (1, 2, 3)).save(tmp_path / "test" / "cat" / "big.png")
    spec = f"imagefolder:{tmp_path}"
    preset = make_preset(3, 8)
    disk = D.load_dataset(spec, "test", preset)
    memory = D.load_dataset(spec, "test", preset, in_memory=True)
    assert {tuple(memory.raw(i).shape) for i in range(len(memory))} == {(3, 10, 12), (3, 20, 30)}
    for i in range(len(disk)):
        assert torch.equal(memory[i][0], disk[i][0])


def test_in_memory_refuses_too_much(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(tmp_path, TWO_SPLITS)
    monkeypatch.setattr(D, "IN_MEMORY_LIMIT_BYTES", 1000)
    with pytest.raises(ConfigError, match="in_memory"):
        D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(), in_memory=True)


def test_in_memory_decoding_can_be_cancelled(tmp_path: Path) -> None:
    make_folder(tmp_path, TWO_SPLITS)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(), in_memory=True, cancel=token)


# --------------------------------------------------------------------------------------------- cifar
@pytest.mark.parametrize(("kind", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_without_download(tmp_path: Path, kind: str, folder: str) -> None:
    with pytest.raises(DataError) as err:
        D.load_dataset(f"{kind}:{tmp_path}", "test", make_preset(3, 32))
    message = str(err.value)
    assert str(tmp_path) in message and "download=True" in message and "--download" in message
    assert folder in message


def test_cifar_default_root_is_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKA_PRUNE_CACHE", str(tmp_path))
    with pytest.raises(DataError) as err:
        D.load_dataset("cifar10", "train", make_preset(3, 32))
    assert str(tmp_path / "datasets" / "cifar-10-batches-py") in str(err.value)


def test_cifar_corrupt_folder(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="incomplete or corrupt"):
        D.load_dataset(f"cifar10:{tmp_path}", "train", make_preset(3, 32))


# --------------------------------------------------------------------------------------------- helpers
def test_targets_and_classes_through_subsets() -> None:
    train = D.load_dataset("digits", "train", DIGITS_PRESET)
    sub = Subset(Subset(train, list(range(100, 200))), [5, 0, 99])
    assert D.dataset_targets(sub) == [train.targets[105], train.targets[100], train.targets[199]]
    assert D.dataset_classes(sub) == train.classes
    tensors = TensorDataset(torch.zeros(4, 1), torch.tensor([2, 0, 1, 2]))
    assert D.dataset_targets(tensors) == [2, 0, 1, 2]
    assert D.dataset_classes(tensors) == ["0", "1", "2"]


def test_targets_fall_back_to_reading_items() -> None:
    class Plain(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.zeros(1), [4, 1, 4][i]

    assert D.dataset_targets(Plain()) == [4, 1, 4]


def test_calibration_subset_is_balanced_and_deterministic() -> None:
    train = D.load_dataset("digits", "train", DIGITS_PRESET)
    sub = D.calibration_subset(train, 100, seed=3)
    assert len(sub) == 100 and len(set(sub.indices)) == 100
    assert set(Counter(D.dataset_targets(sub)).values()) == {10}
    assert D.calibration_subset(train, 100, seed=3).indices == sub.indices
    assert D.calibration_subset(train, 100, seed=4).indices != sub.indices
    labels = D.dataset_targets(sub)
    assert labels != sorted(labels)  # shuffled, so that batches mix classes
    odd = Counter(D.dataset_targets(D.calibration_subset(train, 25)))
    assert sum(odd.values()) == 25 and set(odd.values()) == {2, 3} and len(odd) == 10


def test_calibration_subset_redistributes_small_classes() -> None:
    labels = torch.tensor([0] * 2 + [1] * 20 + [2] * 20)
    data = TensorDataset(torch.arange(42).float(), labels)
    counts = Counter(D.dataset_targets(D.calibration_subset(data, 16)))
    assert counts[0] == 2 and counts[1] + counts[2] == 14 and abs(counts[1] - counts[2]) == 0
    counts = Counter(D.dataset_targets(D.calibration_subset(data, 17)))
    assert counts[0] == 2 and sorted([counts[1], counts[2]]) == [7, 8]
    everything = D.calibration_subset(data, 42)
    assert sorted(everything.indices) == list(range(42))


@pytest.mark.parametrize("n", [0, 3, -1])
def test_calibration_subset_too_small(n: int) -> None:
    data = TensorDataset(torch.zeros(10), torch.arange(10) % 2)
    with pytest.raises(ConfigError, match="at least 4 samples"):
        D.calibration_subset(data, n)


def test_calibration_subset_too_large() -> None:
    data = TensorDataset(torch.zeros(10), torch.arange(10) % 2)
    with pytest.raises(ConfigError, match="11") as err:
        D.calibration_subset(data, 11)
    assert "10" in str(err.value)
    with pytest.raises(ConfigError, match="integer"):
        D.calibration_subset(data, 5.0)  # type: ignore[arg-type]


def test_make_loader_defaults_and_seeded_shuffle() -> None:
    train = D.load_dataset("digits", "train", DIGITS_PRESET)
    loader = D.make_loader(train, batch_size=64, device="cpu")
    assert loader.num_workers == 0 and not loader.pin_memory
    images, labels = next(iter(loader))
    assert images.shape == (64, 1, 8, 8) and labels.dtype == torch.int64
    assert labels.tolist() == train.targets[:64]

    def first_labels(seed: int) -> list[int]:
        return next(iter(D.make_loader(train, batch_size=32, shuffle=True, seed=seed)))[1].tolist()

    assert first_labels(1) == first_labels(1)
    assert first_labels(1) != first_labels(2)
    dropped = D.make_loader(train, batch_size=100, drop_last=True)
    assert len(dropped) == 14 and all(len(b[1]) == 100 for b in dropped)


def test_make_loader_validates_arguments() -> None:
    train = D.load_dataset("digits", "test", DIGITS_PRESET)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="batch_size"):
            D.make_loader(train, batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="num_workers"):
        D.make_loader(train, batch_size=4, num_workers=-1)


def test_make_loader_with_workers_on_folder_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_folder(tmp_path, TWO_SPLITS)
    ds = D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(3, 8))
    monkeypatch.setattr(D, "SMALL_DATASET", 0)
    assert D.default_num_workers(ds) == min(4, D._cpu_count())
    assert D.default_num_workers(D.load_dataset(f"imagefolder:{tmp_path}", "train", make_preset(), in_memory=True)) == 0
    loader = D.make_loader(ds, batch_size=4, num_workers=1)
    assert loader.persistent_workers
    batches = [labels.tolist() for _, labels in loader]
    assert batches == [[0, 0, 0, 1], [1, 2, 2]]


def test_check_num_classes() -> None:
    train = D.load_dataset("digits", "test", DIGITS_PRESET)
    D.check_num_classes(train, 10)
    with pytest.raises(ConfigError) as err:
        D.check_num_classes(train, 100)
    message = str(err.value)
    assert "10 classes" in message and "100 outputs" in message
    assert "num_classes=10" in message and "--num-classes 10" in message


# --------------------------------------------------------------------------------------------- shared data
@pytest.mark.data
def test_shared_cifar10_jpeg_folder(shared_data: Path) -> None:
    spec = f"imagefolder:{shared_data / 'cifar10-jpeg'}"
    preset = make_preset(3, 32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    train = D.load_dataset(spec, "train", preset)
    test = D.load_dataset(spec, "test", preset)
    assert (len(train), len(test)) == (50_000, 10_000)
    assert train.classes == CIFAR10_CLASSES == test.classes
    assert Counter(D.dataset_targets(train)) == dict.fromkeys(range(10), 5000)
    assert Counter(D.dataset_targets(test)) == dict.fromkeys(range(10), 1000)
    for index in (0, 12_345, 49_999):
        image, label = train[index]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert label == train.targets[index]
        assert Path(train.paths[index]).parent.name == CIFAR10_CLASSES[label]
    sub = D.calibration_subset(train, 500)
    assert set(Counter(D.dataset_targets(sub)).values()) == {50}
    D.check_num_classes(test, 10)
