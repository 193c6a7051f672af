"""Tests for cka_analysis.export: save_pruned/load_pruned give identical logits (pruned and unpruned), the manifest
records what is needed to rebuild and reproduce, tampered or broken directories are refused with a clear error,
torch.export and ONNX exports compute the same function, and open_model opens registry names and saved
directories."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from cka_analysis._version import __version__
from cka_analysis.blocks import find_blocks, remove_blocks, removed_blocks
from cka_analysis.data import load_dataset
from cka_analysis.errors import CheckpointError, ConfigError
from cka_analysis.export import (
    MANIFEST,
    WEIGHTS,
    export_onnx,
    export_pt2,
    load_pruned,
    open_model,
    read_manifest,
    save_pruned,
)
from cka_analysis.models import attach_preset, build_model, get_preset
from cka_analysis.models.preset import Preset

REMOVED = ["layer3.2", "layer2.1"]  # in removal order (not forward order)



@pytest.fixture(scope="module")
def demo() -> nn.Module:
    """The demo with its BN statistics and weights perturbed, so that reloading the bundled weights instead of the
    saved ones would show."""
    model = build_model("digits_resnet", weights="demo").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
        model.bn1.running_mean.add_(0.01)
    return model


@pytest.fixture(scope="module")
def pruned(demo: nn.Module) -> nn.Module:
    return remove_blocks(demo, REMOVED).eval()


@pytest.fixture(scope="module")
def images(demo: nn.Module) -> torch.Tensor:
    test = load_dataset("digits", "test", get_preset(demo))
    return torch.stack([test[i][0] for i in range(0, 360, 12)])  # 30 real test images


@pytest.fixture(scope="module")
def saved(pruned: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    report = {
        "scores": {"layer1.1": 0.25, "layer3.2": 0.01},
        "tensor": torch.tensor([1.5, 2.5]),
        "nan": float("nan"),
        "path": Path("/some/where"),
        0.5: "float key",
        "nested": [{"t": torch.tensor(3)}],
    }
    return save_pruned(pruned, tmp_path_factory.mktemp("export") / "pruned", report=report)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------- round trips
def test_pruned_round_trip_gives_identical_logits(pruned, saved, images) -> None:
    loaded = load_pruned(saved)
    assert torch.equal(logits(loaded, images), logits(pruned, images))
    assert not loaded.training
    assert removed_blocks(loaded) == REMOVED
    assert all(isinstance(loaded.get_submodule(n), nn.Identity) for n in REMOVED)
    assert [b.name for b in find_blocks(loaded)] == [b.name for b in find_blocks(pruned)]
    preset = get_preset(loaded)
    assert preset == get_preset(pruned).with_(weights=str(saved.resolve()))
    assert loaded.cka_manifest["removed"] == REMOVED


def test_unpruned_round_trip_gives_identical_logits(demo, images, tmp_path: Path) -> None:
    out = save_pruned(demo, tmp_path / "full")
    loaded = load_pruned(out)
    assert torch.equal(logits(loaded, images), logits(demo, images))
    assert removed_blocks(loaded) == []
    for k, v in demo.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # the bundled weights differ from the saved ones, so the equality above came from the file
    assert not torch.equal(logits(build_model("digits_resnet", weights="demo"), images), logits(demo, images))


def test_pruning_a_loaded_model_further(saved, images, tmp_path: Path) -> None:
    loaded = load_pruned(saved)
    more = remove_blocks(loaded, ["layer1.1"])
    again = load_pruned(save_pruned(more, tmp_path / "more"))
    assert removed_blocks(again) == [*REMOVED, "layer1.1"]
    assert torch.equal(logits(again, images), logits(more, images))


def test_other_families_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    for name, blocks, size in [("vit_tiny", ["encoder.layers.encoder_layer_1"], (3, 32, 32)),
                               ("cifar_resnet20", ["layer1.2", "layer3.1"], (3, 32, 32))]:
        model = remove_blocks(build_model(name, num_classes=7), blocks).eval()
        loaded = load_pruned(save_pruned(model, tmp_path / name))
        x = torch.randn(3, *size)
        assert torch.equal(logits(loaded, x), logits(model, x)), name
        assert get_preset(loaded).num_classes == 7


# ------------------------------------------------------------------------------- torchvision's own format
def _find(path: str):
    """What the README tells a user to do with config.json's dotted paths (no import of this project)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name,blocks,depth_key,depth", [
    ("resnet18", ["layer3.1", "layer1.0"], "layers", [1, 2, 1, 2]),
    ("resnet50", ["layer1.1", "layer3.2", "layer3.4"], "layers", [2, 4, 4, 3]),
    ("mobilenet_v2", ["features.3", "features.13", "features.6", "features.16"], "inverted_residual_setting",
     [[1, 16, 1, 1], [6, 24, 1, 2], [6, 32, 2, 2], [6, 64, 4, 2], [6, 96, 2, 1], [6, 160, 2, 2], [6, 320, 1, 1]]),
    ("vit_tiny", ["encoder.layers.encoder_layer_2", "encoder.layers.encoder_layer_0"], "num_layers", 2),
])
def test_torchvision_pruned_rebuilds_with_its_own_class(name, blocks, depth_key, depth, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    with torch.no_grad():  # no zero-initialised heads, batch-norm statistics that are not the identity: a block
        for p in model.parameters():  # out of place, or one kept too many, changes the logits
            if not p.any():
                p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    pruned = remove_blocks(model, blocks).eval()
    folder = save_pruned(pruned, tmp_path / "out")
    assert read_manifest(folder)["native"]["format"] == "torchvision"
    cfg = json.loads((folder / "torchvision" / "config.json").read_text())
    assert cfg["class"] == f"{type(model).__module__}.{type(model).__name__}"
    assert cfg["kwargs"][depth_key] == depth and cfg["kwargs"]["num_classes"] == 7
    native = _find(cfg["class"])(**cfg["kwargs"], **{k: _find(v) for k, v in cfg["classes"].items()}).eval()
    native.load_state_dict(load_file(str(folder / "torchvision" / "model.safetensors")), strict=True)
    x = torch.randn(2, *get_preset(model).input_size)
    assert torch.equal(logits(native, x), logits(load_pruned(folder), x))
    assert not torch.allclose(logits(native, x), logits(model.eval(), x))  # the blocks are really gone


TV_FACTORY = """
import torchvision
from cka_analysis.models import Preset, attach_preset

class MyResNet(torchvision.models.ResNet):  # a subclass may take other constructor arguments
    pass

def _preset(num_classes):
    return Preset(arch="mine", input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=num_classes)

def build(num_classes=5):
    return attach_preset(torchvision.models.resnet18(num_classes=num_classes), _preset(num_classes))

def build_subclass(num_classes=5):
    model = MyResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    return attach_preset(model, _preset(num_classes))
"""


def test_a_factory_returning_a_torchvision_resnet_gets_torchvision_format_back(tmp_path: Path) -> None:
    (tmp_path / "tvfactory.py").write_text(TV_FACTORY)
    model = open_model(f"factory:{tmp_path / 'tvfactory.py'}:build", weights="random")
    assert "layer2.1" in [b.name for b in find_blocks(model)]  # found by discovery, not declared by the registry
    pruned = remove_blocks(model, ["layer2.1", "layer3.1"]).eval()
    folder = save_pruned(pruned, tmp_path / "out")
    cfg = json.loads((folder / "torchvision" / "config.json").read_text())
    assert cfg["class"] == "torchvision.models.resnet.ResNet" and cfg["kwargs"]["layers"] == [2, 1, 1, 2]
    native = _find(cfg["class"])(**cfg["kwargs"], **{k: _find(v) for k, v in cfg["classes"].items()}).eval()
    native.load_state_dict(load_file(str(folder / "torchvision" / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits(native, x), logits(load_pruned(folder), x))

    sub = open_model(f"factory:{tmp_path / 'tvfactory.py'}:build_subclass", weights="random")
    folder = save_pruned(remove_blocks(sub, ["layer2.1"]).eval(), tmp_path / "sub")
    assert read_manifest(folder).get("native") is None and not (folder / "torchvision").exists()


def test_a_torchvision_resnet_without_a_stage_keeps_the_projects_format_only(tmp_path: Path) -> None:
    pruned = remove_blocks(build_model("resnet18", num_classes=7), ["layer1.0", "layer1.1"]).eval()
    folder = save_pruned(pruned, tmp_path / "out")
    native = read_manifest(folder)["native"]
    assert native["format"] is None and "every block of layer1 was removed" in native["reason"]
    assert not (folder / "torchvision").exists()
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(logits(load_pruned(folder), x), logits(pruned, x))


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_content(pruned, saved) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest == read_manifest(saved) == read_manifest(saved / MANIFEST)
    assert manifest["format"] == "cka-prune/1"
    assert manifest["arch"] == "digits_resnet"
    assert manifest["num_classes"] == 10
    assert manifest["preset"] == get_preset(pruned).to_dict()
    assert manifest["preset"]["input_size"] == [1, 8, 8]
    assert manifest["removed"] == REMOVED
    assert manifest["weights_file"] == WEIGHTS
    assert manifest["weights_sha256"] == hashlib.sha256((saved / WEIGHTS).read_bytes()).hexdigest()
    assert manifest["versions"]["cka_prune"] == __version__
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["python"].count(".") == 2
    assert manifest["created"].endswith("+00:00")
    report = manifest["report"]  # stored JSON-safe
    assert report["scores"] == {"layer1.1": 0.25, "layer3.2": 0.01}
    assert report["tensor"] == [1.5, 2.5]
    assert report["nan"] is None
    assert report["path"] == "/some/where"
    assert report["0.5"] == "float key"
    assert report["nested"] == [{"t": 3}]


def test_weights_are_safetensors_with_exactly_the_model_state(pruned, saved) -> None:
    with safe_open(str(saved / WEIGHTS), framework="pt") as f:
        assert set(f.keys()) == set(pruned.state_dict())
        assert f.metadata()["arch"] == "digits_resnet"
        for k, v in pruned.state_dict().items():
            assert torch.equal(f.get_tensor(k), v), k
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST, WEIGHTS]


def test_prune_record_is_stored_and_read_back(demo, tmp_path: Path) -> None:
    from cka_analysis.workflow import PruneRecord, PruneRequest, run_prune

    outcome = run_prune(PruneRequest(demo, blocks=("layer1.2",), recovery="none", eval_samples=32, device="cpu",
                                     latency=False))
    out = save_pruned(outcome.model, tmp_path / "with_report", report=outcome.record.to_dict())
    report = read_manifest(out)["report"]
    assert report["removed"] == ["layer1.2"]
    assert report["final"]["macs"] == outcome.record.final.macs
    assert [s["step"] for s in report["steps"]] == [0, 1]
    assert PruneRecord.from_dict(load_pruned(out).cka_manifest["report"]) == outcome.record


def test_manifests_of_0_1_0_with_the_empty_preset_extra_still_load(demo, tmp_path: Path) -> None:
    out = save_pruned(demo, tmp_path / "old")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["preset"]["extra"] = {}  # what 0.1.0 wrote
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert load_pruned(out).cka_preset.with_(weights="") == demo.cka_preset.with_(weights="")


def test_markdown_table() -> None:
    from cka_analysis.export import markdown_table

    text = markdown_table(["a", "b|c"], [[1.234567, None], ["x|y", 3]])
    assert text.splitlines() == ["| a | b|c |", "|---|---|", "| 1.235 | – |", "| x\\|y | 3 |"]


# ----------------------------------------------------------------------------------------------- errors
def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / MANIFEST).read_text())
    m.update(changes)
    (d / MANIFEST).write_text(json.dumps(m))


