"""Llama / Qwen2 / Mistral vs HF transformers (fp32, tiny random checkpoints saved by HF itself)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

from chitu_core.demo_tokenizer import write_demo_tokenizer  # noqa: E402
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from chitu_core.engine.sampling import SamplingParams  # noqa: E402

VOCAB = 512
# fp32 on both sides; the only differences are summation order in matmuls and
# softmax (ours in fp64 on cpu_ref): ~1e-6 relative, so 1e-4 absolute on logits of
# magnitude ~1 leaves a wide margin without hiding a real bug (a wrong rope or
# mask moves logits by > 1e-2).
LOGIT_ATOL = 1e-4

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

ARCHS = {
    "llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(tie_word_embeddings=True),
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_theta=1000000.0)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=None),
    ),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    config_cls, model_cls, extra = ARCHS[request.param]
    torch.manual_seed(0)
    config = config_cls(**(COMMON | extra))
    model = model_cls(config).eval()
    if request.param == "qwen2":  # HF initialises biases to zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    write_demo_tokenizer(path, VOCAB)
    return path, model


def _engine(path, **kwargs):
    return LLMEngine(
        EngineConfig(
            model=path,
            backend="cpu_ref",
            num_blocks=64,
            block_size=8,
            show_progress=False,
            **kwargs,
        )
    )


ALL_OPS = (
    "prepare_weight",
    "linear",
    "fused_moe",
    "rms_norm",
    "rope",
    "silu_and_mul",
    "store_kv",
    "paged_attention_prefill",
    "paged_attention_decode",
    "sample",
)


@pytest.mark.parametrize("ops_kind", ["cpu_ref", "generic"])
def test_logits_and_greedy_match_hf(checkpoint, ops_kind):
    path, hf = checkpoint
    engine = _engine(path, demote_ops=ALL_OPS if ops_kind == "generic" else ())
    assert (engine.ops.native & set(ALL_OPS)) == (set() if ops_kind == "generic" else set(ALL_OPS))
    prompt = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(1)).tolist()

    out = engine.generate(
        [prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    )[0]
    with torch.no_grad():
        hf_logits = hf(torch.tensor([prompt])).logits[0, -1]
        hf_tokens = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    assert out.token_ids == hf_tokens

    # First-step logits through the runner (the batch path the engine uses).
    logits = _prefill_logits(engine, prompt)
    diff = (logits - hf_logits).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |logit diff| {diff:.2e}"


def _prefill_logits(engine, prompt):
    from chitu_core.engine.sequence import Sequence

    seq = Sequence(10_000, prompt, 1)
    engine.block_manager.allocate(seq, len(prompt))
    try:
        return engine.runner.execute([seq], [len(prompt)])[0]
    finally:
        engine.block_manager.free(seq)


def test_quantize_fp8_at_load_stays_close(checkpoint):
    path, _ = checkpoint
    fp32 = _engine(path)
    fp8 = _engine(path, quantize="fp8")
    assert fp8.model.layers[0].qkv.fmt == "fp8_block128"
    prompt = list(range(5, 25))
    a, b = _prefill_logits(fp32, prompt), _prefill_logits(fp8, prompt)
    # e4m3 keeps 3 mantissa bits: ~2-3% relative error per weight, averaging out over K.
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < rel < 0.1, rel
