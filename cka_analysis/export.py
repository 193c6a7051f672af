"""Saving and loading pruned models, and exporting them for deployment.

A pruned model is a directory:

* ``model.safetensors`` — the weights (no pickle, nothing executable);
* ``manifest.json`` — the base architecture, its preset, the removed blocks in order, scores and metrics, and the
  library and torch versions. :func:`load_pruned` validates it, rebuilds the base architecture, removes the same
  blocks and loads the weights with strict matching, so the reloaded model gives identical logits.
* for ``hf:`` and ``timm:`` models (:mod:`cka_analysis.models.external`), also ``huggingface/`` or ``timm/``: the
  pruned model in its own library's format (:mod:`cka_analysis.native`), which reloads without this project.
  Their manifest records the source (timm name and arguments, the Hugging Face config, or the factory) and the
  declared blocks instead of a registry name.

:func:`export_pt2` (``torch.export``) and :func:`export_onnx` (checked against onnxruntime when installed) write
self-contained files for serving.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .blocks import adaptor_slots, find_blocks, insert_adaptors, remove_blocks, removed_blocks
from .errors import BlockError, CheckpointError, ConfigError
from .models import available_models, build_model
from .models.external import SOURCE_ATTR, is_external, open_external, rebuild_external
from .models.preset import Preset, attach_preset, get_preset

__all__ = [
    "MANIFEST",
    "WEIGHTS",
    "export_onnx",
    "export_pt2",
    "jsonable",
    "load_pruned",
    "markdown_table",
    "open_model",
    "read_manifest",
    "save_pruned",
]

FORMAT = "cka-prune/1"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_REQUIRED = {"format": str, "arch": str, "num_classes": int, "preset": dict, "removed": list, "weights_file": str}


def jsonable(obj: Any) -> Any:
    """Report content made JSON-safe: tensors and numpy values → lists/numbers, keys → strings, NaN/±Inf → None,
    objects with ``to_dict`` → their dict, anything else (paths, devices, dtypes) → its string. Reports written by the
    CLI and the dashboard go through it."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):  # in a stable order: sorted when the items compare, else by repr
        items = [jsonable(v) for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy arrays and scalars
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)  # paths, devices, dtypes, enums: their readable form


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (None → "–", floats to 4 significant digits, ``|`` escaped): the reports' one table
    format."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def save_pruned(model: nn.Module, path: str | Path, *, report: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a registry model, pruned or not) to the directory ``path`` and return it.

    ``report`` (scores, metrics, the pruning record, ...) is stored in the manifest as given (JSON-safe).
    """
    from safetensors.torch import save_file

    from .blocks import PATTERNS_ATTR
    from .native import NativeUnsupported, export_native, native_dir_name

    preset = get_preset(model)
    source = getattr(model, SOURCE_ATTR, None)
    if preset.arch not in available_models() and source is None:
        raise ConfigError(f"{preset.arch!r} is not a registry architecture, so the pruned model cannot be rebuilt")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS
    save_file(state, str(weights), metadata={"format": FORMAT, "arch": preset.arch})
    manifest = {
        "format": FORMAT,
        "arch": preset.arch,
        "num_classes": preset.num_classes,
        "preset": preset.to_dict(),
        "removed": removed_blocks(model),
        "adaptors": adaptor_slots(model),
        "weights_file": WEIGHTS,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "report": jsonable(report or {}),
        "versions": {
            "cka_prune": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if source is not None:
        manifest["source"] = jsonable(source)
        manifest["blocks"] = list(getattr(model, PATTERNS_ATTR, ()))
    folder = native_dir_name(model)
    if folder is not None:
        try:
            manifest["native"] = export_native(model, out / folder)
        except NativeUnsupported as exc:
            manifest["native"] = {"format": None, "reason": str(exc)}
        except Exception as exc:  # an unforeseen family: the project's own format above still holds it
            manifest["native"] = {"format": None, "reason": f"{type(exc).__name__}: {exc}"}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate the manifest of a saved model directory (or of ``manifest.json`` itself)."""
    p = Path(path)
    mpath = p / MANIFEST if p.is_dir() else p
    if not mpath.is_file():
        raise CheckpointError(f"{p} is not a saved model: {MANIFEST} not found")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath} must hold a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in manifest:
            raise CheckpointError(f"{mpath} lacks the field {key!r}")
        if not isinstance(manifest[key], typ):
            raise CheckpointError(f"{mpath}: field {key!r} must be a {typ.__name__}")
    if manifest["format"] != FORMAT:
        raise CheckpointError(
            f"{mpath} has format {manifest['format']!r}; this version of cka-prune reads {FORMAT!r}"
        )
    if "source" in manifest:
        if not isinstance(manifest["source"], dict) or not isinstance(manifest.get("blocks"), list):
            raise CheckpointError(f"{mpath}: 'source' must be an object and 'blocks' a list of block names")
    elif manifest["arch"] not in available_models():
        raise CheckpointError(f"{mpath} names an unknown architecture {manifest['arch']!r}")
    if isinstance(manifest["num_classes"], bool) or manifest["num_classes"] < 1:
        raise CheckpointError(f"{mpath}: num_classes must be a positive integer, got {manifest['num_classes']!r}")
    if not all(isinstance(n, str) for n in manifest["removed"]):
        raise CheckpointError(f"{mpath}: 'removed' must be a list of block names")
    adaptors = manifest.get("adaptors", {})
    if not isinstance(adaptors, dict) or not all(
        k in manifest["removed"] and isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16
        for k, v in adaptors.items()
    ):
        raise CheckpointError(f"{mpath}: 'adaptors' must map removed blocks to their channel counts")
    wf = manifest["weights_file"]
    if "/" in wf or "\\" in wf or wf.startswith("."):
        raise CheckpointError(f"{mpath}: weights_file {wf!r} must be a plain file name inside the directory")
    try:
        Preset.from_dict(manifest["preset"])
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{mpath}: invalid preset: {exc}") from exc
    return manifest


