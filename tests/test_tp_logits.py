"""benchmarks/tp_logits.py: teacher-forced step logits of one process vs TP=2 (torchrun, gloo)
agree, and ``compare`` fails on a perturbed file; plus bench_distributed's profile summary.

The model is the small random Llama demo (bf16 weights; cpu_ref computes in fp32),
so TP=2 differs from one process only by fp32 summation order (~1e-7 relative).
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chitu_core.demo_model import write_demo_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tp_logits.py"
RUN_TIMEOUT_S = 240.0  # one launch on a loaded 2-core host
STEPS = 6
ENGINE = ["--backend", "cpu_ref", "--num-blocks", "32", "--steps", str(STEPS)]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


tp_logits = _load("tp_logits")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("tp_logits") / "llama", "llama", "small")


@pytest.fixture(scope="module")
def runs(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The one-process reference (free greedy, batch 1 and 3) and TP=2 forced on it."""
    out = tmp_path_factory.mktemp("tp_logits_runs")
    ref, tp2 = out / "ref.safetensors", out / "tp2.safetensors"
    common = [str(SCRIPT), "run", "--model", str(model), *ENGINE, "--batch", "1,3"]
    _run([sys.executable, *common, "--out", str(ref)])
    torchrun = Path(sys.executable).parent / "torchrun"
    _run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", *common, "--tp", "2"]
        + ["--force-from", str(ref), "--out", str(tp2)]
    )
    return ref, tp2


