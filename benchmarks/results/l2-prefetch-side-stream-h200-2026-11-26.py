"""Does an L2 prefetch of the next GEMM's weight, on a side stream while a latency-bound
kernel (all-reduce / attention stand-in: a 32-program spin) runs, shorten the layer?
Llama-8B TP=2 layer GEMMs (M=32), 8 layers, one CUDA graph. Not kept: no gain.

    PYTHONPATH=.:plugins/nvidia:benchmarks python l2-prefetch-side-stream-h200-2026-11-26.py OUT.txt
"""

import sys

import torch
import triton
import triton.language as tl
from bench_ops import make_weight, pack_copies, packed_gemm
from chitu_nvidia.configs import soft_fp8_config
from triton.testing import do_bench

out = open(sys.argv[1], "w")


def say(s):
    print(s, flush=True)
    out.write(s + "\n")
    out.flush()


@triton.jit
def _now():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def spin_kernel(t_ptr, ns):
    t0 = _now()
    t = t0
    while t - t0 < ns:
        t = _now()
    tl.store(t_ptr + tl.program_id(0), t)


@triton.jit
def l2_prefetch_kernel(w_ptr, n_lines, LINES_PER_PROG: tl.constexpr, BLOCK: tl.constexpr):
    base = tl.program_id(0) * LINES_PER_PROG
    for i in range(0, LINES_PER_PROG, BLOCK):
        line = base + i + tl.arange(0, BLOCK)
        line = tl.minimum(line, n_lines - 1)
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n mov.b32 $0, 0;",
            "=r,l",
            [w_ptr + line.to(tl.int64) * 128],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


SHAPES = [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)]
GAP_NS = {
    0: 10000,
    1: 8000,
    2: 1000,
    3: 8000,
}  # after qkv: attention; after o: all-reduce; after gate_up: silu; after down: all-reduce


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    say(f"{torch.cuda.get_device_name(0)}")
    packs = []
    for _ in range(8):
        layer = []
        for k, n in SHAPES:
            wq, s = make_weight(n, k)
            layer.append(pack_copies([wq], s, True)[0])
        packs.append(layer)
    flat = [w for layer in packs for w in layer]
    m = 32
    cfgs = [soft_fp8_config((9, 0), m, k, n, True) for k, n in SHAPES]
    x0 = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    tbuf = torch.zeros(1024, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()

    def run(pf_mb, spin_progs=32, gap_scale=1.0):
        x = x0
        idx = 0
        for layer in packs:
            for j, w in enumerate(layer):
                x = packed_gemm(x[:, : SHAPES[j][0]], w, cfgs[j], sms)
                idx += 1
                nxt = flat[idx] if idx < len(flat) else None
                if pf_mb and nxt is not None:
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        nbytes = min(nxt.weight.numel(), int(pf_mb * 2**20))
                        n_lines = nbytes // 128
                        lpp = 1024
                        l2_prefetch_kernel[(triton.cdiv(n_lines, lpp),)](
                            nxt.weight, n_lines, LINES_PER_PROG=lpp, BLOCK=256, num_warps=8
                        )
                spin_kernel[(spin_progs,)](tbuf, int(GAP_NS[j] * gap_scale), num_warps=1)
                if pf_mb and nxt is not None:
                    torch.cuda.current_stream().wait_stream(side)
        return x

    def graph_us(**kw):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run(**kw)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = run(**kw)
        g.replay()
        torch.cuda.synchronize()
        return do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3 / 8, y.clone()

    base, yb = graph_us(pf_mb=0)
    nospin, _ = graph_us(pf_mb=0, gap_scale=0.0)
    say(
        f"per layer: base {base:.1f} us (spins alone {(base - nospin):.1f}: GEMMs + 4 spins of 10/8/1/8 us; spins at 0 ns: {nospin:.1f})"
    )
    for mb in (4, 8, 16, 24, 32, 64):
        us, y = graph_us(pf_mb=mb)
        say(
            f"  prefetch first {mb} MB of the next weight during the gap: {us:.1f} us ({base - us:+.1f}); same output {torch.equal(y, yb)}"
        )


main()
