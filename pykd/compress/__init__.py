"""Model compression.

* :mod:`pykd.compress.convert`: one-shot conversions of a trained model to
  the compressed layer kinds (``quantize_model``, ``sparsify``, ``low_rank``,
  ``cluster``), each returning a new :class:`pykd.Model`.
* :mod:`pykd.compress.prune`: ``prune``, ``weight_masks``, ``PruneSchedule``.
"""
from .convert import cluster, low_rank, quantize_model, sparsify
from .prune import PruneSchedule, prune, weight_masks
from .spec import FineTune

__all__ = ["FineTune", "cluster", "low_rank", "quantize_model", "sparsify",
           "PruneSchedule", "prune", "weight_masks"]
