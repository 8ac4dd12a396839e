"""GGUF architecture -> Chitu ``model_type``, tensor names and config fields.

Adding an architecture whose model already exists is one ``ARCHITECTURES`` entry: its
``model_type``, whether llama.cpp permuted its q/k rows, and any tensors beyond the
Llama set (e.g. ``{"attn_q_norm": "self_attn.q_norm"}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from chitu_core.errors import GGUFError, UnsupportedGGUFArchitectureError

# Tensors outside the decoder layers: GGUF base name -> HF name (without .weight/.bias).
GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# Per-layer tensors of a Llama-shaped decoder: GGUF ``blk.{i}.NAME`` -> HF
# ``model.layers.{i}.NAME``.
LLAMA_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one GGUF ``general.architecture`` maps onto a Chitu model.

    ``permute_qk``: llama.cpp's converter reorders the rows of q/k (weights and biases) of
    this architecture for its interleaved rope; the loader undoes it.
    """

    model_type: str
    permute_qk: bool
    layer_tensors: dict[str, str] = field(default_factory=lambda: dict(LLAMA_LAYER_TENSORS))


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    # Llama 1-3, Mistral and SmolLM are all written as "llama" by llama.cpp.
    "llama": GGUFArchitecture("llama", permute_qk=True),
    "qwen2": GGUFArchitecture("qwen2", permute_qk=False),
    "qwen3": GGUFArchitecture(
        "qwen3",
        permute_qk=False,
        layer_tensors={
            **LLAMA_LAYER_TENSORS,
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
        },
    ),
}

# general.file_type (llama.cpp's llama_ftype) of the all-float files -> their torch dtype.
FILE_TYPE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"(\w+)\.(weight|bias)$")


def architecture(name: str, path: Any) -> GGUFArchitecture:
    """The table entry of ``general.architecture`` ``name``; UnsupportedGGUFArchitectureError otherwise."""
    if name not in ARCHITECTURES:
        raise UnsupportedGGUFArchitectureError(
            f"{path}: GGUF architecture {name!r} is not supported; supported: "
            f"{', '.join(ARCHITECTURES)}. Use the model's HF-format checkpoint instead"
        )
    return ARCHITECTURES[name]


def hf_tensor_name(arch: GGUFArchitecture, gguf_name: str) -> str | None:
    """The HF name of GGUF tensor ``gguf_name`` (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None when the table has no entry."""
    if match := _LAYER_NAME.match(gguf_name):
        index, base, kind = match.groups()
        hf = arch.layer_tensors.get(base)
        return None if hf is None else f"model.layers.{index}.{hf}.{kind}"
    if match := _GLOBAL_NAME.match(gguf_name):
        base, kind = match.groups()
        hf = GLOBAL_TENSORS.get(base)
        return None if hf is None else f"{hf}.{kind}"
    return None


def unpermute_qk(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: ``tensor`` ``[num_heads * head_dim, ...]``.

    llama.cpp stores each head's rows as (first halves, second halves) interleaved, i.e.
    ``w.view(H, 2, D/2, ...).transpose(1, 2)``; this is its inverse (as transformers' GGUF
    loader does), giving HF's rotate-half layout back.
    """
    rows = tensor.shape[0]
    half = rows // num_heads // 2
    return (
        tensor.reshape(num_heads, half, 2, *tensor.shape[1:]).transpose(1, 2).reshape(tensor.shape)
    )


def _rope_scaling(gguf: Any, prefix: str) -> dict[str, Any] | None:
    kind = gguf.metadata(f"{prefix}.rope.scaling.type", "none")
    if kind in ("none", ""):
        return None
    factor = float(gguf.metadata(f"{prefix}.rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = gguf.metadata(f"{prefix}.rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise GGUFError(f"{gguf.path}: rope scaling type {kind!r} is not supported")


def hf_config(gguf: Any, arch: GGUFArchitecture) -> dict[str, Any]:
    """The config.json-shaped dict the HF loader would read, from the GGUF metadata."""
    prefix = gguf.architecture
    if "rope_freqs.weight" in gguf.tensors:
        # Llama 3.1+ files bake their rope scaling into a tensor of frequency factors.
        raise GGUFError(
            f"{gguf.path}: this GGUF carries rope_freqs (Llama 3.1-style rope scaling as a "
            "tensor), which Chitu does not read yet; serve the model's HF-format checkpoint"
        )

    def get(key: str, default: Any = None) -> Any:
        return gguf.metadata(f"{prefix}.{key}", default)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    if hidden is None or heads is None or get("block_count") is None:
        raise GGUFError(
            f"{gguf.path}: metadata lacks {prefix}.embedding_length, .attention.head_count or "
            ".block_count"
        )
    vocab = get("vocab_size")
    if vocab is None:
        vocab = gguf.shape("token_embd.weight")[0]
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(gguf.metadata(f"{prefix}.feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(gguf, prefix),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    dtype = FILE_TYPE_DTYPES.get(gguf.metadata("general.file_type", None))
    if dtype is not None:
        config["torch_dtype"] = dtype
    if get("attention.key_length") is not None:
        config["head_dim"] = int(get("attention.key_length"))
    for name in ("bos", "eos", "padding"):
        token_id = gguf.metadata(f"tokenizer.ggml.{name}_token_id", None)
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token_id"] = int(token_id)
    return config
