"""How device memory is split at start-up: weights, activations, KV cache, graphs.

Order (``LLMEngine.__init__``): load the weights; on an accelerator run one
prefill of ``max_num_batched_tokens`` over a one-block dummy cache so that the
caching allocator holds the activation peak; then give the KV cache what is
free minus ``(1 - memory_utilization) * total`` (the headroom left for decode
graphs and the driver); capture the decode graphs; log one line with it all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.models.base import ForwardBatch, KVCacheLayout

logger = logging.getLogger(__name__)

GIB = 1 << 30
# Host memory is shared with everything else on the machine: take a modest share.
CPU_KV_CACHE_FRACTION = 0.25
CPU_KV_CACHE_MAX_BYTES = 4 * GIB
# --max-num-seqs default: up to this many sequences a batch (decode graphs up to it), as
# long as the KV cache holds that many sequences of TYPICAL_SEQ_TOKENS each; never below
# MIN_DEFAULT_MAX_NUM_SEQS (the scheduler preempts when blocks run out, so a small cache
# still serves that many, as before the default grew).
DEFAULT_MAX_NUM_SEQS = 256
MIN_DEFAULT_MAX_NUM_SEQS = 64
TYPICAL_SEQ_TOKENS = 1024
# Attributes of a model that are not weights (bound ops, rope tables, configs).
_NOT_WEIGHTS = ("ops", "cos_sin", "cfg", "parallel")


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable from ``obj``'s attributes: a model's weights,
    including backend weight handles (any object with tensor attributes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if isinstance(obj, torch.nn.Module):
        children = {**vars(obj), **dict(obj.named_parameters()), **dict(obj.named_buffers())}
        return sum(tensor_bytes(v, seen) for k, v in children.items() if k not in _NOT_WEIGHTS)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if k not in _NOT_WEIGHTS)
    return 0


@torch.inference_mode()
def profile_prefill(
    model: Any,
    ops: Any,
    device: torch.device,
    dtype: torch.dtype,
    layout: KVCacheLayout,
    block_size: int,
    num_tokens: int,
) -> int:
    """Run one prefill of ``num_tokens`` (token 0 everywhere) over a one-block dummy cache.

    Every slot and table entry points at that block: the contract allows
    repeated slots, and attention reads whatever it holds. A pipeline stage after
    the first starts from zero hidden states (the stages run it side by side, no
    transfer between them; tensor-parallel ranks run their collectives as in a
    real step). Returns the device
    memory the run took (free before minus free after): the caching allocator
    keeps the peak, which later steps reuse. Only meaningful on accelerators.
    """
    caches = []
    for _ in range(layout.num_layers):
        key = ops.allocate_kv_cache(
            1, block_size, layout.num_kv_heads, layout.key_dim, dtype, device
        )
        value = None
        if layout.value_dim is not None:
            value = ops.allocate_kv_cache(
                1, block_size, layout.num_kv_heads, layout.value_dim, dtype, device
            )
        caches.append((key, value))
    free_before, _ = ops.memory_info(device)
    num_blocks = -(-num_tokens // block_size)

    def tensor(values: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(values, dtype=dtype).to(device)

    batch = ForwardBatch(
        input_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        positions=torch.arange(num_tokens, dtype=torch.int64, device=device),
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=device),
        block_tables=torch.zeros(1, num_blocks, dtype=torch.int32, device=device),
        context_lens=tensor([num_tokens], torch.int32),
        cu_seqlens_q=tensor([0, num_tokens], torch.int32),
        last_token_indices=tensor([num_tokens - 1], torch.int64),
        is_decode=num_tokens == 1,
    )
    hidden = None
    parallel = getattr(model, "parallel", None)
    if parallel is not None and not parallel.is_first_stage:  # a later pipeline stage
        hidden = torch.zeros(num_tokens, model.hidden_size, dtype=dtype, device=device)
    model(batch, caches, hidden)
    ops.synchronize(device)
    free_after, _ = ops.memory_info(device)
    return max(0, free_before - free_after)


def choose_num_blocks(
    ops: Any,
    device: torch.device,
    layout: KVCacheLayout,
    dtype: torch.dtype,
    block_size: int,
    num_blocks: int | None = None,
    kv_cache_gb: float | None = None,
    memory_utilization: float = 0.9,
    max_useful_blocks: int | None = None,
) -> int:
    """Number of KV blocks: explicit, from a byte budget, or from the device's free memory.

    On accelerators (after the weights are loaded and the prefill profiled) the
    budget is ``free - (1 - memory_utilization) * total``: the whole device at
    most ``memory_utilization`` full. On the host a quarter of available RAM, at
    most 4 GiB. A budget is never turned into more than ``max_useful_blocks``
    (every sequence at full length).
    """
    bytes_per_block = layout.bytes_per_token(dtype) * block_size
    if num_blocks is not None:
        chosen = num_blocks
    else:
        if kv_cache_gb is not None:
            budget = int(kv_cache_gb * GIB)
        else:
            free, total = ops.memory_info(device)
            if device.type == "cpu":
                budget = min(int(free * CPU_KV_CACHE_FRACTION), CPU_KV_CACHE_MAX_BYTES)
            else:
                budget = int(free - (1.0 - memory_utilization) * total)
                if budget < 2 * bytes_per_block:
                    raise ValueError(
                        f"no device memory left for the KV cache: {free / GIB:.2f} GiB free of "
                        f"{total / GIB:.2f} GiB after weights and activations, and "
                        f"--gpu-memory-utilization {memory_utilization} keeps "
                        f"{(1 - memory_utilization) * total / GIB:.2f} GiB free (raise it, lower "
                        "--max-num-batched-tokens, or use more GPUs)"
                    )
        chosen = budget // bytes_per_block
        if max_useful_blocks is not None:
            chosen = min(chosen, max_useful_blocks)
    if chosen < 2:
        raise ValueError(
            f"KV cache too small: {chosen} blocks of {bytes_per_block} bytes "
            "(raise --kv-cache-gb or --num-blocks; block 0 is reserved)"
        )
    return chosen


def choose_max_num_seqs(
    requested: int | None, num_blocks: int, block_size: int, max_model_len: int
) -> tuple[int, str]:
    """Sequences per batch: ``requested`` if given, else ``DEFAULT_MAX_NUM_SEQS`` lowered to
    the number of ``min(max_model_len, TYPICAL_SEQ_TOKENS)``-token sequences the KV cache of
    ``num_blocks`` blocks holds (block 0 is scratch), but not below
    ``MIN_DEFAULT_MAX_NUM_SEQS``. Returns it with the reason the start-up log gives."""
    if requested is not None:
        return requested, "--max-num-seqs"
    seq_tokens = min(max_model_len, TYPICAL_SEQ_TOKENS)
    fits = (num_blocks - 1) // -(-seq_tokens // block_size)
    chosen = max(MIN_DEFAULT_MAX_NUM_SEQS, min(DEFAULT_MAX_NUM_SEQS, fits))
    why = (
        f"default {DEFAULT_MAX_NUM_SEQS}"
        if chosen == DEFAULT_MAX_NUM_SEQS
        else f"default {DEFAULT_MAX_NUM_SEQS} lowered"
    )
    return chosen, f"{why}: the KV cache holds {fits} sequences of {seq_tokens} tokens"


@dataclass(frozen=True)
class MemoryPlan:
    """What the start-up log line reports (bytes; graphs filled in once captured)."""

    weight_bytes: int
    activation_bytes: int
    kv_bytes: int
    num_blocks: int
    block_size: int
    max_model_len: int
    max_num_seqs: int = 0
    max_num_seqs_reason: str = ""

    @property
    def max_full_length_seqs(self) -> int:
        """Sequences of ``max_model_len`` tokens the cache holds at once (block 0 is scratch)."""
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        return (self.num_blocks - 1) // blocks_per_seq

    def describe(self) -> str:
        return (
            f"weights {self.weight_bytes / GIB:.2f} GiB, activations "
            f"{self.activation_bytes / GIB:.2f} GiB, KV cache {self.kv_bytes / GIB:.2f} GiB = "
            f"{self.num_blocks} blocks x {self.block_size} tokens "
            f"({self.max_full_length_seqs} concurrent sequences of {self.max_model_len} tokens); "
            f"max_num_seqs {self.max_num_seqs} ({self.max_num_seqs_reason})"
        )
