"""Small ops: RMSNorm (alone and after a residual add), rotary embedding, SwiGLU through
torch_npu's fused operators."""

from __future__ import annotations

import torch

from chitu_ascend._npu import torch_npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_rms_norm``. x ``[M, D]`` -> ``[M, D]``.

    The fused operator multiplies by gamma before its one rounding to x's dtype,
    where the contract rounds the normalised value first: at most one rounding
    step apart (tolerance class accumulate).
    """
    # torch_npu.npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)
    # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
    # y = x / sqrt(mean(x^2, -1) + eps) * gamma (first output), rstd (second); gamma has x's
    # dtype.
    y, _ = torch_npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_add_rms_norm``: ``(normed, summed)``, ``[M, D]`` each.

    The sum is rounded to x's dtype and normalised as ``rms_norm`` does (gamma before
    the one rounding, tolerance class accumulate).
    """
    # torch_npu.npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06)
    #     -> (Tensor y, Tensor rstd, Tensor x)
    # Ascend/op-plugin test/test_custom_ops/test_npu_add_rms_norm.py: x = x1 + x2,
    # y = x * rstd * gamma; x1, x2 and gamma share one dtype.
    y, _, summed = torch_npu().npu_add_rms_norm(x, residual, weight.to(x.dtype), epsilon=eps)
    return y, summed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox_style: bool):
    """x ``[T, H, D]``; cos/sin ``[T, R/2]`` fp32. Rotates channels ``[0, R)`` in fp32."""
    rot_dim = 2 * cos.shape[-1]
    if is_neox_style:  # pair (i, i + R/2): each half-frequency repeated twice, halves
        r1, r2 = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)
    else:  # pair (2i, 2i + 1): each frequency repeated on adjacent channels
        r1, r2 = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    xr = x[..., :rot_dim].float().unsqueeze(0).contiguous()  # [1, T, H, R]: BSND
    # torch_npu.npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, str rotary_mode='half')
    #     -> Tensor
    # https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000141.html
    # half: x1, x2 = chunk(x, 2, -1); out = r1 * x + r2 * cat(-x2, x1);
    # interleave: out = r1 * x + r2 * interleave(-x[..., 1::2], x[..., ::2]). BSND input with
    # 1S1D r1/r2; fp32 (a documented dtype) so the rotation is computed in fp32 as contracted.
    out = torch_npu().npu_rotary_mul(
        xr,
        r1[None, :, None, :],
        r2[None, :, None, :],
        rotary_mode="half" if is_neox_style else "interleave",
    )[0]
    if rot_dim == x.shape[-1]:
        return out.to(x.dtype)
    return torch.cat([out.to(x.dtype), x[..., rot_dim:]], dim=-1)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``chitu_core.hookspecs.chitu_rope``. One gather of the cache rows on device."""
    if q.shape[0] == 0:
        return q.clone(), k.clone()
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, R/2] each
    return _rotate(q, cos, sin, is_neox_style), _rotate(k, cos, sin, is_neox_style)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """See ``chitu_core.hookspecs.chitu_silu_and_mul``. x ``[M, 2I]`` -> ``[M, I]``."""
    if x.shape[0] == 0:
        return x.new_empty(0, x.shape[-1] // 2)
    # torch_npu.npu_swiglu(Tensor input, int dim=-1) -> Tensor
    # https://hiascend.com/document/detail/zh/Pytorch/600/apiref/apilist/ptaoplist_000834.html
    # out = swish(A) * B = A * sigmoid(A) * B, A/B the first/second half along dim; x's dtype;
    # no empty or non-contiguous input (handled above / .contiguous()).
    return torch_npu().npu_swiglu(x.contiguous(), dim=-1)
