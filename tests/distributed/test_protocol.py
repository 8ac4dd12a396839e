"""The pieces of the distributed step that need no second process: rank layout and
the step message encoding."""

from __future__ import annotations

import pytest
import torch

from chitu_core.distributed.parallel import RankLayout
from chitu_core.distributed.step_sync import (
    CMD_PING,
    CMD_STEP,
    CONTROL_LEN,
    HEADER_LEN,
    INLINE_PAYLOAD,
    StepChannel,
    control_message,
    header,
    patch_input_ids,
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


def batch_sizes(batch: ForwardBatch) -> tuple[int, int, int, int]:
    """``(T, B, max_blocks, is_decode)`` of a batch, as the header carries them (read off
    the batch itself, independently of ``ModelRunner.host_payload``)."""
    num_seqs, max_blocks = batch.block_tables.shape
    return batch.input_ids.shape[0], num_seqs, max_blocks, int(batch.is_decode)


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
    head = header(CMD_STEP, payload, batch_sizes(batch))
    info = head.tolist()
    assert len(info) == HEADER_LEN and info[:3] == [CMD_STEP, 1, payload.shape[0]]
    assert info[7] == 0  # the input ids are in the payload
    [out] = unpack(payload, 1, sizes=tuple(info[3:7]))
    _same(batch, out)
    assert out.payload is not None and torch.equal(out.payload, payload)
    with pytest.raises(ValueError):  # a wrong size cannot pass unnoticed
        unpack(payload, 1, sizes=(info[3] + 1, *info[4:7]))
    with pytest.raises(ValueError):
        unpack(torch.cat([payload, payload]), 2, sizes=tuple(info[3:7]))


class _Wire:
    """Stand-in for stage 0's two transports: the host control group's messages from rank 0
    and the TP group's all-gather on the device. What the leader sends, the follower gets, in
    order; shapes must agree, as the collectives require."""

    def __init__(self) -> None:
        self.host: list[torch.Tensor] = []
        self.device: list[torch.Tensor] = []

    def state(self, leader: bool):
        wire = self

        def exchange(queue: list[torch.Tensor], tensor: torch.Tensor) -> torch.Tensor:
            if leader:
                queue.append(tensor.clone())
                return tensor
            got = queue.pop(0)
            assert got.shape == tensor.shape, "the ranks' collectives differ in size"
            return got

        class State:
            layout = RankLayout(tp=2, pp=1, rank=0 if leader else 1)
            device = torch.device("cpu")

            def send_control(self, tensor: torch.Tensor) -> None:
                assert leader and tensor.device.type == "cpu", "rank 0 sends host tensors"
                wire.host.append(tensor.clone())

            def recv_control(self, tensor: torch.Tensor) -> torch.Tensor:
                assert not leader and tensor.device.type == "cpu"
                tensor.copy_(exchange(wire.host, tensor))
                return tensor

            def from_stage_leader(self, tensor: torch.Tensor) -> torch.Tensor:
                return exchange(wire.device, tensor)

        return State()


def test_stage_message_goes_by_the_host_and_device_ids_by_the_device() -> None:
    """Header and payload go over the control group; input ids the leader has only on the
    device follow by the device all-gather and land in the follower's payload; PING
    carries nothing else."""
    wire = _Wire()
    leader, follower = StepChannel(wire.state(True)), StepChannel(wire.state(False))
    batch = _batch([3, 1], False)
    payload = _payload(batch)
    leader.share_in_stage(header(CMD_STEP, payload, batch_sizes(batch)), payload)
    assert len(wire.host) == 1 and not wire.device  # header and payload in one message
    head, info, got = follower.receive_in_stage()
    assert info[0] == CMD_STEP and torch.equal(head, torch.tensor(info))
    [out] = unpack(got, 1, sizes=tuple(info[3:7]))
    _same(batch, out)

    # A decode step queued before its ids reached the host: placeholders in the payload.
    decode = _batch([1, 1, 1], True)
    placeholders = _payload(decode)
    patch_input_ids(placeholders, torch.zeros(3, dtype=torch.int64))
    head = header(CMD_STEP, placeholders, batch_sizes(decode), ids_on_device=True)
    leader.share_in_stage(head, placeholders, decode.input_ids)
    assert len(wire.device) == 1
    _, info, got = follower.receive_in_stage()
    assert info[7] == 1
    [out] = unpack(got, 1, sizes=tuple(info[3:7]))
    _same(decode, out)

    leader.share_in_stage(header(CMD_PING, None), None)
    _, info, got = follower.receive_in_stage()
    assert info[0] == CMD_PING and got is None and not wire.host and not wire.device


def test_a_payload_longer_than_the_control_message_sends_its_rest_second() -> None:
    """A prefill chunk of 2,000 tokens (6,000+ payload values) does not fit the fixed-size
    control message: the rest follows in a second message and the follower joins them;
    """
    wire = _Wire()
    leader, follower = StepChannel(wire.state(True)), StepChannel(wire.state(False))
    batch = _batch([1500, 500], False)
    payload = _payload(batch)
    assert payload.shape[0] > INLINE_PAYLOAD
    leader.share_in_stage(header(CMD_STEP, payload, batch_sizes(batch)), payload)
    assert [t.shape[0] for t in wire.host] == [CONTROL_LEN, payload.shape[0] - INLINE_PAYLOAD]
    _, info, got = follower.receive_in_stage()
    assert torch.equal(got, payload) and not wire.host
    [out] = unpack(got, 1, sizes=tuple(info[3:7]))
    _same(batch, out)


def test_control_message_layout() -> None:
    """Header first, the payload inline after it, zero padded to the fixed size."""
    payload = torch.arange(10, dtype=torch.int64) + 1
    head = header(CMD_STEP, payload, (3, 1, 2, 1))
    message, rest = control_message(head, payload)
    assert message.shape == (CONTROL_LEN,) and rest is None
    assert torch.equal(message[:HEADER_LEN], head)
    assert torch.equal(message[HEADER_LEN : HEADER_LEN + 10], payload)
    assert not message[HEADER_LEN + 10 :].any()
