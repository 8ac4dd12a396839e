"""Llama-family dense decoders: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (qkv bias).

Reads like HF's ``LlamaForCausalLM``; every kernel is a bound op, so it runs on
any backend. q/k/v and gate/up are fused into one GEMM each at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.models.base import ForwardBatch, KVCacheLayout, LayerCache
from chitu_core.models.rotary import cos_sin_cache, rope_settings


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

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> LlamaConfig:
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        # Qwen2 checkpoints have biases on q/k/v without saying so in config.json.
        bias = config.get("attention_bias", config.get("model_type") == "qwen2")
        rope_theta, rope_scaling = rope_settings(config)
        result = cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=bool(bias),
        )
        if heads % result.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                f"({result.num_key_value_heads})"
            )
        return result


class LlamaLayer:
    """One decoder layer's prepared weights (plain attributes, no nn.Parameter)."""

    def __init__(self, reader: Any, cfg: LlamaConfig, index: int) -> None:
        p = f"model.layers.{index}"
        h, d = cfg.hidden_size, cfg.head_dim
        q_rows, kv_rows = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        self.input_norm = reader.tensor(f"{p}.input_layernorm.weight", (h,))
        self.post_attention_norm = reader.tensor(f"{p}.post_attention_layernorm.weight", (h,))
        projections = [f"{p}.self_attn.{name}_proj" for name in "qkv"]
        self.qkv = reader.prepare(
            reader.fused_linear_weight(projections, [(q_rows, h), (kv_rows, h), (kv_rows, h)])
        )
        self.qkv_bias = None
        if cfg.attention_bias:
            biases = [
                reader.tensor(f"{name}.bias", (rows,))
                for name, rows in zip(projections, (q_rows, kv_rows, kv_rows), strict=True)
            ]
            self.qkv_bias = torch.cat(biases)
        self.o = reader.linear(f"{p}.self_attn.o_proj", (h, q_rows))
        i = cfg.intermediate_size
        self.gate_up = reader.prepare(
            reader.fused_linear_weight([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [(i, h), (i, h)])
        )
        self.down = reader.linear(f"{p}.mlp.down_proj", (h, i))


class LlamaForCausalLM(torch.nn.Module):
    """Llama/Mistral/Qwen2 causal LM over the paged KV cache (see ``models/base.py``)."""

    def __init__(
        self, config: dict[str, Any], ops: Any, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.cfg = LlamaConfig.from_dict(config)
        self.ops, self.dtype, self.device = ops, dtype, device
        self.scale = self.cfg.head_dim**-0.5
        self.cos_sin = cos_sin_cache(
            self.cfg.head_dim,
            self.cfg.max_position_embeddings,
            self.cfg.rope_theta,
            self.cfg.rope_scaling,
            device,
        )
        self.layers: list[LlamaLayer] = []

    def load(self, reader: Any) -> None:
        cfg = self.cfg
        self.embed = reader.tensor("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        self.layers = [LlamaLayer(reader, cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = reader.tensor("model.norm.weight", (cfg.hidden_size,))
        if cfg.tie_word_embeddings or not reader.has("lm_head.weight"):
            self.lm_head = reader.prepare(reader.dense_weight(self.embed))
        else:
            self.lm_head = reader.linear(
                "lm_head", (cfg.vocab_size, cfg.hidden_size), quantize=False
            )

    def kv_cache_layout(self) -> KVCacheLayout:
        cfg = self.cfg
        return KVCacheLayout(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim
        )

    def _attention(
        self, layer: LlamaLayer, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache
    ) -> torch.Tensor:
        ops, cfg = self.ops, self.cfg
        tokens = x.shape[0]
        qkv = ops.linear(x, layer.qkv, layer.qkv_bias)  # [T, (Hq + 2 Hkv) * D]
        q_size, kv_size = (
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        )
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(tokens, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(tokens, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(tokens, cfg.num_key_value_heads, cfg.head_dim)
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
        return ops.linear(out.reshape(tokens, q_size), layer.o, None)

    def forward(self, batch: ForwardBatch, kv_caches: list[LayerCache]) -> torch.Tensor:
        ops, eps = self.ops, self.cfg.rms_norm_eps
        x = self.embed[batch.input_ids]  # [T, hidden]
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x = x + self._attention(layer, ops.rms_norm(x, layer.input_norm, eps), batch, cache)
            h = ops.rms_norm(x, layer.post_attention_norm, eps)
            x = x + ops.linear(
                ops.silu_and_mul(ops.linear(h, layer.gate_up, None)), layer.down, None
            )
        last = ops.rms_norm(x[batch.last_token_indices], self.norm, eps)  # [B, hidden]
        return ops.linear(last, self.lm_head, None).float()
