"""The trajectory allocation's pure parts (no model): the Lagrangian chooser, the per-head cap, the one chooser shared
by calibration and search, the global search with its two targets, and the config rules around them.

Everything runs on made-up statistics (`search_helpers.synthetic_stats` + `attach_sensitivity`)."""

import itertools
import logging

import numpy as np
import pytest

from ditfa_optimum.config import DEFAULT_TARGET_CUT, DiTFastAttnConfig
from ditfa_optimum.search import (TrajectoryProblem, allowed_candidates, choose_step, lagrangian_choice, search,
                                  solve_heads)

from search_helpers import attach_sensitivity, synthetic_stats

T = 6


@pytest.fixture(scope="module")
def stats():
    return attach_sensitivity(synthetic_stats(num_steps=T))


def config(**changes):
    return DiTFastAttnConfig(**{"num_inference_steps": T, **changes})


def chosen_index(stats, plan):
    """Per module, ``[T, H]`` candidate index of the plan's methods."""
    index = {n: i for i, n in enumerate(stats.candidates)}
    return {s.name: np.array([[index[str(m)] for m in plan.step_methods(s.name, t)] for t in range(plan.num_steps)])
            for s in plan.modules}


def problem_of(stats, cfg):
    return TrajectoryProblem.from_stats(stats, cfg)


def plan_totals(stats, cfg, plan):
    """(cut, predicted damage) of ``plan`` under the problem's own model."""
    return problem_of(stats, cfg).totals(chosen_index(stats, plan))


# ------------------------------------------------------------------------------------------ lagrangian_choice
def test_lagrangian_choice_takes_the_argmax():
    damage, saved, allowed = [[0.0, 1.0, 4.0]], [0.0, 1.0, 2.0], [[True, True, True]]
    assert lagrangian_choice(damage, saved, allowed, lam=0.1).tolist() == [2]  # 0, 0.9, 1.6
    assert lagrangian_choice(damage, saved, allowed, lam=0.4).tolist() == [1]  # 0, 0.6, 0.4
    assert lagrangian_choice(damage, saved, allowed, lam=2.0).tolist() == [0]  # 0, -1, -6
    assert lagrangian_choice(damage, saved, [[True, False, True]], lam=0.4).tolist() == [2]  # 0, -, 0.4


def test_lagrangian_choice_matches_brute_force_on_batches():
    rng = np.random.default_rng(0)
    damage = rng.uniform(0, 1, size=(5, 7, 4))
    damage[..., 0] = 0.0
    saved = np.array([0.0, 1.0, 1.5, 3.0])
    allowed = rng.uniform(size=damage.shape) < 0.7
    for lam in (0.0, 0.3, 1.0, 3.0, 30.0):
        choice = lagrangian_choice(damage, saved, allowed, lam)
        assert choice.shape == (5, 7)
        for t, h in itertools.product(range(5), range(7)):
            ok = [c for c in range(4) if c == 0 or allowed[t, h, c]]
            best = max(saved[c] - lam * damage[t, h, c] for c in ok)
            assert choice[t, h] in ok
            assert saved[choice[t, h]] - lam * damage[t, h, choice[t, h]] == pytest.approx(best, abs=1e-12)


def test_lagrangian_choice_breaks_ties_by_less_damage():
    # candidates 1 and 2 save the same (arrow 1/16 and 1/32 at a small resolution): the one doing less damage wins
    assert lagrangian_choice([[0.0, 0.5, 0.2]], [0.0, 1.0, 1.0], [[True, True, True]], lam=0.0).tolist() == [2]
    assert lagrangian_choice([[0.0, 0.2, 0.5]], [0.0, 1.0, 1.0], [[True, True, True]], lam=0.0).tolist() == [1]
    # an exact tie of value between a saving candidate and full (saved = lam * damage): full does no damage
    assert lagrangian_choice([[0.0, 1.0]], [0.0, 2.0], [[True, True]], lam=2.0).tolist() == [0]


