"""Fixtures of the distributed tests (defined in dist_helpers, importable by name there)."""

from dist_helpers import deepseek_dir, llama_dir, qwen3_moe_dir  # noqa: F401
