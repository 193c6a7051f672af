"""A seeded run of scoring and pruning on CPU reproduces exactly (issue 8, "Serving").

Same seed → bit-identical scores, the same removed blocks and bit-identical weights: twice in this process, and
once more in a fresh interpreter with another hash seed (as two CLI runs would be).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cka_analysis.data import calibration_subset, load_dataset
from cka_analysis.export import open_model
from cka_analysis.scoring import ScoringOptions, score_blocks
from cka_analysis.workflow import PruneRequest, run_prune

CRITERIA = ("cka", "random", "taylor")


def _state_digest(model: torch.nn.Module, keys: set[str] | None = None) -> str:
    """A digest of ``model``'s state dict, or of its entries named in ``keys`` only."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if keys is None or key in keys:
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_once(seed: int = 0) -> dict[str, Any]:
    """Score with three criteria and prune (one-shot, CKA, a short recovery) from scratch; a JSON digest.

    Everything is rebuilt inside (model, datasets, loaders), as a new CLI run would.
    """
    model = open_model("digits_resnet", weights="demo")
    preset = model.cka_preset
    train = load_dataset("digits", "train", preset)
    calib = calibration_subset(train, 48, seed=seed)
    scores = {
        c: score_blocks(model, calib, c, options=ScoringOptions(device="cpu", batch_size=16, seed=seed)).scores
        for c in CRITERIA
    }
    request = PruneRequest(model, data="digits", calibration_samples=48, target="2 blocks", criterion="cka",
                           recovery="2400", eval_samples=64, batch_size=16, seed=seed, device="cpu", latency=False)
    result = run_prune(request)
    kept = {name for name, _ in result.model.named_parameters()}  # the trainable weights the pruned model kept
    assert kept and kept <= set(model.state_dict())  # each is in the base model too, so the comparison is real
    return {
        "scores": {c: {k: repr(v) for k, v in s.items()} for c, s in scores.items()},
        "removed": result.record.removed,
        "accuracy": repr(result.record.final.accuracy),
        "history": json.dumps(result.record.recovery.history if result.record.recovery else None),
        "weights": _state_digest(result.model),
        "kept_params": _state_digest(result.model, kept),  # after recovery
        "kept_params_before": _state_digest(model, kept),  # as they were in the base model
    }


@pytest.fixture(scope="module")
def first() -> dict[str, Any]:
    return run_once()


def test_scoring_and_pruning_reproduce_exactly_in_process(first: dict[str, Any]) -> None:
    again = run_once()
    assert again == first
    # the run did something: scores differ between blocks, blocks were removed, weights were fine-tuned
    assert len(first["removed"]) == 2
    assert all(len(set(s.values())) == len(s) for s in first["scores"].values())
    assert first["kept_params"] != first["kept_params_before"]


def test_the_seed_matters(first: dict[str, Any]) -> None:
    """A different seed changes the random scores: the seed is really used (that it reaches recovery is
    ``tests/test_one_rule.py::test_recovery_runs_with_the_request_seed``)."""
    model = open_model("digits_resnet", weights="demo")
    other = score_blocks(model, None, "random", options=ScoringOptions(seed=1)).scores
    assert {k: repr(v) for k, v in other.items()} != first["scores"]["random"]
    same = score_blocks(model, None, "random", options=ScoringOptions(seed=0)).scores
    assert {k: repr(v) for k, v in same.items()} == first["scores"]["random"]


def test_a_fresh_process_reproduces_the_run(first: dict[str, Any]) -> None:
    """Another interpreter, another PYTHONHASHSEED: the same digest (nothing depends on set or hash order)."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, runpy, torch; torch.set_num_threads(1); "
        f"m = runpy.run_path({str(Path(__file__).resolve())!r}); print(json.dumps(m['run_once']()))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == first
