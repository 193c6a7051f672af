"""Tests for cka_analysis.blocks: finding the residual blocks of every family (and of custom models), deciding
which can go, and removing them.

The key property: for every removable block of every family, the pruned model's output equals the original's with
that block's residual branch zeroed by hand (so the block computes its shortcut, the identity)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from cka_analysis.blocks import declare_blocks, find_blocks, remove_blocks, removed_blocks, topology
from cka_analysis.errors import BlockError, ConfigError
from cka_analysis.metrics import count_macs, count_params
from cka_analysis.models import attach_preset, build_model, get_preset
from cka_analysis.models.cifar_resnet import CifarBasicBlock
from cka_analysis.models.preset import Preset

# (registry name, input size used in the tests): the torchvision nets are fully convolutional, so 32×32 keeps the
# CPU cost low; the preset is shrunk to match so that block MACs are measured at that size too.
FAMILIES = [
    ("cifar_resnet20", (3, 32, 32)),
    ("digits_resnet", (1, 8, 8)),
    ("resnet18", (3, 32, 32)),
    ("resnet50", (3, 32, 32)),
    ("mobilenet_v2", (3, 32, 32)),
    ("vit_tiny", (3, 32, 32)),
]
_IDS = [n for n, _ in FAMILIES]



def small_model(name: str, size: tuple[int, int, int]) -> nn.Module:
    """A registry model with random but non-trivial weights, in eval mode, whose preset uses ``size``.

    BN affine parameters are drawn at random (so no branch is near zero) and the running statistics are those of
    random inputs (so activations keep depending on the input through the whole depth, as in a trained net)."""
    torch.manual_seed(0)
    model = build_model(name)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
        if name.startswith("vit"):  # torchvision zero-initialises the ViT head
            nn.init.normal_(model.heads.head.weight, std=0.5)
        if bns:
            model.train()(torch.randn(8, *size))
        for m in bns:
            m.momentum = 0.1
    return attach_preset(model.eval(), get_preset(model).with_(input_size=size))


@pytest.fixture(scope="module", params=FAMILIES, ids=_IDS)
def family(request) -> tuple[str, nn.Module, torch.Tensor]:
    name, size = request.param
    model = small_model(name, size)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    return name, model, x


# ------------------------------------------------------------------------------------- residual branches
def zero_residual_branch(block: nn.Module) -> None:
    """Make ``block`` compute only its shortcut by zeroing the last layer of its residual branch — written from
    each family's definition, independently of the library."""
    with torch.no_grad():
        if isinstance(block, CifarBasicBlock | BasicBlock):  # relu(bn2(conv2(...)) + x)
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        elif isinstance(block, Bottleneck):  # relu(bn3(conv3(...)) + x)
            block.bn3.weight.zero_()
            block.bn3.bias.zero_()
        elif isinstance(block, InvertedResidual):  # x + conv(x), conv ends with a BatchNorm
            bn = block.conv[-1]
            assert isinstance(bn, nn.BatchNorm2d)
            bn.weight.zero_()
            bn.bias.zero_()
        elif isinstance(block, EncoderBlock):  # x + attn(ln1(x)), then + mlp(ln2(·))
            block.self_attention.out_proj.weight.zero_()
            block.self_attention.out_proj.bias.zero_()
            last = [m for m in block.mlp.modules() if isinstance(m, nn.Linear)][-1]
            last.weight.zero_()
            last.bias.zero_()
        elif isinstance(block, Residual):
            block.f[-1].weight.zero_()
            block.f[-1].bias.zero_()
        else:
            raise AssertionError(f"no residual branch known for {type(block).__name__}")


