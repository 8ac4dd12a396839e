"""What a model sees of tensor and pipeline parallelism: its shard plan and two collectives.

A model is built for one rank: it loads only its slices of each tensor (a
``Shard`` of a dimension), keeps only its stage's layers, and calls
``all_reduce`` after a row-parallel linear and ``gather_vocab`` after the
vocab-parallel LM head. ``ModelParallel()`` (TP=1, PP=1) makes every
collective a no-op, so the single-process model is the same code.

Splits (Megatron-style):

* column-parallel (output rows split: q/k/v, gate/up, MLA ``q_b_proj``):
  ``Shard(dim=0, ...)``, no communication;
* row-parallel (input columns split: ``o_proj``, ``down_proj``):
  ``Shard(dim=1, ...)``, partial sums, one ``all_reduce`` per block;
* vocab-parallel embedding and LM head: rows ``[r*Vr, (r+1)*Vr)`` with
  ``Vr = ceil(V / tp)`` (the last shard zero-padded); the embedding masks
  ids outside its rows and all-reduces, the head all-gathers logits;
* attention heads: each rank takes ``Hq / tp`` query heads; GQA key/value
  heads are split likewise when ``Hkv >= tp``, else each rank keeps the one
  KV head its query heads read (replicated over ``tp / Hkv`` ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of dimension ``dim`` of a checkpoint tensor.

    ``stop`` may pass the tensor's end (the last vocab shard): the loader then
    zero-pads up to ``stop - start``.
    """

    dim: int
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"shard [{self.start}, {self.stop}) is empty or negative")

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HeadSplit:
    """This rank's attention heads: query heads ``[q_start, q_start + num_q_heads)`` and
    KV heads ``[kv_start, kv_start + num_kv_heads)`` (global head indices)."""

    q_start: int
    num_q_heads: int
    kv_start: int
    num_kv_heads: int


@dataclass(frozen=True)
class ModelParallel:
    """One rank's place in the TP x PP grid, as a model needs it.

    ``all_reduce_fn(x)`` / ``all_gather_fn(x, dim)`` run over the rank's TP
    group (bound by ``chitu_core.distributed.parallel``); they are None when
    ``tp_size`` is 1.
    """

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    all_reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    all_gather_fn: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    # (x, residual, weight, eps) -> (normed, summed): the backend's all_reduce_add_rms_norm
    # over the TP group; None composes all_reduce_fn with the caller's add_rms_norm.
    all_reduce_add_rms_norm_fn: (
        Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, ...]] | None
    ) = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.pp_size < 1:
            raise ValueError(f"tp ({self.tp_size}) and pp ({self.pp_size}) must be >= 1")
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(
                f"rank (tp {self.tp_rank}, pp {self.pp_rank}) outside tp={self.tp_size} x pp={self.pp_size}"
            )
        if self.tp_size > 1 and (self.all_reduce_fn is None or self.all_gather_fn is None):
            raise ValueError("tp_size > 1 needs the TP group's all_reduce and all_gather")

    # -- pipeline ----------------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> range:
        """This stage's decoder layers: contiguous, sizes differing by at most one
        (earlier stages take the extra layers; the last also runs the LM head)."""
        return stage_layers(num_layers, self.pp_size, self.pp_rank)

    # -- tensor parallel: shard plans --------------------------------------------------
    def split(self, size: int, dim: int, what: str) -> Shard:
        """This rank's equal share of ``size`` along ``dim``; ValueError unless ``tp`` divides it."""
        if size % self.tp_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by the tensor-parallel size {self.tp_size}; "
                "choose a --tp that divides it"
            )
        part = size // self.tp_size
        return Shard(dim, self.tp_rank * part, (self.tp_rank + 1) * part)

    def vocab_shard(self, vocab_size: int) -> Shard:
        """Rows of the embedding / LM head on this rank: ``ceil(V / tp)`` of them (zero-padded)."""
        part = -(-vocab_size // self.tp_size)
        return Shard(0, self.tp_rank * part, (self.tp_rank + 1) * part)

    def heads(self, num_heads: int, num_kv_heads: int | None = None) -> HeadSplit:
        """Split ``num_heads`` query heads (and GQA KV heads, default: as many) over TP."""
        tp, rank = self.tp_size, self.tp_rank
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % tp:
            raise ValueError(
                f"num_attention_heads ({num_heads}) is not divisible by the tensor-parallel size {tp}"
            )
        q_per_rank = num_heads // tp
        q_start = rank * q_per_rank
        if num_kv_heads >= tp:
            if num_kv_heads % tp:
                raise ValueError(
                    f"num_key_value_heads ({num_kv_heads}) is not divisible by the "
                    f"tensor-parallel size {tp}"
                )
            kv_per_rank = num_kv_heads // tp
            return HeadSplit(q_start, q_per_rank, rank * kv_per_rank, kv_per_rank)
        if tp % num_kv_heads:
            raise ValueError(
                f"with fewer KV heads ({num_kv_heads}) than tensor-parallel ranks ({tp}), "
                "the TP size must be a multiple of the KV head count (each KV head is replicated)"
            )
        group = num_heads // num_kv_heads  # query heads per KV head
        return HeadSplit(q_start, q_per_rank, q_start // group, 1)

    # -- tensor parallel: communication ------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the partial outputs of a row-parallel block over TP (identity at TP=1)."""
        return x if self.all_reduce_fn is None else self.all_reduce_fn(x)

    def all_reduce_add_rms_norm(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``add_rms_norm(all_reduce(x), residual, weight, eps)`` -> ``(normed, summed)``
        ``[T, D]`` each: at TP=1 ``add_rms_norm`` alone, else the bound fused op (one call
        where the backend implements it), else the composition."""
        if self.all_reduce_fn is None:
            return add_rms_norm(x, residual, weight, eps)
        if self.all_reduce_add_rms_norm_fn is None:
            return add_rms_norm(self.all_reduce_fn(x), residual, weight, eps)
        return self.all_reduce_add_rms_norm_fn(x, residual, weight, eps)

    def embed(self, ids: torch.Tensor, table: torch.Tensor, shard: Shard | None) -> torch.Tensor:
        """Vocab-parallel embedding: ids ``[T]`` int64, table ``[Vr, D]`` (rows ``shard``) -> ``[T, D]``.

        Ids outside this rank's rows read row 0 and are zeroed; the all-reduce
        adds exactly one non-zero row per token, so the result is exact.
        """
        if shard is None or self.tp_size == 1:
            return table[ids]
        local = ids - shard.start
        inside = (local >= 0) & (local < table.shape[0])
        x = table[torch.where(inside, local, torch.zeros_like(local))]  # [T, D]
        x = torch.where(inside[:, None], x, torch.zeros_like(x))
        return self.all_reduce(x)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``[B, Vr]`` logits of this rank's vocab rows -> ``[B, V]`` (all-gather, drop the pad)."""
        if self.all_gather_fn is None:
            return logits
        return self.all_gather_fn(logits.contiguous(), -1)[:, :vocab_size]


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Layers ``[start, stop)`` of stage ``pp_rank`` out of ``pp_size`` (ValueError if a stage
    would get none)."""
    if num_layers < pp_size:
        raise ValueError(
            f"the model has {num_layers} layers, fewer than the {pp_size} pipeline stages"
        )
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))
