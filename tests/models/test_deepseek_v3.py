"""DeepSeek-V3 on cpu_ref: parity with HF transformers, FP8 vs dequantized, MLA, MTP skip.

All on the tiny random demo checkpoint (``chitu_core.demo_model``), in fp32.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from model_helpers import allocate_caches, hf_greedy, run_greedy, single_sequence_batch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chitu_core.backend import load_backend
from chitu_core.demo_model import write_demo_model
from chitu_core.loader import load_model
from chitu_core.models.deepseek_v3 import DeepseekV3Config
from chitu_core.quant import dequantize_block_fp8

PROMPT = [3, 77, 12, 400, 5, 9, 250, 31, 8, 100, 42, 7]  # 12 tokens
NUM_NEW_TOKENS = 32
# Both sides compute in fp32 from the same bf16 weights; they differ only in
# summation order (absorbed vs expanded attention, cpu_ref's fp64 GEMMs vs
# torch's fp32 ones). Measured: ~2e-6 on logits of magnitude ~3. 1e-4 leaves
# margin for other BLAS builds while a real bug moves logits by far more
# (swapping the rope pairing: 1.1; dropping the YaRN mscale: 2.3).
HF_LOGIT_ATOL = 1e-4
# FP8 run vs its dequantized fp32 twin: the same weights up to one fp32 rounding
# of e4m3 * scale (cpu_ref keeps the FP8 product exact in fp64). Measured ~1e-6.
FP8_LOGIT_ATOL = 1e-4
# One MLA layer, absorbed (fp32, paged cache) vs naive (fp64, expanded K/V): only
# summation order and fp32 rounding differ. Measured ~1e-6 on outputs of magnitude ~1.
MLA_ATOL = MLA_RTOL = 1e-5


@pytest.fixture(scope="module")
def ops():
    return load_backend("cpu_ref")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("ds_bf16"), "deepseek_v3", "tiny", fp8=False)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("ds_fp8"), "deepseek_v3", "tiny", fp8=True)


def _load(path: Path, ops):
    model, _ = load_model(path, ops, torch.float32, show_progress=False)
    return model


def test_logits_and_greedy_match_hf_transformers(bf16_ckpt: Path, ops) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(bf16_ckpt, dtype=torch.float32)
    hf_logits, hf_tokens = hf_greedy(hf, PROMPT, NUM_NEW_TOKENS)

    logits, tokens = run_greedy(_load(bf16_ckpt, ops), ops, PROMPT, NUM_NEW_TOKENS)

    max_diff = (logits - hf_logits).abs().max().item()
    assert max_diff < HF_LOGIT_ATOL, f"max |logit diff| vs HF = {max_diff:.3g}"
    assert tokens == hf_tokens


def _edited_copy(src: Path, dst: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Copy of checkpoint ``src`` in ``dst`` after ``edit(config, tensors)``, as one
    ``model.safetensors`` (tokenizer and other files copied unchanged)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = json.loads((src / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    edit(config, tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _dequantize(config: dict, tensors: dict) -> None:
    """FP8 weights -> their exact dequantized values in fp32; no quantization_config."""
    for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        weight = name.removesuffix("_scale_inv")
        tensors[weight] = dequantize_block_fp8(tensors[weight], tensors.pop(name), torch.float32)
    del config["quantization_config"]


def test_fp8_checkpoint_matches_its_dequantized_twin(fp8_ckpt: Path, tmp_path: Path, ops) -> None:
    fp8_model = _load(fp8_ckpt, ops)
    assert fp8_model.layers[1].mlp.w13.weight.dtype == torch.float8_e4m3fn  # stays FP8
    twin = _load(_edited_copy(fp8_ckpt, tmp_path / "twin", _dequantize), ops)

    logits, tokens = run_greedy(fp8_model, ops, PROMPT, NUM_NEW_TOKENS)
    twin_logits, twin_tokens = run_greedy(twin, ops, PROMPT, NUM_NEW_TOKENS)

    max_diff = (logits - twin_logits).abs().max().item()
    assert max_diff < FP8_LOGIT_ATOL, f"max |logit diff| FP8 vs dequantized = {max_diff:.3g}"
    assert tokens == twin_tokens


def _naive_mla(
    attn, cfg: DeepseekV3Config, kv_b: torch.Tensor, x: torch.Tensor, cos_sin
) -> torch.Tensor:
    """Textbook MLA in fp64: expand the latent into per-head keys and values with the
    checkpoint's ``kv_b_proj``, then causal softmax attention, then ``o_proj``."""
    tokens, heads = x.shape[0], cfg.num_attention_heads
    n, r = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    q_nope, q_pe, latent = attn.project(x, torch.arange(tokens), cos_sin)
    c_kv, k_pe = latent[:, 0, :r].double(), latent[:, 0, r:].double()  # [T, R], [T, P]
    kv = (c_kv @ kv_b.double().t()).view(tokens, heads, n + cfg.v_head_dim)
    k_nope, v = kv[..., :n], kv[..., n:]  # [T, H, N], [T, H, V]
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, heads, -1)], dim=-1)  # [T, H, N+P]
    q = torch.cat([q_nope, q_pe], dim=-1).double()  # [T, H, N+P]
    scores = torch.einsum("shd,thd->hst", q, k) * cfg.softmax_scale  # [H, T, T]
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    out = torch.einsum("hst,thv->shv", probs, v)  # [T, H, V]
    return attn.ops.linear(out.reshape(tokens, -1).float(), attn.o, None)


