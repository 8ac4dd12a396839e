"""Case builders: one function per op that turns shapes into a seeded ``Case``.

Every builder draws its inputs from the generator it is given (CPU, fp32), so a
case is reproducible from its id alone. Weights are scaled by ``1/sqrt(K)`` so
activations stay O(1) whatever the shape. Large stacked expert weights are made
from one random expert whose rows are permuted and whose scales are jittered
per expert: every expert differs (a kernel that reads the wrong expert is
caught) but only one expert's worth of random numbers is drawn.
"""

from __future__ import annotations

import torch

from chitu_core.quant import FORMAT_UNQUANTIZED, QuantizedWeight, quantize_fp8
from conformance.case import COMPUTE_DTYPE, Case

# Expert stacks with more elements than this are built from one permuted expert.
POOLED_EXPERT_ELEMENTS = 1 << 26


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Standard normal ``shape`` fp32 times ``scale``."""
    values = torch.randn(*shape, generator=gen)
    return values if scale == 1.0 else values.mul_(scale)  # in place: real-size weights are big


def weight(gen: torch.Generator, fmt: str, *shape: int) -> QuantizedWeight:
    """A random ``[N, K]`` or ``[E, N, K]`` weight in ``fmt``, std ``1/sqrt(K)``."""
    if len(shape) == 3 and shape[0] * shape[1] * shape[2] > POOLED_EXPERT_ELEMENTS:
        return _pooled_experts(gen, fmt, *shape)
    dense = randn(gen, *shape, scale=shape[-1] ** -0.5)
    if fmt == FORMAT_UNQUANTIZED:
        return QuantizedWeight(dense, None, fmt)
    return quantize_fp8(dense, fmt)


def _pooled_experts(gen: torch.Generator, fmt: str, experts: int, n: int, k: int):
    base = weight(gen, fmt, n, k)
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(experts)])
    stacked = base.weight[perms]  # [E, N, K]: expert e holds the base rows in its own order
    jitter = 0.5 + torch.rand(experts, generator=gen)  # per-expert scale in [0.5, 1.5)
    if base.scale is None:
        return QuantizedWeight(stacked * jitter[:, None, None], None, fmt)
    scale = base.scale.unsqueeze(0) * jitter.view(-1, *([1] * base.scale.dim()))
    return QuantizedWeight(stacked, scale.contiguous(), fmt)


def paged(
    gen: torch.Generator, context_lens: list[int], block_size: int, heads: int, dims: list[int]
):
    """A paged cache holding ``context_lens`` tokens per sequence in shuffled blocks.

    Returns ``(caches, block_tables [B, max_blocks] int32, context_lens [B] int32)``.
    Block 0 is reserved, as engines keep it for padding, and unused table
    entries point at it; like every block it holds random values, so a kernel
    that reads past a sequence's blocks gets garbage, not zeros.
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in context_lens]
    num_blocks = 1 + sum(blocks_per_seq)
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    max_blocks = max(blocks_per_seq + [1])
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    start = 0
    for b, count in enumerate(blocks_per_seq):
        tables[b, :count] = order[start : start + count].int()
        start += count
    caches = [randn(gen, num_blocks, block_size, heads, d) for d in dims]
    return caches, tables, torch.tensor(context_lens, dtype=torch.int32)


def cu_seqlens(q_lens: list[int]) -> torch.Tensor:
    """``[B + 1]`` int32 prefix sums of ``q_lens``."""
    return torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def linear_case(
    fmt: str, m: int, n: int, k: int, bias: bool, *, label: str = "", model: str = ""
) -> Case:
    """``linear`` of an ``[N, K]`` weight in ``fmt`` on ``[M, K]`` activations."""

    def build(gen):
        return {
            "x": randn(gen, m, k),
            "weight": weight(gen, fmt, n, k),
            "bias": randn(gen, n) if bias else None,
        }

    name = f"{label + ',' if label else ''}{fmt},M={m},N={n},K={k},bias={bias}"
    return Case("linear", name, build, ("x", "bias"), ("weight",), ("x",), model=model)


def route_case(
    name: str,
    tokens: int,
    experts: int,
    top_k: int,
    scoring: str,
    groups: int,
    topk_groups: int,
    bias: bool,
    scaling: float,
    renormalize: bool,
    *,
    model: str = "",
) -> Case:
    """``moe_route`` of ``[T, E]`` router logits."""

    def build(gen):
        return {
            "router_logits": randn(gen, tokens, experts),
            "top_k": top_k,
            "scoring": scoring,
            "renormalize": renormalize,
            "num_groups": groups,
            "topk_groups": topk_groups,
            "correction_bias": randn(gen, experts, scale=0.5) if bias else None,
            "routed_scaling_factor": scaling,
        }

    return Case("moe_route", name, build, token_inputs=("router_logits",), model=model)


