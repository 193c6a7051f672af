"""Tests for cka_analysis.figures: the figures' content, the pure helpers, validation and serialisation."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_analysis import figures as F
from cka_analysis.errors import ConfigError
from cka_analysis.robustness import AttackCurve, CorruptionResult, RobustnessResult


def _serialises(fig: go.Figure) -> None:
    """Every figure must survive JSON export and an HTML fragment export (the CLI's report)."""
    assert isinstance(fig, go.Figure)
    json.loads(fig.to_json())
    html = pio.to_html(fig, full_html=False, include_plotlyjs=False)
    assert "<div" in html
    assert fig.layout.template.layout.paper_bgcolor == pio.templates[F.TEMPLATE].layout.paper_bgcolor


# ---------------------------------------------------------------------------------------------------- format_count


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (853_000, "853.0 K"),
        (12_500_000, "12.5 M"),
        (4.1e9, "4.1 G"),
        (512, "512"),
        (0, "0"),
        (0.5, "0.5"),
        (999_960, "1.0 M"),  # rounding must not print "1000.0 K"
        (999.96, "1.0 K"),
        (-1_234, "-1.2 K"),
        (2.5e12, "2.5 T"),
        (np.int64(1500), "1.5 K"),
        (None, "n/a"),
        (float("nan"), "n/a"),
    ],
)
def test_format_count(n, text):
    assert F.format_count(n) == text


def test_format_count_rejects_text():
    with pytest.raises(ConfigError, match="format_count"):
        F.format_count("lots")


# ---------------------------------------------------------------------------------------------------- cka_heatmap


def test_cka_heatmap_content():
    m = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, np.nan], [0.2, 0.5, 1.0]])
    names = ["conv1", "layer1.0", "layer1.1"]
    fig = F.cka_heatmap(m, names, title="My CKA")
    _serialises(fig)
    (hm,) = fig.data
    assert hm.type == "heatmap"
    assert (hm.zmin, hm.zmax) == (0.0, 1.0)
    assert hm.zauto is False
    assert hm.colorbar.title.text == "CKA"
    z = np.array(hm.z, dtype=float)
    np.testing.assert_array_equal(np.isnan(z), np.isnan(m))
    np.testing.assert_allclose(z[~np.isnan(z)], m[~np.isnan(m)])
    # origin bottom-left: y axis not reversed, first layer at the lowest y value
    assert fig.layout.yaxis.autorange != "reversed"
    assert fig.layout.yaxis.range[0] < fig.layout.yaxis.range[1]
    assert list(fig.layout.yaxis.ticktext) == names and list(fig.layout.yaxis.tickvals) == [0, 1, 2]
    assert list(fig.layout.xaxis.ticktext) == names
    assert fig.layout.yaxis.scaleanchor == "x"
    assert fig.layout.title.text == "My CKA"
    # hover: both names and the value with 3 decimals; NaN cell says n/a
    assert "conv1" in hm.text[0][1] and "layer1.0" in hm.text[0][1] and "0.800" in hm.text[0][1]
    assert "row: layer1.0" in hm.text[1][2] and "column: layer1.1" in hm.text[1][2] and "n/a" in hm.text[1][2]
    assert hm.hovertemplate == "%{text}<extra></extra>"


def test_cka_heatmap_non_square_and_torch_input():
    m = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], requires_grad=True)
    fig = F.cka_heatmap(m, ["a1", "a2", "a3"], ["b1", "b2"], zmin=0.0, zmax=1.0)
    _serialises(fig)
    hm = fig.data[0]
    assert np.array(hm.z).shape == (2, 3)
    assert list(fig.layout.xaxis.ticktext) == ["a1", "a2", "a3"]
    assert list(fig.layout.yaxis.ticktext) == ["b1", "b2"]
    # matrix[1, 2] pairs row b2 with column a3
    assert "row: b2" in hm.text[1][2] and "column: a3" in hm.text[1][2] and "0.600" in hm.text[1][2]


def _plot_area(fig) -> tuple[float, float]:
    m = fig.layout.margin
    return fig.layout.width - m.l - m.r, fig.layout.height - m.t - m.b


@pytest.mark.parametrize(("rows", "cols", "size"),
                         [(11, 11, 720), (56, 56, 720), (3, 40, 600), (40, 3, 600), (56, 56, 480)])
