"""The hook contract's version: checking a plugin's declared range, and the specs' fingerprint.

``chitu_core/hookspecs.py`` holds ``CONTRACT_VERSION`` and ``CONTRACT_HISTORY``
(plain data: that file imports only pluggy and typing). This module reads them:

* ``check_contract(backend, declared)`` raises ``ContractVersionError`` when a
  plugin's ``BackendInfo.contract`` range excludes ``CONTRACT_VERSION``, naming the
  hooks changed since the versions it was written for;
* ``hook_signatures()`` is every hookspec's name, argument names, annotations and
  pluggy options: ``tests/test_contract_version.py`` compares it with the committed
  ``tests/contract_fingerprint.json`` so that a signature cannot change without a
  version bump. ``python -m chitu_core.contract`` prints the current fingerprint.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Sequence

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from chitu_core import hookspecs
from chitu_core.errors import ContractVersionError
from chitu_core.hookspecs import CONTRACT_HISTORY, CONTRACT_VERSION, ContractChange

HOOK_PREFIX = "chitu_"


def parse_range(declared: str) -> SpecifierSet:
    """``declared`` (e.g. ``">=1.0,<2"``) as a specifier set; ValueError when it is not one."""
    try:
        spec = SpecifierSet(declared)
    except InvalidSpecifier as exc:
        raise ValueError(
            f"contract range {declared!r} is not a version specifier; write e.g. "
            f"'{suggested_range()}'"
        ) from exc
    if not str(spec):
        raise ValueError(f"contract range is empty; write e.g. '{suggested_range()}'")
    return spec


def suggested_range(version: str = CONTRACT_VERSION) -> str:
    """The range a plugin written today declares: this minor and later, same major."""
    v = Version(version)
    return f">={v.major}.{v.minor},<{v.major + 1}"


def _lower_bound(spec: SpecifierSet) -> Version | None:
    bounds = [Version(s.version) for s in spec if s.operator in (">=", ">", "==", "~=")]
    return max(bounds) if bounds else None


def changes_since(
    declared: str, history: Sequence[ContractChange] = CONTRACT_HISTORY
) -> list[ContractChange]:
    """The releases of ``history`` newer than the newest one ``declared`` admits (all of them
    when it admits none, e.g. a plugin written before the contract was versioned)."""
    spec = parse_range(declared)
    admitted = [Version(c.version) for c in history if spec.contains(c.version, prereleases=True)]
    if not admitted:
        return list(history)
    newest = max(admitted)
    return [c for c in history if Version(c.version) > newest]


def check_contract(
    backend: str,
    declared: str,
    current: str = CONTRACT_VERSION,
    history: Sequence[ContractChange] = CONTRACT_HISTORY,
) -> None:
    """Raise ``ContractVersionError`` unless ``declared`` admits ``current``.

    The message says which way the mismatch goes: a plugin written for a newer
    contract needs a newer Chitu; an older one needs its hooks updated, and it
    lists the hooks changed since the versions the plugin declares.
    """
    spec = parse_range(declared)
    if spec.contains(current, prereleases=True):
        return
    head = (
        f"backend {backend!r} was written for hook contract {declared!r}, but this Chitu "
        f"implements contract {current} (chitu_core/hookspecs.py CONTRACT_VERSION)"
    )
    lower = _lower_bound(spec)
    if lower is not None and Version(current) < lower:
        raise ContractVersionError(
            f"{head}: the plugin needs a newer Chitu; upgrade chitu to a release whose "
            f"contract is in {declared!r} (pip install -U chitu)"
        )
    changed = [
        c for c in changes_since(declared, history) if Version(c.version) <= Version(current)
    ]
    lines = "; ".join(f"{c.version}: {', '.join(c.hooks)} ({c.summary})" for c in changed)
    raise ContractVersionError(
        f"{head}. Changed since: {lines or 'nothing recorded'}. Update those hooks to their "
        f"specs in chitu_core/hookspecs.py, re-run 'chitu conformance', then declare "
        f"BackendInfo(contract={suggested_range(current)!r})"
    )


def hook_signatures() -> dict[str, str]:
    """Every hookspec as ``"(arg: annotation, ...) -> return [pluggy options]"``, by hook name.

    Docstrings are left out: wording changes are not contract changes.
    """
    signatures = {}
    for name, fn in vars(hookspecs).items():
        if not (name.startswith(HOOK_PREFIX) and inspect.isfunction(fn)):
            continue
        options = getattr(fn, "chitu_spec", None) or {}
        flags = ",".join(f"{k}={v}" for k, v in sorted(options.items()) if v)
        signatures[name] = f"{inspect.signature(fn)} [{flags}]"
    return dict(sorted(signatures.items()))


def fingerprint() -> dict[str, object]:
    """What ``tests/contract_fingerprint.json`` holds: the version and every hook signature."""
    return {"contract_version": CONTRACT_VERSION, "hooks": hook_signatures()}


if __name__ == "__main__":  # python -m chitu_core.contract > tests/contract_fingerprint.json
    json.dump(fingerprint(), sys.stdout, indent=2)
    sys.stdout.write("\n")
