"""Numerics of the Triton fused MoE (``chitu_core/kernels/fused_moe.py``) under TRITON_INTERPRET=1.

Not collected by pytest (no ``test_`` prefix): ``test_moe_kernel.py`` runs each
``case_*`` in its own subprocess with the interpreter switched on before triton
is imported. Also usable on a GPU
(``python tests/kernels/moe_interp_cases.py --device cuda``).

Reference: fp64 with exactly dequantized weights (``chitu_cpu_ref``'s
``dense_weight``) and the intermediate rounded to x.dtype, as the hook spec
says. Bound per output element (``check_close``): one rounding of x.dtype
(2^-7 bf16, one ulp since the interpreter's casts truncate) for each of the
intermediate, the weighted per-pair row and the output, relative to the sum of
absolute products, plus the bf16 rounding of ``e4m3 * scale`` when a config folds
block scales into the weight tile.
"""

from __future__ import annotations

import sys

import torch
from chitu_cpu_ref.linear import dense_weight
from chitu_cpu_ref.moe import chitu_fused_moe as cpu_ref_fused_moe

from chitu_core.kernels.fused_moe import FusedMoeConfig, fused_moe
from chitu_core.kernels.moe_align import UNUSED_BLOCK, max_num_blocks, moe_align
from chitu_core.quant import QuantizedWeight, quantize_fp8

DEVICE = "cpu"
NAN_CODES = (0x7F, 0xFF)
# decode preset shape, a folded-scale prefill-like one with K steps < 128, a wide-N one,
# one-row tiles (FMA) over aligned pairs
CONFIGS = [
    FusedMoeConfig(block_m=16, block_n=32, block_k=128),
    FusedMoeConfig(block_m=16, block_n=64, block_k=64, scale_on_acc=False),
    FusedMoeConfig(block_m=32, block_n=128, block_k=128, group_m=2),
    FusedMoeConfig(block_m=1, block_n=64, down_block_n=64, down_block_k=64),  # FMA, aligned
]


def route(num_tokens: int, num_experts: int, top_k: int, seed: int):
    """Random softmax routing: (weights [T, k] fp32, ids [T, k] int32), distinct experts."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return weights, ids.int()


def make_experts(fmt: str, num_experts: int, hidden: int, inter: int, seed: int):
    """(w13, w2) QuantizedWeight handles of random experts in ``fmt``."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    if fmt == "unquantized":
        return QuantizedWeight(w13.bfloat16(), None, fmt), QuantizedWeight(w2.bfloat16(), None, fmt)
    return quantize_fp8(w13, fmt), quantize_fp8(w2, fmt)


def run_kernel(x, w13, w2, weights, ids, config=None) -> torch.Tensor:
    """fused_moe on DEVICE with the handles' tensors; the result back on the CPU."""
    dev = DEVICE

    def to(t):
        return None if t is None else t.to(dev)

    out = fused_moe(to(x), to(w13.weight), to(w13.scale), to(w2.weight), to(w2.scale), w13.fmt,
                    to(weights), to(ids), config=config)  # fmt: skip
    assert out.shape == x.shape and out.dtype == x.dtype
    return out.cpu()


def reference(x, w13, w2, weights, ids):
    """The spec's value and two error scales, all [T, H] fp64.

    ref: fp64 with the intermediate rounded to x.dtype. mag: sum over the token's
    pairs of ``|w| |W2| @ |act|`` (the scale of a rounding of act, of the weighted
    pair row or of a down-projection weight). fold: the same with ``|act|`` replaced
    by the scale of act's error when gate/up have one rounding per weight operand.
    """
    ref = torch.zeros(x.shape, dtype=torch.float64)
    mag = torch.zeros(x.shape, dtype=torch.float64)
    fold = torch.zeros(x.shape, dtype=torch.float64)
    inter = w13.weight.shape[1] // 2
    x64 = x.double()
    for e in ids.unique().tolist():
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        s13 = None if w13.scale is None else w13.scale[e]
        s2 = None if w2.scale is None else w2.scale[e]
        a = dense_weight(w13.weight[e], s13, w13.fmt)  # [2I, H]
        b = dense_weight(w2.weight[e], s2, w2.fmt).abs()  # [H, I]
        gu = x64[tokens] @ a.T
        gu_mag = x64[tokens].abs() @ a.abs().T
        g, u = gu[:, :inter], gu[:, inter:]
        act = (torch.nn.functional.silu(g) * u).to(x.dtype).double()
        # d(silu(g) u) = silu'(g) u dg + silu(g) du, |silu'| <= 1.1, |silu(g)| <= |g| + 0.28
        act_err = 1.1 * u.abs() * gu_mag[:, :inter] + (g.abs() + 0.28) * gu_mag[:, inter:]
        w = weights[tokens, slots].double()[:, None]
        # += on indexed rows (CPU index_add_ is slow in fp64): a token's experts are distinct
        assert tokens.unique().numel() == tokens.numel()
        ref[tokens] += (act @ dense_weight(w2.weight[e], s2, w2.fmt).T) * w
        mag[tokens] += (act.abs() @ b.T) * w.abs()
        fold[tokens] += (act_err @ b.T) * w.abs()
    return ref, mag, fold


