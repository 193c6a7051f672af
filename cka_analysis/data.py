"""Datasets for every entry point, named by one spec string.

A *data spec* says where images come from; the same four forms are accepted by the library, the CLI and the
dashboard:

* ``digits`` — scikit-learn's bundled 8×8 handwritten digits (offline, 1,797 images, 1 channel);
* ``cifar10[:ROOT]`` / ``cifar100[:ROOT]`` — torchvision's CIFAR archives (``ROOT`` defaults to
  ``cache_dir() / "datasets"``; downloaded only on request);
* ``imagefolder:ROOT`` — ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (or ``val/`` instead of
  ``test/``), read with torchvision's ImageFolder rules.

:func:`load_dataset` turns a spec, a split and a model :class:`~cka_analysis.models.preset.Preset` into a
dataset of ``(float32 image [C, H, W] normalised as the preset says, int label)``. Every image goes through
the same steps whatever its source: decode to uint8 RGB, convert to the preset's channel count, resize or crop
to the preset's size (or augment), scale to [0, 1] and normalise. ``in_memory=True`` decodes once and keeps
uint8 pixels, and gives exactly the same tensors as reading from disk.

Helpers pick a class-balanced calibration subset for CKA, build DataLoaders with sensible defaults, and check
that the data and the model agree on the number of classes. Heavy imports (torchvision, scikit-learn, PIL)
happen inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from .config import cache_dir
from .errors import ConfigError, DataError
from .progress import CancelToken, ProgressFn, check_cancel, no_progress

if TYPE_CHECKING:  # the model registry imports this module (DIGITS_MEAN), so no runtime import back
    from .models.preset import Preset

__all__ = [
    "DATA_KINDS",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "IN_MEMORY_LIMIT_BYTES",
    "SPEC_FORMS",
    "DataSpec",
    "ImageDataset",
    "build_transform",
    "calibration_subset",
    "check_num_classes",
    "dataset_classes",
    "dataset_targets",
    "default_num_workers",
    "load_dataset",
    "make_loader",
    "match_channels",
    "parse_data_spec",
    "validation_indices",
]

DATA_KINDS = ("digits", "cifar10", "cifar100", "imagefolder")
SPEC_FORMS = "digits, cifar10[:ROOT], cifar100[:ROOT] or imagefolder:ROOT"
SPLITS = ("train", "test")

# Pixel statistics of the digits training split (values / 16), population std over all 1437·64 pixels.
# tests/test_data.py recomputes them from the split, so they cannot drift from load_dataset("digits").
DIGITS_MEAN: tuple[float] = (0.30538339422407795,)
DIGITS_STD: tuple[float] = (0.3761191680900195,)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SEED = 0

# in_memory=True refuses to hold more decoded pixels than this (bytes of uint8 data).
IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
# Images at most this many pixels high and wide get CIFAR-style crop-with-padding augmentation.
SMALL_IMAGE_MAX = 64
# Datasets up to this size are served by the main process (worker start-up costs more than it saves).
SMALL_DATASET = 2048

_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------- data specs
@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec: the kind of source and its folder (None for ``digits`` and default CIFAR roots)."""

    kind: str
    root: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ConfigError(f"data kind {self.kind!r} is not known; accepted specs: {SPEC_FORMS}")
        if self.root is not None and not isinstance(self.root, Path):
            object.__setattr__(self, "root", Path(self.root))
        if self.kind == "digits" and self.root is not None:
            raise ConfigError(
                f"'digits' is bundled with scikit-learn and takes no folder (got {str(self.root)!r}); "
                f"accepted specs: {SPEC_FORMS}"
            )
        if self.kind == "imagefolder" and self.root is None:
            raise ConfigError(
                "'imagefolder' needs a folder: write imagefolder:ROOT where ROOT holds train/ and test/ "
                f"(or val/) with one subfolder per class; accepted specs: {SPEC_FORMS}"
            )

    def __str__(self) -> str:
        return self.kind if self.root is None else f"{self.kind}:{self.root}"


