"""Names and descriptions the command line and the dashboard offer as choices, kept free of heavy imports so that
``cka-prune --help`` and ``--version`` answer at once (the modules that implement them re-export these).

The removal criteria are declared once, here, as :class:`CriterionInfo` records: name, one-line description,
whether they need calibration images and whether they need labels. The scoring code
(:mod:`cka_analysis.scoring`) implements each one under the same name; the CLI's choices and help, the dashboard's
help texts and the benchmarks all read :data:`CRITERION_INFO`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

__all__ = [
    "CRITERIA",
    "CRITERION_INFO",
    "DASHBOARD_CALIBRATION_IMAGES",
    "DATA_FREE_CRITERIA",
    "DEFAULT_CALIBRATION_IMAGES",
    "ROBUSTNESS_KINDS",
    "CriterionInfo",
    "criterion_info",
    "parse_reduction",
    "plan_advice",
]


@dataclass(frozen=True)
class CriterionInfo:
    """What a removal criterion is, without its implementation (no torch import needed).

    Attributes:
        name: the value of ``--criterion`` / ``score_blocks(criterion=...)``.
        description: one line for help texts: what the score measures (lower = safer to remove, always).
        needs_data: whether calibration images are needed (``random`` and ``weight_norm`` read only the weights).
        needs_labels: whether the calibration labels matter (loss-based criteria); the others only use images.
    """

    name: str
    description: str
    needs_data: bool
    needs_labels: bool


_INFOS = (
    CriterionInfo("cka", "the paper's criterion: 1 − linear CKA between the final features with and without the "
                  "block (optionally debiased)", needs_data=True, needs_labels=False),
    CriterionInfo("random", "seeded random numbers: the floor every criterion must beat",
                  needs_data=False, needs_labels=False),
    CriterionInfo("weight_norm", "mean |w| of the block's conv/linear weights (data-free)",
                  needs_data=False, needs_labels=False),
    CriterionInfo("block_influence", "1 − cosine similarity of the block's pooled input and output (ShortGPT)",
                  needs_data=True, needs_labels=False),
    CriterionInfo("angular", "angle between the block's pooled input and output, arccos(cos)/π (Gromov et al.)",
                  needs_data=True, needs_labels=False),
    CriterionInfo("taylor", "first-order estimate of the loss change when the block goes (one backward pass)",
                  needs_data=True, needs_labels=True),
    CriterionInfo("loss", "oracle: increase of the calibration cross-entropy when the block is removed",
                  needs_data=True, needs_labels=True),
    CriterionInfo("cka_capacity", "capacity-aware CKA, aimed at the network after recovery: the cka score times "
                  "(block parameters / mean removable block parameters)^capacity_weight, so that among blocks of "
                  "equal MACs the small, low-score ones go first and the weights that long recovery needs stay",
                  needs_data=True, needs_labels=False),
)

#: Every removal criterion by name, in the order help texts list them (the paper's ``"cka"`` first); read-only.
CRITERION_INFO: Mapping[str, CriterionInfo] = MappingProxyType({c.name: c for c in _INFOS})
#: Removal criteria of :func:`cka_analysis.scoring.score_blocks`; ``"cka"`` is the paper's.
CRITERIA: tuple[str, ...] = tuple(CRITERION_INFO)
#: Criteria that read only the weights: no calibration images, ``samples == 0`` in their scores.
DATA_FREE_CRITERIA: tuple[str, ...] = tuple(c.name for c in _INFOS if not c.needs_data)
#: The knob of ``cka_capacity``: the exponent of the parameter ratio (0 = plain ``cka``).
DEFAULT_CAPACITY_WEIGHT = 1.0
#: From this fraction of MACs removed on, a cut is "deep": the blocks kept decide the accuracy after recovery, and
#: the CLI and the dashboard say which plan is recommended there (:func:`plan_advice`). 50 %: on ResNet-56 at
#: −52.6 % ``cka_capacity`` led ``cka`` by 1.4 points on the validation split with both of two seeds.
DEEP_TARGET = 0.5
#: The criterion recommended for deep cuts (chosen on the validation split, ``benchmarks/deep.py``).
DEEP_CRITERION = "cka_capacity"
#: The measured plans behind the recommendation: written by ``python -m benchmarks.deep --write`` from its rows
#: (``benchmarks/results/deep.json``), shipped inside the package; never typed in by hand.
DEEP_EVIDENCE_FILE = Path(__file__).resolve().parent / "data_files" / "deep_plans.json"


def load_deep_evidence(path: str | Path = DEEP_EVIDENCE_FILE) -> dict[str, Any]:
    """The deep benchmark's plan groups (``{"groups": [...]}``, each with its split, target, recovery, MACs
    reduction, evaluation images and per-plan mean accuracy, seeds and parameters kept); empty groups when the file
    is missing (the advice then gives no numbers)."""
    p = Path(path)
    return json.loads(p.read_text()) if p.is_file() else {"groups": []}


def deep_reason(evidence: Mapping[str, Any]) -> str:
    """Why :data:`DEEP_CRITERION` is recommended, in words and with the numbers of the deepest validation group
    after ``standard`` recovery in ``evidence`` (:func:`load_deep_evidence`): the plans' accuracies and the
    parameters each keeps, best first, random blocks' mean ± sd, then the shallower validation groups' plans in
    brief, and one accuracy's standard error."""
    groups = [g for g in evidence.get("groups", []) if g["split"] == "validation" and g["recovery"] == "standard"]
    text = "deep cuts: the accuracy after recovery follows the weights kept"
    if not groups:
        return text
    g = max(groups, key=lambda g: g["macs_reduction"])
    plans = sorted(g["plans"].items(), key=lambda kv: -kv[1]["acc"])
    seeds = {p["seeds"] for o in groups for p in o["plans"].values()}
    runs = "one run per plan" if seeds == {1} else "the mean where a plan ran with several seeds"
    first, *rest = plans
    parts = ", ".join([f"{first[0]} recovered to {first[1]['acc']:.2f} % ({100 * first[1]['params_kept']:.0f} % of "
                       "the parameters kept)",
                       *(f"{name}'s to {p['acc']:.2f} % ({100 * p['params_kept']:.0f} %)" for name, p in rest)])
    rand = g.get("random")
    spread = f" ± {rand['sd']:.2f}" if rand and rand.get("sd") is not None else ""
    draws = f"{rand['seeds']} seeds" if rand and rand["seeds"] > 1 else "one seed"
    rand_text = f", random blocks to {rand['acc']:.2f}{spread} % ({draws})" if rand else ""
    shallower = "".join(
        f"; at −{100 * o['macs_reduction']:.1f} %: " + ", ".join(
            f"{name} {p['acc']:.2f} %" + (f" ({p['seeds']} seeds)" if p["seeds"] > 1 else "")
            for name, p in sorted(o["plans"].items(), key=lambda kv: -kv[1]["acc"]))
        for o in sorted(groups, key=lambda o: -o["macs_reduction"]) if o is not g)
    return (f"{text}; on ResNet-56 at −{100 * g['macs_reduction']:.1f} % MACs after `standard` recovery, on "
            f"{g['eval_images']:,} held-out training images, the blocks chosen by {parts}{rand_text}{shallower}; "
            f"{runs}, one accuracy ±{g['se_pp']:.1f} points")