def test_cka_heatmap_cells_are_square_and_the_colour_bar_is_beside_it(rows, cols, size):
    fig = F.cka_heatmap(np.full((rows, cols), 0.5), [f"c{j}" for j in range(cols)], [f"r{i}" for i in range(rows)],
                        size=size)
    w, h = _plot_area(fig)
    assert fig.layout.autosize is False
    assert max(w, h) == pytest.approx(size, abs=1)  # the matrix is as large as asked
    assert w / cols == pytest.approx(h / rows, abs=0.02)  # square cells: no empty band beside the matrix
    bar = fig.data[0].colorbar
    # right of the plot area (paper x = 1), inside the right margin, not at the far edge of a wide page
    assert bar.x == 1.0 and bar.xanchor == "left" and bar.xref == "paper"
    assert fig.layout.margin.r >= bar.thickness + bar.xpad + 30


def test_cka_heatmap_thins_tick_labels_of_deep_networks_but_hover_stays_exact():
    from cka_analysis.capture import default_layers
    from cka_analysis.models import build_model

    names = list(default_layers(build_model("cifar_resnet110", weights="random")))
    assert len(names) > 50
    z = np.random.default_rng(0).uniform(size=(len(names), len(names)))
    fig = F.cka_heatmap(z, names, size=720)
    w, _ = _plot_area(fig)
    ticks = list(fig.layout.xaxis.tickvals)
    assert 10 < len(ticks) < len(names)
    assert min(np.diff(ticks)) * w / len(names) >= 13  # labels at least 13 px apart
    assert list(fig.layout.xaxis.ticktext) == [names[i] for i in ticks]
    assert list(fig.layout.yaxis.ticktext) == [names[i] for i in fig.layout.yaxis.tickvals]
    hm = fig.data[0]
    for i, j in [(0, 0), (7, 41), (len(names) - 1, 3), (len(names) - 2, len(names) - 1)]:
        assert hm.text[i][j] == f"row: {names[i]}<br>column: {names[j]}<br>CKA: {z[i, j]:.3f}"
    # a small matrix keeps every label
    small = F.cka_heatmap(np.eye(9), names[:9], size=720)
    assert list(small.layout.xaxis.ticktext) == names[:9]


def test_cka_heatmap_validation():
    with pytest.raises(ConfigError, match="matrix"):
        F.cka_heatmap(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ConfigError, match="matrix"):
        F.cka_heatmap(np.zeros(3), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="names_x"):
        F.cka_heatmap(np.zeros((1, 1)), "a")
    with pytest.raises(ConfigError, match="zmin"):
        F.cka_heatmap(np.zeros((1, 1)), ["a"], zmin=1.0, zmax=0.0)
    with pytest.raises(ConfigError, match="size"):
        F.cka_heatmap(np.zeros((1, 1)), ["a"], size=50)


# ---------------------------------------------------------------------------------------------------- adjacent


def test_adjacent_similarity():
    m = np.array([[1.0, 0.9, 0.1, 0.0], [0.9, 1.0, 0.7, 0.2], [0.1, 0.7, 1.0, np.nan], [0, 0.2, np.nan, 1]])
    fig = F.adjacent_similarity(m, ["a", "b", "c", "d"])
    _serialises(fig)
    (tr,) = fig.data
    assert tr.type == "scatter"
    assert list(tr.x) == ["a → b", "b → c", "c → d"]
    assert list(tr.y) == [0.9, 0.7, None]
    assert list(fig.layout.yaxis.range) == [0.0, 1.0]
    assert "0.700" in tr.text[1] and "n/a" in tr.text[2]


def test_adjacent_similarity_validation():
    with pytest.raises(ConfigError, match="square"):
        F.adjacent_similarity(np.zeros((3, 2)), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="names"):
        F.adjacent_similarity(np.ones((1, 1)), ["a"])


# ---------------------------------------------------------------------------------------------------- score_bars


def _traces_by_name(fig: go.Figure) -> dict[str, go.BaseTraceType]:
    return {t.name: t for t in fig.data}


