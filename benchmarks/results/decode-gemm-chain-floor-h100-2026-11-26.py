"""Where the small decode GEMMs' time goes: chains of the Llama-8B layer GEMMs (8 layers,
distinct weights, one CUDA graph) against the same chain of kernels that only read the
weights, and of empty kernels.

    PYTHONPATH=.:plugins/nvidia:benchmarks python decode-gemm-chain-floor-h100-2026-11-26.py OUT.txt
"""

import sys

import torch
import triton
import triton.language as tl
from bench_ops import _read_tiles_kernel, make_weight, pack_copies, packed_gemm
from chitu_nvidia.configs import soft_fp8_config
from triton.testing import do_bench

LAYERS = {
    "llama8b_tp2": [(4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)],
    "llama8b_1gpu": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}
N_LAYERS = 8


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), 1)


def graph_us(run):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3


def main():
    out = open(sys.argv[1], "w")

    def say(s):
        print(s, flush=True)
        out.write(s + "\n")

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    say(
        f"{torch.cuda.get_device_name(0)}; us per layer of 4 kernels, {N_LAYERS} layers in one graph"
    )
    sink = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
    for name, shapes in LAYERS.items():
        packs = []
        for _ in range(N_LAYERS):
            layer = []
            for k, n in shapes:
                wq, s = make_weight(n, k)
                layer.append(pack_copies([wq], s, True)[0])
            packs.append(layer)
        empty = graph_us(lambda: [_empty_kernel[(sms,)](sink) for _ in range(4 * N_LAYERS)])
        # the read-only floor: the best of splits 2/4/8 per shape, each chain run with one split
        reads = {}
        for split in (2, 4, 8):

            def run_reads(split=split, packs=packs, shapes=shapes):
                for layer in packs:
                    for (k, n), w in zip(shapes, layer, strict=True):
                        _read_tiles_kernel[(n // 64, split)](
                            w.weight.view(torch.int32),
                            sink,
                            k // 4,
                            k // 128 // split,
                            BLOCK_N=64,
                            num_warps=8,
                        )

            reads[split] = graph_us(run_reads)
        line = f"{name}: empty kernels {empty / N_LAYERS:.1f}; read-only " + " ".join(
            f"split{s} {v / N_LAYERS:.1f}" for s, v in reads.items()
        )
        for m in (1, 8, 32, 64):
            x0 = torch.randn(m, shapes[0][0], device="cuda", dtype=torch.bfloat16)
            cfgs = [soft_fp8_config((9, 0), m, k, n, True) for k, n in shapes]

            def run_gemms(x0=x0, cfgs=cfgs, packs=packs, shapes=shapes):
                x = x0
                for layer in packs:
                    for j, w in enumerate(layer):
                        x = packed_gemm(x[:, : shapes[j][0]], w, cfgs[j], sms)

            line += f"; GEMM M={m} {graph_us(run_gemms) / N_LAYERS:.1f}"
        say(line)


main()