def _rewrite(src: Path, dst: Path, **changes: torch.Tensor) -> Path:
    """A copy of a run file with some tensors replaced (metadata kept)."""
    tensors = load_file(src)
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    tensors.update(changes)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def test_tp2_under_torchrun_matches_one_process(runs: tuple[Path, Path]) -> None:
    ref, tp2 = runs
    a, b = load_file(ref), load_file(tp2)
    for batch in (1, 3):
        assert a[f"logits.b{batch}"].shape == (STEPS + 1, 512)
        assert torch.equal(a[f"fed.b{batch}"], a["forced"][: STEPS + 1])
        assert torch.equal(b[f"fed.b{batch}"], a["forced"][: STEPS + 1])  # teacher-forced
        assert torch.equal(a[f"greedy.b{batch}"], b[f"greedy.b{batch}"])
        assert a[f"spread.b{batch}"].max() < 1e-5  # identical prompts, identical rows
    # The reference decoded freely: its forced tokens are its own greedy picks.
    assert torch.equal(a["forced"], a["greedy.b1"])
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "compare", str(ref), str(tp2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS" in done.stdout.splitlines()[-1]
    assert "TP=2 PP=1 cpu_ref" in done.stdout


def test_compare_fails_on_a_perturbed_file(runs: tuple[Path, Path], tmp_path: Path) -> None:
    ref, tp2 = runs
    logits = load_file(tp2)["logits.b1"].clone()
    row = logits[3]
    runner_up = int(row.topk(2).indices[1])
    row[runner_up] = row.max() + 0.3 * row.abs().max()  # a decisive flip, 30% of the range
    bad = _rewrite(tp2, tmp_path / "bad.safetensors", **{"logits.b1": logits})
    out = io.StringIO()
    assert not tp_logits.compare_files(str(ref), str(bad), out=out)
    text = out.getvalue()
    assert "NOT a near-tie" in text and "<-- FAIL" in text
    assert text.splitlines()[-1].startswith("FAIL")
    # Noise well inside the tolerance passes.
    noisy = load_file(tp2)["logits.b1"] * (1 + 1e-4)
    fine = _rewrite(tp2, tmp_path / "fine.safetensors", **{"logits.b1": noisy})
    assert tp_logits.compare_files(str(ref), str(fine), out=io.StringIO())


def test_compare_fails_when_the_runs_were_fed_differently(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    ref, tp2 = runs
    forced = load_file(tp2)["forced"].clone()
    forced[1] = (forced[1] + 1) % 512
    other = _rewrite(tp2, tmp_path / "other.safetensors", forced=forced)
    out = io.StringIO()
    assert not tp_logits.compare_files(str(ref), str(other), out=out)
    assert "fed different tokens" in out.getvalue()


def test_near_ties_may_flip_but_large_differences_fail() -> None:
    a = torch.tensor([[4.0, 3.99, -2.0], [4.0, 1.0, -2.0]])
    near_tie = torch.tensor([[3.995, 4.0, -2.0], [4.0, 1.0, -2.0]])
    rows, ok = tp_logits.compare_logits(a, near_tie, tol=2e-2)
    assert ok and not rows[0]["argmax_equal"] and rows[0]["near_tie"]
    assert rows[0]["gap_a"] == pytest.approx(0.01, abs=1e-5)
    assert rows[0]["gap_b"] == pytest.approx(0.005, abs=1e-5)
    # Within the tolerance elementwise (0.07 <= 0.02 x 4), but the reference's top-2 gap
    # (0.12) is more than the tolerance: no near-tie, a FAIL.
    a = torch.tensor([[4.0, 3.88, -2.0]])
    flipped = torch.tensor([[3.93, 3.95, -2.0]])
    rows, ok = tp_logits.compare_logits(a, flipped, tol=2e-2)
    assert rows[0]["rel"] <= 2e-2 and not rows[0]["near_tie"] and not ok
    # Same argmax everywhere but too far apart; and NaN never passes.
    assert not tp_logits.compare_logits(a, a * 1.1, tol=2e-2)[1]
    assert not tp_logits.compare_logits(a, a.clone().fill_(float("nan")), tol=2e-2)[1]


def test_forced_tokens_are_what_the_model_is_fed(model: Path) -> None:
    from chitu_core.engine.llm_engine import EngineConfig, LLMEngine

    config = EngineConfig(model=model, backend="cpu_ref", num_blocks=32, show_progress=False)
    prompt = [3, 77, 12, 400, 5]
    with LLMEngine(config) as engine:
        free = tp_logits.record(engine, prompt, 3, 1, None)
        other = [(t + 1) % 500 for t in free["fed"].tolist()]
        forced = tp_logits.record(engine, prompt, 3, 2, other)
    assert torch.equal(free["fed"], free["greedy"])
    assert forced["fed"].tolist() == other
    assert torch.allclose(forced["logits"][0], free["logits"][0], atol=1e-5)  # same prefill
    assert not torch.allclose(forced["logits"][1], free["logits"][1], atol=1e-3)  # other input


def test_bench_distributed_profile_summary() -> None:
    bd = _load("bench_distributed")

    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    events = []
    for step in range(2):  # 2 steps of a 2-layer model: per layer 2 all-reduces, 1 GEMM...
        t = step * 1000.0
        events += [
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t, "dur": 5},
            kernel("fp8_gemv_kernel", t + 10, 100),
            kernel("paged_decode_kernel", t + 110, 50),
            kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", t + 160, 20),
            kernel("fp8_gemv_kernel", t + 180, 100),
            kernel("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", t + 280, 20),
            kernel("ncclDevKernel_AllGather_RING_LL", t + 300, 10),
            kernel("rms_norm_kernel", t + 305, 10),  # overlaps the gather: busy counts it once
        ]  # fmt: skip
    p = bd.summarize_trace(events, steps=2, num_layers=2)
    assert p["us_per_step"] == {"nccl": 50.0, "attention": 50.0, "gemm": 200.0, "other": 10.0}
    assert p["device_us_per_step"] == 310.0
    assert p["busy_us_per_step"] == 305.0
    assert p["nccl_calls_per_step"] == {"allreduce": 2.0, "allgather": 1.0}
    assert p["allreduce_us_per_layer"] == 20.0 and p["allreduce_us_per_call"] == 20.0
    assert p["graph_launches_per_step"] == 1.0
    p |= {"wall_ms_per_step": 1.0, "decode_graphs": [1, 2], "mode": "CUDA graphs"}
    text = "\n".join(bd.format_profile("2x1", 32, p))
    assert "NCCL all-reduce us per layer 20.0" in text and "nccl 50 us (16%)" in text


def test_the_floor_tolerates_what_the_reference_differs_from_itself(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    """A layout may differ from the reference as much as the reference's own batch sizes
    differ (other kernels on the same device), not more; --no-floor keeps --tol."""
    ref, tp2 = runs
    a = load_file(ref)
    scale = a["logits.b1"].abs().max()
    wobble = torch.zeros_like(a["logits.b1"])
    wobble[:, 5] = 0.05 * scale  # A's batch 3 differs from its batch 1 by 5e-2 (rel)
    a_noisy = _rewrite(ref, tmp_path / "a.safetensors", **{"logits.b3": a["logits.b1"] + wobble})
    within = _rewrite(tp2, tmp_path / "b.safetensors", **{
        "logits.b1": a["logits.b1"] + 0.8 * wobble, "logits.b3": a["logits.b1"] + wobble,
    })  # fmt: skip
    out = io.StringIO()
    assert tp_logits.compare_files(str(a_noisy), str(within), out=out)
    assert "floor: A batch 1 vs A batch 3" in out.getvalue()
    assert not tp_logits.compare_files(str(a_noisy), str(within), out=io.StringIO(), floor=False)
    beyond = _rewrite(tp2, tmp_path / "c.safetensors", **{
        "logits.b1": a["logits.b1"] + 2 * wobble, "logits.b3": a["logits.b1"] + wobble,
    })  # fmt: skip
    assert not tp_logits.compare_files(str(a_noisy), str(beyond), out=io.StringIO())
