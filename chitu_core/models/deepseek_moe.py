"""DeepSeek-V3 feed-forward blocks: the dense SwiGLU MLP and the MoE with shared experts.

The MoE routes each token to ``num_experts_per_tok`` of ``n_routed_experts``
(grouped top-k over sigmoid scores, ``e_score_correction_bias`` steering the
selection only, ``routed_scaling_factor`` on the weights), runs them with the
backend's ``fused_moe`` and adds the always-on shared experts, a dense SwiGLU
of ``n_shared_experts * moe_intermediate_size``.

Tensor parallelism splits every expert's intermediate dimension (each rank
holds all ``E`` experts, ``I / tp`` columns of each), not the experts
themselves (expert parallelism). Why:

* the ``fused_moe`` hook runs unchanged, with the router's ``topk_ids`` as
  they are: no remapping of ids, no dropping of pairs that live elsewhere, no
  data-dependent shapes or host syncs, so decode stays graph-capturable;
* the work is balanced by construction: every rank does ``1/tp`` of every
  routed expert, whatever the router picks (with EP a rank whose experts are
  popular in this batch holds the others up, and at decode batch sizes the
  routing is far from uniform);
* the communication is the same one all-reduce of ``[T, H]`` per layer that
  EP without all-to-all dispatch needs, and it also covers the shared experts,
  split the same way;
* the price is the FP8 block rule: ``I / tp`` must be a multiple of 128 for
  FP8 checkpoints (DeepSeek-V3's 2048 allows TP up to 16; a clear error names
  the weight otherwise). EP with all-to-all dispatch wins at large batch on
  many nodes; it needs dispatch/combine hooks the contract does not have yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from chitu_core.distributed.model_parallel import ModelParallel, Shard

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chitu_core.models.deepseek_v3 import DeepseekV3Config


class DenseMLP:
    """SwiGLU ``down(silu(gate(x)) * up(x))`` with gate and up fused into one GEMM.

    Weights: ``{prefix}.gate_proj``/``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``.
    Under TP a rank holds ``I / tp`` of the intermediate columns and returns its
    partial sum (the caller all-reduces).
    """

    def __init__(
        self,
        reader: Any,
        ops: Any,
        prefix: str,
        hidden: int,
        inter: int,
        parallel: ModelParallel,
    ) -> None:
        self.ops = ops
        cols = parallel.split(inter, 0, f"{prefix} intermediate size")
        self.gate_up = reader.prepare(
            reader.fused_linear_weight(
                [f"{prefix}.gate_proj", f"{prefix}.up_proj"],
                [(inter, hidden), (inter, hidden)],
                [cols, cols],
            )
        )  # [2I, H]: gate rows then up rows
        self.down = reader.linear(
            f"{prefix}.down_proj", (hidden, inter), shard=Shard(1, cols.start, cols.stop)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        ops = self.ops
        return ops.linear(ops.silu_and_mul(ops.linear(x, self.gate_up, None)), self.down, None)


class DeepseekMoE:
    """Routed experts (``fused_moe``) plus shared experts, one layer's ``mlp``.

    Checkpoint names under ``prefix``: ``gate.weight [E, H]`` (kept fp32, like HF),
    ``gate.e_score_correction_bias [E]`` (optional), ``experts.{e}.{gate,up,down}_proj``
    and ``shared_experts.{gate,up,down}_proj``.
    """

    def __init__(
        self, reader: Any, ops: Any, cfg: DeepseekV3Config, prefix: str, parallel: ModelParallel
    ) -> None:
        self.ops, self.cfg = ops, cfg
        hidden, inter, num_experts = (
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.n_routed_experts,
        )
        self.gate = reader.tensor(f"{prefix}.gate.weight", (num_experts, hidden), torch.float32)
        bias_name = f"{prefix}.gate.e_score_correction_bias"
        self.correction_bias = (
            reader.tensor(bias_name, (num_experts,), torch.float32)
            if reader.has(bias_name)
            else None
        )
        cols = parallel.split(inter, 0, "moe_intermediate_size")  # this rank's columns
        w13, w2 = [], []
        for e in range(num_experts):
            expert = f"{prefix}.experts.{e}"
            w13.append(
                reader.fused_linear_weight(
                    [f"{expert}.gate_proj", f"{expert}.up_proj"],
                    [(inter, hidden), (inter, hidden)],
                    [cols, cols],
                )
            )
            w2.append(
                reader.linear_weight(
                    f"{expert}.down_proj", (hidden, inter), shard=Shard(1, cols.start, cols.stop)
                )
            )
        self.w13 = reader.prepare(reader.stack(w13))  # [E, 2I/tp, H]
        self.w2 = reader.prepare(reader.stack(w2))  # [E, H, I/tp]
        self.shared = None
        if cfg.n_shared_experts:
            self.shared = DenseMLP(
                reader,
                ops,
                f"{prefix}.shared_experts",
                hidden,
                cfg.n_shared_experts * inter,
                parallel,
            )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_weights [T, k] fp32, topk_ids [T, k] int32).

        The router is a tiny GEMM kept in fp32 (HF: ``F.linear(x.float(),
        gate.float())``): bf16 logits would flip near-tied expert choices.
        """
        cfg = self.cfg
        router_logits = x.float() @ self.gate.t()  # [T, E] fp32
        return self.ops.moe_route(
            router_logits,
            cfg.num_experts_per_tok,
            cfg.scoring_func,
            cfg.norm_topk_prob,
            cfg.n_group,
            cfg.topk_group,
            self.correction_bias,
            cfg.routed_scaling_factor,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]: routed experts' weighted sum plus the shared experts
        (this rank's partial sum under TP)."""
        topk_weights, topk_ids = self.route(x)
        out = self.ops.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)  # [T, H]
        if self.shared is not None:
            out = out + self.shared(x)
        return out
