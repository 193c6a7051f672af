"""One registry of architectures: ``build_model(name, num_classes=..., weights=...)``.

Every model built here carries its :class:`Preset` (input size, normalisation, classes, where its weights came
from) as ``model.cka_preset``, so data pipelines, MACs counts and exports follow the model.

Weights are a named source of the architecture (``"DEFAULT"`` and the names in :func:`weight_names`), a local
file (``.pt/.pth/.th/.safetensors``, loaded without running code), or random initialisation: ``"random"`` (say it
on purpose) or ``None`` (the library default, kept for code that re-initialises or loads weights itself). A
trained network is almost always what pruning needs: front ends never pass ``None`` for a user, they use
:func:`default_weights` or ask for ``"random"`` explicitly (the CLI's ``--weights random``). Named sources with a
URL are downloaded once into torch.hub's cache; offline, a clear error says which file to fetch.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..checkpoints import CHECKPOINT_SUFFIXES, download_cached, load_weights, read_state_dict
from ..config import asset_path, shared_data_dir
from ..errors import CheckpointError, ConfigError
from .cifar_resnet import CifarResNet
from .preset import IMAGENET_MEAN, IMAGENET_STD, Preset, attach_preset, get_preset

__all__ = [
    "RANDOM_WEIGHTS",
    "ModelEntry",
    "Preset",
    "WeightSource",
    "attach_preset",
    "available_models",
    "build_model",
    "default_weights",
    "describe_weight_choices",
    "get_preset",
    "model_entry",
    "weight_names",
]


@dataclass(frozen=True)
class WeightSource:
    """A named set of weights for one architecture and the metadata that travels with it."""

    name: str
    url: str | None = None
    filename: str | None = None  # file name in the cache / shared data folder
    asset: str | None = None  # file shipped in assets/
    torchvision: str | None = None  # torchvision weights enum member, e.g. "ResNet50_Weights.IMAGENET1K_V2"
    sha256_prefix: str | None = None
    num_classes: int = 10
    notes: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: how to build the network and what it expects."""

    name: str
    family: str
    builder: Callable[[int], nn.Module]
    preset: Preset
    description: str
    weights: dict[str, WeightSource] = field(default_factory=dict)
    default_weights: str | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Add an architecture to the registry (used for the built-ins; available to plug-ins too)."""
    if entry.name in _REGISTRY:
        raise ConfigError(f"model {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def available_models() -> list[str]:
    """Registry names, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; unknown names raise with the closest matches."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model {name!r}.{hint} Available: {', '.join(available_models())}")
    return _REGISTRY[name]


RANDOM_WEIGHTS = "random"  # the explicit name of random initialisation (``--weights random``)


def weight_names(name: str) -> list[str]:
    """Named weight sources of an architecture (``"DEFAULT"`` is accepted as well when it has a default)."""
    return list(model_entry(name).weights)


def default_weights(name: str, num_classes: int | None = None) -> str | None:
    """The named weights ``name`` uses when a front end is given none, or None when there is no fitting default.

    There is none when the architecture has no named weights (``vit_tiny``) or when ``num_classes`` differs from
    the default weights' class count; a front end must then ask for a file or for ``"random"`` explicitly.
    """
    entry = model_entry(name)
    if entry.default_weights is None:
        return None
    source = entry.weights[entry.default_weights]
    if num_classes is not None and num_classes != source.num_classes:
        return None
    return entry.default_weights


