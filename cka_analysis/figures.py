"""Plotly figures for CKA matrices, block scores, robustness curves and pruning results.

Every function here is pure: it takes plain data (lists, dicts, numpy arrays or anything ``np.asarray``
accepts, CPU torch tensors included) or the project's typed records (the robustness curves take
:class:`~cka_analysis.robustness.RobustnessResult` records or their ``to_dict()`` form) and returns a
:class:`plotly.graph_objects.Figure`. Nothing imports streamlit or torch, so the same figures serve the dashboard,
the CLI's HTML export and the tests.

All figures share one look (:data:`TEMPLATE`, :data:`FONT`): white background, titles, and axis titles that
state their units. "MACs" are multiply-accumulate operations. Accuracies are percentages (0–100); ratios such
as a MACs reduction are fractions (0–1) on input and shown as percentages.

Inputs are validated and a bad argument raises :class:`~cka_analysis.errors.ConfigError` naming it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from scipy.stats import kendalltau

from .errors import ConfigError
from .robustness.results import CorruptionResult, RobustnessResult, as_results

__all__ = [
    "FONT",
    "TEMPLATE",
    "adjacent_similarity",
    "adversarial_curves",
    "cka_heatmap",
    "corruption_curves",
    "criteria_accuracy_curves",
    "format_count",
    "kendall_tau_b",
    "pareto",
    "pareto_front",
    "pruning_trajectory",
    "rank_agreement",
    "rank_agreement_heatmap",
    "rank_comparison",
    "score_bars",
]

TEMPLATE = "plotly_white"
"""The plotly template every figure uses."""

FONT = {"family": "Inter, 'Helvetica Neue', Helvetica, Arial, sans-serif", "size": 13, "color": "#222"}
"""Base font of every figure."""

PALETTE: tuple[str, ...] = tuple(qualitative.Plotly)
"""Colours for categorical series (models, criteria), in order."""

BAR_COLOUR = "#4C78A8"
HIGHLIGHT_COLOUR = "#E45756"
GREY = "#B0B0B0"
CKA_COLOURSCALE = "Viridis"
DIVERGING_COLOURSCALE = "RdBu"

_UNITS = ("", "K", "M", "G", "T", "P", "E")


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------


def format_count(n: float | None) -> str:
    """Format a count (MACs, parameters) with a decimal unit: ``853.0 K``, ``12.5 M``, ``4.1 G``.

    Values below 1000 are printed as they are (``512``, ``0.5``); ``None``, NaN and infinities give ``"n/a"``.
    Rounding never prints ``1000.0 K``: such a value moves to the next unit (``1.0 M``).
    """
    if n is None:
        return "n/a"
    try:
        value = float(n)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"format_count: n must be a number, got {n!r}") from exc
    if not math.isfinite(value):
        return "n/a"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if round(value, 1) < 1000:
        return f"{sign}{value:g}" if value == int(value) else f"{sign}{value:.1f}"
    k = 0
    while k < len(_UNITS) - 1 and round(value, 1) >= 1000:
        value /= 1000.0
        k += 1
    return f"{sign}{value:.1f} {_UNITS[k]}"


def _to_numpy(x: Any) -> np.ndarray:
    """np.asarray that also takes torch tensors which need detaching or moving to the CPU (duck-typed)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
    return np.asarray(x)


def _float_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """Convert ``x`` to a float array with ``ndim`` dimensions; ``None`` entries become NaN."""
    try:
        arr = _to_numpy(x)
        arr = arr.astype(float) if arr.dtype != object else np.array(arr.tolist(), dtype=float)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must hold numbers (None allowed for missing values): {exc}") from exc
    if arr.ndim != ndim:
        raise ConfigError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    return arr


