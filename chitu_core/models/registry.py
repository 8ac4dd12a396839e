"""``model_type`` of config.json -> model class (imported lazily)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from chitu_core.errors import UnsupportedModelError

# model_type -> "module:Class"
MODEL_TYPES: dict[str, str] = {
    "llama": "chitu_core.models.llama:LlamaForCausalLM",
    "mistral": "chitu_core.models.llama:LlamaForCausalLM",
    "qwen2": "chitu_core.models.llama:LlamaForCausalLM",
    "qwen3": "chitu_core.models.llama:LlamaForCausalLM",
    "qwen3_moe": "chitu_core.models.llama_moe:LlamaMoEForCausalLM",
    "mixtral": "chitu_core.models.llama_moe:LlamaMoEForCausalLM",
    "glm4_moe": "chitu_core.models.llama_moe:LlamaMoEForCausalLM",
    "deepseek_v3": "chitu_core.models.deepseek_v3:DeepseekV3ForCausalLM",
    "kimi_k2": "chitu_core.models.deepseek_v3:DeepseekV3ForCausalLM",
}


def model_class(config: dict[str, Any], config_path: Path | str = "config.json") -> type:
    """The class implementing ``config["model_type"]``; UnsupportedModelError otherwise."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{config_path}: model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}"
        )
    module_name, class_name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)