def test_lagrangian_choice_at_infinite_price_keeps_every_head_full():
    damage = np.zeros((3, 4, 3))  # even candidates predicted harmless
    allowed = np.ones((3, 4, 3), dtype=bool)
    assert (lagrangian_choice(damage, [0.0, 1.0, 2.0], allowed, lam=np.inf) == 0).all()
    assert (lagrangian_choice(damage, [0.0, 1.0, 2.0], allowed, lam=np.inf, full_index=1) == 1).all()
    # at any finite price a harmless saving candidate is taken; full is allowed even when the mask says otherwise
    assert lagrangian_choice([[0.0, 0.0]], [0.0, 1.0], [[False, True]], lam=1e30).tolist() == [1]
    assert lagrangian_choice([[0.0, 0.0]], [0.0, 1.0], [[False, False]], lam=0.0).tolist() == [0]


# ------------------------------------------------------------------------------------------ allowed_candidates
def test_allowed_candidates_applies_the_per_head_cap():
    rse = np.array([[[0.0, 0.1, 0.6, np.inf, 0.2],
                     [0.0, 0.5, 0.50001, 0.3, 0.0]]])  # [T=1, H=2, C=5]
    saved = np.array([0.0, 1.0, 2.0, 3.0, 0.0])  # the last saves nothing
    allowed = allowed_candidates(rse, saved, max_head_rse=0.5)
    assert allowed.shape == rse.shape
    assert allowed.tolist() == [[[True, True, False, False, False],
                                 [True, True, False, True, False]]]
    # full stays allowed whatever its column holds
    assert allowed_candidates(np.array([[np.inf, 0.1]]), np.array([0.0, 1.0]), 0.5).tolist() == [[True, True]]
    assert allowed_candidates(rse, saved, max_head_rse=1e9)[..., 2].all()


# ------------------------------------------------------------------------------------------ choose_step
def test_choose_step_keeps_the_full_steps_full():
    rse = np.array([[0.0, 0.01, 0.02], [0.0, 0.01, 0.02]])
    saved = np.array([0.0, 1.0, 2.0])
    for allocation in ("local", "trajectory"):
        cfg = config(full_steps=2, allocation=allocation, threshold=10.0)
        for step in (0, 1):
            assert choose_step(rse, saved, cfg, step, damage=np.zeros_like(rse), lam=0.0).tolist() == [0, 0]
        assert choose_step(rse, saved, cfg, 2, damage=np.zeros_like(rse), lam=0.0).tolist() == [2, 2]


@pytest.mark.parametrize("trial", range(20))
def test_choose_step_local_is_the_integer_program_with_the_cap(trial):
    rng = np.random.default_rng(trial)
    H, C = int(rng.integers(1, 7)), 4
    rse = rng.uniform(0, 0.8, size=(H, C))
    rse[:, 0] = 0.0
    rse[rng.uniform(size=(H, C)) < 0.15] = np.inf
    rse[:, 0] = 0.0
    saved = np.array([0.0, 0.5, 1.0, 2.0])
    cfg = config(allocation="local", threshold=float(rng.uniform(0, 0.5)), max_head_rse=0.4,
                 budget_schedule="linear")
    step = int(rng.integers(1, T))
    choice = choose_step(rse, saved, cfg, step)
    budget = cfg.step_thresholds()[step] * H
    expected = solve_heads(np.where(rse <= 0.4, rse, np.inf), saved, budget)
    assert choice.tolist() == expected.tolist()
    chosen = rse[np.arange(H), choice]
    assert (chosen <= 0.4).all() and chosen.sum() <= budget + 1e-12


def test_choose_step_local_cap_binds_where_the_budget_would_not():
    rse, saved = np.array([[0.0, 0.6], [0.0, 0.6]]), np.array([0.0, 1.0])
    assert choose_step(rse, saved, config(allocation="local", threshold=1.0, max_head_rse=1e9), 1).tolist() == [1, 1]
    assert choose_step(rse, saved, config(allocation="local", threshold=1.0, max_head_rse=0.5), 1).tolist() == [0, 0]


