"""Loading weights safely, and explaining why a checkpoint does not fit a model.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read with safetensors, every other file with
``torch.load(..., weights_only=True)``, which refuses pickles that would import or call code. Those refusals become
a :class:`CheckpointError` that says so.
"""

from __future__ import annotations

import hashlib
import pickle
import urllib.error
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .config import cache_dir
from .errors import CheckpointError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt", ".safetensors")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict, without running code from the file.

    Accepts safetensors files and torch files that hold a state dict directly or under a usual key
    (``state_dict``, ``model_state_dict``, ``model``, ...). The ``module.`` prefix of DataParallel checkpoints and
    the ``_orig_mod.`` prefix of ``torch.compile`` are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
    else:
        raw = _torch_load_safely(path)
    return normalise_state_dict(raw, source=str(path))


def _torch_load_safely(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Unsupported global" in msg:
            raise CheckpointError(
                f"refused to load {path}: it contains Python objects that would run code when unpickled "
                "(only tensors and plain containers are accepted). Re-save it as a state dict "
                "(torch.save(model.state_dict(), ...)) or as .safetensors."
            ) from exc
        if "weights_only" in msg or "Unsupported operand" in msg:
            # random bytes and pickles written without torch.save both end here
            raise CheckpointError(
                f"refused to load {path}: it is not a plain PyTorch checkpoint. Either the file is corrupt, "
                "truncated or not a checkpoint at all, or it was pickled with instructions outside the safe "
                "subset (which could run code). Re-save it with torch.save(model.state_dict(), ...) or as "
                ".safetensors."
            ) from exc
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {msg}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc


def normalise_state_dict(raw: object, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap the usual checkpoint containers and prefixes into a plain ``{name: tensor}`` dict."""
    obj = raw
    for _ in range(3):
        if isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _looks_like_state_dict(obj):
        kind = type(raw).__name__
        keys = list(raw)[:8] if isinstance(raw, Mapping) else []
        raise CheckpointError(
            f"{source} does not hold a state dict of tensors (found a {kind}"
            + (f" with keys {keys}" if keys else "")
            + "); save model.state_dict() instead of the whole model"
        )
    out: dict[str, torch.Tensor] = OrderedDict()
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        key = str(k)
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES[:2]:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = v
    return out


def _looks_like_state_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` with strict key and shape matching, explaining any mismatch.

    ``num_batches_tracked`` buffers absent from old checkpoints are tolerated (they are bookkeeping, not
    weights). On mismatch, a :class:`CheckpointError` lists the first missing / unexpected / mismatched keys and the
    likely cause (wrong depth, wrong number of classes, a ``model.`` prefix).
    """
    state = dict(state)
    own = model.state_dict()
    # before the num_batches_tracked fill-in below, which would make an all-prefixed state look partly matched
    if not any(k in own for k in state) and any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(describe_mismatch(model, missing, unexpected, mismatched, source=source))
    model.load_state_dict(state, strict=True)


def describe_mismatch(
    model: nn.Module,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[tuple[str, tuple, tuple]],
    *,
    source: str,
) -> str:
    """A readable account of why a state dict does not fit, with the likely cause first."""
    arch = getattr(getattr(model, "cka_preset", None), "arch", type(model).__name__)
    causes = []
    head = [m for m in mismatched if m[1] and m[2] and m[1][0] != m[2][0] and len(m[1]) <= 2]
    if head and all(m[1][0] == head[0][1][0] for m in head):
        causes.append(
            f"wrong number of classes: the checkpoint's {head[0][0]} has {head[0][1][0]} outputs, the model "
            f"{head[0][2][0]} (pass num_classes={head[0][1][0]} / --num-classes {head[0][1][0]})"
        )
    firsts = {k.split(".")[0] for k in unexpected if "." in k}
    prefix = f"{firsts.pop()}." if len(firsts) == 1 and all("." in k for k in unexpected) else None
    if prefix and missing and set(missing) <= {k.removeprefix(prefix) for k in unexpected}:
        causes.append(
            f"the checkpoint's keys carry a '{prefix}' prefix (e.g. {unexpected[0]}); "
            f"save the state dict without it ({{k.removeprefix('{prefix}'): v for k, v in state.items()}})"
        )
    else:  # block names only mean something once the keys line up
        stages_m = {".".join(k.split(".")[:2]) for k in missing if k.split(".")[0].startswith("layer")}
        stages_u = {".".join(k.split(".")[:2]) for k in unexpected if k.split(".")[0].startswith("layer")}
        if stages_m or stages_u:
            causes.append(
                "wrong depth: the checkpoint "
                + (f"has extra blocks {sorted(stages_u)[:4]}" if stages_u else "")
                + (" and " if stages_u and stages_m else "")
                + (f"lacks blocks {sorted(stages_m)[:4]}" if stages_m else "")
                + " — pick the architecture with the matching depth"
            )
    stem = [m for m in mismatched if len(m[1]) == 4 and len(m[2]) == 4 and m[1][0] == m[2][0] and m[1][1] != m[2][1]]
    first_weight = next((k for k, v in model.state_dict().items() if v.dim() == 4), None)
    if stem and stem[0][0] == first_weight:
        causes.append(
            f"a different input: the checkpoint's {stem[0][0]} takes {stem[0][1][1]}-channel images, the model "
            f"{stem[0][2][1]} (weights of another architecture or dataset)"
        )
    lines = [f"{source} does not fit {arch}" + (f": likely {'; '.join(causes)}" if causes else "")]
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        lines.append(
            f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    if mismatched:
        shown = ", ".join(f"{k} {a} vs model {b}" for k, a, b in mismatched[:5])
        lines.append(f"shape mismatches ({len(mismatched)}): {shown}{' ...' if len(mismatched) > 5 else ''}")
    return "; ".join(lines)


def download_cached(url: str, *, filename: str | None = None, sha256_prefix: str | None = None,
                    allow_download: bool = True) -> Path:
    """The local copy of ``url`` in ``<cache>/checkpoints/`` (torch.hub's layout), downloading it once.

    Offline with no cached copy: a :class:`CheckpointError` that names the file to fetch and where to put it.
    """
    name = filename or url.rsplit("/", 1)[-1]
    target = cache_dir() / "checkpoints" / name
    if target.is_file():
        return target
    if not allow_download:
        raise CheckpointError(f"weights {name} are not cached at {target} and downloads are disabled")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"weights {name} are not cached at {target} and could not be downloaded from {url} "
            f"({type(exc).__name__}: {exc}). Download the file on a connected machine, copy it to {target} "
            "(or pass it as a local weights file)"
        ) from exc
    if sha256_prefix:
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if not digest.startswith(sha256_prefix):
            target.unlink(missing_ok=True)
            raise CheckpointError(f"download of {url} is corrupt (sha256 {digest[:8]} ≠ {sha256_prefix})")
    return target