def _names(names: Any, name: str) -> list[str]:
    """Validate a sequence of labels and return them as strings."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ConfigError(f"{name} must be a list of names, got {type(names).__name__}")
    out = [str(n) for n in names]
    if not out:
        raise ConfigError(f"{name} must not be empty")
    return out


def _number(value: Any, name: str, *, allow_none: bool = False) -> float:
    """A finite float (or NaN when ``value`` is None and allowed)."""
    if value is None:
        if allow_none:
            return math.nan
        raise ConfigError(f"{name} is missing (None); give a number")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number, got {value!r}") from exc
    if math.isnan(v) and allow_none:
        return v
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return v


def _apply_style(
    fig: go.Figure,
    title: str | None,
    *,
    subtitle: str | None = None,
    legend: bool = True,
    height: int | None = None,
) -> go.Figure:
    """Give ``fig`` the shared look: template, font, title (with optional subtitle), margins and legend."""
    title_dict: dict[str, Any] = {"text": title or "", "x": 0.02, "xanchor": "left", "font": {"size": 17}}
    if subtitle:
        title_dict["subtitle"] = {"text": subtitle, "font": {"size": 12, "color": "#555"}}
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        title=title_dict,
        hoverlabel={"font": {"family": FONT["family"], "size": 12}},
        margin={"l": 70, "r": 30, "t": 90 if subtitle else 70, "b": 60},
        showlegend=legend,
    )
    if legend:
        fig.update_layout(legend={"bgcolor": "rgba(255,255,255,0.8)", "borderwidth": 0})
    if height is not None:
        fig.update_layout(height=height)
    return fig


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _mapping(obj: Any, name: str) -> Mapping:
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{name} must be a dict, got {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------------------------------
# CKA matrices
# --------------------------------------------------------------------------------------------------------------


HEATMAP_SIZE = 600  # default side of the matrix in pixels: with labels and colour bar it fits the page of a
#                     1,280 px window beside the sidebar and fills most of a 1,400 px one
_MIN_TICK_PX = 13  # a tick label needs about this many pixels of axis to stay readable


def _tick_step(n: int, side_px: float) -> int:
    """Label every k-th cell so that labels are at least :data:`_MIN_TICK_PX` apart on a ``side_px`` axis."""
    return max(1, math.ceil(_MIN_TICK_PX * n / max(side_px, 1.0)))


def _ticks(names: list[str], side_px: float) -> tuple[list[int], list[str]]:
    step = _tick_step(len(names), side_px)
    idx = list(range(0, len(names), step))
    return idx, [names[i] for i in idx]


def _heatmap_inputs(matrix: Any, names_x: Any, names_y: Any, zmin: Any, zmax: Any, size: Any
                    ) -> tuple[np.ndarray, list[str], list[str], float, float]:
    """Validated (matrix, column names, row names, zmin, zmax) of :func:`cka_heatmap`."""
    nx = _names(names_x, "names_x")
    ny = nx if names_y is None else _names(names_y, "names_y")
    z = _float_array(matrix, "matrix", 2)
    if z.shape != (len(ny), len(nx)):
        raise ConfigError(
            f"matrix has shape {z.shape} but names_y/names_x give ({len(ny)}, {len(nx)}); "
            "matrix[i, j] must pair names_y[i] (row) with names_x[j] (column)"
        )
    lo, hi = _number(zmin, "zmin"), _number(zmax, "zmax")
    if not lo < hi:
        raise ConfigError(f"zmin must be below zmax, got zmin={lo}, zmax={hi}")
    if isinstance(size, bool) or not isinstance(size, int) or not 120 <= size <= 4000:
        raise ConfigError(f"size={size!r} must be the matrix side in pixels, an integer in [120, 4000]")
    return z, nx, ny, lo, hi


def _cka_cells(z: np.ndarray, nx: list[str], ny: list[str], zmin: float, zmax: float) -> go.Heatmap:
    """The heatmap trace: cells at integer positions (in order even if a name repeats across a model pair), NaN
    cells blank, and a hover that names both layers of every cell."""
    hover = [
        [
            f"row: {ny[i]}<br>column: {nx[j]}<br>CKA: {_fmt(z[i, j], 3)}"
            if math.isfinite(z[i, j])
            else f"row: {ny[i]}<br>column: {nx[j]}<br>CKA: n/a"
            for j in range(len(nx))
        ]
        for i in range(len(ny))
    ]
    return go.Heatmap(
        z=np.where(np.isfinite(z), z, np.nan).tolist(),
        x=list(range(len(nx))),
        y=list(range(len(ny))),
        zmin=zmin,
        zmax=zmax,
        zauto=False,
        colorscale=CKA_COLOURSCALE,
        colorbar={"title": {"text": "CKA"}, "thickness": 15, "x": 1.0, "xref": "paper", "xanchor": "left",
                  "xpad": 12, "len": 0.92, "lenmode": "fraction", "y": 0.46, "yanchor": "middle"},
        text=hover,
        hovertemplate="%{text}<extra></extra>",
        hoverongaps=True,
        xgap=0,
        ygap=0,
    )


def _square_axes(fig: go.Figure, nx: list[str], ny: list[str], plot_w: float, plot_h: float, cell: float
                 ) -> list[str]:
    """Axes of square cells with every k-th layer labelled (see :func:`_ticks`); returns the labels shown."""
    tick_font = {"size": 11 if cell >= 16 else 9}
    tx, tx_text = _ticks(nx, plot_w)
    ty, ty_text = _ticks(ny, plot_h)
    fig.update_xaxes(
        title={"text": "layer (column j)"},
        tickmode="array",
        tickvals=tx,
        ticktext=tx_text,
        tickangle=-45,
        tickfont=tick_font,
        showgrid=False,
        zeroline=False,
        constrain="domain",
        range=[-0.5, len(nx) - 0.5],
    )
    fig.update_yaxes(
        title={"text": "layer (row i)"},
        tickmode="array",
        tickvals=ty,
        ticktext=ty_text,
        tickfont=tick_font,
        showgrid=False,
        zeroline=False,
        autorange=False,
        range=[-0.5, len(ny) - 0.5],
        scaleanchor="x",
        scaleratio=1,
        constrain="domain",
        constraintoward="top",  # if a narrow page squeezes the figure, the matrix stays under its title
    )
    return [*tx_text, *ty_text]


def _fit_to_matrix(fig: go.Figure, plot_w: float, plot_h: float, labels: list[str]) -> None:
    """Size the figure so that the plot area is exactly ``plot_w`` × ``plot_h`` px: margins for the longest tick
    label on the left and bottom, and for the colour bar (15 px, its labels and title) on the right."""
    colorbar_px = 90
    label_px = 7 * max(len(t) for t in labels) if labels else 40
    margin = {"l": 40 + label_px, "r": colorbar_px, "t": 70, "b": 50 + int(label_px * 0.75)}
    fig.update_layout(
        margin=margin,
        width=round(plot_w + margin["l"] + margin["r"]),
        height=round(plot_h + margin["t"] + margin["b"]),
        autosize=False,
    )


def cka_heatmap(
    matrix: Any,
    names_x: Sequence[str],
    names_y: Sequence[str] | None = None,
    *,
    title: str = "CKA",
    zmin: float = 0.0,
    zmax: float = 1.0,
    size: int = HEATMAP_SIZE,
) -> go.Figure:
    """Heatmap of a layer-by-layer CKA matrix with square cells and the colour bar right beside it.

    ``matrix[i, j]`` is the CKA between layer ``names_y[i]`` (row, y axis) and layer ``names_x[j]`` (column,
    x axis); ``names_y`` defaults to ``names_x``. The matrix may be non-square (model A's layers against model
    B's). The colour scale is fixed to ``[zmin, zmax]`` (0–1) so that figures are comparable; the first
    layers sit at the bottom-left corner; NaN cells are blank and their hover reads "n/a".

    ``size`` is the longer side of the matrix in pixels: the figure's width and height are set so that the
    plot area is exactly the matrix (cells square) and the colour bar sits just right of it. Show it at its own
    width (Streamlit: ``width="content"``); stretching it to a wider container would move the colour bar away.
    With many layers (ResNet-110) only every k-th tick is labelled so labels stay readable; the hover text of
    every cell names both layers exactly.
    """
    z, nx, ny, zmin, zmax = _heatmap_inputs(matrix, names_x, names_y, zmin, zmax, size)
    # Square cells: the plot area is cell × columns wide and cell × rows high.
    cell = size / max(len(nx), len(ny))
    plot_w, plot_h = cell * len(nx), cell * len(ny)
    fig = go.Figure(_cka_cells(z, nx, ny, zmin, zmax))
    labels = _square_axes(fig, nx, ny, plot_w, plot_h, cell)
    _apply_style(fig, title, legend=False)
    _fit_to_matrix(fig, plot_w, plot_h, labels)
    return fig


def adjacent_similarity(
    matrix: Any, names: Sequence[str], *, title: str = "CKA between consecutive layers"
) -> go.Figure:
    """Line plot of the CKA between each layer and the next (``matrix[i, i + 1]``).

    High values mean the second layer barely changes the representation: a hint that the block in between
    could go. ``matrix`` must be square with one row per name; the y axis spans 0–1.
    """
    labels = _names(names, "names")
    z = _float_array(matrix, "matrix", 2)
    if z.shape != (len(labels), len(labels)):
        raise ConfigError(
            f"matrix must be square with one row per name: shape {z.shape}, {len(labels)} names"
        )
    if len(labels) < 2:
        raise ConfigError("names must hold at least two layers to compare consecutive ones")
    values = np.array([z[i, i + 1] for i in range(len(labels) - 1)], dtype=float)
    pairs = [f"{labels[i]} → {labels[i + 1]}" for i in range(len(labels) - 1)]
    hover = [f"{p}<br>CKA: {_fmt(v, 3)}" for p, v in zip(pairs, values, strict=True)]
    fig = go.Figure(
        go.Scatter(
            x=pairs,
            y=[v if math.isfinite(v) else None for v in values],
            mode="lines+markers",
            line={"color": BAR_COLOUR, "width": 2},
            marker={"size": 7},
            text=hover,
            hovertemplate="%{text}<extra></extra>",
            connectgaps=False,
            cliponaxis=False,
            name="CKA",
        )
    )
    fig.update_xaxes(title={"text": "consecutive layer pair"}, tickangle=-45, type="category")
    fig.update_yaxes(title={"text": "CKA (0–1)"}, range=[0.0, 1.0], autorange=False)
    return _apply_style(fig, title, legend=False)


# --------------------------------------------------------------------------------------------------------------
# block scores and rankings
# --------------------------------------------------------------------------------------------------------------


def _ranks(values: np.ndarray) -> np.ndarray:
    """Competition ranks (1 = lowest value; ties share the smallest rank); NaN stays NaN."""
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    v = values[finite]
    # rank = 1 + number of strictly smaller values
    out[finite] = 1 + (v[None, :] < v[:, None]).sum(axis=1)
    return out


def _score_bar_inputs(names: Any, scores: Any, removable: Any, reasons: Any, highlight: Any
                      ) -> tuple[list[str], np.ndarray, list[bool], list[str | None], set[str]]:
    """Validated (labels, scores, removable flags, reasons, highlighted names) of :func:`score_bars`."""
    labels = _names(names, "names")
    n = len(labels)
    if len(set(labels)) != n:
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        raise ConfigError(f"names must be unique block names; repeated: {dupes}")
    s = _float_array(scores, "scores", 1)
    if len(s) != n:
        raise ConfigError(f"scores has {len(s)} values but names has {n}; give one score per block")
    if np.isinf(s).any():
        raise ConfigError("scores must be finite numbers or None/NaN for missing ones")
    if removable is None:
        rem = [True] * n
    else:
        if isinstance(removable, (str, bytes)):
            raise ConfigError("removable must be a list of booleans")
        rem = [bool(r) for r in _to_numpy(removable).reshape(-1).tolist()]
        if len(rem) != n:
            raise ConfigError(f"removable has {len(rem)} values but names has {n}; give one flag per block")
    if reasons is None:
        why: list[str | None] = [None] * n
    else:
        if isinstance(reasons, (str, bytes)):
            raise ConfigError("reasons must be a list with one entry (text or None) per block")
        why = [None if r is None else str(r) for r in reasons]
        if len(why) != n:
            raise ConfigError(f"reasons has {len(why)} entries but names has {n}; give one per block")
    chosen: set[str] = set()
    if highlight is not None:
        if isinstance(highlight, (str, bytes)):
            highlight = [highlight]
        chosen = {str(h) for h in highlight}
        unknown = sorted(chosen - set(labels))
        if unknown:
            raise ConfigError(f"highlight names blocks that are not in names: {unknown}")
    return labels, s, rem, why, chosen


def _add_score_group(fig: go.Figure, group: str, idx: list[int], labels: list[str], s: np.ndarray,
                     rem: list[bool], ranks: np.ndarray, hover: Any) -> None:
    """One legend group of :func:`score_bars`: bars for scored blocks, axis markers for blocks without a score."""
    colour = {"removable": BAR_COLOUR, "selected": HIGHLIGHT_COLOUR, "not removable": GREY}[group]
    bar_idx = [i for i in idx if math.isfinite(s[i])]
    if bar_idx:
        fig.add_trace(
            go.Bar(
                x=[labels[i] for i in bar_idx],
                y=[float(s[i]) for i in bar_idx],
                name=group,
                legendgroup=group,
                marker={"color": colour, "line": {"width": 0}},
                text=[hover(i) for i in bar_idx],
                textposition="none",
                hovertemplate="%{text}<extra></extra>",
                customdata=[None if not math.isfinite(ranks[i]) else int(ranks[i]) for i in bar_idx],
            )
        )
    missing = [i for i in idx if not math.isfinite(s[i])]
    if missing:
        fig.add_trace(
            go.Scatter(
                x=[labels[i] for i in missing],
                y=[0.0] * len(missing),
                mode="markers+text",
                name=f"{group} (no score)",
                legendgroup=group,
                marker={"symbol": "x-thin-open", "size": 11, "color": colour, "line": {"width": 2}},
                text=["not removable" if not rem[i] else "no score" for i in missing],
                textposition="top center",
                textfont={"size": 10, "color": "#777"},
                hovertext=[hover(i) for i in missing],
                hovertemplate="%{hovertext}<extra></extra>",
                cliponaxis=False,
            )
        )


def score_bars(
    names: Sequence[str],
    scores: Sequence[float | None] | Any,
    *,
    removable: Sequence[bool] | None = None,
    reasons: Sequence[str | None] | None = None,
    highlight: Iterable[str] | None = None,
    criterion: str = "cka",
    title: str | None = None,
) -> go.Figure:
    """Bar chart of per-block removal scores in forward order (lower score = safer to remove).

    ``removable[i]`` False greys block ``i`` out; its hover shows ``reasons[i]``. A non-removable block may
    have no score (None/NaN): it then gets a grey "not removable" marker on the axis instead of a bar.
    Blocks named in ``highlight`` (e.g. those selected for removal) are drawn in a distinct colour. The hover
    gives each removable block's rank (1 = safest, ties share a rank).
    """
    labels, s, rem, why, chosen = _score_bar_inputs(names, scores, removable, reasons, highlight)
    n = len(labels)
    ranks = _ranks(np.where(np.array(rem, dtype=bool), s, np.nan))
    n_ranked = int(np.isfinite(ranks).sum())

    def hover(i: int) -> str:
        lines = [f"<b>{labels[i]}</b>", f"{criterion} score: {_fmt(s[i], 4)}"]
        if rem[i]:
            if math.isfinite(ranks[i]):
                lines.append(f"rank: {int(ranks[i])} of {n_ranked} (1 = safest to remove)")
            else:
                lines.append("rank: n/a (no score)")
            if labels[i] in chosen:
                lines.append("selected")
        else:
            lines.append(f"not removable: {why[i] or 'no reason given'}")
        return "<br>".join(lines)

    groups = {
        "removable": [i for i in range(n) if rem[i] and labels[i] not in chosen],
        "selected": [i for i in range(n) if rem[i] and labels[i] in chosen],
        "not removable": [i for i in range(n) if not rem[i]],
    }
    fig = go.Figure()
    for group, idx in groups.items():
        _add_score_group(fig, group, idx, labels, s, rem, ranks, hover)
    fig.update_layout(barmode="overlay", bargap=0.25)
    fig.update_xaxes(
        title={"text": "block (forward order)"},
        type="category",
        categoryorder="array",
        categoryarray=labels,
        tickangle=-45,
    )
    fig.update_yaxes(title={"text": f"{criterion} score (lower = safer to remove)"}, zeroline=True)
    return _apply_style(
        fig,
        title or f"Block removal scores ({criterion})",
        subtitle="lower score = safer to remove; grey = cannot be removed",
    )


def _criterion_scores(scores_by_criterion: Any) -> dict[str, dict[str, float]]:
    """Validate ``{criterion: {block: score}}`` and return it with float scores (None becomes NaN)."""
    outer = _mapping(scores_by_criterion, "scores_by_criterion")
    if not outer:
        raise ConfigError("scores_by_criterion is empty; give at least one criterion's scores")
    out: dict[str, dict[str, float]] = {}
    for crit, per_block in outer.items():
        inner = _mapping(per_block, f"scores_by_criterion[{crit!r}]")
        out[str(crit)] = {
            str(b): _number(v, f"scores_by_criterion[{crit!r}][{b!r}]", allow_none=True)
            for b, v in inner.items()
        }
    return out


def kendall_tau_b(x: Any, y: Any) -> float:
    """Kendall's tau-b between two equally long score vectors, ties handled; NaN when undefined.

    ``scipy.stats.kendalltau`` (variant b): (concordant − discordant) / sqrt(pairs not tied in x · pairs not tied
    in y). It is undefined (NaN) with fewer than two values or when one vector is constant.
    """

    a, b = _float_array(x, "x", 1), _float_array(y, "y", 1)
    if a.shape != b.shape:
        raise ConfigError(f"x and y must have the same length, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ConfigError("x and y must be finite; drop missing values first")
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan  # undefined; checked here because scipy warns about constant input
    return float(kendalltau(a, b, variant="b").statistic)


def rank_agreement(scores_by_criterion: Mapping[str, Mapping[str, float]]) -> dict[tuple[str, str], float]:
    """Kendall's tau-b between every pair of criteria over the blocks both of them scored.

    Keys are ``(a, b)`` with ``a`` before ``b`` in the dict's order (one entry per unordered pair). Blocks with
    a missing (None/NaN) score in either criterion are left out; a pair with fewer than two shared blocks, or
    where one criterion gives all shared blocks the same score, gets NaN. All criteria are assumed to score
    in the same direction (lower = safer to remove), so 1 means identical orderings and −1 reversed ones.
    """
    scores = _criterion_scores(scores_by_criterion)
    out: dict[tuple[str, str], float] = {}
    for a, b in itertools.combinations(scores, 2):
        shared = [
            blk
            for blk in scores[a]
            if blk in scores[b] and math.isfinite(scores[a][blk]) and math.isfinite(scores[b][blk])
        ]
        xa = np.array([scores[a][blk] for blk in shared], dtype=float)
        xb = np.array([scores[b][blk] for blk in shared], dtype=float)
        out[(a, b)] = kendall_tau_b(xa, xb)
    return out


def rank_comparison(
    scores_by_criterion: Mapping[str, Mapping[str, float]], *, title: str | None = None
) -> go.Figure:
    """Heatmap of block ranks (1 = safest to remove) under each criterion: blocks as rows, criteria as columns.

    Blocks appear in the order first met across the criteria (forward order when the dicts are in forward
    order), first block on top. Ranks are competition ranks among a criterion's scored blocks; unscored blocks
    are blank ("n/a").
    """
    scores = _criterion_scores(scores_by_criterion)
    crits = list(scores)
    blocks: list[str] = list(dict.fromkeys(b for c in crits for b in scores[c]))
    if not blocks:
        raise ConfigError("scores_by_criterion holds no block scores")
    values = np.array([[scores[c].get(b, math.nan) for c in crits] for b in blocks], dtype=float)
    ranks = np.column_stack([_ranks(values[:, j]) for j in range(len(crits))])
    counts = np.isfinite(ranks).sum(axis=0)
    hover = [
        [
            f"<b>{blocks[i]}</b><br>criterion: {crits[j]}<br>"
            + (
                f"rank: {int(ranks[i, j])} of {int(counts[j])}<br>score: {_fmt(values[i, j], 4)}"
                if math.isfinite(ranks[i, j])
                else "rank: n/a"
            )
            for j in range(len(crits))
        ]
        for i in range(len(blocks))
    ]
    cell_text = [["" if not math.isfinite(r) else str(int(r)) for r in row] for row in ranks]
    max_rank = max(float(np.nanmax(ranks)) if np.isfinite(ranks).any() else 1.0, 2.0)
    fig = go.Figure(
        go.Heatmap(
            z=[[None if not math.isfinite(r) else float(r) for r in row] for row in ranks],
            x=crits,
            y=blocks,
            zmin=1.0,
            zmax=max_rank,
            colorscale=CKA_COLOURSCALE,
            reversescale=True,
            colorbar={"title": {"text": "rank"}, "thickness": 15},
            text=cell_text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            hoverongaps=True,
            xgap=1,
            ygap=1,
        )
    )
    fig.update_xaxes(title={"text": "criterion"}, type="category", showgrid=False)
    fig.update_yaxes(
        title={"text": "block (forward order)"}, type="category", autorange="reversed", showgrid=False
    )
    height = int(min(1400, max(360, 120 + 24 * len(blocks))))
    return _apply_style(
        fig,
        title or "Block ranks per criterion",
        subtitle="rank 1 = safest to remove under that criterion",
        legend=False,
        height=height,
    )


def rank_agreement_heatmap(
    scores_by_criterion: Mapping[str, Mapping[str, float]], *, title: str | None = None
) -> go.Figure:
    """Symmetric heatmap of Kendall's tau-b between criteria (see :func:`rank_agreement`), scale −1..1."""
    scores = _criterion_scores(scores_by_criterion)
    crits = list(scores)
    tau = rank_agreement(scores)
    k = len(crits)
    m = np.eye(k)
    for (a, b), t in tau.items():
        i, j = crits.index(a), crits.index(b)
        m[i, j] = m[j, i] = t
    text = [[_fmt(v, 2) for v in row] for row in m]
    hover = [
        [f"{crits[i]} vs {crits[j]}<br>Kendall τ-b: {_fmt(m[i, j], 3)}" for j in range(k)] for i in range(k)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=[[None if not math.isfinite(v) else float(v) for v in row] for row in m],
            x=crits,
            y=crits,
            zmin=-1.0,
            zmax=1.0,
            zmid=0.0,
            colorscale=DIVERGING_COLOURSCALE,
            colorbar={"title": {"text": "Kendall τ-b"}, "thickness": 15},
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            hoverongaps=True,
            xgap=1,
            ygap=1,
        )
    )
    fig.update_xaxes(title={"text": "criterion"}, type="category", showgrid=False, constrain="domain")
    fig.update_yaxes(
        title={"text": "criterion"},
        type="category",
        autorange="reversed",
        showgrid=False,
        scaleanchor="x",
        constrain="domain",
    )
    return _apply_style(
        fig,
        title or "Agreement between criteria",
        subtitle="Kendall's τ-b of block rankings: 1 = same order, −1 = reversed",
        legend=False,
        height=int(min(900, max(380, 160 + 60 * k))),
    )