def test_choose_step_trajectory_is_the_lagrangian():
    rng = np.random.default_rng(1)
    rse = rng.uniform(0, 0.8, size=(6, 4))
    rse[:, 0] = 0.0
    damage = rng.uniform(0, 2, size=(6, 4))
    damage[:, 0] = 0.0
    saved = np.array([0.0, 0.5, 1.0, 2.0])
    cfg = config(max_head_rse=0.5)
    for lam in (0.0, 0.3, 1.0, 10.0):
        expected = lagrangian_choice(damage, saved, allowed_candidates(rse, saved, 0.5), lam)
        assert choose_step(rse, saved, cfg, 3, damage=damage, lam=lam).tolist() == expected.tolist()
    # no price (the calibration's dense-flow pass) or no damage: every head full
    assert (choose_step(rse, saved, cfg, 3, damage=damage, lam=None) == 0).all()
    assert (choose_step(rse, saved, cfg, 3, damage=None, lam=1.0) == 0).all()
    assert (choose_step(rse, saved, cfg, 3, damage=damage, lam=np.inf) == 0).all()


# ------------------------------------------------------------------------------------------ search: target_cut
@pytest.mark.parametrize("target", [0.2, 0.45, 0.6, 0.75])
def test_target_cut_is_met(stats, target):
    plan = search(stats, config(target_cut=target))
    info = plan.metadata["search"]
    assert info["allocation"] == "trajectory" and info["target"] == {"cut": target}
    assert info["predicted_cut"] >= target
    assert info["flop_cut"] == pytest.approx(info["predicted_cut"], abs=1e-12)  # the FLOP model and the search agree
    assert info["predicted_cut"] < target + 0.05  # not far beyond it: the rest of the budget is quality
    cut, damage = plan_totals(stats, config(target_cut=target), plan)
    assert cut == pytest.approx(info["predicted_cut"])
    assert info["predicted_final_mse"] == pytest.approx(stats.sensitivity.predicted_mse(damage))
    # the first step (nothing to reuse) stays full
    for spec in plan.modules:
        assert {str(m) for m in plan.step_methods(spec.name, 0)} == {"full"}


def test_larger_target_cut_never_gives_less_damage(stats):
    targets = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8]
    mse = [search(stats, config(target_cut=t)).metadata["search"]["predicted_final_mse"] for t in targets]
    assert all(b >= a - 1e-15 for a, b in zip(mse, mse[1:])), mse
    assert mse[-1] > mse[0]


def test_target_cut_plan_has_the_least_damage_of_the_lagrangian_plans_meeting_it(stats):
    cfg = config(target_cut=0.5)
    problem = problem_of(stats, cfg)
    plan = search(stats, cfg)
    cut, damage = plan_totals(stats, cfg, plan)
    met = 0
    for lam in problem._scale() * np.logspace(-8, 8, 600):
        other_cut, other_damage = problem.totals(problem.choose(lam))
        if other_cut >= 0.5:
            met += 1
            assert other_damage >= damage * (1 - 1e-9), (lam, other_cut, other_damage, cut, damage)
    assert met > 10


@pytest.mark.parametrize("seed", range(4))
def test_trajectory_plans_are_optimal_at_their_own_damage(seed):
    """Lagrangian optimality, checked by brute force on a problem small enough to enumerate (3^4 plans): no plan
    saves more without more predicted damage, none does less damage without saving less."""
    small = attach_sensitivity(synthetic_stats(num_modules=1, num_steps=3, num_heads=2, methods=("arrow:1/8", "cache"),
                                               seed=seed), seed=seed)
    cfg0 = DiTFastAttnConfig(num_inference_steps=3, methods=("arrow:1/8", "cache"), max_head_rse=1e9)
    problem = problem_of(small, cfg0)
    name = small.modules[0].name
    saved, damage, allowed = problem.saved[name], problem.damage[name], problem.allowed[name]
    cells = [(t, h) for t in (1, 2) for h in (0, 1)]
    everything = []
    for combo in itertools.product(range(3), repeat=len(cells)):
        if all(allowed[t, h, c] for (t, h), c in zip(cells, combo)):
            everything.append((sum(saved[c] for c in combo), sum(damage[t, h, c] for (t, h), c in zip(cells, combo))))
    for target in (0.1, 0.3, 0.5, 0.6):
        plan = search(small, cfg0.replace(target_cut=target))
        cut, dmg = plan_totals(small, cfg0, plan)
        s = cut * problem.dense_cost
        for other_s, other_d in everything:
            if other_d <= dmg * (1 + 1e-9):
                assert other_s <= s * (1 + 1e-9) + 1e-6, (target, other_s, other_d, s, dmg)
            if other_s >= s * (1 - 1e-9):
                assert other_d >= dmg * (1 - 1e-9) - 1e-12, (target, other_s, other_d, s, dmg)


