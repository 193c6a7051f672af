"""Residual blocks: finding them, deciding which can go, and removing them.

Removing a block means replacing it by the identity: its residual branch is gone and its input flows straight
through its shortcut. That only keeps the network valid when the shortcut *is* the identity (same input and output
shape); blocks with a downsampling or projection shortcut are listed but marked not removable, with the reason.

Known families (CIFAR ResNets, torchvision ResNets, MobileNetV2, ViT) are also decomposed into
``stem → blocks → head → classifier`` (:class:`Topology`), which lets scoring run the shared prefix once and only
the part of the network after each candidate. Any other model works when the user names its blocks (qualified
module names or glob patterns); their shapes are checked with one probe forward. :func:`discover_blocks` proposes
those blocks for a network the library has never seen, by probing it (see its docstring for what counts).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import MobileNetV2, ResNet, VisionTransformer

from .device import eval_mode
from .errors import BlockError, ConfigError
from .metrics import module_macs
from .models.cifar_resnet import CifarResNet

__all__ = [
    "ADAPTORS_ATTR",
    "Block",
    "BlockAdaptor",
    "Candidate",
    "Removed",
    "Topology",
    "adaptor_slots",
    "declare_blocks",
    "discover_blocks",
    "find_blocks",
    "insert_adaptors",
    "model_input_size",
    "remove_blocks",
    "removed_blocks",
    "topology",
]

REMOVED_ATTR = "cka_removed"
PATTERNS_ATTR = "cka_block_patterns"


class Removed(nn.Identity):
    """What a removed block becomes: the identity on its first input. Unlike ``nn.Identity`` it accepts (and
    ignores) further arguments, which transformer layers are called with (e.g. an attention mask)."""

    def forward(self, input: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return input


@dataclass(frozen=True)
class Block:
    """One residual block of a model, in forward order.

    Attributes:
        name: qualified module name (``model.get_submodule(name)``).
        index: position among all blocks of the unpruned model (0-based, forward order).
        stage: the group of blocks that share a resolution and width (e.g. ``"layer2"``).
        kind: the block's class name.
        removable: True when its shortcut is the identity, so replacing it by the identity keeps shapes.
        reason: why it is not removable (None when it is).
        macs: multiply-accumulates of the block for one input of the model's preset size.
        params: parameters of the block.
    """

    name: str
    index: int
    stage: str
    kind: str
    removable: bool
    reason: str | None
    macs: int
    params: int

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Topologies
# ---------------------------------------------------------------------------------------------------------------


class Topology:
    """How a model is laid out: its block slots in forward order and, for known families, how to run it in pieces.

    ``slots`` are the qualified names of every residual block of the unpruned architecture; a removed block's slot
    holds an ``nn.Identity``. When ``chain`` is True, ``logits == classify(head(blocks(stem(x))))`` where the
    blocks are applied in slot order, which is what lets scoring reuse the prefix.
    """

    family = "generic"
    chain = False

    def __init__(self, model: nn.Module, slots: list[str], *, classifier: str | None, stem_layer: str | None):
        self.slots = slots
        self.classifier = classifier
        self.stem_layer = stem_layer

    # pieces of the forward pass (chain families only)
    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise BlockError(f"{type(model).__name__} cannot be run in pieces; scoring uses full forward passes")

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        raise BlockError(f"{type(model).__name__} cannot be run in pieces; scoring uses full forward passes")

    def classify(self, model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return model.get_submodule(self.classifier)(feats)

    def run_blocks(self, model: nn.Module, h: torch.Tensor, start: int = 0, skip: int | None = None) -> torch.Tensor:
        """Apply the blocks from slot ``start`` on, leaving out slot ``skip`` (it acts as the identity)."""
        for i in range(start, len(self.slots)):
            if i != skip:
                h = model.get_submodule(self.slots[i])(h)
        return h

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled) features of the whole model."""
        return self.head(model, self.run_blocks(model, self.stem(model, x)))

    # per-block facts
    def describe(self, model: nn.Module, name: str, module: nn.Module) -> tuple[str, bool, str | None]:
        """(stage, removable, reason) of one block; generic models are judged by a probe forward elsewhere."""
        return name.rsplit(".", 1)[0] if "." in name else "", True, None


