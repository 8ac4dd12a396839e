"""Real ``chitu serve`` processes on 127.0.0.1 serving the tiny random DeepSeek-V3 FP8 demo model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import API_KEY, MODEL_NAME, ServerProcess, start_server, stop_cleanly

from chitu_core.demo_model import write_demo_model
from chitu_core.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight DeepSeek-V3 checkpoint with FP8 block weights."""
    return write_demo_model(tmp_path_factory.mktemp("serve") / MODEL_NAME, "deepseek_v3", "tiny")


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main server: no API key, the model's full context (2048 tokens)."""
    proc = start_server(model_dir, tmp_path_factory.mktemp("logs"))
    yield proc
    stop_cleanly(proc)


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.url


@pytest.fixture(scope="session")
def key_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server with ``--api-key`` and a short context (bounds every generation: the fuzzer's)."""
    proc = start_server(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        "--api-key",
        API_KEY,
        "--max-model-len",
        "64",
        "--max-body-bytes",
        "65536",
    )
    yield proc
    stop_cleanly(proc)
