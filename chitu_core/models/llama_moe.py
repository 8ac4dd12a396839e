"""Llama-attention decoders with MoE layers: Qwen3-MoE, Mixtral, GLM-4.5 / 4.5-Air.

The attention is ``models/llama.py``'s (GQA, rope, Qwen3's per-head q/k norm,
GLM-4.5's qkv bias and partial rotary); the feed-forward block of a layer is
``models/moe.py``'s ``MoE`` or, for the dense layers a family keeps,
``DenseMLP``. The families differ only in config fields and weight names:

* ``qwen3_moe``: softmax top-k (``norm_topk_prob``), experts
  ``mlp.experts.{e}.{gate,up,down}_proj``, dense layers ``mlp_only_layers`` and
  those off ``decoder_sparse_step``;
* ``mixtral``: softmax top-2, renormalised, experts
  ``block_sparse_moe.experts.{e}.{w1,w3,w2}``, no dense layers;
* ``glm4_moe``: DeepSeek-V3's grouped sigmoid router with
  ``e_score_correction_bias`` and ``routed_scaling_factor``, experts under
  ``mlp.experts`` plus ``mlp.shared_experts``, the first
  ``first_k_dense_replace`` layers dense.

GLM-4.5's multi-token-prediction layers (``model.layers.{num_hidden_layers}...``)
are not used for generation and are skipped, as for DeepSeek-V3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.models.config_fields import ConfigFields
from chitu_core.models.llama import LlamaForCausalLM
from chitu_core.models.moe import MoE, MoESpec


@dataclass(frozen=True)
class MoELayout:
    """Which layers are MoE, what their MoE is, and where its weights live."""

    spec: MoESpec
    prefix: str  # the layer's MoE module: "mlp" or Mixtral's "block_sparse_moe"
    moe_layers: frozenset[int]
    num_mtp_layers: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> MoELayout:
        """The layout of a qwen3_moe / mixtral / glm4_moe config.json (``ConfigFieldError``
        names a missing or mistyped field, ValueError an unknown model_type)."""
        kind = config.get("model_type")
        if kind not in _LAYOUTS:
            raise ValueError(f"model_type {kind!r} has no MoE layout ({', '.join(_LAYOUTS)})")
        fields = ConfigFields(config)
        return _LAYOUTS[kind](fields, range(fields.int("num_hidden_layers", minimum=1)))


def _qwen3_moe(f: ConfigFields, layers: range) -> MoELayout:
    step = f.int("decoder_sparse_step", 1, minimum=1)
    dense = set(f.config.get("mlp_only_layers") or ())
    spec = MoESpec(
        hidden_size=f.int("hidden_size"),
        moe_intermediate_size=f.int("moe_intermediate_size"),
        # Published configs say num_experts; transformers 5 writes num_local_experts.
        num_experts=f.int("num_experts", None) or f.int("num_local_experts"),
        top_k=f.int("num_experts_per_tok"),
        scoring_func="softmax",
        norm_topk_prob=f.bool("norm_topk_prob", False),
    )
    moe = {i for i in layers if i not in dense and (i + 1) % step == 0}
    return MoELayout(spec, "mlp", frozenset(moe))


def _mixtral(f: ConfigFields, layers: range) -> MoELayout:
    spec = MoESpec(
        hidden_size=f.int("hidden_size"),
        moe_intermediate_size=f.int("intermediate_size"),
        num_experts=f.int("num_local_experts"),
        top_k=f.int("num_experts_per_tok"),
        scoring_func="softmax",
        norm_topk_prob=True,
        expert_names=("w1", "w3", "w2"),
    )
    return MoELayout(spec, "block_sparse_moe", frozenset(layers))


def _glm4_moe(f: ConfigFields, layers: range) -> MoELayout:
    spec = MoESpec(
        hidden_size=f.int("hidden_size"),
        moe_intermediate_size=f.int("moe_intermediate_size"),
        num_experts=f.int("n_routed_experts"),
        top_k=f.int("num_experts_per_tok"),
        scoring_func="sigmoid",
        norm_topk_prob=f.bool("norm_topk_prob", True),
        n_group=f.int("n_group", 1),
        topk_group=f.int("topk_group", 1),
        routed_scaling_factor=f.float("routed_scaling_factor", 1.0),
        n_shared_experts=f.int("n_shared_experts", 0),
    )
    first_dense = f.int("first_k_dense_replace", 0)
    mtp = f.int("num_nextn_predict_layers", 0)
    return MoELayout(spec, "mlp", frozenset(i for i in layers if i >= first_dense), mtp)


_LAYOUTS = {"qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "glm4_moe": _glm4_moe}


class LlamaMoEForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE / Mixtral / GLM-4.5 causal LM: Llama attention, MoE feed-forward blocks."""

    def __init__(
        self,
        config: dict[str, Any],
        ops: Any,
        dtype: torch.dtype,
        device: torch.device,
        parallel: Any = None,
    ) -> None:
        super().__init__(config, ops, dtype, device, parallel)
        self.moe_layout = MoELayout.from_dict(config)
        first_mtp = self.cfg.num_hidden_layers
        self.skipped_weights = [
            rf"model\.layers\.{first_mtp + i}\." for i in range(self.moe_layout.num_mtp_layers)
        ]

    def build_mlp(self, reader: Any, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer ``index``'s ``MoE``, or the ``DenseMLP`` of a layer the family keeps dense."""
        layout = self.moe_layout
        if index not in layout.moe_layers:
            return super().build_mlp(reader, index)
        prefix = f"model.layers.{index}.{layout.prefix}"
        return MoE(reader, self.ops, layout.spec, prefix, self.parallel)