# --------------------------------------------------------------------------------------------------------------
# robustness curves
# --------------------------------------------------------------------------------------------------------------

def _eps_label(eps: float) -> str:
    """ε in /255 units: ``0``, ``2/255``, ``0.5/255``."""
    k = eps * 255.0
    if abs(k) < 1e-9:
        return "0"
    r = round(k)
    text = str(int(r)) if abs(k - r) < 1e-3 else f"{k:.3g}"
    return f"{text}/255"


def _robustness_records(results: Any) -> dict[str, RobustnessResult]:
    """``{label: RobustnessResult}`` from records or their ``to_dict()`` form; ConfigError when empty."""
    if not isinstance(results, Mapping) or not results:
        raise ConfigError("results is empty; give at least one model's robustness result (label → RobustnessResult)")
    return as_results(results)


def adversarial_curves(
    results: Mapping[str, RobustnessResult | Mapping[str, Any]],
    *,
    attack_names: Sequence[str] = ("fgsm", "pgd"),
    title: str = "Adversarial robustness",
) -> go.Figure:
    """Accuracy (%) against attack strength ε for several models, one panel per attack.

    ``results[label]`` is a :class:`~cka_analysis.robustness.RobustnessResult` (or its ``to_dict()`` form, e.g.
    read back from JSON); models without a requested attack are left out of its panel. ε is in pixel units of
    [0, 1]; the x axis is in /255 units with tick labels like "2/255". A model keeps its colour across panels.
    """
    records = _robustness_records(results)
    if isinstance(attack_names, (str, bytes)):
        attack_names = (attack_names,)
    attacks = [str(a) for a in attack_names]
    if not attacks:
        raise ConfigError("attack_names must name at least one attack")
    known = {k for rec in records.values() for k in rec.kinds}
    if not known & set(attacks):
        raise ConfigError(f"no model has results for attack_names {attacks}; measured: {sorted(known)}")

    fig = make_subplots(rows=1, cols=len(attacks), subplot_titles=[a.upper() for a in attacks],
                        shared_yaxes=True, horizontal_spacing=0.06)
    all_eps: list[set[float]] = [set() for _ in attacks]
    for m_idx, (model, rec) in enumerate(records.items()):
        shown = False
        for a_idx, attack in enumerate(attacks):
            curve = getattr(rec, attack, None) if attack in ("fgsm", "pgd") else None
            if curve is None:
                continue
            pts = sorted(curve.points())
            all_eps[a_idx].update(round(e * 255.0, 6) for e, _ in pts)
            fig.add_trace(
                go.Scatter(
                    x=[e * 255.0 for e, _ in pts],
                    y=[acc for _, acc in pts],
                    mode="lines+markers",
                    name=model,
                    legendgroup=model,
                    showlegend=not shown,
                    line={"color": _colour(m_idx), "width": 2},
                    marker={"size": 7},
                    text=[f"<b>{model}</b><br>{attack.upper()} ε = {_eps_label(e)} ({e:.4f})<br>accuracy: "
                          f"{_fmt(acc, 2)} %" for e, acc in pts],
                    hovertemplate="%{text}<extra></extra>",
                ),
                row=1,
                col=a_idx + 1,
            )
            shown = True
    for a_idx, eps_set in enumerate(all_eps):
        ticks = sorted(eps_set)
        fig.update_xaxes(title={"text": "ε (in /255 units)"}, tickmode="array", tickvals=ticks,
                         ticktext=[_eps_label(t / 255.0) for t in ticks], row=1, col=a_idx + 1)
    fig.update_yaxes(range=[0, 100], autorange=False)
    fig.update_yaxes(title={"text": "top-1 accuracy (%)"}, row=1, col=1)
    return _apply_style(fig, title, subtitle="accuracy under attack; ε is the L∞ perturbation budget")


