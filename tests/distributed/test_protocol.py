"""The pieces of the distributed step that need no second process: rank layout and
the step message encoding."""

from __future__ import annotations

import pytest
import torch

from chitu_core.distributed.parallel import RankLayout
from chitu_core.distributed.step_sync import (
    CMD_STEP,
    HEADER_LEN,
    batch_sizes,
    header,
    pack,
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


def test_pack_unpack_round_trip() -> None:
    batches = [_batch([3, 1], False), _batch([1, 1, 1], True)]
    out = unpack(pack(batches, torch.device("cpu")), len(batches))
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


def test_host_payload_is_the_pack_layout_and_the_header_sizes_read_it() -> None:
    """What the engine builds on the host (payload_values) is byte for byte what pack()
    makes of the batch, and the header's sizes unpack it without reading it back."""
    batch = _batch([3, 1], False)
    values = payload_values(
        batch.input_ids.tolist(), batch.positions.tolist(), batch.slot_mapping.tolist(),
        batch.block_tables.tolist(), batch.context_lens.tolist(), batch.cu_seqlens_q.tolist(),
        batch.last_token_indices.tolist(), batch.is_decode,
    )  # fmt: skip
    payload = pack([batch], torch.device("cpu"))
    assert values == payload.tolist()
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
