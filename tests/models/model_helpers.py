"""Helpers shared by the model tests: hand-built ForwardBatches and a greedy loop.

The engine builds batches for real (``chitu_core/engine``); these tests drive a
model directly with one sequence, so a failure points at the model alone.
"""

from __future__ import annotations

from typing import Any

import torch

from chitu_core.models.base import ForwardBatch, LayerCache


def allocate_caches(model: Any, ops: Any, num_blocks: int, block_size: int) -> list[LayerCache]:
    """One (key, value-or-None) cache pair per layer, shaped by ``model.kv_cache_layout()``."""
    layout = model.kv_cache_layout()
    caches: list[LayerCache] = []
    for _ in range(layout.num_layers):
        key = ops.allocate_kv_cache(
            num_blocks, block_size, layout.num_kv_heads, layout.key_dim, model.dtype, model.device
        )
        value = None
        if layout.value_dim is not None:
            value = ops.allocate_kv_cache(
                num_blocks,
                block_size,
                layout.num_kv_heads,
                layout.value_dim,
                model.dtype,
                model.device,
            )
        caches.append((key, value))
    return caches


def single_sequence_batch(
    token_ids: list[int], start: int, block_ids: list[int], block_size: int, device: torch.device
) -> ForwardBatch:
    """Batch of one sequence computing ``token_ids`` at positions ``start, start + 1, ...``.

    Position ``p`` lives in block ``block_ids[p // block_size]`` at offset ``p % block_size``.
    """
    count = len(token_ids)
    positions = list(range(start, start + count))
    slots = [block_ids[p // block_size] * block_size + p % block_size for p in positions]

    def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return ForwardBatch(
        input_ids=tensor(token_ids, torch.int64),
        positions=tensor(positions, torch.int64),
        slot_mapping=tensor(slots, torch.int64),
        block_tables=tensor([block_ids], torch.int32),
        context_lens=tensor([start + count], torch.int32),
        cu_seqlens_q=tensor([0, count], torch.int32),
        last_token_indices=tensor([count - 1], torch.int64),
        is_decode=count == 1,
    )


@torch.inference_mode()
def run_greedy(
    model: Any, ops: Any, prompt_ids: list[int], max_new_tokens: int, block_size: int = 16
) -> tuple[torch.Tensor, list[int]]:
    """Prefill ``prompt_ids`` then decode greedily one token per step.

    Returns ``(first_logits [V] fp32, token_ids)``: the logits after the prompt and the
    ``max_new_tokens`` generated ids (no stop token). Blocks ``1..`` hold the sequence;
    block 0 stays reserved, as in the engine.
    """
    total = len(prompt_ids) + max_new_tokens
    num_seq_blocks = -(-total // block_size)
    block_ids = list(range(1, num_seq_blocks + 1))
    caches = allocate_caches(model, ops, num_seq_blocks + 1, block_size)
    device = model.device
    logits = model(single_sequence_batch(prompt_ids, 0, block_ids, block_size, device), caches)
    first_logits = logits[0].clone()
    tokens: list[int] = []
    for step in range(max_new_tokens):
        tokens.append(int(logits[0].argmax()))
        if step + 1 == max_new_tokens:
            break
        position = len(prompt_ids) + step
        batch = single_sequence_batch(tokens[-1:], position, block_ids, block_size, device)
        logits = model(batch, caches)
    return first_logits, tokens


@torch.inference_mode()
def hf_greedy(
    hf_model: Any, prompt_ids: list[int], max_new_tokens: int
) -> tuple[torch.Tensor, list[int]]:
    """The same greedy continuation from an HF transformers model (``generate`` with its cache,
    never stopping early). Returns ``(first_logits [V] fp32, token_ids)`` like ``run_greedy``."""
    out = hf_model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.logits[0][0].float(), out.sequences[0, len(prompt_ids) :].tolist()
