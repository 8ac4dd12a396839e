"""Fixtures of the distributed tests (defined in dist_helpers, importable by name there)."""

from dist_helpers import deepseek_dir, llama_dir  # noqa: F401
