"""Shared fixtures: the shared data folder (skipped with a reason when absent) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cka_analysis.config import shared_data_dir


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: one thread is as fast as two there, and never spins against the subprocesses
    # (CLI, torchrun, streamlit) that some tests start. CKA_PRUNE_TEST_THREADS overrides it.
    torch.set_num_threads(int(os.environ.get("CKA_PRUNE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests that use it are skipped (with the reason) when it is absent."""
    root = shared_data_dir()
    if not (root / "cifar10-jpeg").is_dir() or not (root / "weights").is_dir():
        pytest.skip(
            f"shared data not found at {root} (expected cifar10-jpeg/ and weights/); "
            "set CKA_PRUNE_DATA to the folder that holds them"
        )
    return root


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def demo() -> torch.nn.Module:
    """The bundled digits demo model with its trained weights, in eval mode (one per test module)."""
    from cka_analysis.models import build_model

    return build_model("digits_resnet", weights="demo").eval()
