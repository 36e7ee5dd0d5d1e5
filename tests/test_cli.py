import py_compile
from pathlib import Path

import pytest

from ditfa_optimum import CompressionPlan
from ditfa_optimum.cli import main, run_demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_run_demo(family, tmp_path):
    result = run_demo(family, steps=3, latent_size=8, block_size=4, out=str(tmp_path), repeats=1)
    assert 0.0 < result["flop_cut"] < 1.0
    assert result["latent_rse"] > 0  # the plan really changed the computation
    assert result["backend"] == "reference"
    plan = CompressionPlan.load(tmp_path)
    assert plan.num_steps == 3 and plan.block_size == 4
    assert set(plan.method_counts()) == {"full", "arrow", "cfg_share", "cache"}


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--latent-size", "8", "--block-size", "4", "--method", "arrow:1/2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "of dense attention FLOPs cut" in out and str(tmp_path) in out
    assert (tmp_path / "plan.safetensors").is_file()


def test_user_error_exits_1_without_traceback(capsys):
    assert main(["demo", "--steps", "2", "--latent-size", "8", "--method", "arrow:2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ditfa-optimum: error: arrow fraction must be in (0, 1]") and "Traceback" not in err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_examples_compile():
    for path in (ROOT / "examples").glob("*.py"):
        py_compile.compile(str(path), doraise=True)


def test_optimize_command_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["optimize", "--steps", "4", "--num-prompts", "2", "--threshold", "0.2", "--quiet",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "attention FLOPs cut" in text and "pred. RSE" in text and "total" in text
    plan = CompressionPlan.load(out)
    assert plan.num_steps == 4 and plan.metadata["search"]["threshold"] == 0.2
    assert plan.metadata["search"]["flop_cut"] > 0
    assert (out / "calibration" / "calibration.safetensors").is_file()


def test_optimize_reads_a_prompts_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration captions\na red cube\n\na blue sphere on grass\n")
    assert main(["optimize", "tiny-flux", "--steps", "3", "--prompts", str(prompts), "--quiet",
                 "--out", str(tmp_path / "plan")]) == 0
    assert CompressionPlan.load(tmp_path / "plan").metadata["search"]["num_prompts"] == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["optimize", "--prompts", str(empty), "--quiet"]) == 1
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["--threshold", "-1"], "threshold must be a finite number >= 0"),
    (["--method", "bogus"], "unknown attention method 'bogus'"),
    (["--prompts", "/no/such/file.txt"], "cannot read the prompts file"),
])
def test_optimize_user_errors(args, words, capsys):
    assert main(["optimize", "--quiet", *args]) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
