"""Llama-family decoders: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (qkv bias),
Qwen3 (per-head q/k RMSNorm); ``models/llama_moe.py`` puts MoE layers under the same
attention (Qwen3-MoE, Mixtral, GLM-4.5).

Reads like HF's ``LlamaForCausalLM``; every kernel is a bound op, so it runs on
any backend. q/k/v and gate/up are fused into one GEMM each at load. Under
tensor parallelism a rank holds its query heads (and KV heads, replicated when
there are fewer than TP ranks), its share of the MLP's intermediate dimension
and of the vocabulary; ``o_proj`` and ``down_proj`` are row-parallel and their
partial sums are all-reduced (see ``chitu_core/distributed/model_parallel.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.distributed.model_parallel import HeadSplit, ModelParallel, Shard
from chitu_core.models.base import (
    ForwardBatch,
    KVCacheLayout,
    LayerCache,
    decoder_layers,
    last_token_logits,
    stage_input,
)
from chitu_core.models.config_fields import ConfigFields
from chitu_core.models.moe import DenseMLP
from chitu_core.models.rotary import cos_sin_cache, rope_settings
from chitu_core.models.row_span import (
    fused_rows_weight,
    padded_bias,
    row_parallel_weight,
    row_span,
)

# Families whose attention normalises each query and key head (RMSNorm over head_dim)
# before rope; GLM-4.5 says so in config.json (``use_qk_norm``).
_QK_NORM_TYPES = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class LlamaConfig:
    """The config.json fields the Llama family uses (validated)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rotary_dim: int  # leading channels of each head that rope rotates (GLM-4.5: half)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        """Parse config.json; ``ConfigFieldError`` names a missing or mistyped field."""
        f = ConfigFields(config)
        heads = f.int("num_attention_heads", minimum=1)
        hidden = f.int("hidden_size", minimum=1)
        # Qwen2 checkpoints have biases on q/k/v without saying so in config.json.
        bias = f.bool("attention_bias", config.get("model_type") == "qwen2")
        rope_theta, rope_scaling = rope_settings(config)
        head_dim = f.int("head_dim", hidden // heads, minimum=1)
        partial = f.float(
            "partial_rotary_factor",
            (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0),
        )
        result = cls(
            vocab_size=f.int("vocab_size", minimum=1),
            hidden_size=hidden,
            intermediate_size=f.int("intermediate_size", minimum=1),
            num_hidden_layers=f.int("num_hidden_layers", minimum=1),
            num_attention_heads=heads,
            num_key_value_heads=f.int("num_key_value_heads", heads, minimum=1),
            head_dim=head_dim,
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=f.int("max_position_embeddings", 4096, minimum=1),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=bias,
            qk_norm=f.bool("use_qk_norm", config.get("model_type") in _QK_NORM_TYPES),
            rotary_dim=int(head_dim * partial),
        )
        if not 0 < result.rotary_dim <= head_dim or result.rotary_dim % 2:
            raise ValueError(
                f"partial_rotary_factor ({partial}) must give an even rotary dimension in "
                f"(0, head_dim={head_dim}], got {result.rotary_dim}"
            )
        if heads % result.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                f"({result.num_key_value_heads})"
            )
        return result


