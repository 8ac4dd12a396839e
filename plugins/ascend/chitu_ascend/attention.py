"""Paged KV cache write and MHA/GQA attention through torch_npu.

The contract's cache ``[num_blocks, block_size, Hkv, D]`` (row-major) is viewed,
without a copy, as the ``(num_blocks, block_size, Hkv*D)`` "BnBsH" layout that
``npu_fused_infer_attention_score`` reads with a ``block_table``.

MLA (``chitu_mla_prefill`` / ``chitu_mla_decode``) is left to the generic op:
the contract's latent cache interleaves ``c`` and ``k_pe`` in one row
(``[..., 1, R + P]``), while the operator's MLA mode (``query_rope`` /
``key_rope``) takes them as separate contiguous tensors, and the MQA view
(value = ``c`` = the row's first R channels) is a non-contiguous value, which
the operator does not accept. Either would cost a copy of the whole cache per
layer and step.
"""

from __future__ import annotations

import functools

import torch

from chitu_ascend._npu import torch_npu
from chitu_core.ops.attention import paged_attention_decode as generic_decode
from chitu_core.ops.attention import paged_attention_prefill as generic_prefill

# sparse_mode=3 ("rightDownCausal") takes this optimised mask: 2048x2048 bool, True above the
# diagonal (masked), whatever the sequence lengths.
CAUSAL_MASK_SIZE = 2048
# Paged attention: block_size a multiple of 16 (the documented constraint for fp16/bf16).
BLOCK_SIZE_MULTIPLE = 16


@functools.cache
def _causal_mask(device: torch.device) -> torch.Tensor:
    ones = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    """See ``chitu_core.hookspecs.chitu_store_kv``: one in-place scatter per cache."""
    if (value is None) != (value_cache is None):
        raise ValueError("value and value_cache must both be given or both be None")
    if key.shape[0] == 0:
        return
    indices = slot_mapping.long().view(-1, 1)  # [T, 1]: a slot indexes the flattened blocks
    # torch_npu.npu_scatter_nd_update_(Tensor(a!) input, Tensor indices, Tensor updates)
    #     -> Tensor(a!)
    # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_001254.html
    # input[indices[i]] = updates[i], in place; indices int64 [T, 1] over input's first dim,
    # updates [T, Hkv, D] of input's dtype. The flattened view shares the cache's storage.
    npu = torch_npu()
    flat = key_cache.view(-1, *key_cache.shape[2:])  # [num_blocks*block_size, Hkv, D]
    npu.npu_scatter_nd_update_(flat, indices, key.to(key_cache.dtype))
    if value is not None:
        flat_v = value_cache.view(-1, *value_cache.shape[2:])
        npu.npu_scatter_nd_update_(flat_v, indices, value.to(value_cache.dtype))


def _fits(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Shapes the documented operator covers: Dv == D, GQA, block_size % 16 == 0, fp16/bf16."""
    return (
        value_cache.shape[-1] == key_cache.shape[-1] == q.shape[-1]
        and q.shape[1] % key_cache.shape[2] == 0
        and key_cache.shape[1] % BLOCK_SIZE_MULTIPLE == 0
        and q.dtype in (torch.float16, torch.bfloat16)
        and key_cache.dtype == value_cache.dtype == q.dtype
    )


def _fused_attention(q, key_cache, value_cache, block_tables, q_lens, kv_lens, scale, causal):
    """q ``[B, S, Hq, D]`` (BSND) over the paged cache -> ``[B, S, Hq, D]``.

    q_lens / kv_lens: host lists of ``B`` ints (the operator takes them as SymInt[]).
    """
    num_blocks, block_size, num_kv_heads, head_dim = key_cache.shape
    # torch_npu.npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *,
    #     Tensor? pse_shift=None, Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None,
    #     SymInt[]? actual_seq_lengths_kv=None, ..., Tensor? block_table=None, ...,
    #     int num_heads=1, float scale=1.0, int pre_tokens=2147483647,
    #     int next_tokens=2147483647, str input_layout="BSH", int num_key_value_heads=0,
    #     int sparse_mode=0, int inner_precise=0, int block_size=0, ...) -> (Tensor, Tensor)
    # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_001232.html
    # Paged: key/value (num_blocks, block_size, Hkv*D) with block_table int32 [B, max_blocks]
    # and block_size; query BSND; actual_seq_lengths(_kv) per batch. sparse_mode=3
    # (rightDownCausal) with the 2048x2048 upper-triangular mask aligns the causal diagonal to
    # each sequence's last query/key: query i of a q_len-token chunk sees keys
    # 0 .. kv_len - q_len + i, the contract's positions. Softmax in fp32 inside the kernel.
    out, _ = torch_npu().npu_fused_infer_attention_score(
        q,
        key_cache.view(num_blocks, block_size, num_kv_heads * head_dim),
        value_cache.view(num_blocks, block_size, num_kv_heads * value_cache.shape[-1]),
        atten_mask=_causal_mask(q.device) if causal else None,
        actual_seq_lengths=q_lens,
        actual_seq_lengths_kv=kv_lens,
        block_table=block_tables.to(torch.int32),
        num_heads=q.shape[2],
        scale=scale,
        input_layout="BSND",
        num_key_value_heads=num_kv_heads,
        sparse_mode=3 if causal else 0,
        block_size=block_size,
    )
    return out


def paged_attention_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_decode``. q ``[B, Hq, D]``.

    The documented operator takes the kv lengths as host integers (SymInt[]):
    ``context_lens.tolist()`` is one host sync per call, against the contract's
    "no host sync" (newer torch_npu accept a device tensor there; unverified).
    """
    if q.shape[0] == 0 or not _fits(q, key_cache, value_cache):
        return generic_decode(q, key_cache, value_cache, block_tables, context_lens, scale)
    batch = q.shape[0]
    out = _fused_attention(
        q.unsqueeze(1).contiguous(),  # [B, 1, Hq, D]
        key_cache,
        value_cache,
        block_tables,
        [1] * batch,
        context_lens.tolist(),
        scale,
        causal=False,
    )
    return out[:, 0]


def paged_attention_prefill(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_paged_attention_prefill``. q ``[T, Hq, D]`` packed.

    The packed queries are padded to ``[B, max_q_len, Hq, D]`` (BSND) and the
    padding rows dropped afterwards; the lengths are read on the host (as the
    generic op does).
    """
    if q.shape[0] == 0 or not _fits(q, key_cache, value_cache):
        return generic_prefill(
            q, key_cache, value_cache, block_tables, cu_seqlens_q, context_lens, scale
        )
    starts = cu_seqlens_q.tolist()
    q_lens = [starts[b + 1] - starts[b] for b in range(len(starts) - 1)]
    max_q = max(q_lens)
    batch, num_tokens = len(q_lens), q.shape[0]
    # token t of sequence b sits at padded row b * max_q + (t - starts[b])
    seq_of = torch.repeat_interleave(
        torch.arange(batch, device=q.device), torch.tensor(q_lens, device=q.device)
    )
    offset = torch.arange(num_tokens, device=q.device) - cu_seqlens_q.to(q.device).long()[seq_of]
    rows = seq_of * max_q + offset  # [T]
    padded = q.new_zeros(batch * max_q, *q.shape[1:])
    padded[rows] = q
    out = _fused_attention(
        padded.view(batch, max_q, *q.shape[1:]),
        key_cache,
        value_cache,
        block_tables,
        q_lens,
        context_lens.tolist(),
        scale,
        causal=True,
    )
    return out.reshape(batch * max_q, *out.shape[2:])[rows]
