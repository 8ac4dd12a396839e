"""Engine test fixtures: a tiny random Llama checkpoint written by HF transformers."""

from __future__ import annotations

import pytest
import torch

VOCAB = 512


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="builds the tiny checkpoint")
    from chitu_core.demo_tokenizer import write_demo_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # spread the logits so greedy choices are far from ties
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    write_demo_tokenizer(path, VOCAB)
    return path
