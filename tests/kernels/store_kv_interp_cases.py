"""Bit-exactness of the store_kv kernel against the generic op, run under TRITON_INTERPRET=1.

Not collected by pytest (no ``test_`` prefix): ``test_store_kv_kernel.py`` runs
each ``case_*`` in a fresh subprocess with the interpreter switched on before
triton is imported. Also usable on a GPU (``python
tests/kernels/store_kv_interp_cases.py --device cuda``).

Every check fills both caches with random values first, runs the kernel on one
copy and the generic op (``chitu_core.ops.attention.store_kv``) on another,
and compares the whole caches bit for bit (NaNs by position: torch's own NaN
payload for an fp32 -> bf16 cast depends on its vectorised path). So the written
rows are exact (rounding included) and every other slot is untouched.
"""

from __future__ import annotations

import sys

import torch

from chitu_core.kernels.store_kv import store_kv
from chitu_core.ops.attention import store_kv as generic_store_kv

DEVICE = "cpu"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INT = {2: torch.int16, 4: torch.int32}


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    out, ref = out.cpu(), ref.cpu()
    nan = out.isnan()
    assert torch.equal(nan, ref.isnan()), f"{what}: NaNs at different places"
    int_ty = _INT[out.element_size()]
    same = out.view(int_ty) == ref.view(int_ty)
    bad = ~(same | nan)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{out.numel()} elements differ, first at {idx}: "
            f"{out[tuple(idx)].item()!r} vs generic {ref[tuple(idx)].item()!r}"
        )


def _cache(blocks: int, block_size: int, heads: int, dim: int, dtype) -> torch.Tensor:
    """A contiguous cache full of random (non-zero) values: a stray write shows."""
    return (torch.randn(blocks, block_size, heads, dim) * 7 + 3).to(dtype).to(DEVICE)


def check(
    key: torch.Tensor,
    value: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor | None,
    slots: torch.Tensor,
    what: str,
) -> None:
    """Kernel vs generic op on copies of the caches; key/value untouched."""
    k_before = key.clone()
    v_before = None if value is None else value.clone()
    kc_ref = key_cache.clone()
    vc_ref = None if value_cache is None else value_cache.clone()
    generic_store_kv(key, value, kc_ref, vc_ref, slots)
    store_kv(key, value, key_cache, value_cache, slots)
    assert_same_bits(key_cache, kc_ref, what + " key_cache")
    if value_cache is not None:
        assert_same_bits(value_cache, vc_ref, what + " value_cache")
    assert_same_bits(key, k_before, what + ": key modified")
    if value is not None:
        assert_same_bits(value, v_before, what + ": value modified")


def random_slots(tokens: int, num_slots: int, dtype=torch.int64) -> torch.Tensor:
    """Distinct slots in random (unsorted) order."""
    return torch.randperm(num_slots)[:tokens].to(dtype).to(DEVICE)


