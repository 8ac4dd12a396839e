"""Cases on the real shapes of DeepSeek-V3, Llama-3-8B and Qwen2-7B, over token counts.

"Tokens" is what each op batches over: GEMM rows, MoE tokens, decode batch
size, new tokens of a prefill. Decode batches draw their context lengths at
random under a budget of ``CONTEXT_BUDGET`` cached tokens per case (a
4096-sequence decode gets short contexts); the longest context of each model
is its own case.

--quick trims what the host must build and check (the oracle always runs on
the host, in fp64):

* accelerators: the MoE has ``QUICK_EXPERTS`` real-size FP8 experts instead of
  256 (the oracle widens every expert it touches to fp64); the longest
  contexts are decoded but not prefilled.
* the host (a CPU backend): besides the fewer token counts of ``shapes``, the
  MoE routes every token to both of ``QUICK_EXPERTS_CPU`` real-size experts,
  unquantized (materialising and dequantizing a real FP8 expert costs seconds
  in both the generic path and the oracle on two cores; FP8 experts are
  covered at small sizes and by the e4m3 cases, top-8 routing by the router
  cases), and only contexts up to ``QUICK_CPU_MAX_CONTEXT`` are run
  (Llama-3-8B's own maximum).
"""

from __future__ import annotations

import random

from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_UNQUANTIZED
from conformance import builders as b
from conformance.case import Case
from conformance.shapes import MODELS, ModelDims, token_counts

CONTEXT_BUDGET = 1 << 18  # cached tokens per decode/prefill case
MAX_DECODE_CONTEXT = 4096  # the longest context of a random decode batch
MAX_SAMPLE_ROWS = 512  # sampling and lm_head rows: the engine only samples last tokens
QUICK_EXPERTS = 32
QUICK_EXPERTS_CPU = 2
QUICK_CPU_MAX_CONTEXT = 8192
ATTENTION_BLOCK = 16  # block size of the MHA/GQA caches (the engine's default)
MLA_BLOCK = 64  # DeepSeek's FlashMLA block size


