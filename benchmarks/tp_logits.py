"""Step logits of one layout (1 device, TP, PP) on identical inputs, and their comparison.

``run`` builds the engine exactly as ``chitu generate`` does (the CLI's engine
options and ``run_ranks``: one process, ``torchrun --nproc_per_node N``, or
ranks spawned on this host), prefills a fixed prompt and decodes ``--steps``
tokens *teacher-forced*: the token fed back at step ``i`` is ``forced[i]``, not
the layout's own pick, so two layouts see identical inputs at every step even
where their greedy choices differ. Rank 0 saves, per batch size, the fp32
logits ``[steps + 1, vocab]`` of sequence 0 (row 0: the prefill's last
position; row ``i``: decode step ``i``) and their argmax (the greedy ids) to a
safetensors file::

    python benchmarks/tp_logits.py run --model DIR --backend nvidia --out ref.safetensors
    torchrun --standalone --nproc_per_node 2 benchmarks/tp_logits.py run --tp 2 \\
        --model DIR --backend nvidia --force-from ref.safetensors --out tp2.safetensors
    python benchmarks/tp_logits.py compare ref.safetensors tp2.safetensors

Without ``--force-from``/``--force-ids`` a batch-1 pass decodes freely (greedy)
first and its tokens become the forced sequence: the reference's greedy
continuation. Then "every step's argmax equal" means the other layout's own
greedy generation would be token-for-token the same. ``--batch 1,32`` repeats
the run with 32 copies of the prompt (a different decode-graph bucket and GEMM
shape); ``spread`` records the largest difference between the rows of one
batch (0 for batch-invariant kernels).

``compare A B`` prints per step the max |logit difference|, that divided by
the reference's max |logit| ("rel"), whether the argmax agrees and, where it
does not, each run's top-2 gap, then PASS or FAIL (exit status 0 or 1).

Tolerance (``--tol``, default 2e-2 of the reference's max |logit|): the compute
dtype is bf16, whose unit roundoff is 2^-8 = 3.9e-3 (a step of 2^-7 = 7.8e-3
between neighbours). TP changes where the row-parallel partial sums are
rounded (two bf16 partials all-reduced instead of one fp32 accumulation) and
PP nothing but the batching, so each layer's residual update may differ by an
ulp or so; these roundings compound through the layers and reach the logits
as a few bf16 ulps of the largest logit: 2e-2 is about 2.5 ulps. A wrong
shard, a missing or doubled all-reduce, or a KV cache written at the wrong
slot moves logits by a sizeable fraction of their range. An argmax may differ
only where the reference's top-2 gap is within the same tolerance (a near-tie
that such rounding can flip); any other difference is a FAIL.

The floor: when the reference holds two batch sizes (``--batch 1,32``), ``compare``
first measures the reference against itself: batch 1 vs the largest batch, the same
inputs through other GEMM kernels and graph buckets on the same device. A layout
may differ from the reference by as much as the reference differs from itself
(``--floor``, on by default): the tolerance used is ``max(--tol, floor)``, where
floor is the largest per-step rel of that self-comparison. The self-comparison's
own argmax flips are printed too: with a random-weight MoE they show how often a
router's near-tied experts flip under rounding alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chitu_core.cli import add_engine_options, engine_config
from chitu_core.engine.sampling import SampleResult, SamplingParams

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_TOL = 2e-2


# -- recording ------------------------------------------------------------------------
class _Sampled:
    """A draw already on the host, in ``PendingSample``'s shape."""

    def __init__(self, result: SampleResult) -> None:
        self._result = result

    def result(self) -> SampleResult:
        return self._result


