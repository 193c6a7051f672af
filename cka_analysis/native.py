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

A pruned torchvision ``ResNet``, ``MobileNetV2`` or ``VisionTransformer`` (the registry's ``resnet18``–``resnet101``,
``mobilenet_v2``, ``vit_b_16``, ``vit_tiny``, or a factory that returns one of these classes) is written as
``model.safetensors`` (renumbered state dict) and ``config.json``: the class, its keyword arguments with the depth
reduced (``layers`` per stage, the blocks per group of ``inverted_residual_setting``, ``num_layers``), the arguments
that are classes as dotted paths (``classes``: a ResNet's ``block``), and the same call written out (``call``)::

    def find(path):  # "torchvision.models.resnet.ResNet" -> the class
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    model = find(cfg["class"])(**cfg["kwargs"], **{k: find(v) for k, v in cfg["classes"].items()})
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

Each export is checked before it is written: the rebuilt native model must load the weights strictly and give the
pruned model's logits.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .blocks import Removed, removed_blocks
from .errors import BlockError
from .models.preset import get_preset
from .recovery import adaptor_slots

__all__ = ["NATIVE_DIRS", "NATIVE_FAMILIES", "NativeUnsupported", "export_native", "native_dir_name"]

HF_DIR = "huggingface"
TIMM_DIR = "timm"
TORCHVISION_DIR = "torchvision"
#: every sub-directory :func:`export_native` may write
NATIVE_DIRS = (HF_DIR, TIMM_DIR, TORCHVISION_DIR)
#: what has a native format, for messages
NATIVE_FAMILIES = "hf: models, timm: ConvNeXt / ResNet / ViT models and torchvision ResNet / MobileNetV2 / ViT models"


class NativeUnsupported(BlockError):
    """The model's family has no native format that can express the removed blocks (the reason says why)."""


def _torchvision_family(model: nn.Module) -> str | None:
    """``"ResNet"``, ``"MobileNetV2"`` or ``"VisionTransformer"`` when ``model`` is exactly that torchvision class
    (a subclass may take other constructor arguments), else None."""
    from torchvision.models import MobileNetV2, ResNet, VisionTransformer

    return {ResNet: "ResNet", MobileNetV2: "MobileNetV2", VisionTransformer: "VisionTransformer"}.get(type(model))


def native_dir_name(model: nn.Module) -> str | None:
    """The sub-directory :func:`export_native` writes for ``model`` (None: no native format for it)."""
    kind = (getattr(model, "cka_source", None) or {}).get("kind")
    if kind in ("hf", "timm"):
        return {"hf": HF_DIR, "timm": TIMM_DIR}[kind]
    return TORCHVISION_DIR if _torchvision_family(model) is not None else None


_ITEM = re.compile(r"^(?P<container>.+)\.(?P<prefix>[A-Za-z_]*?)(?P<index>\d+)$")


def _split(name: str) -> tuple[str, str, int]:
    """``"layers.3"`` → ``("layers", "", 3)``; ``"encoder.layers.encoder_layer_3"`` → ``(…, "encoder_layer_", 3)``."""
    m = _ITEM.match(name)
    if m is None:
        raise NativeUnsupported(f"block {name!r} is not an item of a numbered list of layers")
    return m["container"], m["prefix"], int(m["index"])


def _renumber(state: dict[str, torch.Tensor], removed: list[str], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """The state dict with each container's kept items renumbered 0..k-1 (``encoder_layer_i`` style names too)."""
    mapping: dict[str, tuple[str, dict[int, int]]] = {}
    gone: dict[str, tuple[str, set[int]]] = {}
    for name in removed:
        c, prefix, i = _split(name)
        gone.setdefault(c, (prefix, set()))[1].add(i)
    for c, (prefix, drop) in gone.items():
        kept = [i for i in range(sizes[c]) if i not in drop]
        mapping[c] = (prefix, {old: new for new, old in enumerate(kept)})
    out = {}
    for key, value in state.items():
        new_key = key
        for c, (prefix, m) in mapping.items():
            if key.startswith(c + "."):
                head, _, rest = key[len(c) + 1:].partition(".")
                index = head.removeprefix(prefix)
                if head.startswith(prefix) and index.isdigit() and int(index) in m:
                    new_key = f"{c}.{prefix}{m[int(index)]}.{rest}"
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


def _kept(sizes: dict[str, int], removed: list[str], container: str) -> int:
    return sizes[container] - sum(1 for r in removed if _split(r)[0] == container)


def _export_hf(model: nn.Module, out: Path) -> dict[str, Any]:
    import transformers

    inner = model.hf
    removed = [n.removeprefix("hf.") for n in removed_blocks(model)]
    sizes = _counts(inner, removed)
    config = inner.config.__class__.from_dict(inner.config.to_dict())
    stage_re = re.compile(r"(?:^|\.)stages\.(\d+)\.layers$")
    for c in sizes:
        kept = _kept(sizes, removed, c)
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
    depths = [_kept(sizes, removed, c) for c in names]
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


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _first_kept(items: list[nn.Module], what: str) -> nn.Module:
    for m in items:
        if not isinstance(m, Removed):
            return m
    raise NativeUnsupported(f"every block of {what} was removed, which the torchvision class cannot express")


def _tv_resnet(model: nn.Module, removed: list[str], sizes: dict[str, int]) -> tuple[dict, dict]:
    names = list(sizes)  # layer1..layer4
    for c in names:
        if _kept(sizes, removed, c) == 0:  # torchvision builds at least one block per stage
            raise NativeUnsupported(f"every block of {c} was removed; torchvision's ResNet builds at least one "
                                    "block per stage")
    block = type(_first_kept([b for c in names for b in model.get_submodule(c)], "the network"))
    kwargs = {"layers": [_kept(sizes, removed, c) for c in names], "num_classes": model.fc.out_features,
              "groups": model.groups, "width_per_group": model.base_width}
    return kwargs, {"block": _dotted(block)}


def _tv_mobilenet_v2(model: nn.Module, removed: list[str], sizes: dict[str, int]) -> tuple[dict, dict]:
    stem, last, blocks = model.features[0][0], model.features[-1][0], list(model.features)[1:-1]
    if stem.out_channels != 32 or last.out_channels != 1280:
        raise NativeUnsupported("only width_mult=1 MobileNetV2 (a 32-channel stem, 1280 final channels) is rebuilt "
                                "from inverted_residual_setting; the project's format holds this one")
    setting: list[list[float | int]] = []
    inp = stem.out_channels
    for b in blocks:
        if isinstance(b, Removed):
            continue
        hidden = b.conv[-3].out_channels if len(b.conv) == 4 else inp  # expand → depthwise → project → norm
        t = hidden / inp
        t = int(t) if t == int(t) else t
        if b.use_res_connect and setting and setting[-1][0] == t and setting[-1][1] == b.out_channels:
            setting[-1][2] += 1  # one more block of the same group (stride 1, same width)
        else:
            setting.append([t, b.out_channels, 1, b.stride])
        inp = b.out_channels
    kwargs = {"num_classes": model.classifier[-1].out_features, "inverted_residual_setting": setting,
              "dropout": model.classifier[0].p}
    return kwargs, {}


def _tv_vit(model: nn.Module, removed: list[str], sizes: dict[str, int]) -> tuple[dict, dict]:
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise NativeUnsupported("a VisionTransformer with a convolutional stem (conv_stem_configs) is not rebuilt; "
                                "the project's format holds it")
    layers = list(model.encoder.layers)
    first = _first_kept(layers, "the encoder")
    kwargs = {"image_size": model.image_size, "patch_size": model.patch_size,
              "num_layers": _kept(sizes, removed, "encoder.layers"),
              "num_heads": first.self_attention.num_heads, "hidden_dim": model.hidden_dim, "mlp_dim": model.mlp_dim,
              "dropout": model.dropout, "attention_dropout": model.attention_dropout,
              "num_classes": model.num_classes, "representation_size": model.representation_size}
    return kwargs, {}


_TORCHVISION = {  # family → (the containers whose items are blocks, kwargs with the depth reduced, the depth kwarg)
    "ResNet": ([f"layer{i}" for i in range(1, 5)], _tv_resnet, "layers"),
    "MobileNetV2": (["features"], _tv_mobilenet_v2, "inverted_residual_setting"),
    "VisionTransformer": (["encoder.layers"], _tv_vit, "num_layers"),
}


def _export_torchvision(model: nn.Module, out: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    family = _torchvision_family(model)
    containers, arguments, depth = _TORCHVISION[family]
    removed = removed_blocks(model)
    sizes = {c: len(model.get_submodule(c)) for c in containers}
    kwargs, classes = arguments(model, removed, sizes)
    cls = type(model)
    state = _renumber({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, removed, sizes)
    native = cls(**kwargs, **{k: _resolve(v) for k, v in classes.items()})
    native.load_state_dict(state, strict=True)
    preset = get_preset(model)
    _check_same(model, native, lambda m, x: m(x), preset.input_size)
    out.mkdir(parents=True, exist_ok=True)
    arguments_text = ", ".join([f"{k}={v}" for k, v in classes.items()] + [f"{k}={v!r}" for k, v in kwargs.items()])
    config = {"class": _dotted(cls), "kwargs": kwargs, "classes": classes,
              "call": f"{_dotted(cls)}({arguments_text})", "preset": preset.to_dict()}
    save_file({k: v.clone() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"torchvision_class": config["class"], "torchvision_kwargs": json.dumps(kwargs),
                        "torchvision_classes": json.dumps(classes), "preset": json.dumps(preset.to_dict())})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"format": "torchvision", "dir": out.name, "config_changes": {depth: kwargs[depth]}}


def _resolve(path: str) -> Any:
    """``"torchvision.models.resnet.Bottleneck"`` → the class (what a user's reload does with ``classes``)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def export_native(model: nn.Module, out: str | Path) -> dict[str, Any]:
    """Write the pruned ``hf:``, ``timm:`` or torchvision model in its own library's format into the directory ``out``.

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
    if _torchvision_family(model) is not None:
        return _export_torchvision(model, out)
    raise NativeUnsupported(f"only {NATIVE_FAMILIES} have a native format; this one is saved in the project's "
                            "format (load_pruned)")
