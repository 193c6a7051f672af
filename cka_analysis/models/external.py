"""Models from outside the registry: timm by name, Hugging Face image classifiers, and your own factory function.

Sources are spelled as the model argument of :func:`cka_analysis.export.open_model` (and so of the CLI's
``--model``, :class:`~cka_analysis.workflow.PruneRequest` and the dashboard):

* ``timm:<name>`` — ``timm.create_model(name)`` (the ``timm`` extra). The preset (input size, mean/std, classes)
  comes from timm's pretrained config, or from the metadata of a ``.safetensors`` weights file written by this
  project or by ``scripts/train_base.py`` (keys ``timm_kwargs`` and ``preset``). Weights: a file
  (``.safetensors``, or ``.pth``/``.pt`` read with ``weights_only=True``), ``random``, or one of timm's named
  pretrained tags (``pretrained``, ``in1k``, ...) where the hub can be reached.
* ``hf:<directory or hub id>`` — ``AutoModelForImageClassification`` (the ``hf`` extra), wrapped so that
  ``forward(x)`` returns the logits; ``trust_remote_code`` is never turned on. Weights: the directory's own
  (default), ``random`` (its config, randomly initialised) or a state-dict file.
* ``factory:<package.module>:<function>`` (or ``factory:<file.py>:<function>``) — your own code: the function
  returns the ``nn.Module`` (called with ``num_classes=`` when a class count is asked for). It must carry a
  :class:`~cka_analysis.models.preset.Preset` (``attach_preset(model, Preset(...))``) so that data, MACs and
  exports follow it. The CLI spells it ``--model-factory package.module:function``; the dashboard offers it only
  when the server was started with it (code never comes from an upload or a URL).

Each model comes back with its residual blocks declared (:func:`~cka_analysis.blocks.declare_blocks`): the
patterns given, or else the ones :func:`~cka_analysis.blocks.discover_blocks` proposes. ``model.cka_source``
records how to rebuild the architecture (for the manifest of :func:`~cka_analysis.export.save_pruned`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import CHECKPOINT_SUFFIXES, load_weights, read_state_dict
from ..errors import BlockError, CheckpointError, ConfigError
from .preset import IMAGENET_MEAN, IMAGENET_STD, Preset, attach_preset

__all__ = [
    "EXTERNAL_PREFIXES",
    "SOURCE_ATTR",
    "HFImageClassifier",
    "declare_found_blocks",
    "is_external",
    "load_factory",
    "open_external",
    "rebuild_external",
]

TIMM, HF, FACTORY = "timm:", "hf:", "factory:"
EXTERNAL_PREFIXES = (TIMM, HF, FACTORY)
SOURCE_ATTR = "cka_source"
CANDIDATES_ATTR = "cka_candidates"
RANDOM = "random"
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_external(source: object) -> bool:
    """Whether ``source`` names a model outside the registry (``timm:``, ``hf:`` or ``factory:``)."""
    return isinstance(source, str) and source.startswith(EXTERNAL_PREFIXES)


class HFImageClassifier(nn.Module):
    """A Hugging Face image classifier whose ``forward(x)`` returns the logits tensor, like every model here.

    The Hugging Face model is the ``hf`` attribute, so its blocks are named ``hf.<its own names>``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


# --------------------------------------------------------------------------------------------------- imports
def _timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("timm: models need the timm package: pip install 'cka-prune[timm]'") from exc
    return timm


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("hf: models need the transformers package: pip install 'cka-prune[hf]'") from exc
    return transformers


# ------------------------------------------------------------------------------------------------------ timm
def _weights_file(weights: str | Path | None) -> Path | None:
    if weights is None or str(weights) == RANDOM:
        return None
    p = Path(str(weights)).expanduser()
    if isinstance(weights, Path) or p.suffix in (*CHECKPOINT_SUFFIXES, ".bin") or p.exists():
        if not p.is_file():
            raise CheckpointError(f"weights file {p} does not exist")
        return p
    return None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # read_state_dict gives the clear error for a broken file
        return {}


def _timm_preset(source: str, model: nn.Module, num_classes: int, weights: str) -> Preset:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
    crop = float(cfg.get("crop_pct", 0.875) or 0.875)
    return Preset(arch=source, input_size=size, mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                  std=tuple(cfg.get("std", IMAGENET_STD)), num_classes=num_classes,
                  resize_size=round(size[1] / crop) if size[1] > 64 else None, crop_padding=0 if size[1] > 64 else 4,
                  weights=weights)


