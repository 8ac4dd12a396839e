"""Determinism of a backend as served: the same greedy request twice, and batch invariance.

On the tiny demo models (the run's demotions, in a real ``LLMEngine`` as when
serving; ``--quick``: the Llama only, since the oracle's DeepSeek-V3 steps cost a
second each on a small CPU), greedy, ``MAX_NEW_TOKENS`` tokens:

* **repeat**: one prompt alone, twice in the same engine. The tokens must be
  equal: a user who sends the same greedy request twice expects the same text.
  (Prompts are shorter than a KV block, so the second run cannot start from the
  prefix cache and both run the same kernels on the same shapes.)
* **batch invariance**: the same prompt alone and inside a batch of
  ``BATCH_SIZE`` prompts of other lengths. Kernels that split work by batch size
  (a different GEMM tile, split-K, reduction order) change the logits' last bits
  and can flip a near-tied greedy token. Measured and reported always; a failure
  only when ``BackendInfo.batch_invariant`` claims it (then tokens and logits must
  be bit-equal).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from conformance.model_check import ARCHS, demo_model, recorded_logits

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 6
QUICK_ARCHS = ("llama",)
BATCH_SIZE = 16
BLOCK_SIZE = 16
NUM_BLOCKS = 64  # 16 sequences of at most 15 + 6 tokens: 2 blocks each, plus scratch
PROMPT = [7, 3, 101, 42, 250, 9, 77, 18, 300, 5, 61]  # ids of the demo vocabulary (512)
# The other prompts of the batch: lengths 3..15 tokens, all shorter than a block.
OTHERS = [[(13 * i + 7 * j) % 500 + 1 for j in range(3 + i % 13)] for i in range(BATCH_SIZE - 1)]


@dataclass
class DeterminismResult:
    """One model: repeat and batch-invariance outcomes (``passed`` as described above)."""

    arch: str
    passed: bool
    repeat_tokens_equal: bool = False
    repeat_logits_equal: bool = False
    batch_tokens_equal: bool = False
    batch_logits_equal: bool = False
    # max |logits alone - logits in the batch| / max |logits alone| over every step
    batch_max_rel_diff: float = 0.0
    batch_invariant_claimed: bool = False
    message: str = ""
    time_s: float = 0.0

    @property
    def batch_invariant(self) -> bool:
        """Bit-equal logits (and so tokens) alone and in the batch."""
        return self.batch_tokens_equal and self.batch_logits_equal

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"batch_invariant": self.batch_invariant}


def _engine(arch: str, backend: str, demote: tuple[str, ...], dtype: str | None, fp8_compute: str):
    from chitu_core.engine.llm_engine import EngineConfig, LLMEngine

    config = EngineConfig(
        model=demo_model(arch),
        backend=backend,
        dtype=dtype,
        block_size=BLOCK_SIZE,
        num_blocks=NUM_BLOCKS,
        show_progress=False,
        demote_ops=tuple(demote),
        fp8_compute=fp8_compute,
    )
    return LLMEngine(config)


def _generate(engine, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of ``prompts[0]`` and its logits ``[steps, V]`` fp32 (CPU)."""
    from chitu_core.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with recorded_logits(engine) as rows:
        completions = engine.generate([list(p) for p in prompts], params)
    first = min(rows)  # sequence ids increase with submission order
    return completions[0].token_ids, torch.stack(rows[first])


def check_arch(
    arch: str,
    backend: str,
    demote: tuple[str, ...],
    dtype: str | None,
    claimed: bool,
    fp8_compute: str = "auto",
) -> DeterminismResult:
    """Repeat and batch invariance of ``arch`` on ``backend`` (see the module docstring)."""
    engine = _engine(arch, backend, demote, dtype, fp8_compute)
    tokens_a, logits_a = _generate(engine, [PROMPT])
    tokens_b, logits_b = _generate(engine, [PROMPT])
    tokens_c, logits_c = _generate(engine, [PROMPT, *OTHERS])
    result = DeterminismResult(arch, passed=True, batch_invariant_claimed=claimed)
    result.repeat_tokens_equal = tokens_a == tokens_b
    result.repeat_logits_equal = torch.equal(logits_a, logits_b)
    result.batch_tokens_equal = tokens_a == tokens_c
    same_shape = logits_a.shape == logits_c.shape
    result.batch_logits_equal = same_shape and torch.equal(logits_a, logits_c)
    if same_shape:
        scale = float(logits_a.abs().max()) or 1.0
        result.batch_max_rel_diff = float((logits_a - logits_c).abs().max()) / scale
    problems = []
    if not result.repeat_tokens_equal:
        problems.append(f"the same greedy request gave {tokens_a}, then {tokens_b}")
    if claimed and not result.batch_invariant:
        problems.append(
            f"claims batch invariance, but alone vs in a batch of {BATCH_SIZE}: tokens "
            f"{tokens_a} vs {tokens_c}, logits differ by {result.batch_max_rel_diff:.2e} "
            "(relative to the largest)"
        )
    if problems:
        result.passed = False
        result.message = f"determinism[{arch}]: " + "; ".join(problems)
    return result


def check_determinism(
    backend: str,
    demote: tuple[str, ...],
    dtype: torch.dtype,
    claimed: bool,
    quick: bool,
    fp8_compute: str = "auto",
) -> list[DeterminismResult]:
    """The demo architectures (``QUICK_ARCHS`` when ``quick``) on ``backend`` at ``dtype``
    with ``demote`` applied and ``--fp8-compute fp8_compute`` (the served configuration)."""
    results = []
    dtype_name = str(dtype).removeprefix("torch.")
    for arch in QUICK_ARCHS if quick else ARCHS:
        start = time.perf_counter()
        try:
            result = check_arch(arch, backend, demote, dtype_name, claimed, fp8_compute)
        except Exception as exc:  # a backend may fail inside the engine in any way
            message = f"determinism[{arch}]: raised {type(exc).__name__}: {exc}"
            result = DeterminismResult(arch, False, message=message)
        result.time_s = time.perf_counter() - start
        logger.info("determinism %s: %s in %.1f s", arch, result.passed, result.time_s)
        results.append(result)
    return results
