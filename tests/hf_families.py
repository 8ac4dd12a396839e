"""Tiny checkpoints of the model families, written by HF transformers' own classes.

``hf_checkpoint`` saves a family's tiny model with ``save_pretrained`` (the
published key layout and config fields); ``write_fp8_checkpoint`` turns one into
the block-128 FP8 release layout. Shared by the model and the distributed tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    # 5x HF's default init: with 0.02 the experts' share of the residual stream is so
    # small that a wrong routing weight moved the logits by only ~5e-5.
    initializer_range=0.1,
)
# model_type -> (HF config class, HF model class, config fields)
FAMILIES = {
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(intermediate_size=96, head_dim=32, rope_theta=1e6),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=96,
            head_dim=32,
            moe_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[0],  # layer 0 dense, layer 1 MoE
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            intermediate_size=96,
            head_dim=32,
            partial_rotary_factor=0.5,  # GLM-4.5: rope on half of each head
            attention_bias=True,
            use_qk_norm=True,
            moe_intermediate_size=40,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
        ),
    ),
    "kimi_k2": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=96,
            moe_intermediate_size=40,
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=1,  # Kimi-K2: no group-limited routing
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            routed_scaling_factor=2.827,
        ),
    ),
}


def make_interesting(model: torch.nn.Module) -> None:
    """HF initialises norms to 1 and biases to 0, and its 0.02-std routers score every
    expert alike: randomise them so that a missing q/k norm, bias or routing bug shows."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                tensor.copy_(1 + 0.5 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("_proj.bias"):
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith((".mlp.gate.weight", "_moe.gate.weight")):  # the routers
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=gen))


def hf_checkpoint(
    family: str, root: Path, model_type: str | None = None, **overrides
) -> tuple[Path, torch.nn.Module]:
    """``family``'s tiny model written by transformers into ``root/family``, its config.json
    saying ``model_type`` (default: the family's own)."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**(COMMON | extra | overrides))
    hf = getattr(transformers, model_cls)(config).float().eval()
    make_interesting(hf)
    path = root / family
    hf.save_pretrained(path, safe_serialization=True)
    config_path = path / "config.json"
    written = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(written | {"model_type": model_type or family}))
    return path, hf


# Linear weights that FP8 block releases (DeepSeek-V3, Kimi-K2, Qwen3-FP8) keep in bf16:
# embeddings, the LM head, norms, and the MoE router.
_KEEP_DENSE = re.compile(r"embed_tokens|lm_head|norm|\.gate\.weight$|\.gate\.e_score")


def write_fp8_checkpoint(src: Path, fp8_dir: Path, twin_dir: Path) -> None:
    """From the HF-written checkpoint ``src``: ``fp8_dir`` with every linear weight as
    block-128 FP8 e4m3 + ``weight_scale_inv`` (the published FP8 releases' layout and
    ``quantization_config``), and ``twin_dir`` holding those FP8 values dequantized to
    fp32 (no quantization): the two must give the same logits up to fp32 rounding."""
    from chitu_core.quant import dequantize_block_fp8, quantize_block_fp8

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    fp8, twin = {}, {}
    for name, tensor in tensors.items():
        if tensor.dim() != 2 or not name.endswith(".weight") or _KEEP_DENSE.search(name):
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