class ForcingSampler:
    """Stands in for ``engine.sampler``: feeds back ``forced[step]`` (or, without a forced
    sequence, the argmax), and records the logits of sequence 0 plus the per-step
    elementwise min/max over all rows (the batch spread).

    ``first``: the ``output_token_ids`` list of sequence 0 (rows are recognised by the
    identity of the list the engine passes, which is the sequence's own).
    """

    def __init__(self, first: list[int], forced: list[int] | None, rows: int) -> None:
        self.first, self.forced, self.rows = first, forced, rows
        self.logits: list[torch.Tensor | None] = [None] * rows
        self.greedy = [-1] * rows  # sequence 0's argmax per step
        self.fed = [-1] * rows  # the token sequence 0 was given per step
        self.low: dict[int, torch.Tensor] = {}
        self.high: dict[int, torch.Tensor] = {}

    def launch(self, *args) -> _Sampled:
        """The engine's entry point (``Sampler.launch``): samples at once."""
        return _Sampled(self(*args))

    def __call__(self, logits, params, generators, output_token_ids, prompt_token_ids):
        rows = logits.float()
        picks = rows.argmax(dim=-1).tolist()
        steps = [len(out) for out in output_token_ids]
        tokens = []
        for i, (out, step) in enumerate(zip(output_token_ids, steps, strict=True)):
            if step >= self.rows:
                raise RuntimeError(f"step {step} past the {self.rows} recorded steps")
            token = picks[i] if self.forced is None else self.forced[step]
            if out is self.first:
                self.logits[step] = rows[i].cpu()
                self.greedy[step], self.fed[step] = picks[i], token
            tokens.append(token)
        for step in set(steps):
            sub = rows[[i for i, s in enumerate(steps) if s == step]]
            low, high = sub.min(dim=0).values, sub.max(dim=0).values
            if step in self.low:
                low, high = torch.minimum(low, self.low[step]), torch.maximum(high, self.high[step])
            self.low[step], self.high[step] = low, high
        return SampleResult(token_ids=tokens, logprobs=[None] * len(tokens))

    def result(self) -> dict[str, torch.Tensor]:
        missing = [i for i, t in enumerate(self.logits) if t is None]
        if missing:
            raise RuntimeError(f"no logits recorded for steps {missing}")
        spread = torch.stack([(self.high[s] - self.low[s]).max() for s in range(self.rows)])
        return {
            "logits": torch.stack(self.logits),  # [rows, V]
            "greedy": torch.tensor(self.greedy, dtype=torch.int64),
            "fed": torch.tensor(self.fed, dtype=torch.int64),
            "spread": spread.cpu(),
        }


def record(
    engine: Any, prompt: list[int], steps: int, batch: int, forced: list[int] | None
) -> dict[str, torch.Tensor]:
    """Prefill ``batch`` copies of ``prompt`` and decode ``steps`` tokens on ``engine``
    (rank 0), feeding ``forced`` back (greedy if None, batch 1 only)."""
    if forced is None and batch != 1:
        raise ValueError("free-running (no forced tokens) is for batch 1 only")
    if forced is not None and len(forced) < steps + 1:
        raise ValueError(f"{len(forced)} forced tokens for {steps} steps ({steps + 1} needed)")
    if engine.has_unfinished():
        raise RuntimeError("the engine has unfinished requests")
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    seq_ids = [engine.add_request(prompt, params) for _ in range(batch)]
    first = engine._seqs[seq_ids[0]].output_token_ids  # the list the sampler is handed
    sampler = ForcingSampler(first, forced, steps + 1)
    saved, engine.sampler = engine.sampler, sampler
    # Steps queued ahead would reach the sampler before the forced token was appended.
    overlap, engine.overlap_steps = engine.overlap_steps, False
    try:
        while engine.has_unfinished():
            engine.step()
    finally:
        engine.sampler, engine.overlap_steps = saved, overlap
    return sampler.result()


def record_all(
    engine: Any, prompt: list[int], steps: int, batches: list[int], forced: list[int] | None
) -> dict[str, torch.Tensor]:
    """``record`` for every batch size: tensors ``prompt``, ``forced`` and, per batch size
    ``b``, ``logits.b{b}`` ``[steps + 1, V]`` fp32, ``greedy.b{b}`` and ``spread.b{b}``."""
    out: dict[str, torch.Tensor] = {}
    if forced is None:  # the reference: its own greedy continuation becomes the forced one
        free = record(engine, prompt, steps, 1, None)
        forced = free["fed"].tolist()  # == its greedy ids
        if 1 in batches:
            out |= {f"{k}.b1": v for k, v in free.items()}
    for batch in batches:
        if f"logits.b{batch}" not in out:
            result = record(engine, prompt, steps, batch, forced)
            out |= {f"{k}.b{batch}": v for k, v in result.items()}
    out["prompt"] = torch.tensor(prompt, dtype=torch.int64)
    out["forced"] = torch.tensor(forced[: steps + 1], dtype=torch.int64)
    return out


def _forced_from(args: argparse.Namespace) -> list[int] | None:
    if args.force_ids:
        return [int(t) for t in args.force_ids.split(",")]
    if args.force_from:
        return load_file(args.force_from)["forced"].tolist()
    return None


def _prompt(args: argparse.Namespace, engine: Any) -> list[int]:
    if args.prompt_ids:
        return [int(t) for t in args.prompt_ids.split(",")]
    if args.force_from:  # the reference's prompt, so the two runs see the same one
        return load_file(args.force_from)["prompt"].tolist()
    return engine.tokenizer.encode(args.prompt)


