"""``optimum-cli ditfa``: ditfa-optimum's commands inside Optimum's CLI, found the way Optimum finds its subpackages'
commands (the ``optimum.commands.register`` namespace). The registration is its own, opt-in distribution
(integrations/optimum-cli): files in the ``optimum`` namespace make diffusers and transformers take a distribution
for optimum, so the main wheel stays out of it. Here the portion is put on ``sys.path`` (as installing it does), and
its wheel is built and checked."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("optimum.commands.base")

ROOT = Path(__file__).resolve().parents[1]
INTEGRATION = ROOT / "integrations" / "optimum-cli"
FIXTURE = ROOT / "tests" / "fixtures" / "artifact-schema-2"
REGISTER = "optimum/commands/register/register_ditfa_optimum.py"


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.syspath_prepend(str(INTEGRATION))


def optimum_cli(monkeypatch, *args) -> int:
    from optimum.commands.optimum_cli import main

    monkeypatch.setattr(sys, "argv", ["optimum-cli", *args])
    try:
        main()
    except SystemExit as e:
        return e.code
    return 0


def test_optimum_finds_the_registered_command(registered):
    from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands

    names = [command.COMMAND.name for command, parent in load_optimum_namespace_cli_commands() if parent is None]
    assert "ditfa" in names


def test_optimum_cli_ditfa_runs_the_commands(registered, monkeypatch, capsys):
    assert optimum_cli(monkeypatch, "ditfa", "inspect", str(FIXTURE)) == 0
    out = capsys.readouterr().out
    assert "schema version 2" in out and "SD3Transformer2DModel" in out


def test_optimum_cli_ditfa_reports_user_errors_with_a_status(registered, monkeypatch, capsys, tmp_path):
    assert optimum_cli(monkeypatch, "ditfa", "inspect", str(tmp_path / "missing")) == 1
    assert "neither an artifact directory nor a Hub repo id" in capsys.readouterr().err
    assert optimum_cli(monkeypatch, "ditfa", "optimize", "--target-cut", "2") == 1
    assert "target_cut must be a number in (0, 1)" in capsys.readouterr().err
    assert optimum_cli(monkeypatch, "ditfa", "export", "tflite", "x", "y") == 2  # argparse's own refusal
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def test_the_integration_wheel_is_a_namespace_portion(tmp_path):
    """Its wheel holds the registration file and no __init__.py on the way (PEP 420), and the main tree does not
    shadow the namespace."""
    pytest.importorskip("setuptools", minversion="70.1")  # builds the wheel without the network (bdist_wheel inside)
    source = tmp_path / "src"  # a copy: setuptools builds in the source tree
    shutil.copytree(INTEGRATION, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("ditfa_optimum_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert REGISTER in names
    assert not [n for n in names if n.startswith("optimum/") and n.endswith("__init__.py")]
    assert not (ROOT / "optimum").exists()
