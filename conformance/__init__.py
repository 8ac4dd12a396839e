"""Conformance suite: a backend's numerics and throughput against the CPU reference.

Three ways in, one suite:

* ``chitu conformance --backend NAME [--quick] [--ops linear,fused_moe] [--out DIR]
  [--cert-dir DIR]`` (``conformance/cli.py``; standalone: ``python -m conformance.cli``)
  writes ``report.json``, ``report.md`` and ``roofline.png`` and a certificate.
* the serving gate, ``conformance.gate.ensure_certified(name)``: certify once per
  (plugin version, device), demote what fails.
* ``pytest -p chitu_conformance --chitu-backend NAME --pyargs conformance``: one
  test per check, for a vendor's CI (``conformance/pytest_plugin.py``).

Modules, in the order a run uses them: ``shapes`` (real model dimensions),
``builders`` / ``real_cases`` / ``edge_cases`` / ``cases`` (the case library),
``case`` (running a case on a backend and on cpu_ref), ``tolerances`` (every bound
and why), ``check`` (one case: compare and time), ``roofline`` (device peaks and
each case's bytes and FLOPs), ``collectives`` (a spawned world of two),
``model_check`` (the demo models end to end), ``determinism`` (repeat and batch
invariance), ``progress`` (what a run says while it runs), ``resume`` (finished checks
kept for a rerun), ``runner`` (a whole run), ``result``, ``report``, ``certificate``,
``gate``.
"""
