"""What a new user meets first at the command line: help, global options, config errors.

The error cases run the real ``chitu`` command in a subprocess, as a user would.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chitu_core.cli import build_parser, main
from chitu_core.demo_model import write_demo_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("cli") / "tiny-llama", "llama", "tiny")


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` (files linked) whose config.json has ``changes``; a value
    of None deletes the field."""
    dst.mkdir()
    for file in src.iterdir():
        if file.name != "config.json":
            (dst / file.name).symlink_to(file)
    config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _generate(model: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "chitu_core", "generate", "--model", str(model)]
    cmd += ["--prompt", "hi", "--max-tokens", "1", "--backend", "cpu_ref"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    """Every terminal line (split at \\n and \\r, as a terminal draws them) with our error."""
    return [line for line in re.split(r"[\r\n]", stderr) if "chitu: error" in line]


def test_mistyped_config_field_names_the_file_and_field(llama_dir: Path, tmp_path: Path):
    bad = _copy_with_config(llama_dir, tmp_path / "m", num_hidden_layers="three")
    result = _generate(bad)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("chitu: error: "), line  # on a line of its own
    assert str(bad / "config.json") in line, line
    assert "'num_hidden_layers' must be an integer, got 'three'" in line, line
    assert "Traceback" not in result.stderr


def test_missing_config_field_names_the_file_on_its_own_line(llama_dir: Path, tmp_path: Path):
    bad = _copy_with_config(llama_dir, tmp_path / "m", hidden_size=None)
    result = _generate(bad)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("chitu: error: "), line
    assert str(bad / "config.json") in line and "'hidden_size' is missing" in line, line


def test_an_error_while_loading_weights_ends_the_progress_bar_first(tmp_path: Path):
    # A tensor of the wrong shape fails half-way through loading, with the bar on screen.
    model = write_demo_model(tmp_path / "m", "llama", "tiny")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 1
    (model / "config.json").write_text(json.dumps(config))
    result = _generate(model)
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert line.startswith("chitu: error: "), line
    assert "mlp" in line, line


def test_verbose_is_accepted_after_the_subcommand():
    args = build_parser().parse_args(["plugins", "-v"])
    assert args.verbose is True
    args = build_parser().parse_args(["-v", "plugins"])
    assert args.verbose is True  # the subcommand's copy does not reset it
    assert build_parser().parse_args(["plugins"]).verbose is False
    # As a user types it: INFO logs appear only with -v.
    cmd = [sys.executable, "-m", "chitu_core", "demo", "--backend", "cpu_ref", "-v"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "INFO chitu_core.backend: backend 'cpu_ref'" in result.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_help_shows_its_defaults():
    commands = _subparsers(build_parser())
    assert {"serve", "generate", "conformance", "demo-model", "plugins"} <= set(commands)
    for name, parser in commands.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or any(
                default is v for v in (None, False, True, argparse.SUPPRESS)
            ):
                continue
            text = formatter._expand_help(action)  # the help line as --help prints it
            values = {str(default), f"{default:g}" if isinstance(default, float) else ""}
            assert "default" in text and any(v and v in text for v in values), (
                f"chitu {name} {action.option_strings[0]}: {text!r} does not show {default!r}"
            )


def test_serve_help_explains_a_certificate(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--skip-conformance" in text and "certificate records" in text
    assert "--port PORT TCP port (default: 21002)" in text
    assert "largest request body in bytes; larger requests get 413 (default: 4194304)" in text
