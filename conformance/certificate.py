"""Certificates: what a conformance run proved, keyed by everything that could change it.

A certificate is a JSON file ``<backend>--<device>.json`` in the certificate
directory (the ``cert_dir`` argument, else ``$CHITU_CERT_DIR``, else
``~/.cache/chitu/certs``). Its key is the backend (entry-point) name, the
plugin's distribution and version, the Chitu version, the torch version, the
device name and the suite version; a certificate whose key differs from the
current one in any field is invalid (a new plugin release, a torch upgrade or
another GPU model must be certified again). The body records which ops were
checked, which failed and which are to be demoted, so the gate can serve
without re-running anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when the cases or tolerances change enough that old certificates prove too little.
SUITE_VERSION = (
    3  # 2: the fp8_act class, --fp8-compute in the key; 3: determinism, accuracy, contract
)
CERT_DIR_ENV = "CHITU_CERT_DIR"


@dataclass(frozen=True)
class CertificateKey:
    """Everything a certificate's validity depends on."""

    backend: str
    distribution: str
    plugin_version: str
    chitu_version: str
    torch_version: str
    device_name: str
    fp8_compute: str = "auto"  # the compute path certified (``BackendOptions.fp8_compute``)
    suite_version: int = SUITE_VERSION


@dataclass
class Certificate:
    """A stored conformance verdict for one backend on one device."""

    key: CertificateKey
    mode: str
    ops_checked: list[str]
    ops_skipped: list[str]
    failed_ops: list[str]
    demote: list[str]
    models_passed: bool
    failures: list[str] = field(default_factory=list)
    # op -> the path the backend declared for the certified mode (``OpPath.description``)
    compute_paths: dict[str, str] = field(default_factory=dict)
    contract_version: str = ""
    # Per demo model: passed, repeat tokens equal, batch-invariant (bit-equal logits).
    determinism: list[dict[str, Any]] = field(default_factory=list)
    # Task accuracy on a real model: {"checked": False, "summary": "accuracy: not checked..."}
    accuracy: dict[str, Any] = field(default_factory=dict)
    created: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Certificate:
        fields = dict(data)
        fields["key"] = CertificateKey(**fields["key"])
        return cls(**fields)

    def covers(self, ops: set[str]) -> bool:
        """Whether every op of ``ops`` was checked (or skipped for want of hardware)."""
        return ops <= set(self.ops_checked) | set(self.ops_skipped)


def cert_dir(path: str | Path | None = None) -> Path:
    """Where certificates live: ``path``, else ``$CHITU_CERT_DIR``, else ``~/.cache/chitu/certs``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(CERT_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "chitu" / "certs"


def cert_path(key: CertificateKey, directory: str | Path | None = None) -> Path:
    """The file of ``key``'s backend on ``key``'s device."""
    device = re.sub(r"[^A-Za-z0-9._-]+", "_", key.device_name).strip("_") or "device"
    mode = "" if key.fp8_compute == "auto" else f"--fp8-{key.fp8_compute}"
    return cert_dir(directory) / f"{key.backend}--{device}{mode}.json"


def save(cert: Certificate, directory: str | Path | None = None) -> Path:
    """Write ``cert`` atomically (a concurrent reader never sees half a file); returns its path."""
    path = cert_path(cert.key, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(cert.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_valid(key: CertificateKey, directory: str | Path | None = None) -> Certificate | None:
    """The stored certificate for ``key`` if it exists and its key equals ``key``, else None."""
    path = cert_path(key, directory)
    try:
        cert = Certificate.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("ignoring unreadable certificate %s: %s", path, exc)
        return None
    if cert.key != key:
        changed = [f for f in asdict(key) if getattr(cert.key, f) != getattr(key, f)]
        logger.info("certificate %s is invalid: %s changed", path, ", ".join(changed))
        return None
    return cert


def from_result(result: Any) -> Certificate:
    """The certificate of a ``runner.SuiteResult``."""
    info = result.info
    key = CertificateKey(
        backend=info.backend,
        distribution=info.distribution,
        plugin_version=info.plugin_version,
        chitu_version=info.chitu_version,
        torch_version=info.torch_version,
        device_name=info.device_name,
        fp8_compute=info.fp8_compute,
    )
    return Certificate(
        key=key,
        mode=info.mode,
        ops_checked=list(result.ops_checked),
        ops_skipped=list(result.ops_skipped),
        failed_ops=list(result.failed_ops),
        demote=list(result.demote),
        models_passed=result.models_passed,
        failures=list(result.failures),
        compute_paths=dict(info.compute_paths),
        contract_version=info.contract_version,
        determinism=[
            {
                "arch": d.arch,
                "passed": d.passed,
                "repeat_tokens_equal": d.repeat_tokens_equal,
                "batch_invariant": d.batch_invariant,
                "batch_invariant_claimed": d.batch_invariant_claimed,
            }
            for d in result.determinism
        ],
        accuracy=dict(result.accuracy),
    )
