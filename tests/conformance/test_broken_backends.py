"""The suite can fail: every broken backend is rejected on exactly its broken op, with
messages naming the op and the case, and the gate demotes exactly that op."""

from __future__ import annotations

import json

import pytest
import torch
from conformance_helpers import BROKEN_OPS, run_command

from chitu_core.backend import load_backend
from conformance.gate import cached_demotions, ensure_certified
from conformance.model_check import check_models


@pytest.mark.parametrize("backend,op", sorted(BROKEN_OPS.items()))
def test_gate_rejects_and_demotes_exactly_the_broken_op(broken_backends, cert_dir, backend, op):
    assert cached_demotions(backend) is None  # never certified

    assert ensure_certified(backend, progress=False) == (op,)

    (path,) = cert_dir.glob(f"{backend}--*.json")
    cert = json.loads(path.read_text())
    assert cert["failed_ops"] == [op] and cert["demote"] == [op]
    assert cert["failures"], "a failure must say what failed"
    for message in cert["failures"]:
        assert message.startswith(f"{op}["), message  # the op and the case, e.g. linear[...]
    assert cert["models_passed"]  # with the op demoted the demo models match the oracle
    assert cached_demotions(backend) == (op,)
    ops = load_backend(backend, demote=cached_demotions(backend))
    assert ops.demoted == {op} and op in ops.fallback


def test_cli_exits_1_and_names_the_op_and_case(broken_backends, tmp_path, capsys):
    argv = ["--backend", "broken_router", "--quick", "--ops", "moe_route", "--no-progress"]
    assert run_command(*argv, "--out", str(tmp_path)) == 1
    printed = capsys.readouterr().out
    assert "FAIL: backend broken_router" in printed and "failed ops: moe_route" in printed
    # One printed line per failed op: how many of its cases failed and the first one.
    assert "  moe_route: 3 of 7 cases failed; first: moe_route[deepseek-grouped]" in printed
    markdown = (tmp_path / "report.md").read_text()
    assert "| `[DeepSeek-V3,T=1,E=256,k=8,groups=8/4]` | **FAIL** |" in markdown
    # One line per failed op, naming how many of its cases failed and the first one.
    (line,) = [text for text in markdown.splitlines() if text.startswith("- **moe_route**:")]
    assert " cases failed; first: moe_route[" in line


def test_whole_model_check_catches_a_broken_op(broken_backends):
    deepseek, llama = check_models("broken_router", (), torch.float32)
    assert not deepseek.passed and deepseek.message.startswith("model[deepseek_v3]")
    assert "greedy token" in deepseek.message or "logits rel_fro" in deepseek.message
    assert llama.passed  # a dense model routes nothing
    deepseek, _ = check_models("broken_router", ("moe_route",), torch.float32)
    assert deepseek.passed