#: Why :data:`DEEP_CRITERION` is recommended, from :data:`DEEP_EVIDENCE_FILE`.
DEEP_REASON = deep_reason(load_deep_evidence())
#: Recovery methods of :func:`cka_analysis.recovery.recover`, cheapest first (every one starts with batch-norm
#: re-estimation), and the default.
RECOVERY_METHODS: Mapping[str, str] = MappingProxyType({
    "bn": "batch-norm re-estimation only (no training)",
    "ce": "cross-entropy fine-tuning (the control)",
    "kd": "logit distillation from the unpruned network",
    "feature": "logit distillation + mimicking the unpruned features at every kept block and the penultimate layer",
    "adaptor": "fitted 1×1 adaptors in place of removed blocks, then 'feature' training",
})
DEFAULT_RECOVERY_METHOD = "feature"
#: Named recovery budgets in training images drawn (``none``: no recovery, not even batch-norm re-estimation).
#: ``long`` is about 50 epochs of CIFAR-10's training split (the paper fine-tunes for 200).
RECOVERY_PRESETS: Mapping[str, int] = MappingProxyType({"none": 0, "quick": 25_000, "standard": 250_000,
                                                        "long": 2_500_000})
#: Calibration images (class-balanced, from the training split) that score the blocks: ``PruneRequest``'s and the
#: command line's default.
DEFAULT_CALIBRATION_IMAGES = 500
#: The dashboard's default, lower on purpose: its heatmaps and scores recompute whenever the model or data change,
#: and it says so beside the field (the command line and the library use :data:`DEFAULT_CALIBRATION_IMAGES`).
DASHBOARD_CALIBRATION_IMAGES = 256
#: A named budget is at most this many passes over the training split (epochs): on a small split (the digits demo's
#: 1,437 images) ``quick`` means 3 epochs rather than 17; on CIFAR-10 (50,000 images) and larger the cap is above
#: the budget and changes nothing (``long`` is 50 epochs there). A budget given as a number of images is never
#: capped.
RECOVERY_PRESET_MAX_EPOCHS: Mapping[str, float] = MappingProxyType({"quick": 3.0, "standard": 10.0, "long": 50.0})
#: Measures of :func:`cka_analysis.robustness.evaluate_robustness`.
ROBUSTNESS_KINDS: tuple[str, ...] = ("fgsm", "pgd", "corruptions")