class CifarResNetTopology(Topology):
    family = "cifar_resnet"
    chain = True

    def __init__(self, model: nn.Module):
        slots = [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(len(model.get_submodule(f"layer{s}")))]
        super().__init__(model, slots, classifier="linear", stem_layer="relu")

    def stem(self, model, x):
        return model.relu(model.bn1(model.conv1(x)))

    def head(self, model, h):
        return torch.flatten(model.avgpool(h), 1)

    def describe(self, model, name, module):
        stage = name.split(".")[0]
        if isinstance(module.shortcut, nn.Identity):
            return stage, True, None
        return stage, False, "downsampling block (stride 2, option-A shortcut pads channels): it changes the shape"


class TorchvisionResNetTopology(Topology):
    family = "torchvision_resnet"
    chain = True

    def __init__(self, model: nn.Module):
        slots = [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in range(len(model.get_submodule(f"layer{s}")))]
        super().__init__(model, slots, classifier="fc", stem_layer="maxpool")

    def stem(self, model, x):
        return model.maxpool(model.relu(model.bn1(model.conv1(x))))

    def head(self, model, h):
        return torch.flatten(model.avgpool(h), 1)

    def describe(self, model, name, module):
        stage = name.split(".")[0]
        if getattr(module, "downsample", None) is None:
            return stage, True, None
        return stage, False, "has a downsample shortcut (strided 1×1 conv): the block changes the shape"


class MobileNetV2Topology(Topology):
    family = "mobilenet_v2"
    chain = True

    def __init__(self, model: nn.Module):
        n = len(model.features)
        slots = [f"features.{i}" for i in range(1, n - 1)]
        super().__init__(model, slots, classifier="classifier", stem_layer="features.0")
        # stage = run of blocks with the same output width (the rows of the MobileNetV2 table)
        self._stage: dict[str, str] = {}
        stage, width = 0, None
        for s in slots:
            out = [m for m in model.get_submodule(s).modules() if isinstance(m, nn.Conv2d)]
            w = out[-1].out_channels if out else width
            if w != width:
                stage, width = stage + 1, w
            self._stage[s] = f"stage{stage} ({w} ch)"

    def stem(self, model, x):
        return model.features[0](x)

    def head(self, model, h):
        h = model.features[-1](h)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)

    def describe(self, model, name, module):
        stage = self._stage.get(name, "")
        if getattr(module, "use_res_connect", False):
            return stage, True, None
        return stage, False, "no residual connection (it changes stride or width)"


class ViTTopology(Topology):
    family = "vit"
    chain = True

    def __init__(self, model: nn.Module):
        slots = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
        super().__init__(model, slots, classifier="heads", stem_layer="conv_proj")

    def stem(self, model, x):
        x = model._process_input(x)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return model.encoder.dropout(x + model.encoder.pos_embedding)

    def head(self, model, h):
        return model.encoder.ln(h)[:, 0]

    def describe(self, model, name, module):
        return "encoder", True, None


class GenericTopology(Topology):
    """A model the library does not know: blocks are the modules the user named; no decomposition."""

    def __init__(self, model: nn.Module, patterns: Sequence[str]):
        slots = _match_modules(model, patterns)
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        super().__init__(model, slots, classifier=linears[-1] if linears else None, stem_layer=None)


def _match_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    unmatched = []
    for p in patterns:
        hits = [n for n in names if n == p] or [n for n in names if fnmatch.fnmatchcase(n, p)]
        if not hits:
            unmatched.append(p)
        chosen += [h for h in hits if h not in chosen]
    if unmatched:
        raise BlockError(f"block names/patterns {unmatched} match no module of {type(model).__name__}")
    # keep only outermost matches (a pattern like "layer1.*" also matches the blocks' children)
    outer = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]
    order = {n: i for i, n in enumerate(names)}
    return sorted(outer, key=order.__getitem__)


