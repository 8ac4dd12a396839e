"""Qwen3, Qwen3-MoE, Mixtral, GLM-4.5 and Kimi-K2 vs HF transformers, and their FP8 releases.

Each checkpoint is written by transformers' own class (``save_pretrained``: the
published key layout and config fields) with tiny sizes; the engine's model on
cpu_ref must give the same prefill logits (fp32) and the same greedy tokens.
Kimi-K2 is DeepSeek-V3's architecture under ``model_type: kimi_k2``: HF has no
class of its own, so its checkpoint is a ``DeepseekV3ForCausalLM`` with Kimi-K2's
routing fields whose config.json says ``kimi_k2``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from hf_families import COMMON, FAMILIES, hf_checkpoint, write_fp8_checkpoint
from model_helpers import hf_greedy, run_greedy
from safetensors.torch import load_file, save_file
from tp_threads import simulate_tp

from chitu_core.backend import load_backend
from chitu_core.loader import load_model
from chitu_core.models.llama import LlamaConfig
from chitu_core.models.llama_moe import MoELayout

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

PROMPT = [3, 77, 12, 200, 5, 9, 150, 31, 8, 100, 42, 7]
NUM_NEW_TOKENS = 16
# fp32 on both sides, same weights: only summation order differs (cpu_ref's fp64
# GEMMs, the MoE's per-expert sums). Measured <= 2e-6 on logits of magnitude ~1; a
# wrong rope half, a missing q/k norm or a wrong routing weight moves them by > 1e-2.
HF_LOGIT_ATOL = 1e-4
# FP8 vs HF on its dequantized fp32 values: the same weights up to one fp32 rounding of
# e4m3 * scale (cpu_ref keeps the product exact), plus summation order.
FP8_LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def ops():
    return load_backend("cpu_ref")


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    path, hf = hf_checkpoint(request.param, tmp_path_factory.mktemp("families"))
    return request.param, path, hf


def _load(path: Path, ops):
    model, _ = load_model(path, ops, torch.float32, show_progress=False)
    return model


def test_logits_and_greedy_match_hf(family, ops) -> None:
    model_type, path, hf = family
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    hf_logits, hf_tokens = hf_greedy(hf, PROMPT, NUM_NEW_TOKENS)

    logits, tokens = run_greedy(_load(path, ops), ops, PROMPT, NUM_NEW_TOKENS)

    max_diff = (logits - hf_logits).abs().max().item()
    print(f"{model_type}: max |logit diff| vs HF = {max_diff:.3g}")
    assert max_diff < HF_LOGIT_ATOL, f"{model_type}: max |logit diff| vs HF = {max_diff:.3g}"
    assert tokens == hf_tokens


# (family, model_type, overrides): the MoE families with FP8 releases, and issue 24's
# DeepSeek-V3 whose moe_intermediate_size (160) is not a multiple of 128.
FP8_CASES = {
    "qwen3_moe": ("qwen3_moe", "qwen3_moe", {}),
    "glm4_moe": ("glm4_moe", "glm4_moe", {}),
    "kimi_k2": ("kimi_k2", "kimi_k2", {}),
    "deepseek_v3-i160": (
        "kimi_k2",
        "deepseek_v3",
        dict(moe_intermediate_size=160, intermediate_size=160, n_group=2, topk_group=1),
    ),
}


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_release_matches_hf_on_its_values(case, tmp_path: Path, ops) -> None:
    """Block-128 FP8 weights as the FP8 releases publish them (``weight_scale_inv``); the
    MoE intermediate sizes (40, 160) are not multiples of 128, so gate/up (and the tiny
    q/k/v) fuse through zero-padded blocks. The oracle is HF on the dequantized values."""
    family, model_type, overrides = FP8_CASES[case]
    src, _ = hf_checkpoint(family, tmp_path, model_type, **overrides)
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "twin")
    fp8_model = _load(tmp_path / "fp8", ops)
    moe = fp8_model.layers[1].mlp
    assert moe.w13.weight.dtype == torch.float8_e4m3fn  # stays FP8
    inter = overrides.get("moe_intermediate_size", 40)
    assert moe.w13.weight.shape[1] == 2 * -(-inter // 128) * 128  # gate, up padded to blocks
    config_cls, model_cls, _ = FAMILIES[family]  # kimi_k2: HF's DeepSeek-V3 classes
    fields = json.loads((tmp_path / "twin" / "config.json").read_text())
    fields.pop("model_type")
    hf = getattr(transformers, model_cls).from_pretrained(
        tmp_path / "twin", config=getattr(transformers, config_cls)(**fields), dtype=torch.float32
    )
    hf_logits, hf_tokens = hf_greedy(hf.eval(), PROMPT, NUM_NEW_TOKENS)

    logits, tokens = run_greedy(fp8_model, ops, PROMPT, NUM_NEW_TOKENS)

    max_diff = (logits - hf_logits).abs().max().item()
    print(f"{case} FP8: max |logit diff| vs HF on the dequantized weights = {max_diff:.3g}")
    assert max_diff < FP8_LOGIT_ATOL, f"max |logit diff| FP8 vs HF = {max_diff:.3g}"
    assert tokens == hf_tokens


@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe"])
def test_fp8_tp2_with_unaligned_shards_matches_one_process(family, tmp_path: Path, ops) -> None:
    """TP=2 over FP8 weights whose shards are not on 128 blocks: 20 of 40 expert rows,
    2 of 4 heads (64 of 128 q rows and o_proj columns) per rank. Each rank holds its
    zero-masked covering blocks; the sum over ranks must equal the one-process model."""
    src, _ = hf_checkpoint(family, tmp_path)
    write_fp8_checkpoint(src, tmp_path / "fp8", tmp_path / "twin")
    expected, _ = run_greedy(_load(tmp_path / "fp8", ops), ops, PROMPT, 1)

    def rank(parallel):
        model, _ = load_model(
            tmp_path / "fp8", ops, torch.float32, show_progress=False, parallel=parallel
        )
        w13 = model.layers[1].mlp.w13.weight
        assert w13.dtype == torch.float8_e4m3fn and w13.shape[1] == 2 * 128  # 20 rows, padded
        assert model.layers[0].o_span.padded  # 64 of 128 columns: the covering block, masked
        return run_greedy(model, ops, PROMPT, 1)[0]

    for logits in simulate_tp(2, rank):
        max_diff = (logits - expected).abs().max().item()
        assert max_diff < FP8_LOGIT_ATOL, f"TP=2 vs one process: {max_diff:.3g}"


def test_glm_mtp_layer_is_skipped_quietly(
    tmp_path: Path, ops, caplog: pytest.LogCaptureFixture
) -> None:
    """GLM-4.5 checkpoints append a multi-token-prediction layer after the last decoder
    layer (``num_nextn_predict_layers: 1``): loaded without a warning, logits unchanged."""
    src, _ = hf_checkpoint("glm4_moe", tmp_path)
    reference, _ = run_greedy(_load(src, ops), ops, PROMPT, 1)
    tensors = load_file(src / "model.safetensors")
    mtp = f"model.layers.{COMMON['num_hidden_layers']}"
    hidden = COMMON["hidden_size"]
    for name, shape in [
        ("eh_proj.weight", (hidden, 2 * hidden)),
        ("enorm.weight", (hidden,)),
        ("hnorm.weight", (hidden,)),
        ("shared_head.norm.weight", (hidden,)),
    ]:
        tensors[f"{mtp}.{name}"] = torch.ones(shape)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.INFO):
        model = _load(src, ops)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("skipped 4 tensors on purpose" in r.getMessage() for r in caplog.records)
    logits, _ = run_greedy(model, ops, PROMPT, 1)
    torch.testing.assert_close(logits, reference, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 64}, "intermediate_size"),
        ({"model_type": "llama", "num_hidden_layers": 2}, "no MoE layout"),
        (
            {"model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 64}
            | {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 5},
            "num_experts_per_tok",
        ),
    ],
)
def test_bad_moe_config_raises_value_error(config, message) -> None:
    with pytest.raises(ValueError, match=message):
        MoELayout.from_dict(config)


def test_bad_partial_rotary_factor_raises_value_error() -> None:
    fields = dict(COMMON, model_type="glm4_moe", head_dim=32, intermediate_size=96)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LlamaConfig.from_dict(fields | {"partial_rotary_factor": 0.03})
