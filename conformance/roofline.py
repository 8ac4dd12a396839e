"""Rooflines: the peak bandwidth and FLOP/s of a device, and each case's bytes and FLOPs.

An op cannot run faster than ``max(bytes / bandwidth, flops / peak)``; the report
gives each timed case's share of that bound ("% of roofline"). Peaks come from
``KNOWN_DEVICES`` (vendor datasheets: dense math, no sparsity, boost clocks)
when the device's name matches, otherwise from micro-benchmarks on the device
itself: the faster of a large ``copy_`` (bytes read + written) and a large
matrix-vector product (bytes read, as in decode) for bandwidth, and a square
matmul for FLOP/s in the run's compute dtype and fp32 only, sized for the
device and capped in time. On a shared host these vary from run to run, so
a share above 100% can happen there. The host is always measured: CPU peaks depend on
the core count and the memory channels this process gets.

The FLOP/s used is the compute dtype's even for FP8 weights: the contract
multiplies in the compute dtype (soft FP8), so bf16 is the attainable peak.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass, field

import torch

from chitu_core.quant import FORMAT_UNQUANTIZED
from conformance.case import Case, Inputs

logger = logging.getLogger(__name__)

TB, TF = 1e12, 1e12


@dataclass(frozen=True)
class DeviceSpec:
    """Peak memory bandwidth (bytes/s) and FLOP/s by dtype name of one device."""

    name: str
    bandwidth: float
    flops: dict[str, float] = field(default_factory=dict)
    source: str = "measured"

    def peak_flops(self, dtype: torch.dtype) -> float:
        """FLOP/s at ``dtype`` (fp32 figures for dtypes the table lacks)."""
        key = str(dtype).removeprefix("torch.")
        return self.flops.get(key) or self.flops.get("float32") or 1.0


def _spec(name: str, bandwidth_tb: float, bf16_tf: float, fp32_tf: float) -> DeviceSpec:
    flops = {"bfloat16": bf16_tf * TF, "float16": bf16_tf * TF, "float32": fp32_tf * TF}
    return DeviceSpec(name, bandwidth_tb * TB, flops, source="datasheet")


# (pattern searched in the device name, spec). Order matters: the first match wins.
KNOWN_DEVICES: tuple[tuple[str, DeviceSpec], ...] = (
    (r"H100.*(PCIe|PCIE)", _spec("NVIDIA H100 PCIe", 2.0, 756, 51)),
    (r"H100.*NVL", _spec("NVIDIA H100 NVL", 3.9, 835, 60)),
    (r"H100", _spec("NVIDIA H100 SXM", 3.35, 989, 67)),
    (r"H200", _spec("NVIDIA H200", 4.8, 989, 67)),
    (r"\bH20\b", _spec("NVIDIA H20", 4.0, 148, 44)),
    (r"A100.*40GB", _spec("NVIDIA A100 40GB", 1.555, 312, 19.5)),
    (r"A100", _spec("NVIDIA A100 80GB", 2.039, 312, 19.5)),
    (r"A800", _spec("NVIDIA A800 80GB", 2.039, 312, 19.5)),
    # Approximate public figures; the 910B variants (B1..B4) differ by ~20%.
    (r"910B", _spec("Huawei Ascend 910B", 1.6, 320, 80)),
)


def lookup(device_name: str) -> DeviceSpec | None:
    """The datasheet spec whose pattern matches ``device_name``, or None."""
    for pattern, spec in KNOWN_DEVICES:
        if re.search(pattern, device_name):
            return spec
    return None


def _best_time(fn, sync, repeats: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _copier(numel: int, device: torch.device):
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _gemv(numel: int, device: torch.device):
    matrix = torch.ones(numel // 4096, 4096, device=device)
    vector = torch.ones(4096, device=device)
    return lambda: matrix @ vector


# The probe's size on the host and on accelerators: the host copies 128 MiB (beyond the
# last-level cache), an accelerator 2 GiB; matmuls start small and double while the next
# size fits the time budget, up to the largest size (a fixed 2048^2 fp16 matmul took 62 s
# on a 2-core CPU without fast fp16).
HOST_COPY_NUMEL, DEVICE_COPY_NUMEL = 32 << 20, 512 << 20
HOST_MATMUL_SIZES, DEVICE_MATMUL_SIZES = (128, 2048), (1024, 8192)
MATMUL_BUDGET_S = 1.5  # per dtype
MATMUL_REPEATS = 2


def probe_dtypes(compute_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The matmul dtypes a run needs: its compute dtype and fp32 (the fallback peak)."""
    return tuple(dict.fromkeys((compute_dtype, torch.float32)))


