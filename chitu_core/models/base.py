"""What the engine hands a model each step, and what every model provides.

Models are plain ``torch.nn.Module`` subclasses that compute only through the
bound ``Ops`` table and torch tensor math, so they run on any backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class ForwardBatch:
    """One engine step: ``B`` sequences contributing ``T`` new tokens in total.

    Tokens are packed sequence by sequence. Keys/values of the new tokens are
    written to ``slot_mapping`` before attention reads the cache, so a sequence's
    cache holds its whole context (``context_lens``) during the step.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, cached tokens after this step's writes
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, prefix sums of new tokens per sequence
    last_token_indices: torch.Tensor  # [B] int64, index in T of each sequence's last token
    is_decode: bool  # every sequence has exactly one new token (T == B)
    # The int64 step payload (``chitu_core.distributed.step_sync``) the fields above are
    # views/casts of, when the batch was built from one (the engine does): a pipeline
    # stage hands it to the next as is.
    payload: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


@dataclass(frozen=True)
class KVCacheLayout:
    """Per-layer paged-cache geometry of a model.

    Each layer gets a key cache ``[num_blocks, block_size, num_kv_heads, key_dim]``
    and, unless ``value_dim`` is None (MLA's latent cache), a value cache with
    ``value_dim``.
    """

    num_layers: int
    num_kv_heads: int
    key_dim: int
    value_dim: int | None

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        per_layer = self.num_kv_heads * (self.key_dim + (self.value_dim or 0))
        return self.num_layers * per_layer * torch.empty((), dtype=dtype).element_size()


# A layer's caches: (key_cache, value_cache or None).
LayerCache = tuple[torch.Tensor, torch.Tensor | None]


class CausalLM(Protocol):
    """What the engine needs from a model class registered in ``models/registry.py``.

    ``parallel`` (a ``chitu_core.distributed.model_parallel.ModelParallel``) says
    which shards and which layers this rank holds; its collectives are no-ops in
    one process. ``hidden_size`` and ``vocab_size`` size the tensors a pipeline
    stage receives.
    """

    hidden_size: int
    vocab_size: int

    def __init__(
        self, config: Any, ops: Any, dtype: torch.dtype, device: torch.device, parallel: Any
    ) -> None: ...

    def load(self, reader: Any) -> None:
        """Pull this rank's weights from a ``CheckpointReader`` and prepare them with the backend."""

    def kv_cache_layout(self) -> KVCacheLayout:
        """The cache of this rank: its stage's layers, its KV heads."""

    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[LayerCache],
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of each sequence's last token, ``[B, vocab]`` fp32, on the last pipeline
        stage; on an earlier stage the hidden states ``[T, hidden]`` for the next one.
        A stage after the first starts from ``hidden_states`` instead of the token ids."""


def stage_input(
    model: Any, batch: ForwardBatch, hidden_states: torch.Tensor | None
) -> torch.Tensor:
    """Hidden states ``[T, D]`` entering this pipeline stage: embedded on the first stage
    (only it holds ``model.embed``), received from the previous stage otherwise."""
    if model.parallel.is_first_stage:
        return model.parallel.embed(batch.input_ids, model.embed, model.vocab_shard)
    return hidden_states


def decoder_layers(
    model: Any,
    x: torch.Tensor,
    kv_caches: list[Any],
    attention: Callable[[Any, torch.Tensor, Any], torch.Tensor],
    mlp: Callable[[Any, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """This stage's pre-norm decoder layers over ``x [T, D]``; returns the residual stream.

    Per layer: ``x += all_reduce(attention(layer, rms_norm(x), cache))``, then
    ``x += all_reduce(mlp(layer, rms_norm(x)))`` (``layer.input_norm``,
    ``layer.post_attention_norm``). Each all-reduce and residual add is fused with the
    norm that reads the sum (``ModelParallel.all_reduce_add_rms_norm``: ``ops.add_rms_norm``
    at TP=1, one backend op over the TP group); the last layer's MLP output is all-reduced
    and added plainly.
    """
    ops, eps, parallel = model.ops, model.cfg.rms_norm_eps, model.parallel

    def reduce_add_norm(partial, residual, weight):
        return parallel.all_reduce_add_rms_norm(partial, residual, weight, eps, ops.add_rms_norm)

    pending = None  # the last sublayer's partial output, not yet reduced and added to x
    for layer, cache in zip(model.layers, kv_caches, strict=True):
        if pending is None:
            h = ops.rms_norm(x, layer.input_norm, eps)
        else:
            h, x = reduce_add_norm(pending, x, layer.input_norm)
        h, x = reduce_add_norm(attention(layer, h, cache), x, layer.post_attention_norm)
        pending = mlp(layer, h)
    return x if pending is None else x + parallel.all_reduce(pending)


def last_token_logits(model: Any, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """Final norm and LM head of each sequence's last token on the last stage:
    ``[B, vocab]`` fp32, the vocab gathered over TP ranks."""
    ops = model.ops
    last = ops.rms_norm(x[batch.last_token_indices], model.norm, model.cfg.rms_norm_eps)  # [B, D]
    logits = ops.linear(last, model.lm_head, None)  # [B, V / tp]
    return model.parallel.gather_vocab(logits, model.vocab_size).float()