def fused_moe_case(
    fmt: str, tokens: int, experts: int, hidden: int, inter: int, top_k: int, *, model: str = ""
) -> Case:
    """``fused_moe`` with softmax-top-k routing over ``E`` stacked SwiGLU experts."""

    def build(gen):
        logits = randn(gen, tokens, experts)
        weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
        return {
            "x": randn(gen, tokens, hidden),
            "w13": weight(gen, fmt, experts, 2 * inter, hidden),
            "w2": weight(gen, fmt, experts, hidden, inter),
            "topk_weights": weights,
            "topk_ids": ids.int(),
        }

    return Case(
        "fused_moe",
        f"{fmt},T={tokens},E={experts},H={hidden},I={inter},k={top_k}",
        build,
        ("x",),
        ("w13", "w2"),
        ("x", "topk_weights", "topk_ids"),
        model=model,
    )


def decode_case(
    context_lens: list[int],
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    *,
    label: str = "",
    model: str = "",
) -> Case:
    """``paged_attention_decode``: one query per sequence over ``context_lens`` cached tokens."""

    def build(gen):
        (k, v), tables, lens = paged(gen, context_lens, block_size, hkv, [d, d])
        return {
            "q": randn(gen, len(context_lens), hq, d),
            "key_cache": k,
            "value_cache": v,
            "block_tables": tables,
            "context_lens": lens,
            "scale": d**-0.5,
        }

    ctx = label or str(context_lens)
    name = f"ctx={ctx},Hq={hq},Hkv={hkv},D={d},bs={block_size}"
    return Case(
        "paged_attention_decode",
        name,
        build,
        ("q", "key_cache", "value_cache"),
        model=model,
    )


def prefill_case(
    q_lens: list[int],
    context_lens: list[int],
    hq: int,
    hkv: int,
    d: int,
    block_size: int,
    *,
    label: str = "",
    model: str = "",
) -> Case:
    """``paged_attention_prefill``: ``q_lens`` new tokens at the end of ``context_lens``."""

    def build(gen):
        (k, v), tables, lens = paged(gen, context_lens, block_size, hkv, [d, d])
        return {
            "q": randn(gen, sum(q_lens), hq, d),
            "key_cache": k,
            "value_cache": v,
            "block_tables": tables,
            "cu_seqlens_q": cu_seqlens(q_lens),
            "context_lens": lens,
            "scale": d**-0.5,
        }

    shape = label or f"q={q_lens},ctx={context_lens}"
    name = f"{shape},Hq={hq},Hkv={hkv},D={d},bs={block_size}"
    return Case(
        "paged_attention_prefill",
        name,
        build,
        ("q", "key_cache", "value_cache"),
        model=model,
    )


def mla_case(
    op: str,
    q_lens: list[int] | None,
    context_lens: list[int],
    heads: int,
    rank: int,
    rope: int,
    block_size: int,
    *,
    label: str = "",
    model: str = "",
) -> Case:
    """``mla_decode`` (``q_lens`` None) or ``mla_prefill`` over a latent cache."""

    def build(gen):
        (cache,), tables, lens = paged(gen, context_lens, block_size, 1, [rank + rope])
        tokens = sum(q_lens) if q_lens is not None else len(context_lens)
        inputs = {
            "q_latent": randn(gen, tokens, heads, rank),
            "q_rope": randn(gen, tokens, heads, rope),
            "latent_cache": cache,
            "block_tables": tables,
            "context_lens": lens,
            "scale": (rank + rope) ** -0.5,
        }
        if q_lens is not None:
            inputs["cu_seqlens_q"] = cu_seqlens(q_lens)
        return inputs

    shape = label or f"q={q_lens},ctx={context_lens}"
    name = f"{shape},H={heads},R={rank},P={rope},bs={block_size}"
    activations = ("q_latent", "q_rope", "latent_cache")
    return Case(op, name, build, activations, model=model)


