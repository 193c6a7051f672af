"""The quick ranking report (``python -m benchmarks.run --only report``) renders the committed criteria rows:
every criterion of the registry has a label, a table row and a curve (a criterion added to the registry once broke
the figure with a KeyError after a 10-minute run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import CRITERION_ORDER, LABELS, criteria_tables, plot_criteria

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_every_criterion_has_a_label() -> None:
    assert set(CRITERION_ORDER) <= set(LABELS)


def test_committed_criteria_rows_render(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crit = json.loads((RESULTS / "criteria.json").read_text())
    criteria = {r["criterion"] for r in crit["rows"]} - {"base"}
    assert criteria == set(CRITERION_ORDER)  # the rows hold every registry criterion
    monkeypatch.setenv("CKA_BENCH_RESULTS", str(tmp_path))
    paths = plot_criteria(crit)
    assert (tmp_path / "criteria.png").stat().st_size > 10_000 and paths[0] == tmp_path / "criteria.png"
    tables = criteria_tables(crit)
    for c in criteria:
        assert f"| {LABELS[c]} |" in tables, c