def _corruption_record(value: Any, model: str) -> CorruptionResult:
    """The corruption part of a robustness record, a CorruptionResult, or either one's dict form."""
    if isinstance(value, CorruptionResult):
        return value
    if isinstance(value, Mapping) and "clean_accuracy" not in value:
        return CorruptionResult.from_dict(value)
    corr = RobustnessResult.from_dict(value).corruptions
    if corr is None:
        raise ConfigError(f"results[{model!r}] has no corruption accuracy; evaluate it with kinds including "
                          "'corruptions'")
    return corr


def corruption_curves(
    results: Mapping[str, RobustnessResult | CorruptionResult | Mapping[str, Any]],
    *,
    title: str = "Robustness to corruptions",
) -> go.Figure:
    """Mean accuracy (%) over the corruption types against severity 1–5, one line per model.

    ``results[label]`` is a :class:`~cka_analysis.robustness.RobustnessResult` with corruptions, a
    :class:`~cka_analysis.robustness.CorruptionResult`, or the ``to_dict()`` form of either.
    """
    if not isinstance(results, Mapping) or not results:
        raise ConfigError("results is empty; give at least one model's corruption results")
    fig = go.Figure()
    for m_idx, (model, value) in enumerate(results.items()):
        corr = _corruption_record(value, str(model))
        pts = sorted(zip(corr.severities, corr.mean_per_severity(), strict=True))
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                mode="lines+markers",
                name=str(model),
                line={"color": _colour(m_idx), "width": 2},
                marker={"size": 7},
                text=[f"<b>{model}</b><br>severity {p[0]}<br>mean accuracy over {len(corr.corruptions)} "
                      f"corruptions: {_fmt(p[1], 2)} %" for p in pts],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.update_xaxes(
        title={"text": "corruption severity"}, tickmode="array", tickvals=[1, 2, 3, 4, 5], range=[0.8, 5.2]
    )
    fig.update_yaxes(
        title={"text": "mean top-1 accuracy over corruptions (%)"}, range=[0, 100], autorange=False
    )
    return _apply_style(fig, title)