def test_score_bars_groups_colours_and_hover():
    names = ["b0", "b1", "b2", "b3", "b4"]
    scores = [0.30, None, 0.10, 0.20, 0.50]
    removable = [True, False, True, True, False]
    reasons = [None, "changes the number of channels", None, None, "last block of the stage"]
    fig = F.score_bars(names, scores, removable=removable, reasons=reasons, highlight=["b2"], criterion="cka")
    fig_scores_only = F.score_bars(names, [0.3, 0.4, 0.1, 0.2, 0.5])
    _serialises(fig)
    _serialises(fig_scores_only)
    tr = _traces_by_name(fig)
    assert set(tr) == {"removable", "selected", "not removable", "not removable (no score)"}
    # forward order kept on the category axis
    assert fig.layout.xaxis.categoryorder == "array"
    assert list(fig.layout.xaxis.categoryarray) == names
    assert fig.layout.barmode == "overlay"  # bars stay centred on their category
    assert "lower" in fig.layout.yaxis.title.text and "lower" in fig.layout.title.subtitle.text

    removable_bars = tr["removable"]
    assert removable_bars.type == "bar"
    assert list(removable_bars.x) == ["b0", "b3"] and list(removable_bars.y) == [0.30, 0.20]
    assert removable_bars.marker.color == F.BAR_COLOUR
    # ranks among removable blocks: b2 (0.1) = 1, b3 (0.2) = 2, b0 (0.3) = 3
    assert "rank: 3 of 3" in removable_bars.text[0] and "rank: 2 of 3" in removable_bars.text[1]
    selected = tr["selected"]
    assert list(selected.x) == ["b2"] and selected.marker.color == F.HIGHLIGHT_COLOUR
    assert "rank: 1 of 3" in selected.text[0]

    grey = [t for t in fig.data if t.marker.color == F.GREY]
    grey_bars = [t for t in grey if t.type == "bar"]
    grey_marks = [t for t in grey if t.type == "scatter"]
    # b4 has a score: grey bar with the reason in its hover; b1 has none: grey marker labelled on the axis
    assert len(grey_bars) == 1 and list(grey_bars[0].x) == ["b4"] and list(grey_bars[0].y) == [0.5]
    assert "not removable: last block of the stage" in grey_bars[0].text[0]
    assert "rank" not in grey_bars[0].text[0]
    assert len(grey_marks) == 1 and list(grey_marks[0].x) == ["b1"] and list(grey_marks[0].y) == [0.0]
    assert list(grey_marks[0].text) == ["not removable"]
    assert "changes the number of channels" in grey_marks[0].hovertext[0]


def test_score_bars_ties_share_rank_and_nan_scores():
    fig = F.score_bars(["a", "b", "c"], np.array([0.2, 0.2, np.nan]))
    tr = _traces_by_name(fig)
    assert list(tr["removable"].x) == ["a", "b"]
    assert all("rank: 1 of 2" in t for t in tr["removable"].text)
    assert list(tr["removable (no score)"].x) == ["c"]
    assert "rank: n/a" in tr["removable (no score)"].hovertext[0]


def test_score_bars_validation():
    with pytest.raises(ConfigError, match="scores"):
        F.score_bars(["a", "b"], [0.1])
    with pytest.raises(ConfigError, match="removable"):
        F.score_bars(["a", "b"], [0.1, 0.2], removable=[True])
    with pytest.raises(ConfigError, match="reasons"):
        F.score_bars(["a", "b"], [0.1, 0.2], reasons=["x", None, None])
    with pytest.raises(ConfigError, match="highlight"):
        F.score_bars(["a", "b"], [0.1, 0.2], highlight=["zz"])
    with pytest.raises(ConfigError, match="unique"):
        F.score_bars(["a", "a"], [0.1, 0.2])
    with pytest.raises(ConfigError, match="scores"):
        F.score_bars(["a", "b"], ["x", 0.2])


# ---------------------------------------------------------------------------------------------------- kendall tau


