"""The FP8-activation recipe emulated in torch on any device: the ``fp8_act`` class's yardstick.

Native W8A8 kernels (e.g. the NVIDIA plugin's ``--fp8-compute native``) quantize
each token's activations to e4m3 with one fp32 scale per 128-wide K group
(``scale = max(amax, 1e-12) / 448``) and multiply exactly against the FP8 weight.
``quantize_activations`` rounds a tensor the same way, so the error of that recipe
can be measured without FP8 hardware: the bound ``MODEL_REL_FRO_FP8_ACT`` of
``conformance/tolerances.py`` comes from ``python -m conformance.fp8_act_emulation``
(the tiny demo models run with every FP8 linear's activations rounded this way,
against cpu_ref in fp32), and the tests use it as a backend that does (or does not)
declare the path.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

GROUP = 128
E4M3_MAX = 448.0


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` rounded to e4m3 per 1x128 group (scale = group amax / 448), returned
    dequantized in ``x.dtype``: what a native W8A8 GEMM multiplies."""
    k = x.shape[-1]
    pad = -k % GROUP
    xf = F.pad(x.float(), (0, pad)).reshape(*x.shape[:-1], -1, GROUP)
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    q = (xf / scale).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(*x.shape[:-1], k + pad)[..., :k].to(x.dtype)


def emulated_linear(generic_linear):
    """``linear`` that rounds its activations as the recipe does for FP8 block weights."""
    from chitu_core.quant import FORMAT_FP8_BLOCK128

    def linear(x, weight, bias):
        if getattr(weight, "fmt", None) == FORMAT_FP8_BLOCK128:
            x = quantize_activations(x)
        return generic_linear(x, weight, bias)

    return linear


def measure_models(dtype: torch.dtype = torch.bfloat16) -> list:
    """The whole-model check of the generic ops with the recipe on every FP8 linear (CPU)."""
    from chitu_core import ops as generic_ops
    from chitu_core.backend import OP_NAMES
    from conformance import model_check

    plain = generic_ops.GENERIC_OPS["linear"]
    generic_ops.GENERIC_OPS["linear"] = emulated_linear(plain)
    try:
        return model_check.check_models("cpu_ref", tuple(OP_NAMES), dtype)
    finally:
        generic_ops.GENERIC_OPS["linear"] = plain


def main() -> None:
    ap = argparse.ArgumentParser(description=measure_models.__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    for result in measure_models(getattr(torch, args.dtype)):
        print(f"{result.arch}: logits rel_fro {result.rel_fro:.3e}, max_abs_rel "
              f"{result.max_abs_rel:.3e}, tokens compared {result.tokens_compared}, "
              f"near ties {result.near_ties}; {result.message or 'pass'}")  # fmt: skip


if __name__ == "__main__":
    main()
