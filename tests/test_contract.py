"""The hook contract: every op of every available backend (and the generic torch ops)
against the CPU reference, on small and odd shapes (M=1, tails not multiple of 128,
empty batches), at the backend's compute dtype (and fp32 for the generic ops)."""

from __future__ import annotations

import zlib

import pytest
import torch

from chitu_core.backend import Ops, bind_ops, discover_backends
from chitu_core.backend_info import BackendInfo
from chitu_core.ops import GENERIC_OPS
from conformance.cases import contract_cases, run_case, run_reference
from conformance.tolerances import assert_close

BACKENDS = discover_backends()
REFERENCE = bind_ops(BACKENDS["cpu_ref"])


def _generic_ops() -> Ops:
    info = BackendInfo(
        name="generic", device_type="cpu", dist_backend="gloo", compute_dtype="float32"
    )
    return Ops(info, GENERIC_OPS, native=())


def _targets():
    targets = [
        pytest.param(_generic_ops, torch.float32, id="generic-fp32"),
        pytest.param(_generic_ops, torch.bfloat16, id="generic-bf16"),
    ]
    for name, backend in BACKENDS.items():
        if name == "cpu_ref" or not backend.is_available:
            continue  # the oracle itself; unavailable ones are reported by the test below
        dtype = getattr(torch, backend.info.compute_dtype)
        targets.append(
            pytest.param(
                lambda b=backend: bind_ops(b),
                dtype,
                id=f"{name}-{str(dtype).removeprefix('torch.')}",
            )
        )
    return targets


@pytest.mark.parametrize("name", [n for n, b in BACKENDS.items() if not b.is_available])
def test_unavailable_backend_is_not_checked_here(name):
    backend = BACKENDS[name]
    assert backend.load_error is None, f"backend {name} is broken: {backend.load_error}"
    pytest.skip(f"backend {name} needs hardware absent here: {backend.unavailable_reason}")


CASES = contract_cases()


@pytest.mark.parametrize("make_ops,dtype", _targets())
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_cpu_ref(make_ops, dtype, case):
    ops = make_ops()
    device = ops.device(0)
    inputs = case.build(torch.Generator().manual_seed(zlib.crc32(case.id.encode())))
    outputs = run_case(ops, case, inputs, dtype, device)
    expected = run_reference(REFERENCE, case, inputs, dtype)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected, strict=True):
        assert out.shape == ref.shape, f"{case.id}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert out.device.type == device.type
        if not out.is_floating_point():
            assert torch.equal(out.cpu(), ref.cpu()), f"{case.id}: integer outputs differ"
            continue
        if case.op == "moe_route":
            # routing weights are fp32 whatever the run's dtype (the spec says so)
            assert out.dtype == torch.float32
            assert_close(case.op, out, ref, torch.float32)
        else:
            assert out.dtype == dtype, f"{case.id}: returned {out.dtype}, the contract says {dtype}"
            assert_close(case.op, out, ref, dtype)
