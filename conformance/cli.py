"""``chitu conformance``: run the suite for a backend, write the reports and the certificate.

``add_conformance_command(subparsers)`` registers the command on the ``chitu``
parser; ``python -m conformance.cli`` runs the same command standalone.
Exit code: 0 when every check passed, 1 when an op or a model failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from chitu_core.backend import OP_NAMES
from chitu_core.backend_info import FP8_COMPUTE_HELP, FP8_COMPUTE_MODES
from chitu_core.errors import ChituError

MAX_PRINTED_FAILURES = 20


def _op_list(text: str) -> tuple[str, ...]:
    if text == "all":
        return OP_NAMES
    ops = tuple(op.strip() for op in text.split(",") if op.strip())
    unknown = [op for op in ops if op not in OP_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown op(s) {', '.join(unknown)}; ops are {', '.join(OP_NAMES)}"
        )
    return ops


def cmd_conformance(args: argparse.Namespace) -> int:
    """Run the suite as ``args`` say; print a summary; return the exit code."""
    from conformance.certificate import from_result, save
    from conformance.report import write_reports
    from conformance.resume import CACHE_FILE
    from conformance.runner import SuiteConfig, run_suite

    out = args.out or Path("out") / "conformance" / args.backend
    config = SuiteConfig(
        backend=args.backend,
        quick=args.quick,
        ops=args.ops,
        demote=args.demote or (),
        dtype=args.dtype,
        timing=not args.no_timing,
        model_check=not args.no_model_check,
        progress=not args.no_progress,
        fp8_compute=args.fp8_compute,
        cache_path=out / CACHE_FILE,
        fresh=args.fresh,
    )
    try:
        result = run_suite(config)
    except KeyboardInterrupt:  # Ctrl-C: what finished is in the cache, say how to go on
        print(
            f"\nstopped; finished checks are kept in {config.cache_path}: run the same command "
            "to continue, or add --fresh to start over",
            file=sys.stderr,
        )
        return 130
    paths = write_reports(result, out)
    # Only a run of the backend as it would be served certifies it.
    if not (args.ops or args.demote or args.dtype or args.no_model_check):
        print(f"certificate: {save(from_result(result), args.cert_dir)}")
    info = result.info
    verdict = "PASS" if result.passed else "FAIL"
    print(
        f"{verdict}: backend {info.backend} {info.plugin_version} on {info.device_name}, "
        f"{info.mode}, {info.dtype}, --fp8-compute {info.fp8_compute}: {len(result.cases)} cases, {len(result.models)} models "
        f"in {info.elapsed_s:.0f} s"
    )
    print(f"hook contract {info.contract_version}; {result.accuracy['summary']}")
    for d in result.determinism:
        print(
            f"determinism {d.arch}: repeat {'same' if d.repeat_tokens_equal else 'DIFFERENT'} "
            f"tokens; batch of 16 {'same' if d.batch_tokens_equal else 'different'} tokens, "
            f"logits {'bit-equal' if d.batch_logits_equal else f'differ by {d.batch_max_rel_diff:.1e}'}"
            f" ({'claimed' if d.batch_invariant_claimed else 'informational'})"
        )
    if not result.passed:
        print(
            f"failed ops: {', '.join(result.failed_ops) or 'none'}; demote: {', '.join(result.demote)}"
        )
        for op, line in result.failures_by_op.items():  # one line per op: its first failing case
            print(f"  {op}: {line}")
        others = [m.message for m in result.models if not m.passed]
        others += [d.message for d in result.determinism if not d.passed]
        for message in others[:MAX_PRINTED_FAILURES]:
            print(f"  {message}")
        print(f"  every failing case: {paths['md']}")
    print(f"reports: {paths['md']}, {paths['json']}, {paths['png']}")
    return 0 if result.passed else 1


def add_conformance_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``conformance --backend NAME [--quick] [--ops ...] [--out DIR] [--cert-dir DIR]``."""
    p = subparsers.add_parser(
        "conformance",
        help="check a backend against the CPU reference (numerics, speed) and certify it",
    )
    add_conformance_arguments(p)
    return p


def add_conformance_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options; ``set_defaults(func=cmd_conformance)``."""
    p.add_argument("--backend", required=True, help="backend name (see 'chitu plugins') or 'auto'")
    p.add_argument(
        "--quick", action="store_true", help="a representative subset (what serving runs)"
    )
    p.add_argument(
        "--ops", type=_op_list, help="comma-separated ops to check (default: every op with cases)"
    )
    p.add_argument("--out", type=Path, help="report directory (default: out/conformance/BACKEND)")
    p.add_argument(
        "--cert-dir",
        type=Path,
        help="certificate directory (default: $CHITU_CERT_DIR or ~/.cache/chitu/certs)",
    )
    p.add_argument(
        "--demote",
        type=_op_list,
        help="check with these ops demoted to generic ('all': the generic ops on this device)",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype")
    p.add_argument("--no-timing", action="store_true", help="numerics only")
    p.add_argument("--no-model-check", action="store_true", help="skip the whole-model check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--fp8-compute",
        choices=FP8_COMPUTE_MODES,
        default="auto",
        help=FP8_COMPUTE_HELP + "; the certificate is per mode",
    )
    p.add_argument(
        "--fresh",
        action="store_true",
        help="discard the finished checks of a stopped run in the report directory and start "
        "over (by default a rerun continues where it stopped; a changed plugin, version or "
        "device discards them anyway)",
    )
    p.set_defaults(func=cmd_conformance)


def main(argv: list[str] | None = None) -> int:
    """``python -m conformance.cli --backend NAME ...``: the command without the chitu CLI."""
    parser = argparse.ArgumentParser(prog="python -m conformance.cli")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_conformance_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except ChituError as exc:  # an unknown, broken or unavailable backend: say which, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