def test_kendall_tau_b_hand_values():
    assert F.kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert F.kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # tie in x: pairs (1,2) tied in x only; C=5, D=0, untied-x pairs 5, untied-y pairs 6 -> 5/sqrt(30)
    assert F.kendall_tau_b([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    # x = [1,2,3], y = [1,3,2]: C=2, D=1 -> 1/3
    assert F.kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # ties in both: x=[1,1,2,3], y=[1,2,2,3]: C=4, D=0, untied-x 5, untied-y 5 -> 0.8
    assert F.kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    # x=[1,1,2,2], y=[1,2,1,2]: one concordant, one discordant pair -> 0
    assert F.kendall_tau_b([1, 1, 2, 2], [1, 2, 1, 2]) == pytest.approx(0.0)
    assert math.isnan(F.kendall_tau_b([1, 1, 1], [1, 2, 3]))  # constant vector: undefined
    assert math.isnan(F.kendall_tau_b([1], [2]))
    with pytest.raises(ConfigError, match="same length"):
        F.kendall_tau_b([1, 2], [1, 2, 3])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=15))
def test_kendall_tau_b_matches_scipy(pairs):
    stats = pytest.importorskip("scipy.stats")
    x, y = (np.array(v, dtype=float) for v in zip(*pairs, strict=True))
    ours = F.kendall_tau_b(x, y)
    ref = stats.kendalltau(x, y, variant="b").statistic
    if math.isnan(ref):
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(ref, abs=1e-12)


def test_rank_agreement_pairs_and_shared_blocks():
    scores = {
        "cka": {"b0": 0.1, "b1": 0.2, "b2": 0.3, "b3": 0.4},
        "same": {"b0": 1.0, "b1": 2.0, "b2": 3.0, "b3": 4.0},
        "reversed": {"b3": 1.0, "b2": 2.0, "b1": 3.0, "b0": 4.0},
        # shares b0, b1, b2 only (b3 missing, b4 unknown elsewhere), with a tie between b1 and b2
        "partial": {"b0": 0.0, "b1": 1.0, "b2": 1.0, "b4": 9.0, "b3": None},
    }
    tau = F.rank_agreement(scores)
    assert set(tau) == set(itertools.combinations(scores, 2))
    assert tau[("cka", "same")] == pytest.approx(1.0)
    assert tau[("cka", "reversed")] == pytest.approx(-1.0)
    # over b0, b1, b2: x=[0,1,1], y=[.1,.2,.3]: C=2, D=0, untied 2 and 3 -> 2/sqrt(6)
    assert tau[("cka", "partial")] == pytest.approx(2 / math.sqrt(6))
    assert tau[("reversed", "partial")] == pytest.approx(-2 / math.sqrt(6))
    assert F.rank_agreement({"only": {"a": 1.0}}) == {}
    assert math.isnan(F.rank_agreement({"x": {"a": 1.0}, "y": {"b": 2.0}})[("x", "y")])


def test_rank_agreement_validation():
    with pytest.raises(ConfigError, match="scores_by_criterion"):
        F.rank_agreement({})
    with pytest.raises(ConfigError, match="scores_by_criterion"):
        F.rank_agreement({"cka": [0.1, 0.2]})
    with pytest.raises(ConfigError, match=r"scores_by_criterion\['cka'\]\['b0'\]"):
        F.rank_agreement({"cka": {"b0": "high"}})


def test_rank_comparison_heatmap():
    scores = {
        "cka": {"b0": 0.3, "b1": 0.1, "b2": 0.2},
        "magnitude": {"b0": 5.0, "b1": 5.0, "b2": 1.0, "b3": 2.0},
    }
    fig = F.rank_comparison(scores)
    _serialises(fig)
    (hm,) = fig.data
    assert hm.type == "heatmap"
    assert list(hm.x) == ["cka", "magnitude"]
    assert list(hm.y) == ["b0", "b1", "b2", "b3"]
    # cka ranks: b1=1, b2=2, b0=3, b3 unscored; magnitude: b2=1, b3=2, b0=b1=3 (tie shares the rank)
    assert list(hm.z[0]) == [3.0, 3.0]
    assert list(hm.z[1]) == [1.0, 3.0]
    assert list(hm.z[2]) == [2.0, 1.0]
    assert list(hm.z[3]) == [None, 2.0]
    assert hm.zmin == 1.0
    assert "rank: n/a" in hm.customdata[3][0]
    assert "rank: 1 of 3" in hm.customdata[1][0]
    assert fig.layout.yaxis.autorange == "reversed"  # a table: first block on top