def _decode_contexts(batch: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    cap = max(1, min(MAX_DECODE_CONTEXT, CONTEXT_BUDGET // max(batch, 1)))
    return [rng.randint(1, cap) for _ in range(batch)]


def _prefill_split(tokens: int) -> tuple[list[int], list[int]]:
    """New tokens as a fresh prompt plus a chunk after a cached prefix (one sequence at T=1)."""
    if tokens == 1:
        return [1], [1]
    fresh, chunk = (tokens + 1) // 2, tokens // 2
    return [fresh, chunk], [fresh, chunk + 3 * ATTENTION_BLOCK + 5]


def _linear_cases(m: ModelDims, tokens: tuple[int, ...], quick: bool, on_cpu: bool):
    cases = []
    for lin in m.linears:
        if quick and not (lin.quick_cpu if on_cpu else lin.quick):
            continue
        counts = [t for t in tokens if lin.label != "lm_head" or t <= MAX_SAMPLE_ROWS]
        for t in counts:
            cases.append(
                b.linear_case(
                    lin.fmt, t, lin.n, lin.k, lin.bias, label=f"{m.name} {lin.label}", model=m.name
                )
            )
    return cases


def _moe_cases(m: ModelDims, tokens: tuple[int, ...], quick: bool, on_cpu: bool):
    if not m.num_experts:
        return []
    experts, fmt = m.num_experts, FORMAT_FP8_BLOCK128
    if quick:
        experts = QUICK_EXPERTS_CPU if on_cpu else QUICK_EXPERTS
        fmt = FORMAT_UNQUANTIZED if on_cpu else fmt
    cases = []
    for t in tokens:
        cases.append(
            b.route_case(
                f"{m.name},T={t},E={m.num_experts},k={m.top_k},groups={m.num_groups}/{m.topk_groups}",
                t,
                m.num_experts,
                m.top_k,
                "sigmoid",
                m.num_groups,
                m.topk_groups,
                True,
                m.routed_scaling,
                True,
                model=m.name,
            )
        )
        cases.append(
            b.fused_moe_case(
                fmt, t, experts, m.hidden, m.moe_intermediate, min(m.top_k, experts), model=m.name
            )
        )
    return cases


def _attention_cases(m: ModelDims, tokens: tuple[int, ...]) -> list[Case]:
    cases = []
    for t in tokens:
        ctx = _decode_contexts(t, seed=t)
        label = f"{t} seqs<={max(ctx)}" if t > 4 else str(ctx)
        q_lens, p_ctx = _prefill_split(t)
        if m.kv_lora_rank:
            r, p, h = m.kv_lora_rank, m.rope_dim, m.num_heads
            cases.append(
                b.mla_case("mla_decode", None, ctx, h, r, p, MLA_BLOCK, label=label, model=m.name)
            )
            cases.append(b.mla_case("mla_prefill", q_lens, p_ctx, h, r, p, MLA_BLOCK, model=m.name))
            continue
        hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
        cases.append(b.decode_case(ctx, hq, hkv, d, ATTENTION_BLOCK, label=label, model=m.name))
        cases.append(b.prefill_case(q_lens, p_ctx, hq, hkv, d, ATTENTION_BLOCK, model=m.name))
    return cases


def _longest_context_cases(m: ModelDims, quick: bool, on_cpu: bool) -> list[Case]:
    """One sequence at the model's maximum context: a decode, and a 7-token chunk at the end."""
    if quick and on_cpu and m.max_context > QUICK_CPU_MAX_CONTEXT:
        return []
    with_chunk = not quick or on_cpu
    longest, label = [m.max_context], f"longest={m.max_context}"
    if m.kv_lora_rank:
        r, p, h = m.kv_lora_rank, m.rope_dim, m.num_heads
        decode = b.mla_case(
            "mla_decode", None, longest, h, r, p, MLA_BLOCK, label=label, model=m.name
        )
        chunk = b.mla_case(
            "mla_prefill", [7], longest, h, r, p, MLA_BLOCK, label=label, model=m.name
        )
    else:
        hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
        decode = b.decode_case(longest, hq, hkv, d, ATTENTION_BLOCK, label=label, model=m.name)
        chunk = b.prefill_case([7], longest, hq, hkv, d, ATTENTION_BLOCK, label=label, model=m.name)
    return [decode, chunk] if with_chunk else [decode]


def _small_op_cases(m: ModelDims, tokens: tuple[int, ...]) -> list[Case]:
    cases = []
    for t in tokens:
        name = m.name
        cases.append(b.rms_norm_case(t, m.hidden, model=name))
        cases.append(b.add_rms_norm_case(t, m.hidden, model=name))
        cases.append(b.silu_case(t, m.intermediate, model=name))
        if m.kv_lora_rank:
            r, p, h = m.kv_lora_rank, m.rope_dim, m.num_heads
            cases.append(b.rms_norm_case(t, r, model=name))
            cases.append(b.silu_case(t, m.moe_intermediate, model=name))
            cases.append(b.rope_case(t, h, 1, p, p, False, m.max_context, model=name))
            cases.append(b.store_kv_case(t, 1, r + p, False, *_slots(t), model=name))
        else:
            hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
            rope = b.rope_case(t, hq, hkv, d, m.rope_dim, m.is_neox_rope, m.max_context, model=name)
            cases.append(rope)
            cases.append(b.store_kv_case(t, hkv, d, True, *_slots(t), model=name))
        if t <= MAX_SAMPLE_ROWS:
            cases.append(b.sample_case(t, m.vocab, model=name))
    return cases


def _slots(tokens: int) -> tuple[int, int]:
    """(num_blocks, block_size) of a cache with room for ``tokens`` plus some free slots."""
    return tokens // ATTENTION_BLOCK + 2, ATTENTION_BLOCK


def real_shape_cases(quick: bool, device_type: str) -> list[Case]:
    """Every op on the real shapes of ``shapes.MODELS`` at the run's token counts."""
    tokens = token_counts(quick, device_type)
    on_cpu = device_type == "cpu"
    cases: list[Case] = []
    for m in MODELS:
        cases += _linear_cases(m, tokens, quick, on_cpu)
        cases += _moe_cases(m, tokens, quick, on_cpu)
        cases += _attention_cases(m, tokens)
        cases += _longest_context_cases(m, quick, on_cpu)
        cases += _small_op_cases(m, tokens)
    return _unique(cases)


def _unique(cases: list[Case]) -> list[Case]:
    """Drop repeated ids (two models sharing a small-op shape), keeping the first."""
    seen: dict[str, Case] = {}
    for case in cases:
        seen.setdefault(case.id, case)
    return list(seen.values())
