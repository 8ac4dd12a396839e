"""Reports of a run: ``report.json`` (everything), ``report.md`` (tables), ``roofline.png``.

``report.md`` has a header (verdict, versions, the hook contract), one line per
failed op naming the case that failed it, a summary table with one row per op
(result, worst error against its bound, speed against the generic op on the same
device, share of the roofline), the compute path each op was certified for, the
whole-model check, determinism, task accuracy, and then one table per op with its
cases.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from chitu_core.backend import OP_NAMES
from conformance.check import ERROR, FAIL, SKIP, CaseResult
from conformance.runner import SuiteResult


def write_reports(result: SuiteResult, out: str | Path) -> dict[str, Path]:
    """Write the three reports into ``out`` (created); returns their paths by kind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "roofline.png"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(result))
    plot_roofline(result, paths["png"])
    return paths


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _status(cases: list[CaseResult]) -> str:
    if any(c.status in (FAIL, ERROR) for c in cases):
        return "**FAIL**"
    return "skipped" if all(c.status == SKIP for c in cases) else "pass"


def _worst_error(cases: list[CaseResult]) -> str:
    checked = [c for c in cases if c.status != SKIP]
    if not checked:
        return "-"
    ints = sum(c.int_mismatch for c in checked)
    worst = max(checked, key=lambda c: c.error_ratio)
    text = f"{worst.rel_fro:.1e} / {worst.bound_rel_fro:.1e}"
    if worst.bound_rel_fro == 0:
        text = "exact" if worst.rel_fro == 0 else f"{worst.rel_fro:.1e} / exact"
    return text + (f", {ints} ids differ" if ints else "")


def _speedups(cases: list[CaseResult]) -> list[float]:
    return [c.generic_time_s / c.time_s for c in cases if c.time_s and c.generic_time_s]


def _roofline_shares(cases: list[CaseResult]) -> list[float]:
    return [100 * c.roofline_s / c.time_s for c in cases if c.time_s and c.roofline_s]


def _vs_generic(cases: list[CaseResult]) -> str:
    ratios = _speedups(cases)
    if not ratios:
        return "-"
    if not any(c.native for c in cases):
        return "generic"
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return f"{geomean:.2f}x (geomean of {len(ratios)})"


def _roofline_text(cases: list[CaseResult]) -> str:
    shares = _roofline_shares(cases)
    if not shares:
        return "-"
    return f"{statistics.median(shares):.1f}% (best {max(shares):.1f}%)"


def _header(result: SuiteResult) -> list[str]:
    info = result.info
    verdict = "**PASS**" if result.passed else "**FAIL**"
    resumed = f" ({info.resumed_checks} cases from a stopped run's cache)" * bool(
        info.resumed_checks
    )
    lines = [
        f"# Conformance report: `{info.backend}` {info.plugin_version} on {info.device_name}",
        "",
        f"- Result: {verdict}; failed ops: {', '.join(result.failed_ops) or 'none'}; "
        f"to demote to the generic implementation: {', '.join(result.demote) or 'none'}",
        f"- Hook contract: {info.contract_version} (chitu_core/hookspecs.py); the plugin "
        f"declares `{info.contract_declared}`",
        f"- Run: {info.mode} mode, {info.dtype}, {len(result.cases)} cases + "
        f"{len(result.models)} models in {info.elapsed_s:.0f} s; {info.distribution} "
        f"{info.plugin_version}, chitu {info.chitu_version}, torch {info.torch_version}, "
        f"started {info.started} on {info.host}{resumed}",
        f"- Native ops: {', '.join(info.native_ops) or 'none (all generic)'}; "
        f"demoted for this run: {', '.join(info.demoted_ops) or 'none'}",
        f"- Compute path certified: --fp8-compute {info.fp8_compute}"
        + "".join(f"; {op}: {path}" for op, path in info.compute_paths.items())
        + (
            f". FP8-weight cases of {', '.join(info.fp8_act_ops)} (and the whole-model check) "
            "are held to the fp8_act class (activations in e4m3, 1x128 groups)"
            if info.fp8_act_ops
            else ""
        ),
    ]
    roof = info.roofline
    if roof:
        flops = roof["flops"].get(info.dtype) or roof["flops"].get("float32", 0)
        lines.append(
            f"- Roofline: {roof['name']} ({roof['source']}): {roof['bandwidth'] / 1e9:.0f} GB/s, "
            f"{flops / 1e12:.2f} TFLOP/s {info.dtype}. Times are medians; 'vs generic' is the "
            "generic op's time over the backend's (>1: faster) on the same device."
        )
    skipped = sorted({c.message for c in result.cases if c.status == SKIP})
    if skipped:
        lines.append(f"- Skipped: {len(skipped)} cases, e.g. {skipped[0]}")
    return lines + [""]


