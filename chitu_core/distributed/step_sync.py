"""How a step's batch travels from rank 0 to the ranks that run it.

Rank 0 alone schedules; every other rank runs its part of the same forward
on the batch rank 0 built. A step is encoded as two int64 tensors:

* a header ``[command, num_batches, payload_len, T, B, max_blocks, is_decode,
  ids_on_device]`` of fixed size (the sizes of the first batch: with them a
  receiver unpacks the payload without reading it), and
* for ``STEP`` a payload with the ``ForwardBatch``:
  ``[T, B, max_blocks, is_decode]`` then ``input_ids [T]``, ``positions [T]``,
  ``slot_mapping [T]``, ``block_tables [B * max_blocks]``, ``context_lens [B]``,
  ``cu_seqlens_q [B + 1]``, ``last_token_indices [B]``.

The engine builds every batch from such a payload (``payload_values`` on the host,
one copy to the device, ``unpack``). A decode step queued before the previous
step's tokens reached the host (``EngineConfig.overlap_steps``) has placeholder
input ids in the payload and ``ids_on_device`` set: the ids are patched in on the
device (``patch_input_ids``).

Within stage 0 the TP ranks get header and payload from rank 0 over the host
(``ParallelState.control_group``, gloo) as one fixed-size message (``control_message``;
a payload too long for it sends its rest in a second one): a follower learns the next
step while its device still runs the current one, and queues it at once, without a
read back from the device. Input ids that only the device holds follow by an
all-gather of the TP group on the device, queued on both sides between the two
steps. Later stages get the step from their predecessor together with the
hidden states (device tensors), so the control flows with the data and stages
never wait for each other's unrelated work. ``PING`` (sent while the server is
idle) keeps every wait inside the collective timeout and shows rank 0 that the
others are alive; ``STOP`` ends them.
"""

from __future__ import annotations

import torch

from chitu_core.engine.host_copy import to_device_async
from chitu_core.models.base import ForwardBatch

CMD_STOP, CMD_STEP, CMD_PING = 0, 1, 2
HEADER_LEN = 8
# Payload values carried in the control message itself: a decode step of B sequences
# takes 6 B + 5 + B x (table width) values, so 64 sequences of up to 57 blocks (912
# tokens at block 16) fit; longer tables and prefill chunks send their rest second.
INLINE_PAYLOAD = 4088
CONTROL_LEN = HEADER_LEN + INLINE_PAYLOAD  # 32 KiB
_BATCH_FIELDS = 4  # T, B, max_blocks, is_decode
INPUT_IDS_AT = _BATCH_FIELDS  # where input_ids begin in a batch's payload


def header(
    command: int,
    payload: torch.Tensor | None,
    sizes: tuple[int, int, int, int] = (0, 0, 0, 0),
    ids_on_device: bool = False,
) -> torch.Tensor:
    """The fixed-size header (on the host) announcing ``command``, the payload's length,
    the first batch's ``(T, B, max_blocks, is_decode)`` and whether its input ids follow
    on the device."""
    length = 0 if payload is None else payload.shape[0]
    values = [command, int(payload is not None), length, *sizes, int(ids_on_device)]
    return torch.tensor(values, dtype=torch.int64)


