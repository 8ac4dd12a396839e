"""GGUF checkpoints vs HF transformers (fp32, tiny random Llama/Qwen2 written as GGUF the way
llama.cpp's converter writes them), the dtype policy, and the named errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from gguf_writer import BYTE_TOKENS, write_hf_model_gguf

transformers = pytest.importorskip("transformers", reason="transformers is the test oracle")

from chitu_core.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from chitu_core.engine.sampling import SamplingParams  # noqa: E402
from chitu_core.errors import (  # noqa: E402
    CheckpointError,
    CorruptGGUFError,
    UnsupportedGGUFArchitectureError,
    UnsupportedGGUFQuantError,
)
from chitu_core.gguf import find_gguf  # noqa: E402
from chitu_core.gguf.checkpoint import GGUFCheckpoint  # noqa: E402
from chitu_core.gguf.file import SUPPORTED_QUANT_TYPES, GGUFFile  # noqa: E402
from chitu_core.loader import checkpoint_dtype  # noqa: E402
from conformance.perplexity import window_logprobs  # noqa: E402

VOCAB = BYTE_TOKENS + 44
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
# fp32 on both sides (see tests/models/test_llama.py): only summation order differs.
LOGPROB_ATOL = 1e-4


def _hf_model(arch: str, tied: bool):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen3":  # per-head q/k RMSNorm, head_dim apart from hidden / heads
        config = transformers.Qwen3Config(
            **COMMON, head_dim=48, rope_theta=1e6, tie_word_embeddings=tied
        )
        model = transformers.Qwen3ForCausalLM(config)
        with torch.no_grad():  # HF initialises the norms to one: make them matter
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    else:
        config = transformers.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=tied)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # HF initialises biases to zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.bias.normal_(0, 0.5)
    return model.eval()


@pytest.fixture(
    scope="module",
    params=[("llama", True), ("llama", False), ("qwen2", False), ("qwen3", True)],
)
def checkpoint(request, tmp_path_factory):
    arch, tied = request.param
    model = _hf_model(arch, tied)
    path = tmp_path_factory.mktemp(f"gguf-{arch}") / "model.gguf"
    return write_hf_model_gguf(path, model, arch), model


def _engine(path, **kwargs):
    return LLMEngine(
        EngineConfig(
            model=path,
            backend="cpu_ref",
            num_blocks=64,
            block_size=8,
            show_progress=False,
            **kwargs,
        )
    )


def test_gguf_matches_hf(checkpoint):
    """Every next-token logprob of a prompt and 16 greedy tokens equal HF's: the name map,
    the config and the undone q/k permutation are right."""
    path, hf = checkpoint
    engine = _engine(path)
    assert engine.model_config["tie_word_embeddings"] == hf.config.tie_word_embeddings
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        hf_logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        hf_tokens = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    expected = hf_logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    diff = (window_logprobs(engine, prompt) - expected).abs().max().item()
    assert diff < LOGPROB_ATOL, f"max |logprob diff| {diff:.2e}"
    out = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert out[0].token_ids == hf_tokens


def test_quantize_fp8_keeps_one_byte_weights(checkpoint):
    path, _ = checkpoint
    fp32, fp8 = _engine(path), _engine(path, quantize="fp8")
    handle = fp8.model.layers[0].qkv
    assert handle.fmt == "fp8_block128" and handle.weight.element_size() == 1
    prompt = list(range(5, 25))
    a, b = window_logprobs(fp32, prompt), window_logprobs(fp8, prompt)
    # e4m3 keeps 3 mantissa bits: the logprobs move, but little (random weights: ~1e-2).
    assert 1e-5 < (a - b).abs().max().item() < 0.2


def test_quantized_tensors_dequantize_as_gguf_does(tmp_path):
    """Q8_0 / Q4_1 weights come out as gguf's own dequantization, in torch's [rows, cols]."""
    model = _hf_model("llama", tied=True)
    quant = {
        "blk.0.attn_v.weight": GGMLQuantizationType.Q8_0,
        "blk.1.ffn_up.weight": GGMLQuantizationType.Q4_1,
    }
    path = write_hf_model_gguf(tmp_path / "q.gguf", model, "llama", quant)
    file = GGUFFile(path)
    for name, qtype in quant.items():
        hf_name = {"blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight"}.get(
            name, "model.layers.1.mlp.up_proj.weight"
        )
        original = model.state_dict()[hf_name].numpy()
        expected = dequantize(quantize(original, qtype), qtype)
        got = file.dequantize(name)
        assert file.quant_type(name) == qtype.name
        assert got.shape == original.shape and torch.equal(got, torch.from_numpy(expected))
    # ... and a model with them runs and agrees with the fp32 one to the quantization error.
    engine = _engine(path)
    assert (
        len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0))[0].token_ids)
        == 2
    )


def _bare_gguf(path, arch="llama", tensors=None):
    writer = GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", 1)
    for name, values in (tensors or {"token_embd.weight": np.zeros((8, 4), np.float32)}).items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_named(tmp_path):
    path = _bare_gguf(tmp_path / "m.gguf", arch="rwkv6")
    with pytest.raises(
        UnsupportedGGUFArchitectureError, match="'rwkv6'.*supported: llama, qwen2, qwen3"
    ):
        GGUFCheckpoint.open(path)


def test_unsupported_quant_type_is_named_with_the_supported_list(tmp_path):
    path = _bare_gguf(tmp_path / "m.gguf", tensors={"blk.0.attn_q.weight": np.zeros((4, 4))})
    file = GGUFFile(path)
    assert file.quant_type("blk.0.attn_q.weight") == "F64"
    with pytest.raises(UnsupportedGGUFQuantError, match="F64.*supported: F32, F16, BF16, Q4_0"):
        file.dequantize("blk.0.attn_q.weight")
    assert {"Q4_1", "Q8_0", "Q4_K", "Q6_K", "IQ4_XS"} <= set(SUPPORTED_QUANT_TYPES)


@pytest.mark.parametrize("keep", [0.5, 0.999, 10])
def test_truncated_or_foreign_file_is_named(tmp_path, keep):
    big = np.ones((64, 64), np.float32)
    data = _bare_gguf(tmp_path / "ok.gguf", tensors={"token_embd.weight": big}).read_bytes()
    path = tmp_path / "bad.gguf"
    # keep=10 bytes: not even the header; 0.999: the last tensor's data cut short.
    path.write_bytes(data[: keep if keep > 1 else int(len(data) * keep)])
    with pytest.raises(CorruptGGUFError, match="truncated or corrupt"):
        GGUFCheckpoint.open(path)
    path.write_bytes(b"PK\x03\x04" + data[4:])  # a zip's magic: not GGUF at all
    with pytest.raises(CorruptGGUFError):
        GGUFCheckpoint.open(path)


def test_find_gguf(tmp_path):
    source = _bare_gguf(tmp_path / "source.bin")
    tmp_path = tmp_path / "models"
    tmp_path.mkdir()
    assert find_gguf(tmp_path) is None  # empty directory: left to the HF loader's error
    shutil.copy(source, tmp_path / "a.gguf")
    assert find_gguf(tmp_path) == tmp_path / "a.gguf"
    assert find_gguf(tmp_path / "a.gguf") == tmp_path / "a.gguf"
    shutil.copy(source, tmp_path / "b.gguf")
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        find_gguf(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # an HF directory wins
    assert find_gguf(tmp_path) is None


def test_dtype_auto_is_the_checkpoint_dtype(tmp_path):
    """``--dtype auto`` as transformers' dtype="auto": config.json's dtype / torch_dtype, a
    GGUF's float file type; otherwise the backend's compute dtype."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for key, value in (("torch_dtype", "bfloat16"), ("dtype", "float16")):
        (hf_dir / "config.json").write_text(f'{{"model_type": "llama", "{key}": "{value}"}}')
        assert checkpoint_dtype(hf_dir) == value
    model = _hf_model("llama", tied=True)
    bf16 = {"general.file_type": (32, GGUFValueType.UINT32)}  # llama.cpp's MOSTLY_BF16
    path = write_hf_model_gguf(tmp_path / "bf16.gguf", model, "llama", extra_metadata=bf16)
    assert checkpoint_dtype(path) == "bfloat16"
    assert _engine(path, dtype="auto").dtype == torch.bfloat16
    q41 = {"general.file_type": (3, GGUFValueType.UINT32)}  # MOSTLY_Q4_1: no float dtype
    path = write_hf_model_gguf(tmp_path / "q.gguf", model, "llama", extra_metadata=q41)
    assert checkpoint_dtype(path) is None
    assert _engine(path, dtype="auto").dtype == torch.float32  # cpu_ref's compute dtype
