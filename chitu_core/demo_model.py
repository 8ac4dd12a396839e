"""Random-weight demo checkpoints in HF format (``chitu demo-model``).

A fresh machine has no model to serve; ``ensure_demo_model`` writes a small
DeepSeek-V3-shaped checkpoint once (FP8 block weights with ``weight_scale_inv``,
like the published one) under the cache directory so the engine can start at
once. The weights are RANDOM: the README, config.json (``chitu_demo``) and the
CLI all say so. The files are what a real checkpoint carries (config.json,
safetensors shards with their index, generation_config.json, tokenizer)
and load in HF transformers as well as in Chitu. Every tensor is drawn from
its own seeded generator, so the same arguments give the same files (on the
same kind of device: CPU and CUDA generators differ).

Sizes: ``tiny`` (tests), ``small`` (the served demo, fast on a CPU) and
``real``: the real layer shapes, for measuring speed on a GPU. ``real`` Llama
is Llama-3-8B-shaped (32 layers, 8.0 B parameters); ``real`` DeepSeek-V3 has
the published hidden, attention and expert sizes but 4 layers (1 dense + 3
MoE with 256 experts: 36 B parameters, 37 GB in FP8). Write ``real`` models
with ``--device cuda`` where a GPU is at hand: drawing and quantizing billions
of weights is minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from chitu_core.demo_tokenizer import (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    EOS_TOKEN,
    special_token_ids,
    write_demo_tokenizer,
)
from chitu_core.quant import quantize_block_fp8

logger = logging.getLogger(__name__)

ARCHS = ("deepseek_v3", "llama")
SIZES = ("tiny", "small", "real")
# Small models are split in two shards (so loading across shards is always exercised);
# larger ones in shards of at most this many bytes.
MIN_SHARDS = 2
MAX_SHARD_BYTES = 4 << 30
# Bump when the generated files change, so cached demo models are rewritten.
DEMO_VERSION = 3  # 3: the tokenizer's filler tokens render as text
RANDOM_NOTICE = "random weights"

_DEEPSEEK_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
        n_shared_experts=1, max_position_embeddings=2048, original_max_position_embeddings=512,
    ),
    "small": dict(
        vocab_size=512, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8,
        q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, max_position_embeddings=4096, original_max_position_embeddings=1024,
    ),
    # DeepSeek-V3's published shapes, 4 layers instead of 61.
    "real": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
        n_shared_experts=1, max_position_embeddings=163840, original_max_position_embeddings=4096,
        rope_factor=40.0,
    ),
}  # fmt: skip

_LLAMA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        original_max_position_embeddings=512,
    ),
    "small": dict(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        original_max_position_embeddings=1024,
    ),
    # Llama-3.1-8B's shapes.
    "real": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        original_max_position_embeddings=8192,
    ),
}  # fmt: skip


# Fields both architectures share; the rest is per architecture and size.
_COMMON: dict[str, Any] = dict(
    hidden_act="silu", attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
    tie_word_embeddings=False, use_cache=True,
)  # fmt: skip

Spec = tuple[str, tuple[int, ...], str]  # (tensor name, shape, kind)


def _token_ids(vocab_size: int) -> dict[str, Any]:
    ids = special_token_ids(vocab_size)
    return {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[END_OF_TEXT_TOKEN],
    }


def _config(arch: str, size: str) -> dict[str, Any]:
    """config.json as the published checkpoints of ``arch`` write it, at demo ``size``."""
    if arch == "deepseek_v3":
        s = dict(_DEEPSEEK_SIZES[size])
        rope_scaling = dict(
            type="yarn", factor=s.pop("rope_factor", 4.0), mscale=1.0, mscale_all_dim=1.0, beta_fast=32, beta_slow=1,
            original_max_position_embeddings=s.pop("original_max_position_embeddings"),
        )  # fmt: skip
        specific = dict(
            num_key_value_heads=s["num_attention_heads"], routed_scaling_factor=2.5,
            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, moe_layer_freq=1,
            num_nextn_predict_layers=0, rms_norm_eps=1e-6, rope_theta=10000.0,
        )  # fmt: skip
        architecture = "DeepseekV3ForCausalLM"
    else:
        s = dict(_LLAMA_SIZES[size])
        rope_scaling = dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=s.pop("original_max_position_embeddings"),
        )  # fmt: skip
        specific = dict(
            head_dim=s["hidden_size"] // s["num_attention_heads"], mlp_bias=False,
            rms_norm_eps=1e-5, rope_theta=500000.0,
        )  # fmt: skip
        architecture = "LlamaForCausalLM"
    return {
        "architectures": [architecture],
        "model_type": arch,
        **s,
        **specific,
        "rope_scaling": rope_scaling,
        **_COMMON,
        **_token_ids(s["vocab_size"]),
    }


# Tensor kinds: "embed" (std 1), "linear" (std 1/sqrt(fan_in), FP8-able), "head" (the LM
# head, std 1/sqrt(fan_in), never FP8), "norm" (1 + small noise), "gate" (MoE router,
# bf16), "bias" (e_score_correction_bias, fp32, small).
def _tensor_specs(arch: str, c: dict[str, Any]) -> list[Spec]:
    """Every tensor of the checkpoint, in file order."""
    h, vocab = c["hidden_size"], c["vocab_size"]
    layer = _deepseek_layer if arch == "deepseek_v3" else _llama_layer
    specs: list[Spec] = [("model.embed_tokens.weight", (vocab, h), "embed")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,), "norm"),
            *layer(c, i),
            (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
        ]
    return specs + [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (vocab, h), "head")]


def _deepseek_layer(c: dict[str, Any], i: int) -> list[Spec]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_rank, kv_rank = c["q_lora_rank"], c["kv_lora_rank"]
    a, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
    specs: list[Spec] = [
        (f"{a}.q_a_proj.weight", (q_rank, h), "linear"),
        (f"{a}.q_a_layernorm.weight", (q_rank,), "norm"),
        (f"{a}.q_b_proj.weight", (heads * (nope + rope), q_rank), "linear"),
        (f"{a}.kv_a_proj_with_mqa.weight", (kv_rank + rope, h), "linear"),
        (f"{a}.kv_a_layernorm.weight", (kv_rank,), "norm"),
        (f"{a}.kv_b_proj.weight", (heads * (nope + v), kv_rank), "linear"),
        (f"{a}.o_proj.weight", (h, heads * v), "linear"),
    ]
    if i < c["first_k_dense_replace"]:
        return specs + _swiglu(mlp, h, c["intermediate_size"])
    experts, inter = c["n_routed_experts"], c["moe_intermediate_size"]
    specs += [
        (f"{mlp}.gate.weight", (experts, h), "gate"),
        (f"{mlp}.gate.e_score_correction_bias", (experts,), "bias"),
    ]
    for e in range(experts):
        specs += _swiglu(f"{mlp}.experts.{e}", h, inter)
    return specs + _swiglu(f"{mlp}.shared_experts", h, c["n_shared_experts"] * inter)


def _llama_layer(c: dict[str, Any], i: int) -> list[Spec]:
    h, d = c["hidden_size"], c["head_dim"]
    q_rows, kv_rows = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    a = f"model.layers.{i}.self_attn"
    return [
        (f"{a}.q_proj.weight", (q_rows, h), "linear"),
        (f"{a}.k_proj.weight", (kv_rows, h), "linear"),
        (f"{a}.v_proj.weight", (kv_rows, h), "linear"),
        (f"{a}.o_proj.weight", (h, q_rows), "linear"),
        *_swiglu(f"model.layers.{i}.mlp", h, c["intermediate_size"]),
    ]


def _swiglu(prefix: str, hidden: int, inter: int) -> list[Spec]:
    return [
        (f"{prefix}.gate_proj.weight", (inter, hidden), "linear"),
        (f"{prefix}.up_proj.weight", (inter, hidden), "linear"),
        (f"{prefix}.down_proj.weight", (hidden, inter), "linear"),
    ]


def _random_tensor(
    name: str, shape: tuple[int, ...], kind: str, seed: int, fp8: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """One tensor of the checkpoint (two for an FP8 weight and its scale), on the CPU."""
    gen = torch.Generator(device).manual_seed(seed)
    noise = torch.randn(shape, generator=gen, device=device)
    if kind == "norm":
        out = {name: (1.0 + 0.1 * noise).to(torch.bfloat16)}
    elif kind == "bias":
        out = {name: 0.01 * noise}  # fp32, like the real checkpoint
    elif kind == "embed":
        out = {name: noise.to(torch.bfloat16)}
    else:  # linear, head, gate: std 1/sqrt(fan_in) keeps activations O(1)
        weight = (noise / math.sqrt(shape[-1])).to(torch.bfloat16)
        if kind == "linear" and fp8:
            prefix = name.removesuffix(".weight")
            codes, scale = quantize_block_fp8(weight)
            out = {name: codes, f"{prefix}.weight_scale_inv": scale}
        else:
            out = {name: weight}
    return {k: v.cpu() for k, v in out.items()}


def _stored_bytes(shape: tuple[int, ...], kind: str, fp8: bool) -> int:
    numel = math.prod(shape)
    if kind == "bias":
        return 4 * numel
    if kind == "linear" and fp8:
        return numel + 4 * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
    return 2 * numel


def _write_shards(
    path: Path, specs: list[Spec], seed: int, fp8: bool, device: torch.device, progress: bool
) -> None:
    """Draw and write the tensors shard by shard (``model-0000i-of-0000N.safetensors``,
    contiguous runs of ``specs`` split by bytes), plus the index. Only one shard is
    held in memory at a time."""
    sizes = [_stored_bytes(shape, kind, fp8) for _, shape, kind in specs]
    total = sum(sizes)
    num_shards = max(MIN_SHARDS, -(-total // MAX_SHARD_BYTES))
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    written = 0
    for i, size in enumerate(sizes):
        shards[min(num_shards - 1, written * num_shards // max(total, 1))].append(i)
        written += size
    weight_map: dict[str, str] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="random weights", disable=not progress)
    for shard, indices in enumerate(shards):
        filename = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for i in indices:
            name, shape, kind = specs[i]
            # Seeded per tensor, so a shard is drawn without replaying the ones before it.
            tensors |= _random_tensor(name, shape, kind, seed * 1_000_003 + i, fp8, device)
            bar.update(sizes[i])
        save_file(tensors, str(path / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(path / "model.safetensors.index.json", index)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def write_demo_model(
    path: str | Path,
    arch: str = "deepseek_v3",
    size: str = "tiny",
    seed: int = 0,
    fp8: bool | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random-weight HF checkpoint of ``arch`` and ``size`` into ``path``.

    Args:
        path: directory (created if missing; existing files of the same names are replaced).
        arch: ``"deepseek_v3"`` (MLA + MoE) or ``"llama"`` (dense GQA, llama3 rope).
        size: ``"tiny"`` (tests) or ``"small"`` (the default served demo; fast on a CPU).
        seed: seeds the weights; the same arguments always give the same files.
        fp8: store linear weights as FP8 e4m3 with 128x128 ``weight_scale_inv``
            (default: True for deepseek_v3, as published, False for llama).
        device: where the weights are drawn and quantized (``"cuda"`` for ``real``).

    Returns the directory. Raises ValueError for an unknown arch or size.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown demo arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {', '.join(SIZES)}")
    fp8 = (arch == "deepseek_v3") if fp8 is None else fp8
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _config(arch, size)
    specs = _tensor_specs(arch, config)
    config.update(
        torch_dtype="bfloat16",
        dtype="bfloat16",
        chitu_demo=RANDOM_NOTICE,
        chitu_demo_version=DEMO_VERSION,
    )
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    _write_shards(path, specs, seed, fp8, torch.device(device), progress=size == "real")
    _write_json(path / "config.json", config)
    ids = _token_ids(config["vocab_size"])
    generation = {
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]],
        "pad_token_id": ids["pad_token_id"],
    }
    _write_json(path / "generation_config.json", generation)
    write_demo_tokenizer(
        path, config["vocab_size"], model_max_length=config["max_position_embeddings"]
    )
    kind = "FP8 block-128" if fp8 else "bf16"
    (path / "README.md").write_text(
        "RANDOM WEIGHTS: this checkpoint was generated by `chitu demo-model` and its output is meaningless.\n"
        "\n"
        f"A {size} {arch} model ({kind} weights, seed {seed}) in HF format, for trying Chitu\n"
        "(and its tests) without downloading a real model. Do not use it for anything else.\n"
    )
    return path


def default_demo_model_dir(arch: str = "deepseek_v3", size: str = "small") -> Path:
    """Where the demo model is cached: ``$CHITU_CACHE_DIR/demo-<arch>-<size>`` or
    ``~/.cache/chitu/demo-<arch>-<size>``."""
    root = os.environ.get("CHITU_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "chitu"
    return base / f"demo-{arch}-{size}"


def _is_complete(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("chitu_demo_version") == DEMO_VERSION


def ensure_demo_model(arch: str = "deepseek_v3", size: str = "small") -> Path:
    """The cached demo model, written once (into a temporary directory, then renamed,
    so a crash or a concurrent writer never leaves a half-written model behind)."""
    target = default_demo_model_dir(arch, size)
    if _is_complete(target):
        return target
    logger.info("writing the %s %s demo model (random weights) to %s", size, arch, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_demo_model(tmp, arch, size)
        if target.exists():  # an older demo version: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.rename(target, stale / "model")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
    except OSError:
        if not _is_complete(target):  # not just a concurrent writer that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cmd_demo_model(args: argparse.Namespace) -> int:
    path = write_demo_model(
        args.path, args.arch, args.size, args.seed, False if args.no_fp8 else None, args.device
    )
    print(f"wrote a {args.size} {args.arch} demo model with RANDOM weights to {path}")
    return 0


def add_demo_model_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chitu demo-model PATH [--arch] [--size] [--seed] [--no-fp8]``."""
    p = subparsers.add_parser(
        "demo-model", help="write a small random-weight checkpoint (HF format) to PATH"
    )
    p.add_argument("path", type=Path, help="output directory")
    p.add_argument(
        "--arch", choices=ARCHS, default="deepseek_v3", help="architecture (default: deepseek_v3)"
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="small (default), tiny, or real: Llama-3-8B / 4-layer DeepSeek-V3 shapes",
    )
    p.add_argument(
        "--device", default="cpu", help="draw the weights here, e.g. cuda (default: cpu)"
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.add_argument(
        "--no-fp8", action="store_true", help="bf16 weights (deepseek_v3 defaults to FP8 block-128)"
    )
    p.set_defaults(func=_cmd_demo_model)
    return p
