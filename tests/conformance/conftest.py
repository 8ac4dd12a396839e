"""Fixtures of the conformance tests (defined in conformance_helpers)."""

from conformance_helpers import (  # noqa: F401
    broken_backends,
    broken_backends_dir,
    cert_dir,
)