def test_unreachable_target_cut_warns_and_saves_the_most(stats, caplog):
    cfg = config(target_cut=0.95)
    with caplog.at_level(logging.WARNING, logger="ditfa_optimum.search"):
        plan = search(stats, cfg)
    assert "cannot be reached" in caplog.text
    info = plan.metadata["search"]
    assert info["lambda"] == 0.0 and info["predicted_cut"] < 0.95
    # the most the candidates allow under the cap: every head takes its largest allowed saving
    problem = problem_of(stats, cfg)
    best = 0.0
    for name in problem.names:
        best += float(np.where(problem.allowed[name], problem.saved[name], 0.0).max(-1).sum())
    assert info["predicted_cut"] == pytest.approx(best / problem.dense_cost)
    # a tighter cap makes even less reachable, and that plan still saves the most it can
    capped = search(stats, cfg.replace(max_head_rse=0.05)).metadata["search"]["predicted_cut"]
    assert capped < info["predicted_cut"]


# ------------------------------------------------------------------------------------------ search: target_snr_db
@pytest.mark.parametrize("target", [15.0, 25.0, 30.0, 40.0, 60.0])
def test_target_snr_is_met(stats, target):
    plan = search(stats, config(target_snr_db=target))
    info = plan.metadata["search"]
    assert info["target"] == {"snr_db": target}
    snr = info["predicted_snr_db"]
    assert snr is None or snr >= target  # None: no error predicted at all (every head full)
    assert info["predicted_psnr_db"] is None or info["predicted_psnr_db"] > 0


def test_default_target_is_the_default_cut_and_lower_snr_targets_save_more(stats):
    default = search(stats, config()).metadata["search"]
    assert default["target"] == {"cut": DEFAULT_TARGET_CUT}
    assert default["predicted_cut"] >= DEFAULT_TARGET_CUT
    cuts = [search(stats, config(target_snr_db=t)).metadata["search"]["predicted_cut"] for t in (60, 40, 30, 20, 10)]
    assert all(b >= a - 1e-12 for a, b in zip(cuts, cuts[1:])), cuts
    assert cuts[-1] > cuts[0]


def test_target_snr_plan_is_the_most_saving_lagrangian_plan_that_keeps_it(stats):
    cfg = config(target_snr_db=35.0)
    problem = problem_of(stats, cfg)
    cut, damage = plan_totals(stats, cfg, search(stats, cfg))
    for lam in problem._scale() * np.logspace(-8, 8, 600):
        other_cut, other_damage = problem.totals(problem.choose(lam))
        if problem.snr_db(other_damage) >= 35.0:
            assert other_cut <= cut + 1e-12


# ------------------------------------------------------------------------------------------ cap, determinism, report
@pytest.mark.parametrize("allocation, target", [("trajectory", {"target_cut": 0.7}), ("trajectory", {}),
                                                ("local", {"threshold": 5.0})])
@pytest.mark.parametrize("cap", [0.02, 0.1, 0.5])
def test_no_head_exceeds_max_head_rse(stats, allocation, target, cap):
    cfg = config(allocation=allocation, max_head_rse=cap, **target)
    plan = search(stats, cfg)
    chosen = chosen_index(stats, plan)
    full = stats.candidates.index("full")
    compressed = 0
    for spec in plan.modules:
        rse = stats.rse(spec.name).numpy()
        c = chosen[spec.name]
        picked = np.take_along_axis(rse, c[..., None], -1)[..., 0]
        assert (picked[c != full] <= cap).all()
        compressed += int((c != full).sum())
    assert compressed > 0