def store_kv_case(
    tokens: int,
    heads: int,
    d: int,
    with_value: bool,
    num_blocks: int = 6,
    block_size: int = 8,
    *,
    model: str = "",
) -> Case:
    """``store_kv`` of ``T`` tokens into distinct random slots of a zeroed cache."""

    def build(gen):
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        shape = (num_blocks, block_size, heads, d)
        return {
            "key": randn(gen, tokens, heads, d),
            "value": randn(gen, tokens, heads, d) if with_value else None,
            "key_cache": torch.zeros(shape),
            "value_cache": torch.zeros(shape) if with_value else None,
            "slot_mapping": slots.long(),
        }

    return Case(
        "store_kv",
        f"T={tokens},H={heads},D={d},value={with_value}",
        build,
        ("key", "value", "key_cache", "value_cache"),
        model=model,
    )


def rope_case(
    tokens: int,
    hq: int,
    hk: int,
    d: int,
    rot: int,
    neox: bool,
    max_pos: int = 64,
    *,
    model: str = "",
) -> Case:
    """``rope`` on the leading ``rot`` channels of ``[T, Hq, D]``/``[T, Hk, D]``."""

    def build(gen):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
        angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None]
        return {
            "q": randn(gen, tokens, hq, d),
            "k": randn(gen, tokens, hk, d),
            "positions": torch.randint(0, max_pos, (tokens,), generator=gen),
            "cos_sin_cache": torch.cat([angles.cos(), angles.sin()], -1).float(),
            "is_neox_style": neox,
        }

    name = f"T={tokens},Hq={hq},Hk={hk},D={d},R={rot},neox={neox}"
    return Case("rope", name, build, ("q", "k"), (), ("q", "k", "positions"), model=model)


def rms_norm_case(m: int, d: int, *, model: str = "") -> Case:
    """``rms_norm`` of ``[M, D]`` with a weight near 1."""

    def build(gen):
        return {"x": randn(gen, m, d, scale=3.0), "weight": randn(gen, d) + 1, "eps": 1e-6}

    return Case("rms_norm", f"M={m},D={d}", build, ("x", "weight"), (), ("x",), model=model)


def add_rms_norm_case(m: int, d: int, *, model: str = "") -> Case:
    """``add_rms_norm`` of a sublayer output and a residual, both ``[M, D]``."""

    def build(gen):
        return {
            "x": randn(gen, m, d, scale=2.0),
            "residual": randn(gen, m, d, scale=3.0),
            "weight": randn(gen, d) + 1,
            "eps": 1e-6,
        }

    name = f"M={m},D={d}"
    return Case("add_rms_norm", name, build, ("x", "residual", "weight"), (), ("x", "residual"),
                model=model)  # fmt: skip


def silu_case(m: int, inter: int, *, model: str = "") -> Case:
    """``silu_and_mul`` of ``[M, 2I]``."""

    def build(gen):
        return {"x": randn(gen, m, 2 * inter, scale=2.0)}

    return Case("silu_and_mul", f"M={m},I={inter}", build, ("x",), (), ("x",), model=model)


def sample_case(batch: int, vocab: int, *, model: str = "") -> Case:
    """Deterministic rows only: temperature 0, or top_k = 1 (both are the argmax)."""

    def build(gen):
        logits = randn(gen, batch, vocab, scale=3.0)
        if batch:
            logits[0, :3] = logits[0].max() + 1  # a tie: the lowest id must win
        temps = torch.where(torch.arange(batch) % 2 == 0, 0.0, 0.7)
        return {
            "logits": logits,
            "temperatures": temps.float(),
            "top_ps": torch.full((batch,), 0.9),
            "top_ks": torch.where(temps == 0, 0, 1).int(),
            "generators": [None] * batch,
        }

    return Case("sample", f"B={batch},V={vocab}", build, model=model)


def allocate_kv_cache_case(num_blocks: int, block_size: int, heads: int, d: int) -> Case:
    """``allocate_kv_cache``: shape, zeros and the run's dtype, compared exactly."""

    def build(gen):
        return {
            "num_blocks": num_blocks,
            "block_size": block_size,
            "num_kv_heads": heads,
            "head_dim": d,
            "dtype": COMPUTE_DTYPE,
            "device": None,
        }

    return Case("allocate_kv_cache", f"blocks={num_blocks},bs={block_size},H={heads},D={d}", build)


def capture_graph_case(m: int, d: int) -> Case:
    """``capture_graph`` of an RMSNorm: the replay must see the refilled input buffer."""

    def build(gen):
        return {
            "x": randn(gen, m, d),
            "weight": randn(gen, d) + 1,
            "x_next": randn(gen, m, d, scale=2.0),
            "device": None,
        }

    return Case("capture_graph", f"rms_norm,M={m},D={d}", build, ("x", "weight", "x_next"))
