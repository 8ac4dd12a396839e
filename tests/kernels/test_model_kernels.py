"""The portable Triton kernels wired into whole models (tiny Llama and DeepSeek-V3) pass the
conformance whole-model check against cpu_ref, under the interpreter on the CPU.

The per-kernel tests check each kernel alone; this one checks the wiring the models
rely on (fused-projection views, cache layouts, MLA's latent split, MoE routing
output) end to end. The cases live in ``model_interp_cases.py`` (subprocess: the
interpreter must be on before triton is imported)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from kernel_test_helpers import run_cases  # noqa: E402


def test_models_with_every_portable_kernel_pass_the_whole_model_check():
    run_cases("model_interp_cases.py", "cpu")