def test_search_is_deterministic(stats):
    for cfg in (config(), config(target_cut=0.55), config(target_snr_db=42.0)):
        a, b = search(stats, cfg), search(stats, cfg)
        assert a == b
        ma, mb = dict(a.metadata["search"]), dict(b.metadata["search"])
        ma.pop("search_seconds"), mb.pop("search_seconds")
        assert ma == mb


def test_trajectory_metadata(stats):
    info = search(stats, config(target_cut=0.5)).metadata["search"]
    for key in ("predicted_snr_db", "predicted_psnr_db", "predicted_final_mse", "predicted_cut", "lambda", "target",
                "predicted_rse", "flop_cut"):
        assert key in info, key
    assert info["lambda"] > 0 and np.isfinite(info["lambda"])
    assert info["config"]["allocation"] == "trajectory" and info["config"]["target_cut"] == 0.5
    # psnr follows from the mse and the sensitivity's pixel scale (0.5 in the synthetic one)
    assert info["predicted_psnr_db"] == pytest.approx(10 * np.log10(1 / (info["predicted_final_mse"] * 0.25)))
    assert info["predicted_snr_db"] == pytest.approx(10 * np.log10(1.0 / info["predicted_final_mse"]))


def test_full_steps_and_candidate_subsets_are_respected(stats):
    cfg = config(target_cut=0.3, full_steps=2, methods=("arrow:1/8", "cache"))
    plan = search(stats, cfg)
    used = set()
    for spec in plan.modules:
        for t in range(plan.num_steps):
            names = {str(m) for m in plan.step_methods(spec.name, t)}
            if t < 2:
                assert names == {"full"}
            used |= names
    assert used <= {"full", "arrow:0.125", "cache"} and used - {"full"}
    assert plan.metadata["search"]["predicted_cut"] >= 0.3


def test_step_factors_scale_the_damage():
    base = synthetic_stats(num_steps=T)
    plain = attach_sensitivity(base, seed=3)
    no_factor = search(plain, config(target_cut=0.5))
    factors = [1.0, 1e4, 1.0, 1.0, 1.0, 1.0]  # step 1 made very dangerous
    loud = attach_sensitivity(synthetic_stats(num_steps=T), seed=3, step_factor=factors)
    with_factor = search(loud, config(target_cut=0.5))
    step1 = lambda plan: sum(str(m) != "full" for s in plan.modules for m in plan.step_methods(s.name, 1))  # noqa
    assert step1(with_factor) < step1(no_factor)
    gain = loud.sensitivity.damage_gain(loud.modules[0].name, 1)
    assert np.allclose(gain.numpy(), 1e4 * loud.sensitivity.gain[loud.modules[0].name][1].numpy())


# ------------------------------------------------------------------------------------------ config and bad input
def test_config_rules_for_the_targets():
    with pytest.raises(ValueError, match="not both"):
        DiTFastAttnConfig(target_cut=0.5, target_snr_db=30.0)
    with pytest.raises(ValueError, match="need allocation='trajectory'"):
        DiTFastAttnConfig(allocation="local", target_cut=0.5)
    with pytest.raises(ValueError, match="need allocation='trajectory'"):
        DiTFastAttnConfig(allocation="local", target_snr_db=30.0)
    with pytest.raises(ValueError, match="allocation must be one of"):
        DiTFastAttnConfig(allocation="global")
    for bad in (0.0, 1.0, -0.2, True, "0.5"):
        with pytest.raises(ValueError, match="target_cut"):
            DiTFastAttnConfig(target_cut=bad)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="max_head_rse"):
            DiTFastAttnConfig(max_head_rse=bad)
    with pytest.raises(ValueError, match="calibration_passes"):
        DiTFastAttnConfig(calibration_passes=4)
    assert DiTFastAttnConfig().allocation == "trajectory"
    assert DiTFastAttnConfig().target() == ("cut", DEFAULT_TARGET_CUT)
    assert DiTFastAttnConfig(target_cut=0.6).target() == ("cut", 0.6)


