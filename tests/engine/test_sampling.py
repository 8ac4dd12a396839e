"""SamplingParams validation and the Sampler: seeds, top-k/top-p/min-p masks, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from chitu_core.backend import Ops, load_backend
from chitu_core.backend_info import BackendInfo
from chitu_core.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_penalties,
    make_generator,
)
from chitu_core.ops import GENERIC_OPS

CPU = torch.device("cpu")


def _generic_ops() -> Ops:
    info = BackendInfo(
        name="generic", device_type="cpu", dist_backend="gloo", compute_dtype="float32"
    )
    return Ops(info, GENERIC_OPS, native=())


@pytest.fixture(scope="module", params=["generic", "cpu_ref"])
def sampler(request) -> Sampler:
    ops = _generic_ops() if request.param == "generic" else load_backend("cpu_ref")
    return Sampler(ops, CPU)


def _run(sampler, logits, params, generators=None, outputs=None, prompts=None):
    batch = logits.shape[0]
    return sampler(
        logits,
        params,
        generators if generators is not None else [None] * batch,
        outputs if outputs is not None else [[] for _ in range(batch)],
        prompts if prompts is not None else [[] for _ in range(batch)],
    )


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -1),
        ("min_p", 1.5),
        ("seed", 1 << 64),
        ("seed", "7"),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("stop", ("a", "b", "c", "d", "e")),
        ("stop", ("",)),
        ("stop", ("x" * 201,)),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", 5),
        ("stop", None),
        ("logprobs", 21),
        ("logprobs", -1),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_normalise_lists_and_defaults():
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[3])
    assert params.stop == ("a", "bc") and params.stop_token_ids == (3,)
    assert SamplingParams(stop="###").stop == ("###",)
    assert hash(params) == hash(SamplingParams(stop=("a", "bc"), stop_token_ids=(3,)))
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams().uses_penalties


# ---------------------------------------------------------------------------- seeds


def test_seed_reproducible_and_independent_of_batch(sampler):
    vocab = 64
    torch.manual_seed(0)
    steps = [torch.randn(4, vocab) for _ in range(6)]
    seeded = SamplingParams(seed=1234, top_k=40)

    def run(rows: list[int], params: list[SamplingParams], seeds: list[int | None]) -> list[int]:
        generators = [None if s is None else make_generator(s, CPU) for s in seeds]
        picks = []
        for logits in steps:
            out = _run(sampler, logits[rows], params, generators)
            picks.append(out.token_ids[0])
        return picks

    alone = run([0], [seeded], [1234])
    again = run([0], [seeded], [1234])
    in_batch = run(
        [0, 1, 2, 3],
        [
            seeded,
            SamplingParams(),
            SamplingParams(temperature=0.5, seed=9),
            SamplingParams(top_p=0.5),
        ],
        [1234, None, 9, None],
    )
    assert alone == again == in_batch
    assert run([0], [seeded], [4321]) != alone  # 6 draws over ~40 tokens: a different seed differs


# ---------------------------------------------------------------------------- masks


def _draws(
    sampler, logits_row: torch.Tensor, params: SamplingParams, num_rows: int = 400
) -> set[int]:
    """Distinct tokens over ``num_rows`` seeded draws from the same row."""
    logits = logits_row.expand(num_rows, -1).clone()
    out = _run(
        sampler, logits, [params] * num_rows, [make_generator(i, CPU) for i in range(num_rows)]
    )
    return set(out.token_ids)


def test_top_k_never_yields_excluded_tokens(sampler):
    logits = torch.tensor([0.0, 2.0, 0.1, 1.9, 1.8, 0.2, 0.3, 0.0])  # top 3: ids 1, 3, 4
    assert _draws(sampler, logits, SamplingParams(top_k=3)) == {1, 3, 4}


def test_top_p_never_yields_excluded_tokens(sampler):
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    # mass before id 3 is 0.5 < 0.75 (kept); before id 2 it is 0.8 (dropped)
    assert _draws(sampler, probs.log(), SamplingParams(top_p=0.75)) == {1, 3}


def test_min_p_applies_after_temperature(sampler):
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()  # p / p_max = 1, 0.6, 0.2, 0.2
    assert _draws(sampler, logits, SamplingParams(min_p=0.4)) == {0, 1}
    # temperature 2 flattens to p / p_max = 1, 0.77, 0.45, 0.45: all above 0.4
    assert _draws(sampler, logits, SamplingParams(min_p=0.4, temperature=2.0)) == {0, 1, 2, 3}
    masked = apply_min_p(logits[None], [SamplingParams(min_p=0.4)])
    assert torch.isinf(masked[0, 2:]).all() and torch.equal(masked[0, :2], logits[:2])


def test_min_p_fast_path_returns_input():
    logits = torch.randn(2, 5)
    params = [SamplingParams(), SamplingParams(min_p=0.5, temperature=0)]  # greedy ignores min_p
    assert apply_min_p(logits, params) is logits


# ---------------------------------------------------------------------------- penalties


def test_repetition_penalty_hf_semantics(sampler):
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5], [-1.0, -1.5, -3.0, -4.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)] * 2
    # row 0: output token 0 (positive: 2.0 / 2); row 1: prompt token 0 (negative: -1.0 * 2)
    outputs, prompts = [[0], []], [[2], [0, 0]]
    penalised = apply_penalties(logits, params, outputs, prompts)
    expected = torch.tensor([[1.0, 1.5, -2.0, 0.5], [-2.0, -1.5, -3.0, -4.0]])
    assert torch.equal(penalised, expected)
    assert _run(sampler, logits, params, outputs=outputs, prompts=prompts).token_ids == [1, 1]
    assert _run(sampler, logits, [SamplingParams(temperature=0)] * 2).token_ids == [0, 0]


def test_presence_and_frequency_penalties_count_output_only(sampler):
    logits = torch.tensor([[3.0, 2.5, 0.0]] * 3)
    params = [
        SamplingParams(temperature=0, frequency_penalty=0.2),  # 3 - 3 * 0.2 = 2.4
        SamplingParams(temperature=0, presence_penalty=0.4),  # 3 - 0.4 = 2.6
        SamplingParams(
            temperature=0, presence_penalty=0.6, frequency_penalty=-0.1
        ),  # 3 - 0.6 + 0.3
    ]
    outputs = [[0, 0, 0, 2]] * 3
    prompts = [[1, 1, 1]] * 3  # the prompt is never counted by these two
    penalised = apply_penalties(logits, params, outputs, prompts)
    expected = torch.tensor([[2.4, 2.5, -0.2], [2.6, 2.5, -0.4], [2.7, 2.5, -0.5]])
    torch.testing.assert_close(penalised, expected)
    assert _run(sampler, logits, params, outputs=outputs, prompts=prompts).token_ids == [1, 0, 0]


def test_penalties_fast_path_and_per_row():
    logits = torch.randn(3, 6)
    plain = [SamplingParams()] * 3
    assert apply_penalties(logits, plain, [[1]] * 3, [[2]] * 3) is logits
    mixed = [SamplingParams(), SamplingParams(repetition_penalty=1.5), SamplingParams()]
    penalised = apply_penalties(
        logits, mixed, [[1, 99], [1], [1]], [[2], [2, 7], [2]]
    )  # ids >= V ignored
    assert torch.equal(penalised[[0, 2]], logits[[0, 2]])
    assert not torch.equal(penalised[1, [1, 2]], logits[1, [1, 2]])
    assert torch.equal(penalised[1, [0, 3, 4, 5]], logits[1, [0, 3, 4, 5]])


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_are_raw_log_softmax_with_sorted_top(sampler):
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.3, seed=3),
        SamplingParams(),
        SamplingParams(logprobs=0, temperature=0),
    ]
    out = _run(
        sampler, logits, params, [make_generator(3, CPU), None, None], outputs=[[1, 2], [], []]
    )
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[1] is None and out.token_ids[2] == int(logits[2].argmax())
    for row in (0, 2):
        entry = out.logprobs[row]
        assert entry.token_id == out.token_ids[row]
        assert entry.logprob == pytest.approx(expected[row, entry.token_id].item(), abs=1e-6)
    assert out.logprobs[2].top == []
    top = out.logprobs[0].top
    values, ids = expected[0].topk(5)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:], strict=False))


def test_empty_batch_and_length_mismatch(sampler):
    out = _run(sampler, torch.empty(0, 8), [])
    assert out.token_ids == [] and out.logprobs == []
    with pytest.raises(ValueError, match="generators"):
        sampler(torch.zeros(2, 8), [SamplingParams()] * 2, [None], [[], []], [[], []])
