"""What a case is, and how to run one on a backend and on the CPU reference.

A case builds its inputs on the CPU in fp32 from a seeded generator. ``run_case``
casts the activations to the backend's compute dtype, prepares the weights with
the backend's ``prepare_weight``, moves everything to the backend's device and
returns the outputs as a list of tensors, in a canonical form (e.g. the
unordered top-k of ``moe_route`` sorted by expert id) so that two backends can
be compared element by element. The reference is the same case run on
``cpu_ref`` with the *same* rounded activations in fp32.

Row sampling: the oracle computes in fp64 on the host, which at 4096 tokens of
a real-shape GEMM costs minutes. Ops whose output rows depend only on the same
rows of their ``token_inputs`` (linear, fused_moe, the small ops) are checked
on a seeded sample of ``MAX_REFERENCE_ROWS`` rows (always the first and last):
the backend still computes every row; the reference computes the sampled ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from chitu_core.quant import FORMAT_UNQUANTIZED, QuantizedWeight

Inputs = dict[str, Any]

# Rows of the reference computed for row-separable ops (see the module docstring).
MAX_REFERENCE_ROWS = 48


class ComputeDtype:
    """Placeholder input replaced by the run's compute dtype (``allocate_kv_cache``)."""

    def __repr__(self) -> str:
        return "<compute dtype>"


COMPUTE_DTYPE = ComputeDtype()


@dataclass(frozen=True)
class Case:
    """One op on one set of shapes.

    ``activations`` name the float inputs cast to the compute dtype (caches
    included); ``weights`` name ``QuantizedWeight`` inputs passed through
    ``prepare_weight``. Everything else (indices, scalars) is passed as is.
    ``token_inputs`` name the inputs whose dim 0 is the token dim of every
    output (empty: the op is not row-separable). ``model`` names the model
    whose dimensions the case uses (empty for synthetic shapes); only such
    real-shape cases are timed against the generic op and the roofline.
    """

    op: str
    name: str
    build: Callable[[torch.Generator], Inputs]
    activations: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    token_inputs: tuple[str, ...] = ()
    model: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name}]"

    @property
    def is_timed(self) -> bool:
        return bool(self.model)

    @property
    def seed(self) -> int:
        """The generator seed of this case: a hash of its id, stable across runs."""
        return zlib.crc32(self.id.encode())

    def inputs(self) -> Inputs:
        """Build the case's inputs (CPU, fp32) from its own seed."""
        return self.build(torch.Generator().manual_seed(self.seed))


def prepare_inputs(
    ops: Any, case: Case, inputs: Inputs, dtype: torch.dtype, device: torch.device
) -> Inputs:
    """Cast activations to ``dtype``, prepare weights with ``ops``, copy all to ``device``."""
    out: Inputs = {}
    for key, value in inputs.items():
        if key in case.weights:
            w = value
            if w.fmt == FORMAT_UNQUANTIZED:
                w = QuantizedWeight(w.weight.to(dtype), None, w.fmt)
            scale = None if w.scale is None else w.scale.to(device)
            out[key] = ops.prepare_weight(w.weight.to(device), scale, w.fmt)
        elif isinstance(value, torch.Tensor):
            # Always a copy: in-place ops (store_kv) must not write into the case's inputs,
            # which the reference reads next.
            cast = dtype if key in case.activations else value.dtype
            out[key] = value.to(device=device, dtype=cast, copy=True)
        elif value is COMPUTE_DTYPE:
            out[key] = dtype
        elif key == "device":
            out[key] = device
        else:
            out[key] = value
    return out


def reference_inputs(case: Case, inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The same values the backend sees (activations rounded to ``dtype``), in fp32 on the CPU."""
    out = dict(inputs)
    for key in case.activations:
        if isinstance(inputs.get(key), torch.Tensor):
            out[key] = inputs[key].to(dtype).float()
    for key in case.weights:
        w = inputs[key]
        if w.fmt == FORMAT_UNQUANTIZED:
            out[key] = QuantizedWeight(w.weight.to(dtype).float(), None, w.fmt)
    if any(v is COMPUTE_DTYPE for v in inputs.values()):  # the cache dtype is part of the result
        out = {k: (dtype if v is COMPUTE_DTYPE else v) for k, v in out.items()}
    return out


def _canonical_route(weights: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    order = ids.long().argsort(dim=-1)
    return [weights.gather(-1, order), ids.long().gather(-1, order)]


def _capture_graph(ops: Any, args: Inputs) -> list[torch.Tensor]:
    """Capture an RMSNorm over static buffers, refill the input, replay: outputs of the replay."""
    x, weight, fresh = args["x"], args["weight"], args["x_next"]
    replay = ops.capture_graph(lambda: ops.rms_norm(x, weight, 1e-6), args["device"])
    x.copy_(fresh)
    result = replay()
    return list(result) if isinstance(result, tuple) else [result]


def call_op(ops: Any, case: Case, args: Inputs) -> list[torch.Tensor]:
    """Run ``case.op`` with prepared ``args``; return its outputs in canonical form."""
    if case.op == "capture_graph":
        return _capture_graph(ops, args)
    fn = getattr(ops, case.op)
    if case.op == "store_kv":
        fn(**args)
        return [t for t in (args["key_cache"], args["value_cache"]) if t is not None]
    result = fn(**args)
    if case.op == "moe_route":
        return _canonical_route(*result)
    return list(result) if isinstance(result, tuple) else [result]


def run_case(
    ops: Any, case: Case, inputs: Inputs, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Run ``case`` on a backend at ``dtype``/``device``; outputs in canonical form."""
    return call_op(ops, case, prepare_inputs(ops, case, inputs, dtype, device))


def run_reference(
    ref_ops: Any, case: Case, inputs: Inputs, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Run ``case`` on the CPU reference with the activations rounded as the backend sees them."""
    args = reference_inputs(case, inputs, dtype)
    return run_case(ref_ops, case, args, torch.float32, torch.device("cpu"))


def sample_rows(case: Case, inputs: Inputs) -> torch.Tensor | None:
    """Token rows the reference computes (sorted int64), or None for all of them."""
    if not case.token_inputs:
        return None
    num_rows = inputs[case.token_inputs[0]].shape[0]
    if num_rows <= MAX_REFERENCE_ROWS:
        return None
    gen = torch.Generator().manual_seed(case.seed)
    middle = torch.randperm(num_rows - 2, generator=gen)[: MAX_REFERENCE_ROWS - 2] + 1
    return torch.cat([torch.tensor([0, num_rows - 1]), middle]).sort().values


def select_rows(case: Case, inputs: Inputs, rows: torch.Tensor) -> Inputs:
    """``inputs`` restricted to token ``rows`` (the other inputs unchanged)."""
    return {k: (v[rows] if k in case.token_inputs else v) for k, v in inputs.items()}