class LlamaLayer:
    """One decoder layer's prepared weights (plain attributes, no nn.Parameter): this
    rank's attention heads ``heads`` and its feed-forward block ``mlp`` (built by the model:
    a ``DenseMLP`` or a ``MoE``)."""

    def __init__(
        self,
        reader: Any,
        cfg: LlamaConfig,
        index: int,
        heads: HeadSplit,
        mlp: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        p = f"model.layers.{index}"
        h, d = cfg.hidden_size, cfg.head_dim
        q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        q_shard = Shard(0, heads.q_start * d, (heads.q_start + heads.num_q_heads) * d)
        kv_shard = Shard(0, heads.kv_start * d, (heads.kv_start + heads.num_kv_heads) * d)
        self.input_norm = reader.tensor(f"{p}.input_layernorm.weight", (h,))
        self.post_attention_norm = reader.tensor(f"{p}.post_attention_layernorm.weight", (h,))
        projections = [f"{p}.self_attn.{name}_proj" for name in "qkv"]
        spans = [
            row_span(reader, name, rows, shard)
            for name, rows, shard in zip(
                projections, (q_rows, kv_rows, kv_rows), (q_shard, kv_shard, kv_shard), strict=True
            )
        ]
        self.qkv = reader.prepare(fused_rows_weight(reader, projections, spans, h))
        # Where q, k and v sit in the fused output: FP8 parts may be zero-padded to 128 rows.
        self.qkv_sizes = [span.local_size for span in spans]
        self.qkv_offsets = [span.offset for span in spans]
        self.qkv_bias = None
        if cfg.attention_bias:
            biases = [
                padded_bias(reader.tensor(f"{name}.bias", (span.size,), shard=span.keep), span)
                for name, span in zip(projections, spans, strict=True)
            ]
            self.qkv_bias = torch.cat(biases)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = reader.tensor(f"{p}.self_attn.q_norm.weight", (d,))
            self.k_norm = reader.tensor(f"{p}.self_attn.k_norm.weight", (d,))
        # o_proj's input is this rank's q heads: FP8 columns not on 128 blocks are padded
        # like q's rows, and the attention output is padded to match before the GEMM.
        o_proj = f"{p}.self_attn.o_proj"
        self.o_span = row_span(reader, o_proj, q_rows, q_shard, fused=False)
        self.o = reader.prepare(row_parallel_weight(reader, o_proj, h, self.o_span))
        self.mlp = mlp


class LlamaForCausalLM(torch.nn.Module):
    """Llama/Mistral/Qwen2/Qwen3 causal LM over the paged KV cache (see ``models/base.py``).

    Subclasses change the feed-forward block of a layer through ``build_mlp``."""

    def __init__(
        self,
        config: dict[str, Any],
        ops: Any,
        dtype: torch.dtype,
        device: torch.device,
        parallel: ModelParallel | None = None,
    ) -> None:
        super().__init__()
        self.cfg = LlamaConfig.from_dict(config)
        self.ops, self.dtype, self.device = ops, dtype, device
        self.parallel = parallel or ModelParallel()
        self.hidden_size, self.vocab_size = self.cfg.hidden_size, self.cfg.vocab_size
        self.heads = self.parallel.heads(self.cfg.num_attention_heads, self.cfg.num_key_value_heads)
        self.layer_ids = self.parallel.layer_range(self.cfg.num_hidden_layers)
        self.scale = self.cfg.head_dim**-0.5
        self.cos_sin = cos_sin_cache(
            self.cfg.rotary_dim,
            self.cfg.max_position_embeddings,
            self.cfg.rope_theta,
            self.cfg.rope_scaling,
            device,
        )
        self.layers: list[LlamaLayer] = []

    def load(self, reader: Any) -> None:
        cfg, parallel = self.cfg, self.parallel
        vocab = parallel.vocab_shard(cfg.vocab_size) if parallel.tp_size > 1 else None
        self.vocab_shard = vocab
        embed_shape = (cfg.vocab_size, cfg.hidden_size)
        tied = cfg.tie_word_embeddings or not reader.has("lm_head.weight")
        if parallel.is_first_stage or (tied and parallel.is_last_stage):
            self.embed = reader.tensor("model.embed_tokens.weight", embed_shape, shard=vocab)
        self.layers = [
            LlamaLayer(reader, cfg, i, self.heads, self.build_mlp(reader, i))
            for i in self.layer_ids
        ]
        if not parallel.is_last_stage:
            return
        self.norm = reader.tensor("model.norm.weight", (cfg.hidden_size,))
        if tied:
            self.lm_head = reader.prepare(reader.dense_weight(self.embed))
        else:
            self.lm_head = reader.linear("lm_head", embed_shape, quantize=False, shard=vocab)

    def build_mlp(self, reader: Any, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer ``index``'s feed-forward block: the dense SwiGLU ``mlp.{gate,up,down}_proj``."""
        cfg = self.cfg
        prefix = f"model.layers.{index}.mlp"
        return DenseMLP(
            reader, self.ops, prefix, cfg.hidden_size, cfg.intermediate_size, self.parallel
        )

    def kv_cache_layout(self) -> KVCacheLayout:
        cfg = self.cfg
        return KVCacheLayout(
            len(self.layer_ids), self.heads.num_kv_heads, cfg.head_dim, cfg.head_dim
        )

    def _attention(
        self, layer: LlamaLayer, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache
    ) -> torch.Tensor:
        """x: [T, hidden] -> this rank's partial ``o_proj`` output [T, hidden] (all-reduce it)."""
        ops, cfg = self.ops, self.cfg
        tokens, num_q, num_kv = x.shape[0], self.heads.num_q_heads, self.heads.num_kv_heads
        qkv = ops.linear(x, layer.qkv, layer.qkv_bias)  # [T, (Hq + 2 Hkv) * D], local heads
        q_size, kv_size = num_q * cfg.head_dim, num_kv * cfg.head_dim
        q, k, v = (
            part.narrow(-1, offset, size)
            for part, offset, size in zip(
                qkv.split(layer.qkv_sizes, dim=-1),
                layer.qkv_offsets,
                (q_size, kv_size, kv_size),
                strict=True,
            )
        )
        q = q.reshape(tokens, num_q, cfg.head_dim)
        k = k.reshape(tokens, num_kv, cfg.head_dim)
        v = v.reshape(tokens, num_kv, cfg.head_dim)
        if layer.q_norm is not None:  # per head, before rope (Qwen3, GLM-4.5 with use_qk_norm)
            eps = cfg.rms_norm_eps
            q = ops.rms_norm(q.reshape(-1, cfg.head_dim), layer.q_norm, eps).view_as(q)
            k = ops.rms_norm(k.reshape(-1, cfg.head_dim), layer.k_norm, eps).view_as(k)
        q, k = ops.rope(q, k, batch.positions, self.cos_sin, True)
        key_cache, value_cache = cache
        ops.store_kv(k, v, key_cache, value_cache, batch.slot_mapping)
        if batch.is_decode:
            out = ops.paged_attention_decode(
                q, key_cache, value_cache, batch.block_tables, batch.context_lens, self.scale
            )
        else:
            out = ops.paged_attention_prefill(
                q,
                key_cache,
                value_cache,
                batch.block_tables,
                batch.cu_seqlens_q,
                batch.context_lens,
                self.scale,
            )
        out = out.reshape(tokens, q_size)
        span = layer.o_span
        if span.padded:  # only FP8 heads whose TP split is not on 128 columns
            out = torch.nn.functional.pad(
                out, (span.offset, span.local_size - span.offset - q_size)
            )
        return ops.linear(out, layer.o, None)

    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[LayerCache],
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = decoder_layers(
            self,
            stage_input(self, batch, hidden_states),  # [T, D]
            kv_caches,
            lambda layer, h, cache: self._attention(layer, h, batch, cache),
            lambda layer, h: layer.mlp(h),
        )
        if not self.parallel.is_last_stage:
            return x  # [T, hidden] for the next stage
        return last_token_logits(self, x, batch)
