"""Feed-forward blocks of every family: the dense SwiGLU MLP and the routed MoE.

The MoE routes each token to ``top_k`` of ``num_experts`` through the backend's
``moe_route`` (softmax top-k for Mixtral/Qwen3-MoE; DeepSeek-V3/Kimi-K2/GLM-4.5's
grouped top-k over sigmoid scores, ``e_score_correction_bias`` steering the
selection only, ``routed_scaling_factor`` on the weights), runs them with the
backend's ``fused_moe`` and adds the always-on shared experts, a dense SwiGLU
of ``n_shared_experts * moe_intermediate_size`` (DeepSeek, GLM). What differs
between families is data (``MoESpec``), not code.

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
* FP8 block weights whose ``I / tp`` is not a multiple of 128 are held as
  their zero-masked, zero-padded covering blocks (``models/row_span.py``):
  exact, at the price of up to 2 x 127 idle rows per expert. EP with all-to-all
  dispatch wins at large batch on many nodes; it needs dispatch/combine hooks
  the contract does not have yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.distributed.model_parallel import ModelParallel
from chitu_core.models.row_span import gate_up_weight, row_parallel_weight, row_span

SCORING_FUNCS = ("sigmoid", "softmax")


class DenseMLP:
    """SwiGLU ``down(silu(gate(x)) * up(x))`` with gate and up fused into one GEMM.

    Weights: ``{prefix}.{gate}``/``{up}`` ``[I, H]``, ``{down}`` ``[H, I]`` (HF names
    ``gate_proj``, ``up_proj``, ``down_proj`` unless ``names`` says otherwise).
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
        names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    ) -> None:
        self.ops = ops
        gate, up, down = (f"{prefix}.{n}" for n in names)
        keep = parallel.split(inter, 0, f"{prefix} intermediate size")
        span = row_span(reader, gate, inter, keep)
        self.gate_up = reader.prepare(gate_up_weight(reader, gate, up, hidden, span))  # [2I, H]
        self.down = reader.prepare(row_parallel_weight(reader, down, hidden, span))  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        ops = self.ops
        return ops.linear(ops.silu_and_mul(ops.linear(x, self.gate_up, None)), self.down, None)


@dataclass(frozen=True)
class MoESpec:
    """What a family's MoE layer is, from its config.json (validated).

    ``expert_names``: the gate, up and down projections of ``experts.{e}``
    (Mixtral: ``w1``, ``w3``, ``w2``).
    """

    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    scoring_func: str
    norm_topk_prob: bool
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(
                f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}"
            )
        if self.n_group <= 0 or self.num_experts % self.n_group:
            raise ValueError(
                f"n_group ({self.n_group}) must divide n_routed_experts ({self.num_experts})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) exceeds n_group ({self.n_group})")
        eligible = self.topk_group * self.num_experts // self.n_group
        if self.top_k > eligible:
            raise ValueError(
                f"num_experts_per_tok ({self.top_k}) exceeds the {eligible} experts "
                f"of topk_group={self.topk_group} groups"
            )


class MoE:
    """Routed experts (``fused_moe``) plus optional shared experts, one layer's ``mlp``.

    Checkpoint names under ``prefix``: ``gate.weight [E, H]`` (kept fp32, like HF's
    DeepSeek/GLM routers), ``gate.e_score_correction_bias [E]`` (optional),
    ``experts.{e}.{gate,up,down}`` (``spec.expert_names``) and
    ``shared_experts.{gate,up,down}_proj``.
    """

    def __init__(
        self, reader: Any, ops: Any, spec: MoESpec, prefix: str, parallel: ModelParallel
    ) -> None:
        self.ops, self.spec = ops, spec
        hidden, inter, num_experts = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
        self.gate = reader.tensor(f"{prefix}.gate.weight", (num_experts, hidden), torch.float32)
        bias_name = f"{prefix}.gate.e_score_correction_bias"
        self.correction_bias = (
            reader.tensor(bias_name, (num_experts,), torch.float32)
            if reader.has(bias_name)
            else None
        )
        gate, up, down = spec.expert_names
        keep = parallel.split(inter, 0, "moe_intermediate_size")  # this rank's columns
        span = row_span(reader, f"{prefix}.experts.0.{gate}", inter, keep)
        w13, w2 = [], []
        for e in range(num_experts):
            expert = f"{prefix}.experts.{e}"
            w13.append(gate_up_weight(reader, f"{expert}.{gate}", f"{expert}.{up}", hidden, span))
            w2.append(row_parallel_weight(reader, f"{expert}.{down}", hidden, span))
        self.w13 = reader.prepare(reader.stack(w13))  # [E, 2I/tp, H]
        self.w2 = reader.prepare(reader.stack(w2))  # [E, H, I/tp]
        self.shared = None
        if spec.n_shared_experts:
            self.shared = DenseMLP(
                reader,
                ops,
                f"{prefix}.shared_experts",
                hidden,
                spec.n_shared_experts * inter,
                parallel,
            )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (topk_weights [T, k] fp32, topk_ids [T, k] int32).

        The router is a tiny GEMM kept in fp32 (HF DeepSeek/GLM: ``F.linear(x.float(),
        gate.float())``): bf16 logits would flip near-tied expert choices.
        """
        spec = self.spec
        router_logits = x.float() @ self.gate.t()  # [T, E] fp32
        return self.ops.moe_route(
            router_logits,
            spec.top_k,
            spec.scoring_func,
            spec.norm_topk_prob,
            spec.n_group,
            spec.topk_group,
            self.correction_bias,
            spec.routed_scaling_factor,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]: routed experts' weighted sum plus the shared experts
        (this rank's partial sum under TP)."""
        topk_weights, topk_ids = self.route(x)
        out = self.ops.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids)  # [T, H]
        if self.shared is not None:
            out = out + self.shared(x)
        return out
