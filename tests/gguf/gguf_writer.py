"""Tiny GGUF files for the tests, written with ``gguf.GGUFWriter`` the way llama.cpp's
converter writes them (q/k rows permuted for the llama architecture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

# HF name (without .weight/.bias) -> GGUF name, written out independently of the loader's table.
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

BYTE_TOKENS = 256  # the byte alphabet; the rest of a test vocabulary are control tokens


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``permute``: rope halves -> interleaved rows."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, index, rest = base.split(".", 3)
        return f"blk.{index}.{_LAYER[rest]}.{kind}"
    return f"{_GLOBAL[base]}.{kind}"


def byte_level_vocab(vocab_size: int) -> tuple[list[str], list[int]]:
    """GPT-2's 256 byte characters then control tokens ``<|c0|>``...: tokens and types."""
    from chitu_core.gguf.tokenizer import _gpt2_bytes_to_unicode

    tokens = list(_gpt2_bytes_to_unicode())
    tokens += [f"<|c{i}|>" for i in range(vocab_size - BYTE_TOKENS)]
    types = [1] * BYTE_TOKENS + [3] * (vocab_size - BYTE_TOKENS)
    return tokens, types


def write_hf_model_gguf(
    path: Path,
    model: Any,
    arch: str,
    quant: dict[str, GGMLQuantizationType] | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the HF ``model`` (LlamaForCausalLM-shaped) as a GGUF of architecture ``arch``.

    ``quant`` maps GGUF tensor names to a GGML type (default F32).
    """
    cfg = model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    if getattr(cfg, "head_dim", None):  # llama.cpp writes it where it is not hidden / heads
        writer.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
        writer.add_uint32(f"{arch}.attention.value_length", cfg.head_dim)
    writer.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    tokens, types = byte_level_vocab(cfg.vocab_size)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "default")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", types)
    writer.add_array("tokenizer.ggml.merges", [])
    writer.add_uint32("tokenizer.ggml.bos_token_id", BYTE_TOKENS)
    writer.add_uint32("tokenizer.ggml.eos_token_id", BYTE_TOKENS + 1)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    for key, value in (extra_metadata or {}).items():
        writer.add_key_value(key, value[0], value[1])
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        values = tensor.detach().to(torch.float32).numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            values = llama_cpp_permute(values, heads)
        elif arch == "llama" and ".k_proj." in hf_name:
            values = llama_cpp_permute(values, kv_heads)
        name = gguf_name(hf_name)
        qtype = (quant or {}).get(name, GGMLQuantizationType.F32)
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(values))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
