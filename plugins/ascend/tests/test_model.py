"""The tiny demo Llama generates cpu_ref's greedy tokens on the ascend backend.

A real ``LLMEngine`` (scheduler, paged cache, sampling) drives the plugin's whole
forward path with the FAKE torch_npu in this process: it checks the operator
MAPPING end to end against the fake (documented semantics on the CPU), not the
hardware. The DeepSeek-V3 demo model (MLA + MoE + FP8) runs in the conformance
test's whole-model check.
"""

from __future__ import annotations

from conformance.model_check import compare_traces, reference_trace, run_model


def test_demo_llama_greedy_tokens_match_cpu_ref(fake_npu, npu_calls):
    import torch

    got = run_model("llama", "ascend", (), "bfloat16")
    ref = reference_trace("llama")
    assert got.tokens == ref.tokens  # every greedy token, both sequences (no near tie here)
    result = compare_traces("llama", got, ref, torch.bfloat16)
    assert result.passed, result.message
    print(
        f"\nllama tiny on ascend (fake): tokens {got.tokens}, logits rel_fro {result.rel_fro:.2e}"
    )
    for op in ("npu_fused_infer_attention_score", "npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul",
               "npu_swiglu", "npu_scatter_nd_update_"):  # fmt: skip
        assert npu_calls[op] > 0, op