def test_pruned_output_equals_zeroed_residual_branch(family) -> None:
    name, model, x = family
    with torch.no_grad():
        ref = model(x)
    removable = [b.name for b in find_blocks(model, count_macs=False) if b.removable]
    assert removable
    work = copy.deepcopy(model)  # zeroed one block at a time, then restored
    for block_name in removable:
        pruned = remove_blocks(model, [block_name]).eval()
        block = work.get_submodule(block_name)
        saved = copy.deepcopy(block.state_dict())
        zero_residual_branch(block)
        with torch.no_grad():
            got, want = pruned(x), work(x)
        block.load_state_dict(saved)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda m, b=block_name: f"{name} {b}: {m}")
        assert not torch.allclose(got, ref, atol=1e-3), f"{name} {block_name}: removing it changed nothing"
    with torch.no_grad():  # the input model is untouched by every removal
        assert torch.equal(model(x), ref)


def test_removing_several_blocks_equals_zeroing_all_their_branches(family) -> None:
    _, model, x = family
    removable = [b.name for b in find_blocks(model, count_macs=False) if b.removable]
    chosen = removable[::2]
    pruned = remove_blocks(model, chosen)
    zeroed = copy.deepcopy(model)
    for n in chosen:
        zero_residual_branch(zeroed.get_submodule(n))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- find_blocks
EXPECTED = {
    # name: (blocks, removable, kind, non-removable names)
    "cifar_resnet20": (9, 7, "CifarBasicBlock", ["layer2.0", "layer3.0"]),
    "digits_resnet": (9, 7, "CifarBasicBlock", ["layer2.0", "layer3.0"]),
    "resnet18": (8, 5, "BasicBlock", ["layer2.0", "layer3.0", "layer4.0"]),
    "resnet50": (16, 12, "Bottleneck", ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]),
    "mobilenet_v2": (17, 10, "InvertedResidual",
                     ["features.1", "features.2", "features.4", "features.7", "features.11", "features.14",
                      "features.17"]),
    "vit_tiny": (4, 4, "EncoderBlock", []),
}


def test_find_blocks_per_family(family) -> None:
    name, model, _ = family
    n_blocks, n_removable, kind, fixed = EXPECTED[name]
    blocks = find_blocks(model)
    assert len(blocks) == n_blocks
    assert sum(b.removable for b in blocks) == n_removable
    assert {b.kind for b in blocks} == {kind}
    assert [b.name for b in blocks if not b.removable] == fixed
    assert [b.index for b in blocks] == list(range(n_blocks))
    for b in blocks:
        module = model.get_submodule(b.name)
        assert type(module).__name__ == b.kind
        assert (b.reason is None) == b.removable
        assert b.params == sum(p.numel() for p in module.parameters())
        assert b.macs > 0
        assert b.stage
    if name.startswith("mobilenet"):  # removable exactly when torchvision's block uses its residual connection
        assert all(b.removable == model.get_submodule(b.name).use_res_connect for b in blocks)
        assert all("no residual connection" in b.reason for b in blocks if not b.removable)
    if name == "vit_tiny":
        assert [b.name for b in blocks] == [f"encoder.layers.encoder_layer_{i}" for i in range(4)]