def test_rank_agreement_heatmap_scale_and_values():
    scores = {"a": {"x": 1, "y": 2, "z": 3}, "b": {"x": 1, "y": 2, "z": 3}, "c": {"x": 3, "y": 2, "z": 1}}
    fig = F.rank_agreement_heatmap(scores)
    _serialises(fig)
    (hm,) = fig.data
    assert (hm.zmin, hm.zmax, hm.zmid) == (-1.0, 1.0, 0.0)
    z = np.array(hm.z, dtype=float)
    np.testing.assert_allclose(z, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
    np.testing.assert_allclose(z, z.T)
    assert hm.text[0][2] == "-1.00"
    # a diverging scale: the colour at -1 differs in hue from the one at +1 and the middle is light
    assert hm.colorscale[0][1] != hm.colorscale[-1][1]


# ---------------------------------------------------------------------------------------------------- robustness


def _record(clean: float, fgsm=None, pgd=None, corruption_means=None) -> RobustnessResult:
    """A robustness record as evaluate_robustness returns it (each corruption at the given means)."""
    corr = None
    if corruption_means is not None:
        sevs = tuple(sorted(corruption_means))
        corr = CorruptionResult(sevs, {"contrast": tuple(corruption_means[s] for s in sevs),
                                       "brightness": tuple(corruption_means[s] for s in sevs)}, "cifar10-c")
    curve = lambda name, d: None if d is None else AttackCurve(name, tuple(d), tuple(d.values()))  # noqa: E731
    return RobustnessResult(100, clean, curve("fgsm", fgsm), curve("pgd", pgd), corr)


def test_adversarial_curves_take_records_and_their_json_form():
    results = {
        "original": _record(90.0, fgsm={0.0: 90.0, 2 / 255: 60.0, 8 / 255: 20.0},
                            pgd={0.0: 90.0, 2 / 255: 40.0, 8 / 255: 5.0}),
        # read back from JSON, measured in another order
        "pruned-1": json.loads(json.dumps(_record(88.0, fgsm={0.0: 88.0, 8 / 255: 25.0, 2 / 255: 55.0}).to_dict())),
    }
    fig = F.adversarial_curves(results)
    _serialises(fig)
    assert len(fig.data) == 3  # original: fgsm + pgd; pruned-1: fgsm only
    names = [t.name for t in fig.data]
    assert names.count("original") == 2 and names.count("pruned-1") == 1
    by = {(t.name, t.xaxis): t for t in fig.data}
    fgsm = by[("original", "x")]
    np.testing.assert_allclose(fgsm.x, [0.0, 2.0, 8.0])
    assert list(fgsm.y) == [90.0, 60.0, 20.0]
    pruned = by[("pruned-1", "x")]
    np.testing.assert_allclose(pruned.x, [0.0, 2.0, 8.0])  # sorted by ε whatever the measuring order
    assert list(pruned.y) == [88.0, 55.0, 25.0]
    pgd = by[("original", "x2")]
    np.testing.assert_allclose(pgd.x, [0.0, 2.0, 8.0])
    assert list(pgd.y) == [90.0, 40.0, 5.0]
    # same colour for one model across panels; legend shows it once
    assert by[("original", "x")].line.color == by[("original", "x2")].line.color
    assert [t.showlegend for t in fig.data if t.name == "original"] == [True, False]
    assert list(fig.layout.xaxis.ticktext) == ["0", "2/255", "8/255"]
    np.testing.assert_allclose(fig.layout.xaxis.tickvals, [0.0, 2.0, 8.0])
    assert list(fig.layout.xaxis2.ticktext) == ["0", "2/255", "8/255"]
    assert "/255" in fig.layout.xaxis.title.text
    assert list(fig.layout.yaxis.range) == [0, 100]
    assert "%" in fig.layout.yaxis.title.text
    assert "2/255" in fgsm.text[1] and "60.00 %" in fgsm.text[1]


def test_adversarial_curves_validation():
    with pytest.raises(ConfigError, match="results is empty"):
        F.adversarial_curves({})
    with pytest.raises(ConfigError, match="attack_names"):
        F.adversarial_curves({"m": _record(50.0, fgsm={0.0: 50.0})}, attack_names=("pgd",))
    with pytest.raises(ConfigError, match="given twice"):
        F.adversarial_curves({"m": {"samples": 10, "clean_accuracy": 50.0,
                                    "fgsm": {"eps": [0.0, 0.0], "accuracy": [50.0, 40.0]}}})
    with pytest.raises(ConfigError, match=r"ε must lie in \[0, 1\]"):
        F.adversarial_curves({"m": {"samples": 10, "clean_accuracy": 50.0,
                                    "fgsm": {"eps": [-2 / 255], "accuracy": [50.0]}}})
    with pytest.raises(ConfigError, match=r"percentage in \[0, 100\]"):
        F.adversarial_curves({"m": {"samples": 10, "clean_accuracy": 50.0,
                                    "fgsm": {"eps": [0.0], "accuracy": [150.0]}}})


def test_corruption_curves():
    fig = F.corruption_curves({
        "original": _record(90.0, corruption_means={1: 85.0, 3: 70.0, 2: 80.0}),
        "pruned": _record(88.0, corruption_means={5: 40.0, 1: 83.0}).corruptions,
        "from json": json.loads(json.dumps(_record(87.0, corruption_means={1: 60.0}).to_dict())),
    })
    _serialises(fig)
    a, b, c = fig.data
    assert list(a.x) == [1, 2, 3] and list(a.y) == [85.0, 80.0, 70.0]
    assert list(b.x) == [1, 5] and list(b.y) == [83.0, 40.0]
    assert list(c.x) == [1] and list(c.y) == [60.0]
    assert a.line.color != b.line.color
    assert "over 2 corruptions" in a.text[0]
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 3, 4, 5]
    assert list(fig.layout.yaxis.range) == [0, 100]
    assert "(%)" in fig.layout.yaxis.title.text
    with pytest.raises(ConfigError, match="has no corruption accuracy"):
        F.corruption_curves({"m": _record(50.0, fgsm={0.0: 50.0})})
    with pytest.raises(ConfigError, match="integers from 1 to 5"):
        F.corruption_curves({"m": CorruptionResult.from_dict({"contrast": {6: 1.0}})})
    with pytest.raises(ConfigError, match="corruption result"):
        F.corruption_curves({"m": {"contrast": {"mild": 1.0}}})