def cmd_run(args: argparse.Namespace) -> int:
    from chitu_core.distributed.launch import run_ranks
    from chitu_core.engine.llm_engine import LLMEngine

    config = engine_config(args, args.model)
    batches = [int(b) for b in args.batch.split(",")]
    forced = _forced_from(args)

    def drive() -> int:  # rank 0; the other ranks follow its steps
        with LLMEngine(config) as engine:
            prompt = _prompt(args, engine)
            graphs = engine.runner.graphs
            info = {
                "tp": config.tp,
                "pp": config.pp,
                "backend": engine.ops.info.name,
                "device": _device_name(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."),
                "decode_graphs": graphs.buckets if graphs is not None else None,
                "model": str(args.model),
                "steps": args.steps,
                "batches": batches,
                "forced_from": args.force_from or ("--force-ids" if args.force_ids else None),
                "torch": torch.__version__,
            }
            tensors = record_all(engine, prompt, args.steps, batches, forced)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            args.out,
            metadata={"info": json.dumps(info)},
        )
        graphs_text = f"graphs {info['decode_graphs']}" if info["decode_graphs"] else "eager"
        print(
            f"TP={config.tp} PP={config.pp} {info['backend']} on {info['device']} "
            f"({graphs_text}): {len(prompt)}-token prompt, {args.steps} forced decode steps -> "
            f"{args.out}",
            flush=True,
        )
        for batch in batches:
            greedy = tensors[f"greedy.b{batch}"].tolist()
            spread = tensors[f"spread.b{batch}"].max().item()
            print(f"  batch {batch}: greedy ids {greedy} (batch spread {spread:.3g})", flush=True)
        return 0

    return run_ranks(config, drive)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# -- comparison -----------------------------------------------------------------------
def _top2_gap(row: torch.Tensor) -> float:
    top = row.topk(2).values
    return (top[0] - top[1]).item()


def compare_logits(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[list[dict], bool]:
    """Per-step rows comparing reference ``a`` with ``b`` (both ``[steps, V]`` fp32), and
    whether ``b`` passes: every step's max |diff| <= ``tol`` * max |a|, and argmax
    differences only where ``a``'s top-2 gap is <= ``tol`` * max |a| (a near-tie)."""
    rows, ok = [], True
    for step, (ra, rb) in enumerate(zip(a, b, strict=True)):
        finite = bool(torch.isfinite(ra).all() and torch.isfinite(rb).all())
        scale = ra.abs().max().item() if finite else float("nan")
        diff = (ra - rb).abs().max().item() if finite else float("inf")
        rel = diff / scale if finite and scale > 0 else (0.0 if diff == 0 else float("inf"))
        arg_a, arg_b = int(ra.argmax()), int(rb.argmax())
        row = {
            "step": step,
            "max_abs": diff,
            "rel": rel,
            "scale": scale,
            "argmax_equal": arg_a == arg_b,
        }
        row_ok = finite and rel <= tol
        if arg_a != arg_b:
            row |= {"argmax_a": arg_a, "argmax_b": arg_b}
            row |= {"gap_a": _top2_gap(ra), "gap_b": _top2_gap(rb)}
            row["near_tie"] = finite and row["gap_a"] <= tol * scale
            row_ok = row_ok and row["near_tie"]
        row["ok"] = row_ok
        ok = ok and row_ok
        rows.append(row)
    return rows, ok


def _info(path: str) -> dict:
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("info", "{}"))


def _describe(info: dict) -> str:
    graphs = "graphs" if info.get("decode_graphs") else "eager"
    return (
        f"TP={info.get('tp')} PP={info.get('pp')} {info.get('backend')} on "
        f"{info.get('device')}, {graphs}"
    )


def _self_floor(a: dict[str, torch.Tensor], tol: float, say) -> float:
    """The largest per-step rel between the reference's smallest and largest batch (0
    when it holds one batch size), printed with the argmax flips of that comparison."""
    sizes = sorted(int(k.removeprefix("logits.b")) for k in a if k.startswith("logits.b"))
    if len(sizes) < 2:
        return 0.0
    small, large = a[f"logits.b{sizes[0]}"], a[f"logits.b{sizes[-1]}"]
    steps = min(small.shape[0], large.shape[0])
    rows, _ = compare_logits(small[:steps], large[:steps], tol)
    floor = max(r["rel"] for r in rows)
    flips = [r["step"] for r in rows if not r["argmax_equal"]]
    say(
        f"floor: A batch {sizes[0]} vs A batch {sizes[-1]} (same inputs, other kernels): "
        f"max rel {floor:.2e}, argmax differs at {len(flips)}/{steps} steps"
        f"{' ' + str(flips) if flips else ''}; tolerance used: max({tol:g}, floor) = "
        f"{max(tol, floor):.3g}"
    )
    return floor


