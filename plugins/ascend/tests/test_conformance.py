"""``chitu conformance --backend ascend --quick`` passes with the FAKE torch_npu on the path.

This checks the operator MAPPING against the fake module (documented torch_npu
semantics in plain torch on the CPU) through the real suite, run as a user runs
it: a subprocess of the ``chitu`` CLI with the fake on PYTHONPATH. It says
nothing about NPU kernels or their speed (timings of the fake are meaningless,
hence ``--no-timing``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ascend_test_paths import FAKE_DIR

NATIVE = {
    "device", "memory_info", "synchronize", "empty_cache", "prepare_weight", "linear",
    "moe_route", "fused_moe", "store_kv", "paged_attention_prefill", "paged_attention_decode",
    "rms_norm", "add_rms_norm", "rope", "silu_and_mul",
}  # fmt: skip


def test_quick_conformance_passes_with_the_fake(tmp_path: Path):
    out = tmp_path / "report"
    env = dict(os.environ, CHITU_CERT_DIR=str(tmp_path / "certs"))
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE_DIR), *sys.path])
    cli = [sys.executable, "-m", "chitu_core"]
    argv = ["conformance", "--backend", "ascend", "--quick", "--no-timing", "--no-progress"]
    proc = subprocess.run(
        [*cli, *argv, "--out", str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS: backend ascend" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["info"]["mode"] == "quick"
    assert set(report["info"]["native_ops"]) == NATIVE and not report["info"]["demoted_ops"]
    assert {"linear", "fused_moe", "paged_attention_decode", "all_reduce"} <= set(
        report["ops_checked"]
    )
    assert not report["ops_skipped"], "the collectives ran over the fake 'hccl' (gloo)"
    models = {m["arch"]: m for m in report["models"]}
    assert set(models) == {"deepseek_v3", "llama"}
    assert all(m["passed"] and m["tokens_compared"] > 0 for m in models.values())
    assert list((tmp_path / "certs").glob("ascend--*.json"))
