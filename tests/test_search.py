import itertools

import numpy as np
import pytest
import torch

from ditfa_optimum.calibrate import CalibrationStats, calibrate
from ditfa_optimum.prompts import default_prompts
from ditfa_optimum.search import search, solve_heads, solve_layer

from search_helpers import FAMILIES, tiny_setup


def brute_force(rse, saved, budget):
    """Best total saving over every assignment of one candidate per head (inf = not allowed)."""
    H, C = rse.shape
    best = 0.0
    for combo in itertools.product(range(C), repeat=H):
        err = sum(rse[h, c] for h, c in enumerate(combo))
        if err <= budget:
            best = max(best, sum(saved[c] for c in combo))
    return best


@pytest.mark.parametrize("trial", range(60))
def test_ilp_matches_brute_force(trial):
    rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
    H, C = int(rng.integers(1, 7)), int(rng.integers(2, 5))
    rse = rng.uniform(0, 1, size=(H, C))
    rse[:, 0] = 0.0
    rse[rng.uniform(size=(H, C)) < 0.15] = np.inf  # some candidates unavailable on some heads
    rse[:, 0] = 0.0
    saved = np.concatenate([[0.0], rng.integers(0, 5, size=C - 1) / 4])  # integer-ish savings: ties happen
    budget = float(rng.uniform(0, 0.6 * H))
    choice = solve_heads(rse, saved, budget)
    assert choice.shape == (H,)
    chosen_err = rse[np.arange(H), choice].sum()
    assert chosen_err <= budget
    assert saved[choice].sum() == pytest.approx(brute_force(rse, saved, budget), abs=1e-9)