def declare_blocks(model: nn.Module, patterns: Sequence[str] | str) -> nn.Module:
    """Tell the library which modules of a custom model are residual blocks (names or glob patterns).

    Each named module must compute ``x + F(x)`` (input and output of the same shape): removing it makes it the
    identity. Returns the same model.
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    _match_modules(model, patterns)  # validate now, with a clear error
    object.__setattr__(model, PATTERNS_ATTR, tuple(patterns))
    return model


def topology(model: nn.Module, blocks: Sequence[str] | str | None = None) -> Topology:
    """The :class:`Topology` of a model: a known family, or the blocks named by ``blocks`` (or
    :func:`declare_blocks`)."""
    if blocks is not None:
        return GenericTopology(model, blocks)
    declared = getattr(model, PATTERNS_ATTR, None)
    if declared:
        return GenericTopology(model, declared)


    if isinstance(model, CifarResNet):
        return CifarResNetTopology(model)
    if isinstance(model, ResNet):
        return TorchvisionResNetTopology(model)
    if isinstance(model, MobileNetV2):
        return MobileNetV2Topology(model)
    if isinstance(model, VisionTransformer):
        return ViTTopology(model)
    raise BlockError(
        f"{type(model).__name__} is not an architecture the library knows (CIFAR ResNet, torchvision ResNet, "
        "MobileNetV2, ViT); name its residual blocks with blocks=['layer1.*', ...] or "
        "declare_blocks(model, patterns)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Finding and removing blocks
# ---------------------------------------------------------------------------------------------------------------


def removed_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks already removed from ``model`` (in removal order)."""
    return list(getattr(model, REMOVED_ATTR, ()))


def model_input_size(model: nn.Module, input_size: Sequence[int] | None = None, *,
                     purpose: str = "so that block shapes and MACs can be measured") -> tuple[int, ...]:
    """``input_size`` when given, else the size of one input of the model's preset (channels, height, width).

    A model without a preset needs ``input_size``: the ConfigError says so, and why (``purpose``).
    """
    if input_size is not None:
        return tuple(input_size)
    preset = getattr(model, "cka_preset", None)
    if preset is None:
        raise ConfigError(
            f"{type(model).__name__} has no preset: pass input_size=(channels, height, width) {purpose}"
        )
    return tuple(preset.input_size)



def forward_with_hooks(model: nn.Module, x: torch.Tensor, hooks: Mapping[str, Callable], *,
                       pre: bool = False) -> object:
    """One forward pass of ``model`` on ``x`` with ``hooks[name]`` on the submodule ``name`` (a forward hook
    ``fn(module, args, out)``, or with ``pre`` a forward pre-hook ``fn(module, args)``), every hook removed
    afterwards, also when the pass raises; returns the model's output. The caller chooses grad/eval modes."""
    handles = []
    try:
        for name, fn in hooks.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        return model(x)
    finally:
        for h in handles:
            h.remove()


def _probe_shapes(model: nn.Module, names: Iterable[str], input_size: tuple[int, ...]) -> dict[str, tuple]:
    """(input shape, output shape) of each named module in one forward pass on a zero image."""
    shapes: dict[str, tuple] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: tuple, out: object) -> None:
            a = args[0] if args and isinstance(args[0], torch.Tensor) else None
            o = out if isinstance(out, torch.Tensor) else None
            shapes.setdefault(name, (None if a is None else tuple(a.shape), None if o is None else tuple(o.shape),
                                     len(args)))
        return fn

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), torch.no_grad():
        forward_with_hooks(model, torch.zeros((1, *input_size), device=device), {n: hook(n) for n in names})
    return shapes


def find_blocks(
    model: nn.Module,
    blocks: Sequence[str] | str | None = None,
    *,
    input_size: Sequence[int] | None = None,
    count_macs: bool = True,
) -> list[Block]:
    """Every residual block of ``model`` in forward order, with removability, MACs and parameters.

    Args:
        model: a registry model, or any model when ``blocks`` names its residual blocks.
        blocks: qualified module names or glob patterns of the residual blocks of a custom model.
        input_size: (C, H, W) for MACs and shape probes; default: the model's preset.
        count_macs: measure each block's MACs (one FLOP-counting forward pass, the slow part); when False,
            ``Block.macs`` is 0 — for callers that only need names and removability.

    Blocks already removed (replaced by the identity) are not listed; see :func:`removed_blocks`.
    """

    topo = topology(model, blocks)
    generic = isinstance(topo, GenericTopology)
    size = model_input_size(model, input_size) if count_macs or generic else ()
    macs = module_macs(model, size) if count_macs else {}
    shapes = _probe_shapes(model, topo.slots, size) if generic else {}
    out = []
    for i, name in enumerate(topo.slots):
        module = model.get_submodule(name)
        if isinstance(module, nn.Identity):
            continue
        stage, removable, reason = topo.describe(model, name, module)
        if generic:
            in_shape, out_shape, _ = shapes.get(name, (None, None, 0))
            if in_shape is None and out_shape is None:
                removable, reason = False, "not called in the forward pass"
            elif in_shape is None or out_shape is None:
                removable, reason = False, "its first input or its output is not a tensor"
            elif in_shape != out_shape:
                removable, reason = False, f"input shape {in_shape[1:]} differs from output shape {out_shape[1:]}"
        out.append(Block(
            name=name,
            index=i,
            stage=stage,
            kind=type(module).__name__,
            removable=removable,
            reason=reason,
            macs=int(macs.get(name, 0)),
            params=sum(p.numel() for p in module.parameters()),
        ))
    return out


