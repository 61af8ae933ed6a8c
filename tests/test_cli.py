"""The top-level command group: every stage is listed, help is fast, and failures are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moeplace import cli


def test_help_lists_every_stage_without_importing_torch() -> None:
    code = "import sys; from moeplace.cli import run; rc = run(['--help']); print('torch' in sys.modules); sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out
    assert out.strip().endswith("False"), "`moeplace --help` imported torch"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run([name, "--help"]) == 0
    assert "unavailable" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["import"], ["export"], ["permute-checkpoint"]])
def test_bare_command_prints_its_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(argv) == 0  # what --help gives, not a usage error squeezed into one line
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"Usage: moeplace {' '.join(argv)}".rstrip()) and out.count("\n") > 5


def test_unimportable_command_is_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("moeplace.no_such_module", "ghost", "A stage that is not installed."))
    assert cli.run(["ghost"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeplace: error: 'ghost' is unavailable in this install") and "\n" not in err