def test_ilp_edge_cases():
    rse = np.array([[0.0, 0.2], [0.0, 0.2]])
    assert solve_heads(rse, [0.0, 1.0], 0.0).tolist() == [0, 0]  # no budget: all full
    assert solve_heads(rse, [0.0, 1.0], 0.4).tolist() == [1, 1]  # everything fits: the fast path
    assert sorted(solve_heads(rse, [0.0, 1.0], 0.3).tolist()) == [0, 1]
    assert solve_heads(rse, [0.0, 0.0], 10.0).tolist() == [0, 0]  # saves nothing: stay full
    assert solve_heads([[0.0, np.inf]], [0.0, 1.0], 10.0).tolist() == [0]  # unavailable
    with pytest.raises(ValueError, match="NaN"):
        solve_heads([[0.0, np.nan]], [0.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        solve_heads([[0.0, 0.1]], [0.0, 1.0], -1.0)


def test_layer_solver_picks_one_method_for_all_heads():
    rse = np.array([[0.0, 0.05, 0.3], [0.0, 0.1, 0.2]])
    saved = [0.0, 1.0, 2.0]
    assert solve_layer(rse, saved, 0.1).tolist() == [0, 0]  # 0.15 > 0.1: nothing fits
    assert solve_layer(rse, saved, 0.2).tolist() == [1, 1]
    assert solve_layer(rse, saved, 0.5).tolist() == [2, 2]
    assert solve_layer([[0.0, np.inf]], [0.0, 1.0], 10.0).tolist() == [0]  # unavailable
    assert sorted(solve_heads(rse, saved, 0.3).tolist()) == [1, 2]  # per head does better at the same budget


@pytest.fixture(scope="module", params=FAMILIES)
def calibrated(request):
    pipe, encoder, config = tiny_setup(request.param)
    stats = calibrate(pipe, config, default_prompts(4), prompt_encoder=encoder, progress=False)
    return stats, config


def test_zero_threshold_keeps_every_head_full(calibrated):
    stats, config = calibrated
    plan = search(stats, config, threshold=0.0)
    assert plan.method_counts() == {"full": sum(s.num_heads for s in plan.modules) * plan.num_steps}
    assert plan.metadata["search"]["flop_cut"] == 0.0


def test_cut_never_decreases_with_threshold(calibrated):
    stats, config = calibrated
    cuts = [search(stats, config, threshold=t).metadata["search"]["flop_cut"]
            for t in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 2.0, 100.0)]
    assert all(b >= a - 1e-12 for a, b in zip(cuts, cuts[1:])), cuts
    assert cuts[-1] > cuts[0]


def test_search_is_deterministic_and_reproduces_the_calibration_choices(calibrated):
    stats, config = calibrated
    a, b = search(stats, config), search(stats, config)
    assert a == b and a.metadata["search"]["predicted_rse"] == b.metadata["search"]["predicted_rse"]
    # one prompt batch: the choices that flowed during calibration are the searched plan
    for spec in stats.modules:
        flowed = [[stats.candidates[int(c)] for c in row] for row in stats.chosen[spec.name]]
        assert [[str(m) for m in a.step_methods(spec.name, t)] for t in range(a.num_steps)] == flowed


def test_budget_holds_per_module_and_step(calibrated):
    stats, config = calibrated
    for threshold in (0.02, 0.1, 0.3):
        plan = search(stats, config, threshold=threshold)
        for spec in plan.modules:
            predicted = torch.tensor(plan.metadata["search"]["predicted_rse"][spec.name])
            assert bool((predicted <= threshold + 1e-12).all())
            assert predicted[: config.full_steps].eq(0).all()


def test_search_report_is_data_on_the_plan(calibrated):
    stats, config = calibrated
    plan = search(stats, config)
    report = plan.report()
    M, T = len(plan.modules), plan.num_steps
    assert report.share.shape == (M, T, len(report.method_names))
    torch.testing.assert_close(report.share.sum(-1), torch.ones(M, T, dtype=torch.float64))
    assert report.flop_cut.shape == (M, T) and report.predicted_rse.shape == (M, T)
    assert report.total_cut == pytest.approx(plan.metadata["search"]["flop_cut"])
    assert "total" in report.table()
    info = plan.metadata["search"]
    assert info["search_seconds"] > 0 and info["calibration_seconds"] > 0
    assert info["config"]["threshold"] == config.threshold


def test_restricting_candidates_and_mismatches(calibrated):
    stats, config = calibrated
    plan = search(stats, config.replace(methods=("arrow:1/8",)), threshold=5.0)
    used = {str(m) for s in plan.modules for t in range(plan.num_steps) for m in plan.step_methods(s.name, t)}
    assert used <= {"full", "arrow:0.125"}
    with pytest.raises(ValueError, match="were not calibrated"):
        search(stats, config.replace(methods=("arrow:1/4",)))
    with pytest.raises(ValueError, match="statistics cover 6 steps"):
        search(stats, config.replace(num_inference_steps=8))


def test_stats_round_trip(calibrated, tmp_path):
    stats, config = calibrated
    stats.save(tmp_path / "stats")
    again = CalibrationStats.load(tmp_path / "stats")
    assert again.candidates == stats.candidates and again.modules == stats.modules
    for kind in ("err", "ref", "chosen", "cost_flops"):
        for name, t in getattr(stats, kind).items():
            assert torch.equal(getattr(again, kind)[name], t), (kind, name)
    assert search(again, config) == search(stats, config)
    (tmp_path / "stats" / "calibration.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CalibrationStats.load(tmp_path / "stats")


def test_layerwise_baseline_fits_the_budget_and_never_beats_the_headwise_search(calibrated):
    stats, config = calibrated
    for threshold in (0.02, 0.1, 0.3, 1.0):
        layer = search(stats, config, threshold=threshold, granularity="layer")
        head = search(stats, config, threshold=threshold)
        assert layer.metadata["search"]["granularity"] == "layer"
        for spec in layer.modules:
            for t in range(layer.num_steps):
                assert len({str(m) for m in layer.step_methods(spec.name, t)}) == 1
            assert max(layer.metadata["search"]["predicted_rse"][spec.name]) <= threshold + 1e-12
        # the layer-wise choice is one feasible point of the per-head integer program
        assert head.metadata["search"]["flop_cut"] >= layer.metadata["search"]["flop_cut"] - 1e-12
    with pytest.raises(ValueError, match="granularity must be one of"):
        search(stats, config, granularity="model")


@pytest.mark.parametrize("schedule, normalization", [("quadratic", "head"), ("linear", "module")])
def test_budget_schedules_and_normalizations_hold_per_step(calibrated, schedule, normalization):
    stats, config = calibrated
    config = config.replace(budget_schedule=schedule, error_normalization=normalization)
    plan = search(stats, config)
    thresholds = config.step_thresholds()
    assert plan.metadata["search"]["step_thresholds"] == thresholds
    ids = {n: i for i, n in enumerate(stats.candidates)}
    for spec in plan.modules:
        rse = stats.rse(spec.name, normalization)
        for t in range(plan.num_steps):
            chosen = [ids[str(m)] for m in plan.step_methods(spec.name, t)]
            used = sum(float(rse[t, h, c]) for h, c in enumerate(chosen) if c != ids["full"])
            assert used <= thresholds[t] * spec.num_heads + 1e-9
    # the module normalization divides every head by the same number
    rse_module = stats.rse(stats.modules[0].name, "module")
    err = stats.err[stats.modules[0].name]
    ref = stats.ref[stats.modules[0].name].mean(-1)
    torch.testing.assert_close(rse_module[1, :, 1], err[1, :, 1] / ref[1])


def test_calibration_choices_follow_the_budget_schedule():
    pipe, encoder, config = tiny_setup("sd3", budget_schedule="quadratic", error_normalization="module")
    stats = calibrate(pipe, config, default_prompts(2), prompt_encoder=encoder, progress=False)
    plan = search(stats, config)
    for spec in stats.modules:
        flowed = [[stats.candidates[int(c)] for c in row] for row in stats.chosen[spec.name]]
        assert [[str(m) for m in plan.step_methods(spec.name, t)] for t in range(plan.num_steps)] == flowed