@torch.inference_mode()
def test_absorbed_mla_matches_naive_mla(bf16_ckpt: Path, ops) -> None:
    model = _load(bf16_ckpt, ops)
    cfg, attn, block_size = model.cfg, model.layers[0].attn, 4
    kv_b_name = "model.layers.0.self_attn.kv_b_proj.weight"
    index = json.loads((bf16_ckpt / "model.safetensors.index.json").read_text())
    with safe_open(str(bf16_ckpt / index["weight_map"][kv_b_name]), "pt") as shard:
        kv_b = shard.get_tensor(kv_b_name).float()  # [H*(N+V), R] as stored
    tokens = 10
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    expected = _naive_mla(attn, cfg, kv_b, x, model.cos_sin)

    block_ids = [1, 2, 3]
    (cache,) = allocate_caches(model, ops, 4, block_size)[:1]
    prefill = single_sequence_batch(list(range(tokens)), 0, block_ids, block_size, model.device)
    torch.testing.assert_close(
        attn(x, prefill, cache, model.cos_sin), expected, atol=MLA_ATOL, rtol=MLA_RTOL
    )

    # Decode: one token per step over the latent cache the earlier steps wrote.
    (cache,) = allocate_caches(model, ops, 4, block_size)[:1]
    decoded = [
        attn(
            x[t : t + 1],
            single_sequence_batch([0], t, block_ids, block_size, model.device),
            cache,
            model.cos_sin,
        )
        for t in range(tokens)
    ]
    torch.testing.assert_close(torch.cat(decoded), expected, atol=MLA_ATOL, rtol=MLA_RTOL)