def load_pruned(path: str | Path, *, device: str | torch.device = "cpu", allow_factory: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned`: validated manifest, same blocks removed, strict weights.

    ``allow_factory=False`` refuses a manifest whose model comes from a factory function (it would import and run
    the code the manifest names): what a server does with a directory someone uploaded.
    """
    from .blocks import declare_blocks
    from .checkpoints import load_weights, read_state_dict

    p = Path(path)
    root = p if p.is_dir() else p.parent
    manifest = read_manifest(p)
    source = manifest.get("source")
    if source is not None:
        if source.get("kind") == "factory" and not allow_factory:
            raise ConfigError(f"{root} was built by the factory function {source.get('spec')!r}; opening it would "
                              "run that code, which is refused here (start the dashboard with --model-factory, or "
                              "use the library)")
        model = rebuild_external(source, Preset.from_dict(manifest["preset"]))
        declare_blocks(model, manifest["blocks"])
    else:
        model = build_model(manifest["arch"], num_classes=manifest["num_classes"])
    removed = manifest["removed"]
    known = {b.name: b for b in find_blocks(model)}
    unknown = [n for n in removed if n not in known]
    if unknown:
        raise CheckpointError(f"{root}: removed blocks {unknown} do not exist in {manifest['arch']}")
    if removed:
        try:
            model = remove_blocks(model, removed)
        except BlockError as exc:  # e.g. a downsampling block, or a name listed twice
            raise CheckpointError(f"{root}: the manifest's removed blocks cannot be removed: {exc}") from exc
    if manifest.get("adaptors"):
        insert_adaptors(model, manifest["adaptors"])
    weights = root / manifest["weights_file"]
    if not weights.is_file():
        raise CheckpointError(f"{root}: weights file {manifest['weights_file']} is missing")
    digest = manifest.get("weights_sha256")
    if digest and hashlib.sha256(weights.read_bytes()).hexdigest() != digest:
        raise CheckpointError(f"{weights} does not match the checksum in its manifest (modified or truncated)")
    state = read_state_dict(weights)
    try:
        load_weights(model, state, source=str(weights))
    except CheckpointError as exc:
        raise CheckpointError(
            f"{root}: the weights do not fit {manifest['arch']} with blocks {removed} removed (the manifest and "
            f"the weights file disagree: edited or mixed up?): {exc}"
        ) from exc
    preset = Preset.from_dict(manifest["preset"]).with_(weights=str(root.resolve()))
    attach_preset(model, preset)
    object.__setattr__(model, "cka_manifest", manifest)
    return model.to(device).eval()


def open_model(
    source: str | Path,
    *,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    allow_download: bool = True,
    device: str | torch.device = "cpu",
    block_patterns: list[str] | str | None = None,
    allow_factory: bool = True,
) -> nn.Module:
    """The one way every entry point (CLI, dashboard, benchmarks) opens a model.

    ``source`` is a registry name (then ``weights`` is None, a checkpoint file or a named source, see
    :func:`~cka_analysis.models.build_model`), ``timm:NAME``, ``hf:DIR_OR_ID`` or ``factory:MODULE:FUNCTION``
    (:mod:`cka_analysis.models.external`: ``block_patterns`` names their blocks, else they are discovered), or a
    directory written by :func:`save_pruned` (then ``weights`` and ``num_classes`` must not be given: the
    directory carries both). ``allow_factory=False`` refuses anything that would import code named by the
    source (a factory, or a saved factory model): the dashboard's rule for what comes from users.

    The model carries its provenance as ``cka_origin`` (``{"model", "weights", "num_classes"}`` and the
    ``block_patterns`` when given: the arguments that open it again), which a pruning record keeps
    (``request["origin"]``) so that ``cka-prune recover`` and the dashboard can reopen the original.
    """
    if is_external(source):
        if str(source).startswith("factory:") and not allow_factory:
            raise ConfigError(f"model {source!r}: factory functions are not accepted here; the person who starts "
                              "the server passes one with `streamlit run app -- --model-factory MODULE:FUNCTION`")
        model = open_external(str(source), weights=weights, num_classes=num_classes, allow_download=allow_download,
                              block_patterns=block_patterns)
        return _with_origin(model.to(device).eval(), source, weights, num_classes, block_patterns)
    if block_patterns:
        raise ConfigError("block patterns are for timm:, hf: and factory: models; registry models know their blocks")
    p = Path(source).expanduser()
    if str(source) in available_models():
        model = build_model(str(source), num_classes=num_classes, weights=weights, allow_download=allow_download)
        return _with_origin(model.to(device).eval(), source, weights, num_classes)
    if p.is_dir() or p.name == MANIFEST:
        if weights is not None or num_classes is not None:
            raise ConfigError(
                f"{source} is a saved model directory: it carries its own weights and classes; "
                "drop --weights/--num-classes"
            )
        return _with_origin(load_pruned(p, device=device, allow_factory=allow_factory), source, None, None)
    if "/" in str(source) or p.exists():
        raise CheckpointError(f"{source} is not a saved model directory ({MANIFEST} not found)")
    # not a registry name: build_model's error names the closest ones and lists the registry
    return _with_origin(build_model(str(source), num_classes=num_classes, weights=weights,
                                    allow_download=allow_download), source, weights, num_classes)


def _with_origin(model: nn.Module, source: str | Path, weights: str | Path | None, num_classes: int | None,
                 block_patterns: list[str] | str | None = None) -> nn.Module:
    """``model`` with ``cka_origin`` set to what :func:`open_model` was given (what opens it again)."""
    origin = {"model": str(source), "weights": None if weights is None else str(weights), "num_classes": num_classes}
    if block_patterns:
        origin["block_patterns"] = [block_patterns] if isinstance(block_patterns, str) else list(block_patterns)
    object.__setattr__(model, "cka_origin", origin)
    return model


def _example(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.zeros((batch, *get_preset(model).input_size))


def export_pt2(model: nn.Module, path: str | Path) -> Path:
    """Export with ``torch.export`` (dynamic batch size) to a ``.pt2`` archive."""
    model = model.eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(model, (_example(model),), dynamic_shapes=({0: batch},))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(out))
    return out


def export_onnx(model: nn.Module, path: str | Path, *, check: bool = True, opset: int | None = None) -> dict:
    """Export to ONNX (dynamic batch size) and, when onnxruntime is installed, check it against PyTorch.

    Returns ``{"path": ..., "checked": bool, "max_abs_diff": float | None}``.
    """
    model = model.eval().cpu()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = _example(model)
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"],
                              "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        # the TorchScript exporter is used deliberately (its output is checked against onnxruntime below); its
        # deprecation notice and constant-folding remarks say nothing the user can act on
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        try:
            torch.onnx.export(model, (x,), str(out), dynamo=False, **kwargs)
        except TypeError:  # torch versions without the dynamo switch
            torch.onnx.export(model, (x,), str(out), **kwargs)
    info: dict[str, Any] = {"path": str(out), "checked": False, "max_abs_diff": None}
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            return info
        g = torch.Generator().manual_seed(0)
        probe = torch.randn((3, *get_preset(model).input_size), generator=g)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": probe.numpy()})[0]
        with torch.no_grad():
            ref = model(probe).numpy()
        diff = float(abs(got - ref).max())
        if diff > 1e-3 * max(1.0, float(abs(ref).max())):
            raise CheckpointError(f"the ONNX export differs from PyTorch by {diff:.2e}")
        info.update(checked=True, max_abs_diff=diff)
    return info