def _summary(by_op: dict[str, list[CaseResult]]) -> list[str]:
    lines = [
        "## Summary",
        "",
        "| op | impl | cases | result | worst error / bound | vs generic | % of roofline (median) |",
        "|---|---|---:|---|---|---|---|",
    ]
    for op, cases in by_op.items():
        impl = "native" if any(c.native for c in cases) else "generic"
        lines.append(
            f"| {op} | {impl} | {len(cases)} | {_status(cases)} | {_worst_error(cases)} | "
            f"{_vs_generic(cases)} | {_roofline_text(cases)} |"
        )
    return lines + [""]


def _models(result: SuiteResult) -> list[str]:
    if not result.models:
        return []
    lines = [
        "## Whole model (tiny demo checkpoints vs cpu_ref in fp32)",
        "",
        "| model | result | logits rel_fro / bound | greedy tokens compared | near ties | time |",
        "|---|---|---|---:|---|---:|",
    ]
    for m in result.models:
        verdict = "pass" if m.passed else "**FAIL**"
        ties = "; ".join(m.near_ties) or "none"
        lines.append(
            f"| {m.arch} | {verdict} | {m.rel_fro:.1e} / {m.bound_rel_fro:.1e} | "
            f"{m.tokens_compared} | {ties} | {_fmt_time(m.time_s)} |"
        )
    return lines + [""]


def _failed_ops(result: SuiteResult) -> list[str]:
    lines = []
    by_op = result.failures_by_op
    if by_op:
        lines += ["## Failed ops (one line each: the first case that failed it)", ""]
        lines += [f"- **{op}**: {line}" for op, line in by_op.items()] + [""]
    others = [m.message for m in result.models if not m.passed]
    others += [d.message for d in result.determinism if not d.passed]
    if others:
        lines += ["## Other failures", ""] + [f"- {text}" for text in others] + [""]
    return lines


def _compute_paths(result: SuiteResult) -> list[str]:
    paths = result.compute_paths
    if not paths:
        return []
    lines = ["## Compute paths certified", "", "| op | path |", "|---|---|"]
    lines += [f"| {op} | {path} |" for op, path in paths.items()]
    return lines + [""]


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "**no**"


def _determinism(result: SuiteResult) -> list[str]:
    if not result.determinism:
        return []
    claimed = result.info.batch_invariant_claimed
    lines = [
        "## Determinism",
        "",
        "The same greedy request twice must give the same tokens. Batch invariance (the "
        "request alone vs in a batch of 16) is "
        + ("**claimed** by the backend, so checked." if claimed else "informational: not claimed."),
        "",
        "| model | result | repeat: same tokens | repeat: same logits bits | batch: same tokens "
        "| batch: same logits bits | batch: max logits diff (rel.) | time |",
        "|---|---|---|---|---|---|---|---:|",
    ]
    for d in result.determinism:
        lines.append(
            f"| {d.arch} | {'pass' if d.passed else '**FAIL**'} | {_yes_no(d.repeat_tokens_equal)} "
            f"| {_yes_no(d.repeat_logits_equal)} | {_yes_no(d.batch_tokens_equal)} "
            f"| {_yes_no(d.batch_logits_equal)} | {d.batch_max_rel_diff:.1e} | {_fmt_time(d.time_s)} |"
        )
    return lines + [""]


def _accuracy(result: SuiteResult) -> list[str]:
    return ["## Accuracy", "", result.accuracy.get("summary", "accuracy: not checked"), ""]


