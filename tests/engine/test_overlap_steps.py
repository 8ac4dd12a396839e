"""Decode steps queued ahead of the host (``EngineConfig.overlap_steps``): the same tokens,
stops, logprobs and bookkeeping as serial steps, on a tiny Llama with cpu_ref."""

from __future__ import annotations

import pytest
import torch

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine, StepError
from chitu_core.engine.sampling import SamplingParams

VOCAB = 512  # the llama_dir checkpoint's (conftest.py)


def _engine(path, overlap: bool, **kwargs):
    kwargs.setdefault("num_blocks", 128)
    return LLMEngine(
        EngineConfig(
            model=path,
            backend="cpu_ref",
            block_size=4,
            show_progress=False,
            overlap_steps=overlap,
            **kwargs,
        )
    )


def _prompts(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB - 4, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 30, (count,), generator=gen)
    ]


class QueuedAheadCounter:
    """Counts the steps the engine queued with input ids still on the device."""

    def __init__(self, engine: LLMEngine) -> None:
        self.count = 0
        execute = engine.executor.execute

        def counting(seqs, num_new_tokens, input_ids_on_device=None):
            self.count += input_ids_on_device is not None
            return execute(seqs, num_new_tokens, input_ids_on_device)

        engine.executor.execute = counting


def _run(engine, prompts, params):
    """Every step's outputs, per request in order: (tokens, texts, finish reason)."""
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    index = {seq_id: k for k, seq_id in enumerate(ids)}
    tokens = [[] for _ in ids]
    texts = [[] for _ in ids]
    reasons = [None] * len(ids)
    while engine.has_unfinished():
        for out in engine.step():
            k = index[out.seq_id]
            assert reasons[k] is None, "an output after the request finished"
            tokens[k].append(out.token_id)
            texts[k].append(out.text)
            if out.finished:
                reasons[k] = out.finish_reason
    engine.scheduler.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    return tokens, ["".join(t) for t in texts], reasons


def _mixed_params(count):
    """Greedy requests that stop in every way: max_tokens, eos-like stop tokens, stop strings."""
    out = []
    for k in range(count):
        kind = k % 3
        if kind == 0:
            out.append(SamplingParams(max_tokens=3 + 5 * k, temperature=0.0, ignore_eos=True))
        elif kind == 1:  # stops on the first of many common tokens (early, data dependent)
            out.append(
                SamplingParams(
                    max_tokens=40, temperature=0.0, stop_token_ids=list(range(0, VOCAB, 7))
                )
            )
        else:
            out.append(SamplingParams(max_tokens=30, temperature=0.0, stop=["e", "a"]))
    return out


def test_overlapped_steps_give_the_serial_outputs(llama_dir):
    prompts, params = _prompts(7), _mixed_params(7)
    serial = _run(_engine(llama_dir, overlap=False), prompts, params)
    engine = _engine(llama_dir, overlap=True)
    counter = QueuedAheadCounter(engine)
    overlapped = _run(engine, prompts, params)
    assert overlapped == serial
    assert counter.count > 10  # the decode steps really were queued ahead
    reasons = serial[2]
    assert {"length", "stop"} <= set(reasons)


def test_seeded_sampling_and_logprobs_are_unchanged(llama_dir):
    prompts = _prompts(4, seed=5)
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=s, logprobs=3)
        for s in range(4)
    ]
    results = []
    for overlap in (False, True):
        engine = _engine(llama_dir, overlap=overlap)
        done = engine.generate(prompts, params)
        results.append(
            [
                (c.token_ids, [(lp.token_id, round(lp.logprob, 5)) for lp in c.logprobs])
                for c in done
            ]
        )
        for c in done:  # each logprob belongs to the token that was emitted
            assert [lp.token_id for lp in c.logprobs] == c.token_ids
    assert results[0] == results[1]


def test_context_limit_and_tight_cache_preemption(llama_dir):
    prompts = _prompts(5, seed=3)
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)] * 5
    # 20 blocks of 4 tokens for 5 sequences growing to ~80 tokens: preemption; and a
    # 48-token context finishes some sequences for length mid-way.
    kwargs = dict(num_blocks=21, max_model_len=48)
    serial = _run(_engine(llama_dir, overlap=False, **kwargs), prompts, params)
    engine = _engine(llama_dir, overlap=True, **kwargs)
    overlapped = _run(engine, prompts, params)
    assert overlapped == serial
    assert set(serial[2]) == {"length"}
    assert engine.scheduler.num_preemptions > 0


def test_abort_while_a_step_is_queued_ahead(llama_dir):
    engine = _engine(llama_dir, overlap=True)
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompts = _prompts(3, seed=9)
    expected = _engine(llama_dir, overlap=False).generate(prompts[1:], greedy)
    ids = [engine.add_request(p, greedy) for p in prompts]
    counter = QueuedAheadCounter(engine)
    tokens = {i: [] for i in ids}
    for _ in range(4):
        for out in engine.step():
            tokens[out.seq_id].append(out.token_id)
    assert engine._pending is not None  # the next step is on the device already
    assert engine.abort(ids[0])
    while engine.has_unfinished():
        for out in engine.step():
            assert out.seq_id != ids[0], "output for an aborted request"
            tokens[out.seq_id].append(out.token_id)
    assert len(tokens[ids[0]]) == 4
    assert [tokens[i] for i in ids[1:]] == [c.token_ids for c in expected]
    assert counter.count > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


@pytest.mark.parametrize("arrival_step", [1, 4])
def test_requests_arriving_mid_decode_are_admitted_next_step(llama_dir, arrival_step):
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = _prompts(3, seed=11)
    engine = _engine(llama_dir, overlap=True)
    first = [engine.add_request(p, greedy) for p in prompts[:2]]
    steps, late = 0, None
    late_first_token_step = None
    while engine.has_unfinished() or late is None:
        if steps == arrival_step:
            late = engine.add_request(prompts[2], greedy)
        outputs = engine.step()
        steps += 1
        if late is not None and late_first_token_step is None:
            if any(out.seq_id == late for out in outputs):
                late_first_token_step = steps
    # The step queued before the arrival comes out first, then the step that prefills it.
    assert late_first_token_step == arrival_step + 2
    assert first and engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks


def test_penalties_are_applied_with_every_token_known(llama_dir):
    prompts = _prompts(3, seed=2)
    params = SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.5)
    serial = _engine(llama_dir, overlap=False).generate(prompts, params)
    engine = _engine(llama_dir, overlap=True)
    counter = QueuedAheadCounter(engine)
    overlapped = engine.generate(prompts, params)
    assert [c.token_ids for c in overlapped] == [c.token_ids for c in serial]
    assert counter.count == 0  # a penalty needs the previous token on the host


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_step_fails_its_sequences_after_the_step_before_is_delivered(llama_dir, overlap):
    engine = _engine(llama_dir, overlap=overlap)
    execute, calls = engine.executor.execute, []

    def faulty(seqs, num_new_tokens, *args):
        calls.append(len(seqs))
        if len(calls) == 4:  # the prefill, then the third decode step
            raise RuntimeError("injected backend fault")
        return execute(seqs, num_new_tokens, *args)

    engine.executor.execute = faulty
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, greedy) for p in _prompts(2, seed=4)]
    tokens = {i: 0 for i in ids}
    with pytest.raises(StepError) as failure:
        for _ in range(10):
            for out in engine.step():
                tokens[out.seq_id] += 1
    # Whether step 4 was queued ahead or not: three tokens each, then the failure.
    assert tokens == {i: 3 for i in ids}
    assert sorted(failure.value.seq_ids) == sorted(ids)
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