def _open_timm(source: str, weights: str | Path | None, num_classes: int | None, allow_download: bool) -> nn.Module:
    timm = _timm()
    name = source[len(TIMM):]
    base = name.split(".")[0]
    if not name or not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5)
        raise ConfigError(f"--model {source}: timm has no model {base!r}"
                          + (f" (close: {', '.join(close)})" if close else "") + "; list them with timm.list_models()")
    path = _weights_file(weights)
    kwargs: dict[str, Any] = {}
    preset: Preset | None = None
    state = None
    if path is not None:
        meta = _safetensors_metadata(path)
        kwargs = json.loads(meta.get("timm_kwargs", "{}"))
        if meta.get("preset"):
            preset = Preset.from_dict(json.loads(meta["preset"]))
        state = read_state_dict(path)
        if num_classes is None and "num_classes" not in kwargs:
            probe = timm.create_model(base, pretrained=False)
            head = probe.pretrained_cfg.get("classifier")
            head = head[0] if isinstance(head, (list, tuple)) else head
            if head and f"{head}.weight" in state:
                kwargs["num_classes"] = int(state[f"{head}.weight"].shape[0])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    pretrained = weights is not None and path is None and str(weights) != RANDOM
    if pretrained:
        tag = str(weights)
        full = base if tag in ("pretrained", "DEFAULT") else f"{base}.{tag}"
        if not allow_download:
            raise CheckpointError(f"timm weights {full!r} are not available here and downloads are disabled; "
                                  "download the weights file and pass it with --weights FILE")
        try:
            model = timm.create_model(full, pretrained=True, **kwargs)
        except Exception as exc:  # offline, unknown tag, ...
            raise CheckpointError(
                f"timm weights {full!r} could not be fetched from the hub ({type(exc).__name__}: {exc}); offline, "
                "download the weights file elsewhere and pass it with --weights FILE, or use --weights random"
            ) from exc
    else:
        model = timm.create_model(base, pretrained=False, **kwargs)
    classes = int(getattr(model, "num_classes", 0) or kwargs.get("num_classes") or 1000)
    described = str(path.resolve()) if path is not None else (f"timm {weights}" if pretrained else RANDOM)
    preset = (preset.with_(arch=source, weights=described) if preset is not None
              else _timm_preset(source, model, classes, described))
    attach_preset(model, preset)
    if state is not None:
        load_weights(model, state, source=str(path))
    object.__setattr__(model, SOURCE_ATTR, {"kind": "timm", "name": base, "kwargs": kwargs})
    return model


# ---------------------------------------------------------------------------------------------- Hugging Face
def _hf_preset(source: str, config: Any, where: Path | None, weights: str) -> Preset:
    proc: dict[str, Any] = {}
    if where is not None and (where / "preprocessor_config.json").is_file():
        proc = json.loads((where / "preprocessor_config.json").read_text())
    size = getattr(config, "image_size", None)
    crop = proc.get("crop_size") or proc.get("size") or {}
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    size = int(size or crop or 224)
    channels = int(getattr(config, "num_channels", 3) or 3)
    mean = tuple(proc.get("image_mean") or IMAGENET_MEAN)
    std = tuple(proc.get("image_std") or IMAGENET_STD)
    resize = None
    if size > 64:
        pct = proc.get("crop_pct")
        resize = round(size / pct) if pct else round(size / 0.875)
    return Preset(arch=source, input_size=(channels, size, size), mean=mean[:channels], std=std[:channels],
                  num_classes=int(config.num_labels), resize_size=resize, crop_padding=0 if size > 64 else 4,
                  weights=weights)


def _open_hf(source: str, weights: str | Path | None, num_classes: int | None, allow_download: bool) -> nn.Module:
    transformers = _transformers()
    ref = source[len(HF):]
    where = Path(ref).expanduser()
    local = where.is_dir()
    if not ref:
        raise ConfigError("--model hf: needs a directory or a hub id, e.g. hf:./my-vit or hf:google/vit-base-patch16-224")
    if not local:
        if Path(ref).exists() or ref.startswith((".", "/", "~")) or ref.count("/") > 1:
            raise ConfigError(f"--model {source}: {ref} is not a directory holding a Hugging Face model (config.json)")
        if not allow_download:
            raise CheckpointError(f"--model {source}: {ref!r} is not a local directory and downloads are disabled; "
                                  "save the model with save_pretrained and give its directory")
    elif not (where / "config.json").is_file():
        raise ConfigError(f"--model {source}: {where} has no config.json (not a Hugging Face model directory)")
    path = _weights_file(weights)
    try:
        config = transformers.AutoConfig.from_pretrained(str(where) if local else ref, trust_remote_code=False)
        if num_classes is not None and num_classes != config.num_labels:
            if path is None and str(weights) != RANDOM:
                raise ConfigError(f"--model {source} has {config.num_labels} classes, not {num_classes}: drop "
                                  "--num-classes, or use --weights random to start from its config")
            config.num_labels = num_classes
            config.id2label = {i: str(i) for i in range(num_classes)}
            config.label2id = {str(i): i for i in range(num_classes)}
        if path is not None or str(weights) == RANDOM:
            inner = transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False)
        else:
            inner = transformers.AutoModelForImageClassification.from_pretrained(
                str(where) if local else ref, config=config, trust_remote_code=False)
    except (ConfigError, CheckpointError):
        raise
    except Exception as exc:
        raise CheckpointError(f"--model {source}: transformers could not open it "
                              f"({type(exc).__name__}: {exc})") from exc
    model = HFImageClassifier(inner.eval())
    described = (str(path.resolve()) if path is not None else RANDOM if str(weights) == RANDOM
                 else str(where.resolve()) if local else f"hub {ref}")
    attach_preset(model, _hf_preset(source, config, where if local else None, described))
    if path is not None:
        state = read_state_dict(path)
        if not any(k.startswith("hf.") for k in state):
            state = {f"hf.{k}": v for k, v in state.items()}
        load_weights(model, state, source=str(path))
    object.__setattr__(model, SOURCE_ATTR, {"kind": "hf", "config": config.to_dict()})
    return model