def plan_advice(criterion: str, macs_reduction: float | None) -> str | None:
    """One sentence to show beside a plan: why ``cka_capacity`` chooses differently, and, for a deep cut
    (``macs_reduction`` ≥ :data:`DEEP_TARGET`), which criterion is recommended there and why; None otherwise."""
    deep = macs_reduction is not None and macs_reduction >= DEEP_TARGET - 1e-9
    recommended = f"recommended for ≥ {100 * DEEP_TARGET:.0f} % fewer MACs: {DEEP_CRITERION} ({DEEP_REASON})"
    if criterion == "cka_capacity":
        text = ("cka_capacity plans for the network after recovery: it multiplies each block's cka score by its "
                "share of the parameters, so that small, low-score blocks go first and the weights a long "
                "recovery needs stay")
        return f"{text}; {recommended}" if deep else text
    return recommended if deep and criterion != DEEP_CRITERION else None


def criterion_info(name: str) -> CriterionInfo:
    """The :class:`CriterionInfo` of ``name``; a ConfigError naming the known criteria when it is not one."""
    try:
        return CRITERION_INFO[name]
    except (KeyError, TypeError):
        raise ConfigError(f"criterion={name!r} is not known; choose one of {', '.join(CRITERIA)}") from None


def parse_reduction(text: str | float) -> float:
    """A reduction as a fraction: ``0.5``, ``"0.5"``, ``"50%"`` or ``"50"`` (a number above 1 is read as percent).
    The one rule of the command line's ``--target-*-reduction`` and ``Target.parse`` (``"macs:50"``); the range
    (0, 1) is checked by them, with a message naming what is reduced."""
    raw = str(text).strip()
    try:
        value = float(raw.rstrip("%").strip())
    except ValueError:
        raise ConfigError(f"{text!r} is not a number (use e.g. 0.5, 50% or 50)") from None
    return value / 100 if raw.endswith("%") or value > 1 else value
