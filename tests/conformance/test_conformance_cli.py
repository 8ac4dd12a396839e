"""``chitu conformance``: the reference and the generic ops pass the quick suite and write
the reports and the certificate."""

from __future__ import annotations

import json

from conformance_helpers import run_command

from chitu_core.backend import OP_NAMES, bind_ops, discover_backends
from chitu_core.hookspecs import CONTRACT_VERSION
from chitu_core.ops import GENERIC_OPS


def test_cpu_ref_quick_passes_and_writes_reports_and_certificate(tmp_path, cert_dir, capsys):
    out = tmp_path / "report"
    assert run_command("--backend", "cpu_ref", "--quick", "--out", str(out), "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "PASS: backend cpu_ref" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["info"]["mode"] == "quick"
    assert {"linear", "fused_moe", "mla_decode", "all_reduce"} <= set(report["ops_checked"])
    assert {m["arch"] for m in report["models"]} == {"deepseek_v3", "llama"}
    markdown = (out / "report.md").read_text()
    assert "| op | impl | cases | result | worst error / bound | vs generic |" in markdown
    assert "## linear" in markdown and "## all_reduce" in markdown
    assert (out / "roofline.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        f"- Hook contract: {CONTRACT_VERSION}" in markdown
        and "## Compute paths certified" in markdown
    )
    assert "accuracy: not checked" in markdown and "## Determinism" in markdown
    (llama,) = report["determinism"]  # --quick: the Llama only
    assert llama["arch"] == "llama" and llama["passed"] and llama["repeat_tokens_equal"]
    assert report["accuracy"]["checked"] is False
    assert "FP8 soft" in report["compute_paths"]["linear"]
    certs = list(cert_dir.glob("cpu_ref--*.json"))
    assert len(certs) == 1
    cert = json.loads(certs[0].read_text())
    assert cert["demote"] == [] and cert["contract_version"] == CONTRACT_VERSION
    assert cert["accuracy"]["checked"] is False and cert["determinism"][0]["passed"]
    assert (out / "checks-cache.jsonl").exists(), "a rerun resumes from this file"


def test_generic_ops_pass_the_quick_suite(tmp_path, cert_dir):
    generic = bind_ops(discover_backends()["cpu_ref"], demote=OP_NAMES)
    assert not generic.native and set(generic.fallback) == set(OP_NAMES)
    assert all(getattr(generic, op) is GENERIC_OPS[op] for op in OP_NAMES if op != "device")

    out = tmp_path / "generic"
    argv = ["--backend", "cpu_ref", "--demote", "all", "--quick", "--no-timing", "--no-progress"]
    assert run_command(*argv, "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["info"]["native_ops"] == [] and report["passed"]
    assert not list(cert_dir.glob("*.json")), "a run with demotions must not certify the backend"