def test_broken_directories_are_refused(saved, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"manifest\.json not found"):
        load_pruned(tmp_path)

    d = _copy_dir(saved, tmp_path / "tampered")
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (d / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_pruned(d)

    d = _copy_dir(saved, tmp_path / "missing_weights")
    (d / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match=r"weights file model\.safetensors is missing"):
        load_pruned(d)

    d = _copy_dir(saved, tmp_path / "bad_json")
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_pruned(d)

    cases = [
        ({"arch": "resnet9000"}, "unknown architecture 'resnet9000'"),
        ({"format": "cka-prune/99"}, "this version of cka-prune reads 'cka-prune/1'"),
        ({"removed": ["layer7.0"]}, r"removed blocks \['layer7\.0'\] do not exist"),
        ({"weights_file": "../model.safetensors"}, "must be a plain file name"),
        ({"removed": "layer1.1"}, "field 'removed' must be a list"),
        ({"preset": {"arch": "digits_resnet"}}, "invalid preset"),
    ]
    for i, (change, match) in enumerate(cases):
        d = _copy_dir(saved, tmp_path / f"case{i}")
        _edit_manifest(d, **change)
        with pytest.raises(CheckpointError, match=match):
            load_pruned(d)
    d = _copy_dir(saved, tmp_path / "no_arch")
    m = json.loads((d / MANIFEST).read_text())
    del m["arch"]
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="lacks the field 'arch'"):
        load_pruned(d)


