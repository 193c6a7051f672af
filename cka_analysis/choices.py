"""Names the command line offers as choices, kept free of heavy imports so that ``cka-prune --help`` and
``--version`` answer at once (the modules that implement them re-export these tuples)."""

from __future__ import annotations

#: Removal criteria of :func:`cka_analysis.scoring.score_blocks`; ``"cka"`` is the paper's.
CRITERIA: tuple[str, ...] = ("cka", "random", "weight_norm", "block_influence", "angular", "taylor", "loss")
#: Measures of :func:`cka_analysis.robustness.evaluate_robustness`.
ROBUSTNESS_KINDS: tuple[str, ...] = ("fgsm", "pgd", "corruptions")