def test_mtp_layer_is_skipped_with_a_log_line(
    bf16_ckpt: Path, tmp_path: Path, ops, caplog: pytest.LogCaptureFixture
) -> None:
    config = json.loads((bf16_ckpt / "config.json").read_text())
    mtp_layer, hidden = config["num_hidden_layers"], config["hidden_size"]

    def add_mtp_layer(config: dict, tensors: dict) -> None:
        config["num_nextn_predict_layers"] = 1
        for name, shape in [  # a few of the real MTP layer's tensors
            ("enorm.weight", (hidden,)),
            ("hnorm.weight", (hidden,)),
            ("eh_proj.weight", (hidden, 2 * hidden)),
            ("input_layernorm.weight", (hidden,)),
            ("shared_head.head.weight", (config["vocab_size"], hidden)),
        ]:
            tensors[f"model.layers.{mtp_layer}.{name}"] = torch.ones(shape, dtype=torch.bfloat16)

    ckpt = _edited_copy(bf16_ckpt, tmp_path / "with_mtp", add_mtp_layer)
    with caplog.at_level(logging.INFO):
        model = _load(ckpt, ops)
    skip_lines = [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(skip_lines) == 1 and skip_lines[0].levelno == logging.INFO
    assert f"model.layers.{mtp_layer}" in skip_lines[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(model.layers) == mtp_layer

    logits, _ = run_greedy(model, ops, PROMPT, 1)
    reference, _ = run_greedy(_load(bf16_ckpt, ops), ops, PROMPT, 1)
    torch.testing.assert_close(logits, reference, atol=0, rtol=0)


def test_tied_embeddings_match_hf(bf16_ckpt: Path, tmp_path: Path, ops) -> None:
    transformers = pytest.importorskip("transformers")

    def tie(config: dict, tensors: dict) -> None:
        config["tie_word_embeddings"] = True
        del tensors["lm_head.weight"]

    ckpt = _edited_copy(bf16_ckpt, tmp_path / "tied", tie)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.inference_mode():
        hf_logits = hf(torch.tensor([PROMPT])).logits[0, -1]
    logits, _ = run_greedy(_load(ckpt, ops), ops, PROMPT, 1)
    assert (logits - hf_logits).abs().max().item() < HF_LOGIT_ATOL


def test_plain_q_proj_without_q_lora_matches_hf(bf16_ckpt: Path, tmp_path: Path, ops) -> None:
    """``q_lora_rank: null`` (DeepSeek-V2-Lite style): one ``q_proj`` instead of q_a/q_b."""
    transformers = pytest.importorskip("transformers")

    def plain_q(config: dict, tensors: dict) -> None:
        config["q_lora_rank"] = None
        rows = config["num_attention_heads"] * (
            config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
        )
        gen = torch.Generator().manual_seed(2)
        for i in range(config["num_hidden_layers"]):
            a = f"model.layers.{i}.self_attn"
            for name in ("q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"):
                del tensors[f"{a}.{name}"]
            q = (
                torch.randn(rows, config["hidden_size"], generator=gen)
                / config["hidden_size"] ** 0.5
            )
            tensors[f"{a}.q_proj.weight"] = q.to(torch.bfloat16)

    ckpt = _edited_copy(bf16_ckpt, tmp_path / "plain_q", plain_q)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.inference_mode():
        hf_logits = hf(torch.tensor([PROMPT])).logits[0, -1]
    logits, _ = run_greedy(_load(ckpt, ops), ops, PROMPT, 1)
    assert (logits - hf_logits).abs().max().item() < HF_LOGIT_ATOL


def test_kv_cache_layout_is_the_latent(bf16_ckpt: Path, ops) -> None:
    layout = _load(bf16_ckpt, ops).kv_cache_layout()
    assert (layout.num_layers, layout.num_kv_heads, layout.key_dim, layout.value_dim) == (
        3,
        1,
        128 + 16,
        None,
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_group", 3, "n_group"),
        ("topk_group", 8, "topk_group"),
        ("num_experts_per_tok", 7, "num_experts_per_tok"),
        ("qk_rope_head_dim", 15, "even"),
        ("scoring_func", "relu", "scoring_func"),
        ("kv_lora_rank", None, "kv_lora_rank"),
    ],
)
def test_bad_config_raises_value_error(bf16_ckpt: Path, field: str, value, message: str) -> None:
    config = json.loads((bf16_ckpt / "config.json").read_text())
    if value is None:
        del config[field]
    else:
        config[field] = value
    with pytest.raises(ValueError, match=message):
        DeepseekV3Config.from_dict(config)


def test_demo_checkpoint_is_labelled_random_and_reproducible(
    fp8_ckpt: Path, tmp_path: Path
) -> None:
    assert "RANDOM" in (fp8_ckpt / "README.md").read_text().splitlines()[0]
    config = json.loads((fp8_ckpt / "config.json").read_text())
    assert config["chitu_demo"] == "random weights"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert len(list(fp8_ckpt.glob("model-*-of-00002.safetensors"))) == 2
    again = write_demo_model(tmp_path / "again", "deepseek_v3", "tiny", fp8=True)
    for shard in fp8_ckpt.glob("*.safetensors"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()