# --------------------------------------------------------------------------------------------------------------
# pruning results
# --------------------------------------------------------------------------------------------------------------


def _check_points(points: Any) -> list[dict]:
    if isinstance(points, Mapping) or not isinstance(points, Sequence):
        raise ConfigError("points must be a list of dicts with keys label, macs, accuracy")
    out = []
    for i, p in enumerate(points):
        p = _mapping(p, f"points[{i}]")
        missing = [k for k in ("label", "macs", "accuracy") if k not in p]
        if missing:
            raise ConfigError(f"points[{i}] lacks {missing}; each point needs label, macs and accuracy")
        macs = _number(p["macs"], f"points[{i}]['macs']")
        if macs < 0:
            raise ConfigError(f"points[{i}]['macs'] must be non-negative, got {macs}")
        acc = _number(p["accuracy"], f"points[{i}]['accuracy']", allow_none=True)
        out.append({**p, "macs": macs, "accuracy": acc})
    return out


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The points no other point beats: none has fewer-or-equal MACs with higher-or-equal accuracy (one strictly).

    Returned sorted by MACs ascending (so accuracy rises too). Points without accuracy (None/NaN) are left out;
    of exact duplicates (same MACs and accuracy) the first is kept. Returns copies with float macs/accuracy.
    """
    pts = [p for p in _check_points(points) if math.isfinite(p["accuracy"])]
    # Sort by MACs ascending, accuracy descending: a point is on the front iff its accuracy beats every
    # accuracy seen before it (all of which have fewer-or-equal MACs).
    order = sorted(range(len(pts)), key=lambda i: (pts[i]["macs"], -pts[i]["accuracy"], i))
    front: list[dict] = []
    best = -math.inf
    for i in order:
        if pts[i]["accuracy"] > best:
            front.append(pts[i])
            best = pts[i]["accuracy"]
    return front


def _pareto_hover(p: Mapping[str, Any], ref: float) -> str:
    """Hover text of one run: label, criterion, MACs (and their reduction vs ``ref``), params, accuracy."""
    lines = [f"<b>{p['label']}</b>"]
    if p.get("criterion") is not None:
        lines.append(f"criterion: {p['criterion']}")
    lines.append(f"MACs: {format_count(p['macs'])}")
    if ref > 0:
        lines.append(f"MACs reduction: {100.0 * (1.0 - p['macs'] / ref):.1f} %")
    lines.append(f"params: {format_count(p.get('params'))}")
    lines.append(f"accuracy: {_fmt(p['accuracy'], 2)} %")
    return "<br>".join(lines)


def _pareto_front_line(shown: list[dict], xval: Callable[[float], float], x: str) -> go.Scatter | None:
    """The Pareto front of ``shown`` as dashed steps in x coordinates ``xval(macs)``, extended to the costliest
    run so that it covers the whole x range; None without a front."""
    front = pareto_front(shown)
    if not front:
        return None
    fx = [xval(p["macs"]) for p in front]
    fy = [p["accuracy"] for p in front]
    max_macs = max(p["macs"] for p in shown)
    if max_macs > front[-1]["macs"]:
        fx.append(xval(max_macs))
        fy.append(fy[-1])
    if x == "reduction":
        fx, fy = fx[::-1], fy[::-1]
    return go.Scatter(
        x=fx,
        y=fy,
        mode="lines",
        name="Pareto front",
        line={"shape": "hv" if x == "macs" else "vh", "color": "#333", "width": 1.5, "dash": "dash"},
        hoverinfo="skip",
    )


def pareto(
    points: Sequence[Mapping[str, Any]],
    *,
    x: str = "macs",
    reference_macs: float | None = None,
    title: str = "Accuracy vs compute",
) -> go.Figure:
    """Scatter of accuracy (%) against MACs across runs, coloured by criterion, with the Pareto front as steps.

    Each point is ``{"label", "macs", "accuracy", "criterion"?, "params"?}``. With ``x="reduction"`` the x axis
    is the MACs reduction in % relative to ``reference_macs`` (default: the largest MACs among the points,
    i.e. the unpruned model). The front is the best accuracy reachable with at most that many MACs. Points
    without accuracy are not drawn; the subtitle counts them.
    """
    if x not in ("macs", "reduction"):
        raise ConfigError(f"x must be 'macs' or 'reduction', got {x!r}")
    pts = _check_points(points)
    if not pts:
        raise ConfigError("points is empty; give at least one run")
    shown = [p for p in pts if math.isfinite(p["accuracy"])]
    n_hidden = len(pts) - len(shown)
    ref = max(p["macs"] for p in pts) if reference_macs is None else _number(reference_macs, "reference_macs")
    if x == "reduction" and ref <= 0:
        raise ConfigError(f"reference_macs must be positive to compute a reduction, got {ref}")

    def xval(macs: float) -> float:
        return macs if x == "macs" else 100.0 * (1.0 - macs / ref)

    fig = go.Figure()
    groups: dict[str, list[dict]] = {}
    for p in shown:
        groups.setdefault("—" if p.get("criterion") is None else str(p["criterion"]), []).append(p)
    for g_idx, (crit, members) in enumerate(groups.items()):
        fig.add_trace(
            go.Scatter(
                x=[xval(p["macs"]) for p in members],
                y=[p["accuracy"] for p in members],
                mode="markers",
                name=crit if crit != "—" else "no criterion",
                marker={"size": 10, "color": _colour(g_idx), "line": {"width": 1, "color": "white"}},
                text=[_pareto_hover(p, ref) for p in members],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    front = _pareto_front_line(shown, xval, x)
    if front is not None:
        fig.add_trace(front)
    if x == "macs":
        fig.update_xaxes(title={"text": "MACs (multiply-accumulates)"}, tickformat="~s", rangemode="tozero")
    else:
        fig.update_xaxes(title={"text": f"MACs reduction (%) vs {format_count(ref)} MACs"}, ticksuffix=" %")
    fig.update_yaxes(title={"text": "top-1 accuracy (%)"})
    sub = "dashed steps: best accuracy for at most that many MACs"
    if n_hidden:
        sub += f"; {n_hidden} run(s) without accuracy not shown"
    return _apply_style(fig, title, subtitle=sub)


def _trajectory_rows(steps: Any) -> list[dict]:
    """Validated steps of :func:`pruning_trajectory` (step, removed, macs, params, accuracy; None → NaN), in
    step order; ConfigError for a missing key, a bad or repeated step number."""
    if isinstance(steps, Mapping) or not isinstance(steps, Sequence):
        raise ConfigError("steps must be a list of dicts with keys step, removed, macs, params, accuracy")
    if not steps:
        raise ConfigError("steps is empty; give at least the unpruned model as step 0")
    rows = []
    for i, s in enumerate(steps):
        s = _mapping(s, f"steps[{i}]")
        for key in ("step", "macs"):
            if key not in s:
                raise ConfigError(
                    f"steps[{i}] lacks {key!r}; each step needs step, removed, macs, params, accuracy"
                )
        step_f = _number(s["step"], f"steps[{i}]['step']")
        if step_f != int(step_f) or step_f < 0:
            raise ConfigError(f"steps[{i}]['step'] must be a non-negative integer, got {s['step']!r}")
        rows.append(
            {
                "step": int(step_f),
                "removed": s.get("removed"),
                "macs": _number(s["macs"], f"steps[{i}]['macs']"),
                "params": _number(s.get("params"), f"steps[{i}]['params']", allow_none=True),
                "accuracy": _number(s.get("accuracy"), f"steps[{i}]['accuracy']", allow_none=True),
            }
        )
    rows.sort(key=lambda r: r["step"])
    numbers = [r["step"] for r in rows]
    if len(set(numbers)) != len(numbers):
        raise ConfigError(f"steps repeats a step number: {numbers}")
    return rows


def _reference_macs(rows: list[dict], reference_macs: float | None) -> float:
    """The 100 % MACs: ``reference_macs``, else step 0's (ConfigError without step 0, or when not positive)."""
    if reference_macs is None:
        if rows[0]["step"] != 0:
            raise ConfigError("steps has no step 0 (the unpruned model); add it or pass reference_macs")
        ref = rows[0]["macs"]
    else:
        ref = _number(reference_macs, "reference_macs")
    if ref <= 0:
        raise ConfigError(f"reference MACs must be positive, got {ref}")
    return ref


