"""The fp8_act tolerance class: applied only where the backend declares the path.

A backend whose linear quantizes activations to e4m3 in 1x128 groups (emulated here on
the CPU with ``conformance.fp8_act_emulation``) passes its FP8-weight cases only in the
class it declares through ``chitu_configure`` (``OpPath.fp8_activations``); without the
declaration the compute dtype's tighter bound applies and the case fails.
"""

from __future__ import annotations

import dataclasses

import torch

from chitu_core.backend import OP_NAMES, bind_ops, discover_backends
from chitu_core.backend_info import BackendOptions, OpPath
from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_UNQUANTIZED
from conformance import builders as b
from conformance.certificate import CertificateKey, cert_path
from conformance.check import FAIL, PASS, Runner, check_case
from conformance.fp8_act_emulation import emulated_linear, quantize_activations
from conformance.tolerances import (
    FP8_ACT_REL_FRO,
    REL_FRO_BY_DTYPE,
    model_tolerance,
    tolerance_for,
)


def _runner(fp8_act_ops: frozenset[str]) -> Runner:
    backends = discover_backends()
    generic = bind_ops(backends["cpu_ref"], OP_NAMES)  # the generic ops on the host
    ops = bind_ops(backends["cpu_ref"], OP_NAMES)
    ops.linear = emulated_linear(generic.linear)  # a "native W8A8" linear
    ref = bind_ops(backends["cpu_ref"])
    return Runner(
        ops, ref, generic, torch.bfloat16, torch.device("cpu"), timing=False,
        fp8_act_ops=fp8_act_ops,
    )  # fmt: skip


def test_the_recipe_rounds_like_e4m3():
    x = torch.randn(4, 300)
    q = quantize_activations(x)
    err = ((q - x).norm() / x.norm()).item()
    assert 5e-3 < err < 4e-2  # 3 mantissa bits: a few percent, never exact
    assert torch.equal(quantize_activations(q), q)  # representable values stay put


def test_declared_path_passes_in_its_class_and_undeclared_fails():
    case = b.linear_case(FORMAT_FP8_BLOCK128, 64, 256, 512, bias=False)
    declared = check_case(case, _runner(frozenset({"linear"})))
    assert declared.status == PASS, declared.message
    assert declared.tolerance_class == "fp8_act"
    assert REL_FRO_BY_DTYPE[torch.bfloat16] < declared.rel_fro < FP8_ACT_REL_FRO
    undeclared = check_case(case, _runner(frozenset()))
    assert undeclared.status == FAIL and undeclared.tolerance_class == "bfloat16"
    assert "bound 1.6e-02" in undeclared.message


def test_class_is_only_for_fp8_weight_cases():
    case = b.linear_case(FORMAT_UNQUANTIZED, 8, 128, 256, bias=False)
    result = check_case(case, _runner(frozenset({"linear"})))
    assert result.status == PASS and result.tolerance_class == "bfloat16"


def test_the_class_is_never_tighter_and_exact_ops_stay_exact():
    assert tolerance_for("linear", torch.bfloat16, True).rel_fro == FP8_ACT_REL_FRO
    assert tolerance_for("linear", torch.bfloat16).rel_fro == REL_FRO_BY_DTYPE[torch.bfloat16]
    assert tolerance_for("store_kv", torch.bfloat16, True).rel_fro == 0.0
    assert model_tolerance(torch.bfloat16, True).rel_fro > model_tolerance(torch.bfloat16).rel_fro


def test_bind_keeps_declared_paths_of_native_ops_only(monkeypatch):
    backend = dataclasses.replace(discover_backends()["cpu_ref"])
    paths = {"linear": OpPath("native W8A8", True), "fused_moe": OpPath("soft")}
    seen = []

    def configure(backend_, options):
        seen.append(options.fp8_compute)
        return paths

    monkeypatch.setattr("chitu_core.backend.configure", configure)
    ops = bind_ops(backend, (), BackendOptions("native"))
    assert seen == ["native"] and ops.options.fp8_compute == "native"
    assert {op for op, p in ops.paths.items() if p.fp8_activations} == {"linear"}
    demoted = bind_ops(backend, ("linear",), BackendOptions("native"))
    assert "linear" not in demoted.paths  # a demoted op computes generically
    bind_ops(backend, OP_NAMES, BackendOptions("soft"))  # all generic: not configured
    assert seen == ["native", "native"]


def test_certificates_are_per_mode(tmp_path):
    key = CertificateKey("nvidia", "chitu-nvidia", "1", "1", "2.11", "NVIDIA H100")
    native = dataclasses.replace(key, fp8_compute="native")
    assert cert_path(key, tmp_path).name == "nvidia--NVIDIA_H100.json"
    assert cert_path(native, tmp_path).name == "nvidia--NVIDIA_H100--fp8-native.json"
    assert key != native
