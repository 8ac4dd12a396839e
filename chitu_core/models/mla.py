"""Multi-head latent attention (DeepSeek-V2/V3 MLA) in the absorbed form.

Per token, keys and values are compressed into one latent ``c_kv`` of
``kv_lora_rank`` (R) channels plus a single rope key ``k_pe`` of
``qk_rope_head_dim`` (P) channels shared by all heads; only ``[c_kv, k_pe]``
is cached. ``kv_b_proj`` would expand the latent into per-head keys
``k_nope = W_UK c`` and values ``v = W_UV c``; the absorbed form moves
``W_UK`` onto the query and ``W_UV`` after the attention instead::

    q_nope . (W_UK c) = (W_UK^T q_nope) . c = q_latent . c
    sum_j p_j (W_UV c_j) = W_UV (sum_j p_j c_j)

so attention runs over the latent cache directly, for prefill and decode alike.

Tensor parallelism splits the heads: a rank holds its heads' rows of
``q_b_proj`` and ``kv_b_proj`` and their columns of ``o_proj`` (whose partial
output the layer all-reduces). The down-projections ``q_a_proj`` and
``kv_a_proj_with_mqa`` are small and replicated, and so is the latent cache:
every head reads the same latent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from chitu_core.distributed.model_parallel import ModelParallel, Shard
from chitu_core.models.base import ForwardBatch, LayerCache
from chitu_core.models.row_span import fused_rows_weight, row_parallel_weight, row_span

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from chitu_core.models.deepseek_v3 import DeepseekV3Config


class MultiHeadLatentAttention:
    """One layer's ``self_attn``: weights prepared at load, forward through the bound ops.

    Checkpoint names under ``prefix``: ``q_a_proj [Q, D]``, ``q_a_layernorm [Q]``,
    ``q_b_proj [H*(N+P), Q]`` (or ``q_proj [H*(N+P), D]`` when ``q_lora_rank`` is
    null), ``kv_a_proj_with_mqa [R+P, D]``, ``kv_a_layernorm [R]``,
    ``kv_b_proj [H*(N+V), R]``, ``o_proj [D, H*V]``, with ``N = qk_nope_head_dim``
    and ``V = v_head_dim``.
    """

    def __init__(
        self,
        reader: Any,
        ops: Any,
        cfg: DeepseekV3Config,
        prefix: str,
        dtype: torch.dtype,
        parallel: ModelParallel,
    ) -> None:
        self.ops, self.cfg = ops, cfg
        d, h = cfg.hidden_size, cfg.num_attention_heads
        n, p, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.v_head_dim
        heads = parallel.heads(h)
        first, self.num_heads = heads.q_start, heads.num_q_heads  # this rank's heads
        last = first + self.num_heads
        q_rows = Shard(0, first * (n + p), last * (n + p))
        if cfg.q_lora_rank is None:
            self.q_a = self.q_a_norm = None
            q_name, q_in = f"{prefix}.q_proj", d
        else:
            self.q_a = reader.linear(f"{prefix}.q_a_proj", (cfg.q_lora_rank, d))
            self.q_a_norm = reader.tensor(f"{prefix}.q_a_layernorm.weight", (cfg.q_lora_rank,))
            q_name, q_in = f"{prefix}.q_b_proj", cfg.q_lora_rank
        # FP8 heads whose TP split is off the 128 blocks: this rank's rows of the covering
        # blocks (models/row_span.py); its queries are cut back out of the output.
        self.q_span = row_span(reader, q_name, h * (n + p), q_rows, fused=False)
        self.q_b = reader.prepare(fused_rows_weight(reader, [q_name], [self.q_span], q_in))
        self.kv_a = reader.linear(f"{prefix}.kv_a_proj_with_mqa", (r + p, d))
        self.kv_a_norm = reader.tensor(f"{prefix}.kv_a_layernorm.weight", (r,))
        # kv_b_proj is only ever used absorbed: widen it once to the compute dtype
        # and keep its two halves per head.
        kv_b = reader.dequantized_weight(
            f"{prefix}.kv_b_proj",
            (h * (n + v), r),
            dtype,
            Shard(0, first * (n + v), last * (n + v)),
        ).view(self.num_heads, n + v, r)
        self.w_uk = kv_b[:, :n].contiguous()  # [H, N, R]
        self.w_uv = kv_b[:, n:].contiguous()  # [H, V, R]
        self.o_span = row_span(
            reader, f"{prefix}.o_proj", h * v, Shard(0, first * v, last * v), fused=False
        )
        self.o = reader.prepare(row_parallel_weight(reader, f"{prefix}.o_proj", d, self.o_span))

    def project(
        self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (q_nope [T, H, N], q_pe [T, H, P] rotated, latent [T, 1, R+P]).

        ``latent`` is what the cache stores: the normalised ``c_kv`` then the
        rotated ``k_pe``.
        """
        ops, cfg = self.ops, self.cfg
        tokens, eps = x.shape[0], cfg.rms_norm_eps
        n, p, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        if self.q_a is None:
            q = ops.linear(x, self.q_b, None)
        else:
            q = ops.linear(
                ops.rms_norm(ops.linear(x, self.q_a, None), self.q_a_norm, eps), self.q_b, None
            )
        span = self.q_span
        if span.padded:
            q = q.narrow(-1, span.offset, span.keep.size)
        q = q.reshape(tokens, self.num_heads, n + p)  # [T, H, N+P], this rank's heads
        q_nope, q_pe = q[..., :n], q[..., n:].contiguous()
        kv = ops.linear(x, self.kv_a, None)  # [T, R+P]
        c_kv = ops.rms_norm(kv[:, :r].contiguous(), self.kv_a_norm, eps)  # [T, R]
        k_pe = kv[:, None, r:].contiguous()  # [T, 1, P]
        q_pe, k_pe = ops.rope(q_pe, k_pe, positions, cos_sin, cfg.rope_is_neox_style)
        latent = torch.cat([c_kv[:, None], k_pe], dim=-1)  # [T, 1, R+P]
        return q_nope, q_pe, latent

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [T, H, N] -> q_latent [T, H, R] = W_UK^T q_nope per head."""
        return torch.einsum("thn,hnr->thr", q_nope, self.w_uk)

    def output(self, attn_latent: torch.Tensor) -> torch.Tensor:
        """attn_latent [T, H, R] -> o_proj(W_UV attn_latent per head): [T, D]."""
        values = torch.einsum("thr,hvr->thv", attn_latent, self.w_uv)  # [T, H, V]
        values = values.reshape(values.shape[0], -1).contiguous()  # [T, H*V]
        span = self.o_span
        if span.padded:  # FP8 o_proj columns off the 128 blocks: its input padded to match
            values = torch.nn.functional.pad(
                values, (span.offset, span.local_size - span.offset - span.keep.size)
            )
        return self.ops.linear(values, self.o, None)

    def __call__(
        self, x: torch.Tensor, batch: ForwardBatch, cache: LayerCache, cos_sin: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, D] -> [T, D] (this rank's partial sum under TP); writes this step's latents
        to the layer's cache first."""
        ops, scale = self.ops, self.cfg.softmax_scale
        latent_cache = cache[0]  # [num_blocks, block_size, 1, R+P]
        q_nope, q_pe, latent = self.project(x, batch.positions, cos_sin)
        ops.store_kv(latent, None, latent_cache, None, batch.slot_mapping)
        q_latent = self.absorb_query(q_nope)  # [T, H, R]
        if batch.is_decode:
            out = ops.mla_decode(
                q_latent, q_pe, latent_cache, batch.block_tables, batch.context_lens, scale
            )
        else:
            out = ops.mla_prefill(
                q_latent,
                q_pe,
                latent_cache,
                batch.block_tables,
                batch.cu_seqlens_q,
                batch.context_lens,
                scale,
            )  # [T, H, R]
        return self.output(out)
