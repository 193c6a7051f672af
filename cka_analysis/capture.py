"""Capturing intermediate activations with forward hooks, for heatmaps and criteria."""

from __future__ import annotations

import contextlib
import fnmatch
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .device import eval_mode
from .errors import ConfigError

PENULTIMATE = "penultimate"


def default_layers(model: nn.Module) -> list[str]:
    """The stem, the output of every residual block still present, and the pooled penultimate features.

    For models the library does not know (and that declare no blocks), the children of the root module.
    """
    from .blocks import GenericTopology, topology
    from .errors import BlockError

    try:
        topo = topology(model)
    except BlockError:
        return [n for n, _ in model.named_children()]
    names = [s for s in topo.slots if not isinstance(model.get_submodule(s), nn.Identity)]
    if topo.stem_layer and not isinstance(topo, GenericTopology):
        names.insert(0, topo.stem_layer)
    if topo.classifier:
        names.append(PENULTIMATE)
    return names


def _resolve(model: nn.Module, layers: Sequence[str | type] | None) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, capture-input?) for each selected layer, in module registration order."""
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is None:
        layers = default_layers(model)
    chosen: list[tuple[str, nn.Module, bool]] = []
    unmatched: list[str] = []
    for sel in layers:
        if isinstance(sel, type):
            hits = [(n, m, False) for n, m in named if isinstance(m, sel)]
            if not hits:
                unmatched.append(sel.__name__)
        elif sel == PENULTIMATE:
            from .blocks import topology

            try:
                cls = topology(model).classifier
            except Exception:
                cls = None
            if cls is None:
                linears = [n for n, m in named if isinstance(m, nn.Linear)]
                cls = linears[-1] if linears else None
            if cls is None:
                unmatched.append(sel)
                continue
            hits = [(PENULTIMATE, model.get_submodule(cls), True)]
        else:
            hits = [(n, m, False) for n, m in named if n == sel] or [
                (n, m, False) for n, m in named if fnmatch.fnmatchcase(n, sel)
            ]
            if not hits:
                unmatched.append(str(sel))
        for h in hits:
            if all(h[0] != c[0] for c in chosen):
                chosen.append(h)
    if unmatched:
        raise ConfigError(
            f"layers {unmatched} match no module of {type(model).__name__} "
            f"(names look like: {', '.join(n for n, _ in named[:6])}, ...)"
        )
    if not chosen:
        raise ConfigError("no layer selected for activation capture")
    return chosen


class ActivationCapture:
    """Context manager that records the outputs of selected layers during forward passes.

    ``layers`` are qualified module names, glob patterns, module types, or ``"penultimate"`` (the input of the
    final classifier); default: :func:`default_layers`. Entries come in the order the modules run; a module called
    several times in one pass yields ``name#1``, ``name#2``, ... The model is put in eval mode inside the block and
    its train/eval state (per module) is restored on exit.

    Example::

        with ActivationCapture(model) as cap:
            feats = cap.run(images)   # OrderedDict name → tensor (batch, ...)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str | type] | None = None) -> None:
        self.model = model
        self.targets = _resolve(model, layers)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._records: list[tuple[str, torch.Tensor]] = []
        self._eval: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> ActivationCapture:
        self._eval = eval_mode(self.model)
        self._eval.__enter__()
        for name, module, pre in self.targets:
            if pre:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._eval is not None:
            self._eval.__exit__(None, None, None)
            self._eval = None
        self._records.clear()

    def _hook(self, name: str):
        def fn(module: nn.Module, args: tuple, out: object) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor):
                self._records.append((name, t.detach()))

        return fn

    def _pre_hook(self, name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                self._records.append((name, args[0].detach()))

        return fn

    def run(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """One forward pass; returns the captured activations by name, in call order."""
        if not self._handles:
            raise ConfigError("ActivationCapture.run() must be called inside a `with` block")
        self._records.clear()
        self.model(x)
        counts: dict[str, int] = {}
        for n, _ in self._records:
            counts[n] = counts.get(n, 0) + 1
        seen: dict[str, int] = {}
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for n, t in self._records:
            if counts[n] > 1:
                seen[n] = seen.get(n, 0) + 1
                out[f"{n}#{seen[n]}"] = t
            else:
                out[n] = t
        self._records.clear()
        return out
