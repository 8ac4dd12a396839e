"""All-reduce of decode-sized tensors in one kernel of peer stores; NCCL for the rest.

Why: a TP=2 decode step of the Llama-8B shape at batch 32 all-reduces a
``[32, 4096]`` bf16 tensor (256 KB) 65 times. On 2x H200 inside the step's CUDA
graph NCCL's ring kernel takes 7.6 us (median) and its launch leaves another
~2.3 us idle before it: about 650 us of a 3.8 ms step.

How: every rank of the group owns one buffer in PyTorch symmetric memory, mapped
into the address space of every other rank of the group (NVLink or PCIe peer
access; NVLink multicast is not used). Each program of a call takes a slice of the
flattened tensor (``push_all_reduce_kernel``: 4 KB; the fused
``push_all_reduce_add_rms_norm_kernel``: one row) and

1. stores its slice into slot ``(parity, rank)`` of every peer's buffer;
2. after a barrier of the program, writes ``epoch`` into flag ``(program, rank)`` of
   every peer's buffer (one thread; release, system scope);
3. waits until flag ``(program, r)`` of its own buffer reaches ``epoch`` for every
   peer ``r`` (acquire), then sums the slices in rank order in fp32 (its own from
   registers), so every rank computes the same bits.

``epoch`` is the number of calls on the group so far (int64: it never wraps, so a
flag left behind by a program id unused for a long time still reads as old), kept in
device memory and advanced by the last program of each call (graph replays advance it
on the device).
Every rank of a TP group makes the same calls, so the counts agree across ranks.
Two slots by epoch parity: a rank can be one call ahead of a peer that is still
reading the previous call's slot, never two (it cannot finish call k+1 before the
peer has signalled k+1, which the peer does only after its call k kernel has ended).

Like NCCL, a call waits for every rank of the group to make it. A peer later than the
group's timeout aborts the kernel (``trap``): the rank's next CUDA call raises, which
the engine treats as a fatal distributed error, as it does NCCL's timeout.
``CHITU_NVIDIA_P2P_ALL_REDUCE=0`` turns the whole path off (NCCL only).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from chitu_core.ops import collectives as _generic_collectives
from chitu_nvidia.small_ops import add_rms_norm

logger = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # decode batch 64 x hidden 7168 bf16 is 896 KB; prefill goes to NCCL
MAX_GROUP_SIZE = 8
BLOCK_BYTES = 4096  # a program's slice: 256 KB -> 64 programs
MAX_PROGRAMS = MAX_BYTES // BLOCK_BYTES  # 256: a program takes BLOCK_BYTES of any dtype
MAX_ROW = 16384  # the fused kernel holds a row in registers (hidden 7168 -> 8192 lanes)
FLAGS_BYTES = 64 << 10  # int64 flags [MAX_PROGRAMS, MAX_GROUP_SIZE] (16 KB), padded
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ENV_SWITCH = "CHITU_NVIDIA_P2P_ALL_REDUCE"


@triton.jit
def _now_ns(x):
    """The GPU's global nanosecond timer (``x``: any int64 scalar, for the shape)."""
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l,l", [x], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _trap(x):
    """Abort the kernel (a sticky CUDA error that the host sees at its next call)."""
    return tl.inline_asm_elementwise("trap;\n mov.b64 $0, $1;", "=l,l", [x],
                                     dtype=tl.int64, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _exchange(
    x,  # this program's slice, elements at offs of the flattened tensor
    offs,
    mask,
    epoch,
    buf_ptr,
    flags_ptr,
    deltas_ptr,
    rank,
    timeout_ns,
    WORLD: tl.constexpr,
    ELT_BYTES: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    FLAGS_BYTES: tl.constexpr,
    MAX_WORLD: tl.constexpr,
):
    """Steps 1-3 of the module doc for one program: push ``x`` to every peer, signal,
    wait for every peer's slice and return the fp32 sum in rank order.

    Peers are addressed as offsets from this rank's buffer pointer (not as integers cast
    to pointers) so that the compiler keeps their alignment and vectorizes the stores."""
    pid = tl.program_id(0)
    # slot (parity, r) starts at element slot0 + r * SLOT of every rank's buffer
    SLOT: tl.constexpr = SLOT_BYTES // ELT_BYTES
    slot0 = FLAGS_BYTES // ELT_BYTES + (epoch % 2) * WORLD * SLOT
    for r in tl.static_range(WORLD):
        if r != rank:
            peer = tl.multiple_of(tl.load(deltas_ptr + r) // ELT_BYTES, 16)  # page-aligned
            tl.store(buf_ptr + peer + slot0 + rank * SLOT + offs, x, mask=mask)
    # Every thread's peer stores, then a barrier, then thread 0's release at system scope
    # (on sm_90 MEMBAR.ALL.SYS + the atomic): the stores are visible before the flag. With
    # a fence.acq_rel.sys in every thread before it, Llama-8B TP=2 decode ran 5% slower
    # (benchmarks/results/tp-h100x2-2026-11-26-p2p-release.txt); fp8_gemm's split-K tail
    # has the same pattern at GPU scope.
    tl.debug_barrier()
    flag_id = pid * MAX_WORLD
    for r in tl.static_range(WORLD):
        if r != rank:
            peer_flags = flags_ptr + tl.load(deltas_ptr + r) // 8
            tl.atomic_xchg(peer_flags + flag_id + rank, epoch, sem="release", scope="sys")
    acc = tl.zeros_like(x).to(tl.float32)
    for r in tl.static_range(WORLD):
        if r == rank:
            acc += x.to(tl.float32)
        else:
            start = _now_ns(epoch)
            seen = tl.atomic_add(flags_ptr + flag_id + r, 0, sem="acquire", scope="sys")
            while seen < epoch:
                if _now_ns(seen) - start > timeout_ns:
                    seen = _trap(seen)
                seen = tl.atomic_add(flags_ptr + flag_id + r, 0, sem="acquire", scope="sys")
            src = buf_ptr + slot0 + r * SLOT + seen * 0  # (ordered after the wait)
            part = tl.load(src + offs, mask=mask, other=0.0, cache_modifier=".cg")
            acc += part.to(tl.float32)
    return acc


@triton.jit
def _end_call(state_ptr, epoch):
    """The last program of the call to finish makes ``epoch`` the group's call count
    (every program read the previous count before it arrived here)."""
    ticket = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        tl.store(state_ptr, epoch)
        tl.store(state_ptr + 1, 0)


@triton.jit
def push_all_reduce_kernel(
    x_ptr,  # [numel] bf16/fp16/fp32, this rank's part; the sum is written here
    buf_ptr,  # this rank's symmetric buffer, viewed as x's dtype
    flags_ptr,  # the same buffer viewed as int64 (the flags come first)
    deltas_ptr,  # int64 [WORLD]: rank r's buffer address minus this rank's, in bytes
    state_ptr,  # int64 [2]: calls made so far on this group, programs done in this call
    rank,
    numel,
    timeout_ns,  # int64: a peer this late aborts the kernel
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    ELT_BYTES: tl.constexpr,
    SLOT_BYTES: tl.constexpr,  # MAX_BYTES
    FLAGS_BYTES: tl.constexpr,
    MAX_WORLD: tl.constexpr,
):
    """Sum ``x`` over the WORLD ranks in place, BLOCK elements a program (module doc).
    Bytes: ``numel`` elements read and written locally, stored to each of the
    ``WORLD - 1`` peers and read back from the local buffer once per peer."""
    pid = tl.program_id(0)
    offs = tl.max_contiguous(tl.multiple_of(pid * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
    mask = offs < numel
    epoch = tl.load(state_ptr) + 1
    x = tl.load(x_ptr + offs, mask=mask)
    acc = _exchange(x, offs, mask, epoch, buf_ptr, flags_ptr, deltas_ptr, rank, timeout_ns,
                    WORLD, ELT_BYTES, SLOT_BYTES, FLAGS_BYTES, MAX_WORLD)  # fmt: skip
    tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)
    _end_call(state_ptr, epoch)


@triton.jit
def push_all_reduce_add_rms_norm_kernel(
    x_ptr,  # [T, D] this rank's partial sums (contiguous)
    res_ptr,  # [T, D] the residual stream
    w_ptr,  # [D] the norm's weight
    out_ptr,  # [T, D] normed
    sum_ptr,  # [T, D] summed = residual + all-reduced x
    buf_ptr,
    flags_ptr,
    deltas_ptr,
    state_ptr,
    rank,
    D,
    eps,
    timeout_ns,
    WORLD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ELT_BYTES: tl.constexpr,
    SLOT_BYTES: tl.constexpr,
    FLAGS_BYTES: tl.constexpr,
    MAX_WORLD: tl.constexpr,
):
    """One row a program: the all-reduce of ``push_all_reduce_kernel`` (rounded to the
    compute dtype, as the all-reduce alone returns it), then ``add_rms_norm``'s rounding
    steps exactly: ``summed = dtype(residual + s)``, ``normed = dtype(dtype(summed *
    rsqrt(mean(summed^2) + eps)) * w)``. Bytes: 3 reads and 2 writes of ``T D`` elements
    locally plus the exchange."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    epoch = tl.load(state_ptr) + 1
    elt = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    acc = _exchange(x, offs, mask, epoch, buf_ptr, flags_ptr, deltas_ptr, rank, timeout_ns,
                    WORLD, ELT_BYTES, SLOT_BYTES, FLAGS_BYTES, MAX_WORLD)  # fmt: skip
    s = acc.to(elt).to(tl.float32)
    summed = (s + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(elt)
    tl.store(sum_ptr + offs, summed, mask=mask)
    sf = summed.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(sf * sf, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, ((sf * inv).to(elt).to(tl.float32) * w).to(elt), mask=mask)
    _end_call(state_ptr, epoch)


class PushAllReduce:
    """The symmetric buffer of one process group (``group``: a torch ``ProcessGroup``
    of ``2..MAX_GROUP_SIZE`` ranks on CUDA devices with peer access to each other)."""

    def __init__(self, group: Any, device: torch.device, timeout_s: float) -> None:
        from torch.distributed import _symmetric_memory as symm_mem

        self.timeout_ns = int(timeout_s * 1e9)
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        size = FLAGS_BYTES + 2 * self.world * MAX_BYTES
        self.buffer = symm_mem.empty(size, dtype=torch.uint8, device=device)
        self.buffer.zero_()  # flags start at 0, below every epoch
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(self.buffer, group.group_name)
        mine = handle.buffer_ptrs[self.rank]
        self.deltas = torch.tensor(
            [base - mine for base in handle.buffer_ptrs], dtype=torch.int64, device=device
        )
        self.views = {dtype: self.buffer.view(dtype) for dtype in DTYPES + (torch.int64,)}
        self.state = torch.zeros(2, dtype=torch.int64, device=device)  # epoch, arrivals
        self.device = device

    def takes(self, tensor: torch.Tensor) -> bool:
        """Whether this path sums ``tensor``: a contiguous bf16/fp16/fp32 tensor on this
        device of at most ``MAX_BYTES`` (the same answer on every rank of a TP group, whose
        ranks all-reduce tensors of the same shape)."""
        return (
            tensor.dtype in DTYPES
            and tensor.is_contiguous()
            and 0 < tensor.numel() * tensor.element_size() <= MAX_BYTES
            and tensor.device == self.device
        )

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place (``takes(tensor)`` must hold)."""
        block = BLOCK_BYTES // tensor.element_size()
        grid = (triton.cdiv(tensor.numel(), block),)
        push_all_reduce_kernel[grid](
            tensor, self.views[tensor.dtype], self.views[torch.int64], self.deltas,
            self.state, self.rank, tensor.numel(), self.timeout_ns, WORLD=self.world, BLOCK=block,
            ELT_BYTES=tensor.element_size(), SLOT_BYTES=MAX_BYTES, FLAGS_BYTES=FLAGS_BYTES,
            MAX_WORLD=MAX_GROUP_SIZE, num_warps=4,
        )  # fmt: skip
        return tensor

    def takes_rows(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the fused kernel serves ``x [T, D]``: ``takes(x)``, at most
        ``MAX_PROGRAMS`` rows of at most ``MAX_ROW`` elements, a contiguous residual of x's
        shape and dtype, and a ``[D]`` weight on the same device."""
        return (
            self.takes(x)
            and x.dim() == 2
            and x.shape[0] <= MAX_PROGRAMS
            and x.shape[1] <= MAX_ROW
            and residual.shape == x.shape
            and residual.dtype == x.dtype
            and residual.is_contiguous()
            and residual.device == x.device
            and weight.shape == (x.shape[1],)
            and weight.device == x.device
            and weight.dtype in DTYPES
        )

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normed, summed)`` of the all-reduced ``x`` and ``residual`` in one kernel
        (``takes_rows`` must hold); ``x`` is left as it was."""
        rows, d = x.shape
        normed, summed = torch.empty_like(x), torch.empty_like(x)
        block_d = triton.next_power_of_2(d)
        push_all_reduce_add_rms_norm_kernel[(rows,)](
            x, residual, weight.contiguous(), normed, summed, self.views[x.dtype],
            self.views[torch.int64], self.deltas, self.state, self.rank, d, float(eps),
            self.timeout_ns, WORLD=self.world, BLOCK_D=block_d, ELT_BYTES=x.element_size(),
            SLOT_BYTES=MAX_BYTES, FLAGS_BYTES=FLAGS_BYTES, MAX_WORLD=MAX_GROUP_SIZE,
            num_warps=8 if block_d >= 4096 else 4,
        )  # fmt: skip
        return normed, summed


_by_group: dict[str, PushAllReduce] = {}


def enable_for(group: Any, ranks: list[int], timeout_s: float) -> None:
    """Give ``group`` (every rank calls this for every group, in the same order) a
    ``PushAllReduce`` where all its ranks can build one; NCCL alone otherwise."""
    if (
        os.environ.get(ENV_SWITCH, "1") == "0"
        or not 2 <= len(ranks) <= MAX_GROUP_SIZE
        or dist.get_rank() not in ranks
        or dist.get_backend(group) != "nccl"
    ):
        return
    device = torch.device("cuda", torch.cuda.current_device())
    # NVLink multicast is not needed; some hosts (and the device tool's) keep it off.
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    path, error = None, None
    try:
        path = PushAllReduce(group, device, timeout_s)
    except Exception as exc:
        error = exc
    # Every rank of the group must take the same path, or the calls would not pair up.
    ok = torch.tensor([0 if path is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if int(ok.item()) == 1:
        _by_group[group.group_name] = path
        logger.info("peer-store all-reduce on for ranks %s (up to %d bytes)", ranks, MAX_BYTES)
    else:
        logger.warning(
            "peer-store all-reduce off for ranks %s (%s): NCCL only",
            ranks,
            f"{type(error).__name__}: {error}" if error else "another rank could not set it up",
        )


def all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_all_reduce``: in place, returns ``tensor``."""
    path = _by_group.get(getattr(group, "group_name", None))
    if path is not None and path.takes(tensor):
        return path(tensor)
    return _generic_collectives.all_reduce(tensor, group)


def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_all_reduce_add_rms_norm``: one kernel where the
    group has the peer-store path and the rows fit it; else ``all_reduce`` then the
    plugin's ``add_rms_norm`` (the same rounding steps, so the same bits at 2 ranks)."""
    path = _by_group.get(getattr(group, "group_name", None))
    if path is not None and path.takes_rows(x, residual, weight):
        return path.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm(all_reduce(x, group), residual, weight, eps)
