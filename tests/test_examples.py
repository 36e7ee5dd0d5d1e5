"""Every script in examples/ runs on the embedded models (offline, CPU) and what it writes is checked."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditfa_optimum import CompressionPlan
from ditfa_optimum.mini import mini_pipeline
from ditfa_optimum.serialization import read_artifact

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever the machine
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_every_example_has_a_test():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "optimize_and_publish.py", "sd3_headwise_plan.py", "train_mini_mmdit.py"]


def test_headwise_plan_example_on_the_embedded_model(tmp_path):
    printed = run("sd3_headwise_plan.py", "--model", "mini-mmdit", "--steps", "6", "--full-steps", "2", "--out", "o",
                  cwd=tmp_path)
    plan = CompressionPlan.load(tmp_path / "o")
    assert plan.num_steps == 6 and {"full", "arrow", "cache"} <= set(plan.method_counts())
    for step in (0, 1):  # --full-steps 2
        assert all(m.name == "full" for spec in plan.modules for m in plan.step_methods(spec.name, step))
    dense, planned = (np.asarray(Image.open(tmp_path / "o" / f"{n}.png"), dtype=np.float64) / 255
                      for n in ("dense", "planned"))
    assert dense.shape == planned.shape == (64, 64, 3) and not np.array_equal(dense, planned)
    psnr = 10 * math.log10(1 / float(((planned - dense) ** 2).mean()))
    printed_psnr = float(re.search(r"PSNR of the planned image against the dense one: ([\d.]+) dB", printed).group(1))
    assert printed_psnr == pytest.approx(psnr, abs=0.06)  # what it prints is what it wrote
    assert 5 < psnr < 60


def test_optimize_and_publish_example_on_the_tiny_model(tmp_path):
    printed = run("optimize_and_publish.py", "--tiny", "--out", "art", cwd=tmp_path)
    assert "verify art: PASS" in printed
    assert "loaded StableDiffusion3Pipeline running a plan over 8 steps" in printed
    artifact = read_artifact(tmp_path / "art")
    info = artifact.plan.metadata["search"]
    assert info["whole_cut"] >= 0.3 - 1e-9  # the example's --target-cut default


def test_train_example_writes_a_loadable_model(tmp_path):
    run("train_mini_mmdit.py", "--out", "m", "--steps", "2", "--batch-size", "4", "--warmup", "1", "--device", "cpu",
        "--no-compile", cwd=tmp_path)
    pipe = mini_pipeline(tmp_path / "m")
    image = pipe("a small red circle in the top left", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)
