"""Models that are not ours: block discovery by probing, timm / Hugging Face / factory sources, native exports.

Every model here is a small, randomly initialised config built locally (nothing is downloaded). The ground truth
of each family's residual blocks comes from the family's own structure (a ResNet block without a downsample, an
EfficientNet block with ``has_skip``, every transformer layer, ...), never from the discovery code.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cka_analysis.blocks import discover_blocks, find_blocks, remove_blocks
from cka_analysis.errors import CKAPruneError, ConfigError
from cka_analysis.export import load_pruned, open_model, save_pruned
from cka_analysis.models import Preset, attach_preset

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (timm zero-initialises some last norms / layer scales, which would make every
    block an exact identity and the removal tests vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:  # biases near 0, gains (norms, layer scales) near 1
                p.copy_(0.1 * noise + (0.0 if name.endswith("bias") else 1.0))
            else:
                p.copy_(noise / (p[0].numel() ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.fill_(1.0)
    return model.eval()


class HF(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.hf = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


def _timm(name: str, **kw) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _hf(config) -> nn.Module:
    return HF(transformers.AutoModelForImageClassification.from_config(config))


def _truth_resnet(m):  # timm ResNet: blocks of layer1..4 whose shortcut is the identity
    return [f"layer{s}.{i}" for s in range(1, 5) for i, b in enumerate(getattr(m, f"layer{s}"))
            if b.downsample is None]


def _truth_skip(m):  # timm EfficientNet / MobileNetV3: blocks with a skip connection
    return [f"blocks.{s}.{i}" for s, stage in enumerate(m.blocks) for i, b in enumerate(stage)
            if getattr(b, "has_skip", False)]


def _truth_regnet(m):
    return [f"{sn}.{bn}" for sn, stage in m.named_children() if sn.startswith("s") and sn[1:].isdigit()
            for bn, b in stage.named_children() if isinstance(getattr(b, "downsample", None), (nn.Identity, type(None)))]


FAMILIES = {
    "timm-resnet18": (lambda: _timm("resnet18"), (3, 32, 32), _truth_resnet),
    "timm-resnet26d": (lambda: _timm("resnet26d"), (3, 32, 32), _truth_resnet),
    "timm-convnext": (lambda: _timm("convnext_atto"), (3, 32, 32),
                      lambda m: [f"stages.{s}.blocks.{i}" for s, st in enumerate(m.stages) for i in range(len(st.blocks))]),
    "timm-vit": (lambda: _timm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3), (3, 32, 32),
                 lambda m: [f"blocks.{i}" for i in range(len(m.blocks))]),
    "timm-deit": (lambda: _timm("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=3), (3, 32, 32),
                  lambda m: [f"blocks.{i}" for i in range(len(m.blocks))]),
    "timm-efficientnet": (lambda: _timm("efficientnet_b0"), (3, 32, 32), _truth_skip),
    "timm-mobilenetv3": (lambda: _timm("mobilenetv3_small_050"), (3, 32, 32), _truth_skip),
    "timm-regnet": (lambda: _timm("regnetx_002"), (3, 32, 32), _truth_regnet),
    "hf-vit": (lambda: _hf(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3,
                                                  num_attention_heads=2, intermediate_size=48, num_labels=10)),
               (3, 32, 32), lambda m: [f"hf.vit.layers.{i}" for i in range(3)]),
    "hf-deit": (lambda: _hf(transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=48, num_labels=10,
                                                    architectures=["DeiTForImageClassification"])),
                (3, 32, 32), lambda m: [n for n, x in m.named_modules() if type(x).__name__ == "DeiTLayer"]),
    "hf-convnext": (lambda: _hf(transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 2, 1],
                                                            num_labels=10)), (3, 32, 32),
                    lambda m: [f"hf.convnext.encoder.stages.{s}.layers.{i}" for s, d in enumerate([1, 2, 2, 1])
                               for i in range(d)]),
    "hf-resnet": (lambda: _hf(transformers.ResNetConfig(hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 1, 2],
                                                        embedding_size=8, layer_type="basic", num_labels=10)),
                  (3, 32, 32),
                  lambda m: [f"hf.resnet.encoder.stages.{s}.layers.{i}" for s, st in enumerate(m.hf.resnet.encoder.stages)
                             for i, layer in enumerate(st.layers) if isinstance(layer.shortcut, nn.Identity)]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_discovery_finds_exactly_the_residual_blocks(family: str) -> None:
    build, size, truth = FAMILIES[family]
    torch.manual_seed(0)
    model = _randomise(build())
    found = [c.name for c in discover_blocks(model, input_size=size)]
    assert found == truth(model)
    assert found, "every family here has residual blocks"


@pytest.mark.parametrize("family", ["timm-resnet18", "timm-convnext", "timm-vit", "timm-mobilenetv3", "hf-vit",
                                    "hf-convnext", "hf-resnet"])
def test_removing_a_discovered_block_is_its_identity_branch(family: str) -> None:
    """Removing a block = the same network with that block's residual branch zeroed by hand (its weights at 0)."""
    build, size, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = attach_preset(_randomise(build()), Preset(arch="test", input_size=size, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                      num_classes=10))
    cands = discover_blocks(model)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    for c in (cands[0], cands[-1]):
        pruned = remove_blocks(model, [c.name], blocks=[c.name for c in cands])
        by_hand = copy.deepcopy(model)
        with torch.no_grad():
            for p in by_hand.get_submodule(c.name).parameters():
                p.zero_()
            want, got, full = by_hand(x), pruned(x), model(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(full, got, atol=1e-4), "the block did something: the test is not vacuous"


def test_discovery_skips_a_same_shape_module_without_a_residual() -> None:
    """A conv stack that keeps the shape but has no shortcut is not a block (class names play no part)."""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return self.body(x)

    class Res(Plain):
        def forward(self, x):
            return x + self.body(x)

    net = nn.Sequential(nn.Conv2d(3, 4, 1), Plain(), Res(), Plain(), Res(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    assert [c.name for c in discover_blocks(net, input_size=(3, 8, 8))] == ["2", "4"]


# ---------------------------------------------------------------------------------------------------- sources
@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    configs = {
        "vit": transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=4,
                                      num_attention_heads=2, intermediate_size=48, num_labels=10, num_channels=3),
        "convnext": transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 2, 1], num_labels=10,
                                                image_size=32),
        "resnet": transformers.ResNetConfig(hidden_sizes=[8, 16, 24, 32], depths=[2, 2, 1, 2], embedding_size=8,
                                            layer_type="basic", num_labels=10),
    }
    out = {}
    for k, cfg in configs.items():
        m = transformers.AutoModelForImageClassification.from_config(cfg)
        _randomise(m)
        m.save_pretrained(root / k)
        out[k] = root / k
    return out


