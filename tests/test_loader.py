"""Checkpoint loading: sharded safetensors, FP8 kept FP8, and a named error for each bad checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers", reason="builds the tiny checkpoint")

from chitu_core.backend import load_backend  # noqa: E402
from chitu_core.errors import CheckpointError, UnsupportedModelError  # noqa: E402
from chitu_core.loader import INDEX_FILE, load_model  # noqa: E402


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = tmp_path_factory.mktemp("sharded")
    transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="100KB")
    assert (path / INDEX_FILE).is_file() and len(list(path.glob("*.safetensors"))) > 1
    return path


@pytest.fixture()
def broken(sharded_llama, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(sharded_llama, copy)
    return copy


OPS = load_backend("cpu_ref")


def _load(path, **kwargs):
    return load_model(path, OPS, torch.float32, show_progress=False, **kwargs)


def test_sharded_checkpoint_loads(sharded_llama):
    model, config = _load(sharded_llama)
    assert config["model_type"] == "llama" and len(model.layers) == 2


def test_missing_directory_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        _load(tmp_path)


def test_unsupported_model_type(broken):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gpt_bigcode.*supported: llama"):
        _load(broken)


def test_missing_shard_file(broken):
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        _load(broken)


def test_truncated_shard_header(broken):
    shard = sorted(broken.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated or corrupt"):
        _load(broken)


def test_missing_tensor_names_it(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = broken / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    (broken / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        _load(broken)


def test_shape_mismatch_names_file_and_tensor(broken):
    index = json.loads((broken / INDEX_FILE).read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = broken / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(64, 32)
    save_file(tensors, shard)
    with pytest.raises(
        CheckpointError, match=rf"{shard.name}: tensor '{name}' has shape \(64, 32\).*\(64, 64\)"
    ):
        _load(broken)


def test_pickle_checkpoints_are_never_loaded(tmp_path, sharded_llama):
    shutil.copy(sharded_llama / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded: pickle is never read")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        _load(tmp_path)


def test_quantize_fp8_keeps_one_byte_per_weight(sharded_llama):
    model, _ = _load(sharded_llama, quantize="fp8")
    qkv = model.layers[0].qkv
    assert qkv.fmt == "fp8_block128" and qkv.weight.element_size() == 1
    assert model.lm_head.fmt == "unquantized"  # the LM head stays in the compute dtype