def remove_blocks(
    model: nn.Module,
    names: Iterable[str],
    *,
    blocks: Sequence[str] | str | None = None,
) -> nn.Module:
    """A new model in which the named blocks are the identity; ``model`` itself is not modified.

    Raises BlockError naming any block that is unknown, already removed, or not removable (with the reason).
    """
    names = list(dict.fromkeys(names))
    current = {b.name: b for b in find_blocks(model, blocks, count_macs=False)}
    gone = set(removed_blocks(model))
    for n in names:
        if n in gone:
            raise BlockError(f"block {n!r} has already been removed")
        if n not in current:
            raise BlockError(
                f"{n!r} is not a residual block of {type(model).__name__}; blocks are: "
                + ", ".join(list(current)[:12]) + (" ..." if len(current) > 12 else "")
            )
        if not current[n].removable:
            raise BlockError(f"block {n!r} cannot be removed: {current[n].reason}")
    pruned = copy.deepcopy(model)
    for n in names:
        pruned.set_submodule(n, Removed())
    object.__setattr__(pruned, REMOVED_ATTR, (*removed_blocks(model), *names))
    return pruned


# ------------------------------------------------------------------------------------------------------ adaptors
# A removed block's slot may hold a fitted adaptor (cka_analysis.recovery fits them); inserting one is block
# surgery, so it lives here, where export and recovery both find it.
class BlockAdaptor(nn.Identity):
    """A fitted stand-in for a run of removed blocks: ``relu(W x + b)`` with a 1×1 convolution.

    It subclasses ``nn.Identity`` so that the block surgery keeps treating its slot as removed (it is not a
    block that could be scored or removed again); its weights live in the state dict under the slot's name.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return F.relu(self.conv(x))


ADAPTORS_ATTR = "cka_adaptors"


def adaptor_slots(model: nn.Module) -> dict[str, int]:
    """{slot name: channels} of the adaptors in ``model`` (what a saved model's manifest records)."""
    return dict(getattr(model, ADAPTORS_ATTR, {}))


def insert_adaptors(model: nn.Module, slots: dict[str, int]) -> nn.Module:
    """Put identity-initialised adaptors at ``slots`` of a pruned ``model`` (in place), e.g. to rebuild a saved
    model before loading its weights."""
    for name, channels in slots.items():
        if not isinstance(model.get_submodule(name), nn.Identity):
            raise ConfigError(f"slot {name!r} is not a removed block; an adaptor can only replace one")
        model.set_submodule(name, BlockAdaptor(int(channels)))
    object.__setattr__(model, ADAPTORS_ATTR, {**adaptor_slots(model), **{k: int(v) for k, v in slots.items()}})
    return model


# ---------------------------------------------------------------------------------------------------------------
# Discovering the blocks of an unknown network
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A residual block proposed by :func:`discover_blocks`.

    Attributes:
        name: qualified module name.
        kind: the module's class name.
        shape: the shape of its input and output (without the batch dimension).
        params: parameters of the block.
        output_change: relative change of the model's output when the block alone is replaced by the identity
            (``‖f_without − f‖ / ‖f‖`` on the probe batch): small for a residual block, which is what makes
            removing it plausible; large values flag blocks that matter a lot (or a probe far from real data).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    output_change: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _first_tensor_shapes(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, list]:
    """For each named module: one [input shape, output shape] pair per call in one forward pass (None where
    the first positional input or the output is not a tensor)."""
    calls: dict[str, list] = {n: [] for n in names}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, args: tuple, out: object) -> None:
            a = args[0] if args and isinstance(args[0], torch.Tensor) else None
            o = out if isinstance(out, torch.Tensor) else None
            calls[name].append((None if a is None else tuple(a.shape), None if o is None else tuple(o.shape)))
        return fn

    forward_with_hooks(model, x, {n: hook(n) for n in names})
    return calls