def _step_hover(r: Mapping[str, Any], pct: float) -> str:
    """Hover text of one step: the block it removed, accuracy, MACs (``pct`` % of the original) and params."""
    removed = r["removed"]
    what = "original (nothing removed)" if r["step"] == 0 and removed is None else f"removed: {removed or 'n/a'}"
    return (
        f"<b>step {r['step']}</b><br>{what}<br>accuracy: {_fmt(r['accuracy'], 2)} %<br>"
        f"MACs: {format_count(r['macs'])} ({pct:.1f} % of original)<br>params: {format_count(r['params'])}"
    )


def _trajectory_axes(fig: go.Figure, rel: list[float]) -> None:
    """Step axis, accuracy on the left, MACs % on the right; both start at 0 with ticks every 20 % so that their
    grid lines coincide."""
    fig.update_xaxes(title={"text": "pruning step (0 = unpruned)"}, tickmode="linear", tick0=0, dtick=1)
    fig.update_yaxes(
        title={"text": "top-1 accuracy (%)"}, range=[0, 105], autorange=False, dtick=20, secondary_y=False
    )
    fig.update_yaxes(
        title={"text": "MACs (% of original)"},
        range=[0, max(105.0, max(rel) * 1.05)],
        autorange=False,
        dtick=20,
        ticksuffix=" %",
        showgrid=False,
        secondary_y=True,
    )


