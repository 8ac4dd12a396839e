"""Perplexity of a model on a fixed text, through the engine's own model runner.

The engine's forward returns each sequence's last-token logits; scoring a text needs
every position's, so ``perplexity`` hands the runner a one-sequence prefill whose
``last_token_indices`` cover all its tokens (blocks from the engine's block manager, the
engine's KV cache, the model's own forward). The text is cut into non-overlapping
windows, each scored from an empty context: token ``t`` of a window is predicted from the
window's tokens before it, and a window's first token is not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chitu_core.engine.sequence import Sequence

DEFAULT_WINDOW = 512  # tokens per scored window: context for all but the first few tokens


@dataclass(frozen=True)
class Perplexity:
    """``exp(mean negative log-likelihood)`` over ``num_scored`` predicted tokens."""

    value: float
    mean_nll: float
    num_scored: int


def window_logprobs(engine: Any, token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities the model gives each next token of ``token_ids`` from an empty
    context: ``[len(token_ids) - 1]`` fp32, entry ``t`` = log p(token_ids[t + 1] | ...t]).

    Runs one prefill on ``engine`` (a single-process ``LLMEngine`` with nothing in flight).
    """
    if len(token_ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(token_ids)}")
    if engine.is_distributed:
        raise ValueError("perplexity runs on a single-process engine (tp = pp = 1)")
    seq = Sequence(-1, token_ids, max_tokens=1)
    blocks = engine.block_manager
    if not blocks.can_allocate(seq, len(token_ids)):
        raise ValueError(
            f"a window of {len(token_ids)} tokens does not fit the engine's KV cache "
            f"({blocks.num_free_blocks} free blocks of {blocks.block_size}); use a smaller window"
        )
    blocks.allocate(seq, len(token_ids))
    try:
        batch = engine.runner.build_batch([seq], [len(token_ids)])
        batch.last_token_indices = torch.arange(len(token_ids), device=batch.input_ids.device)
        with torch.inference_mode():
            logits = engine.model(batch, engine.runner.kv_caches)  # [T, V] fp32
    finally:
        blocks.free(seq)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(token_ids[1:], device=logprobs.device)
    return logprobs.gather(1, targets[:, None]).squeeze(1).cpu()


def perplexity(engine: Any, token_ids: list[int], window: int = DEFAULT_WINDOW) -> Perplexity:
    """Perplexity of ``engine``'s model on ``token_ids`` scored in windows of ``window``
    tokens (a last window shorter than 2 tokens is dropped)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    total, count = 0.0, 0
    for start in range(0, len(token_ids), window):
        chunk = token_ids[start : start + window]
        if len(chunk) < 2:
            break
        logprobs = window_logprobs(engine, chunk).double()
        total -= logprobs.sum().item()
        count += logprobs.numel()
    if count == 0:
        raise ValueError("no tokens to score: the text is shorter than 2 tokens")
    mean = total / count
    return Perplexity(math.exp(mean), mean, count)


# Weight modes of ``model_perplexity``: (label, compute dtype, quantize).
MODES: dict[str, tuple[str, str | None]] = {
    "fp32": ("float32", None),  # the checkpoint as stored (a GGUF dequantized to fp32)
    "bf16": ("bfloat16", None),
    "fp8": ("bfloat16", "fp8"),  # --quantize fp8: FP8 block-128 weights, bf16 activations
}


def model_perplexity(
    model: str | Path,
    text: str,
    mode: str,
    backend: str = "auto",
    window: int = DEFAULT_WINDOW,
) -> Perplexity:
    """Perplexity of ``model`` (HF directory or GGUF) in weight mode ``mode`` (a ``MODES``
    key) on ``text``, tokenized as the model's tokenizer does for a prompt."""
    from chitu_core.engine.llm_engine import EngineConfig, LLMEngine

    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    dtype, quantize = MODES[mode]
    block_size = 16
    config = EngineConfig(
        model=model,
        backend=backend,
        dtype=dtype,
        quantize=quantize,
        block_size=block_size,
        num_blocks=-(-window // block_size) + 1,  # one window, plus the scratch block
        max_num_seqs=1,
        max_num_batched_tokens=window,
        show_progress=False,
        enforce_eager=True,
    )
    with LLMEngine(config) as engine:
        return perplexity(engine, engine.tokenizer.encode(text), window)
