"""Real model dimensions (from the published config.json files) and the token counts tested.

The dimensions are those of one un-sharded model (tensor parallel degree 1).
DeepSeek-V3's fused ``qkv_a`` projection (``q_a_proj`` 1536 rows + ``kv_a_proj_with_mqa``
512 + 64 rows = 2112, not a multiple of 128) gives a real-shape N tail.
"""

from __future__ import annotations

from dataclasses import dataclass

from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL, FORMAT_UNQUANTIZED

# Token counts of the full suite (rows of a GEMM, tokens of a MoE, decode batch sizes,
# new tokens of a prefill).
FULL_TOKENS: tuple[int, ...] = (1, 2, 7, 16, 64, 512, 4096)
# --quick on an accelerator: a decode row, an odd small batch and a prefill-sized batch.
QUICK_TOKENS: tuple[int, ...] = (1, 7, 512)
# --quick on the host: real hidden sizes but few tokens, because the backend under test
# and the fp64 oracle then share two CPU cores (a 512-token real-shape MoE alone takes
# minutes there). The large-token kernels are what the full suite and GPUs are for.
QUICK_TOKENS_CPU: tuple[int, ...] = (1, 7)


@dataclass(frozen=True)
class Linear:
    """One projection: ``[N, K]`` weight in ``fmt`` (the checkpoint's), ``bias`` or not."""

    label: str
    n: int
    k: int
    fmt: str
    bias: bool = False
    quick: bool = False  # part of --quick on accelerators (moderate sizes)
    quick_cpu: bool = False  # part of --quick on the host too


@dataclass(frozen=True)
class ModelDims:
    """The dimensions of one model that the op cases use."""

    name: str
    hidden: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    max_context: int
    rope_dim: int
    is_neox_rope: bool
    linears: tuple[Linear, ...]
    # MoE (num_experts 0: dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0
    # MLA (kv_lora_rank 0: MHA/GQA)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0


DEEPSEEK_V3 = ModelDims(
    name="DeepSeek-V3",
    hidden=7168,
    vocab=129280,
    num_heads=128,
    num_kv_heads=1,
    head_dim=192,
    intermediate=18432,
    max_context=163840,
    rope_dim=64,
    is_neox_rope=False,
    linears=(
        Linear("qkv_a", 1536 + 512 + 64, 7168, FORMAT_FP8_BLOCK128, quick=True, quick_cpu=True),
        Linear("q_b", 128 * (128 + 64), 1536, FORMAT_FP8_BLOCK128),
        Linear("kv_b", 128 * (128 + 128), 512, FORMAT_FP8_BLOCK128, quick=True),
        Linear("o", 7168, 128 * 128, FORMAT_FP8_BLOCK128),
        Linear("gate_up", 2 * 18432, 7168, FORMAT_FP8_BLOCK128),
        Linear("down", 7168, 18432, FORMAT_FP8_BLOCK128),
        Linear("shared_down", 7168, 2048, FORMAT_FP8_BLOCK128, quick=True),
        Linear("lm_head", 129280, 7168, FORMAT_UNQUANTIZED),
    ),
    num_experts=256,
    top_k=8,
    moe_intermediate=2048,
    num_groups=8,
    topk_groups=4,
    routed_scaling=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
)

LLAMA3_8B = ModelDims(
    name="Llama-3-8B",
    hidden=4096,
    vocab=128256,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate=14336,
    max_context=8192,
    rope_dim=128,
    is_neox_rope=True,
    linears=(
        Linear("qkv", 6144, 4096, FORMAT_UNQUANTIZED, quick=True, quick_cpu=True),
        Linear(
            "o", 4096, 4096, FORMAT_FP8_CHANNEL, quick=True, quick_cpu=True
        ),  # an FP8 per-channel export
        Linear("gate_up", 2 * 14336, 4096, FORMAT_UNQUANTIZED),
        Linear("down", 4096, 14336, FORMAT_UNQUANTIZED),
        Linear("lm_head", 128256, 4096, FORMAT_UNQUANTIZED),
    ),
)

QWEN2_7B = ModelDims(
    name="Qwen2-7B",
    hidden=3584,
    vocab=152064,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    intermediate=18944,
    max_context=32768,
    rope_dim=128,
    is_neox_rope=True,
    linears=(
        Linear(
            "qkv",
            28 * 128 + 2 * 4 * 128,
            3584,
            FORMAT_UNQUANTIZED,
            bias=True,
            quick=True,
            quick_cpu=True,
        ),
        Linear("o", 3584, 3584, FORMAT_UNQUANTIZED),
        Linear("gate_up", 2 * 18944, 3584, FORMAT_UNQUANTIZED),
        Linear("down", 3584, 18944, FORMAT_UNQUANTIZED),
    ),
)

MODELS: tuple[ModelDims, ...] = (DEEPSEEK_V3, LLAMA3_8B, QWEN2_7B)


def token_counts(quick: bool, device_type: str) -> tuple[int, ...]:
    """Token counts of a run: all of them, or the --quick subset for this device type."""
    if not quick:
        return FULL_TOKENS
    return QUICK_TOKENS_CPU if device_type == "cpu" else QUICK_TOKENS