_NATIVE_CHECK = textwrap.dedent("""
    import sys
    sys.modules["cka_analysis"] = None  # importing it now raises ImportError, installed or not
    try:
        import cka_analysis  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("cka_analysis is importable")
    import torch
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(sys.argv[1]).eval()
    x = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(pixel_values=x).logits, sys.argv[3])
""")


@pytest.mark.parametrize("kind", ["vit", "convnext", "resnet"])
def test_hf_pruned_reloads_with_from_pretrained_without_this_project(kind: str, hf_dirs, tmp_path: Path) -> None:
    model = open_model(f"hf:{hf_dirs[kind]}")
    blocks = [b.name for b in find_blocks(model) if b.removable]
    pruned = remove_blocks(model, [blocks[0], blocks[-1]])
    folder = save_pruned(pruned, tmp_path / "out")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["native"]["format"] == "huggingface"
    config = json.loads((folder / "huggingface" / "config.json").read_text())
    key = "num_hidden_layers" if kind == "vit" else "depths"
    before = json.loads((hf_dirs[kind] / "config.json").read_text())[key]
    assert (before - 2 if kind == "vit" else sum(before) - 2) == (config[key] if kind == "vit" else sum(config[key]))
    x = torch.randn(3, *model.cka_preset.input_size, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "check.py"
    script.write_text(_NATIVE_CHECK)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    r = subprocess.run([sys.executable, "-I", str(script), str(folder / "huggingface"), str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with torch.no_grad():
        want = load_pruned(folder)(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt", weights_only=True), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,kwargs,depth_key,depth", [
    ("convnext_atto", {}, "depths", 2 + 2 + 6 + 2),
    ("resnet18", {}, "layers", 2 + 2 + 2 + 2),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, "depth", 4),
])
def test_timm_pruned_rebuilds_with_create_model_and_its_kwargs(name, kwargs, depth_key, depth,
                                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    base = _randomise(timm.create_model(name, pretrained=False, num_classes=10, **kwargs))
    preset = {"arch": f"timm:{name}", "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
              "num_classes": 10}
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights),
              metadata={"timm_kwargs": json.dumps({"num_classes": 10, **kwargs}), "preset": json.dumps(preset)})
    model = open_model(f"timm:{name}", weights=str(weights))
    assert model.cka_preset.input_size == (3, 32, 32)
    blocks = [b.name for b in find_blocks(model) if b.removable]
    pruned = remove_blocks(model, [blocks[0], blocks[-1]])
    folder = save_pruned(pruned, tmp_path / "out")
    cfg = json.loads((folder / "timm" / "config.json").read_text())
    native = timm.create_model(cfg["model_name"], pretrained=False, **cfg["kwargs"]).eval()
    native.load_state_dict(load_file(str(folder / "timm" / "model.safetensors")))
    new_depth = cfg["kwargs"][depth_key]
    assert (sum(new_depth) if isinstance(new_depth, list) else new_depth) == depth - 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(native(x), load_pruned(folder)(x), atol=1e-5, rtol=1e-4)
    # and the native file reopens as a timm: model
    again = open_model(f"timm:{name}", weights=str(folder / "timm" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), native(x))


def test_timm_without_weights_offline_is_a_clear_error() -> None:
    with pytest.raises(CKAPruneError, match="--weights FILE"):
        open_model("timm:resnet18", weights="in1k", allow_download=False)
    with pytest.raises(ConfigError, match="timm has no model"):
        open_model("timm:resnet_nonexistent", weights="random")


# ---------------------------------------------------------------------------------------------------- factory
FACTORY = textwrap.dedent("""
    import torch
    from torch import nn
    from cka_analysis.models import Preset, attach_preset

    class Res(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
            self.trunk = nn.Sequential(*[Res(8) for _ in range(4)])
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.trunk(self.stem(x)).mean((2, 3)))

    def build(num_classes=10):
        torch.manual_seed(0)
        return attach_preset(Net(num_classes), Preset(arch="mynet", input_size=(1, 8, 8), mean=(0.5,), std=(0.5,),
                                                      num_classes=num_classes, hflip=False, crop_padding=1))
""")


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.py"
    path.write_text(FACTORY)
    return path


def test_cli_prunes_a_factory_model_with_blocks_found(factory_file: Path, tmp_path: Path) -> None:
    from cka_analysis.cli import main

    out = tmp_path / "out"
    code = main(["prune", "--model-factory", f"{factory_file}:build", "--weights", "random", "--data", "digits",
                 "--remove", "2", "--recovery", "none", "--samples", "64", "--out", str(out), "--quiet"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["blocks"] == [f"trunk.{i}" for i in range(4)]
    assert len(manifest["removed"]) == 2
    assert manifest["source"]["kind"] == "factory"
    reloaded = load_pruned(out)
    assert len(find_blocks(reloaded)) == 2
    with pytest.raises(ConfigError, match="factory"):
        load_pruned(out, allow_factory=False)


def test_cli_block_pattern_overrides_discovery(factory_file: Path, tmp_path: Path) -> None:
    from cka_analysis.cli import main

    out = tmp_path / "out"
    code = main(["prune", "--model-factory", f"{factory_file}:build", "--weights", "random", "--data", "digits",
                 "--block-pattern", "trunk.1,trunk.2", "--blocks", "trunk.1", "--recovery", "none", "--out",
                 str(out), "--quiet"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["blocks"] == ["trunk.1", "trunk.2"] and manifest["removed"] == ["trunk.1"]


def test_cli_prunes_a_hugging_face_directory(tmp_path: Path) -> None:
    from cka_analysis.cli import main

    cfg = transformers.ViTConfig(image_size=8, patch_size=2, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                 intermediate_size=32, num_labels=10, num_channels=1)
    transformers.AutoModelForImageClassification.from_config(cfg).save_pretrained(tmp_path / "vit")
    out = tmp_path / "out"
    code = main(["prune", "--model", f"hf:{tmp_path / 'vit'}", "--data", "digits", "--remove", "2", "--recovery",
                 "none", "--samples", "64", "--out", str(out), "--quiet"])
    assert code == 0
    config = json.loads((out / "huggingface" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


# ---------------------------------------------------------------------------------------------------- dashboard
def test_dashboard_takes_a_factory_only_from_the_server(monkeypatch, factory_file: Path) -> None:
    sys.path.insert(0, str(ROOT / "app"))
    try:
        from dashboard import state
    finally:
        sys.path.remove(str(ROOT / "app"))
    spec = f"{factory_file}:build"
    monkeypatch.delenv(state.FACTORY_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py"])
    assert state.server_factory() is None
    with pytest.raises(CKAPruneError, match="started with it"):
        state.external_source({"kind": "factory", "factory": spec})
    # a URL parameter cannot name one, whatever the server allows
    monkeypatch.setattr(sys, "argv", ["streamlit_app.py", "--model-factory", spec])
    assert state.server_factory() == spec
    assert state.external_source({"kind": "factory", "factory": spec}) == f"factory:{spec}"
    with pytest.raises(CKAPruneError, match="URL cannot choose"):
        state.model_spec_from_query(f"factory:{spec}")
    # and a spec that differs from the server's is refused
    with pytest.raises(CKAPruneError, match="started with it"):
        state.external_source({"kind": "factory", "factory": "os:system"})
    assert state.model_spec_from_query("timm:resnet18")["kind"] == "timm"


def test_uploaded_archive_of_a_factory_model_is_refused(factory_file: Path, tmp_path: Path) -> None:
    import io
    import zipfile

    sys.path.insert(0, str(ROOT / "app"))
    try:
        from dashboard import uploads
    finally:
        sys.path.remove(str(ROOT / "app"))
    model = open_model(f"factory:{factory_file}:build")
    folder = save_pruned(remove_blocks(model, ["trunk.1"]), tmp_path / "saved")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, arcname=f"saved/{f.name}")
    with pytest.raises(CKAPruneError, match="factory"):
        uploads.model_from_archive("saved.zip", buf.getvalue())


def test_dashboard_shows_the_factory_models_proposed_blocks_and_refuses_a_url_factory(
        monkeypatch, factory_file: Path) -> None:
    """Started with a factory, the Model & data page offers it and shows the blocks found by probing; a ``?model=``
    URL parameter naming a factory is refused with a message, and the session keeps its model."""
    from app_session import settle
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CKA_PRUNE_MODEL_FACTORY", f"{factory_file}:build")
    at = AppTest.from_file(str(ROOT / "app" / "streamlit_app.py"), default_timeout=240)
    settle(at)
    at.radio(key="md_source").set_value("factory")
    at.run()
    at.button(key="md_load").click()
    settle(at)
    assert not at.exception, [e.value for e in at.exception]
    active = at.session_state["active"]
    assert active.model_spec["kind"] == "factory"
    assert [b.name for b in active.blocks] == [f"trunk.{i}" for i in range(4)]
    assert any("Proposed blocks" in m.value for m in at.markdown)
    proposal = at.dataframe[-1].value
    assert list(proposal["block"]) == [f"trunk.{i}" for i in range(4)] and proposal["use"].all()

    at.query_params["model"] = f"factory:{factory_file}:build"
    at.run()
    assert any("URL cannot choose" in e.value for e in at.error)
    assert at.session_state["active"].model_key == active.model_key


def test_export_page_writes_the_native_format(hf_dirs, tmp_path: Path) -> None:
    import io
    import zipfile

    sys.path.insert(0, str(ROOT / "app"))
    try:
        from dashboard import compute
    finally:
        sys.path.remove(str(ROOT / "app"))
    model = open_model(f"hf:{hf_dirs['vit']}")
    pruned = remove_blocks(model, [b.name for b in find_blocks(model, count_macs=False)][:1])
    out = compute.build_exports(pruned, "vit-pruned", {}, ("native",))
    assert not out["errors"], out["errors"]
    name, data = out["files"]["native"]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        zf.extractall(tmp_path)
    folder = tmp_path / name.removesuffix(".zip")
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 3
    native = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    x = torch.randn(2, *model.cka_preset.input_size)
    with torch.no_grad():
        torch.testing.assert_close(native(pixel_values=x).logits, pruned(x), atol=1e-5, rtol=1e-4)
    # a registry model has no native format: a message, not a crash
    from cka_analysis.models import build_model

    out = compute.build_exports(build_model("digits_resnet", weights="random"), "d", {}, ("native",))
    assert "have a native format" in out["errors"]["native"]