def test_old_config_dicts_load_as_local():
    old = DiTFastAttnConfig(threshold=0.2).to_dict()
    old.pop("schema_version")
    old["version"] = 1  # written before one schema version: config version 1
    for key in ("allocation", "target_cut", "target_snr_db", "max_head_rse", "sensitivity_prompts",
                "calibration_passes"):
        old.pop(key)
    cfg = DiTFastAttnConfig.from_dict(old)
    assert cfg.allocation == "local" and cfg.threshold == 0.2
    old.pop("skip_steps"), old.pop("max_skip_run"), old.pop("verify_plans")  # written before these existed
    cfg = DiTFastAttnConfig.from_dict(old)
    assert (cfg.skip_steps, cfg.max_skip_run, cfg.verify_plans) == (False, 2, 1)  # searched as it was then
    new = DiTFastAttnConfig(target_cut=0.4)
    assert DiTFastAttnConfig.from_dict(new.to_dict()) == new  # an explicit allocation is kept


def test_trajectory_search_needs_a_sensitivity():
    bare = synthetic_stats(num_steps=T)
    with pytest.raises(ValueError, match="no sensitivity measurement.*allocation='local'"):
        search(bare, config())
    search(bare, config(allocation="local"))  # the paper's search reads the same statistics
    with pytest.raises(ValueError, match="granularity='layer'.*allocation='local'"):
        search(attach_sensitivity(bare), config(), granularity="layer")


def test_calibration_statistics_of_format_1_still_load(tmp_path):
    """Statistics saved before format 2 (no sensitivity, guided errors, passes or blocks) load as the local search's;
    an unknown future format is refused."""
    import json

    import torch

    from ditfa_optimum.calibrate import STATS_JSON, CalibrationStats

    stats = synthetic_stats()
    stats.save(tmp_path)
    info = json.loads((tmp_path / STATS_JSON).read_text())
    for key in ("sensitivity", "flow_lambda", "passes", "damage_scale", "blocks", "block_candidates"):
        info.pop(key, None)
    del info["schema_version"]
    info["format_version"] = 1  # schema 1: calibration format 1
    (tmp_path / STATS_JSON).write_text(json.dumps(info))
    old = CalibrationStats.load(tmp_path)
    assert old.sensitivity is None and old.passes == [] and old.damage_scale == 1.0 and old.blocks == []
    for spec in stats.modules:
        assert torch.equal(old.err[spec.name], stats.err[spec.name])
    local = DiTFastAttnConfig(num_inference_steps=old.num_steps, allocation="local", threshold=0.1)
    assert search(old, local) == search(stats, local)
    info["format_version"] = 3
    (tmp_path / STATS_JSON).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="format_version 3 is not a version any ditfa-optimum wrote"):
        CalibrationStats.load(tmp_path)


def test_solved_variants_are_reused_by_the_plans_built_from_them(stats, monkeypatch):
    """`alternatives` solves every variant; the plans `select_plan` builds from them (`search(..., problem=)`) are the
    ones a fresh search builds, without another bisection, and the problem is left as solving each variant left it
    (`describe` reads that)."""
    cfg = config(target_cut=0.4)
    problem = problem_of(stats, cfg)
    found = problem.alternatives(cfg)
    assert found
    fresh = {repr(v): search(stats, cfg, variant=v) for v, _, _ in found}
    solved = []
    monkeypatch.setattr(problem, "_solve_one", lambda *a, **k: solved.append(a))
    for variant, lam, choices in found:
        plan = search(stats, cfg, variant=variant, problem=problem)
        expected = fresh[repr(variant)]
        assert all(np.array_equal(plan.methods[n], expected.methods[n]) for n in plan.module_names)
        assert plan.metadata["search"]["variant"] == variant == problem.variant
        assert plan.metadata["search"]["head_weight"] == expected.metadata["search"]["head_weight"]
    assert solved == []  # nothing solved twice
    with pytest.raises(ValueError, match="TrajectoryProblem is for allocation='trajectory'"):
        search(stats, config(allocation="local"), problem=problem)