def _passes_through_when_zeroed(model: nn.Module, name: str, x: torch.Tensor) -> bool:
    """True when the module, with every one of its own parameters set to zero, returns its input unchanged:
    the branch is gone and only a parameter-free path from input to output remains, i.e. a residual connection
    (``x + F(x)``, with or without an activation after the sum) wraps everything the block computes."""
    module = model.get_submodule(name)
    seen: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        if "in" not in seen:
            seen["in"], seen["out"] = args[0].detach().clone(), out.detach().clone()

    saved = [p.detach().clone() for p in module.parameters()]
    handle = module.register_forward_hook(hook)
    try:
        for p in module.parameters():
            p.data.zero_()
        model(x)
    finally:
        handle.remove()
        for p, s in zip(module.parameters(), saved, strict=True):
            p.data.copy_(s)
    a, o = seen["in"], seen["out"]
    tol = 1e-5 * (float(a.abs().max()) or 1.0)
    # a ReLU after the sum (ResNets) leaves the input as it is when the input is the previous block's ReLU output
    return bool(torch.allclose(o, a, atol=tol)) or bool((a >= 0).all() and torch.allclose(o, torch.relu(a), atol=tol))


def discover_blocks(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    input_size: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Candidate]:
    """Propose the residual blocks of any network by probing it, not by class names.

    A module counts as a block when, in one forward pass of ``example_input`` (default: a seeded random batch of
    two images of ``input_size`` or of the model's preset):

    1. it holds parameters and submodules (single layers are never blocks), is called exactly once, and its first
       input and its output are tensors of the same shape;
    2. a residual connection wraps it: with all of its own parameters set to zero it returns its input unchanged
       (``x + F(x)`` with ``F`` gone; a ReLU after the sum is allowed when the input is non-negative), which no
       plain stack of layers does;
    3. replaced by the identity (:class:`Removed`, what removing it does), the network still runs and returns the same shape.

    Among nested modules that all qualify (a stage made only of identity-shortcut blocks is itself one), the
    innermost are kept: they are the units that can be removed one by one. Each candidate carries the relative
    change of the output when it alone is removed. Pass the names to :func:`declare_blocks` (or edit them first).
    """
    if example_input is None:
        size = model_input_size(model, input_size, purpose="so that the network can be probed")
        generator = torch.Generator().manual_seed(seed)
        example_input = torch.randn((2, *size), generator=generator)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = example_input.to(device)
    named = dict(model.named_modules())
    composite = [n for n, m in named.items()
                 if n and any(True for _ in m.children()) and any(True for _ in m.parameters())
                 and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]
    with eval_mode(model), torch.no_grad():
        base = model(x)
        if not isinstance(base, torch.Tensor):
            raise BlockError(f"{type(model).__name__} does not return a tensor: wrap it so that forward(x) returns "
                             "the logits")
        calls = _first_tensor_shapes(model, composite, x)
        same = [n for n in composite
                if len(calls[n]) == 1 and calls[n][0][0] is not None and calls[n][0][0] == calls[n][0][1]]
        residual = [n for n in same if _passes_through_when_zeroed(model, n, x)]
        innermost = [n for n in residual if not any(o.startswith(n + ".") for o in residual)]
        found = []
        for n in innermost:
            module = named[n]
            model.set_submodule(n, Removed())
            try:
                out = model(x)
            except Exception:  # the network does not run without it: not a removable block
                continue
            finally:
                model.set_submodule(n, module)
            if not isinstance(out, torch.Tensor) or out.shape != base.shape:
                continue
            change = float((out - base).norm() / base.norm().clamp_min(1e-12))
            found.append(Candidate(name=n, kind=type(module).__name__, shape=tuple(calls[n][0][0][1:]),
                                   params=sum(p.numel() for p in module.parameters()), output_change=change))
    return found
