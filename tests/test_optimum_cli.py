"""``optimum-cli ditfa``: ditfa-optimum's commands inside Optimum's CLI, found the way Optimum finds its subpackages'
commands (the ``optimum.commands.register`` namespace), and the wheel ships that file without breaking the
namespace (no ``__init__.py``)."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("optimum.commands.base")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "artifact-schema-2"


def optimum_cli(monkeypatch, *args) -> int:
    from optimum.commands.optimum_cli import main

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *args])
    try:
        main()
    except SystemExit as e:
        return e.code
    return 0


def test_optimum_finds_the_registered_command():
    from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands

    names = [command.COMMAND.name for command, parent in load_optimum_namespace_cli_commands() if parent is None]
    assert "ditfa" in names


def test_optimum_cli_ditfa_runs_the_commands(monkeypatch, capsys):
    assert optimum_cli(monkeypatch, "ditfa", "inspect", str(FIXTURE)) == 0
    out = capsys.readouterr().out
    assert "schema version 2" in out and "SD3Transformer2DModel" in out


def test_optimum_cli_ditfa_reports_user_errors_with_a_status(monkeypatch, capsys, tmp_path):
    assert optimum_cli(monkeypatch, "ditfa", "inspect", str(tmp_path / "missing")) == 1
    assert "neither an artifact directory nor a Hub repo id" in capsys.readouterr().err
    assert optimum_cli(monkeypatch, "ditfa", "optimize", "--target-cut", "2") == 1
    assert "target_cut must be a number in (0, 1)" in capsys.readouterr().err
    assert optimum_cli(monkeypatch, "ditfa", "export", "tflite", "x", "y") == 2  # argparse's own refusal
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_the_register_file_is_a_namespace_portion():
    register = ROOT / "optimum" / "commands" / "register"
    assert (register / "register_ditfa_optimum.py").is_file()
    assert not any((p / "__init__.py").exists() for p in (ROOT / "optimum", ROOT / "optimum" / "commands", register))
