"""Whole skipped steps in the search: the dynamic program against brute force, the damage table against its formula,
and calibration + search + runtime end to end on the tiny SD3 pipeline."""

import itertools
import math

import numpy as np
import pytest
import torch

from ditfa_optimum.apply import apply, remove
from ditfa_optimum.calibrate import SELECTION_MARGIN, CalibrationStats, calibrate, run_pipeline, step_skip_damage
from ditfa_optimum.prompts import default_prompts
from ditfa_optimum.search import TrajectoryProblem, search, selection_key

from search_helpers import tiny_setup


def _problem(T, R, full_steps, seed):
    rng = np.random.default_rng(seed)
    D = np.full((T, T, T), np.inf)
    for b in range(T):
        for a in range(max(0, b - R - 1), b + 1):
            for e in range(b + 1, min(T - 1, b + R) + 1):
                D[a, b, e] = rng.uniform(0, 3) * (e - b) ** 2
    problem = TrajectoryProblem([], {}, {}, {}, 1.0, None, 0, full_steps=full_steps, max_skip_run=R,
                                step_damage=D, step_saved=1.0)
    free, restricted = rng.uniform(-0.5, 1.0, T), rng.uniform(-1.0, 0.8, T)
    return problem, free, restricted


def _value(problem, skipped, free, restricted, lam):
    """The objective of one skip set, written out directly (the definition the dynamic program maximises)."""
    T, S = len(free), set(skipped)
    ran = [t for t in range(T) if t not in S]
    anchors = TrajectoryProblem.anchors(skipped, T)
    total = 0.0
    for i, b in enumerate(ran):
        nxt = ran[i + 1] if i + 1 < len(ran) else T
        if nxt > b + 1:
            a = ran[i - 1] if i > 0 else b
            total += (nxt - b - 1) * problem.step_saved - lam * problem.step_damage[a, b, nxt - 1]
        if b >= problem.full_steps and b not in anchors:
            total += restricted[b] if b - 1 in S else free[b]
    return total


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("T,R,full_steps", [(7, 2, 1), (8, 3, 2), (6, 1, 1)])
def test_step_dynamic_program_finds_the_best_skip_set(T, R, full_steps, seed):
    problem, free, restricted = _problem(T, R, full_steps, seed)
    lam = 0.3
    best = -math.inf
    start = max(full_steps, 1)
    for mask in itertools.product([False, True], repeat=T - start):
        skipped = [start + i for i, m in enumerate(mask) if m]
        runs = [len(list(g)) for k, g in itertools.groupby(mask) if k]
        if runs and max(runs) > R:
            continue
        best = max(best, _value(problem, skipped, free, restricted, lam))
    chosen = problem._choose_steps(free, restricted, lam)
    assert all(t >= start for t in chosen)
    assert _value(problem, chosen, free, restricted, lam) == pytest.approx(best, abs=1e-9)


def test_rhythm_variants_take_the_latest_start_meeting_the_target():
    """The peers' fixed rhythm as a candidate: one step computed in every k from the latest start that still skips
    enough (12 steps of cost 1, target 40% = 5 steps skipped)."""
    from ditfa_optimum import DiTFastAttnConfig

    problem, _, _ = _problem(12, 3, 1, seed=0)
    problem.dense_cost = 12.0
    config = DiTFastAttnConfig(target_cut=0.4, num_inference_steps=12)
    rhythms = [v for v in problem.variants(config) if "rhythm" in v]
    assert rhythms == [{"rhythm": 2, "start": 2}, {"rhythm": 3, "start": 4}, {"rhythm": 4, "start": 5}]
    lam, choices = problem.solve_variant(config, {"rhythm": 3, "start": 4})
    assert lam is None and np.nonzero(choices["steps"])[0].tolist() == [5, 6, 8, 9, 11]
    assert problem.totals(choices)[0] == pytest.approx(5 / 12)
    assert problem.variant == {"rhythm": 3, "start": 4}  # what `describe` reports
    with pytest.raises(ValueError, match="allows runs of up to max_skip_run=3"):
        problem.solve_variant(config, {"rhythm": 5, "start": 4})
    with pytest.raises(ValueError, match="refreshes cached heads on a rhythm.*skips whole steps"):
        problem.solve_variant(config, {"head_rhythm": 3, "start": 4})  # head-only plans' rhythms


def test_anchors_are_the_two_computed_steps_before_each_run():
    assert TrajectoryProblem.anchors([3, 4, 7], 9) == {1, 2, 5, 6}
    assert TrajectoryProblem.anchors([1], 3) == {0}
    assert TrajectoryProblem.anchors([], 5) == set()


class _Gains:
    def __init__(self, gains):
        self.gains = gains

    def output_damage_gain(self, step):
        return self.gains[step]

    def run_damage_factor(self, length):
        return 1.0