def test_blocks_are_listed_in_forward_order(family) -> None:
    _, model, x = family
    blocks = find_blocks(model)
    calls: list[str] = []
    handles = [model.get_submodule(b.name).register_forward_pre_hook(lambda m, a, n=b.name: calls.append(n))
               for b in blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    assert calls == [b.name for b in blocks]


def test_find_blocks_stages_and_reasons() -> None:
    r20 = build_model("cifar_resnet20")
    blocks = {b.name: b for b in find_blocks(r20)}
    assert [b.stage for b in blocks.values()] == ["layer1"] * 3 + ["layer2"] * 3 + ["layer3"] * 3
    assert "downsampling" in blocks["layer2.0"].reason and "stride 2" in blocks["layer2.0"].reason
    r18 = small_model("resnet18", (3, 32, 32))
    assert "downsample" in {b.name: b for b in find_blocks(r18)}["layer3.0"].reason


def test_resnet56_has_25_removable_blocks_of_27() -> None:
    blocks = find_blocks(build_model("cifar_resnet56"))
    assert len(blocks) == 27
    assert sum(b.removable for b in blocks) == 25
    assert [b.name for b in blocks if not b.removable] == ["layer2.0", "layer3.0"]
    assert [b.name for b in blocks][:3] == ["layer1.0", "layer1.1", "layer1.2"]
    assert blocks[-1].name == "layer3.8"


@pytest.mark.parametrize(("name", "n_blocks", "n_removable"),
                         [("resnet34", 16, 13), ("cifar_resnet110", 54, 52)])  # resnet101, vit_b_16: test_models
def test_block_counts_of_deeper_models(name: str, n_blocks: int, n_removable: int) -> None:
    model = build_model(name)
    blocks = find_blocks(model, count_macs=False)  # the MACs pass at 224×224 is what makes these slow
    assert (len(blocks), sum(b.removable for b in blocks)) == (n_blocks, n_removable)
    assert all(b.macs == 0 for b in blocks)
    assert [b.name for b in blocks] == topology(model).slots


# ----------------------------------------------------------------------------------- MACs and parameters
def test_block_costs_add_up_to_the_savings_of_removal(family) -> None:
    _, model, _ = family
    size = get_preset(model).input_size
    blocks = find_blocks(model)
    removable = [b for b in blocks if b.removable]
    base_macs, base_params = count_macs(model, size), count_params(model)
    assert sum(b.macs for b in blocks) < base_macs
    chosen = removable[1::2]
    pruned = remove_blocks(model, [b.name for b in chosen])
    assert base_macs - count_macs(pruned, size) == sum(b.macs for b in chosen)
    assert base_params - count_params(pruned) == sum(b.params for b in chosen)
    # the blocks left keep their costs
    left = {b.name: (b.macs, b.params) for b in find_blocks(pruned)}
    assert left == {b.name: (b.macs, b.params) for b in blocks if b not in chosen}


# -------------------------------------------------------------------------------------- remove_blocks
def test_remove_blocks_returns_a_new_model() -> None:
    model = build_model("cifar_resnet20").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = remove_blocks(model, ["layer1.1", "layer3.2"])
    assert pruned is not model
    assert isinstance(pruned.layer1[1], nn.Identity) and isinstance(pruned.layer3[2], nn.Identity)
    assert isinstance(model.layer1[1], CifarBasicBlock) and isinstance(model.layer3[2], CifarBasicBlock)
    assert removed_blocks(model) == []
    assert removed_blocks(pruned) == ["layer1.1", "layer3.2"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert get_preset(pruned) == get_preset(model)
    # removed blocks are no longer listed, the others keep their index
    left = find_blocks(pruned)
    assert [b.name for b in left] == [b.name for b in find_blocks(model) if b.name not in ("layer1.1", "layer3.2")]
    assert {b.name: b.index for b in left}["layer3.1"] == 7
    # removing more records the order of removal
    again = remove_blocks(pruned, ["layer2.1"])
    assert removed_blocks(again) == ["layer1.1", "layer3.2", "layer2.1"]
    assert removed_blocks(pruned) == ["layer1.1", "layer3.2"]


def test_remove_blocks_errors_name_the_block() -> None:
    model = build_model("cifar_resnet20")
    with pytest.raises(BlockError, match=r"block 'layer2\.0' cannot be removed: downsampling"):
        remove_blocks(model, ["layer1.1", "layer2.0"])
    with pytest.raises(BlockError, match=r"'layer9\.0' is not a residual block of CifarResNet"):
        remove_blocks(model, ["layer9.0"])
    with pytest.raises(BlockError, match=r"'conv1' is not a residual block"):
        remove_blocks(model, ["conv1"])
    pruned = remove_blocks(model, ["layer1.1"])
    with pytest.raises(BlockError, match=r"'layer1\.1' has already been removed"):
        remove_blocks(pruned, ["layer1.1"])
    assert removed_blocks(model) == []  # a failed call leaves the input alone
    r18 = small_model("resnet18", (3, 32, 32))
    with pytest.raises(BlockError, match=r"'layer4\.0' cannot be removed: has a downsample shortcut"):
        remove_blocks(r18, ["layer4.0"])


def test_remove_no_blocks_is_a_copy() -> None:
    model = build_model("digits_resnet").eval()
    copy_ = remove_blocks(model, [])
    assert copy_ is not model and removed_blocks(copy_) == []
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(copy_(x), model(x))


# ----------------------------------------------------------------------------------------- custom models
class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Widen(nn.Module):
    """A block whose output is wider than its input: it cannot be removed."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


class TinyMLP(nn.Module):
    """A custom residual MLP the library does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 8)
        self.body = nn.Sequential(Residual(8), Residual(8), Widen(8), Residual(16))
        self.unused = Residual(8)  # registered but never called
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x.flatten(1))))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return attach_preset(TinyMLP().eval(), Preset("tiny_mlp", (1, 3, 4), (0.5,), (0.5,), 3))


