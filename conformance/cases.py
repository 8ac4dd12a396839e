"""The case library: which cases a run holds, for every op of the contract with numerics.

``contract_cases()`` are small and odd shapes (M=1, tails not multiple of 128,
empty batches) that ``tests/test_contract.py`` runs for every backend.
``suite_cases(quick, device_type)`` is what ``chitu conformance`` runs: the
contract cases, the real-shape cases of ``real_cases`` and the edge cases of
``edge_cases``. The collectives need a world of processes and live in
``conformance/collectives.py``; the ops without numerics of their own
(``device``, ``memory_info``, ``synchronize``, ``empty_cache``, ``new_group``,
``prepare_weight``) are exercised by every other case.

The running helpers (``run_case``, ``run_reference``...) live in
``conformance/case.py`` and are re-exported here.
"""

from __future__ import annotations

from chitu_core.quant import FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL, FORMAT_UNQUANTIZED
from conformance import builders as b
from conformance.case import (
    Case,
    Inputs,
    call_op,
    prepare_inputs,
    reference_inputs,
    run_case,
    run_reference,
)
from conformance.edge_cases import edge_cases
from conformance.real_cases import real_shape_cases


def _small_cases() -> list[Case]:
    cases = []
    for m, d in ((1, 64), (5, 200), (0, 32)):
        cases += [b.rms_norm_case(m, d), b.add_rms_norm_case(m, d), b.silu_case(m, d)]
    cases += [
        b.rope_case(7, 4, 2, 64, 64, True),
        b.rope_case(7, 4, 1, 96, 32, False),
        b.rope_case(0, 2, 2, 16, 16, True),
    ]
    return cases + [b.sample_case(6, 50), b.sample_case(1, 129)]


def contract_cases() -> list[Case]:
    """Small and odd shapes for every compute op: M=1, tails not multiple of 128, empty batches."""
    cases: list[Case] = []
    for fmt in (FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128, FORMAT_FP8_CHANNEL):
        for m, n, k in ((1, 128, 128), (3, 300, 200), (17, 257, 129), (0, 64, 96)):
            cases.append(b.linear_case(fmt, m, n, k, bias=(m == 3)))
    cases += [
        b.route_case("softmax,renorm", 9, 8, 2, "softmax", 1, 1, False, 1.0, True),
        b.route_case("softmax,no-renorm", 4, 60, 4, "softmax", 1, 1, False, 1.0, False),
        b.route_case("deepseek-grouped", 11, 32, 4, "sigmoid", 8, 3, True, 2.5, True),
        b.route_case("empty", 0, 16, 2, "sigmoid", 4, 2, True, 1.0, True),
    ]
    for fmt in (FORMAT_UNQUANTIZED, FORMAT_FP8_BLOCK128):
        cases += [
            b.fused_moe_case(fmt, 5, 4, 160, 96, 2),
            b.fused_moe_case(fmt, 1, 8, 128, 256, 3),
        ]
    cases.append(b.fused_moe_case(FORMAT_FP8_BLOCK128, 0, 4, 64, 64, 2))
    cases += [
        b.store_kv_case(13, 2, 16, True),
        b.store_kv_case(5, 1, 40, False),
        b.store_kv_case(0, 2, 8, True),
    ]
    cases += [
        b.decode_case([1, 17, 40], 4, 2, 32, 16),
        b.decode_case([130], 8, 8, 64, 32),
        b.decode_case([5, 1], 6, 1, 16, 4),
        b.prefill_case([3, 17, 1], [3, 17, 1], 4, 2, 32, 16),
        b.prefill_case([4, 2], [20, 9], 4, 4, 16, 8),  # cached prefixes / chunked prefill
        b.mla_case("mla_decode", None, [1, 33, 70], 4, 64, 16, 16),
        b.mla_case("mla_prefill", [5, 1], [12, 1], 4, 64, 16, 8),
    ]
    return cases + _small_cases()


def device_cases() -> list[Case]:
    """The device hooks with an observable result: a zeroed KV cache, a graph replay."""
    return [
        b.allocate_kv_cache_case(5, 16, 8, 128),
        b.allocate_kv_cache_case(3, 64, 1, 576),
        b.capture_graph_case(4, 256),
    ]


def suite_cases(quick: bool, device_type: str) -> list[Case]:
    """Every single-process case of a run, grouped by op in contract order."""
    from chitu_core.backend import OP_NAMES

    everything = contract_cases() + device_cases() + edge_cases()
    everything += real_shape_cases(quick, device_type)
    unique: dict[str, Case] = {}
    for case in everything:
        unique.setdefault(case.id, case)  # a shape listed twice runs once
    order = {op: i for i, op in enumerate(OP_NAMES)}
    return sorted(unique.values(), key=lambda c: order[c.op])


__all__ = [
    "Case",
    "Inputs",
    "call_op",
    "contract_cases",
    "device_cases",
    "prepare_inputs",
    "reference_inputs",
    "run_case",
    "run_reference",
    "suite_cases",
]