def control_message(
    head: torch.Tensor, payload: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed-size control message ``[CONTROL_LEN]`` (header, then up to
    ``INLINE_PAYLOAD`` payload values, zero padded) and the rest of a longer payload
    (None if it fit). Fixed size: a receiver must know a message's size before it arrives."""
    message = torch.zeros(CONTROL_LEN, dtype=torch.int64)
    message[:HEADER_LEN] = head
    if payload is None:
        return message, None
    inline = min(payload.shape[0], INLINE_PAYLOAD)
    message[HEADER_LEN : HEADER_LEN + inline] = payload[:inline]
    rest = payload[INLINE_PAYLOAD:].clone() if payload.shape[0] > INLINE_PAYLOAD else None
    return message, rest


def patch_input_ids(payload: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Write ``input_ids`` ``[T]`` into a one-batch ``payload`` (on the same device)."""
    payload[INPUT_IDS_AT : INPUT_IDS_AT + input_ids.shape[0]].copy_(input_ids)


def payload_values(
    input_ids: list[int],
    positions: list[int],
    slot_mapping: list[int],
    block_tables: list[list[int]],
    context_lens: list[int],
    cu_seqlens_q: list[int],
    last_token_indices: list[int],
    is_decode: bool,
) -> list[int]:
    """One batch's payload as host ints (``block_tables``: B rows of equal length)."""
    max_blocks = len(block_tables[0]) if block_tables else 0
    values = [len(input_ids), len(block_tables), max_blocks, int(is_decode)]
    values += input_ids
    values += positions
    values += slot_mapping
    for row in block_tables:
        values += row
    values += context_lens
    values += cu_seqlens_q
    values += last_token_indices
    return values


def unpack(
    payload: torch.Tensor,
    num_batches: int,
    sizes: tuple[int, int, int, int] | None = None,
) -> list[ForwardBatch]:
    """The batches of ``payload`` (``num_batches`` payloads back to back), on its device. ``sizes``: the single
    batch's ``(T, B, max_blocks, is_decode)`` when known (the header's); otherwise they
    are read from the payload (one device-to-host copy). Every batch keeps its slice
    of the payload as ``ForwardBatch.payload``."""
    if sizes is not None and num_batches != 1:
        raise ValueError("sizes describe one batch; unpack several from the payload alone")
    host = payload.cpu() if sizes is None else None
    batches, at = [], 0

    def take(count: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal at
        out = payload[at : at + count].to(dtype)
        at += count
        return out

    for _ in range(num_batches):
        begin = at
        if host is None:
            tokens, num_seqs, max_blocks, is_decode = sizes
        else:
            tokens, num_seqs, max_blocks, is_decode = host[at : at + _BATCH_FIELDS].tolist()
        at += _BATCH_FIELDS
        batches.append(
            ForwardBatch(
                input_ids=take(tokens, torch.int64),
                positions=take(tokens, torch.int64),
                slot_mapping=take(tokens, torch.int64),
                block_tables=take(num_seqs * max_blocks, torch.int32).view(num_seqs, max_blocks),
                context_lens=take(num_seqs, torch.int32),
                cu_seqlens_q=take(num_seqs + 1, torch.int32),
                last_token_indices=take(num_seqs, torch.int64),
                is_decode=bool(is_decode),
                payload=payload[begin:at],
            )
        )
    if at != payload.shape[0]:
        raise ValueError(f"step payload of {payload.shape[0]} values, {at} expected")
    return batches


class StepChannel:
    """This rank's ends of the step transport (``state``: its ``ParallelState``)."""

    def __init__(self, state) -> None:
        self.state = state
        self.layout = state.layout

    # -- within stage 0: rank 0 -> its TP peers ----------------------------------------
    def share_in_stage(
        self,
        head: torch.Tensor,
        payload: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
    ) -> None:
        """Rank 0: hand the header and payload (host tensors) to the other TP ranks of
        stage 0 as one control message (``control_message``; the rest of a longer payload
        in a second), then the input ids ``[T]`` the device holds when the header says so."""
        if self.layout.tp == 1:
            return
        message, rest = control_message(head, payload)
        self.state.send_control(message)
        if rest is not None:
            self.state.send_control(rest)
        if input_ids is not None:
            self.state.from_stage_leader(input_ids)

    def receive_in_stage(self) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """A TP rank of stage 0 other than rank 0: the next header (host), its values and
        the payload on the device, if any, with the input ids patched in when they came
        by the device."""
        message = self.state.recv_control(torch.zeros(CONTROL_LEN, dtype=torch.int64))
        head = message[:HEADER_LEN]
        info = head.tolist()
        if info[0] != CMD_STEP:
            return head, info, None
        length = info[2]
        host = message[HEADER_LEN : HEADER_LEN + length]
        if length > INLINE_PAYLOAD:
            rest = self.state.recv_control(torch.zeros(length - INLINE_PAYLOAD, dtype=torch.int64))
            host = torch.cat([host, rest])
        payload = to_device_async(host, self.state.device)
        if info[7]:
            placeholder = torch.zeros(info[3], dtype=torch.int64, device=self.state.device)
            patch_input_ids(payload, self.state.from_stage_leader(placeholder))
        return head, info, payload

    # -- between stages: stage s -> stage s + 1, same TP rank --------------------------
    def send_next(
        self, head: torch.Tensor, payload: torch.Tensor | None, hidden: torch.Tensor | None
    ) -> None:
        """Pass the header (host or device) and the payload and hidden states (device, the
        input ids in place) on to the next stage."""
        stage = self.layout.pp_rank + 1
        head = head.clone()
        head[7] = 0  # the next stage reads the ids from the payload
        if head.device != self.state.device:
            head = to_device_async(head, self.state.device)
        self.state.send_to_stage(head, stage)
        if payload is not None:
            self.state.send_to_stage(payload, stage)
            self.state.send_to_stage(hidden, stage)

    def receive_prev(
        self, hidden_size: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[int], torch.Tensor | None, torch.Tensor | None]:
        """A stage after the first: the next header, its host values, the payload and
        the hidden states ``[T, D]``."""
        device, stage = self.state.device, self.layout.pp_rank - 1
        head = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
        self.state.recv_from_stage(head, stage)
        info = head.tolist()
        if info[0] != CMD_STEP:
            return head, info, None, None
        num_tokens = info[3]  # T of the batch (see ``header``)
        payload = torch.zeros(info[2], dtype=torch.int64, device=device)
        self.state.recv_from_stage(payload, stage)
        hidden = torch.empty((num_tokens, hidden_size), dtype=dtype, device=device)
        self.state.recv_from_stage(hidden, stage)
        return head, info, payload, hidden
