"""The engine end to end on a tiny Llama: continuous batching, preemption, stops, no leaks."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="builds the tiny checkpoint")

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from chitu_core.engine.sampling import SamplingParams  # noqa: E402

VOCAB = 512  # the llama_dir checkpoint's (conftest.py)
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(path, **kwargs):
    kwargs.setdefault("num_blocks", 128)
    return LLMEngine(
        EngineConfig(model=path, backend="cpu_ref", block_size=4, show_progress=False, **kwargs)
    )


def _prompts(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB - 4, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 30, (count,), generator=gen)
    ]


def _alone(engine, prompt, params=GREEDY):
    return engine.generate([prompt], params)[0].token_ids


def test_batched_equals_each_alone_with_mid_way_joins(llama_dir):
    engine = _engine(llama_dir)
    prompts = _prompts(6)
    expected = [_alone(engine, p) for p in prompts]
    # Three start together; the others join while those are decoding.
    ids = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    outputs: dict[int, list[int]] = {i: [] for i in range(6)}
    seq_index = dict(zip(ids, range(3), strict=True))
    steps = 0
    while engine.has_unfinished() or len(seq_index) < 6:
        if steps in (2, 5, 9) and len(seq_index) < 6:
            k = len(seq_index)
            seq_index[engine.add_request(prompts[k], GREEDY)] = k
        for out in engine.step():
            outputs[seq_index[out.seq_id]].append(out.token_id)
        steps += 1
    assert [outputs[i] for i in range(6)] == expected
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_preemption_with_tiny_pool_gives_identical_tokens(llama_dir):
    prompts = _prompts(5, seed=3)
    reference = _engine(llama_dir)
    expected = [_alone(reference, p) for p in prompts]
    # 16 usable blocks x 4 tokens = 64 tokens for 5 sequences of up to ~53 tokens each.
    tiny = _engine(llama_dir, num_blocks=17, max_model_len=64)
    results = tiny.generate(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected
    assert tiny.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    tiny.block_manager.check_invariants([])
    assert tiny.block_manager.num_free_blocks == tiny.block_manager.num_usable_blocks


def test_seeded_sampling_is_reproducible_and_batch_independent(llama_dir):
    engine = _engine(llama_dir)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = _prompts(1, seed=5)[0]
    alone = _alone(engine, prompt, params)
    others = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    batch = engine.generate(
        [_prompts(1, seed=6)[0], prompt, _prompts(1, seed=7)[0]], [others, params, others]
    )
    assert batch[1].token_ids == alone


def test_stop_strings_max_tokens_and_text(llama_dir):
    engine = _engine(llama_dir)
    prompt = _prompts(1, seed=9)[0]
    full = engine.generate([prompt], GREEDY)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == GREEDY.max_tokens
    assert full.text == engine.tokenizer.decode(full.token_ids)
    # Stop at a piece of text the greedy continuation is known to produce.
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), "the fixed-seed continuation should contain printable text to stop on"
    stopped = engine.generate(
        [prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]


def test_abort_frees_blocks_and_context_limit_is_enforced(llama_dir):
    engine = _engine(llama_dir, max_model_len=40)
    seq_id = engine.add_request(_prompts(1)[0], GREEDY)
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    assert engine.abort(seq_id)
    engine.block_manager.check_invariants([])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    with pytest.raises(ValueError, match="context"):
        engine.add_request(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([VOCAB + 5], GREEDY)
    # Generation stops at the context length with finish_reason "length".
    long = engine.generate(
        [list(range(30))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    )[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 10


def test_logprobs_match_log_softmax(llama_dir):
    engine = _engine(llama_dir)
    prompt = _prompts(1, seed=11)[0]
    out = engine.generate(
        [prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=3)
    )[0]
    assert len(out.logprobs) == 3
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.top[0][0] == out.token_ids[0]  # greedy picks the most likely token
    assert first.logprob == pytest.approx(first.top[0][1])
    assert all(a[1] >= b[1] for a, b in zip(first.top, first.top[1:], strict=False))
