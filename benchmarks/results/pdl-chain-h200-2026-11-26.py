"""Programmatic dependent launch (PDL) on an H200: a probe that it works inside a CUDA
graph, then chains of the Llama-8B layer GEMMs (8 layers, distinct weights, one graph)
with and without PDL on every GEMM. Needs ``pdl-chain-h200-2026-11-26.patch`` applied
(the experiment's ``fp8_gemm(pdl=..., pdl_prefetch=...)``; not kept: PDL lost).

    PYTHONPATH=.:plugins/nvidia:benchmarks python pdl-chain-h200-2026-11-26.py OUTDIR
"""

import json
import sys
import time

import torch
import triton
import triton.language as tl
from bench_ops import make_weight
from chitu_nvidia.configs import soft_fp8_config
from triton.testing import do_bench

from chitu_core.kernels.fp8_gemm import fp8_gemm
from chitu_core.kernels.packed_weight import pack_weight
from chitu_core.quant import FORMAT_FP8_BLOCK128

out_dir = sys.argv[1]
log = open(f"{out_dir}/pdl_chain.txt", "w")


def p(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    log.write(s + "\n")
    log.flush()


@triton.jit
def _now():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def spin_kernel(t_ptr, ns, TRIGGER: tl.constexpr):
    t0 = _now()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    t = t0
    while t - t0 < ns:
        t = _now()
    tl.store(t_ptr + 0, t0)
    tl.store(t_ptr + 1, t)


@triton.jit
def entry_kernel(t_ptr, WAIT: tl.constexpr):
    tl.store(t_ptr + 2, _now())
    if WAIT:
        tl.extra.cuda.gdc_wait()
    tl.store(t_ptr + 3, _now())


def probe():
    t = torch.zeros(4, dtype=torch.int64, device="cuda")

    def run(pdl):
        spin_kernel[(1,)](t, 20000, TRIGGER=pdl)
        if pdl:
            entry_kernel[(1,)](t, WAIT=True, launch_pdl=True)
        else:
            entry_kernel[(1,)](t, WAIT=False)

    for pdl in (False, True):
        run(pdl)
        torch.cuda.synchronize()
        a = t.tolist()
        p(
            f"probe eager pdl={pdl}: B entry - A end {(a[2] - a[1]) / 1e3:.2f} us, B after wait - A end {(a[3] - a[1]) / 1e3:.2f} us"
        )
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run(pdl)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            run(pdl)
        t.zero_()
        g.replay()
        torch.cuda.synchronize()
        a = t.tolist()
        p(
            f"probe graph pdl={pdl}: B entry - A end {(a[2] - a[1]) / 1e3:.2f} us, B after wait - A end {(a[3] - a[1]) / 1e3:.2f} us"
        )


LAYERS = {
    "llama8b_tp2": [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)],
    "llama8b_1gpu": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}


def chain(name, shapes, ms, n_layers, variants, sms):
    packs = []
    for _ in range(n_layers):
        layer = []
        for k, n in shapes:
            wq, s = make_weight(n, k)
            layer.append(
                pack_weight(wq.view(torch.float8_e4m3fn), s, FORMAT_FP8_BLOCK128, k_perm=True)
            )
        packs.append(layer)
    res = {}
    for m in ms:
        x0 = torch.randn(m, shapes[0][0], device="cuda", dtype=torch.bfloat16)

        def run(pdl, pf, m=m, x0=x0):
            x = x0
            for layer in packs:
                for j, w in enumerate(layer):
                    k, n = shapes[j]
                    cfg = soft_fp8_config((9, 0), m, k, n, True)
                    y = fp8_gemm(
                        x[:, :k],
                        w.weight,
                        w.scale,
                        None,
                        channel=False,
                        config=cfg,
                        num_sms=sms,
                        use_ptx=True,
                        nan_codes=w.has_nan_codes,
                        scales_fold=w.scales_fold,
                        k_perm=True,
                        pdl=pdl,
                        pdl_prefetch=pf,
                    )
                    nxt = shapes[(j + 1) % len(shapes)][0]
                    x = y if y.shape[1] >= nxt else torch.cat([y, y], 1)
                    x = x * 0.5 if j == len(layer) - 1 else x
            return x

        outs = {}
        for vname, pdl, pf in variants:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(pdl, pf)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                yo = run(pdl, pf)
            g.replay()
            torch.cuda.synchronize()
            outs[vname] = yo.clone()
            us = do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3
            res[(m, vname)] = us
        base = res[(m, variants[0][0])]
        same = all(torch.equal(outs[v[0]], outs[variants[0][0]]) for v in variants)
        p(
            f"{name} M={m}: "
            + "  ".join(f"{v[0]} {res[(m, v[0])] / n_layers:.1f}" for v in variants)
            + f"  us/layer ({len(shapes)} GEMMs)  gain/GEMM best {(base - min(res[(m, v[0])] for v in variants)) / n_layers / len(shapes):.2f} us  bit-equal {same}"
        )
    return {f"{k[0]}:{k[1]}": v / n_layers for k, v in res.items()}


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    p(torch.cuda.get_device_name(0), torch.__version__, triton.__version__)
    probe()
    variants = [
        ("base", False, 0),
        ("early", True, 0),
        ("late", "late", 0),
        ("late_pf2", "late", 2),
        ("late_pf4", "late", 4),
        ("late_pf8", "late", 8),
    ]
    allres = {}
    t0 = time.time()
    for name, shapes in LAYERS.items():
        allres[name] = chain(name, shapes, [1, 8, 32, 64], 8, variants, sms)
        p(f"[{time.time() - t0:.0f}s]")
    json.dump(allres, open(f"{out_dir}/pdl_chain.json", "w"), indent=1)


main()