def test_figures_and_robustness_records_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, cka_analysis.figures, cka_analysis.robustness; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------- pareto


PARETO_POINTS = [
    {"label": "original", "macs": 100e6, "accuracy": 93.0, "params": 11e6},
    {"label": "cka-1", "macs": 80e6, "accuracy": 92.5, "criterion": "cka", "params": 10e6},
    {"label": "cka-2", "macs": 60e6, "accuracy": 90.0, "criterion": "cka"},
    {"label": "mag-1", "macs": 80e6, "accuracy": 91.0, "criterion": "magnitude"},  # dominated by cka-1
    {"label": "mag-2", "macs": 70e6, "accuracy": 89.0, "criterion": "magnitude"},  # dominated by cka-2
    {"label": "mag-3", "macs": 40e6, "accuracy": 85.0, "criterion": "magnitude"},
    {"label": "big-bad", "macs": 120e6, "accuracy": 92.0, "criterion": "magnitude"},  # dominated
    {"label": "no-eval", "macs": 50e6, "accuracy": None, "criterion": "cka"},
]


def test_pareto_front_hand_made():
    front = F.pareto_front(PARETO_POINTS)
    assert [p["label"] for p in front] == ["mag-3", "cka-2", "cka-1", "original"]
    # ties: equal MACs keeps the more accurate one; exact duplicate keeps the first
    dup = [
        {"label": "a", "macs": 1, "accuracy": 50},
        {"label": "b", "macs": 1, "accuracy": 60},
        {"label": "c", "macs": 1, "accuracy": 60},
        {"label": "d", "macs": 2, "accuracy": 60},
    ]
    assert [p["label"] for p in F.pareto_front(dup)] == ["b"]
    assert F.pareto_front([]) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_pareto_front_is_the_non_dominated_set(raw):
    pts = [{"label": str(i), "macs": m, "accuracy": a} for i, (m, a) in enumerate(raw)]
    front = F.pareto_front(pts)

    def dominated(p):
        return any(
            q["macs"] <= p["macs"]
            and q["accuracy"] >= p["accuracy"]
            and (q["macs"], q["accuracy"]) != (p["macs"], p["accuracy"])
            for q in pts
        )

    expected = {(p["macs"], p["accuracy"]) for p in pts if not dominated(p)}
    assert {(p["macs"], p["accuracy"]) for p in front} == expected
    assert len(front) == len(expected)
    assert [p["macs"] for p in front] == sorted(p["macs"] for p in front)


