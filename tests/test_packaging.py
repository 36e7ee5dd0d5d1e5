"""What pyproject.toml declares matches what CI installs and what the package imports."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info < (3, 11):
    pytest.skip("tomllib is in the standard library from Python 3.11", allow_module_level=True)
import tomllib  # noqa: E402


def declared() -> dict[str, str | None]:
    """name -> lowest declared version (None: no lower bound), for the runtime dependencies."""
    out = {}
    for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        spec = spec.split(";")[0].strip()
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower().replace("-", "_")
        low = re.search(r">=\s*([0-9][0-9a-z.]*)", spec)
        out[name] = low.group(1) if low else None
    return out


def test_the_minimum_versions_job_installs_the_declared_lower_bounds():
    pins = {}
    for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("-", "_")] = version or None
    for name, low in declared().items():
        if name == "torch":
            continue  # CI has one CPU wheel (2.13.0); the GPU machines run 2.11
        assert name in pins, f".ci/minimum-versions.txt does not install {name}"
        if low is not None:  # "numpy>=1.26" is met by the pin 1.26.4: compare the declared release's own parts
            assert pins[name] is not None and pins[name].split(".")[:len(low.split("."))] == low.split("."), (
                f"{name}: pyproject.toml declares >= {low}, the minimum-versions job installs {pins[name]}")


def test_the_kernels_ship_inside_the_package_without_a_path_mapping():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "ditfa_optimum.kernels" in config["tool"]["setuptools"]["packages"]
    assert "package-dir" not in config["tool"]["setuptools"]
    assert (ROOT / "ditfa_optimum" / "kernels" / "headwise_attention.py").is_file()


def test_the_wheel_holds_what_runs_not_the_training_code():
    """Training and scene rendering live in training/ (outside the package): the wheel ships the mini model's weights,
    pipeline and caption grammar, and the package never imports training/."""
    import ast
    import importlib.util

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # only the package: `optimum-cli ditfa` ships apart (integrations/optimum-cli), since files in the optimum
    # namespace make diffusers and transformers take the wheel for optimum (tests/test_optimum_cli.py)
    assert all(p == "ditfa_optimum" or p.startswith("ditfa_optimum.") for p in config["packages"])
    assert set(config["package-data"]) == {"ditfa_optimum"}
    assert (ROOT / "training" / "train_mini.py").is_file() and (ROOT / "training" / "scenes.py").is_file()
    mini = ROOT / "ditfa_optimum" / "mini"
    assert (mini / "grammar.py").is_file()
    assert not (mini / "train.py").exists() and not (mini / "scenes.py").exists()
    for name in ("ditfa_optimum.mini.train", "ditfa_optimum.mini.scenes"):
        assert importlib.util.find_spec(name) is None, name
    for path in (ROOT / "ditfa_optimum").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [n for n in names if n.split(".")[0] in ("training", "benchmarks", "tests")], (
                f"{path.relative_to(ROOT)} imports {names}: the wheel holds only ditfa_optimum")
