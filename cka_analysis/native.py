"""The pruned model back in its own library's format: a Hugging Face directory, or a timm state dict + kwargs.

A pruned ``hf:`` model is written as a directory that ``AutoModelForImageClassification.from_pretrained(DIR)``
opens with nothing but ``transformers`` installed: the removed layers are dropped from their lists, the others
renumbered (``layers.3`` becomes ``layers.2`` after ``layers.2`` is removed) and the config updated
(``num_hidden_layers`` for ViT/DeiT-style encoders, ``depths`` per stage for ConvNeXt and ResNet).

A pruned ``timm:`` model of a family whose depth is a constructor argument (ConvNeXt ``depths``, ResNet ``layers``,
ViT/DeiT ``depth``) is written as ``model.safetensors`` (renumbered state dict; its metadata carries the timm name,
the keyword arguments and the preset) and ``config.json`` (``{"model_name": ..., "kwargs": {...}}``), so that::

    model = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"])
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

rebuilds it (and ``cka-prune ... --model timm:NAME --weights DIR/timm/model.safetensors`` reopens it). Other timm
families (EfficientNet, MobileNetV3, RegNet: depth is not one argument) keep the project's own format only.

Each export is checked before it is written: the rebuilt native model must load the weights strictly and give the
pruned model's logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import removed_blocks
from .errors import BlockError
from .models.preset import get_preset
from .recovery import adaptor_slots

__all__ = ["NativeUnsupported", "export_native", "native_dir_name"]

HF_DIR = "huggingface"
TIMM_DIR = "timm"


class NativeUnsupported(BlockError):
    """The model's family has no native format that can express the removed blocks (the reason says why)."""


def native_dir_name(model: nn.Module) -> str | None:
    """The sub-directory :func:`export_native` writes for ``model`` (None: no native format for its source)."""
    kind = (getattr(model, "cka_source", None) or {}).get("kind")
    return {"hf": HF_DIR, "timm": TIMM_DIR}.get(kind)


def _split(name: str) -> tuple[str, int]:
    container, _, index = name.rpartition(".")
    if not index.isdigit():
        raise NativeUnsupported(f"block {name!r} is not an item of a numbered list of layers")
    return container, int(index)


def _renumber(state: dict[str, torch.Tensor], removed: list[str], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The state dict with each container's kept items renumbered 0..k-1."""
    mapping: dict[str, dict[int, int]] = {}
    gone: dict[str, set[int]] = {}
    for name in removed:
        c, i = _split(name)
        gone.setdefault(c, set()).add(i)
    for c, drop in gone.items():
        kept = [i for i in range(sizes[c]) if i not in drop]
        mapping[c] = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, value in state.items():
        new_key = key
        for c, m in mapping.items():
            if key.startswith(c + "."):
                head, _, rest = key[len(c) + 1:].partition(".")
                if head.isdigit() and int(head) in m:
                    new_key = f"{c}.{m[int(head)]}.{rest}"
                break
        out[new_key] = value
    return out


def _check_same(pruned: nn.Module, native: nn.Module, call: Any, size: tuple[int, ...]) -> None:
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
    device = next(pruned.parameters()).device
    with torch.no_grad():
        a = pruned.eval()(x.to(device)).float().cpu()
        b = call(native.eval(), x)
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise NativeUnsupported(f"the native model's logits differ from the pruned model's "
                                f"(max {float((a - b).abs().max()):.3g})")


def _counts(model: nn.Module, removed: list[str]) -> dict[str, int]:
    return {c: len(model.get_submodule(c)) for c in {_split(n)[0] for n in removed}}


def _export_hf(model: nn.Module, out: Path) -> dict[str, Any]:
    import transformers

    inner = model.hf
    removed = [n.removeprefix("hf.") for n in removed_blocks(model)]
    sizes = _counts(inner, removed)
    config = inner.config.__class__.from_dict(inner.config.to_dict())
    stage_re = re.compile(r"(?:^|\.)stages\.(\d+)\.layers$")
    for c, n in sizes.items():
        kept = n - sum(1 for r in removed if _split(r)[0] == c)
        stage = stage_re.search(c)
        if stage and hasattr(config, "depths"):
            depths = list(config.depths)
            depths[int(stage.group(1))] = kept
            config.depths = depths
        elif hasattr(config, "num_hidden_layers") and not hasattr(config, "depths"):
            config.num_hidden_layers = kept
        else:
            raise NativeUnsupported(f"{type(inner).__name__}: no config field holds the length of {c}")
    state = _renumber({k: v.detach().cpu() for k, v in inner.state_dict().items()}, removed, sizes)
    native = transformers.AutoModelForImageClassification.from_config(config)
    native.load_state_dict(state, strict=True)
    _check_same(model, native, lambda m, x: m(pixel_values=x).logits, get_preset(model).input_size)
    native.save_pretrained(out)
    preset = get_preset(model)
    # the data contract, for people who preprocess with transformers' image processors
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
        "size": {"height": preset.input_size[1], "width": preset.input_size[2]},
        "image_mean": list(preset.mean), "image_std": list(preset.std),
    }, indent=2))
    return {"format": "huggingface", "dir": out.name, "config_changes": {
        k: getattr(config, k) for k in ("num_hidden_layers", "depths") if hasattr(config, k)}}