def test_pareto_figure():
    fig = F.pareto(PARETO_POINTS)
    _serialises(fig)
    tr = _traces_by_name(fig)
    assert set(tr) == {"no criterion", "cka", "magnitude", "Pareto front"}
    assert tr["cka"].marker.color != tr["magnitude"].marker.color
    assert list(tr["cka"].x) == [80e6, 60e6]  # no-eval is not drawn
    assert "1 run(s) without accuracy" in fig.layout.title.subtitle.text
    front = tr["Pareto front"]
    assert front.line.shape == "hv"
    # the step line runs through the front and extends flat to the costliest point
    assert list(front.x) == [40e6, 60e6, 80e6, 100e6, 120e6]
    assert list(front.y) == [85.0, 90.0, 92.5, 93.0, 93.0]
    hover = tr["cka"].text[0]
    assert "cka-1" in hover and "80.0 M" in hover and "10.0 M" in hover and "92.50 %" in hover
    assert "params: n/a" in tr["cka"].text[1]
    assert "multiply-accumulates" in fig.layout.xaxis.title.text


def test_pareto_reduction_axis():
    fig = F.pareto(PARETO_POINTS, x="reduction", reference_macs=100e6)
    tr = _traces_by_name(fig)
    np.testing.assert_allclose(tr["cka"].x, [20.0, 40.0])
    front = tr["Pareto front"]
    assert front.line.shape == "vh"
    np.testing.assert_allclose(front.x, [-20.0, 0.0, 20.0, 40.0, 60.0])
    assert list(front.y) == [93.0, 93.0, 92.5, 90.0, 85.0]
    assert "reduction" in fig.layout.xaxis.title.text


def test_pareto_validation():
    with pytest.raises(ConfigError, match="points"):
        F.pareto([])
    with pytest.raises(ConfigError, match=r"points\[0\]"):
        F.pareto([{"label": "a", "macs": 1}])
    with pytest.raises(ConfigError, match="macs"):
        F.pareto([{"label": "a", "macs": -5, "accuracy": 1}])
    with pytest.raises(ConfigError, match="x must be"):
        F.pareto(PARETO_POINTS, x="params")


# ---------------------------------------------------------------------------------------------------- trajectory


STEPS = [
    {"step": 2, "removed": "layer2.1", "macs": 60e6, "params": 8e6, "accuracy": 88.0},
    {"step": 0, "removed": None, "macs": 100e6, "params": 11e6, "accuracy": 93.0},
    {"step": 1, "removed": "layer3.1", "macs": 80e6, "params": 9e6, "accuracy": None},
]


def test_pruning_trajectory():
    fig = F.pruning_trajectory(STEPS)
    _serialises(fig)
    acc, macs = fig.data
    assert list(acc.x) == [0, 1, 2]
    assert list(acc.y) == [93.0, None, 88.0]
    np.testing.assert_allclose(macs.y, [100.0, 80.0, 60.0])
    assert acc.yaxis == "y" and macs.yaxis == "y2"
    assert fig.layout.yaxis2.overlaying == "y" and fig.layout.yaxis2.side == "right"
    assert "%" in fig.layout.yaxis.title.text and "% of original" in fig.layout.yaxis2.title.text
    assert "original" in acc.text[0]
    assert "removed: layer3.1" in acc.text[1] and "accuracy: n/a" in acc.text[1]
    assert (
        "removed: layer2.1" in macs.text[2]
        and "60.0 M" in macs.text[2]
        and "60.0 % of original" in macs.text[2]
    )


