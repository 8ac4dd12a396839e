"""Helpers shared by the model tests: hand-built ForwardBatches and a greedy loop.

The engine builds batches for real (``chitu_core/engine``); these tests drive a
model directly with one sequence, so a failure points at the model alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

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


# Linear weights that FP8 releases (DeepSeek-V3, Qwen3-FP8, GLM-4.5-FP8) keep in bf16:
# embeddings, the LM head, norms, and the MoE router.
_KEEP_DENSE = re.compile(r"embed_tokens|lm_head|norm|\.gate\.weight$|\.gate\.e_score")


def write_fp8_checkpoint(src: Path, fp8_dir: Path, twin_dir: Path, keep_dense: str = "") -> None:
    """From the HF-written checkpoint ``src``: ``fp8_dir`` with every linear weight as
    block-128 FP8 e4m3 + ``weight_scale_inv`` (the published FP8 releases' layout and
    ``quantization_config``), and ``twin_dir`` holding those FP8 values dequantized to
    fp32 (no quantization): the two must give the same logits up to fp32 rounding.
    Weights matching the regex ``keep_dense`` stay as they are in both."""
    from chitu_core.quant import dequantize_block_fp8, quantize_block_fp8

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    fp8, twin = {}, {}
    for name, tensor in tensors.items():
        dense = _KEEP_DENSE.search(name) or (keep_dense and re.search(keep_dense, name))
        if tensor.dim() != 2 or not name.endswith(".weight") or dense:
            fp8[name] = twin[name] = tensor
            continue
        weight, scale = quantize_block_fp8(tensor)
        fp8[name], fp8[f"{name}_scale_inv"] = weight, scale
        twin[name] = dequantize_block_fp8(weight, scale, torch.float32)
    config = json.loads((src / "config.json").read_text())
    quantized = config | {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    }
    for path, out, cfg in ((fp8_dir, fp8, quantized), (twin_dir, twin, config)):
        path.mkdir(parents=True)
        save_file(out, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(cfg))
