"""The hook contract's version: a signature change needs a bump, and a plugin outside its
declared range is refused with ContractVersionError naming the hooks that changed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from chitu_core.backend import discover_backends, select_backend
from chitu_core.backend_info import BackendInfo
from chitu_core.contract import (
    changes_since,
    check_contract,
    fingerprint,
    hook_signatures,
    suggested_range,
)
from chitu_core.errors import ContractVersionError
from chitu_core.hookspecs import CONTRACT_HISTORY, CONTRACT_VERSION, ContractChange

FINGERPRINT = Path(__file__).parent / "contract_fingerprint.json"
DOCS = Path(__file__).parents[1] / "docs" / "writing-a-backend.md"
REGENERATE = "python -m chitu_core.contract > tests/contract_fingerprint.json"


def test_hook_signatures_match_the_committed_fingerprint():
    committed = json.loads(FINGERPRINT.read_text())
    current = fingerprint()
    old, new = committed["hooks"], current["hooks"]
    changed = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
    details = "; ".join(f"{n}: {old.get(n, 'absent')} -> {new.get(n, 'removed')}" for n in changed)
    if changed and committed["contract_version"] == CONTRACT_VERSION:
        pytest.fail(
            f"hook signatures changed without a contract version bump ({details}). Bump "
            f"CONTRACT_VERSION by adding a CONTRACT_HISTORY line in chitu_core/hookspecs.py "
            f"(MAJOR if an existing plugin would break, MINOR for a new optional hook or "
            f"argument), add the same line to 'Contract history' in docs/writing-a-backend.md, "
            f"then regenerate the fingerprint: {REGENERATE}"
        )
    assert committed == current, (
        f"CONTRACT_VERSION is {CONTRACT_VERSION} but tests/contract_fingerprint.json records "
        f"{committed['contract_version']} ({details or 'same signatures'}): regenerate it with "
        f"{REGENERATE}"
    )


def test_the_fingerprint_sees_argument_names_and_annotations(monkeypatch):
    from chitu_core import hookspecs

    before = hook_signatures()["chitu_linear"]
    spec = hookspecs.chitu_linear

    def chitu_linear(x, weight, bias, out):  # a new argument
        return spec(x, weight, bias)

    chitu_linear.chitu_spec = spec.chitu_spec  # type: ignore[attr-defined]
    monkeypatch.setattr(hookspecs, "chitu_linear", chitu_linear)
    assert hook_signatures()["chitu_linear"] != before
    assert "firstresult=True" in before and "bias: 'torch.Tensor | None'" in before


def test_history_versions_increase_and_end_at_the_contract_version():
    from packaging.version import Version

    versions = [Version(c.version) for c in CONTRACT_HISTORY]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert CONTRACT_HISTORY[-1].version == CONTRACT_VERSION
    specs = set(hook_signatures())
    for change in CONTRACT_HISTORY:
        assert change.summary and set(change.hooks) <= specs, change


def test_docs_list_every_history_line():
    text = DOCS.read_text()
    section = text[text.index("## Contract history") :]
    for change in CONTRACT_HISTORY:
        assert re.search(rf"^\| {re.escape(change.version)} \|", section, re.M), change.version
        for hook in change.hooks:
            assert hook in section, (change.version, hook)
    assert f"`{CONTRACT_VERSION}`" in text


HISTORY = (
    ContractChange("1.0.0", ("chitu_linear",), "first"),
    ContractChange("1.1.0", ("chitu_rope",), "new optional argument"),
    ContractChange("2.0.0", ("chitu_linear", "chitu_fused_moe"), "argument renamed"),
)


def test_a_plugin_for_an_older_major_hears_which_hooks_changed():
    assert [c.version for c in changes_since(">=1.0,<2", HISTORY)] == ["2.0.0"]
    with pytest.raises(ContractVersionError) as caught:
        check_contract("foo", ">=1.0,<2", "2.0.0", HISTORY)
    message = str(caught.value)
    assert "'foo' was written for hook contract '>=1.0,<2'" in message
    assert "2.0.0: chitu_linear, chitu_fused_moe (argument renamed)" in message
    assert "1.1.0" not in message and "contract='>=2.0,<3'" in message


def test_a_plugin_for_a_newer_contract_is_told_to_upgrade_chitu():
    with pytest.raises(ContractVersionError, match="needs a newer Chitu.*pip install -U chitu"):
        check_contract("foo", ">=1.1,<2", "1.0.0", HISTORY)
    check_contract("foo", ">=1.0,<2", "1.1.0", HISTORY)  # inside: no error


def test_backend_info_validates_and_defaults_the_range():
    assert BackendInfo(name="x", device_type="cpu", dist_backend="gloo").contract == ">=1.0,<2"
    with pytest.raises(ValueError, match="not a version specifier"):
        BackendInfo(name="x", device_type="cpu", dist_backend="gloo", contract="1.x")
    assert suggested_range("1.4.2") == ">=1.4,<2"


def test_shipped_backends_declare_a_range_that_admits_this_contract():
    backends = discover_backends()
    for name in ("cpu", "cpu_ref", "nvidia", "ascend", "hygon"):
        assert backends[name].load_error is None, backends[name].load_error
        assert backends[name].info.contract == ">=1.0,<2"


def test_a_plugin_outside_its_range_is_refused_by_name(test_plugins_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(test_plugins_dir))
    try:
        backends = discover_backends()
        old = backends["test_old_contract"]
        assert old.load_error.startswith("ContractVersionError")
        assert backends["cpu_ref"].is_available, "other plugins must still load"
        with pytest.raises(ContractVersionError) as caught:
            select_backend("test_old_contract", backends)
    finally:
        sys.modules.pop("chitu_test_old_contract", None)
    message = str(caught.value)
    assert "'>=0.9,<1'" in message and f"contract {CONTRACT_VERSION}" in message
    assert "Changed since: 1.0.0: chitu_backend_info" in message