def describe_probe(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str:
    """One line saying what ``measure`` is about to time (for the progress output)."""
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    seconds = 2 + MATMUL_BUDGET_S * len(dtypes)
    return (
        f"measuring the {device.type} roofline: copy and GEMV bandwidth, {names} matmul "
        f"FLOP/s (at most ~{seconds:.0f} s)"
    )


def _matmul_flops(dtype: torch.dtype, device: torch.device, sync, on_host: bool) -> float:
    """Best FLOP/s of a square matmul at ``dtype``, growing the size within the budget."""
    size, largest = HOST_MATMUL_SIZES if on_host else DEVICE_MATMUL_SIZES
    deadline = time.perf_counter() + MATMUL_BUDGET_S
    best = 0.0
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        seconds = _best_time(lambda a=a: a @ a, sync, MATMUL_REPEATS)
        best = max(best, 2 * size**3 / seconds)
        # Doubling costs 8x per call, and the next size runs MATMUL_REPEATS + 1 calls.
        next_cost = 8 * seconds * (MATMUL_REPEATS + 1)
        if size >= largest or time.perf_counter() + next_cost > deadline:
            logger.debug("%s matmul probe stopped at %d", dtype, size)
            return best
        size *= 2


@functools.cache
def measure(
    device: torch.device, name: str, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> DeviceSpec:
    """Micro-benchmark ``device``: copy/GEMV bandwidth and matmul FLOP/s for each of ``dtypes``
    (only these: an fp16 matmul on a CPU without fast fp16 is slow and is not needed for a
    bf16 or fp32 run). Sized for the device and capped in time (see the constants above)."""
    on_host = device.type == "cpu"
    module = getattr(torch, device.type, None)

    def sync() -> None:
        if not on_host and module is not None:
            module.synchronize(device)

    numel = HOST_COPY_NUMEL if on_host else DEVICE_COPY_NUMEL
    copy_bw = 2 * numel * 4 / _best_time(_copier(numel, device), sync, 3)
    read_bw = numel * 4 / _best_time(_gemv(numel, device), sync, 3)  # what decode GEMVs do
    bandwidth = max(copy_bw, read_bw)
    flops = {
        str(dtype).removeprefix("torch."): _matmul_flops(dtype, device, sync, on_host)
        for dtype in dtypes
    }
    logger.info("measured %s: %.1f GB/s, %s", name, bandwidth / 1e9, flops)
    return DeviceSpec(name, bandwidth, flops, source="measured")


def device_spec(
    device: torch.device, name: str, dtypes: tuple[torch.dtype, ...] = (torch.float32,)
) -> DeviceSpec:
    """The datasheet spec of an accelerator named ``name``, else one measured for ``dtypes``."""
    if device.type != "cpu":
        spec = lookup(name)
        if spec is not None:
            return spec
    return measure(device, name, dtypes)


@dataclass(frozen=True)
class Cost:
    """What one call of a case moves and computes (the minimum, ideal caching)."""

    flops: float
    bytes: float

    def seconds(self, spec: DeviceSpec, dtype: torch.dtype) -> float:
        """The roofline time: the slower of moving the bytes and doing the FLOPs."""
        return max(self.bytes / spec.bandwidth, self.flops / spec.peak_flops(dtype))


def _weight_bytes(w, act: int) -> float:
    per = act if w.fmt == FORMAT_UNQUANTIZED else 1
    scale = 0 if w.scale is None else w.scale.numel() * 4
    return w.weight.numel() * per + scale


def _causal_pairs(q_lens: list[int], context_lens: list[int]) -> int:
    """(query, key) pairs a causal varlen attention visits."""
    return sum(q * (c - q) + q * (q + 1) // 2 for q, c in zip(q_lens, context_lens, strict=True))


def case_cost(case: Case, inputs: Inputs, dtype: torch.dtype) -> Cost | None:
    """Bytes and FLOPs of one call of ``case`` at ``dtype``; None for ops without a model."""
    a = torch.empty((), dtype=dtype).element_size()
    op, i = case.op, inputs
    if op == "linear":
        (m, k), n = i["x"].shape, i["weight"].out_features
        return Cost(2 * m * n * k, (m * k + m * n) * a + _weight_bytes(i["weight"], a))
    if op == "fused_moe":
        (t, h), top_k = i["x"].shape, i["topk_ids"].shape[1]
        inter = i["w2"].in_features
        touched = int(i["topk_ids"].unique().numel())
        num_experts = max(i["w13"].num_experts or 1, 1)
        weights = (_weight_bytes(i["w13"], a) + _weight_bytes(i["w2"], a)) * touched / num_experts
        return Cost(6 * t * top_k * h * inter, weights + 2 * t * h * a + t * top_k * 8)
    if op == "moe_route":
        t, e = i["router_logits"].shape
        return Cost(10 * t * e, t * e * 4 + e * 4 + t * i["top_k"] * 8)
    if op in ("paged_attention_decode", "paged_attention_prefill", "mla_decode", "mla_prefill"):
        return _attention_cost(op, i, a)
    if op == "store_kv":
        moved = sum(i[k].numel() for k in ("key", "value") if i[k] is not None)
        return Cost(0, 2 * moved * a + i["slot_mapping"].numel() * 8)
    if op == "add_rms_norm":  # reads x and the residual, writes the norm and the sum
        n = i["x"].numel()
        return Cost(5 * n, 4 * n * a)
    if op in ("rms_norm", "silu_and_mul"):
        x = i["x"]
        out = x.numel() if op == "rms_norm" else x.numel() // 2
        return Cost(4 * x.numel(), (x.numel() + out) * a)
    if op == "rope":
        moved = i["q"].numel() + i["k"].numel()
        return Cost(
            3 * moved, 2 * moved * a + i["positions"].numel() * i["cos_sin_cache"].shape[1] * 4
        )
    if op == "sample":
        return Cost(5 * i["logits"].numel(), i["logits"].numel() * 4)
    return None


def _attention_cost(op: str, i: Inputs, a: int) -> Cost:
    lens = i["context_lens"].tolist()
    if op.startswith("mla"):
        heads, rank = i["q_latent"].shape[1:]
        key_dim = rank + i["q_rope"].shape[-1]
        kv_heads, q_dims, mix = 1, key_dim + rank, 2 * (key_dim + rank)
        cached = key_dim
    else:
        heads, key_dim = i["q"].shape[1:]
        kv_heads, dv = i["key_cache"].shape[2], i["value_cache"].shape[-1]
        q_dims, mix, cached = key_dim + dv, 2 * (key_dim + dv), key_dim + dv
    if "cu_seqlens_q" in i:
        cu = i["cu_seqlens_q"].tolist()
        q_lens = [cu[j + 1] - cu[j] for j in range(len(lens))]
    else:
        q_lens = [1] * len(lens)
    pairs = _causal_pairs(q_lens, lens)
    moved = sum(lens) * kv_heads * cached * a + sum(q_lens) * heads * q_dims * a
    return Cost(pairs * heads * mix, moved)