def parse_data_spec(spec: str | DataSpec) -> DataSpec:
    """Parse ``digits``, ``cifar10[:ROOT]``, ``cifar100[:ROOT]`` or ``imagefolder:ROOT`` into a DataSpec.

    The kind is case-insensitive; everything after the first colon is the folder (so Windows drive letters
    survive), with ``~`` expanded. Anything else raises ConfigError listing the accepted forms.
    """
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str):
        raise ConfigError(f"data={spec!r} must be a spec string; accepted specs: {SPEC_FORMS}")
    text = spec.strip()
    kind, sep, root = text.partition(":")
    kind = kind.strip().lower()
    root = root.strip()
    if kind not in DATA_KINDS:
        hint = ""
        if text and Path(text).expanduser().is_dir():
            hint = f" (to read the folder {text} write imagefolder:{text})"
        raise ConfigError(
            f"data={spec!r} is not understood{hint}; accepted specs: {SPEC_FORMS} "
            "(ROOT is a folder; CIFAR roots default to the download cache)"
        )
    if sep and not root:
        raise ConfigError(f"data={spec!r} ends with ':' but names no folder; accepted specs: {SPEC_FORMS}")
    return DataSpec(kind, Path(root).expanduser() if root else None)


# --------------------------------------------------------------------------------------------- transforms
def match_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert an image ``[..., C, H, W]`` with 1 or 3 channels to ``channels`` (1 or 3).

    Grayscale → RGB repeats the channel; RGB → grayscale uses the ITU-R 601-2 luma weights, for uint8 in
    exactly PIL's integer form (``convert("L")``), so grey pixels stored as RGB come back unchanged.
    """
    have = image.shape[-3]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        reps = [1] * image.dim()
        reps[-3] = 3
        return image.repeat(reps)
    if have == 3 and channels == 1:
        r, g, b = image.unbind(dim=-3)
        if image.dtype == torch.uint8:
            luma = (
                r.to(torch.int32) * 19595 + g.to(torch.int32) * 38470 + b.to(torch.int32) * 7471 + 32768
            ) >> 16
            return luma.to(torch.uint8).unsqueeze(-3)
        return (r * 0.299 + g * 0.587 + b * 0.114).unsqueeze(-3)
    raise DataError(f"an image has {have} channels but the model expects {channels}; only 1 ↔ 3 is converted")


class _FitSize:
    """Bring an image to ``size`` (H, W): unchanged when it already fits, else resize (or resize + crop)."""

    def __init__(self, size: tuple[int, int], resize_size: int | None) -> None:
        self.size = size
        self.resize_size = resize_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        if tuple(image.shape[-2:]) == self.size:
            return image
        if self.resize_size is not None:
            image = F.resize(image, [self.resize_size], antialias=True)
            return F.center_crop(image, list(self.size))
        return F.resize(image, list(self.size), antialias=True)

    def __repr__(self) -> str:
        return f"FitSize(size={self.size}, resize_size={self.resize_size})"


def build_transform(preset: Preset, *, augment: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image transform for a preset, taking a uint8 (or [0, 1] float) tensor ``[C, H, W]``.

    The input must already have the preset's channel count (see :func:`match_channels`). Evaluation: resize
    to the preset size when the image differs (``Resize(resize_size) + CenterCrop`` for presets that set
    ``resize_size``), scale to [0, 1], normalise. ``augment=True`` replaces the resize by the standard
    training augmentation: for small inputs (≤ 64 px) ``RandomCrop(size, padding=preset.crop_padding)``, for
    large ones ``RandomResizedCrop(size)``; both followed by a horizontal flip when ``preset.hflip``.
    """
    from torchvision.transforms import v2

    _check_preset(preset)
    _, height, width = preset.input_size
    size = (height, width)
    steps: list[Callable[[Any], Any]] = []
    if augment:
        if max(size) <= SMALL_IMAGE_MAX:
            steps.append(_FitSize(size, preset.resize_size))
            if preset.crop_padding > 0:
                steps.append(v2.RandomCrop(size, padding=preset.crop_padding))
        else:
            steps.append(v2.RandomResizedCrop(size, antialias=True))
        if preset.hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps.append(_FitSize(size, preset.resize_size))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(list(preset.mean), list(preset.std)))
    return v2.Compose(steps)


def _check_preset(preset: Preset) -> None:
    if preset.channels not in (1, 3):
        raise ConfigError(
            f"preset {preset.arch!r} has input_size={preset.input_size}; image data can feed 1 or 3 channels"
        )


