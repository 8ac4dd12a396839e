"""The portable Triton kernels inside whole models, under TRITON_INTERPRET=1.

Not collected by pytest: ``test_model_kernels.py`` runs this in a subprocess (the
interpreter must be on before triton is imported). The tiny demo Llama and
DeepSeek-V3 run in a real LLMEngine on cpu_ref in bf16 with every op that has a
portable kernel replaced by it (attention decode/prefill, MLA, fused MoE,
store_kv, rms_norm, rope, silu_and_mul), and go through the conformance
whole-model check against cpu_ref in fp32: what the NVIDIA backend runs on a GPU,
wired the same way, on the CPU.
"""

from __future__ import annotations

import sys

import torch

import chitu_core.engine.llm_engine as llm_engine
from chitu_core.backend import load_backend
from chitu_core.kernels import (
    fused_moe,
    mla_decode,
    paged_decode,
    paged_prefill,
    small_ops,
    store_kv,
)
from chitu_core.kernels.packed_weight import as_packed
from conformance import model_check


def _moe(x, w13, w2, topk_weights, topk_ids):
    w13, w2 = as_packed(w13), as_packed(w2)
    return fused_moe.fused_moe(
        x, w13.weight, w13.scale, w2.weight, w2.scale, w13.fmt, topk_weights, topk_ids
    )


def _rope_dtype(fn):  # the plugin casts q_rope to the cache dtype (the kernels' contract)
    def call(q_latent, q_rope, latent_cache, *rest):
        return fn(q_latent, q_rope.to(latent_cache.dtype), latent_cache, *rest)

    return call


KERNELS = {
    "paged_attention_decode": paged_decode.paged_attention_decode,
    "paged_attention_prefill": paged_prefill.paged_attention_prefill,
    "mla_decode": _rope_dtype(mla_decode.mla_decode),
    "mla_prefill": _rope_dtype(paged_prefill.mla_prefill),
    "fused_moe": _moe,
    "store_kv": store_kv.store_kv,
    "rms_norm": small_ops.rms_norm,
    "rope": small_ops.rope,
    "silu_and_mul": small_ops.silu_and_mul,
}


def load_with_kernels(name: str = "auto", demote=(), options=None):
    ops = load_backend(name, demote, options)
    for op, kernel in KERNELS.items():
        setattr(ops, op, kernel)
    return ops


def main() -> int:
    for arch in model_check.ARCHS:
        model_check.reference_trace(arch)  # the oracle, before the kernels go in
    llm_engine.load_backend = load_with_kernels
    failed = False
    for result in model_check.check_models("cpu_ref", (), torch.bfloat16):
        print(
            f"{result.arch}: passed={result.passed} rel_fro={result.rel_fro:.2e} "
            f"tokens={result.tokens_compared} {result.message}"
        )
        failed |= not result.passed or result.tokens_compared < 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
