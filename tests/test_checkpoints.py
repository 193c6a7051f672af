"""Untrusted weight files and saved models: nothing runs code, every bad file is a CheckpointError that says why.

Covers cka_analysis.checkpoints (read_state_dict, load_weights), build_model(..., weights=path), and the saved
model directories of cka_analysis.export (read_manifest, load_pruned, open_model).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cka_analysis.checkpoints import load_weights, read_state_dict
from cka_analysis.errors import CheckpointError, ConfigError
from cka_analysis.export import MANIFEST, WEIGHTS, load_pruned, open_model, read_manifest, save_pruned
from cka_analysis.models import build_model


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digits() -> torch.nn.Module:
    return open_model("digits_resnet", weights="demo")


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))


class _Payload:
    """Unpickling this object runs ``exec``, which writes a marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


def _assert_payload_is_live(path: Path, marker: Path) -> None:
    """The file really runs code when unpickled without protection, so the refusals below prove something."""
    if path.suffix == ".bin":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)  # the unsafe load, on purpose
    assert marker.read_text() == "the payload ran"
    marker.unlink()


def _malicious_files(tmp: Path, marker: Path, state: dict[str, torch.Tensor]) -> dict[str, Path]:
    """Checkpoints that would run code, in every shape torch.load accepts."""
    files = {}
    files["alone.pt"] = tmp / "alone.pt"
    torch.save(_Payload(marker), files["alone.pt"])
    files["inside_state_dict.pth"] = tmp / "inside_state_dict.pth"
    torch.save({**state, "evil": _Payload(marker)}, files["inside_state_dict.pth"])
    files["wrapped.ckpt"] = tmp / "wrapped.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": _Payload(marker)}, files["wrapped.ckpt"])
    files["legacy_format.th"] = tmp / "legacy_format.th"
    torch.save({**state, "evil": _Payload(marker)}, files["legacy_format.th"], _use_new_zipfile_serialization=False)
    files["plain_pickle.bin"] = tmp / "plain_pickle.bin"
    with open(files["plain_pickle.bin"], "wb") as fh:
        pickle.dump({"evil": _Payload(marker)}, fh, protocol=2)
    return files


# ------------------------------------------------------------------------------------------------ code execution
def test_pickles_that_run_code_are_refused_and_never_run(tmp_path: Path, digits: torch.nn.Module) -> None:
    marker = tmp_path / "MARKER"
    files = _malicious_files(tmp_path, marker, digits.state_dict())
    _assert_payload_is_live(files["inside_state_dict.pth"], marker)
    _assert_payload_is_live(files["plain_pickle.bin"], marker)
    for name, path in files.items():
        with pytest.raises(CheckpointError, match="refused to load") as info:
            read_state_dict(path)
        assert str(path) in str(info.value), name
        assert "state_dict" in str(info.value) or "safetensors" in str(info.value)
        with pytest.raises(CheckpointError, match="refused to load"):
            build_model("digits_resnet", weights=path)
        with pytest.raises(CheckpointError, match="refused to load"):
            open_model("digits_resnet", weights=str(path))
        assert not marker.exists(), f"{name}: the payload ran"
    # the message for the common case says why
    with pytest.raises(CheckpointError, match="would run code"):
        read_state_dict(files["inside_state_dict.pth"])
    # a refused file leaves the library usable: the next valid load works
    torch.save(digits.state_dict(), tmp_path / "good.pt")
    assert torch.equal(build_model("digits_resnet", weights=tmp_path / "good.pt").conv1.weight, digits.conv1.weight)