def test_custom_model_blocks_by_pattern_and_probe() -> None:
    model = tiny_mlp()
    blocks = find_blocks(model, ["body.*", "unused"])
    assert [b.name for b in blocks] == ["body.0", "body.1", "body.2", "body.3", "unused"]
    by = {b.name: b for b in blocks}
    assert [by[n].removable for n in ("body.0", "body.1", "body.3")] == [True, True, True]
    assert not by["body.2"].removable and "differs from output shape" in by["body.2"].reason
    assert not by["unused"].removable and "not called" in by["unused"].reason
    assert by["body.0"].kind == "Residual" and by["body.2"].kind == "Widen"
    assert by["body.0"].params == 2 * (8 * 8 + 8)
    assert by["body.0"].macs == 2 * 8 * 8
    assert by["body.3"].macs == 2 * 16 * 16
    # exact names work too, and keep forward order whatever order they are given in
    assert [b.name for b in find_blocks(model, ["body.3", "body.0"])] == ["body.0", "body.3"]
    assert [b.name for b in find_blocks(model, "body.1, body.0")] == ["body.0", "body.1"]


def test_custom_model_errors() -> None:
    model = tiny_mlp()
    with pytest.raises(BlockError, match=r"\['layer\*'\] match no module of TinyMLP"):
        find_blocks(model, ["layer*"])
    with pytest.raises(BlockError, match="name its residual blocks"):
        find_blocks(model)
    with pytest.raises(BlockError, match=r"'body\.2' cannot be removed: input shape"):
        remove_blocks(model, ["body.2"], blocks=["body.*"])
    bare = TinyMLP()
    with pytest.raises(ConfigError, match="input_size"):
        find_blocks(bare, ["body.*"])
    assert len(find_blocks(bare, ["body.*"], input_size=(1, 3, 4))) == 4


def test_custom_model_removal_equals_zeroed_branch() -> None:
    model = tiny_mlp()
    x = torch.randn(5, 1, 3, 4)
    for name in ("body.0", "body.1", "body.3"):
        pruned = remove_blocks(model, [name], blocks="body.*")
        zeroed = copy.deepcopy(model)
        zero_residual_branch(zeroed.get_submodule(name))
        with torch.no_grad():
            torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=0)
            assert not torch.allclose(pruned(x), model(x))


def test_declare_blocks_makes_a_custom_model_known() -> None:
    model = declare_blocks(tiny_mlp(), "body.0, body.1, body.3")
    assert [b.name for b in find_blocks(model) if b.removable] == ["body.0", "body.1", "body.3"]
    pruned = remove_blocks(model, ["body.1"])
    assert removed_blocks(pruned) == ["body.1"]
    assert [b.name for b in find_blocks(pruned)] == ["body.0", "body.3"]  # declarations travel with the copy
    with pytest.raises(BlockError, match="match no module"):
        declare_blocks(tiny_mlp(), ["nope.*"])
