"""Helpers the attacks, the corruptions and the evaluation loop share: seeds and local random generators.

Nothing in :mod:`cka_analysis.robustness` draws from, seeds or restores the process-wide RNG: every random choice
(PGD's random start, the noise corruptions) comes from a ``torch.Generator`` made for it here, so evaluations in
several threads (two dashboard sessions) cannot change each other's seeded results.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from ..errors import ConfigError


def check_seed(seed: int) -> int:
    """``seed`` itself when it is an integer; ConfigError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer")
    return seed


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A new generator on ``device`` seeded with ``seed`` (on the CPU for a backend without its own generators).

    A CUDA generator seeded with ``s`` gives the same stream as ``torch.cuda.manual_seed(s)`` would, so results
    match those of the earlier global-seeding code on every device.
    """
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generator: draw on the CPU and move
        generator = torch.Generator()
    return generator.manual_seed(seed)


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the run seed and what is being randomised (batch, ε, corruption...)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def check_names(value: Iterable[str] | str, known: tuple[str, ...], *, field: str, item: str,
                lower: bool = False) -> tuple[str, ...]:
    """Names chosen from ``known``, from a sequence or a comma-separated string, de-duplicated in order.

    ConfigError naming ``field`` when none is given, or the unknown ``item`` and the choices.
    """
    if isinstance(value, str):
        value = value.split(",")
    names = tuple(n.strip().lower() if lower else n.strip() for n in value)
    names = tuple(n for n in names if n)
    if not names:
        raise ConfigError(f"{field} is empty; choose from {', '.join(known)}")
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown {item} {name!r}; choose from {', '.join(known)}")
    return tuple(dict.fromkeys(names))