def test_a_pickle_renamed_to_safetensors_is_not_unpickled(tmp_path: Path, digits: torch.nn.Module) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.safetensors"
    torch.save({**digits.state_dict(), "evil": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_state_dict(path)
    assert not marker.exists()


def test_a_saved_model_directory_with_a_pickled_weights_file_is_refused(tmp_path: Path, digits) -> None:
    """The manifest names the weights file; pointing it at a pickle does not get it unpickled."""
    marker = tmp_path / "MARKER"
    out = save_pruned(digits, tmp_path / "saved")
    torch.save({**digits.state_dict(), "evil": _Payload(marker)}, out / "evil.pt")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest.update(weights_file="evil.pt", weights_sha256=hashlib.sha256((out / "evil.pt").read_bytes()).hexdigest())
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="refused to load"):
        open_model(out)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ key / shape mismatch
def _save(tmp: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = tmp / name
    torch.save(state, path)
    return path


def test_wrong_depth_lists_keys_and_names_the_cause(tmp_path: Path) -> None:
    r20 = _save(tmp_path, "r20.pt", build_model("cifar_resnet20").state_dict())
    with pytest.raises(CheckpointError) as info:
        build_model("cifar_resnet56", weights=r20)
    msg = str(info.value)
    assert "does not fit cifar_resnet56" in msg
    assert "wrong depth" in msg and "lacks blocks" in msg and "layer1.3" in msg
    assert "missing keys (180): layer1.3.conv1.weight" in msg
    r56 = _save(tmp_path, "r56.pt", build_model("cifar_resnet56").state_dict())
    with pytest.raises(CheckpointError) as info:
        build_model("cifar_resnet20", weights=r56)
    msg = str(info.value)
    assert "wrong depth" in msg and "has extra blocks" in msg
    assert "unexpected keys (216): layer1.3.conv1.weight" in msg
    assert build_model("cifar_resnet56", weights=r56) is not None  # the right depth loads


def test_wrong_num_classes_names_the_fix(tmp_path: Path, digits: torch.nn.Module) -> None:
    five = build_model("digits_resnet", num_classes=5)
    path = _save(tmp_path, "five.pt", five.state_dict())
    with pytest.raises(CheckpointError) as info:
        build_model("digits_resnet", weights=path)
    msg = str(info.value)
    assert "wrong number of classes" in msg and "num_classes=5" in msg and "--num-classes 5" in msg
    assert "shape mismatches (2): linear.weight (5, 64) vs model (10, 64)" in msg
    assert "wrong depth" not in msg
    loaded = build_model("digits_resnet", weights=path, num_classes=5)
    assert torch.equal(loaded.linear.weight, five.linear.weight)


def test_weights_of_another_input_size_name_the_channels(tmp_path: Path) -> None:
    path = _save(tmp_path, "rgb.pt", build_model("cifar_resnet20").state_dict())  # 9 blocks, 3 channels
    with pytest.raises(CheckpointError, match=r"does not fit digits_resnet.*3-channel images, the model 1"):
        build_model("digits_resnet", weights=path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_data_parallel_and_compile_prefixes_are_stripped(tmp_path: Path, digits, probe, prefix: str) -> None:
    """DataParallel / torch.compile checkpoints (the public CIFAR ones are DataParallel) load as they are."""
    state = {prefix + k: v for k, v in digits.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = _save(tmp_path, "dp.th", {"state_dict": state, "best_prec1": 91.7})
    assert set(read_state_dict(path)) == {k.removeprefix(prefix) for k in state}
    loaded = build_model("digits_resnet", weights=path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe), digits.eval()(probe))


def test_a_model_prefix_is_stripped_even_with_batchnorm(tmp_path: Path, digits, probe) -> None:
    """Lightning-style ``model.`` keys load; the num_batches_tracked fill-in used to hide the prefix."""
    state = {"model." + k: v for k, v in digits.state_dict().items()}
    path = _save(tmp_path, "lightning.ckpt", {"state_dict": state, "epoch": 3})
    loaded = build_model("digits_resnet", weights=path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe), digits.eval()(probe))


def test_an_unknown_prefix_is_named_as_the_cause(tmp_path: Path, digits) -> None:
    path = _save(tmp_path, "backbone.pt", {"backbone." + k: v for k, v in digits.state_dict().items()})
    with pytest.raises(CheckpointError) as info:
        build_model("digits_resnet", weights=path)
    msg = str(info.value)
    assert "'backbone.' prefix" in msg and "removeprefix('backbone.')" in msg
    assert "unexpected keys (116): backbone.conv1.weight" in msg and "missing keys" in msg
    assert "wrong depth" not in msg  # the prefix explains it all


def test_load_weights_is_strict_and_leaves_the_model_untouched(digits: torch.nn.Module) -> None:
    model = build_model("digits_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = dict(digits.state_dict())
    state.pop("layer3.2.bn2.bias")
    state["extra.weight"] = torch.zeros(1)
    state["linear.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, state, source="upload.pt")
    msg = str(info.value)
    assert "missing keys (1): layer3.2.bn2.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "linear.bias (3,) vs model (10,)" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ corrupt files
def _corrupt_files(tmp: Path, digits: torch.nn.Module) -> dict[str, Path]:
    good_pt = _save(tmp, "good.pt", digits.state_dict())
    save_file(digits.state_dict(), str(tmp / "good.safetensors"))
    pt, st = good_pt.read_bytes(), (tmp / "good.safetensors").read_bytes()
    rng = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (4096,), generator=rng, dtype=torch.uint8).tolist())
    content = {
        "empty.pt": b"",
        "empty.safetensors": b"",
        "random.pt": noise,
        "random.pth": noise[:17],
        "random.safetensors": noise,
        "text.th": b"<html>404 Not Found</html>",
        "truncated_half.pt": pt[: len(pt) // 2],
        "truncated_tail.pt": pt[:-100],
        "truncated_header.safetensors": st[:6],
        "truncated_half.safetensors": st[: len(st) // 2],
        "truncated_tail.safetensors": st[:-1],
    }
    flipped = bytearray(st)
    flipped[8:40] = b"\xff" * 32  # garbage inside the JSON header
    content["bad_header.safetensors"] = bytes(flipped)
    files = {}
    for name, data in content.items():
        files[name] = tmp / name
        files[name].write_bytes(data)
    return files


def test_corrupt_and_truncated_files_are_checkpoint_errors(tmp_path: Path, digits: torch.nn.Module) -> None:
    for name, path in _corrupt_files(tmp_path, digits).items():
        with pytest.raises(CheckpointError) as info:
            read_state_dict(path)
        msg = str(info.value)
        assert str(path) in msg, name
        assert any(w in msg for w in ("empty", "corrupt", "truncated")), (name, msg)
        with pytest.raises(CheckpointError):
            build_model("digits_resnet", weights=path)
    # and the intact originals still load
    for good in ("good.pt", "good.safetensors"):
        assert set(read_state_dict(tmp_path / good)) == set(digits.state_dict())


def test_files_that_hold_no_state_dict(tmp_path: Path) -> None:
    cases = {"list.pt": [1, 2, 3], "tensor.pt": torch.ones(3), "meta.pt": {"epoch": 3, "lr": 0.1}}
    for name, obj in cases.items():
        path = _save(tmp_path, name, obj)
        with pytest.raises(CheckpointError, match=r"does not hold a state dict.*model\.state_dict"):
            read_state_dict(path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("digits_resnet", weights=tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------------ saved models
@pytest.fixture
def saved(tmp_path: Path, digits: torch.nn.Module) -> Path:
    from cka_analysis.blocks import remove_blocks

    return save_pruned(remove_blocks(digits, ["layer1.1", "layer3.2"]), tmp_path / "pruned", report={"note": "t"})


def _edit(path: Path, **changes) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest.update(changes)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_saved_model_round_trip(saved: Path, digits, probe) -> None:
    model = open_model(saved)
    from cka_analysis.blocks import remove_blocks

    ref = remove_blocks(digits, ["layer1.1", "layer3.2"]).eval()
    with torch.no_grad():
        assert torch.equal(model(probe), ref(probe))
    assert read_manifest(saved)["removed"] == ["layer1.1", "layer3.2"]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"format": "cka-prune/2"}, "format 'cka-prune/2'"),
        ({"format": 1}, "field 'format' must be a str"),
        ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"num_classes": True}, "num_classes must be a positive integer"),
        ({"num_classes": "10"}, "field 'num_classes' must be a int"),
        ({"removed": "layer1.1"}, "field 'removed' must be a list"),
        ({"removed": [1, 2]}, "'removed' must be a list of block names"),
        ({"preset": {"arch": "digits_resnet"}}, "invalid preset"),
        ({"weights_file": "../model.safetensors"}, "must be a plain file name"),
        ({"weights_file": "/etc/passwd"}, "must be a plain file name"),
        ({"weights_file": "sub\\model.safetensors"}, "must be a plain file name"),
        ({"weights_file": ".hidden"}, "must be a plain file name"),
    ],
)
def test_invalid_manifests_are_refused(saved: Path, changes: dict, words: str) -> None:
    _edit(saved, **changes)
    with pytest.raises(CheckpointError) as info:
        open_model(saved)
    assert words in str(info.value)
    with pytest.raises(CheckpointError):
        load_pruned(saved / MANIFEST)