def pruning_trajectory(
    steps: Sequence[Mapping[str, Any]],
    *,
    reference_macs: float | None = None,
    finetuned_accuracy: float | None = None,
    title: str = "Pruning trajectory",
) -> go.Figure:
    """Accuracy (%, left axis) and MACs relative to the original (%, right axis) at each pruning step.

    ``finetuned_accuracy``: the accuracy after the final fine-tune, drawn as a separate marker at the last step
    (step accuracies are measured right after each removal).

    Each step is ``{"step", "removed", "macs", "params", "accuracy"}``; step 0 is the unpruned model and its
    MACs are the 100 % reference unless ``reference_macs`` is given. ``accuracy`` may be None (not evaluated:
    the accuracy line skips that step). The hover names the block removed at each step.
    """
    rows = _trajectory_rows(steps)
    ref = _reference_macs(rows, reference_macs)
    numbers = [r["step"] for r in rows]
    rel = [100.0 * r["macs"] / ref for r in rows]
    hover = [_step_hover(r, pct) for r, pct in zip(rows, rel, strict=True)]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=numbers,
            y=[None if not math.isfinite(r["accuracy"]) else r["accuracy"] for r in rows],
            mode="lines+markers",
            name="accuracy (%)",
            line={"color": BAR_COLOUR, "width": 2},
            marker={"size": 8},
            connectgaps=True,
            text=hover,
            hovertemplate="%{text}<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=numbers,
            y=rel,
            mode="lines+markers",
            name="MACs (% of original)",
            line={"color": HIGHLIGHT_COLOUR, "width": 2, "dash": "dot"},
            marker={"size": 7, "symbol": "square"},
            text=hover,
            hovertemplate="%{text}<extra></extra>",
        ),
        secondary_y=True,
    )
    if finetuned_accuracy is not None:
        acc_ft = _number(finetuned_accuracy, "finetuned_accuracy")
        fig.add_trace(
            go.Scatter(
                x=[numbers[-1]],
                y=[acc_ft],
                mode="markers",
                name="after recovery",
                marker={"color": BAR_COLOUR, "size": 14, "symbol": "star"},
                hovertemplate=f"<b>after recovery</b><br>accuracy: {_fmt(acc_ft, 2)} %<extra></extra>",
            ),
            secondary_y=False,
        )
    _trajectory_axes(fig, rel)
    fig.update_layout(hovermode="closest")
    return _apply_style(fig, title)


