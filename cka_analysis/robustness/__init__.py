"""Robustness of a (pruned) classifier: adversarial accuracy and accuracy under common corruptions.

Removing residual blocks can cost more robustness than clean accuracy shows, so the CLI
(``cka-prune evaluate --robustness fgsm,pgd,corruptions``) and the dashboard's Compare page report both. Three
parts, one module each:

* :mod:`~cka_analysis.robustness.attacks` — L∞ FGSM (Goodfellow et al., 2015) and PGD (Madry et al., 2018) via
  ``captum.robust``, in pixel space: ε is in pixel units of [0, 1] (8/255 = eight grey levels), adversarial
  images stay in [0, 1], the model's normalisation is applied inside the attacked forward pass.
* :mod:`~cka_analysis.robustness.corruptions` — eight CIFAR-10-C / ImageNet-C style corruptions at severities
  1–5 on batched tensors (the published parameter tables, chosen by image size).
* :mod:`~cka_analysis.robustness.evaluate` — one pass over a loader measuring clean, attacked and corrupted
  accuracy, returning the typed records of :mod:`~cka_analysis.robustness.results` (:class:`RobustnessResult`,
  :class:`AttackCurve`, :class:`CorruptionResult`) with every accuracy in **percent**.

Every random choice (PGD's random start, the noise corruptions) comes from a local, seeded ``torch.Generator``:
a run repeats exactly on the same device, and the process-wide RNG is neither seeded nor restored, so evaluations
in several threads do not disturb each other.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..choices import ROBUSTNESS_KINDS
from .results import EPS_TOLERANCE, AttackCurve, CorruptionResult, RobustnessResult, as_results

# The records above are torch-free (the figures read them); the measuring parts load torch and captum, so they are
# imported on first use: ``from cka_analysis.robustness import evaluate_robustness`` works as usual.
_LAZY = {
    **dict.fromkeys(("ATTACKS", "DEFAULT_EPS", "fgsm_perturb", "parse_eps", "pgd_perturb"), "attacks"),
    **dict.fromkeys(("CORRUPTIONS", "CORRUPTION_TABLES", "SEVERITIES", "SMALL_IMAGE_MAX_SIDE", "corrupt",
                     "corruption_table_for", "disk_kernel", "hsv_to_rgb", "rgb_to_hsv"), "corruptions"),
    **dict.fromkeys(("RobustnessSpec", "adversarial_accuracy", "corruption_accuracy", "evaluate_robustness"),
                    "evaluate"),
}

__all__ = [
    "ATTACKS",
    "CORRUPTIONS",
    "CORRUPTION_TABLES",
    "DEFAULT_EPS",
    "EPS_TOLERANCE",
    "ROBUSTNESS_KINDS",
    "SEVERITIES",
    "SMALL_IMAGE_MAX_SIDE",
    "AttackCurve",
    "CorruptionResult",
    "RobustnessResult",
    "RobustnessSpec",
    "adversarial_accuracy",
    "as_results",
    "corrupt",
    "corruption_accuracy",
    "corruption_table_for",
    "disk_kernel",
    "evaluate_robustness",
    "fgsm_perturb",
    "hsv_to_rgb",
    "parse_eps",
    "pgd_perturb",
    "rgb_to_hsv",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