# -------------------------------------------------------------------------------------------------- factory
def load_factory(spec: str) -> Any:
    """The function named by ``package.module:function`` or ``path/to/file.py:function`` (imported here)."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name.isidentifier():
        raise ConfigError(f"--model-factory {spec!r} must be package.module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser().resolve()
            if not file.is_file():
                raise ConfigError(f"--model-factory {spec!r}: {file} does not exist")
            mod_spec = importlib.util.spec_from_file_location(f"cka_factory_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # a module beside the command, as `python -m` would find it
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ImportError as exc:
        raise ConfigError(f"--model-factory {spec!r}: cannot import {module_name!r} ({exc}); run from the folder "
                          "that holds it or add that folder to PYTHONPATH") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"--model-factory {spec!r}: {module_name} has no function {func_name!r}")
    return fn


def _open_factory(source: str, weights: str | Path | None, num_classes: int | None) -> nn.Module:
    spec = source[len(FACTORY):]
    fn = load_factory(spec)
    model = fn(num_classes=num_classes) if num_classes is not None else fn()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model-factory {spec}: the function returned {type(model).__name__}, not an nn.Module")
    preset = getattr(model, "cka_preset", None)
    if preset is None:
        raise ConfigError(
            f"--model-factory {spec}: the model carries no preset; in the function, end with "
            "`return attach_preset(model, Preset(arch='mine', input_size=(3, 32, 32), mean=(...), std=(...), "
            "num_classes=10))` (from cka_analysis.models import Preset, attach_preset)")
    path = _weights_file(weights)
    if weights is not None and path is None and str(weights) != RANDOM:
        raise ConfigError(f"--weights {weights}: a factory model takes a weights file or 'random'")
    if path is not None:
        load_weights(model, read_state_dict(path), source=str(path))
    attach_preset(model, preset.with_(arch=source, weights=str(path.resolve()) if path else preset.weights))
    object.__setattr__(model, SOURCE_ATTR, {"kind": "factory", "spec": spec, "num_classes": num_classes})
    return model


# ------------------------------------------------------------------------------------------------ front door
def declare_found_blocks(model: nn.Module, block_patterns: Sequence[str] | str | None = None) -> nn.Module:
    """Declare ``block_patterns`` as the model's blocks, or else the blocks :func:`discover_blocks` proposes
    (kept as ``model.cka_candidates`` for display)."""
    from ..blocks import declare_blocks, discover_blocks

    if block_patterns:
        return declare_blocks(model, block_patterns)
    candidates = discover_blocks(model)
    if not candidates:
        raise BlockError(f"no residual blocks found in {type(model).__name__} (no module with its input's shape "
                         "and a residual connection around it); name them with --block-pattern 'encoder.layer.*'")
    object.__setattr__(model, CANDIDATES_ATTR, tuple(candidates))
    return declare_blocks(model, [c.name for c in candidates])


def open_external(
    source: str,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    allow_download: bool = True,
    block_patterns: Sequence[str] | str | None = None,
) -> nn.Module:
    """Open a ``timm:``, ``hf:`` or ``factory:`` model (see the module docstring), in eval mode, blocks declared."""
    if source.startswith(TIMM):
        model = _open_timm(source, weights, num_classes, allow_download)
    elif source.startswith(HF):
        model = _open_hf(source, weights, num_classes, allow_download)
    elif source.startswith(FACTORY):
        model = _open_factory(source, weights, num_classes)
    else:
        raise ConfigError(f"{source!r} is not a timm:, hf: or factory: model")
    return declare_found_blocks(model.eval(), block_patterns)


def rebuild_external(source: dict[str, Any], preset: Preset) -> nn.Module:
    """The unpruned architecture recorded in a manifest's ``source`` (random weights), carrying ``preset``."""
    kind = source.get("kind")
    if kind == "timm":
        model = _timm().create_model(source["name"], pretrained=False, **source.get("kwargs", {}))
    elif kind == "hf":
        transformers = _transformers()
        cfg = dict(source["config"])
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = HFImageClassifier(transformers.AutoModelForImageClassification.from_config(config))
    elif kind == "factory":
        fn = load_factory(source["spec"])
        model = fn(num_classes=source["num_classes"]) if source.get("num_classes") is not None else fn()
    else:
        raise CheckpointError(f"manifest source {source!r} is not timm, hf or factory")
    object.__setattr__(model, SOURCE_ATTR, dict(source))
    return attach_preset(model.eval(), preset)
