"""Logging of the generic-op fallback, shared by the NVIDIA hook modules.

The Triton kernels raise ``ValueError`` before launching anything for calls they
do not take; the hook then runs the generic op. The first such call of each op is
logged (a warning), so a model that never fits a kernel is visible, without a
log line per token.
"""

from __future__ import annotations

import logging


class KernelFallback:
    """``fallback(op, exc)``: warn on ``logger`` the first time ``op`` falls back."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.logged: set[str] = set()

    def __call__(self, op: str, exc: ValueError) -> None:
        if op not in self.logged:
            self.logged.add(op)
            self.logger.warning(
                "%s: the Triton kernel does not take this call (%s); generic op", op, exc
            )
