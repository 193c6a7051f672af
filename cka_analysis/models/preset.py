"""What a model expects from its data, and where its weights came from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import nn

from ..errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESET_ATTR = "cka_preset"


@dataclass(frozen=True)
class Preset:
    """The contract between a model and its data.

    Attributes:
        arch: registry name of the architecture (``build_model(arch)`` rebuilds it).
        input_size: (channels, height, width) of one input image.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        num_classes: number of output classes.
        resize_size: evaluation resize of the shorter side before the centre crop (None: resize straight
            to ``input_size``).
        hflip: whether horizontal flips are a valid training augmentation (not for digits).
        crop_padding: padding of the training random crop for small images (CIFAR style); 0 for
            ImageNet-style RandomResizedCrop.
        weights: where the weights came from (a file path, a named source, or "random").
        notes: free text shown to users (e.g. accuracy of the weights).
    """

    arch: str
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    resize_size: int | None = None
    hflip: bool = True
    crop_padding: int = 4
    weights: str = "random"
    notes: str = ""

    def __post_init__(self) -> None:
        if len(self.input_size) != 3:
            raise ConfigError(f"input_size={self.input_size!r} must be (channels, height, width)")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ConfigError(
                f"mean/std have {len(self.mean)}/{len(self.std)} entries but the input has "
                f"{self.input_size[0]} channels"
            )
        if self.num_classes < 1:
            raise ConfigError(f"num_classes={self.num_classes} must be at least 1")

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def image_size(self) -> int:
        return self.input_size[1]

    def with_(self, **changes: Any) -> Preset:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preset:
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k != "extra"}  # a field (always empty) that manifests of 0.1.0 carry
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"preset has unknown fields {sorted(unknown)}")
        d = dict(d)
        d["input_size"] = tuple(d["input_size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)


def get_preset(model: nn.Module) -> Preset:
    """The preset a registry model carries; a clear error for models built elsewhere."""
    preset = getattr(model, PRESET_ATTR, None)
    if preset is None:
        raise ConfigError(
            f"{type(model).__name__} carries no preset (input size, normalisation, classes); build it with "
            "cka_analysis.models.build_model(...) or attach one with attach_preset(model, Preset(...))"
        )
    return preset


def attach_preset(model: nn.Module, preset: Preset) -> nn.Module:
    """Attach a preset to a model (returns the same model)."""
    object.__setattr__(model, PRESET_ATTR, preset)
    return model
