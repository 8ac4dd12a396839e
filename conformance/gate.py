"""The gate the server calls before serving: certify the backend once per device, demote failures.

``ensure_certified(name)`` returns the ops to demote to their generic
implementation, then the server calls ``load_backend(name, demote=...)``:

* ``cpu_ref`` (``BackendInfo.needs_certificate`` False) needs nothing: ``()``.
* ``skip=True`` (``--skip-conformance``): a loud warning, ``()``.
* a valid certificate for this backend, version and device that covers the
  backend's native ops: its demotions, without running anything.
* otherwise: the quick suite on the backend's native ops (numerics and the
  whole-model check, no timing; progress bar), the certificate is stored, and
  its demotions are returned. Serving goes on
  with the failed ops demoted rather than failing the whole backend.

``cached_demotions(name)`` reads the certificate only (for ``chitu plugins``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from chitu_core.backend import InstalledBackend, discover_backends, select_backend
from conformance.cases import suite_cases
from conformance.certificate import CertificateKey, from_result, load_valid, save
from conformance.collectives import COLLECTIVE_CASES
from conformance.device import device_name
from conformance.runner import SuiteConfig, run_suite

logger = logging.getLogger(__name__)


def _device(installed: InstalledBackend):
    import torch

    kind = installed.info.device_type
    return torch.device("cpu") if kind == "cpu" else torch.device(kind, 0)


def current_key(installed: InstalledBackend, fp8_compute: str = "auto") -> CertificateKey:
    """The certificate key of ``installed`` on this machine's first device of its type,
    for the ``--fp8-compute`` mode it is to serve with."""
    import torch

    import chitu_core

    return CertificateKey(
        backend=installed.name,
        distribution=installed.distribution,
        plugin_version=installed.version,
        chitu_version=chitu_core.__version__,
        torch_version=torch.__version__,
        device_name=device_name(_device(installed)),
        fp8_compute=fp8_compute,
    )


def checked_ops(installed: InstalledBackend, quick: bool = True) -> set[str]:
    """The backend's native ops that the suite has cases for (what a certificate must cover)."""
    ops = {c.op for c in suite_cases(quick, installed.info.device_type)}
    ops |= {c.op for c in COLLECTIVE_CASES}
    return ops & set(installed.native_ops)


def ensure_certified(
    backend_name: str,
    skip: bool = False,
    quick: bool = True,
    cert_dir: str | Path | None = None,
    progress: bool = True,
    fp8_compute: str = "auto",
) -> tuple[str, ...]:
    """Certify ``backend_name`` here if needed; return the ops to demote (see the module docstring).

    Raises the errors of ``select_backend`` for an unknown, broken or unavailable backend.
    """
    installed = select_backend(backend_name, discover_backends())
    if not installed.info.needs_certificate:
        logger.info("backend %r is the reference: no certificate needed", installed.name)
        return ()
    if skip:
        logger.warning(
            "!!! CONFORMANCE SKIPPED: serving on backend %r (%s %s) WITHOUT a conformance "
            "certificate; its kernels have not been checked against the CPU reference on this "
            "device and may return wrong results. Drop --skip-conformance to certify it. !!!",
            installed.name,
            installed.distribution,
            installed.version,
        )
        return ()
    key = current_key(installed, fp8_compute)
    cert = load_valid(key, cert_dir)
    if cert is not None and cert.covers(checked_ops(installed, quick)):
        logger.info(
            "backend %r: valid %s certificate for %s (created %s); demoted ops: %s",
            installed.name,
            cert.mode,
            key.device_name,
            cert.created,
            ", ".join(cert.demote) or "none",
        )
        _log_accuracy(installed.name, cert)
        return tuple(cert.demote)
    # Expected on the first serve on a device (the bar says so): not a warning.
    logger.info(
        "backend %r (%s %s) has no valid conformance certificate for %s: running the %s "
        "suite on its native ops first",
        installed.name,
        installed.distribution,
        installed.version,
        key.device_name,
        "quick" if quick else "full",
    )
    config = SuiteConfig(
        installed.name,
        quick,
        native_only=True,
        timing=False,
        progress=progress,
        fp8_compute=fp8_compute,
        progress_label=f"certifying backend {installed.name} (first use on this device)",
    )
    result = run_suite(config)
    cert = from_result(result)
    if cert.key != key:
        logger.warning("the suite saw key %s, the gate %s; storing the suite's", cert.key, key)
    path = save(cert, cert_dir)
    if cert.demote:
        logger.warning(
            "backend %r failed conformance: ops %s are demoted to the generic implementation "
            "(%d failing checks; certificate %s). First failure: %s",
            installed.name,
            ", ".join(cert.demote),
            len(cert.failures),
            path,
            cert.failures[0] if cert.failures else "-",
        )
    else:
        logger.info("backend %r certified on %s (%s)", installed.name, key.device_name, path)
    _log_accuracy(installed.name, cert)
    return tuple(cert.demote)


def _log_accuracy(backend: str, cert) -> None:
    """What the certificate says about task accuracy (not checked yet: issue 28 item 1)."""
    summary = cert.accuracy.get("summary") or "accuracy: not recorded in this certificate"
    logger.info("backend %r: %s", backend, summary)


def cached_demotions(
    backend_name: str, cert_dir: str | Path | None = None, fp8_compute: str = "auto"
) -> tuple[str, ...] | None:
    """The demotions of ``backend_name``'s valid certificate on this device, without running
    anything: ``()`` for a backend that needs no certificate, None when there is no valid
    certificate (or the backend cannot run here)."""
    backend = discover_backends().get(backend_name)
    if backend is None or not backend.is_available:
        return None
    if not backend.info.needs_certificate:
        return ()
    cert = load_valid(current_key(backend, fp8_compute), cert_dir)
    return None if cert is None else tuple(cert.demote)
