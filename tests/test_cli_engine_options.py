"""The engine options of ``chitu serve`` / ``chitu generate`` reach the EngineConfig."""

from __future__ import annotations

import argparse

import pytest

from chitu_core.cli import add_engine_options, engine_config


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    return parser.parse_args(list(argv))


def test_defaults_just_work():
    config = engine_config(_parse(), "/models/m")
    assert config.memory_utilization == 0.9
    assert config.max_num_batched_tokens == 2048
    # None: the memory plan picks up to 256 (engine/memory_plan.choose_max_num_seqs)
    assert config.enforce_eager is False and config.max_num_seqs is None
    assert config.overlap_steps is True and config.fp8_compute == "auto"
    assert config.enable_prefix_caching is True


@pytest.mark.parametrize("mode", ["auto", "soft", "native"])
def test_fp8_compute_reaches_the_engine_config(mode):
    assert engine_config(_parse("--fp8-compute", mode), "/models/m").fp8_compute == mode


def test_fp8_compute_rejects_other_values(capsys):
    with pytest.raises(SystemExit):
        _parse("--fp8-compute", "fast")
    assert "invalid choice" in capsys.readouterr().err
    from chitu_core.engine.llm_engine import EngineConfig

    with pytest.raises(ValueError, match="fp8_compute .--fp8-compute. must be one of"):
        EngineConfig(model="/m", fp8_compute="fast")


def test_memory_graph_and_batching_options():
    args = _parse(
        "--gpu-memory-utilization", "0.5", "--enforce-eager", "--max-num-batched-tokens", "512",
        "--max-num-seqs", "8", "--no-overlap-steps", "--no-prefix-caching",
    )  # fmt: skip
    config = engine_config(args, "/models/m")
    assert config.enable_prefix_caching is False
    assert config.memory_utilization == 0.5 and config.enforce_eager
    assert config.overlap_steps is False
    assert config.max_num_batched_tokens == 512 and config.max_num_seqs == 8


def test_bad_utilization_is_a_clear_error():
    with pytest.raises(ValueError, match="--gpu-memory-utilization. must be in"):
        engine_config(_parse("--gpu-memory-utilization", "1.5"), "/models/m")


def test_dtype_auto_reaches_the_config():
    assert engine_config(_parse("--dtype", "auto"), "/models/m").dtype == "auto"
    assert engine_config(_parse(), "/models/m").dtype is None
