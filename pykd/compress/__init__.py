"""Model compression.

* :mod:`pykd.compress.convert`: one-shot conversions of a trained model to
  the compressed layer kinds (``quantize_model``, ``sparsify``, ``low_rank``,
  ``cluster``), each returning a new :class:`pykd.Model`.
* :mod:`pykd.compress.finetune`: ``fine_tune``, the layer-by-layer trainer of
  the compressed kinds (QAT for int8) behind every ``fine_tune=`` argument.
* :mod:`pykd.compress.prune`: ``prune``, ``weight_masks``, ``PruneSchedule``.
"""
from .convert import cluster, low_rank, quantize_model, sparsify
from .finetune import fine_tune
from .prune import PruneSchedule, prune, weight_masks
from .spec import FineTune

__all__ = ["FineTune", "cluster", "fine_tune", "low_rank", "quantize_model", "sparsify",
           "PruneSchedule", "prune", "weight_masks"]