def describe_weight_choices(name: str) -> str:
    """One phrase naming what ``weights`` can be for ``name``: its named sources, a file, or random."""
    names = weight_names(name)
    named = f"named weights {', '.join(names)}" if names else "no named weights"
    return f"{name} has {named}; or give a checkpoint file, or {RANDOM_WEIGHTS!r} for random initialisation"


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    allow_download: bool = True,
) -> nn.Module:
    """Build a registry architecture, optionally with weights, and attach its preset.

    ``weights=None`` means **random initialisation** (as in torchvision), which is rarely what pruning or
    evaluation needs: ask for trained weights by name (``build_model("cifar_resnet56", weights="cifar10")``,
    ``"DEFAULT"`` for the architecture's default, :func:`default_weights` to look it up) or by file, and write
    ``weights="random"`` where random weights are meant, so that the intent shows in the code.

    Args:
        name: registry name (see :func:`available_models`).
        num_classes: output classes; default: the architecture's (or the named weights') class count.
        weights: a named source (:func:`weight_names`, or ``"DEFAULT"``), a path to a local checkpoint, or
            ``"random"``/None for random initialisation.
        allow_download: whether a named source that is not cached yet may be downloaded.
    """
    entry = model_entry(name)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ConfigError(f"num_classes={num_classes!r} must be a positive integer")
    source: WeightSource | None = None
    path: Path | None = None
    if isinstance(weights, str) and weights == RANDOM_WEIGHTS and RANDOM_WEIGHTS not in entry.weights:
        weights = None
    if weights is not None:
        wname = str(weights)
        if wname == "DEFAULT" and entry.default_weights:
            wname = entry.default_weights
        if wname in entry.weights:
            source = entry.weights[wname]
        elif isinstance(weights, Path) or Path(wname).suffix in CHECKPOINT_SUFFIXES or Path(wname).exists():
            path = Path(wname).expanduser()
            if not path.is_file():
                raise CheckpointError(f"weights file {path} does not exist")
        else:
            known = ", ".join(["DEFAULT", *entry.weights]) if entry.weights else "none"
            raise ConfigError(
                f"weights={wname!r} is neither a file nor a named source of {name} (named sources: {known}; "
                f"{RANDOM_WEIGHTS!r} for random initialisation)"
            )
    classes = num_classes or (source.num_classes if source else entry.preset.num_classes)
    if source is not None and classes != source.num_classes:
        raise ConfigError(
            f"weights {source.name!r} of {name} have {source.num_classes} classes but num_classes={classes}; "
            "build without weights, or fine-tune from these weights with the matching class count"
        )
    model = entry.builder(classes)
    preset = entry.preset.with_(num_classes=classes)
    attach_preset(model, preset)  # now, so that a weights mismatch message names the architecture
    if source is not None:
        state, preset = _load_named(entry, source, preset, allow_download)
        load_weights(model, state, source=f"weights {source.name!r} of {name}")
    elif path is not None:
        load_weights(model, read_state_dict(path), source=str(path))
        preset = preset.with_(weights=str(path.resolve()))
    return attach_preset(model, preset)


def _load_named(entry: ModelEntry, src: WeightSource, preset: Preset, allow_download: bool):
    if src.torchvision:
        import torchvision

        tv = torchvision.models.get_weight(src.torchvision)
        kw = dict(getattr(tv.transforms, "keywords", {}))
        crop = int(kw.get("crop_size", preset.input_size[1]))
        preset = preset.with_(
            input_size=(3, crop, crop),
            resize_size=int(kw.get("resize_size", preset.resize_size or crop)),
            mean=tuple(kw.get("mean", IMAGENET_MEAN)),
            std=tuple(kw.get("std", IMAGENET_STD)),
            weights=f"torchvision {src.torchvision}",
            notes=src.notes,
        )
        file = download_cached(tv.url, allow_download=allow_download)
        return read_state_dict(file), preset
    if src.asset:
        file = asset_path(src.asset)
        if not file.is_file():
            raise CheckpointError(
                f"the bundled weights {file} are missing; re-create them with `python scripts/train_digits.py`"
            )
        return read_state_dict(file), preset.with_(weights=f"bundled {src.asset}", notes=src.notes)
    local = shared_data_dir() / "weights" / src.filename if src.filename else None
    if local is not None and local.is_file():
        file = local
    elif src.url:
        file = download_cached(src.url, filename=src.filename, sha256_prefix=src.sha256_prefix,
                               allow_download=allow_download)
    else:
        raise CheckpointError(
            f"weights {src.name!r} of {entry.name} are not available: expected {local} "
            "(set CKA_PRUNE_DATA to the folder that holds weights/)"
        )
    return read_state_dict(file), preset.with_(weights=f"{src.name} ({file.name})", notes=src.notes)


# --------------------------------------------------------------------------------------------------------------
# Built-in architectures
# --------------------------------------------------------------------------------------------------------------

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_CIFAR_FILES = {
    20: ("resnet20-12fca82f.th", "91.73"),
    32: ("resnet32-d509ac18.th", "92.63"),
    44: ("resnet44-014dd654.th", "93.10"),
    56: ("resnet56-4bfd9763.th", "93.39"),
    110: ("resnet110-1d1ed7c2.th", "93.68"),
}
_CIFAR_JPEG = {20: "87.88", 56: "89.51"}


