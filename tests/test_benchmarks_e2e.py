"""benchmarks/e2e.py on the CPU: its --tiny run end to end, its plans, its step positioning and its search mode."""

import importlib.util
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import ditfa_optimum as dfa

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def test_tiny_generation_run_skips_whole_steps(e2e, tmp_path):
    out = tmp_path / "gen.json"
    assert e2e.main(["--generation", "--tiny", "--arch", "sd3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["stock", "all-full plan", "skip 30% of steps", "skip 50% of steps"]
    for r in rows:
        assert r["ms"] > 0 and len(r["ms_all"]) == 2 and math.isclose(r["of_ideal"], r["speedup"] / r["ideal"])
        assert r["max_abs_diff_vs_stock"] <= 1e-5  # the last step runs, on the same inputs as stock's
    assert [len(r["skipped_steps"]) for r in rows] == [0, 0, 8, 14]
    assert rows[3]["ideal"] == 2.0 and rows[3]["whole_cut"] == 0.5


def test_tiny_run_with_compiled_blocks_writes_every_row(e2e, tmp_path):
    """``--compile blocks``: each row compiles the blocks (inductor) and a plan row runs the plan's tables after its
    trajectory through them (the step the runtime ran is the one reported)."""
    out = tmp_path / "blocks.json"
    try:
        assert e2e.main(["--tiny", "--arch", "flux", "--compile", "blocks", "--backends", "reference", "--out",
                         str(out)]) == 0
    finally:
        torch._dynamo.reset()
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["stock", "all-full plan", "plan 50%", "plan 68%"]
    for r in rows:
        assert r["compiled"] == "blocks" and r["output_finite"] and r["ms"] > 0
        if r["row"].startswith("plan"):
            assert r["runtime_step"] == r["timed_step"] and r["cache_mib"] > 0  # the tables kept outputs


def test_spread_skips_are_valid_plans(e2e):
    for cut in (0.1, 0.3, 0.5, 0.8):
        skipped = e2e.spread_skips(28, cut)
        assert len(skipped) == round(28 * cut) and skipped[0] >= 2 and skipped[-1] <= 26
        plan = dfa.CompressionPlan.uniform([dfa.ModuleSpec("m", 2, 8)], 28)
        plan.set_skipped_steps(skipped)  # validates
    with pytest.raises(ValueError, match="cannot skip 27 of 28 steps"):
        e2e.spread_skips(28, 27 / 28)


def tiny_case(e2e, arch):
    """A tiny model of ``arch``, its inputs per step at the --tiny size, its text tokens, block size and CFG flag."""
    model, text_tokens, block_size = e2e.build_model(arch, tiny=True)
    cfg = e2e.ARCHS[arch][2]
    steps, image_tokens = e2e.step_inputs(model, e2e.TINY["size"], text_tokens, 2 if cfg else 1, torch.device("cpu"))
    return model, steps, image_tokens, text_tokens, block_size, cfg


def test_tiny_run_writes_every_row(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--tiny", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"] == f"python benchmarks/e2e.py --tiny --out {out}"
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"] == torch.__version__
    rows = data["rows"]
    for arch in ("sd3", "flux"):
        assert [(r["row"], r["backend"]) for r in rows if r["arch"] == arch] == [
            ("stock", None), ("all-full plan", "blocked"), ("plan 50%", "blocked"), ("plan 68%", "blocked")]
    for r in rows:
        assert r["ms"] > 0 and len(r["ms_all"]) == 2 and r["output_finite"]
        assert r["amdahl_limit"] >= 1 and 0 < r["attention_share"] < 1
        assert math.isclose(r["of_limit"], r["speedup"] / r["amdahl_limit"])
        if r["row"] != "stock":
            assert r["runtime_step"] == r["timed_step"]  # the step the runtime ran is the one reported
        if r["row"].startswith("plan"):
            assert abs(r["plan_cut"] - r["target_cut"]) <= 0.01
            assert r["amdahl_limit"] > 1 and 7 <= r["timed_step"] < 21
        if r["row"] == "all-full plan":
            assert r["max_abs_diff_vs_stock"] <= 1e-5
    stock = [r for r in rows if r["row"] == "stock"]
    assert [r["attention_calls"] for r in stock] == [4, 2]  # tiny SD3: 4 joint blocks; tiny FLUX: 1 double + 1 single
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-10].startswith("| arch | size | row |") and "| flux | 128² | plan 68% | blocked |" in printed[-1]


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_all_full_plan_output_equals_stock(e2e, arch, one_thread):
    model, steps, _, _, block_size, cfg = tiny_case(e2e, arch)
    with torch.no_grad():
        stock = model(**steps[5]).sample
        dfa.apply(model, dfa.uniform_plan(model, e2e.NUM_STEPS, block_size=block_size), backend="blocked", cfg=cfg)
        for s in range(6):
            out = model(**steps[s]).sample
    dfa.remove(model)
    torch.testing.assert_close(out, stock)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_mixed_plans_hit_their_cut_deterministically(e2e, arch):
    model, _, image_tokens, text_tokens, block_size, cfg = tiny_case(e2e, arch)
    for target in e2e.TARGET_CUTS:
        plan = e2e.mixed_plan(model, target, image_tokens, text_tokens, block_size, cfg)
        assert plan == e2e.mixed_plan(model, target, image_tokens, text_tokens, block_size, cfg)
        assert abs(plan.flops(image_tokens, text_tokens, cfg=cfg).cut - target) <= e2e.CUT_TOLERANCE
        assert all(str(m) == "full" for name in plan.module_names for m in plan.step_methods(name, 0))
        counts = plan.metadata["method_counts"]
        assert ("cfg_share" in counts) == cfg and sum(counts.values()) == sum(plan.method_counts().values())
        assert counts["cache"] > 0 and counts["arrow:1/32"] > 0


def test_rewound_step_is_the_real_step(e2e, one_thread):
    """Repeating step t after rewinding gives the output of step t right after the real trajectory 0 .. t-1."""
    model, steps, image_tokens, text_tokens, block_size, cfg = tiny_case(e2e, "sd3")
    plan = e2e.mixed_plan(model, 0.68, image_tokens, text_tokens, block_size, cfg)
    report = plan.flops(image_tokens, text_tokens, cfg=cfg)
    t = e2e.timed_step(report.cut_per_step(), report.cut)
    assert abs(float(report.cut_per_step()[t]) - report.cut) < 0.1
    runtime = dfa.apply(model, plan, backend="blocked", cfg=cfg)
    with torch.no_grad():
        for s in range(t):
            model(**steps[s])
        point = e2e.checkpoint(runtime)
        assert point["step"] == t - 1 and any(point["memory"].values())  # cache heads of step t have their inputs
        real = model(**steps[t]).sample
        for _ in range(2):
            e2e.rewind(runtime, point)
            again = model(**steps[t]).sample
            assert runtime.state.step == t and runtime.state.branch == 0
            torch.testing.assert_close(again, real, rtol=0, atol=0)
    dfa.remove(model)


def test_search_mode_reports_search_time_runs(e2e, monkeypatch):
    calls = []

    def fake_run(name, prompts, steps, size, threshold, cost_model, backend):
        calls.append((name, prompts, steps, size))
        return dict(model=name, prompts=prompts, steps=steps, size=size, transformer_batch=prompts * 2,
                    dense_generation_seconds=10.0, calibration_seconds=30.0, search_seconds=2.0,
                    optimize_wall_seconds=32.0, peak_memory_gib=12.3, model_memory_gib=4.1, flop_cut=0.9)

    monkeypatch.setattr(e2e.search_time, "run", fake_run)
    rows = []
    e2e.search_mode(Namespace(archs=["sd3", "flux"], deadline=math.inf, budget=0.0), rows.append)
    assert calls == [("sd3_medium", 8, 28, 1024), ("flux_dev", 4, 28, 1024)]
    assert [r["arch"] for r in rows] == ["sd3", "flux"]
    assert "| sd3 | 8 (16) | 1024² | 28 | 10.0 | 30.0 | 2.0 | 32.0 | 12.3 (4.1) | 90.0% |" in e2e.search_table(rows)


def test_int8_rows_turn_the_full_heads_after_step_0_into_8bit_heads(e2e):
    model, _, image_tokens, text_tokens, block_size, cfg = tiny_case(e2e, "sd3")
    plan = e2e.mixed_plan(model, 0.5, image_tokens, text_tokens, block_size, cfg)
    int8 = e2e.int8_full_heads(plan)
    for name in plan.module_names:
        assert all(str(m) == "full" for m in int8.step_methods(name, 0))
        for step in range(1, e2e.NUM_STEPS):
            for before, after in zip(plan.step_methods(name, step), int8.step_methods(name, step)):
                assert str(after) == ("full_int8" if str(before) == "full" else str(before))
    counts = int8.metadata["method_counts"]
    assert counts["full_int8"] > 0 and sum(counts.values()) == sum(plan.metadata["method_counts"].values())
    # the 8-bit heads are counted at their measured price: a little more is cut
    assert int8.flops(image_tokens, text_tokens, cfg=cfg).cut > plan.flops(image_tokens, text_tokens, cfg=cfg).cut
