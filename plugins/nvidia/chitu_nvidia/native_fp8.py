"""Native FP8 GEMM for sm_89+ (Ada, Hopper): DeepSeek-style W8A8 with block scales.

The activation is quantized per token and 128-wide K group (``act_quant_kernel``,
scale = amax / 448), then ``w8a8_block_gemm_kernel`` runs the FP8 tensor-core
MMA and applies ``x_scale[m, k/128] * w_scale[n/128, k/128]`` to each 128-wide K
step's partial product in fp32. Uses ``tl.float8e4nv``: does NOT compile for
sm_80/sm_86 (that is what the soft path is for).

From ``SCALED_MM_MIN_M`` tokens on, the GEMM itself goes to cuBLAS through
``torch._scaled_mm`` with the same block scales where this torch supports it
(the first call per device finds out), else the Triton kernel below.

Bytes: N*K (weight) + 3*M*K (x read, x_fp8 written and read) + 2*M*N (y).
FLOPs: 2*M*N*K at FP8 tensor-core rate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu_core.kernels.fp8_gemm import K_PERM_GROUP, Fp8GemmConfig, grouped_tile, k_perm_tile


@triton.jit
def act_quant_kernel(
    x_ptr,  # [M, K] bf16/fp16
    xq_ptr,  # [M, K] fp8e4nv
    xs_ptr,  # [M, ceil(K/128)] fp32
    K,
    stride_xm,
    num_groups,
    GROUPS_PER_PROGRAM: tl.constexpr,
    K_PERM: tl.constexpr = False,
):
    row = tl.program_id(0)
    g = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)
    offs = g[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0  # [G]
    if K_PERM:
        # x in the weight's K-permuted order (within 16-wide groups, so each 128 group and
        # its scale stay put; K % 16 == 0 keeps the masked tail in its own groups)
        x = k_perm_tile(x, GROUPS_PER_PROGRAM, 128)
    q = (x / s[:, None]).to(tl.float8e4nv)
    tl.store(xq_ptr + row * K + offs, q, mask=mask)
    tl.store(xs_ptr + row * num_groups + g, s, mask=g < num_groups)


@triton.jit
def w8a8_block_gemm_kernel(
    a_ptr,  # [M, K] fp8e4nv
    as_ptr,  # [M, ceil(K/128)] fp32
    b_ptr,  # [N, K] fp8e4nv
    bs_ptr,  # [ceil(N/128), ceil(K/128)] fp32
    bias_ptr,
    c_ptr,  # [M, N]
    M,
    N,
    K,
    stride_bsn,
    stride_bsk,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    BLOCK_K: tl.constexpr = 128
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_m = offs_m % M
    rows_n = offs_n % N
    num_groups = tl.cdiv(K, BLOCK_K)
    a_ptrs = a_ptr + rows_m[:, None] * K + offs_k[None, :]
    b_ptrs = b_ptr + rows_n[None, :] * K + offs_k[:, None]
    as_ptrs = as_ptr + rows_m * num_groups
    bs_ptrs = bs_ptr + (rows_n // 128) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, num_groups):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = kt * BLOCK_K + offs_k < K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        a_s = tl.load(as_ptrs + kt)
        b_s = tl.load(bs_ptrs + kt * stride_bsk)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def act_quant(x: torch.Tensor, k_perm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16 -> (x_fp8 [M, K] float8_e4m3fn, x_scale [M, ceil(K/128)] fp32).

    k_perm: x_fp8 in the K-permuted order of ``fp8_gemm.permute_k`` (K % 16 == 0), to
    meet a K-permuted weight: the dot product over K is the same sum."""
    m, k = x.shape
    if k_perm and k % K_PERM_GROUP:
        raise ValueError(f"K-permuted activations need K % {K_PERM_GROUP} == 0, got K = {k}")
    groups = triton.cdiv(k, 128)
    xq = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    gpp = 8
    act_quant_kernel[(m, triton.cdiv(groups, gpp))](
        x, xq, xs, k, x.stride(0), groups, GROUPS_PER_PROGRAM=gpp, K_PERM=k_perm
    )
    return xq, xs


_SCALED_MM_BLOCKWISE: dict = {}


def _scaled_mm_blockwise(xq, xs, w_fp8, w_scale, out_dtype):
    """cuBLAS block-scaled FP8 GEMM through ``torch._scaled_mm`` (1x128 activation
    groups, 128x128 weight blocks; torch 2.11 + CUDA 13 on sm_90). The layouts it
    accepts: activation scales outer-dim-major ``[M, K/128]`` with stride (1, M),
    weight scales as ``[K/128, N/128]`` (the transpose of ``weight_scale_inv``)."""
    return torch._scaled_mm(
        xq, w_fp8.t(), scale_a=xs.t().contiguous().t(), scale_b=w_scale.t(), out_dtype=out_dtype
    )


def _try_scaled_mm(xq, xs, w_fp8, w_scale, out_dtype):
    """``_scaled_mm_blockwise`` or None where this torch/GPU rejects block scales
    (remembered per device: later calls go straight to the Triton kernel)."""
    key = (xq.device.type, xq.device.index)
    if _SCALED_MM_BLOCKWISE.get(key, True):
        try:
            y = _scaled_mm_blockwise(xq, xs, w_fp8, w_scale, out_dtype)
            _SCALED_MM_BLOCKWISE[key] = True
            return y
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            _SCALED_MM_BLOCKWISE[key] = False
    return None


def native_fp8_gemm(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    config: Fp8GemmConfig,
    use_scaled_mm: bool | None = None,
    k_perm: bool = False,
) -> torch.Tensor:
    """``y = x @ (w_fp8 * w_scale)^T + bias`` on FP8 tensor cores (sm_89+).

    x: [M, K] bf16/fp16; w_fp8: [N, K] float8_e4m3fn; w_scale: block
    ``[ceil(N/128), ceil(K/128)]`` fp32. Uses config.block_m/block_n/group_m/num_warps/num_stages
    (block_n must be <= 128 and divide it). k_perm: w_fp8 is K-permuted
    (``PackedWeight.k_perm``); x is quantized into the same order. Returns [M, N] in x.dtype.
    """
    m, k = x.shape
    n = w_fp8.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    xq, xs = act_quant(x, k_perm)
    if use_scaled_mm is None:
        use_scaled_mm = m >= SCALED_MM_MIN_M
    # cuBLAS block scaling wants whole 128 blocks: an odd shape (tests, tiny models) takes
    # the Triton kernel rather than turning _scaled_mm off for the whole device
    use_scaled_mm = use_scaled_mm and k % 128 == 0 and n % 128 == 0
    if use_scaled_mm:
        y = _try_scaled_mm(xq, xs, w_fp8, w_scale, x.dtype)
        if y is not None:
            return y if bias is None else y.add_(bias)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    w8a8_block_gemm_kernel[grid](
        xq, xs, w_fp8, w_scale, bias if bias is not None else w_scale, y,
        m, n, k, w_scale.stride(0), w_scale.stride(1),
        HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return y


# torch._scaled_mm (cuBLAS) from this many tokens on, where it takes block scales:
# on an H200 it ran M=4096 7168x18432 in 942 us against 1752 us for the Triton kernel.
SCALED_MM_MIN_M = 128

NATIVE_DEFAULT = Fp8GemmConfig(block_n=128, block_m=128, num_warps=8, num_stages=4)
NATIVE_SMALL_M = Fp8GemmConfig(block_n=64, block_m=16, num_warps=4, num_stages=4)


def native_config(m: int) -> Fp8GemmConfig:
    return NATIVE_SMALL_M if m <= 16 else NATIVE_DEFAULT