def _cifar_entry(depth: int) -> ModelEntry:
    n = (depth - 2) // 6
    fname, acc = _CIFAR_FILES[depth]
    weights = {
        "cifar10": WeightSource(
            "cifar10", url=_AKAMASTER + fname, filename=fname, sha256_prefix=fname.split("-")[1][:8],
            notes=f"akamaster/pytorch_resnet_cifar10 (BSD-2), CIFAR-10 test accuracy {acc} %",
        )
    }
    if depth in _CIFAR_JPEG:
        weights["cifar10jpeg"] = WeightSource(
            "cifar10jpeg", filename=f"resnet{depth}-cifar10jpeg.th",
            notes=f"fine-tuned to the JPEG-75 CIFAR-10 copy, its test accuracy {_CIFAR_JPEG[depth]} %",
        )
    return ModelEntry(
        name=f"cifar_resnet{depth}",
        family="cifar_resnet",
        builder=lambda c, n=n: CifarResNet(n, c),
        preset=Preset(f"cifar_resnet{depth}", (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, 10,
                      notes="inputs normalised with ImageNet mean/std, as the public checkpoints expect"),
        description=f"CIFAR ResNet-{depth} (He et al. 2016), {3 * n} blocks, option-A shortcuts",
        weights=weights,
        default_weights="cifar10",
    )


def _tv_entry(name: str, enum: str, members: dict[str, str], description: str) -> ModelEntry:
    import torchvision

    def builder(c: int) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=c)

    weights = {m: WeightSource(m, torchvision=f"{enum}.{m}", num_classes=1000, notes=acc) for m, acc in members.items()}
    return ModelEntry(
        name=name,
        family="torchvision",
        builder=builder,
        preset=Preset(name, (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, 1000, resize_size=256, crop_padding=0),
        description=description,
        weights=weights,
        default_weights=list(members)[-1],
    )


def _vit_tiny(c: int) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=c)


def _digits_preset() -> Preset:
    from ..data import DIGITS_MEAN, DIGITS_STD  # one set of digits statistics (data.py imports no model)

    return Preset("digits_resnet", (1, 8, 8), DIGITS_MEAN, DIGITS_STD, 10, hflip=False, crop_padding=1,
                  notes="scikit-learn's 8×8 handwritten digits")


for _depth in (20, 32, 44, 56, 110):
    register_model(_cifar_entry(_depth))
register_model(_tv_entry("resnet18", "ResNet18_Weights", {"IMAGENET1K_V1": "ImageNet top-1 69.8 %"},
                         "torchvision ResNet-18 (BasicBlock), 8 blocks"))
register_model(_tv_entry("resnet34", "ResNet34_Weights", {"IMAGENET1K_V1": "ImageNet top-1 73.3 %"},
                         "torchvision ResNet-34 (BasicBlock), 16 blocks"))
register_model(_tv_entry("resnet50", "ResNet50_Weights",
                         {"IMAGENET1K_V1": "ImageNet top-1 76.1 %", "IMAGENET1K_V2": "ImageNet top-1 80.9 %"},
                         "torchvision ResNet-50 (Bottleneck), 16 blocks"))
register_model(_tv_entry("resnet101", "ResNet101_Weights",
                         {"IMAGENET1K_V1": "ImageNet top-1 77.4 %", "IMAGENET1K_V2": "ImageNet top-1 81.9 %"},
                         "torchvision ResNet-101 (Bottleneck), 33 blocks"))
register_model(_tv_entry("mobilenet_v2", "MobileNet_V2_Weights",
                         {"IMAGENET1K_V1": "ImageNet top-1 71.9 %", "IMAGENET1K_V2": "ImageNet top-1 72.2 %"},
                         "torchvision MobileNetV2, 17 inverted residual blocks"))
register_model(_tv_entry("vit_b_16", "ViT_B_16_Weights", {"IMAGENET1K_V1": "ImageNet top-1 81.1 %"},
                         "torchvision ViT-B/16, 12 encoder blocks"))
register_model(ModelEntry(
    name="vit_tiny",
    family="torchvision",
    builder=_vit_tiny,
    preset=Preset("vit_tiny", (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD, 10),
    description="a 4-block ViT for 32×32 inputs (patch 8, width 64): small enough for tests and CPU experiments",
))
register_model(ModelEntry(
    name="digits_resnet",
    family="cifar_resnet",
    builder=lambda c: CifarResNet(3, c, in_channels=1, width=16),
    preset=_digits_preset(),
    description="offline demo: a 9-block CIFAR-style ResNet for scikit-learn's 8×8 digits (bundled weights)",
    weights={"demo": WeightSource("demo", asset="digits_resnet.safetensors",
                                  notes="bundled demo weights; test accuracy in assets/digits_resnet.json")},
    default_weights="demo",
))
