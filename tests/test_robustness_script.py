"""tools/robustness.py (the fuzzer and the CLI bad-input list) runs, and a short run of each part ends in clear
refusals and expected acceptances only: nothing in "other exception". About 15 s on two CPU cores; the full run (a few
minutes) is `python tools/robustness.py` (docs/artifact-format.md, "Robustness")."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def robustness():
    spec = importlib.util.spec_from_file_location("robustness", ROOT / "tools" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_few_seconds_of_fuzzing(robustness):
    result = robustness.fuzz(minutes=0.1, seed=7, max_cases=60, log=lambda message: None)
    assert not result["baseline_failures"], result["baseline_failures"]  # the unmutated artifact passes every stage
    assert result["tried"] >= 10 and result["refused"] > 0
    assert result["other"] == 0, result["other_cases"]
    table = robustness.markdown({"fuzz": result})
    assert "| fuzzer" in table and "refused clearly" in table


CLI_INPUTS = ["--method arrow:1/0", "optimize --guidance nan", "optimize --steps 0", "--device bogus",
              "bench --repeats 0", "demo --steps 0", "demo --latent-size -1", "inspect --png x.unknown",
              "generate --out a directory", "push", "verify --psnr-floor nan"]


def test_a_handful_of_bad_cli_inputs(robustness):
    result = robustness.cli("inprocess", only=CLI_INPUTS, log=lambda message: None)
    assert result["tried"] >= len(CLI_INPUTS)
    bad = [row for row in result["rows"] if row["outcome"] != "refused" or not row["as_expected"]]
    assert not bad, bad
    assert all(row["message"].startswith("ditfa-optimum") for row in result["rows"])