def _op_table(op: str, cases: list[CaseResult]) -> list[str]:
    lines = [
        f"## {op}",
        "",
        "| case | result | rel_fro / bound | max_abs_rel / bound | time | generic | vs generic | % roofline |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        speed = f"{c.generic_time_s / c.time_s:.2f}x" if c.time_s and c.generic_time_s else "-"
        share = f"{100 * c.roofline_s / c.time_s:.1f}%" if c.time_s and c.roofline_s else "-"
        errors = f"{c.rel_fro:.1e} / {c.bound_rel_fro:.1e}"
        abs_errors = f"{c.max_abs_rel:.1e} / {c.bound_max_abs_rel:.1e}"
        if c.int_mismatch:
            errors += f", {c.int_mismatch} ids differ"
        status = c.status if c.status in ("pass", SKIP) else f"**{c.status.upper()}**"
        name = c.case_id[len(op) :]
        lines.append(
            f"| `{name}` | {status} | {errors} | {abs_errors} | {_fmt_time(c.time_s)} | "
            f"{_fmt_time(c.generic_time_s)} | {speed} | {share} |"
        )
    return lines + [""]


def markdown(result: SuiteResult) -> str:
    """The text of report.md."""
    by_op: dict[str, list[CaseResult]] = {}
    for op in OP_NAMES:
        cases = [c for c in result.cases if c.op == op]
        if cases:
            by_op[op] = cases
    lines = _header(result) + _failed_ops(result) + _summary(by_op) + _compute_paths(result)
    lines += _models(result) + _determinism(result) + _accuracy(result)
    for op, cases in by_op.items():
        lines += _op_table(op, cases)
    return "\n".join(lines)


# One marker per op (with the colour), so ops stay apart in print and for colour-blind readers.
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "H", "8")


def _limits(values: list[float], pad: float = 2.0) -> tuple[float, float]:
    """Log-axis limits around ``values``: a factor ``pad`` either side."""
    return min(values) / pad, max(values) * pad


def plot_roofline(result: SuiteResult, path: Path) -> None:
    """Achieved FLOP/s against arithmetic intensity for every timed case, under the roofline.

    Each op has its own colour and marker (hollow: the generic op on the same device);
    the axes span the data, and the roofline is drawn over that span only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    roof: dict[str, Any] = result.info.roofline
    points = [c for c in result.cases if c.time_s and c.flops and c.bytes]
    xs_all: list[float] = []
    ys_all: list[float] = []
    colors = plt.get_cmap("tab20")
    for index, op in enumerate(sorted({c.op for c in points}, key=OP_NAMES.index)):
        cases = [c for c in points if c.op == op]
        color, marker = colors(index % 20), MARKERS[index % len(MARKERS)]
        xs = [c.flops / c.bytes for c in cases]
        ys = [c.flops / c.time_s for c in cases]
        ax.scatter(xs, ys, color=color, marker=marker, label=op, s=36)
        generic = [c for c in cases if c.native and c.generic_time_s]
        gx = [c.flops / c.bytes for c in generic]
        gy = [c.flops / c.generic_time_s for c in generic]
        ax.scatter(gx, gy, facecolors="none", edgecolors=color, marker=marker, s=36)
        xs_all += xs + gx
        ys_all += ys + gy
    if xs_all:
        x_lo, x_hi = _limits(xs_all)
        ax.set_xlim(x_lo, x_hi)
        if roof:
            peak = roof["flops"].get(result.info.dtype) or roof["flops"].get("float32", 1.0)
            steps = [x_lo * (x_hi / x_lo) ** (k / 200) for k in range(201)]
            roofline = [min(peak, roof["bandwidth"] * x) for x in steps]
            ax.plot(steps, roofline, "k-", lw=1.5, label="roofline")
            ys_all.append(max(roofline))
        ax.set_ylim(*_limits(ys_all))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best", ncol=2)
    else:
        ax.text(0.5, 0.5, "no timed cases", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    info = result.info
    ax.set_title(f"{info.backend} on {info.device_name} ({info.dtype}); hollow: generic op")
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
