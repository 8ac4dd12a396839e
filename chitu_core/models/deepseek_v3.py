"""DeepSeek-V3 / R1: MLA attention, MoE with shared experts, FP8 block weights.

Reads like HF's ``DeepseekV3ForCausalLM``: ``num_hidden_layers`` pre-norm
decoder layers, each multi-head latent attention (``models/mla.py``, absorbed
form over a latent cache) then a dense SwiGLU for the first
``first_k_dense_replace`` layers and a MoE (``models/moe.py``) after.
Kimi-K2 (``model_type: kimi_k2``) is this architecture with other sizes.
FP8 checkpoints stay FP8; every kernel is a bound op, so it runs on any backend.
The multi-token-prediction layer that real checkpoints append as
``model.layers.{num_hidden_layers}`` is not used for generation and is skipped.
Under TP/PP a rank builds only its stage's layers and its shards (MLA heads,
MLP/expert intermediate columns, vocabulary rows); the forward all-reduces
after attention and after the MLP/MoE.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.distributed.model_parallel import ModelParallel
from chitu_core.models.base import (
    ForwardBatch,
    KVCacheLayout,
    LayerCache,
    decoder_layers,
    last_token_logits,
    stage_input,
)
from chitu_core.models.config_fields import ConfigFields
from chitu_core.models.mla import MultiHeadLatentAttention
from chitu_core.models.moe import SCORING_FUNCS, DenseMLP, MoE, MoESpec
from chitu_core.models.rotary import cos_sin_cache, yarn_mscale

logger = logging.getLogger(__name__)


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from config.json's ``rope_scaling`` (checkpoints) or
    ``rope_parameters`` (transformers >= 5); ``None`` scaling for plain rope."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params or None
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    if (
        scaling is not None
        and scaling.get("rope_type", scaling.get("type", "default")) == "default"
    ):
        scaling = None
    return float(theta), scaling


@dataclass(frozen=True)
class DeepseekV3Config:
    """The config.json fields DeepSeek-V3 uses (validated; see ``from_dict``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    moe_layer_freq: int
    norm_topk_prob: bool
    scoring_func: str
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    rope_is_neox_style: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DeepseekV3Config:
        """Parse config.json; ``ConfigFieldError`` names a missing or mistyped field and
        ValueError an inconsistent one."""
        f = ConfigFields(config)
        theta, scaling = _rope_settings(config)
        cfg = cls(
            vocab_size=f.int("vocab_size"),
            hidden_size=f.int("hidden_size"),
            intermediate_size=f.int("intermediate_size"),
            moe_intermediate_size=f.int("moe_intermediate_size"),
            num_hidden_layers=f.int("num_hidden_layers"),
            num_attention_heads=f.int("num_attention_heads"),
            q_lora_rank=f.int("q_lora_rank", None),
            kv_lora_rank=f.int("kv_lora_rank"),
            qk_nope_head_dim=f.int("qk_nope_head_dim"),
            qk_rope_head_dim=f.int("qk_rope_head_dim"),
            v_head_dim=f.int("v_head_dim"),
            n_routed_experts=f.int("n_routed_experts"),
            n_shared_experts=f.int("n_shared_experts", 0),
            num_experts_per_tok=f.int("num_experts_per_tok"),
            n_group=f.int("n_group", 1),
            topk_group=f.int("topk_group", 1),
            first_k_dense_replace=f.int("first_k_dense_replace", 0),
            moe_layer_freq=f.int("moe_layer_freq", 1),
            norm_topk_prob=f.bool("norm_topk_prob", True),
            scoring_func=f.str("scoring_func", "sigmoid"),
            routed_scaling_factor=f.float("routed_scaling_factor", 1.0),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            rope_is_neox_style=not f.bool("rope_interleave", True),
            max_position_embeddings=f.int("max_position_embeddings", 4096),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            num_nextn_predict_layers=f.int("num_nextn_predict_layers", 0),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
            "n_group", "topk_group", "moe_layer_freq", "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank is not None and (
            not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0
        ):
            raise ValueError(
                f"q_lora_rank must be a positive int or null, got {self.q_lora_rank!r}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_group ({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        eligible = self.topk_group * self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > eligible:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the {eligible} experts "
                f"of topk_group={self.topk_group} groups"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.first_k_dense_replace}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(
                f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}"
            )
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")

    @property
    def softmax_scale(self) -> float:
        """``(N + P) ** -0.5``, times YaRN's ``mscale(factor, mscale_all_dim) ** 2`` (as HF)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        scaling = self.rope_scaling or {}
        if scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        return scale

    @property
    def moe_spec(self) -> MoESpec:
        return MoESpec(
            hidden_size=self.hidden_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            scoring_func=self.scoring_func,
            norm_topk_prob=self.norm_topk_prob,
            n_group=self.n_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
            n_shared_experts=self.n_shared_experts,
        )

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_k_dense_replace and index % self.moe_layer_freq == 0


class DeepseekV3Layer:
    """One decoder layer: RMSNorm -> MLA -> residual, RMSNorm -> MLP or MoE -> residual."""

    def __init__(
        self,
        reader: Any,
        ops: Any,
        cfg: DeepseekV3Config,
        index: int,
        dtype: torch.dtype,
        parallel: ModelParallel,
    ) -> None:
        p, h = f"model.layers.{index}", cfg.hidden_size
        self.input_norm = reader.tensor(f"{p}.input_layernorm.weight", (h,))
        self.post_attention_norm = reader.tensor(f"{p}.post_attention_layernorm.weight", (h,))
        self.attn = MultiHeadLatentAttention(reader, ops, cfg, f"{p}.self_attn", dtype, parallel)
        if cfg.is_moe_layer(index):
            self.mlp: DenseMLP | MoE = MoE(reader, ops, cfg.moe_spec, f"{p}.mlp", parallel)
        else:
            self.mlp = DenseMLP(reader, ops, f"{p}.mlp", h, cfg.intermediate_size, parallel)


class DeepseekV3ForCausalLM(torch.nn.Module):
    """DeepSeek-V3/R1 causal LM over a paged latent cache (see ``models/base.py``)."""

    def __init__(
        self,
        config: dict[str, Any],
        ops: Any,
        dtype: torch.dtype,
        device: torch.device,
        parallel: ModelParallel | None = None,
    ) -> None:
        super().__init__()
        self.cfg = DeepseekV3Config.from_dict(config)
        self.ops, self.dtype, self.device = ops, dtype, device
        self.parallel = parallel or ModelParallel()
        cfg = self.cfg
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.layer_ids = self.parallel.layer_range(cfg.num_hidden_layers)
        self.cos_sin = cos_sin_cache(
            cfg.qk_rope_head_dim,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
            device,
        )  # [max_position, P] fp32
        # The MTP layer(s) follow the last decoder layer; load_model reads this.
        self.skipped_weights = [rf"model\.layers\.{cfg.num_hidden_layers}\."]
        self.layers: list[DeepseekV3Layer] = []

    def load(self, reader: Any) -> None:
        """Pull this rank's weights from a ``CheckpointReader``; skips (and logs) the MTP layer."""
        cfg, parallel = self.cfg, self.parallel
        vocab = parallel.vocab_shard(cfg.vocab_size) if parallel.tp_size > 1 else None
        self.vocab_shard = vocab
        embed_shape = (cfg.vocab_size, cfg.hidden_size)
        tied = cfg.tie_word_embeddings or not reader.has("lm_head.weight")
        if parallel.is_first_stage or (tied and parallel.is_last_stage):
            self.embed = reader.tensor("model.embed_tokens.weight", embed_shape, shard=vocab)
        self.layers = [
            DeepseekV3Layer(reader, self.ops, cfg, i, self.dtype, parallel) for i in self.layer_ids
        ]
        if parallel.is_last_stage:
            self.norm = reader.tensor("model.norm.weight", (cfg.hidden_size,))
            if tied:
                self.lm_head = reader.prepare(reader.dense_weight(self.embed))
            else:  # FP8 checkpoints keep the head in bf16: never quantize it at load
                self.lm_head = reader.linear("lm_head", embed_shape, quantize=False, shard=vocab)
        self._note_mtp(reader.names())

    def _note_mtp(self, names: list[str]) -> None:
        """Log once if the checkpoint carries multi-token-prediction layers, and skip them all."""
        pattern = re.compile(r"model\.layers\.(\d+)\.")
        extra = sorted(
            {
                int(m.group(1))
                for m in map(pattern.match, names)
                if m and int(m.group(1)) >= self.cfg.num_hidden_layers
            }
        )
        if extra:
            self.skipped_weights = [rf"model\.layers\.{i}\." for i in extra]
            logger.info(
                "skipping the multi-token-prediction layer(s) %s (not used for generation)",
                ", ".join(f"model.layers.{i}" for i in extra),
            )

    def kv_cache_layout(self) -> KVCacheLayout:
        """One latent "head" per token and layer: ``[c_kv (R), k_pe (P)]``, no value cache."""
        cfg = self.cfg
        return KVCacheLayout(len(self.layer_ids), 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, None)

    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[LayerCache],
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, vocab]`` fp32 of each sequence's last token of this step (last stage),
        or the hidden states ``[T, D]`` for the next pipeline stage."""
        x = decoder_layers(
            self,
            stage_input(self, batch, hidden_states),  # [T, D]
            kv_caches,
            lambda layer, h, cache: layer.attn(h, batch, cache, self.cos_sin),
            lambda layer, h: layer.mlp(h),
        )
        if not self.parallel.is_last_stage:
            return x
        return last_token_logits(self, x, batch)