def compare_files(
    path_a: str, path_b: str, tol: float = DEFAULT_TOL, out=sys.stdout, floor: bool = True
) -> bool:
    """Print the step-by-step comparison of two ``run`` files (``a`` is the reference);
    True when ``b`` passes at every batch size both hold. ``floor``: allow B to differ
    from A as much as A's batch sizes differ from each other (module doc)."""

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    a, b = load_file(path_a), load_file(path_b)
    say(f"A (reference): {path_a}: {_describe(_info(path_a))}")
    say(f"B:             {path_b}: {_describe(_info(path_b))}")
    if floor:
        tol = max(tol, _self_floor(a, tol, say))
    if not torch.equal(a["prompt"], b["prompt"]):
        say("FAIL: the two runs had different prompts")
        return False
    n = min(a["forced"].shape[0], b["forced"].shape[0])
    if not torch.equal(a["forced"][: n - 1], b["forced"][: n - 1]):
        say("FAIL: the two runs were fed different tokens (run B with --force-from A)")
        return False
    keys = sorted((k for k in a if k.startswith("logits.b") and k in b), key=lambda k: int(k[8:]))
    if not keys:
        say("FAIL: no batch size in common")
        return False
    passed = True
    for key in keys:
        batch = key.removeprefix("logits.b")
        la, lb = a[key], b[key]
        steps = min(la.shape[0], lb.shape[0])
        if la.shape[1] != lb.shape[1]:
            say(f"batch {batch}: FAIL: vocab {la.shape[1]} vs {lb.shape[1]}")
            passed = False
            continue
        rows, ok = compare_logits(la[:steps], lb[:steps], tol)
        say(
            f"batch {batch}: {steps} steps (0 = prefill), spread within a batch: "
            f"A {a[f'spread.b{batch}'].max().item():.3g}, B {b[f'spread.b{batch}'].max().item():.3g}"
        )
        say(f"  {'step':>4} {'max|A-B|':>10} {'max|A|':>9} {'rel':>9}  argmax")
        for r in rows:
            line = f"  {r['step']:>4} {r['max_abs']:>10.3g} {r['scale']:>9.3g} {r['rel']:>9.2e}  "
            if r["argmax_equal"]:
                line += "same"
            else:
                kind = "near-tie" if r["near_tie"] else "NOT a near-tie"
                line += (
                    f"DIFF {r['argmax_a']} vs {r['argmax_b']}: top-2 gap A {r['gap_a']:.3g}, "
                    f"B {r['gap_b']:.3g} ({kind}: tol x max|A| = {tol * r['scale']:.3g})"
                )
            if not r["ok"]:
                line += "  <-- FAIL"
            say(line)
        flips = [r["step"] for r in rows if not r["argmax_equal"]]
        worst = max(r["rel"] for r in rows)
        verdict = "PASS" if ok else "FAIL"
        say(
            f"  batch {batch}: max rel {worst:.2e} (tol {tol:g}); argmax differs at "
            f"{len(flips)}/{steps} steps{' ' + str(flips) if flips else ''}; greedy continuation "
            f"{'identical' if not flips else 'differs from step ' + str(flips[0])} -> {verdict}"
        )
        passed = passed and ok
    say(f"{'PASS' if passed else 'FAIL'}: {path_b} vs {path_a} (tol {tol:g})")
    return passed


def cmd_compare(args: argparse.Namespace) -> int:
    return 0 if compare_files(args.a, args.b, args.tol, floor=args.floor) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="record step logits of one layout (rank 0 writes --out)")
    p.add_argument("--model", required=True, help="HF-format model directory")
    p.add_argument("--out", required=True, help="safetensors file to write (rank 0)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (tokenized)")
    p.add_argument("--prompt-ids", help="prompt token ids, comma-separated (overrides --prompt)")
    p.add_argument("--steps", type=int, default=24, help="decode steps after the prefill")
    p.add_argument("--batch", default="1", help="batch size(s), e.g. 1,32 (copies of the prompt)")
    p.add_argument(
        "--force-from", help="feed the forced tokens (and prompt) of this run file (a reference)"
    )
    p.add_argument("--force-ids", help="forced tokens, comma-separated (steps + 1 of them)")
    add_engine_options(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="compare run B with reference run A; exit 1 on FAIL")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL, help="relative to max |logit| of A")
    p.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tolerate what A's own batch sizes differ by (module doc)",
    )
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
