"""Decode-graph bucketing, padding and replay, checked on the CPU against eager decoding.

The CPU backends have no device graphs, so a stand-in capture is used that keeps
what matters to the engine: the replay returns the SAME output tensor every
time (rewritten in place), and it must be consumed before the next replay.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from chitu_core.demo_model import write_demo_model
from chitu_core.distributed.model_parallel import ModelParallel
from chitu_core.engine.decode_graphs import DecodeGraphs, decode_buckets
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
from chitu_core.engine.runner import ModelRunner
from chitu_core.engine.sampling import SamplingParams
from chitu_core.engine.sequence import Sequence
from chitu_core.loader import load_model


def test_buckets_are_powers_of_two_then_the_maximum():
    assert decode_buckets(1) == [1]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError):
        decode_buckets(0)


class StaticOutputCapture:
    """A capture whose replay rewrites one output tensor in place, counting replays by batch."""

    def __init__(self, ops):
        self.ops = ops
        self.replays: Counter[int] = Counter()

    def capture_graph(self, fn, device):
        out = fn()
        size = out.shape[0]

        def replay():
            self.replays[size] += 1
            out.copy_(fn())
            return out

        return replay

    def __getattr__(self, name):
        return getattr(self.ops, name)


@pytest.fixture(scope="module", params=["llama", "deepseek_v3"])
def model_dir(request, tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp(request.param), request.param, "tiny")


def _engine(path):
    config = EngineConfig(
        model=path, backend="cpu_ref", block_size=4, num_blocks=96, max_num_seqs=5,
        show_progress=False,
    )  # fmt: skip
    return LLMEngine(config)


def _requests():
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (3, 9, 1, 14, 6, 2, 7)]
    # Different lengths, so the decode batch shrinks through every bucket (and padding).
    params = [
        SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
        for m in (2, 16, 5, 9, 3, 11, 7)
    ]
    return prompts, params


def _generate(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.seq_id].append(out.token_id)
    return [tokens[i] for i in ids]


def test_graph_replays_give_the_eager_tokens(model_dir):
    prompts, params = _requests()
    eager = _generate(_engine(model_dir), prompts, params)

    engine = _engine(model_dir)
    capture = StaticOutputCapture(engine.ops)
    runner = engine.runner
    runner.graphs = DecodeGraphs(
        runner.model, capture, runner.device, runner.kv_caches, 5, -(-engine.max_model_len // 4)
    )
    runner.graphs.capture()
    assert sorted(runner.graphs._replays) == [1, 2, 4, 5]
    assert _generate(engine, prompts, params) == eager
    # Every bucket replayed, including padded ones (3 sequences run in bucket 4).
    assert set(capture.replays) == {1, 2, 4, 5}
    # 7 running sequences exceed the largest bucket: those steps ran eagerly.
    assert sum(capture.replays.values()) < sum(p.max_tokens for p in params)


def _sequence(token_ids: list[int], computed: int, block_ids: list[int]) -> Sequence:
    seq = Sequence(0, token_ids, max_tokens=4)
    seq.num_computed_tokens, seq.block_ids = computed, block_ids
    return seq


def test_prefill_and_oversized_batches_are_not_replayed(model_dir):
    engine = _engine(model_dir)
    runner = engine.runner
    graphs = DecodeGraphs(
        runner.model, SimpleNamespace(**vars(engine.ops)), runner.device, runner.kv_caches, 2, 8
    )
    graphs._replays = {1: None, 2: None}
    seq = _sequence([1, 2, 3], computed=0, block_ids=[1])
    assert graphs.bucket_for(runner.build_batch([seq], [3])) is None  # prefill
    seq.num_computed_tokens = 2
    assert graphs.bucket_for(runner.build_batch([seq], [1])) == 1
    assert graphs.bucket_for(runner.build_batch([seq, seq, seq], [1, 1, 1])) is None
    seq.block_ids = list(range(1, 10))  # wider than the captured table
    assert graphs.bucket_for(runner.build_batch([seq], [1])) is None


def test_padding_rows_point_at_the_scratch_slot(model_dir):
    engine = _engine(model_dir)
    runner = engine.runner
    graphs = DecodeGraphs(
        runner.model, StaticOutputCapture(engine.ops), runner.device, runner.kv_caches, 4, 6
    )
    graphs.capture()

    def seq(n, blocks):
        return _sequence([7] * n, computed=n - 1, block_ids=blocks)

    full = [seq(9, [1, 2, 3]), seq(5, [4, 5]), seq(2, [6]), seq(13, [7, 8, 9, 10])]
    graphs.replay(runner.build_batch(full, [1] * 4), 4)
    logits = graphs.replay(runner.build_batch(full[:3], [1] * 3), 4)
    assert logits.shape[0] == 3
    assert graphs.slot_mapping[3].item() == 0 and graphs.input_ids[3].item() == 0
    assert graphs.positions[3].item() == 0 and graphs.context_lens[3].item() == 1
    assert not graphs.block_tables[3].any()
    assert graphs.block_tables[0].tolist() == [1, 2, 3, 0, 0, 0]  # stale width cleared
    assert graphs.slot_mapping[:3].tolist() == [3 * 4 + 0, 5 * 4 + 0, 6 * 4 + 1]


@pytest.mark.parametrize("stage", [0, 1])
def test_pipeline_stages_replay_their_own_layers(model_dir, stage):
    """Each of two pipeline stages captures its layers: stage 0 returns hidden states,
    stage 1 reads them from its static buffer (padding rows zeroed) and returns logits;
    replays equal the eager stage forward."""
    ops = _engine(model_dir).ops
    model, _ = load_model(
        model_dir, ops, torch.float32, show_progress=False,
        parallel=ModelParallel(pp_size=2, pp_rank=stage),
    )  # fmt: skip
    runner = ModelRunner(model, ops, torch.device("cpu"), torch.float32, 32, 4)
    graphs = DecodeGraphs(
        model, StaticOutputCapture(ops), runner.device, runner.kv_caches, 4, 6, torch.float32
    )
    graphs.capture()
    assert (graphs.hidden is None) == (stage == 0)
    seqs = [
        _sequence([5] * 9, 8, [1, 2, 3]),
        _sequence([9] * 3, 2, [4]),
        _sequence([2] * 6, 5, [5, 6]),
    ]
    batch = runner.build_batch(seqs, [1, 1, 1])
    hidden = (
        None
        if stage == 0
        else torch.randn(3, model.hidden_size, generator=torch.Generator().manual_seed(3))
    )
    eager = model(batch, runner.kv_caches, hidden).clone()
    replayed = graphs.replay(batch, 4, hidden)  # bucket 4: one padding row
    assert replayed.shape == eager.shape == ((3, model.hidden_size) if stage == 0 else eager.shape)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    if stage == 1:
        assert not graphs.hidden[3].any()  # the padding row's input
        with pytest.raises(ValueError, match="hidden_states"):
            graphs.replay(batch, 4)
