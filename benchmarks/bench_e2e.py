"""End-to-end decode on a GPU: real-size random models, FP8 vs bf16 vs HF transformers.

One command, one run (on an NVIDIA GPU with the chitu and chitu-nvidia packages
importable)::

    python benchmarks/bench_e2e.py --arch llama --workdir /tmp/e2e --out results/e2e.json

Writes ``chitu demo-model --size real`` checkpoints (drawn on the GPU) into
``--workdir``: Llama-3-8B-shaped FP8 block-128 and its bf16 twin (same draws),
or the 4-layer DeepSeek-V3-shaped FP8 model (its bf16 twin, 72 GB, only with
``--bf16-twin``). Then, for each mode (``auto``, ``soft``, ``native``: the FP8
checkpoint under ``--fp8-compute`` of that name; ``bf16``: the twin; ``hf_bf16``: HF
transformers ``generate`` on the twin):

* batch-1 decode tokens/s (128-token prompt, 128 new tokens, decode steps only)
  and the weight-bytes roofline tokens/s (bytes read per token / measured copy
  bandwidth);
* decode tokens/s at every ``--batches`` size for every engine mode
  (``decode_tok_s[mode][batch]``) and each FP8 mode over bf16 per batch
  (``ratio_vs_bf16``); the engine's ``max_num_seqs`` comes from the memory plan
  unless a batch needs more;
* at the largest batch: host work per decode step (step wall time minus the time
  the host waits for the device's tokens) and its share of the step;
* CUDA graphs on vs off (first mode, batch 1), the batch curve of that mode (PNG);
* weight GiB per dtype;
* with ``--serving``: ``chitu serve`` on the FP8 model, ``benchmark_serving.py``
  at concurrency 1, 16 and 64.

Writes JSON with ``decode_bs1_tok_s``, ``roofline_bs1_tok_s``, ``weight_gib``,
``serving_tok_s`` (per concurrency) and the GPU name; figures, not assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chitu_core.demo_model import write_demo_model  # noqa: E402
from chitu_core.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from chitu_core.engine.memory_plan import tensor_bytes  # noqa: E402
from chitu_core.engine.sampling import SamplingParams  # noqa: E402

GIB = 1 << 30
PROMPT_LEN = 128
NEW_TOKENS = 128
BATCHES = (1, 16, 64, 256)
FP8_MODES = ("auto", "soft", "native")  # --fp8-compute values run on the FP8 checkpoint


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the roofline's bandwidth."""
    if not torch.cuda.is_available():  # a smoke run on the host
        src = torch.empty(GIB // 8, dtype=torch.uint8)
        dst = torch.empty_like(src)
        start = time.perf_counter()
        dst.copy_(src)
        return 2 * src.numel() / (time.perf_counter() - start)
    from bench_ops import copy_bytes_per_s  # beside this script; needs triton

    return copy_bytes_per_s()


def release(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decode_tok_s(engine: LLMEngine, batch: int, new_tokens: int = NEW_TOKENS) -> float:
    """Decode tokens/s of ``batch`` sequences after their prefill (prefill not timed)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    vocab = engine.model.vocab_size
    for _ in range(batch):
        engine.add_request(
            torch.randint(0, vocab - 300, (PROMPT_LEN,), generator=gen).tolist(), params
        )
    while engine.scheduler.num_waiting:  # prefill every prompt (and its first token)
        engine.step()
    engine.ops.synchronize(engine.device)
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished():
        tokens += len(engine.step())
    engine.ops.synchronize(engine.device)
    return tokens / (time.perf_counter() - start)


def host_work(engine: LLMEngine, batch: int, new_tokens: int = 64) -> dict:
    """Host work per decode step at ``batch``: each step's wall time minus the time the host
    spends waiting for the device's tokens (``HostCopy.get``); what is left is scheduling,
    batch upload, sampler set-up and the Python around them. With steps queued ahead
    (``overlap_steps``) it hides behind the device's work as long as it is shorter."""
    from chitu_core.engine import host_copy

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([1 + (i + j) % 200 for j in range(PROMPT_LEN)], params)
    while engine.scheduler.num_waiting:
        engine.step()
    engine.ops.synchronize(engine.device)
    get, waited = host_copy.HostCopy.get, [0.0]

    def timed_get(self):
        start = time.perf_counter()
        try:
            return get(self)
        finally:
            waited[0] += time.perf_counter() - start

    host_copy.HostCopy.get = timed_get
    steps, walls = 0, []
    try:
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - start)
            steps += 1
    finally:
        host_copy.HostCopy.get = get
    engine.ops.synchronize(engine.device)
    wall = sum(walls)
    host = (wall - waited[0]) / steps
    return {
        "batch": batch, "steps": steps, "step_us": 1e6 * wall / steps,
        "median_step_us": 1e6 * sorted(walls)[len(walls) // 2],
        "host_us_per_step": 1e6 * host, "host_share": host * steps / wall,
    }  # fmt: skip


def bytes_per_token(engine: LLMEngine) -> int:
    """Weight bytes one decode token reads: all but the embedding table (one row of it) and,
    for MoE, only ``top_k`` of the routed experts; plus the KV cache of a mid-way context."""
    model = engine.model
    total = tensor_bytes(model)
    embed = getattr(model, "embed", None)
    if embed is not None and embed is not getattr(model, "lm_head", None):
        total -= embed.numel() * embed.element_size()
    cfg = engine.model_config
    experts = cfg.get("n_routed_experts")
    if experts:
        routed = sum(
            tensor_bytes(getattr(layer.mlp, name))
            for layer in model.layers
            for name in ("w13", "w2")
            if hasattr(getattr(layer, "mlp", None), name)
        )
        total -= routed - routed * cfg["num_experts_per_tok"] // experts
    kv = engine.model.kv_cache_layout().bytes_per_token(engine.dtype) * (
        PROMPT_LEN + NEW_TOKENS // 2
    )
    return total + kv


def run_engine_modes(args, models: dict[str, Path], bandwidth: float, out: dict) -> None:
    first = next((m for m in models if m != "hf_bf16"), None)
    for mode, path in models.items():
        if mode == "hf_bf16":
            continue
        log(f"{mode}: loading {path.name}")
        start = time.perf_counter()
        engine = LLMEngine(
            EngineConfig(
                model=path, backend=args.backend, kv_cache_gb=args.kv_cache_gb,
                max_num_seqs=args.max_num_seqs, max_model_len=4096, show_progress=False,
                fp8_compute=mode if mode in FP8_MODES else "auto",
            )
        )  # fmt: skip
        graphs = engine.runner.graphs
        out["startup_s"][mode] = time.perf_counter() - start
        out["max_num_seqs"][mode] = engine.max_num_seqs
        out["compute_paths"][mode] = {op: p.description for op, p in engine.ops.paths.items()}
        out["graph_capture"][mode] = (
            {"seconds": graphs.capture_s, "gib": graphs.capture_bytes / GIB, "buckets": graphs.buckets}
            if graphs
            else None
        )  # fmt: skip
        log(f"{mode}: max_num_seqs {engine.max_num_seqs} ({engine.memory.max_num_seqs_reason}); "
            f"graphs {out['graph_capture'][mode]}")  # fmt: skip
        out["weight_gib"][mode] = tensor_bytes(engine.model) / GIB
        decode_tok_s(engine, 1, 8)  # warm-up (Triton/cuBLAS first calls)
        curve = {}
        for batch in args.batches:
            if batch > engine.max_num_seqs:
                log(f"{mode}: batch {batch} > max_num_seqs {engine.max_num_seqs}: skipped")
                continue
            if batch > 1:
                decode_tok_s(engine, batch, 4)  # first calls of this batch's GEMM configs
            curve[str(batch)] = decode_tok_s(engine, batch)
            log(f"{mode}: batch {batch:>3} {curve[str(batch)]:9.1f} tok/s")
        out["decode_tok_s"][mode] = curve
        tps = curve.get("1") or decode_tok_s(engine, 1)
        out["decode_bs1_tok_s"][mode] = tps
        per_token = bytes_per_token(engine)
        out["roofline_bs1_tok_s"][mode] = bandwidth / per_token
        log(
            f"{mode}: batch 1 {tps:.1f} tok/s = {100 * tps * per_token / bandwidth:.1f}% of "
            f"the {bandwidth / per_token:.1f} tok/s roofline ({per_token / GIB:.2f} GiB/token); "
            f"weights {out['weight_gib'][mode]:.2f} GiB"
        )
        big = max(b for b in args.batches if b <= engine.max_num_seqs)
        out["host_work"][mode] = host = host_work(engine, big)
        log(f"{mode}: batch {big}: step {host['step_us']:.0f} us, host work "
            f"{host['host_us_per_step']:.0f} us ({100 * host['host_share']:.1f}% of the step)")  # fmt: skip
        if mode == first:
            out["batch_curve_tok_s"] = {"mode": mode, **curve}
            if graphs is not None:
                engine.runner.graphs = None
                decode_tok_s(engine, 1, 8)
                eager = decode_tok_s(engine, 1)
                out["graphs_bs1_tok_s"] = {"on": tps, "off": eager, "speedup": tps / eager}
                log(f"{mode}: CUDA graphs off {eager:.1f} tok/s (on/off {tps / eager:.2f}x)")
                engine.runner.graphs = graphs
            if args.profile:
                out["profile_top_ops"] = profile_decode(engine)
        release(engine, graphs)


def profile_decode(engine: LLMEngine, steps: int = 16) -> list[dict]:
    """torch.profiler over a few eager batch-1 decode steps: CUDA time per kernel name."""
    from torch.profiler import ProfilerActivity, profile

    graphs, engine.runner.graphs = engine.runner.graphs, None
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    engine.add_request(list(range(1, PROMPT_LEN + 1)), params)
    engine.step()
    on_gpu = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        while engine.has_unfinished():
            engine.step()
        engine.ops.synchronize(engine.device)
    engine.runner.graphs = graphs
    rows = []
    for evt in prof.key_averages():
        cuda_us = evt.device_time_total if on_gpu else evt.self_cpu_time_total
        if cuda_us:
            rows.append(
                {"name": evt.key[:90], "cuda_us_per_step": cuda_us / steps, "calls": evt.count}
            )
    rows.sort(key=lambda r: -r["cuda_us_per_step"])
    for r in rows[:15]:
        log(f"profile: {r['cuda_us_per_step']:9.1f} us/step  {r['calls']:6d}  {r['name']}")
    return rows[:25]


def hf_decode_tok_s(path: Path) -> float:
    """HF transformers bf16 eager ``generate`` at batch 1 (prefill excluded by subtraction)."""
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = model.to(device).eval()
    ids = torch.randint(0, model.config.vocab_size // 2, (1, PROMPT_LEN), device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(new: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()
        return time.perf_counter() - start

    timed(4)
    short, long = timed(1), timed(1 + 64)
    release(model)
    return 64 / (long - short)


def serving(args, path: Path, out: dict) -> None:
    """``chitu serve`` on ``path`` and ``benchmark_serving.py`` at each concurrency."""
    port = 21077
    # --skip-conformance: the certificate run is not what is timed here (conformance is
    # run and reported on its own).
    cmd = [sys.executable, "-m", "chitu_core", "serve", str(path), "--backend", args.backend,
           "--port", str(port), "--max-num-seqs", "64", "--max-model-len", "4096",
           "--skip-conformance"]  # fmt: skip
    log("serving: " + " ".join(cmd))
    logfile = open(Path(args.out).with_suffix(".serve.log"), "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}; see {logfile.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(2)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import benchmark_serving

        for conc, num in ((1, 8), (16, 32), (64, 128)):
            report = Path(args.out).with_suffix(f".serving-c{conc}.json")
            rc = benchmark_serving.main(
                [f"--base-url=http://127.0.0.1:{port}", f"--concurrency={conc}",
                 f"--num-prompts={num}", f"--input-len={PROMPT_LEN}", f"--output-len={NEW_TOKENS}",
                 "--ignore-eos", f"--json={report}"],
                show_progress=False,
            )  # fmt: skip
            level = json.loads(report.read_text())["levels"][0]
            # The engine's output rate is every request's usage tokens over the level's wall
            # time: benchmark_serving counts a finished request without text as failed, which
            # random weights produced with demo tokenizers before DEMO_VERSION 3.
            tokens = sum(r["output_tokens"] for r in level.pop("requests"))
            out["serving_tok_s"][str(conc)] = tokens / level["duration_s"]
            out["serving_detail"][str(conc)] = level
            log(
                f"serving: concurrency {conc}: {tokens / level['duration_s']:.1f} tok/s of usage "
                f"tokens ({level['output_throughput']:.1f} counting only requests that carried "
                f"text: {level['num_ok']} of {level['num_ok'] + level['num_failed']}; rc {rc})"
            )
        one = out["serving_tok_s"].get("1")
        if one:
            out["serving_ratio_64_vs_1"] = out["serving_tok_s"]["64"] / one
    finally:
        server.terminate()
        server.wait(timeout=60)
        logfile.close()


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = {int(k): v for k, v in out["batch_curve_tok_s"].items() if k != "mode"}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(curve), list(curve.values()), marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch (sequences)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{out['model']} ({out['batch_curve_tok_s']['mode']}) on {out['gpu']}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["llama", "deepseek_v3"], default="llama")
    ap.add_argument("--size", default="real", help="demo size (tiny: a CPU smoke run)")
    ap.add_argument("--backend", default="nvidia")
    ap.add_argument("--workdir", default="/tmp/chitu-e2e", help="where the checkpoints go")
    ap.add_argument("--out", default="e2e.json")
    ap.add_argument(
        "--fp8-compute",
        default="auto,soft",
        help="comma list of --fp8-compute modes (auto, soft, native) run on the FP8 checkpoint",
    )
    ap.add_argument(
        "--baselines", default="bf16", help="comma list of bf16 (the twin), hf_bf16, or none"
    )
    ap.add_argument("--bf16-twin", action="store_true", help="also write DeepSeek's bf16 twin")
    ap.add_argument(
        "--kv-cache-gb", type=float, help="KV cache GiB (default: the engine's memory plan)"
    )
    ap.add_argument(
        "--max-num-seqs", type=int, help="default: the memory plan's (256 where it fits)"
    )
    ap.add_argument("--serving", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of batch-1 decode")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch curve sizes")
    args = ap.parse_args()

    fp8_modes = [m for m in args.fp8_compute.split(",") if m]
    if set(fp8_modes) - set(FP8_MODES):
        ap.error(f"--fp8-compute takes {', '.join(FP8_MODES)}, got {args.fp8_compute!r}")
    modes = fp8_modes + [m for m in args.baselines.split(",") if m and m != "none"]
    args.batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.workdir)
    bandwidth = copy_bandwidth()
    out = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "triton": _triton_version(), "command": " ".join(sys.argv),
        "model": f"{args.arch} {args.size} (random weights)", "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_bytes_per_s": bandwidth, "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS, "batches": args.batches, "decode_tok_s": {},
        "ratio_vs_bf16": {}, "host_work": {}, "max_num_seqs": {}, "compute_paths": {},
        "decode_bs1_tok_s": {}, "roofline_bs1_tok_s": {},
        "weight_gib": {}, "startup_s": {}, "graph_capture": {}, "serving_tok_s": {},
        "serving_detail": {},
    }  # fmt: skip
    log(f"{out['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    models: dict[str, Path] = {}
    need_bf16 = any(m in modes for m in ("bf16", "hf_bf16"))
    for fp8, name in ((True, "fp8"), (False, "bf16")):
        if not fp8 and not (need_bf16 and (args.arch == "llama" or args.bf16_twin)):
            continue
        path = work / f"{args.arch}-{args.size}-{name}"
        if not (path / "config.json").exists():
            start = time.perf_counter()
            device = "cuda" if torch.cuda.is_available() else "cpu"
            write_demo_model(path, args.arch, args.size, fp8=fp8, device=device)
            log(f"wrote {path} in {time.perf_counter() - start:.0f} s")
        for mode in modes:
            if (mode in FP8_MODES) == fp8:
                models[mode] = path
    try:
        run_engine_modes(args, models, bandwidth, out)
        if "hf_bf16" in models:
            log("hf_bf16: transformers generate")
            out["decode_bs1_tok_s"]["hf_bf16"] = tps = hf_decode_tok_s(models["hf_bf16"])
            out["roofline_bs1_tok_s"]["hf_bf16"] = out["roofline_bs1_tok_s"].get("bf16")
            log(f"hf_bf16: batch 1 {tps:.1f} tok/s")
        base = out["decode_tok_s"].get("bf16", {})
        for mode in fp8_modes:
            curve = out["decode_tok_s"].get(mode, {})
            out["ratio_vs_bf16"][mode] = {b: curve[b] / base[b] for b in curve if b in base}
            log(f"{mode} / bf16: " + ", ".join(
                f"batch {b} {r:.2f}x" for b, r in out["ratio_vs_bf16"][mode].items()))  # fmt: skip
        d = out["decode_bs1_tok_s"]
        fp8_mode = next((m for m in fp8_modes if m in d), None)
        if "bf16" in d and fp8_mode in d:
            out["fp8_vs_bf16"] = d[fp8_mode] / d["bf16"]
        if "hf_bf16" in d and fp8_mode in d:
            out["fp8_vs_hf_bf16"] = d[fp8_mode] / d["hf_bf16"]
        w = out["weight_gib"]
        if "bf16" in w and fp8_mode in w:
            out["weight_ratio_fp8_vs_bf16"] = w[fp8_mode] / w["bf16"]
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        if args.serving and models:
            serving(args, next(iter(models.values())), out)
    finally:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        if "batch_curve_tok_s" in out:
            plot(out, Path(args.out).with_suffix(".png"))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log("summary: " + json.dumps({k: out.get(k) for k in (
        "decode_tok_s", "ratio_vs_bf16", "host_work", "roofline_bs1_tok_s", "fp8_vs_hf_bf16",
        "weight_ratio_fp8_vs_bf16", "serving_tok_s", "serving_ratio_64_vs_1")}))  # fmt: skip


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


if __name__ == "__main__":
    main()