def test_step_skip_damage_follows_its_formula():
    """Outputs quadratic in the step: first-order extrapolation from (a, b) misses by -(t - a)(t - b) at step t, and
    the errors of one run add (weighted by the square root of each step's gain) before squaring."""
    T, R = 7, 2
    u = torch.randn(3, 2, 4, 4)
    outputs = [[u * t ** 2 for t in range(T)]]
    gains = [0.5 + t for t in range(T)]
    damage = step_skip_damage(outputs, _Gains(gains), R)
    assert damage.shape == (T, T, T)
    norm = float(u.double().pow(2).sum()) / u.shape[0]
    for b in range(T - 1):
        for a in range(max(0, b - R - 1), b):
            for e in range(b + 1, min(T - 1, b + R) + 1):
                coeff = sum(math.sqrt(gains[t]) * -(t - a) * (t - b) for t in range(b + 1, e + 1))
                assert float(damage[a, b, e]) == pytest.approx(coeff ** 2 * norm, rel=1e-5)
        e = b + 1  # one anchor: plain reuse misses by b^2 - t^2
        assert float(damage[b, b, e]) == pytest.approx(gains[e] * (b ** 2 - e ** 2) ** 2 * norm, rel=1e-5)
    assert math.isinf(float(damage[0, 4, 6])) and math.isinf(float(damage[3, 3, 6]))  # beyond R / a > b
    linear = step_skip_damage([[u * t for t in range(T)]], _Gains(gains), R)
    assert float(linear[1, 2, 4]) == pytest.approx(0.0, abs=1e-9)  # a straight line is extrapolated exactly


def test_skipped_steps_are_calibrated_searched_and_run(one_thread, tmp_path):
    pipe, encoder, config = tiny_setup("sd3", allocation="trajectory", max_head_rse=1e9, skip_steps=True,
                                       target_cut=0.5, num_inference_steps=8)
    prompts = default_prompts(2)
    stats = calibrate(pipe, config, prompts, prompt_encoder=encoder, progress=False)
    assert stats.sensitivity.output_gain.shape == (8,) and bool((stats.sensitivity.output_gain > 0).all())
    assert len(stats.sensitivity.output_factor) == 8
    assert set(stats.sensitivity.run_factor) == {"2", "3", "4"} and all(
        math.isfinite(f) and f > 0 for f in stats.sensitivity.run_factor.values())
    table = stats.step_damage["transformer"]
    assert table.shape == (8, 8, 8) and bool(torch.isfinite(table[0, 1, 2:4]).all())
    plan = search(stats, config)
    info = plan.metadata["search"]
    assert plan.skipped_steps and info["skipped_steps"] == plan.skipped_steps
    assert info["whole_cut"] >= 0.5 - 1e-9
    runs = [len(list(g)) for k, g in itertools.groupby(plan.runs_step(t) for t in range(8)) if not k]
    assert max(runs) <= config.max_skip_run
    for t in TrajectoryProblem.anchors(plan.skipped_steps, 8):  # anchors compute every head in full
        assert all(m.name == "full" for spec in plan.modules for m in plan.step_methods(spec.name, t))
    # the search keeps the least predicted damage among its head weights' plans meeting the target
    problem = TrajectoryProblem.from_stats(stats, config)
    _, chosen = problem.solve(config)
    best = problem.totals(chosen)[1]
    for weight in TrajectoryProblem.HEAD_WEIGHTS:
        problem.weigh_heads(weight)
        _, choices = problem._solve_one(config)
        cut, damage = problem.totals(choices)
        assert cut < 0.5 - 1e-9 or damage >= best - 1e-12
    problem.weigh_heads(np.inf)
    assert all((c == problem.full_index).all() for n, c in problem.choose(0.0).items() if n in problem.names)
    # the plan is the alternative that changed the sensitivity prompts' images least, measured at calibration
    selection = stats.selections[selection_key(config)]
    runs = selection["alternatives"]
    assert 1 <= len(runs) <= config.verify_plans and all(r["measured_mse"] > 0 for r in runs)
    meeting = [r for r in runs if r["meets_target"]]
    least = min(meeting, key=lambda r: r["measured_mse"])
    best = least if least["measured_mse"] * SELECTION_MARGIN < meeting[0]["measured_mse"] else meeting[0]
    assert selection["variant"] == best["variant"] == info["variant"]
    assert any("rhythm" in r["variant"] for r in runs)  # the peers' fixed rhythm is among the candidates
    for r in runs:
        assert r["meets_target"] == (r["whole_cut"] >= 0.5 - 1e-9)
    ranked = [r["predicted_mse"] for r in runs if r["meets_target"]]
    assert ranked == sorted(ranked)  # the alternatives come ranked by predicted damage
    assert stats.damage_scale == pytest.approx(best["measured_mse"] / best["predicted_mse"])
    apply(pipe, plan, backend="reference")
    try:
        out = run_pipeline(pipe, prompts, config, prompt_encoder=encoder)
        again = run_pipeline(pipe, prompts[:config.sensitivity_prompts], config, prompt_encoder=encoder).float()
    finally:
        remove(pipe)
    assert out.isfinite().all()
    reference = stats.sensitivity.reference_final
    assert float(((again - reference) ** 2).mean()) == pytest.approx(best["measured_mse"], rel=1e-4)
    stats.save(tmp_path)
    again = CalibrationStats.load(tmp_path)
    assert torch.equal(again.step_damage["transformer"], table)
    assert torch.equal(again.sensitivity.output_gain, stats.sensitivity.output_gain)
    assert again.sensitivity.output_factor == stats.sensitivity.output_factor
    assert again.sensitivity.run_factor == stats.sensitivity.run_factor
    assert search(again, config) == plan
    with pytest.raises(ValueError, match="do not price skipped steps"):
        search(CalibrationStats(**{**vars(stats), "step_damage": {}}), config)
