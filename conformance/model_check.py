"""Whole-model check: the tiny demo DeepSeek-V3 and Llama on the backend vs cpu_ref.

Each model runs in a real ``LLMEngine`` (so the backend is bound by
``load_backend`` with the run's demotions, exactly as when serving): two
prompts of different lengths batched together, greedy, ``MAX_NEW_TOKENS``
tokens. The logits of every step are captured at the model runner and
compared with the oracle's (cpu_ref in fp32, computed once per process);
the greedy tokens must match under the near-tie rule of
``conformance/tolerances.py``.

MoE routing is discrete: a router score within rounding of another flips an
expert choice, and with it a token's whole MLP output (the tiny DeepSeek-V3
shows it with cpu_ref itself in bf16: one flipped token moved the logits by
49%). So the oracle marks its near-tied choices (rows whose experts change
when the router logits move by ``ROUTE_TIE_REL`` of their size) and the
backend's run takes the oracle's experts for those rows only: a backend that
routes clear decisions differently still fails. Replaying runs eagerly (a
captured graph would freeze the replayed choices); graphs are checked by the
``capture_graph`` case.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from conformance.tolerances import FP8_ACT_REL_FRO, compare, model_tolerance

logger = logging.getLogger(__name__)

ARCHS = ("deepseek_v3", "llama")
PROMPTS = ([5, 6, 7, 8, 9], list(range(10, 40)))  # ids of the demo vocabulary (512)
MAX_NEW_TOKENS = 4
NUM_BLOCKS = 32
REFERENCE_BACKEND = "cpu_ref"
# Router logits moved by this fraction of their size (the bf16 op tolerance) and the
# number of random moves tried when marking the oracle's near-tied expert choices.
ROUTE_TIE_REL = 2.0**-6
# A run that declares FP8 activations (the fp8_act class) perturbs the router's input by
# up to its op bound, so its near ties are marked at that size (on an H100 the tiny
# DeepSeek-V3 under --fp8-compute native missed the bf16-sized marks: logits 3.2e-1).
ROUTE_TIE_REL_FP8_ACT = FP8_ACT_REL_FRO
ROUTE_TIE_TRIALS = 8

Route = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_workdir: Path | None = None
_reference: dict[str, Trace] = {}


@dataclass
class ModelResult:
    """The outcome of one model: logits error vs bound, tokens compared, where runs diverged."""

    arch: str
    passed: bool
    message: str = ""
    rel_fro: float = 0.0
    max_abs_rel: float = 0.0
    bound_rel_fro: float = 0.0
    tokens_compared: int = 0
    near_ties: list[str] = field(default_factory=list)
    time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trace:
    """Per sequence: the greedy tokens and the logits ``[V]`` fp32 of every step."""

    tokens: list[list[int]]
    logits: list[list[torch.Tensor]]
    # (topk_weights, topk_ids, near_tie [T] bool) of every moe_route call, in call order
    routes: list[Route] = field(default_factory=list)
    # the backend declared a path that quantizes activations to e4m3 (``OpPath``)
    fp8_activations: bool = False
    # the oracle's: near ties at ``ROUTE_TIE_REL_FP8_ACT`` of every moe_route call
    wide_ties: list[torch.Tensor] = field(default_factory=list)


def demo_model(arch: str) -> Path:
    """The tiny demo checkpoint of ``arch``, written once per process into a temp dir."""
    global _workdir
    if _workdir is None:
        _workdir = Path(tempfile.mkdtemp(prefix="chitu-conformance-models-"))
        atexit.register(shutil.rmtree, _workdir, True)
    path = _workdir / arch
    if not (path / "config.json").exists():
        from chitu_core.demo_model import write_demo_model

        write_demo_model(path, arch, "tiny")
    return path


def near_tied_rows(
    router_logits: torch.Tensor, ids: torch.Tensor, *route_args, rel: float = ROUTE_TIE_REL
) -> torch.Tensor:
    """``[T]`` bool: rows whose chosen experts change when the logits move by
    ``rel`` of their magnitude (random moves, generic router, fixed seed)."""
    from chitu_core.ops.moe import moe_route

    logits = router_logits.detach().float().cpu()
    chosen = ids.cpu().sort(dim=-1).values
    gen = torch.Generator().manual_seed(0)
    tied = torch.zeros(logits.shape[0], dtype=torch.bool)
    args = [a.detach().float().cpu() if isinstance(a, torch.Tensor) else a for a in route_args]
    for _ in range(ROUTE_TIE_TRIALS):
        noise = torch.randn(logits.shape, generator=gen) * rel * logits.abs()
        _, moved = moe_route(logits + noise, ids.shape[1], *args)
        tied |= (moved.sort(dim=-1).values != chosen).any(dim=-1)
    return tied


def run_model(
    arch: str,
    backend: str,
    demote: tuple[str, ...],
    dtype: str | None,
    replay_routes: list[Route] | None = None,
    fp8_compute: str = "auto",
    wide_ties: list[torch.Tensor] | None = None,
) -> Trace:
    """Greedy-generate ``PROMPTS`` on ``backend`` (with ``demote``) and capture every step's
    logits and routing. With ``replay_routes`` (the oracle's), its near-tied rows replace
    the backend's choices, call by call while the calls line up (same token count)."""
    from chitu_core.engine.llm_engine import EngineConfig, LLMEngine
    from chitu_core.engine.sampling import SamplingParams

    config = EngineConfig(
        model=demo_model(arch),
        backend=backend,
        dtype=dtype,
        num_blocks=NUM_BLOCKS,
        show_progress=False,
        demote_ops=tuple(demote),
        enforce_eager=replay_routes is not None,
        fp8_compute=fp8_compute,
    )
    engine = LLMEngine(config)
    fp8_act = any(p.fp8_activations for p in engine.ops.paths.values())
    routes: list[Route] = []
    marked_wide: list[torch.Tensor] = []
    route = engine.ops.moe_route

    def recording_route(router_logits, top_k, *args):
        weights, ids = route(router_logits, top_k, *args)
        call = len(routes)
        if replay_routes is None:  # the oracle: mark its near ties
            tied = near_tied_rows(router_logits, ids, *args)
            wide = near_tied_rows(router_logits, ids, *args, rel=ROUTE_TIE_REL_FP8_ACT)
            marked_wide.append(wide.cpu())
        elif call < len(replay_routes) and replay_routes[call][1].shape == ids.shape:
            ref_weights, ref_ids, tied = replay_routes[call]
            if fp8_act and wide_ties is not None:
                tied = wide_ties[call]
            rows = tied.to(ids.device)[:, None]
            weights = torch.where(rows, ref_weights.to(weights), weights)
            ids = torch.where(rows, ref_ids.to(ids), ids)
        else:
            tied = torch.zeros(ids.shape[0], dtype=torch.bool)
        routes.append((weights.detach().cpu(), ids.detach().cpu(), tied.cpu()))
        return weights, ids

    engine.ops.moe_route = recording_route
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with recorded_logits(engine) as logits:
        completions = engine.generate([list(p) for p in PROMPTS], params)
    ids = sorted(logits)
    return Trace(
        [c.token_ids for c in completions], [logits[i] for i in ids], routes, fp8_act, marked_wide
    )


@contextlib.contextmanager
def recorded_logits(engine) -> Iterator[dict[int, list[torch.Tensor]]]:
    """While inside, every step's logits row of each sequence, fp32 on the CPU, by
    sequence id: ``{seq_id: [row [V], ...]}`` (the engine's runner is wrapped, then restored)."""
    rows: dict[int, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def recording_execute(seqs, num_new_tokens, *args):
        out = execute(seqs, num_new_tokens, *args)
        for seq, row in zip(seqs, out, strict=True):
            rows.setdefault(seq.seq_id, []).append(row.detach().float().cpu())
        return out

    engine.runner.execute = recording_execute
    try:
        yield rows
    finally:
        engine.runner.execute = execute


def reference_trace(arch: str) -> Trace:
    """The oracle's trace of ``arch`` (cpu_ref, fp32), computed once per process."""
    if arch not in _reference:
        _reference[arch] = run_model(arch, REFERENCE_BACKEND, (), "float32")
    return _reference[arch]


def compare_traces(arch: str, got: Trace, ref: Trace, dtype: torch.dtype) -> ModelResult:
    """Logits within ``model_tolerance`` (the fp8_act class where the run declared an
    FP8-activation path) and tokens equal up to the first near-tie."""
    tol = model_tolerance(dtype, got.fp8_activations)
    result = ModelResult(arch, passed=True, bound_rel_fro=tol.rel_fro)
    got_rows, ref_rows, problems = [], [], []
    for seq, (tokens, ref_tokens) in enumerate(zip(got.tokens, ref.tokens, strict=True)):
        for step, (token, ref_token) in enumerate(zip(tokens, ref_tokens, strict=True)):
            ref_logits = ref.logits[seq][step]
            got_rows.append(got.logits[seq][step])
            ref_rows.append(ref_logits)
            result.tokens_compared += 1
            if token == ref_token:
                continue
            gap = float(ref_logits[ref_token] - ref_logits[token])
            margin = tol.max_abs_rel * float(ref_logits.abs().max())
            if gap > margin:
                problems.append(
                    f"sequence {seq} step {step}: greedy token {token}, the oracle's {ref_token} "
                    f"(oracle logit gap {gap:.3f} > near-tie margin {margin:.3f})"
                )
            else:
                result.near_ties.append(f"sequence {seq} step {step} (gap {gap:.3f})")
            break  # the texts differ from here on: later steps are not comparable
    report = compare(torch.stack(got_rows), torch.stack(ref_rows))
    result.rel_fro, result.max_abs_rel = report.rel_fro, report.max_abs_rel
    if not report.within(tol):
        problems.append(
            f"logits rel_fro {report.rel_fro:.3e} (bound {tol.rel_fro:.1e}), max_abs_rel "
            f"{report.max_abs_rel:.3e} (bound {tol.max_abs_rel:.1e}), NaN mismatches "
            f"{report.nan_mismatch}"
        )
    if problems:
        result.passed = False
        result.message = f"model[{arch}] ({dtype}): " + "; ".join(problems)
    return result


def check_models(
    backend: str, demote: tuple[str, ...], dtype: torch.dtype, fp8_compute: str = "auto"
) -> list[ModelResult]:
    """The whole-model check of every demo architecture on ``backend`` at ``dtype`` with
    ``--fp8-compute fp8_compute``.

    The oracle's own configuration (cpu_ref, fp32, nothing demoted) is the
    reference trace itself, so it is not run twice.
    """
    results = []
    dtype_name = str(dtype).removeprefix("torch.")
    is_oracle = (backend, tuple(demote), dtype) == (REFERENCE_BACKEND, (), torch.float32)
    for arch in ARCHS:
        start = time.perf_counter()
        try:
            ref = reference_trace(arch)
            got = (
                ref
                if is_oracle
                else run_model(
                    arch, backend, demote, dtype_name, ref.routes, fp8_compute, ref.wide_ties
                )
            )
            result = compare_traces(arch, got, ref, dtype)
        except Exception as exc:  # a backend may fail inside the engine in any way
            result = ModelResult(arch, False, f"model[{arch}]: raised {type(exc).__name__}: {exc}")
        result.time_s = time.perf_counter() - start
        results.append(result)
    return results