def test_manifest_field_missing_or_not_json(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["arch"]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lacks the field 'arch'"):
        read_manifest(saved)
    (saved / MANIFEST).write_text('{"format": "cka-prune/1", ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(saved)
    (saved / MANIFEST).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object"):
        read_manifest(saved)


@pytest.mark.parametrize(
    ("removed", "words"),
    [
        (["layer9.9"], "removed blocks ['layer9.9'] do not exist in digits_resnet"),
        (["layer1.1", "fc"], "removed blocks ['fc'] do not exist"),
        (["layer2.0"], "cannot be removed: block 'layer2.0' cannot be removed: downsampling"),
    ],
)
def test_manifest_blocks_must_exist_and_be_removable(saved: Path, removed: list[str], words: str) -> None:
    _edit(saved, removed=removed)
    with pytest.raises(CheckpointError) as info:
        load_pruned(saved)
    assert words in str(info.value)


def test_manifest_blocks_that_disagree_with_the_weights(saved: Path) -> None:
    """Valid block names but not the ones the weights were saved without: strict loading explains it."""
    _edit(saved, removed=["layer1.1"])
    with pytest.raises(CheckpointError) as info:
        load_pruned(saved)
    msg = str(info.value)
    assert "do not fit digits_resnet with blocks ['layer1.1'] removed" in msg
    assert "missing keys (10): layer3.2.conv1.weight" in msg


def test_checksum_mismatch_and_missing_weights(saved: Path) -> None:
    weights = saved / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_pruned(saved)
    weights.write_bytes(bytes(data[:-50]))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_pruned(saved)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"weights file model\.safetensors is missing"):
        load_pruned(saved)


def test_truncated_weights_without_a_checksum_are_still_refused(saved: Path) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["weights_sha256"]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    weights = saved / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_pruned(saved)


def test_open_model_on_folders_that_are_not_saved_models(tmp_path: Path, saved: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"manifest\.json not found"):
        open_model(empty)
    with pytest.raises(CheckpointError, match="not a saved model directory"):
        open_model(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(ConfigError, match="carries its own weights"):
        open_model(saved, weights="demo")
    # after the errors, the saved model still opens
    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    assert open_model(copy).cka_manifest["removed"] == ["layer1.1", "layer3.2"]


def test_weights_only_everywhere_in_the_library() -> None:
    """Every torch.load in the package passes weights_only=True (grep-level guard for new code)."""
    root = Path(__file__).resolve().parents[1] / "cka_analysis"
    offenders = []
    for path in root.rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert not offenders, offenders
    assert os.sep not in WEIGHTS