def test_save_errors(demo, tmp_path: Path) -> None:
    custom = attach_preset(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), Preset("mine", (1, 8, 8), (0.5,), (0.5,), 10))
    with pytest.raises(ConfigError, match="'mine' is not a registry architecture"):
        save_pruned(custom, tmp_path / "custom")
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        save_pruned(demo, target)
    with pytest.raises(ConfigError, match="carries no preset"):
        save_pruned(nn.Linear(2, 2), tmp_path / "bare")


# ------------------------------------------------------------------------------------------------ exports
def test_export_pt2_loads_and_matches(pruned, images, tmp_path: Path) -> None:
    path = export_pt2(pruned, tmp_path / "deploy" / "model.pt2")
    assert path.is_file()
    program = torch.export.load(str(path))
    module = program.module()
    for batch in (images[:2], images[:7]):  # dynamic batch size
        with torch.no_grad():
            torch.testing.assert_close(module(batch), logits(pruned, batch), atol=1e-5, rtol=1e-5)


def test_export_onnx_checked_with_onnxruntime(pruned, images, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    info = export_onnx(pruned, tmp_path / "model.onnx")
    assert info["checked"] is True
    assert info["path"] == str(tmp_path / "model.onnx")
    assert 0 <= info["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(info["path"], providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    got = sess.run(None, {"input": images[:11].numpy()})[0]  # another batch size than the export's
    want = logits(pruned, images[:11]).numpy()
    assert got.shape == (11, 10)
    assert float(abs(got - want).max()) < 1e-4
    unchecked = export_onnx(pruned, tmp_path / "unchecked.onnx", check=False)
    assert unchecked["checked"] is False and unchecked["max_abs_diff"] is None


# --------------------------------------------------------------------------------------------- open_model
def test_open_model_registry_name(images) -> None:
    model = open_model("digits_resnet", weights="demo")
    assert not model.training
    assert get_preset(model).weights == "bundled digits_resnet.safetensors"
    ref = build_model("digits_resnet", weights="demo")
    assert torch.equal(logits(model, images), logits(ref, images))
    random = open_model("cifar_resnet20", num_classes=3)
    assert get_preset(random).num_classes == 3 and get_preset(random).weights == "random"
    with pytest.raises(ConfigError, match="unknown model 'digits_resnt'"):
        open_model("digits_resnt")


def test_open_model_saved_directory(pruned, saved, images) -> None:
    for source in (saved, str(saved), saved / MANIFEST):
        model = open_model(source)
        assert removed_blocks(model) == REMOVED
        assert torch.equal(logits(model, images), logits(pruned, images))
    with pytest.raises(ConfigError, match="drop --weights/--num-classes"):
        open_model(saved, weights="demo")
    with pytest.raises(ConfigError, match="drop --weights/--num-classes"):
        open_model(saved, num_classes=10)


def test_open_model_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"manifest\.json not found"):
        open_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="is not a saved model directory"):
        open_model(str(tmp_path / "does" / "not" / "exist"))