# --------------------------------------------------------------------------------------------- decoding
def _read_image(path: str, channels: int) -> torch.Tensor:
    """Decode one image file to uint8 ``[channels, H, W]``; DataError naming the file when it is unreadable.

    JPEG, PNG and WebP go through torchvision's decoders (libjpeg-turbo/libpng, several times faster than
    PIL for small images); other formats, and files those decoders reject, go through PIL. Both paths
    decode to RGB first and then convert channels with :func:`match_channels`, so the result depends only on
    the file, never on the path taken (on-the-fly and in-memory loading agree exactly).
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read image file {path}: {exc}") from exc
    image: torch.Tensor | None = None
    if (
        data[:3] == b"\xff\xd8\xff"
        or data[:8] == _PNG_MAGIC
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    ):
        from torchvision.io import ImageReadMode, decode_image

        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            image = None  # let PIL try (it reads a few variants these builds reject) and report the error
    if image is None:
        image = _pil_decode(data, path)
    if image.dtype != torch.uint8:  # 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        image = to_dtype(image, torch.uint8, scale=True)
    return match_channels(image, channels)


def _pil_decode(data: bytes, path: str) -> torch.Tensor:
    from io import BytesIO

    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot decode image file {path} ({type(exc).__name__}: {exc}); the file is corrupt or not an "
            "image — delete or replace it"
        ) from exc
    return pil_to_tensor(rgb)


def _image_size_hint(path: str) -> tuple[int, int] | None:
    """(width, height) from the file header only, or None when PIL cannot tell."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError):
        return None


class _FileImages:
    """Images decoded from files on every access."""

    in_memory = False

    def __init__(self, paths: list[str], channels: int) -> None:
        self.paths = paths
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _read_image(self.paths[index], self.channels)


