"""Where things live: the bundled assets, the shared data folder, the download cache.

One setting each, read from the environment so that tests, CI, the CLI and the dashboard agree:

* ``CKA_PRUNE_DATA`` — the shared data folder (CIFAR-10 JPEG copy and public weights); default
  ``../shared/data`` beside the checkout.
* ``CKA_PRUNE_CACHE`` — where downloaded weights and datasets are cached; default torch.hub's directory.

Elsewhere: ``CKA_PRUNE_CPU_ALLOCATOR=default`` leaves glibc's allocator as it is when training on the CPU
(:func:`cka_analysis.device.tune_cpu_allocator`); ``CKA_PRUNE_LATENCY_CACHE`` in :mod:`cka_analysis.latency`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "assets"


def shared_data_dir() -> Path:
    """The shared data folder (``$CKA_PRUNE_DATA``, default ``../shared/data`` beside the checkout)."""
    env = os.environ.get("CKA_PRUNE_DATA")
    return Path(env).expanduser() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def cache_dir() -> Path:
    """Download cache for weights and datasets (``$CKA_PRUNE_CACHE``, default torch.hub's directory)."""
    env = os.environ.get("CKA_PRUNE_CACHE")
    return Path(env).expanduser() if env else Path(torch.hub.get_dir())


def asset_path(name: str) -> Path:
    """Path of a file shipped in ``assets/``."""
    return ASSETS_DIR / name
