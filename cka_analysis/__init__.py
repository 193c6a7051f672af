"""CKA Prune: make residual networks shallower by removing whole blocks chosen with Centered Kernel Alignment.

The main entry points (imported lazily so that ``import cka_analysis`` stays fast):

* :func:`cka_analysis.cka.linear_cka`, :class:`cka_analysis.cka.MinibatchCKA`, :func:`cka_analysis.cka.cka_matrix`
* :func:`cka_analysis.models.build_model`, :func:`cka_analysis.blocks.find_blocks`,
  :func:`cka_analysis.blocks.remove_blocks`
* :func:`cka_analysis.scoring.score_blocks`, :func:`cka_analysis.pruning.prune`,
  :func:`cka_analysis.export.save_pruned` / :func:`cka_analysis.export.load_pruned`
"""

from ._version import __version__

__all__ = ["__version__"]
