"""Uploaded checkpoints and saved-model archives: checked, unpacked in a private folder, removed after use.

An upload is only ever written to a fresh ``tempfile.mkdtemp`` folder (mode 0700) under a fixed file name (the
user's file name is never used as a path), loaded with the library's safe loaders (``weights_only=True`` torch
files, safetensors, validated manifests), and the folder is deleted as soon as the weights are in memory.
Archives are unpacked member by member: only ``manifest.json`` and ``*.safetensors`` files at the top level (or in
one top folder) are accepted, absolute paths, ``..``, links and oversized contents are refused.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import tempfile
import zipfile
from io import BytesIO
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from cka_analysis.errors import CheckpointError
from cka_analysis.export import MANIFEST, open_model

CHECKPOINT_TYPES = ("pt", "pth", "th", "safetensors")
ARCHIVE_TYPES = ("zip",)
MAX_UPLOAD_BYTES = 200 * 1024**2  # same as server.maxUploadSize in .streamlit/config.toml
MAX_UNPACKED_BYTES = 1024**3
MAX_MEMBERS = 16


def digest(data: bytes) -> str:
    """Short content hash of an upload, used as its cache key."""
    return hashlib.sha256(data).hexdigest()[:16]


def _check_upload(name: str, data: bytes, allowed: tuple[str, ...]) -> str:
    suffix = Path(name).suffix.lower().lstrip(".")
    if suffix not in allowed:
        raise CheckpointError(
            f"{name!r} has the extension {('.' + suffix) if suffix else '(none)'}; "
            f"upload a {', '.join('.' + a for a in allowed)} file"
        )
    if len(data) == 0:
        raise CheckpointError(f"{name!r} is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise CheckpointError(
            f"{name!r} is {len(data) / 1024**2:.0f} MB; uploads are limited to {MAX_UPLOAD_BYTES // 1024**2} MB "
            "(for larger models run the dashboard with the model in the registry or use the cka-prune CLI)"
        )
    return suffix


def model_from_checkpoint(name: str, data: bytes, arch: str, num_classes: int | None,
                          device: str | torch.device = "cpu") -> nn.Module:
    """Build registry architecture ``arch`` with the weights of an uploaded checkpoint file."""
    suffix = _check_upload(name, data, CHECKPOINT_TYPES)
    tmp = Path(tempfile.mkdtemp(prefix="cka-prune-upload-"))
    try:
        path = tmp / f"checkpoint.{suffix}"
        path.write_bytes(data)
        path.chmod(0o600)
        try:
            return open_model(arch, weights=path, num_classes=num_classes, allow_download=False, device=device)
        except CheckpointError as exc:  # name the user's file, not the private temporary copy
            raise CheckpointError(str(exc).replace(str(path), f"the uploaded {name!r}")) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _member_target(info: zipfile.ZipInfo) -> str | None:
    """The plain file name a member is unpacked to, None for folders; raises for anything unsafe."""
    raw = info.filename
    p = PurePosixPath(raw.replace("\\", "/"))
    if raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":") or ".." in p.parts:
        raise CheckpointError(f"the archive member {raw!r} points outside the archive; refusing to unpack it")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"the archive member {raw!r} is a link; refusing to unpack it")
    if info.is_dir():
        return None
    if len(p.parts) > 2:
        raise CheckpointError(
            f"the archive member {raw!r} is nested too deep; the archive must hold manifest.json and "
            "model.safetensors at its top level or in one folder"
        )
    if p.name != MANIFEST and not p.name.endswith(".safetensors"):
        raise CheckpointError(
            f"the archive holds {raw!r}; only {MANIFEST} and .safetensors files belong in a saved model"
        )
    return p.name


def model_from_archive(name: str, data: bytes, device: str | torch.device = "cpu") -> nn.Module:
    """Open a saved-model directory (manifest.json + model.safetensors) uploaded as a .zip archive."""
    _check_upload(name, data, ARCHIVE_TYPES)
    try:
        zf = zipfile.ZipFile(BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{name!r} is not a readable .zip archive ({exc})") from exc
    tmp = Path(tempfile.mkdtemp(prefix="cka-prune-upload-"))
    try:
        with zf:
            members = zf.infolist()
            if len(members) > MAX_MEMBERS:
                raise CheckpointError(f"{name!r} holds {len(members)} entries; a saved model has two files")
            total = sum(m.file_size for m in members)
            if total > MAX_UNPACKED_BYTES:
                raise CheckpointError(
                    f"{name!r} unpacks to {total / 1024**2:.0f} MB (limit {MAX_UNPACKED_BYTES // 1024**2} MB)"
                )
            written: set[str] = set()
            for info in members:
                target = _member_target(info)
                if target is None:
                    continue
                if target in written:
                    raise CheckpointError(f"{name!r} holds two files named {target!r}")
                dest = (tmp / target).resolve()
                if dest.parent != tmp.resolve():
                    raise CheckpointError(f"the archive member {info.filename!r} points outside the archive")
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, length=1024**2)
                written.add(target)
        if MANIFEST not in written:
            raise CheckpointError(
                f"{name!r} holds no {MANIFEST}; upload the .zip of a folder written by the exporter "
                "(manifest.json + model.safetensors)"
            )
        return open_model(tmp, device=device, allow_factory=False)  # code never comes from an upload
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{name!r} is a damaged .zip archive ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
