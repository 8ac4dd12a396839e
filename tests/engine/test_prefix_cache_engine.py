"""Prefix caching end to end: cached and uncached engines give identical greedy tokens.

cpu_ref (fp32) on the tiny Llama and the tiny DeepSeek-V3 (MLA latent cache):
a shared system prompt, a prompt cached to its end, chunked prefill that
starts after a cached prefix, a second turn that reuses blocks written by
decode (queued ahead of the host), and a pool small enough to preempt.
"""

from __future__ import annotations

import pytest
import torch

from chitu_core.demo_model import write_demo_model
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.sampling import SamplingParams

BLOCK = 4
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("ds"), "deepseek_v3", "tiny", fp8=False)


@pytest.fixture(params=["llama", "deepseek_v3"])
def model_dir(request, llama_dir, deepseek_dir):
    return llama_dir if request.param == "llama" else deepseek_dir


def _engine(path, cached: bool, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 96)
    return LLMEngine(
        EngineConfig(
            model=path,
            backend="cpu_ref",
            block_size=BLOCK,
            show_progress=False,
            enable_prefix_caching=cached,
            **kwargs,
        )
    )


def _tokens(count: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 250, (count,), generator=gen).tolist()


def _generate(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of ``prompts`` run together, checking the invariants every step."""
    ids = [engine.add_request(p, GREEDY) for p in prompts]
    seqs = [engine._seqs[i] for i in ids]
    while engine.has_unfinished():
        engine.step()
        engine.scheduler.check_invariants()
    return [seq.output_token_ids for seq in seqs]


def _conversation(engine: LLMEngine) -> list[list[int]]:
    """Three rounds over one engine; each later round hits what the earlier ones cached."""
    system = _tokens(20, seed=1)  # 5 whole blocks
    first = _generate(engine, [system + _tokens(6, seed=2)])
    prompts = [
        system + _tokens(9, seed=3),
        system + _tokens(3, seed=4),
        list(system),  # cached to its end: its last block is recomputed
        system[:18],  # ends inside a cached block
    ]
    second = _generate(engine, prompts)
    # Second turn: the first prompt, its answer (K/V written by decode steps) and more.
    turn = system + _tokens(6, seed=2) + first[0] + _tokens(5, seed=5)
    third = _generate(engine, [turn, prompts[0] + second[0]])
    return first + second + third


def test_cached_and_uncached_give_identical_tokens(model_dir):
    uncached = _engine(model_dir, cached=False)
    expected = _conversation(uncached)
    assert uncached.block_manager.num_hit_tokens == 0
    # Chunks of 7 tokens: prefills start inside and after the cached prefix.
    cached = _engine(model_dir, cached=True, max_num_batched_tokens=7)
    assert _conversation(cached) == expected
    blocks = cached.block_manager
    # Round 2: 4 + 4 + 4 + 4 blocks of the system prompt; round 3: at least 8 + 7 blocks.
    assert blocks.num_hit_tokens >= (16 + 15) * BLOCK
    blocks.check_invariants([])
    assert blocks.num_free_blocks == blocks.num_usable_blocks


def test_preemption_with_shared_prefix_gives_identical_tokens(llama_dir):
    system = _tokens(16, seed=7)
    prompts = [system + _tokens(n, seed=8 + n) for n in (2, 5, 7, 9)]
    expected = _generate(_engine(llama_dir, cached=False), prompts)
    # 14 usable blocks of 4 tokens for 4 sequences of up to 32 tokens each.
    tiny = _engine(llama_dir, cached=True, num_blocks=15, max_model_len=56)
    assert _generate(tiny, prompts) == expected
    assert tiny.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert tiny.block_manager.num_hit_tokens > 0
