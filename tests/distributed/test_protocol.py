"""The pieces of the distributed step that need no second process: rank layout and
the step message encoding."""

from __future__ import annotations

import pytest
import torch

from chitu_core.distributed.parallel import RankLayout
from chitu_core.distributed.step_sync import (
    CMD_PING,
    CMD_STEP,
    HEADER_LEN,
    INLINE_LEN,
    StepChannel,
    batch_sizes,
    header,
    payload_values,
    unpack,
)
from chitu_core.models.base import ForwardBatch


def test_rank_layout_keeps_tp_groups_contiguous() -> None:
    layout = RankLayout(tp=8, pp=2, rank=11)
    assert (layout.tp_rank, layout.pp_rank) == (3, 1)
    assert layout.stage_ranks(1) == list(range(8, 16))
    assert layout.pipeline_ranks(3) == [3, 11]
    assert layout.peer(0) == 3
    with pytest.raises(ValueError):
        RankLayout(tp=2, pp=2, rank=4)


def _batch(lengths: list[int], decode: bool) -> ForwardBatch:
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ForwardBatch(
        input_ids=torch.arange(total) + 7,
        positions=torch.arange(total),
        slot_mapping=torch.arange(total) + 100,
        block_tables=torch.arange(len(lengths) * 3, dtype=torch.int32).view(len(lengths), 3),
        context_lens=torch.tensor(lengths, dtype=torch.int32) + 2,
        cu_seqlens_q=cu,
        last_token_indices=cu[1:].long() - 1,
        is_decode=decode,
    )


def _payload(*batches: ForwardBatch) -> torch.Tensor:
    """The batches' payloads back to back, built the way the engine builds one."""
    values: list[int] = []
    for b in batches:
        values += payload_values(
            b.input_ids.tolist(), b.positions.tolist(), b.slot_mapping.tolist(),
            b.block_tables.tolist(), b.context_lens.tolist(), b.cu_seqlens_q.tolist(),
            b.last_token_indices.tolist(), b.is_decode,
        )  # fmt: skip
    return torch.tensor(values, dtype=torch.int64)


def test_payload_round_trip() -> None:
    batches = [_batch([3, 1], False), _batch([1, 1, 1], True)]
    out = unpack(_payload(*batches), len(batches))
    for a, b in zip(batches, out, strict=True):
        assert a.is_decode == b.is_decode
        for field in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens",
                      "cu_seqlens_q", "last_token_indices"):  # fmt: skip
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and torch.equal(x, y), field


def _same(a: ForwardBatch, b: ForwardBatch) -> None:
    assert a.is_decode == b.is_decode
    for field in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens",
                  "cu_seqlens_q", "last_token_indices"):  # fmt: skip
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), field


def test_host_payload_is_the_documented_layout_and_the_header_sizes_read_it() -> None:
    """What the engine builds on the host (payload_values) is the layout step_sync
    documents, field after field, and the header's sizes unpack it without reading it back."""
    batch = _batch([3, 1], False)
    values = payload_values(
        batch.input_ids.tolist(), batch.positions.tolist(), batch.slot_mapping.tolist(),
        batch.block_tables.tolist(), batch.context_lens.tolist(), batch.cu_seqlens_q.tolist(),
        batch.last_token_indices.tolist(), batch.is_decode,
    )  # fmt: skip
    # [T, B, max_blocks, is_decode], input_ids, positions, slot_mapping, block_tables,
    # context_lens, cu_seqlens_q, last_token_indices
    assert values == [4, 2, 3, 0, 7, 8, 9, 10, 0, 1, 2, 3, 100, 101, 102, 103,
                      0, 1, 2, 3, 4, 5, 5, 3, 0, 3, 4, 2, 3]  # fmt: skip
    payload = torch.tensor(values, dtype=torch.int64)
    head = header(CMD_STEP, payload, torch.device("cpu"), batch_sizes(batch))
    info = head.tolist()
    assert len(info) == HEADER_LEN and info[:3] == [CMD_STEP, 1, payload.shape[0]]
    [out] = unpack(payload, 1, sizes=tuple(info[3:7]))
    _same(batch, out)
    assert out.payload is not None and torch.equal(out.payload, payload)
    with pytest.raises(ValueError):  # a wrong size cannot pass unnoticed
        unpack(payload, 1, sizes=(info[3] + 1, *info[4:7]))
    with pytest.raises(ValueError):
        unpack(torch.cat([payload, payload]), 2, sizes=tuple(info[3:7]))


class _Wire:
    """Stand-in for a TP group's all-gather: what the leader sends, the follower gets
    (shapes must agree, as NCCL's all-gather requires)."""

    def __init__(self) -> None:
        self.sent: list[torch.Tensor] = []

    def state(self, leader: bool):
        wire = self

        class State:
            layout = RankLayout(tp=2, pp=1, rank=0 if leader else 1)
            device = torch.device("cpu")

            def from_stage_leader(self, tensor: torch.Tensor) -> torch.Tensor:
                if leader:
                    wire.sent.append(tensor.clone())
                    return tensor
                got = wire.sent.pop(0)
                assert got.shape == tensor.shape, "the ranks' all-gathers differ in size"
                return got

        return State()


@pytest.mark.parametrize("lengths", [[3, 1], [INLINE_LEN // 2, INLINE_LEN // 2 + 1]])
def test_stage_message_inline_or_in_a_second_collective(lengths) -> None:
    """A payload that fits rides in the header's all-gather (one collective per step);
    a longer one (a long prefill) follows in a second; PING carries none."""
    wire = _Wire()
    leader, follower = StepChannel(wire.state(True)), StepChannel(wire.state(False))
    batch = _batch(lengths, False)
    payload = _payload(batch)
    leader.share_in_stage(
        header(CMD_STEP, payload, torch.device("cpu"), batch_sizes(batch)), payload
    )
    assert len(wire.sent) == (1 if payload.shape[0] <= INLINE_LEN else 2)
    head, info, got = follower.receive_in_stage()
    assert info[0] == CMD_STEP and torch.equal(head, torch.tensor(info))
    [out] = unpack(got, 1, sizes=tuple(info[3:7]))
    _same(batch, out)
    leader.share_in_stage(header(CMD_PING, None, torch.device("cpu")), None)
    _, info, got = follower.receive_in_stage()
    assert info[0] == CMD_PING and got is None and not wire.sent
