"""Tensor and pipeline parallelism over the backend's collectives hooks.

* ``model_parallel.py``: what a model sees (shard plans, TP all-reduce and
  vocab gather); imported by the models and the loader, torch only.
* ``parallel.py``: ``torch.distributed`` initialised with the backend's
  ``BackendInfo.dist_backend``, the world/TP/PP groups made by
  ``ops.new_group`` (never by naming nccl or gloo).
* ``step_sync.py``: how rank 0 hands each step's batch to the other ranks.
* ``pipeline.py``: the executor every rank runs a step with (batches of
  ``pp`` sequence groups in flight through the stages at once, activations
  by send/recv, logits back to rank 0).
* ``launch.py``: torchrun and ``chitu serve --tp N`` on one node (ranks
  spawned here), and taking every rank down when one dies.
"""

from __future__ import annotations

from chitu_core.errors import ChituError


class DistributedError(ChituError):
    """A rank died, a collective timed out, or the TP x PP layout does not fit the launch."""


__all__ = ["DistributedError"]