def _criteria_groups(rows: Any, y: str) -> dict[str, dict[Any, list[tuple[float, float, Any]]]]:
    """Validated rows grouped as ``{criterion: {target key: [(reduction, accuracy, seed), ...]}}``."""
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
        raise ConfigError(
            "rows must be a list of dicts with keys criterion, macs_reduction, acc_no_ft, acc_ft, seed"
        )
    if not rows:
        raise ConfigError("rows is empty; give at least one benchmark result")
    groups: dict[str, dict[Any, list[tuple[float, float, Any]]]] = {}
    for i, r in enumerate(rows):
        r = _mapping(r, f"rows[{i}]")
        for key in ("criterion", "macs_reduction", y):
            if key not in r:
                raise ConfigError(f"rows[{i}] lacks {key!r}")
        red = _number(r["macs_reduction"], f"rows[{i}]['macs_reduction']")
        if not -1e-9 <= red <= 1 + 1e-9:
            raise ConfigError(f"rows[{i}]['macs_reduction'] must be a fraction in 0–1, got {red}")
        acc = _number(r[y], f"rows[{i}][{y!r}]", allow_none=True)
        if not math.isfinite(acc):
            continue
        target = r.get("target")
        key = ("target", float(target)) if target is not None else ("achieved", round(red, 4))
        groups.setdefault(str(r["criterion"]), {}).setdefault(key, []).append((red, acc, r.get("seed")))
    if not groups:
        raise ConfigError(f"no row has a value for {y!r}; nothing to plot")
    return groups


def _criterion_points(crit: str, by_target: Mapping[Any, list[tuple[float, float, Any]]]
                      ) -> tuple[list[tuple[float, float, float, float, int, Any]], list[str]]:
    """Per target, sorted by reduction: (mean reduction %, mean accuracy, std, reduction std, seeds, key), and
    the hover text of each point."""
    stats = []
    for key, members in by_target.items():
        reds = np.array([m[0] for m in members]) * 100.0
        accs = np.array([m[1] for m in members])
        n = len(members)
        std = float(accs.std(ddof=1)) if n > 1 else 0.0
        red_std = float(reds.std(ddof=1)) if n > 1 else 0.0
        stats.append((float(reds.mean()), float(accs.mean()), std, red_std, n, key))
    stats.sort(key=lambda s: s[0])
    hover = []
    for mx, my, sd, rsd, n, key in stats:
        target_txt = (
            f"target {100 * key[1]:.1f} %<br>"
            if key[0] == "target" and key[1] <= 1
            else (f"target {key[1]:g}<br>" if key[0] == "target" else "")
        )
        spread = f" ± {sd:.2f}" if n > 1 else ""
        red_spread = f" ± {rsd:.1f}" if n > 1 else ""
        hover.append(
            f"<b>{crit}</b><br>{target_txt}MACs reduction: {mx:.1f}{red_spread} %<br>"
            f"accuracy: {my:.2f}{spread} %<br>seeds: {n}"
        )
    return stats, hover


def criteria_accuracy_curves(
    rows: Sequence[Mapping[str, Any]], *, y: str = "acc_ft", title: str | None = None
) -> go.Figure:
    """Accuracy (%) against achieved MACs reduction (%) with one line per criterion, seeds averaged.

    Each row is ``{"criterion", "macs_reduction" (0–1), "acc_no_ft", "acc_ft", "seed", "target"?}``; ``y``
    picks ``"acc_ft"`` (after fine-tuning) or ``"acc_no_ft"``. Rows of one criterion and one target (the
    ``target`` key, or the same achieved reduction when there is none) are averaged across seeds; the error
    bars show the sample standard deviation (none for a single seed). Rows whose ``y`` is None are skipped.
    """
    if y not in ("acc_ft", "acc_no_ft"):
        raise ConfigError(f"y must be 'acc_ft' or 'acc_no_ft', got {y!r}")
    groups = _criteria_groups(rows, y)
    fig = go.Figure()
    for c_idx, (crit, by_target) in enumerate(groups.items()):
        stats, hover = _criterion_points(crit, by_target)
        any_spread = any(s[4] > 1 for s in stats)
        fig.add_trace(
            go.Scatter(
                x=[s[0] for s in stats],
                y=[s[1] for s in stats],
                error_y={
                    "type": "data",
                    "array": [s[2] for s in stats],
                    "visible": any_spread,
                    "thickness": 1.2,
                },
                mode="lines+markers",
                name=crit,
                line={"color": _colour(c_idx), "width": 2},
                marker={"size": 8},
                text=hover,
                hovertemplate="%{text}<extra></extra>",
            )
        )
    which = "after fine-tuning" if y == "acc_ft" else "without fine-tuning"
    fig.update_xaxes(title={"text": "achieved MACs reduction (%)"}, ticksuffix=" %", rangemode="tozero")
    fig.update_yaxes(title={"text": f"top-1 accuracy {which} (%)"})
    return _apply_style(
        fig,
        title or f"Accuracy {which} vs MACs reduction",
        subtitle="mean over seeds; error bars = standard deviation across seeds",
    )