# ------------------------------------------------------------------------------------------ head-only variants
def test_head_only_search_offers_cache_rhythms(stats):
    """Without skipped steps the measured check gets, beside the model's choice, fixed rhythms of `cache` from the
    latest start that still meets the target."""
    cfg = config(target_cut=0.3, max_head_rse=1e9)  # no cap: every head may be cached
    problem = problem_of(stats, cfg)
    assert problem.step_damage is None and problem.cache_index is not None
    variants = problem.variants(cfg)
    assert variants[0] == {"head_weight": 1.0, "max_skip_run": cfg.max_skip_run}
    rhythms = [v for v in variants if "head_rhythm" in v]
    assert len(variants) == 1 + len(rhythms)
    assert [v["head_rhythm"] for v in rhythms] == list(TrajectoryProblem.HEAD_RHYTHMS)
    for v in rhythms:
        k, start = v["head_rhythm"], v["start"]
        lam, choices = problem.solve_variant(cfg, v)
        assert lam is None and problem.variant == v
        for n in problem.names:
            expected = [problem.full_index if t <= start or (t - start) % k == 0 else problem.cache_index
                        for t in range(T)]
            assert choices[n].tolist() == [[c] * choices[n].shape[1] for c in expected]
        assert problem.totals(choices)[0] >= 0.3 - 1e-9
        assert not problem._meets(cfg, problem._head_rhythm(k, start + 1))  # the latest start meeting the target


def test_a_head_rhythm_keeps_heads_full_where_the_cap_rules_cache_out(stats):
    cfg = config(target_cut=0.2, max_head_rse=0.01)
    problem = problem_of(stats, cfg)
    choices = problem._head_rhythm(2, 0)
    for n in problem.names:
        cached = choices[n] == problem.cache_index
        assert cached.any() and problem.allowed[n][..., problem.cache_index][cached].all()
        assert not cached[0::2].any()  # steps 0, 2, 4 computed
        assert (choices[n][1::2] == np.where(problem.allowed[n][1::2, :, problem.cache_index], problem.cache_index,
                                             problem.full_index)).all()


def test_head_rhythm_variants_are_refused_where_they_do_not_apply(stats):
    cfg = config(target_cut=0.3)
    problem = problem_of(stats, cfg)
    with pytest.raises(ValueError, match="k >= 2"):
        problem.solve_variant(cfg, {"head_rhythm": 1, "start": 2})
    with pytest.raises(ValueError, match="k >= 2 after a start step inside the plan"):
        problem.solve_variant(cfg, {"head_rhythm": 3, "start": T})
    no_cache = config(target_cut=0.3, methods=("arrow:1/8", "cfg_share"))
    stats_nc = attach_sensitivity(synthetic_stats(num_steps=T, methods=("arrow:1/8", "cfg_share")))
    plain = problem_of(stats_nc, no_cache)
    assert plain.variants(no_cache) == [{"head_weight": 1.0, "max_skip_run": no_cache.max_skip_run}]
    with pytest.raises(ValueError, match="no `cache` candidate"):
        plain.solve_variant(no_cache, {"head_rhythm": 3, "start": 1})


def test_a_quality_target_takes_the_earliest_rhythm_start_that_keeps_it(stats):
    """For ``target_snr_db`` a rhythm starts as early as the predicted quality allows (the most saving)."""
    cfg = config(target_snr_db=20.0, max_head_rse=1e9)
    problem = problem_of(stats, cfg)
    rhythms = [v for v in problem.variants(cfg) if "head_rhythm" in v]
    assert rhythms
    for v in rhythms:
        k, start = v["head_rhythm"], v["start"]
        assert problem._meets(cfg, problem._head_rhythm(k, start))
        assert start == cfg.full_steps - 1 or not problem._meets(cfg, problem._head_rhythm(k, start - 1))