class _TensorImages:
    """Images held in memory: one ``[N, C, H, W]`` tensor, or a list when sizes differ."""

    in_memory = True

    def __init__(self, images: torch.Tensor | list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def _decode_all(
    paths: list[str],
    channels: int,
    *,
    where: str,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> torch.Tensor | list[torch.Tensor]:
    """Decode every file once; refuse (ConfigError) when the pixels would exceed IN_MEMORY_LIMIT_BYTES."""
    n = len(paths)
    limit = IN_MEMORY_LIMIT_BYTES

    def refuse(estimate: float) -> ConfigError:
        return ConfigError(
            f"in_memory=True would hold about {estimate / 1e9:.1f} GB of decoded pixels for the {n} images in "
            f"{where} (limit {limit / 1e9:.1f} GB); leave in_memory off (CLI: drop --in-memory) to read "
            "images from disk as they are needed"
        )

    # Early estimate from a few file headers, so that a huge folder is refused before minutes of decoding.
    probes = [paths[i] for i in sorted({round(k * (n - 1) / 15) for k in range(16)})] if n else []
    sizes = [s for s in (_image_size_hint(p) for p in probes) if s is not None]
    if sizes:
        estimate = sum(w * h for w, h in sizes) / len(sizes) * channels * n
        if estimate > limit:
            raise refuse(estimate)

    stacked: torch.Tensor | None = None
    items: list[torch.Tensor] | None = None
    used = 0
    step = max(1, min(1000, n // 100))
    for i, path in enumerate(paths):
        if i % 256 == 0:
            check_cancel(cancel, "decoding images")
        image = _read_image(path, channels)
        used += image.numel()
        if used > limit:
            raise refuse(used / (i + 1) * n)
        if i == 0:
            stacked = torch.empty((n, *image.shape), dtype=torch.uint8)
        if stacked is not None and image.shape == stacked.shape[1:]:
            stacked[i] = image
        else:
            if stacked is not None:  # sizes differ: keep a list instead of one block
                items = [stacked[j].clone() for j in range(i)]
                stacked = None
            assert items is not None
            items.append(image)
        if (i + 1) % step == 0 or i + 1 == n:
            progress(i + 1, n, f"decoding images in {where}")
    if stacked is not None:
        return stacked
    return items if items is not None else torch.empty((0, channels, 1, 1), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------- datasets
class ImageDataset(Dataset):
    """``(image, label)`` pairs: raw images (uint8 or [0, 1] float ``[C, H, W]``) passed through a transform.

    Attributes:
        targets: the label of every item (read without decoding any image).
        classes: class names, index = label.
        transform: the per-item transform (see :func:`build_transform`).
        paths: the image files for folder data, else None.
        in_memory: whether pixels are held in memory (no file access per item).
        description: where the data came from, for messages and reports.
    """

    def __init__(
        self,
        images: _FileImages | _TensorImages,
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Callable[[torch.Tensor], torch.Tensor],
        *,
        description: str,
        paths: list[str] | None = None,
    ) -> None:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self._images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        self.description = description
        self.paths = paths

    @property
    def in_memory(self) -> bool:
        return self._images.in_memory

    def __len__(self) -> int:
        return len(self.targets)

    def raw(self, index: int) -> torch.Tensor:
        """The image before the transform (uint8, or float for digits), in the preset's channel count."""
        return self._images[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._images[index]), self.targets[index]

    def __repr__(self) -> str:
        where = "in memory" if self.in_memory else "from disk"
        return f"ImageDataset({self.description}, {len(self)} images, {len(self.classes)} classes, {where})"


def load_dataset(
    spec: str | DataSpec,
    split: Literal["train", "test"],
    preset: Preset,
    *,
    augment: bool = False,
    download: bool = False,
    in_memory: bool = False,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ImageDataset:
    """Load one split of a data spec as ``(float32 [C, H, W] normalised per preset, int label)`` items.

    Args:
        spec: ``digits``, ``cifar10[:ROOT]``, ``cifar100[:ROOT]`` or ``imagefolder:ROOT``.
        split: ``"train"`` or ``"test"`` (``imagefolder`` falls back to ``val/`` when ``test/`` is absent).
        preset: the model's data contract: channels, size, mean/std, augmentation settings.
        augment: add the standard training augmentation (random crop, flip) — for fine-tuning.
        download: allow downloading CIFAR into ROOT when it is not there.
        in_memory: decode every image file once and keep uint8 pixels (the fast path for small images such
            as 50,000 CIFAR JPEGs; refused above IN_MEMORY_LIMIT_BYTES). Items are identical to reading
            from disk. digits and CIFAR archives are always in memory.
        progress: ``progress(done, total, message)`` while decoding for ``in_memory``.
        cancel: a CancelToken checked while decoding.

    Raises:
        ConfigError: bad spec, split or preset; DataError: missing, empty or unreadable data.
    """
    data = parse_data_spec(spec)
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} must be 'train' or 'test'")
    _check_preset(preset)
    transform = build_transform(preset, augment=augment)
    channels = preset.channels
    if data.kind == "digits":
        images, targets = _digits_split(split)
        return ImageDataset(
            _TensorImages(match_channels(images, channels)),
            targets,
            [str(d) for d in range(10)],
            transform,
            description=f"digits/{split}",
        )
    if data.kind in _CIFAR_FOLDERS:
        return _load_cifar(data, split, channels, transform, download)
    return _load_imagefolder(data, split, channels, transform, in_memory, progress or no_progress, cancel)


@lru_cache(maxsize=1)
def _digits_arrays() -> dict[str, tuple[torch.Tensor, list[int]]]:
    """scikit-learn's digits, split 80/20 stratified with seed 0; images as float32 [N, 1, 8, 8] in [0, 1]."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = np.asarray(bunch.target)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        index, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SEED, shuffle=True
    )
    pixels = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    out = {}
    for name, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        sel = torch.from_numpy(idx)
        out[name] = (pixels[sel].contiguous(), [int(t) for t in labels[idx]])
    return out


def _digits_split(split: str) -> tuple[torch.Tensor, list[int]]:
    return _digits_arrays()[split]


def _load_cifar(
    data: DataSpec,
    split: str,
    channels: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
    download: bool,
) -> ImageDataset:
    folder = _CIFAR_FOLDERS[data.kind]
    root = (data.root if data.root is not None else cache_dir() / "datasets").expanduser()
    if root.name == folder:  # ROOT may name the extracted folder itself
        root = root.parent
    if not download and not (root / folder).is_dir():
        raise DataError(
            f"{data.kind} is not at {root / folder}; pass download=True (CLI: --download) to fetch it into "
            f"{root}, or point ROOT ({data.kind}:ROOT) at a folder containing {folder}/"
        )
    from torchvision import datasets

    cls = datasets.CIFAR10 if data.kind == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{data.kind} at {root / folder} is incomplete or corrupt ({exc}); delete the folder and load with "
            "download=True (CLI: --download), or point ROOT at an intact copy"
        ) from exc
    except OSError as exc:  # network errors while downloading (URLError is an OSError)
        raise DataError(f"downloading {data.kind} into {root} failed: {exc}") from exc
    pixels = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # [N, 3, 32, 32] uint8
    if channels != 3:
        pixels = torch.cat([match_channels(chunk, channels) for chunk in pixels.split(8192)])
    return ImageDataset(
        _TensorImages(pixels), list(ds.targets), list(ds.classes), transform, description=f"{data}/{split}"
    )


def _class_folders(split_dir: Path) -> list[str]:
    """Class folder names in ImageFolder's sorted order (hidden folders such as .ipynb_checkpoints skipped)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _split_dir(root: Path, split: str) -> Path | None:
    for name in ("train",) if split == "train" else ("test", "val"):
        if (root / name).is_dir():
            return root / name
    return None


def _load_imagefolder(
    data: DataSpec,
    split: str,
    channels: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
    in_memory: bool,
    progress: ProgressFn,
    cancel: CancelToken | None,
) -> ImageDataset:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    assert data.root is not None
    root = data.root
    layout = (
        f"expected {root}/train/<class>/<images> and {root}/test/<class>/<images> (or val/ instead of test/)"
    )
    if not root.exists():
        raise DataError(f"image folder {root} does not exist; {layout}")
    if not root.is_dir():
        raise DataError(f"image folder {root} is a file, not a folder; {layout}")
    split_dir = _split_dir(root, split)
    if split_dir is None:
        wanted = "train/" if split == "train" else "test/ or val/"
        present = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
        raise DataError(
            f"{root} has no {wanted} folder (it holds: {', '.join(present) if present else 'nothing'}); {layout}"
        )
    classes = _class_folders(split_dir)
    if not classes:
        raise DataError(
            f"{split_dir} has no class folders; expected one subfolder per class, e.g. {split_dir}/cat/001.jpg"
        )
    if len(classes) == 1:
        raise DataError(
            f"{split_dir} has only one class folder ({classes[0]!r}); a classifier needs at least two"
        )
    other_dir = _split_dir(root, "test" if split == "train" else "train")
    if other_dir is not None:
        other = _class_folders(other_dir)
        if other != classes:
            only_here = sorted(set(classes) - set(other))
            only_there = sorted(set(other) - set(classes))
            detail = []
            if only_here:
                detail.append(f"only in {split_dir.name}/: {only_here}")
            if only_there:
                detail.append(f"only in {other_dir.name}/: {only_there}")
            if not detail:
                detail.append("same names in a different order")
            raise DataError(
                f"{root}: {split_dir.name}/ and {other_dir.name}/ must have the same class folders "
                f"({'; '.join(detail)}); rename or remove folders so that both splits match"
            )
    class_to_idx = {name: i for i, name in enumerate(classes)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = Counter(target for _, target in samples)
    empty = [name for name in classes if counts[class_to_idx[name]] == 0]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(str(split_dir / e) for e in empty)} hold no images "
            f"(files ending in {', '.join(IMG_EXTENSIONS)} count); add images or remove the folder(s)"
        )
    paths = [path for path, _ in samples]
    targets = [target for _, target in samples]
    if in_memory:
        images: _FileImages | _TensorImages = _TensorImages(
            _decode_all(paths, channels, where=str(split_dir), progress=progress, cancel=cancel)
        )
    else:
        images = _FileImages(paths, channels)
    return ImageDataset(
        images, targets, classes, transform, description=f"{data}/{split_dir.name}", paths=paths
    )


# --------------------------------------------------------------------------------------------- helpers
def _unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def dataset_targets(dataset: Dataset) -> list[int]:
    """Every item's label, in order, without decoding images (through Subset and ConcatDataset too).

    Uses a ``targets`` attribute (ImageDataset, torchvision's ImageFolder/CIFAR) or TensorDataset's second
    tensor; only for other datasets does it fall back to reading every item.
    """
    if isinstance(dataset, Subset):
        base = dataset_targets(dataset.dataset)
        return [base[int(i)] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        return [t for part in dataset.datasets for t in dataset_targets(part)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        if isinstance(targets, torch.Tensor):
            return [int(t) for t in targets.tolist()]
        return [int(t) for t in targets]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return [int(t) for t in dataset.tensors[1].tolist()]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def dataset_classes(dataset: Dataset) -> list[str]:
    """Class names (index = label) of a dataset or of the dataset under a Subset.

    Datasets without a ``classes`` attribute get ``"0" … "K-1"`` with K = largest label + 1.
    """
    base = _unwrap(dataset)
    if isinstance(base, ConcatDataset) and base.datasets:
        return dataset_classes(base.datasets[0])
    classes = getattr(base, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    targets = dataset_targets(base)
    return [str(i) for i in range(max(targets) + 1)] if targets else []


def calibration_subset(dataset: Dataset, n: int, *, seed: int = 0) -> Subset:
    """A class-balanced, seeded subset of ``n`` items (pass the training split: CKA calibrates on it).

    Each class gets ``n // K`` items where it has that many; what small classes cannot supply and the
    remainder ``n % K`` go one by one to the other classes in a seeded order. Within a class the items are a
    seeded random sample, and the returned order is shuffled (seeded) so that consecutive batches mix classes.
    The same (dataset, n, seed) always gives the same subset.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ConfigError(f"n={n!r} calibration samples must be an integer")
    if n < 4:
        raise ConfigError(f"n={n} calibration samples is too few: CKA needs at least 4 samples")
    size = len(dataset)  # type: ignore[arg-type]
    if n > size:
        raise ConfigError(
            f"n={n} calibration samples were requested but the dataset has only {size} items; use n ≤ {size}"
        )
    targets = dataset_targets(dataset)
    gen = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(targets):
        by_class.setdefault(label, []).append(index)
    labels = sorted(by_class)
    order = [labels[i] for i in torch.randperm(len(labels), generator=gen).tolist()]
    quota = dict.fromkeys(labels, 0)
    remaining = n
    while remaining > 0:
        open_ = [c for c in order if quota[c] < len(by_class[c])]
        share, extra = divmod(remaining, len(open_))
        if share == 0:
            for c in open_[:extra]:
                quota[c] += 1
            break
        for c in open_:
            take = min(share, len(by_class[c]) - quota[c])
            quota[c] += take
            remaining -= take
    chosen: list[int] = []
    for c in labels:
        members = by_class[c]
        picks = torch.randperm(len(members), generator=gen)[: quota[c]].tolist()
        chosen.extend(members[p] for p in picks)
    shuffled = [chosen[i] for i in torch.randperm(len(chosen), generator=gen).tolist()]
    return Subset(dataset, shuffled)


#: The validation split carved from the training images (what recipes and plans are chosen on; the test split
#: only reports): this many training images, drawn with this seed, never trained on.
VALIDATION_IMAGES = 5_000
VALIDATION_SEED = 123


def validation_indices(n: int, images: int = VALIDATION_IMAGES, seed: int = VALIDATION_SEED
                       ) -> tuple[list[int], list[int]]:
    """(training indices, validation indices) of a training split of ``n`` items: a seeded permutation whose
    first ``images`` items are held out for validation. The same (n, images, seed) always gives the same split,
    so a run, its benchmark and its resume all hold out the same images."""
    if isinstance(images, bool) or not isinstance(images, int) or not 0 < images < n:
        raise ConfigError(f"images={images!r} validation images must be a whole number in [1, {n - 1}] for a "
                          f"training split of {n} items; hold out fewer images or use the test split")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return order[images:], order[:images]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_num_workers(dataset: Dataset) -> int:
    """0 for in-memory or small data (worker start-up would dominate), else min(4, CPU cores)."""
    base = _unwrap(dataset)
    if getattr(base, "in_memory", False) or isinstance(base, TensorDataset):
        return 0
    if len(dataset) <= SMALL_DATASET:  # type: ignore[arg-type]
        return 0
    return min(4, _cpu_count())


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with sensible defaults.

    Shuffling (and the random augmentation in workers) is seeded through a torch.Generator, so a seed
    reproduces the order. ``num_workers=None`` picks :func:`default_num_workers`; workers persist between
    epochs. Memory is pinned when ``device`` resolves to CUDA, for asynchronous host-to-device copies.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
    if num_workers is None:
        num_workers = default_num_workers(dataset)
    elif isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers={num_workers!r} must be a non-negative integer (0: main process)")
    pin = False
    if device is not None:
        from .device import resolve_device

        pin = resolve_device(device).type == "cuda"
    generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def check_num_classes(dataset: Dataset, num_classes: int) -> None:
    """ConfigError when the data's class count differs from the model's output count."""
    found = len(dataset_classes(dataset))
    if found != num_classes:
        raise ConfigError(
            f"the data has {found} classes but the model has {num_classes} outputs; build the model with "
            f"num_classes={found} (CLI: --num-classes {found}) or choose data with {num_classes} classes"
        )
