"""The pieces of the distributed step that need no second process: rank layout and
the step message encoding."""

from __future__ import annotations

import pytest
import torch

from chitu_core.distributed.parallel import RankLayout
from chitu_core.distributed.step_sync import pack, unpack
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