_TIMM_DEPTH = {  # model class → (kwarg, containers in stage order)
    "ConvNeXt": ("depths", lambda m: [f"stages.{i}.blocks" for i in range(len(m.stages))]),
    "ResNet": ("layers", lambda m: [f"layer{i}" for i in range(1, 5) if hasattr(m, f"layer{i}")]),
    "VisionTransformer": ("depth", lambda m: ["blocks"]),
}


def _export_timm(model: nn.Module, out: Path) -> dict[str, Any]:
    import timm
    from safetensors.torch import save_file

    family = type(model).__name__
    if family not in _TIMM_DEPTH:
        raise NativeUnsupported(f"timm {family} models have no single depth argument (only ConvNeXt, ResNet and "
                                "ViT/DeiT do); the project's own format holds this model")
    kwarg, containers = _TIMM_DEPTH[family]
    removed = removed_blocks(model)
    names = containers(model)
    sizes = {c: len(model.get_submodule(c)) for c in names}
    depths = [sizes[c] - sum(1 for r in removed if _split(r)[0] == c) for c in names]
    source = model.cka_source
    kwargs = {**source.get("kwargs", {}), kwarg: depths[0] if kwarg == "depth" else depths}
    state = _renumber({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, removed, sizes)
    native = timm.create_model(source["name"], pretrained=False, **kwargs)
    native.load_state_dict(state, strict=True)
    _check_same(model, native, lambda m, x: m(x), get_preset(model).input_size)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(model)
    save_file({k: v.clone() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"timm_model": source["name"], "timm_kwargs": json.dumps(kwargs),
                        "preset": json.dumps(preset.to_dict())})
    (out / "config.json").write_text(json.dumps({"model_name": source["name"], "kwargs": kwargs,
                                                 "preset": preset.to_dict()}, indent=2))
    return {"format": "timm", "dir": out.name, "config_changes": {kwarg: kwargs[kwarg]}}


def export_native(model: nn.Module, out: str | Path) -> dict[str, Any]:
    """Write the pruned ``hf:`` or ``timm:`` model in its own library's format into the directory ``out``.

    Returns what was written (``format``, ``dir``, the config changes). Raises :class:`NativeUnsupported` when the
    source has no native format (a factory model) or the family cannot express the removal.
    """
    kind = (getattr(model, "cka_source", None) or {}).get("kind")
    if adaptor_slots(model):
        raise NativeUnsupported("the model carries recovery adaptors, which its native format cannot hold")
    out = Path(out)
    if kind == "hf":
        out.mkdir(parents=True, exist_ok=True)
        return _export_hf(model, out)
    if kind == "timm":
        return _export_timm(model, out)
    raise NativeUnsupported("only hf: and timm: models have a native format; this one is saved in the project's "
                            "format (load_pruned)")
