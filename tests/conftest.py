"""Shared fixtures: the shared data folder (skipped with a reason when absent) and small helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from cka_analysis.config import shared_data_dir

# Property tests draw the same examples on every run (and every machine), CI or not: a failure found once is
# found again, and the suite cannot turn red by chance. Hypothesis's own CI profile is only picked when `CI` is
# set, which `.ci/run` need not do; this profile is loaded always. Set CKA_PRUNE_HYPOTHESIS=explore to search
# with fresh random examples (and the example database) when hunting for new counterexamples.
settings.register_profile("cka-prune", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("CKA_PRUNE_HYPOTHESIS", "cka-prune"))


_USER_LATENCY_CACHE: str | None = None
_TEST_LATENCY_CACHE: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: one thread is as fast as two there, and never spins against the subprocesses
    # (CLI, torchrun, streamlit) that some tests start. CKA_PRUNE_TEST_THREADS overrides it.
    torch.set_num_threads(int(os.environ.get("CKA_PRUNE_TEST_THREADS", "1")))
    # measured block latencies are cached per user; the tests (and the CLI they start) keep theirs private — also
    # when the user has set CKA_PRUNE_LATENCY_CACHE (the tests must neither read nor fill a real cache) — in a
    # temporary folder removed when the session ends
    global _USER_LATENCY_CACHE, _TEST_LATENCY_CACHE
    _USER_LATENCY_CACHE = os.environ.get("CKA_PRUNE_LATENCY_CACHE")
    _TEST_LATENCY_CACHE = tempfile.mkdtemp(prefix="cka-prune-test-latency-")
    os.environ["CKA_PRUNE_LATENCY_CACHE"] = _TEST_LATENCY_CACHE


def pytest_unconfigure(config: pytest.Config) -> None:
    if _TEST_LATENCY_CACHE is not None:
        shutil.rmtree(_TEST_LATENCY_CACHE, ignore_errors=True)
        if _USER_LATENCY_CACHE is None:
            os.environ.pop("CKA_PRUNE_LATENCY_CACHE", None)
        else:
            os.environ["CKA_PRUNE_LATENCY_CACHE"] = _USER_LATENCY_CACHE


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
