"""Resuming a stopped run: every finished check is kept in a file, keyed by what produced it.

``chitu conformance`` appends each finished check (a case, the collectives, the
whole-model and determinism checks, the measured roofline) as one JSON line to
``<out>/checks-cache.jsonl`` as soon as it is done, so a vendor can stop a full
run (Ctrl-C, a lost session) and run the same command again to continue where
it stopped. The file's first line is its key: the backend, its distribution,
version and a digest of its source files, Chitu's version and a digest of its
sources (``chitu_core`` and ``conformance``), torch, the device, the dtype, the
demotions, timing on or off, the suite and contract versions. A key that differs
in any field discards the file (the log names the fields), so an edited kernel
is checked again even without a version bump. ``--fresh`` discards it always.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_FILE = "checks-cache.jsonl"
# Files whose bytes decide what a package computes (sources, compiled extensions, tuned configs).
SOURCE_SUFFIXES = (".py", ".so", ".pyd", ".json", ".cu", ".cuh", ".cpp", ".c", ".h")


def source_digest(*packages: str) -> str:
    """sha256 over the source files of the importable ``packages`` (paths and bytes)."""
    digest = hashlib.sha256()
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            digest.update(f"{package}: not found".encode())
            continue
        files = [Path(spec.origin)]  # a single-module plugin: that file only
        for root in spec.submodule_search_locations or ():
            files += [p for p in Path(root).rglob("*") if p.suffix in SOURCE_SUFFIXES]
        for path in sorted(set(files)):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            digest.update(f"{package}/{path.name}:".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class CheckCache:
    """The finished checks of runs with one key (``get``/``put`` by check id).

    ``path`` None keeps nothing (the serving gate, the pytest plugin).
    """

    def __init__(self, path: Path | None, key: dict[str, Any], fresh: bool = False) -> None:
        self.path = path
        self.key = key
        self.entries: dict[str, Any] = {}
        if path is None:
            return
        if path.exists() and not fresh:
            self.entries = self._read(path)
        if not self.entries:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"key": key}) + "\n")
        else:
            logger.info("resuming: %d finished checks in %s", len(self.entries), path)

    def _read(self, path: Path) -> dict[str, Any]:
        lines = path.read_text().splitlines()
        try:
            stored = json.loads(lines[0])["key"] if lines else None
        except (ValueError, KeyError, TypeError):
            stored = None
        if stored != self.key:
            changed = sorted(k for k in self.key if (stored or {}).get(k) != self.key[k])
            logger.info("discarding %s: changed since it was written: %s", path, changed)
            return {}
        entries = {}
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except ValueError:  # the run was killed while writing this line
                continue
            entries[record["id"]] = record["value"]
        return entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, check_id: str) -> Any | None:
        """The stored value of ``check_id``, or None."""
        return self.entries.get(check_id)

    def put(self, check_id: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) for ``check_id``; appended at once."""
        self.entries[check_id] = value
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"id": check_id, "value": value}, default=str) + "\n")