def test_pruning_trajectory_validation():
    with pytest.raises(ConfigError, match="step 0"):
        F.pruning_trajectory(STEPS[:1])
    fig = F.pruning_trajectory(STEPS[:1], reference_macs=120e6)
    np.testing.assert_allclose(fig.data[1].y, [50.0])
    with pytest.raises(ConfigError, match="repeats"):
        F.pruning_trajectory([*STEPS, {"step": 1, "removed": "x", "macs": 1, "params": 1, "accuracy": 1}])
    with pytest.raises(ConfigError, match="macs"):
        F.pruning_trajectory([{"step": 0, "removed": None}])
    with pytest.raises(ConfigError, match="steps"):
        F.pruning_trajectory([])


# ---------------------------------------------------------------------------------------------------- criteria


def test_criteria_accuracy_curves_mean_and_std():
    rows = [
        {
            "criterion": "cka",
            "target": 0.3,
            "macs_reduction": 0.31,
            "acc_no_ft": 50.0,
            "acc_ft": 90.0,
            "seed": 0,
        },
        {
            "criterion": "cka",
            "target": 0.3,
            "macs_reduction": 0.33,
            "acc_no_ft": 52.0,
            "acc_ft": 92.0,
            "seed": 1,
        },
        {
            "criterion": "cka",
            "target": 0.1,
            "macs_reduction": 0.12,
            "acc_no_ft": 80.0,
            "acc_ft": 93.0,
            "seed": 0,
        },
        {"criterion": "magnitude", "macs_reduction": 0.25, "acc_no_ft": 30.0, "acc_ft": 85.0, "seed": 0},
        {"criterion": "magnitude", "macs_reduction": 0.25, "acc_no_ft": 34.0, "acc_ft": None, "seed": 1},
    ]
    fig = F.criteria_accuracy_curves(rows)
    _serialises(fig)
    tr = _traces_by_name(fig)
    cka = tr["cka"]
    np.testing.assert_allclose(cka.x, [12.0, 32.0])
    np.testing.assert_allclose(cka.y, [93.0, 91.0])
    np.testing.assert_allclose(cka.error_y.array, [0.0, np.std([90.0, 92.0], ddof=1)])
    assert cka.error_y.visible is True
    assert "seeds: 2" in cka.text[1] and "target 30.0 %" in cka.text[1]
    mag = tr["magnitude"]  # the seed without acc_ft is skipped
    np.testing.assert_allclose(mag.x, [25.0])
    np.testing.assert_allclose(mag.y, [85.0])
    assert "after fine-tuning" in fig.layout.yaxis.title.text
    assert "%" in fig.layout.xaxis.title.text

    no_ft = F.criteria_accuracy_curves(rows, y="acc_no_ft")
    mag = _traces_by_name(no_ft)["magnitude"]  # no target key: grouped by achieved reduction
    np.testing.assert_allclose(mag.y, [32.0])
    np.testing.assert_allclose(mag.error_y.array, [np.std([30.0, 34.0], ddof=1)])
    assert "without fine-tuning" in no_ft.layout.yaxis.title.text


def test_criteria_accuracy_curves_validation():
    with pytest.raises(ConfigError, match="y must be"):
        F.criteria_accuracy_curves([], y="acc")
    with pytest.raises(ConfigError, match="rows"):
        F.criteria_accuracy_curves([])
    with pytest.raises(ConfigError, match="macs_reduction"):
        F.criteria_accuracy_curves([{"criterion": "c", "macs_reduction": 30.0, "acc_ft": 1.0}])
    with pytest.raises(ConfigError, match="acc_ft"):
        F.criteria_accuracy_curves([{"criterion": "c", "macs_reduction": 0.3, "acc_ft": None}])
    with pytest.raises(ConfigError, match="criterion"):
        F.criteria_accuracy_curves([{"macs_reduction": 0.3, "acc_ft": 1.0}])


def test_pruning_trajectory_marks_the_finetuned_accuracy():
    from cka_analysis.figures import pruning_trajectory

    steps = [{"step": 0, "removed": None, "macs": 100, "params": 10, "accuracy": 95.0},
             {"step": 1, "removed": ["a"], "macs": 60, "params": 6, "accuracy": 70.0}]
    assert len(pruning_trajectory(steps).data) == 2
    fig = pruning_trajectory(steps, finetuned_accuracy=93.5)
    star = fig.data[-1]
    assert star.name == "after recovery" and list(star.x) == [1] and list(star.y) == [93.5]