def check_mha(
    tokens, heads, dim, dim_v, block_size, cache_dtype, in_dtype=None, *, blocks=None,
    fused=False, scale=1.0,
) -> None:  # fmt: skip
    """``fused``: key and value are strided views of one ``[T, (Hq + 2 Hkv) * D]``
    projection (Hq = 2 Hkv), as the Llama model passes them."""
    in_dtype = in_dtype or cache_dtype
    blocks = max(blocks or 2, -(-tokens // block_size) + 2)  # room for T distinct slots
    key_cache = _cache(blocks, block_size, heads, dim, cache_dtype)
    value_cache = _cache(blocks, block_size, heads, dim_v, cache_dtype)
    if fused:
        assert dim == dim_v
        qkv = (torch.randn(tokens, 4 * heads * dim) * scale).to(in_dtype).to(DEVICE)
        _, k_flat, v_flat = qkv.split([2 * heads * dim, heads * dim, heads * dim], dim=-1)
        key = k_flat.reshape(tokens, heads, dim)
        value = v_flat.reshape(tokens, heads, dim)
        if tokens > 1:
            assert not key.is_contiguous() and not value.is_contiguous()
    else:
        key = (torch.randn(tokens, heads, dim) * scale).to(in_dtype).to(DEVICE)
        value = (torch.randn(tokens, heads, dim_v) * scale).to(in_dtype).to(DEVICE)
    slots = random_slots(tokens, blocks * block_size)
    what = (f"store_kv T={tokens} H={heads} D={dim}/{dim_v} bs={block_size} "
            f"{in_dtype}->{cache_dtype} fused={fused}")  # fmt: skip
    check(key, value, key_cache, value_cache, slots, what)


def check_mla(tokens, width, block_size, cache_dtype, in_dtype=None) -> None:
    """The MLA latent ``[T, 1, R + P]`` alone (value and value_cache None), built as
    the model does: ``cat([c_kv[:, None], k_pe], -1)``."""
    in_dtype = in_dtype or cache_dtype
    blocks = max(2, -(-tokens // block_size) + 1)
    latent_cache = _cache(blocks, block_size, 1, width, cache_dtype)
    latent = torch.randn(tokens, 1, width).to(in_dtype).to(DEVICE)
    slots = random_slots(tokens, blocks * block_size)
    what = f"store_kv MLA T={tokens} R+P={width} bs={block_size} {in_dtype}->{cache_dtype}"
    check(latent, None, latent_cache, None, slots, what)


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------


def case_dtypes() -> None:
    """Every input dtype into every cache dtype (the cast rounds as torch does)."""
    torch.manual_seed(0)
    for cache_dtype in DTYPES:
        for in_dtype in DTYPES:
            check_mha(5, 2, 24, 24, 4, cache_dtype, in_dtype, scale=50.0)
    check_mha(9, 3, 64, 64, 16, torch.bfloat16, torch.float32)  # the fp32 -> bf16 cast


def case_rounding() -> None:
    """Ties, subnormals, inf, NaN, -0 and overflow through each cast."""
    torch.manual_seed(1)
    one = 1.0
    specials = [
        0.0, -0.0, float("inf"), float("-inf"), float("nan"),
        one + 2.0**-8, one + 3 * 2.0**-8, one + 2.0**-8 + 2.0**-20,  # bf16 ties / just past
        one + 2.0**-11, one + 3 * 2.0**-11,  # fp16 ties
        1e-40, -3e-39, 1e-45, 2.0**-126 * (1 - 2.0**-9),  # fp32 subnormals
        6e-8, 1e-5, 70000.0, -65520.0, 65519.0, 3.4e38, -3.39e38,  # fp16 range edges
    ]  # fmt: skip
    base = torch.tensor(specials, dtype=torch.float32)
    for cache_dtype in DTYPES:
        for in_dtype in DTYPES:
            tokens, heads, dim = 3, 2, base.numel()
            key = base.repeat(tokens, heads, 1).to(in_dtype)
            key = key * torch.tensor([1.0, -1.0, 3.0]).to(in_dtype)[:, None, None]
            value = key.flip(-1).contiguous()
            key_cache = _cache(2, 4, heads, dim, cache_dtype)
            value_cache = _cache(2, 4, heads, dim, cache_dtype)
            slots = torch.tensor([6, 0, 3], device=DEVICE)
            what = f"store_kv specials {in_dtype}->{cache_dtype}"
            check(key.to(DEVICE), value.to(DEVICE), key_cache, value_cache, slots, what)


def case_mla() -> None:
    torch.manual_seed(2)
    check_mla(6, 576, 16, torch.bfloat16)  # DeepSeek-V3 latent (512 + 64)
    check_mla(3, 576, 1, torch.bfloat16, torch.float32)
    check_mla(4, 40, 64, torch.float16)  # a small width, not a power of two
    check_mla(5, 72, 4, torch.float32, torch.bfloat16)


def case_fused_views() -> None:
    """Key and value as strided views of one projection (Llama), and head-strided ones."""
    torch.manual_seed(3)
    check_mha(6, 8, 128, 128, 16, torch.bfloat16, fused=True)  # Llama-3-8B
    check_mha(5, 2, 48, 48, 1, torch.float16, fused=True)
    check_mha(4, 3, 32, 32, 8, torch.bfloat16, torch.float32, fused=True)
    # head stride != D: key = x[:, :, :D] of a [T, H, D + pad] tensor (token stride H(D+pad))
    tokens, heads, dim = 5, 4, 32
    padded = torch.randn(tokens, heads, dim + 16).to(DEVICE)
    key, value = padded[..., :dim], padded[..., 16:]
    key_cache = _cache(3, 4, heads, dim, torch.bfloat16)
    value_cache = _cache(3, 4, heads, dim, torch.bfloat16)
    slots = random_slots(tokens, 12)
    check(key, value, key_cache, value_cache, slots, "store_kv head-strided views")
    # token-major transposed storage: key[t, h] = buf[h, t] (head stride > token stride)
    buf = torch.randn(heads, tokens, dim).to(torch.float16).to(DEVICE)
    key = buf.transpose(0, 1)
    key_cache = _cache(3, 4, heads, dim, torch.float16)
    check(key, key + 1, key_cache, _cache(3, 4, heads, dim, torch.float16), slots,
          "store_kv transposed key")  # fmt: skip


def case_block_sizes() -> None:
    """Block sizes 1/16/64, slots across blocks in random order, int32 slots, Dv != D,
    head counts that need several head tiles."""
    torch.manual_seed(4)
    for block_size in (1, 16, 64):
        check_mha(7, 2, 64, 64, block_size, torch.bfloat16, blocks=5)
    check_mha(33, 1, 128, 128, 16, torch.float16, blocks=4)  # TP-8 Llama-70B: one kv head
    check_mha(4, 3, 40, 24, 16, torch.float32)  # Dv != D, neither a power of two
    check_mha(3, 20, 64, 64, 16, torch.bfloat16)  # 20 heads: two tiles, the last ragged
    # int32 slots, and slots in the last block / scratch block 0
    tokens, heads, dim = 4, 2, 16
    key = torch.randn(tokens, heads, dim).to(DEVICE)
    value = torch.randn(tokens, heads, dim).to(DEVICE)
    for slot_dtype in (torch.int64, torch.int32):
        slots = torch.tensor([31, 0, 17, 16], dtype=slot_dtype, device=DEVICE)
        check(key, value, _cache(2, 16, heads, dim, torch.bfloat16),
              _cache(2, 16, heads, dim, torch.bfloat16), slots, f"store_kv slots {slot_dtype}")  # fmt: skip


def case_edges() -> None:
    """T == 0 writes nothing; unsupported calls raise ValueError before writing."""
    dev = DEVICE
    kc = _cache(2, 4, 2, 8, torch.bfloat16)
    vc = _cache(2, 4, 2, 8, torch.bfloat16)
    kc0, vc0 = kc.clone(), vc.clone()
    empty = torch.zeros(0, 2, 8, device=dev)
    store_kv(empty, empty, kc, vc, torch.zeros(0, dtype=torch.int64, device=dev))
    store_kv(empty, None, kc, None, torch.zeros(0, dtype=torch.int64, device=dev))
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)

    k = torch.randn(3, 2, 8, device=dev)
    s = torch.tensor([0, 5, 2], device=dev)
    wide = _cache(2, 4, 2, 16, torch.bfloat16)
    for what, call in (
        ("value without value_cache", lambda: store_kv(k, k, kc, None, s)),
        ("value_cache without value", lambda: store_kv(k, None, kc, vc, s)),
        ("non-contiguous key_cache", lambda: store_kv(k, k, wide[..., :8], vc, s)),
        ("non-contiguous value_cache", lambda: store_kv(k, k, kc, wide[..., 8:], s)),
        ("strided key last dim", lambda: store_kv(torch.randn(3, 2, 16, device=dev)[..., ::2],
                                                   None, kc, None, s)),
        ("strided value last dim", lambda: store_kv(k, torch.randn(3, 2, 16, device=dev)[..., ::2],
                                                     kc, vc, s)),
        ("key D mismatch", lambda: store_kv(k[..., :4], None, kc, None, s)),
        ("key heads mismatch", lambda: store_kv(k[:, :1], None, kc, None, s)),
        ("value D mismatch", lambda: store_kv(k, k[..., :4], kc, vc, s)),
        ("value tokens mismatch", lambda: store_kv(k, k[:2], kc, vc, s)),
        ("value block size", lambda: store_kv(k, k, kc, _cache(4, 2, 2, 8, torch.bfloat16), s)),
        ("slots count", lambda: store_kv(k, k, kc, vc, s[:2])),
        ("slots 2-D", lambda: store_kv(k, k, kc, vc, s[:, None])),
        ("slots float", lambda: store_kv(k, k, kc, vc, s.float())),
        ("2-D key", lambda: store_kv(k[:, 0], None, kc[:, :, 0], None, s)),
        ("fp64 key", lambda: store_kv(k.double(), None, kc, None, s)),
        ("fp64 cache", lambda: store_kv(k, None, kc.double(), None, s)),
        ("int8 cache", lambda: store_kv(k, None, kc.to(torch.int8), None, s)),
    ):  # fmt: skip
        try:
            call()
        except ValueError:
            pass
        else:
            raise AssertionError(f"{what}: expected ValueError")
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0), f"{what}: cache written"


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = args[1], args[2:]
    for name in args or list(CASES):
        CASES[name]()
        print(f"ok {name} (device={DEVICE})")