def check_close(out, ref, mag, fold, folded: bool, what: str) -> float:
    """Assert |out - ref| <= ulp * (|ref| + 3 mag [+ mag + fold]); returns max err / bound.

    3 mag: act's rounding (up to 2 ulp apart: truncation vs round-to-nearest), the
    weighted pair row's. Folded block scales add a rounding of every weight operand.
    """
    ulp = 2.0**-7 if out.dtype == torch.bfloat16 else 2.0**-10
    bound = ulp * (ref.abs() + 3 * mag + ((mag + fold) if folded else 0)) + 1e-30
    err = (out.double() - ref).abs()
    ratio = float((err / bound).max()) if err.numel() else 0.0
    assert not out.isnan().any(), f"{what}: NaN"
    assert ratio <= 1.0, f"{what}: max err/bound {ratio:.3g}"
    return ratio


def _folded(fmt: str, cfg: FusedMoeConfig | None) -> bool:
    return fmt == "fp8_block128" and cfg is not None and not cfg.scale_on_acc


def case_align() -> None:
    """Kernel and torch alignments agree; every pair once, one expert per block, padding = P."""
    g = torch.Generator().manual_seed(3)
    shapes = [(1, 2, 4, 16), (5, 3, 8, 16), (33, 2, 8, 16), (33, 3, 6, 64), (64, 8, 256, 16),
              (300, 8, 64, 32), (0, 2, 8, 16), (1024, 4, 8, 64)]  # fmt: skip
    for num_tokens, top_k, num_experts, block_m in shapes:
        ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=g, dtype=torch.int32)
        ids[: num_tokens // 2, 0] = 1  # a crowded expert spanning several blocks
        dev_ids = ids.to(DEVICE)
        a = moe_align(dev_ids, num_experts, block_m, use_kernel=True)
        b = moe_align(dev_ids, num_experts, block_m, use_kernel=False)
        for name in ("sorted_pair_ids", "block_expert", "num_blocks"):
            assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name
        num_pairs = num_tokens * top_k
        max_blocks = max_num_blocks(num_pairs, num_experts, block_m)
        assert a.max_blocks == max_blocks and a.num_pairs == num_pairs
        srt, blk = a.sorted_pair_ids.cpu().long(), a.block_expert.cpu().long()
        nb = int(a.num_blocks.cpu())
        counts = torch.bincount(ids.flatten().long(), minlength=num_experts)
        assert nb == int(((counts + block_m - 1) // block_m).sum())
        assert nb <= max_blocks and bool((blk[nb:] == UNUSED_BLOCK).all())
        assert bool((srt[nb * block_m :] == num_pairs).all()), "unused blocks hold padding"
        real = srt[srt < num_pairs]
        assert torch.equal(real.sort().values, torch.arange(num_pairs)), "each pair exactly once"
        flat = ids.flatten().long()
        rows = srt[: nb * block_m].view(nb, block_m)
        for bi in range(nb):
            pairs = rows[bi][rows[bi] < num_pairs]
            assert pairs.numel() > 0 and bool((flat[pairs] == blk[bi]).all()), f"block {bi}"
            assert bool((rows[bi][pairs.numel() :] == num_pairs).all()), "padding at the end"
        assert bool((blk[:nb].diff() >= 0).all()), "blocks in expert order"


def _check_format(fmt: str, hidden: int, inter: int, runs) -> None:
    """Random experts in ``fmt``; runs: (T, config) pairs; against fp64 and chitu_cpu_ref."""
    num_experts, top_k = 8, 3
    w13, w2 = make_experts(fmt, num_experts, hidden, inter, seed=1)
    for num_tokens, cfg in runs:
        weights, ids = route(num_tokens, num_experts, top_k, seed=num_tokens)
        x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(7))
        x = x.bfloat16()
        ref, mag, fold = reference(x, w13, w2, weights, ids)
        out = run_kernel(x, w13, w2, weights, ids, cfg)
        what = f"{fmt} T={num_tokens} {cfg}"
        print(
            f"  {what}: err/bound {check_close(out, ref, mag, fold, _folded(fmt, cfg), what):.3f}"
        )
        if num_tokens == 5:  # the plugin oracle meets the same bound
            oracle = cpu_ref_fused_moe(x, w13, w2, weights, ids)
            check_close(oracle, ref, mag, fold, False, "chitu_cpu_ref oracle")


# T = 0, 1 (no alignment), 5 and 33 (aligned; 33 * 3 pairs over 8 experts span blocks)
RUNS = [(0, None), (1, None), (5, CONFIGS[0]), (33, CONFIGS[1]), (33, CONFIGS[2])]


def case_formats_block128() -> None:
    _check_format("fp8_block128", 256, 64, RUNS)


def case_formats_channel() -> None:
    _check_format("fp8_channel", 128, 64, RUNS[:4] + [(5, CONFIGS[3])])


def case_formats_unquantized() -> None:
    _check_format("unquantized", 128, 64, RUNS[:3] + RUNS[4:] + [(33, CONFIGS[3])])


def _all_code_bits(shape, seed: int) -> torch.Tensor:
    """uint8 codes of ``shape``: every finite code (subnormals too) in each 256 run."""
    g = torch.Generator().manual_seed(seed)
    finite = torch.tensor([c for c in range(256) if c not in NAN_CODES], dtype=torch.uint8)
    n = 1
    for d in shape:
        n *= d
    reps = -(-n // finite.numel())
    perm = torch.cat([finite[torch.randperm(finite.numel(), generator=g)] for _ in range(reps)])
    return perm[:n].view(shape)


def _code_experts(fmt, num_experts, hidden, inter, seed):
    g = torch.Generator().manual_seed(seed)
    b13 = _all_code_bits((num_experts, 2 * inter, hidden), seed)
    b2 = _all_code_bits((num_experts, hidden, inter), seed + 1)
    if fmt == "fp8_block128":
        s13 = 2.0 ** torch.randint(
            -12, -6, (num_experts, -(-2 * inter // 128), -(-hidden // 128)), generator=g
        )
        s2 = 2.0 ** torch.randint(
            -12, -6, (num_experts, -(-hidden // 128), -(-inter // 128)), generator=g
        )
        s13 = s13 * (1 + torch.rand(s13.shape, generator=g))  # not only powers of two
    else:
        s13 = 2.0 ** torch.randint(-12, -6, (num_experts, 2 * inter), generator=g)
        s2 = 2.0 ** torch.randint(-12, -6, (num_experts, hidden), generator=g)
    return QuantizedWeight(b13, s13.float(), fmt), QuantizedWeight(b2, s2.float(), fmt)


def case_all_codes() -> None:
    """FP8 experts holding all 254 finite codes (subnormals included); fp16 x too;
    tails (H, I not multiples of 128 or of the tiles)."""
    num_experts, top_k = 6, 2
    for fmt, hidden, inter, dtype in (("fp8_block128", 256, 128, torch.bfloat16),
                                      ("fp8_channel", 128, 64, torch.bfloat16),
                                      ("fp8_block128", 200, 96, torch.float16),
                                      ("fp8_channel", 136, 72, torch.float16)):  # fmt: skip
        w13, w2 = _code_experts(fmt, num_experts, hidden, inter, seed=hidden)
        # decode preset at T=1; at T=5 folded scales (block) or the wide tiles (channel)
        for num_tokens, cfg in (
            (1, None),
            (5, CONFIGS[1] if fmt == "fp8_block128" else CONFIGS[2]),
        ):
            weights, ids = route(num_tokens, num_experts, top_k, seed=hidden + num_tokens)
            x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(5))
            x = x.to(dtype)
            ref, mag, fold = reference(x, w13, w2, weights, ids)
            out = run_kernel(x, w13, w2, weights, ids, cfg)
            what = f"{fmt} H={hidden} I={inter} {dtype} T={num_tokens} {cfg}"
            r = check_close(out, ref, mag, fold, _folded(fmt, cfg), what)
            print(f"  {what}: err/bound {r:.3f}")


def case_nan_codes() -> None:
    """A NaN code in W13 of expert a makes every column of a's tokens NaN; one in row h of
    W2 of expert b only column h of b's tokens; all other outputs stay finite."""
    num_experts, top_k, hidden, inter, num_tokens = 6, 2, 128, 64, 9
    for fmt in ("fp8_block128", "fp8_channel"):
        w13, w2 = make_experts(fmt, num_experts, hidden, inter, seed=4)
        b13 = w13.weight.view(torch.uint8).clone()
        b2 = w2.weight.view(torch.uint8).clone()
        a, b, h = 2, 4, 37
        b13[a, inter + 5, 70] = 0x7F  # an up row of expert a
        b2[b, h, 11] = 0xFF
        w13 = QuantizedWeight(b13, w13.scale, fmt)
        w2 = QuantizedWeight(b2, w2.scale, fmt)
        weights, ids = route(num_tokens, num_experts, top_k, seed=11)
        ids[0] = torch.tensor([a, b], dtype=torch.int32)  # both
        ids[1] = torch.tensor([a, 0], dtype=torch.int32)
        ids[2] = torch.tensor([b, 1], dtype=torch.int32)
        ids[3] = torch.tensor([1, 3], dtype=torch.int32)  # neither
        x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(6)).bfloat16()
        for cfg in (CONFIGS[0],) if fmt == "fp8_block128" else (CONFIGS[2],):
            out = run_kernel(x, w13, w2, weights, ids, cfg)
            uses_a = (ids == a).any(1)
            uses_b = (ids == b).any(1)
            want = uses_a[:, None].expand(-1, hidden).clone()
            want[:, h] |= uses_b
            assert torch.equal(out.isnan(), want), f"{fmt} {cfg}: NaN pattern"
        out1 = run_kernel(x[:1], w13, w2, weights[:1], ids[:1])  # one token: no-align path
        assert bool(out1.isnan().all()), "T=1: both experts poisoned -> all NaN"


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = args[1], args[2:]
    for name in args or list(CASES):
        CASES[name]()
        print(f"ok {name} (device={DEVICE})")
