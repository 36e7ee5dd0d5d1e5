"""Plan search: one attention method per (module, step, head), from calibration statistics.

Two allocations of the error budget (`DiTFastAttnConfig.allocation`):

**trajectory** (default). Every candidate ``c`` of head ``h`` of module ``m`` at step ``t`` has a local squared error
``err`` (from calibration) and the head has a propagation gain ``g`` (`ditfa_optimum.sensitivity`: how much a unit of
squared error there moves the final latents). Its predicted damage to the final latents is ``g * err``. One global
allocation over the whole trajectory::

    maximise   sum saved[c]                   subject to   sum g * err[c] <= E     (or: saving >= target, least damage)

is solved through its Lagrangian: each head independently takes ``argmax_c saved[c] - lam * g * err[c]`` among its
available candidates (local RSE within ``max_head_rse``), and ``lam`` is found by bisection so that the plan meets
``target_cut`` or ``target_snr_db``. Exact for the Lagrangian relaxation (the plans it returns are the optimal ones at
their own damage), milliseconds for a whole model.

**local** (the paper's). For one module at one step with heads ``h`` and candidate methods ``c`` (``full`` always among them)::

    maximise   sum_{h,c} saved[c] * x[h,c]
    subject to sum_c x[h,c] = 1                        for every head h   (exactly one method per head)
               sum_{h,c} rse[h,c] * x[h,c] <= threshold_t * num_heads   (the module's error budget at step t)
               x[h,c] in {0, 1};  x[h,c] = 0 where the candidate is unavailable (rse = inf) or saves nothing

``rse`` is the local metric measured by calibration, ``saved`` the per-head cost the candidate saves against `full`
(analytic FLOPs or measured time), ``threshold_t`` the config's `step_thresholds` (the threshold at every step unless
``budget_schedule`` moves budget to later steps). Solved exactly by HiGHS through `scipy.optimize.milp` (relative MIP gap 0), so the
result is the true optimum: a larger threshold never gives a smaller saving on the same statistics.

``granularity="layer"`` is the DiTFastAttn (v1) baseline: one method for all heads of a module at a step, the one
saving the most whose mean head error fits the same budget (`solve_layer`).

Everything here is a pure function of (stats, config): same inputs, identical plan.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch

from .calibrate import CalibrationStats
from .config import DiTFastAttnConfig
from .methods import make_method
from .plan import CompressionPlan

logger = logging.getLogger(__name__)


def solve_heads(rse, saved, budget: float, full_index: int = 0) -> np.ndarray:
    """One method per head maximising the total saving within the error budget.

    Args:
        rse: ``[H, C]`` error of candidate ``c`` on head ``h`` (``inf`` = not available for this head).
        saved: ``[C]`` cost saved per head by each candidate (``full``: 0).
        budget: the bound on the summed error of the chosen methods (>= 0).
        full_index: the column of `full` (error 0, always available).

    Returns:
        ``[H]`` int64 column index chosen per head.

    Example:
        >>> solve_heads([[0.0, 0.1, 0.3], [0.0, 0.2, 0.25]], [0.0, 0.8, 1.0], budget=0.35).tolist()
        [2, 0]
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    rse = np.array(rse, dtype=np.float64, copy=True)
    saved = np.asarray(saved, dtype=np.float64)
    if rse.ndim != 2 or saved.shape != (rse.shape[1],):
        raise ValueError(f"rse must be [heads, candidates] and saved [candidates], got {rse.shape} and {saved.shape}")
    if not budget >= 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if np.isnan(rse).any():
        raise ValueError("rse holds NaN; the calibration statistics are broken (a non-finite attention output?)")
    H, C = rse.shape
    rse[:, full_index] = 0.0
    allowed = np.isfinite(rse) & (saved[None, :] > 0) & (rse <= budget)
    allowed[:, full_index] = True
    choice = np.full(H, full_index, dtype=np.int64)
    if not allowed.sum(1).max(initial=0) > 1:
        return choice

    # if every head can take its most saving option within budget, that is the optimum: no solver needed
    score = np.where(allowed, saved[None, :], -np.inf)
    best = np.lexsort((np.where(allowed, rse, np.inf), -score), axis=1)[:, 0]  # max saving, then least error
    if rse[np.arange(H), best].sum() <= budget:
        return best

    heads, cands = np.nonzero(allowed)
    n = heads.size
    scale = saved.max()
    one_per_head = np.zeros((H, n))
    one_per_head[heads, np.arange(n)] = 1.0
    errors = rse[heads, cands][None, :]
    limit = budget
    for _ in range(4):  # HiGHS accepts constraint violations up to its feasibility tolerance; tighten until exact
        result = milp(-saved[cands] / scale, integrality=np.ones(n), bounds=Bounds(0, 1),
                      constraints=[LinearConstraint(one_per_head, 1, 1), LinearConstraint(errors, -np.inf, limit)],
                      options={"mip_rel_gap": 0.0})
        if result.x is None:
            raise RuntimeError(f"the head-assignment integer program failed ({result.message}); please report this "
                               "with the calibration statistics")
        x = np.round(result.x).astype(bool)
        choice = np.full(H, full_index, dtype=np.int64)
        choice[heads[x]] = cands[x]
        total = rse[np.arange(H), choice].sum()
        if total <= budget:
            return choice
        limit -= (total - budget) + 1e-12
    raise RuntimeError(f"the integer program's solution exceeds the budget ({total} > {budget}) after tightening")


def lagrangian_choice(damage, saved, allowed, lam: float, full_index: int = 0) -> np.ndarray:
    """Per head, the candidate maximising ``saved - lam * damage`` among the allowed ones (ties: less damage).

    Args:
        damage: ``[..., H, C]`` predicted damage of each candidate (``gain * squared error``).
        saved: ``[C]`` (or broadcastable) cost each candidate saves.
        allowed: ``[..., H, C]`` bool; the `full` column is always allowed.
        lam: the price of damage in units of saved cost (``inf``: every head full).

    Example:
        >>> lagrangian_choice([[0.0, 1.0, 4.0]], [0.0, 1.0, 2.0], [[True, True, True]], lam=0.4).tolist()
        [1]
    """
    damage = np.asarray(damage, dtype=np.float64)
    allowed = np.array(allowed, dtype=bool, copy=True)
    allowed[..., full_index] = True
    if np.isinf(lam):
        return np.full(damage.shape[:-1], full_index, dtype=np.int64)
    value = np.where(allowed, np.asarray(saved, dtype=np.float64) - lam * np.where(allowed, damage, 0.0), -np.inf)
    best = value.max(-1, keepdims=True)
    ties = allowed & (value >= best - 1e-12 * np.maximum(1.0, np.abs(best)))
    return np.where(ties, damage, np.inf).argmin(-1)


def allowed_candidates(rse, saved, max_head_rse: float, full_index: int = 0) -> np.ndarray:
    """``[..., H, C]`` bool: measured, within the per-head cap and saving something (plus `full`)."""
    rse = np.asarray(rse, dtype=np.float64)
    allowed = np.isfinite(rse) & (rse <= max_head_rse) & (np.asarray(saved)[None, :] > 0)
    allowed[..., full_index] = True
    return allowed


def choose_step(rse, saved, config: DiTFastAttnConfig, step: int, *, damage=None, lam: float | None = None,
                full_index: int = 0) -> np.ndarray:
    """The one chooser of a step's methods, shared by calibration (while choices flow) and `search`.

    Args:
        rse: ``[H, C]`` local relative error of each candidate (``inf``: unavailable).
        saved: ``[C]`` cost saved per head.
        config: allocation, per-head cap, full steps and (local) the step's threshold.
        step: the denoising step.
        damage: ``[H, C]`` predicted damage (trajectory allocation).
        lam: the price of damage (trajectory allocation; None or inf: every head full).

    Returns:
        ``[H]`` candidate index per head.
    """
    rse = np.asarray(rse, dtype=np.float64)
    H = rse.shape[0]
    if step < config.full_steps:
        return np.full(H, full_index, dtype=np.int64)
    allowed = allowed_candidates(rse, saved, config.max_head_rse, full_index)
    if config.allocation == "local":
        budget = config.step_thresholds()[step] * H
        return solve_heads(np.where(allowed, rse, np.inf), saved, budget, full_index)
    if lam is None or damage is None:
        return np.full(H, full_index, dtype=np.int64)
    return lagrangian_choice(damage, saved, allowed, lam, full_index)


def solve_layer(rse, saved, budget: float, full_index: int = 0) -> np.ndarray:
    """One method for every head (layer-wise, DiTFastAttn v1): the largest saving whose summed error fits the budget.

    Same arguments and result shape as `solve_heads`; ties go to the lower candidate index.
    """
    rse, saved = np.asarray(rse, dtype=np.float64), np.asarray(saved, dtype=np.float64)
    fits = (rse.sum(0) <= budget) & (saved > 0)
    best = int(np.argmax(np.where(fits, saved, -np.inf))) if fits.any() else full_index
    return np.full(rse.shape[0], best, dtype=np.int64)


SOLVERS = {"head": solve_heads, "layer": solve_layer}


def selection_key(config: DiTFastAttnConfig) -> str:
    """The key of `CalibrationStats.selections` for ``config``: every setting that shapes the trajectory search's
    alternatives (target, candidates, caps, skipped steps, blocks, cost model)."""
    kind, value = config.target()
    fields = {"target": {kind: round(float(value), 9)}, "methods": list(config.methods),
              "max_head_rse": config.max_head_rse, "full_steps": config.full_steps, "skip_steps": config.skip_steps,
              "max_skip_run": config.max_skip_run, "block_methods": list(config.block_methods),
              "cost_model": config.cost_model}
    return json.dumps(fields, sort_keys=True)


def _weight(value) -> float:
    return np.inf if value is None else float(value)


def search(stats: CalibrationStats, config: DiTFastAttnConfig, *, threshold: float | None = None,
           granularity: str = "head", variant: dict | None = None,
           problem: "TrajectoryProblem | None" = None) -> CompressionPlan:
    """The plan for ``config`` on ``stats``; pure and deterministic (see the module docstring).

    Args:
        stats: from `ditfa_optimum.calibrate.calibrate` (with a sensitivity for the trajectory allocation).
        config: allocation and its target (``target_cut`` / ``target_snr_db``, or ``threshold`` for "local"),
            candidate methods (a subset of the calibrated ones), per-head cap, cost model, full steps.
        threshold: override ``config.threshold`` (local allocation; for sweeps over the same statistics).
        granularity: "head" (one method per head: the product) or "layer" (one per module and step: the DiTFastAttn
            v1 baseline the quality benchmark compares against; local allocation only).
        variant: trajectory allocation: build this one of `TrajectoryProblem.variants` (default: the one a
            measurement selected for ``config``, `CalibrationStats.selections`, else the error model's choice).
        problem: the `TrajectoryProblem` of these ``stats`` and ``config`` when the caller has one: variants it has
            solved (`TrajectoryProblem.alternatives`) are not solved again.

    Returns:
        A `CompressionPlan` whose ``metadata["search"]`` holds the config, the predicted mean RSE per module and step
        (``predicted_rse``), the attention-FLOP cut, the search time and, for the trajectory allocation, the
        predicted quality (``predicted_snr_db``, ``predicted_psnr_db`` for pixel-space models) and ``lambda``.

    Example:
        >>> plan = search(stats, DiTFastAttnConfig(target_cut=0.6))          # doctest: +SKIP
    """
    start = time.perf_counter()
    if granularity not in SOLVERS:
        raise ValueError(f"granularity must be one of {sorted(SOLVERS)}, got {granularity!r}")
    if threshold is not None:
        config = config.replace(threshold=threshold)
    if config.num_inference_steps != stats.num_steps:
        raise ValueError(f"the statistics cover {stats.num_steps} steps but the config asks for "
                         f"{config.num_inference_steps}; calibrate again with num_inference_steps="
                         f"{config.num_inference_steps}")
    unused = unused_candidates(stats, config)
    full_index = stats.candidates.index("full")
    methods = [make_method(n) for n in stats.candidates]
    if problem is not None and config.allocation != "trajectory":
        raise ValueError(f"a TrajectoryProblem is for allocation='trajectory', not {config.allocation!r}")
    if problem is None and config.allocation == "trajectory":
        problem = TrajectoryProblem.from_stats(stats, config)
    if problem is not None and granularity != "head":
        raise ValueError("granularity='layer' is the paper-style baseline; use it with allocation='local'")

    extra = {}
    if problem is not None:
        selected = stats.selections.get(selection_key(config)) if variant is None else None
        lam, choices = problem.solve(config, variant if selected is None else selected["variant"])
        extra = problem.describe(choices, lam, config)
        if selected is not None:
            extra["selected_by_measurement"] = selected
    else:
        choices = {}
        for spec in stats.modules:
            rse = stats.rse(spec.name, config.error_normalization).numpy() + unused  # [T, H, C]
            saved = stats.saved(spec.name, config.cost_model).numpy()  # [C]
            choice = np.full(rse.shape[:2], full_index, dtype=np.int64)
            for step in range(config.full_steps, stats.num_steps):
                if granularity == "layer":  # the per-head cap applies here too: a capped head rules the method out
                    capped = np.where(allowed_candidates(rse[step], saved, config.max_head_rse, full_index),
                                      rse[step], np.inf)
                    choice[step] = solve_layer(capped, saved, config.step_thresholds()[step] * spec.num_heads,
                                               full_index)
                else:
                    choice[step] = choose_step(rse[step], saved, config, step, full_index=full_index)
            choices[spec.name] = choice

    ids, params, predicted = {}, {}, {}
    for spec in stats.modules:
        choice = choices[spec.name]
        rse = stats.rse(spec.name, config.error_normalization).numpy()
        chosen_rse = np.where(choice == full_index, 0.0, np.take_along_axis(rse, choice[..., None], axis=2)[..., 0])
        predicted[spec.name] = chosen_rse.mean(1).tolist()
        ids[spec.name] = torch.tensor([[methods[c].method_id for c in row] for row in choice], dtype=torch.int16)
        params[spec.name] = torch.tensor([[methods[c].param for c in row] for row in choice], dtype=torch.float64)

    blocks = {}
    if problem is not None and problem.blocks:
        from .methods import make_block_method

        ids_of = [make_block_method(n).method_id for n in stats.block_candidates]
        blocks = {b: torch.tensor([ids_of[c] for c in choices[f"block:{b}"]], dtype=torch.int16)
                  for b in problem.blocks}
    skipped = [] if problem is None or "steps" not in choices else np.nonzero(choices["steps"])[0].tolist()
    plan = CompressionPlan(stats.modules, ids, params, block_size=stats.block_size, model_class=stats.model_class,
                           blocks=stats.blocks if blocks or (problem is not None and problem.step_damage is not None)
                           else [], block_methods=blocks,
                           skipped_steps=skipped)
    report = plan.flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg)
    if plan.blocks:
        extra["whole_cut"] = plan.transformer_flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg).cut
    budget = ("one global allocation: per head argmax saved - lambda * gain * squared error, lambda meeting the "
              "target" if problem is not None else
              "sum over heads of RSE <= step threshold * num_heads, per module and step")
    plan.metadata["search"] = {
        "config": config.to_dict(),
        "allocation": config.allocation,
        "threshold": config.threshold,
        "granularity": granularity,
        "budget": budget,
        "step_thresholds": config.step_thresholds(),
        "image_tokens": stats.image_tokens,
        "text_tokens": stats.text_tokens,
        "cfg": stats.cfg,
        "num_prompts": stats.num_prompts,
        "predicted_rse": predicted,
        "flop_cut": report.cut,
        "calibration_seconds": stats.seconds,
        **extra,
        "search_seconds": time.perf_counter() - start,
    }
    return plan


def unused_candidates(stats: CalibrationStats, config: DiTFastAttnConfig) -> np.ndarray:
    """``[C]``: 0 for the calibrated candidates the config searches, ``inf`` for the others (added to an RSE, it rules
    them out). Raises when the config asks for candidates the statistics do not have."""
    names = [str(m) for m in config.candidates()]
    missing = [n for n in names if n not in stats.candidates]
    if missing:
        raise ValueError(f"candidate methods {missing} were not calibrated (the statistics have {stats.candidates}); "
                         "calibrate with them or leave them out of config.methods")
    unused = np.full(len(stats.candidates), np.inf)
    unused[[stats.candidates.index(n) for n in names]] = 0.0
    return unused


class TrajectoryProblem:
    """The global allocation's data, flattened over (module, step, head): damage, savings, what is allowed."""

    def __init__(self, names, damage, saved, allowed, dense_cost, sensitivity, full_index, blocks=None,
                 cache_index=None, full_steps=1, max_skip_run=2, step_damage=None, step_saved=0.0):
        self.names = names  # module names, in order
        self.damage = damage  # per module [T, H, C]
        self.saved = saved  # per module [C]
        self.allowed = allowed  # per module [T, H, C]
        self.dense_cost = dense_cost  # total cost of the dense model (all modules, steps, heads; + blocks' linears)
        self.sensitivity = sensitivity
        self.full_index = full_index
        #: block level: name -> (attention module names, skip damage [T, Cb], skip allowed [T, Cb], saved by a skip)
        self.blocks = blocks or {}
        self.cache_index = cache_index  # the candidate column that reads the previous step's output
        self.full_steps = full_steps
        self.max_skip_run = max_skip_run
        self.damage_scale = 1.0
        #: whole skipped steps: ``[T, T, T]`` damage of skipping ``b+1..e`` from anchors ``a, b`` (None: not searched)
        self.step_damage = step_damage
        self.step_saved = step_saved  # the cost of one whole step (every block, dense)
        #: the head damages the choices are priced with (`damage` times `head_weight`, see `solve`); `totals` always
        #: counts the true `damage`
        self.priced = damage
        self.priced_allowed = allowed
        self.head_weight = 1.0
        self.run_limit = max_skip_run  # the longest skipped run while choosing (`solve_variant`)
        self.variant: dict = {"head_weight": 1.0, "max_skip_run": max_skip_run}  # the last `solve_variant`
        #: `solve_variant`'s results by (variant, target): `alternatives` solves every variant once, and building the
        #: plans of some of them again (`ditfa_optimum.calibrate.select_plan`) reuses them
        self._solved: dict[str, tuple[float | None, dict]] = {}

    def weigh_heads(self, weight: float) -> None:
        """Price head damage ``weight`` times its prediction (``inf``: heads stay full) while choosing."""
        self.head_weight = weight
        full = np.arange(len(self.saved[self.names[0]])) == self.full_index if self.names else None
        self.priced = {n: d * (1.0 if np.isinf(weight) else weight) for n, d in self.damage.items()}
        self.priced_allowed = {n: a & full if np.isinf(weight) else a for n, a in self.allowed.items()}

    @classmethod
    def from_stats(cls, stats: CalibrationStats, config: DiTFastAttnConfig) -> "TrajectoryProblem":
        sens = stats.sensitivity
        if sens is None:
            raise ValueError("these statistics hold no sensitivity measurement, which the trajectory allocation "
                             "needs; calibrate with allocation='trajectory' or search with allocation='local'")
        full_index = stats.candidates.index("full")
        unused = unused_candidates(stats, config)
        names, damage, saved, allowed, dense = [], {}, {}, {}, 0.0
        for spec in stats.modules:
            err = stats.err[spec.name].numpy()
            guided = stats.err_guided.get(spec.name, stats.err[spec.name]).numpy() / max(stats.num_prompts, 1)
            gain = np.stack([sens.damage_gain(spec.name, t).numpy() for t in range(stats.num_steps)])[..., None]
            rse = stats.rse(spec.name, "head").numpy() + unused
            cost = stats.cost(spec.name, config.cost_model).numpy()
            s = stats.saved(spec.name, config.cost_model).numpy()
            ok = allowed_candidates(rse, s, config.max_head_rse, full_index)
            ok[:config.full_steps] = False
            ok[..., full_index] = True
            names.append(spec.name)
            damage[spec.name] = np.where(ok, stats.damage_scale * gain * np.where(np.isfinite(guided), guided, 0.0),
                                         0.0)
            saved[spec.name] = s
            allowed[spec.name] = ok
            dense += float(cost[full_index]) * err.shape[0] * err.shape[1]
        blocks = {}
        step_damage, step_saved = None, 0.0
        if config.skip_steps or (config.skip_steps is None and "transformer" in stats.step_damage):
            if "transformer" not in stats.step_damage or not stats.blocks:
                raise ValueError("these statistics do not price skipped steps; calibrate with skip_steps=True (or "
                                 "search with skip_steps=False)")
            step_damage = stats.damage_scale * stats.step_damage["transformer"].numpy()
            step_saved = sum(float(stats.block_cost[b.name].sum()) for b in stats.blocks)
            if step_damage.shape[0] != stats.num_steps:
                raise ValueError(f"the skipped-step prices cover {step_damage.shape[0]} steps, the statistics "
                                 f"{stats.num_steps}")
            if not config.block_methods:
                dense += sum(float(stats.block_cost[b.name][1:].sum()) for b in stats.blocks) * stats.num_steps
        if config.block_methods and stats.blocks:
            use = [stats.block_candidates.index(m) for m in config.block_methods if m in stats.block_candidates]
            for b in stats.blocks:
                cost = stats.block_cost[b.name].numpy()
                err = stats.block_err[b.name].numpy()
                ref = stats.block_ref[b.name].numpy()[:, None]
                rse = np.where(ref > 0, err / np.maximum(ref, 1e-300), np.where(err > 0, np.inf, 0.0))
                guided = stats.block_err_guided[b.name].numpy() / max(stats.num_prompts, 1)
                gain = np.array([sens.block_damage_gain(b.name, t) for t in range(stats.num_steps)])[:, None]
                ok = np.zeros_like(err, dtype=bool)
                ok[:, use] = np.isfinite(rse[:, use]) & (rse[:, use] <= config.max_head_rse)
                ok[:config.full_steps] = False
                damage_b = stats.damage_scale * gain * np.where(np.isfinite(guided), guided, 0.0)
                blocks[b.name] = (tuple(b.attention), np.where(ok, damage_b, 0.0), ok, float(cost.sum()))
                dense += float(cost[1:].sum()) * stats.num_steps  # the linears (attention is counted per module)
        cache = next((i for i, n in enumerate(stats.candidates) if make_method(n).needs_previous_output), None)
        problem = cls(names, damage, saved, allowed, dense, sens, full_index, blocks, cache, config.full_steps,
                      config.max_skip_run, step_damage, step_saved)
        problem.damage_scale = stats.damage_scale
        return problem

    def choose(self, lam: float) -> dict[str, np.ndarray]:
        """Per module ``[T, H]`` head choices; with blocks also ``"block:<name>"`` -> ``[T]`` (0 = compute, else the
        column of the skip candidate); with skipped steps also ``"steps"`` -> ``[T]`` bool (True: skipped)."""
        heads = {n: lagrangian_choice(self.priced[n], self.saved[n], self.priced_allowed[n], lam, self.full_index)
                 for n in self.names}
        if self.step_damage is not None:
            # (block choices change head arrays in place: the free values are priced on a copy)
            free = self._step_values(self._with_blocks({n: h.copy() for n, h in heads.items()}, lam, ()), lam)
            limited = self._restricted_heads(lam)
            restricted = self._step_values(limited, lam)
            skipped = self._choose_steps(free, restricted, lam)
            T = len(free)
            after = sorted({t + 1 for t in skipped if t + 1 < T} - set(skipped))
            anchors = self.anchors(skipped, T)
            for n in self.names:
                heads[n][after] = limited[n][after]
                heads[n][sorted(set(skipped) | anchors)] = self.full_index
            heads = self._with_blocks(heads, lam, skipped, anchors)
            heads["steps"] = np.isin(np.arange(len(free)), sorted(skipped))
            return heads
        return self._with_blocks(heads, lam, ())

    def _with_blocks(self, heads: dict, lam: float, skipped, anchors=()) -> dict:
        for block, (modules, damage, ok, saved) in self.blocks.items():
            heads[f"block:{block}"] = self._choose_block(block, modules, damage, ok, saved, lam, heads, skipped,
                                                         anchors)
        return heads

    def _restricted_heads(self, lam: float) -> dict[str, np.ndarray]:
        """Head choices without the candidate that reads the previous step (after a skipped step)."""
        out = {}
        for n in self.names:
            allowed = self.priced_allowed[n].copy()
            if self.cache_index is not None:
                allowed[..., self.cache_index] = False
            out[n] = lagrangian_choice(self.priced[n], self.saved[n], allowed, lam, self.full_index)
        return out

    def _step_values(self, choices: dict, lam: float) -> np.ndarray:
        """``[T]``: what the heads (and block skips) of each step save minus ``lam`` times their damage."""
        T = self.num_steps
        value = np.zeros(T)
        skipped = {}
        for block, (modules, block_damage, _, block_saved) in self.blocks.items():
            c = choices.get(f"block:{block}")
            if c is None:
                continue
            steps = c > 0
            value += np.where(steps, block_saved - lam * block_damage[np.arange(T), c], 0.0)
            for m in modules:
                skipped[m] = steps
        for n in self.names:
            c = choices[n]
            per = (self.saved[n][c] - lam * np.take_along_axis(self.priced[n], c[..., None], -1)[..., 0]).sum(1)
            value += np.where(skipped.get(n, np.zeros(T, dtype=bool)), 0.0, per)
        return value

    def _choose_steps(self, free: np.ndarray, restricted: np.ndarray, lam: float) -> list[int]:
        """The steps to skip whole: a dynamic program over the computed steps maximising the saved cost minus ``lam``
        times the damage (runs of at most ``max_skip_run`` skipped steps; the first ``full_steps`` and step 0
        computed). A computed step's value depends on its neighbours: the two computed steps before a skipped run
        are its anchors and compute everything (an error there is extrapolated into every skipped step, amplified);
        a step right after a skipped one takes its ``restricted`` value (nothing reads the skipped step); any other
        its ``free`` value. State: (second-last computed, last computed, whether the second-last follows a skip)."""
        T, R, D = len(free), self.run_limit, self.step_damage
        start = max(self.full_steps, 1) - 1

        def value(x: int, after_skip: bool, anchor: bool) -> float:
            if x < self.full_steps or anchor:
                return 0.0
            return float(restricted[x] if after_skip else free[x])

        best = {(max(start - 1, 0), start, False): (0.0, None)}  # the steps before full_steps are worth 0
        end, end_value = None, -np.inf
        for b in range(start, T):
            for state in sorted(k for k in best if k[1] == b):
                a, _, after_a = state
                total = best[state][0]
                for n in range(b + 1, min(T, b + R + 1) + 1):
                    v = total
                    run = n > b + 1
                    if run:
                        damage = D[a, b, n - 1]
                        if not np.isfinite(damage):
                            continue
                        v += (n - b - 1) * self.step_saved - lam * damage
                    if a != b:  # a's neighbours are known now: it anchors a run after itself or after b
                        v += value(a, after_a, anchor=b > a + 1 or run)
                    if n == T:  # b is the last computed step: it anchors the final run, if any
                        v += value(b, a != b and b > a + 1, anchor=run)
                        if v > end_value:
                            end, end_value = state, v
                        continue
                    key = (b, n, a != b and b > a + 1)
                    if key not in best or v > best[key][0]:
                        best[key] = (v, state)
        computed, state = [], end
        while state is not None:
            computed.append(state[1])
            state = best[state][1]
        ran = set(computed) | set(range(start + 1))
        return [t for t in range(T) if t not in ran]

    @staticmethod
    def anchors(skipped, T: int) -> set[int]:
        """The computed steps a skipped run extrapolates from (the last two computed before each run)."""
        ran = [t for t in range(T) if t not in set(skipped)]
        out = set()
        for i, b in enumerate(ran):
            nxt = ran[i + 1] if i + 1 < len(ran) else T
            if nxt > b + 1:
                out.update(ran[max(0, i - 1):i + 1])
        return out

    def _choose_block(self, block, modules, damage, ok, saved, lam, heads, skipped_steps=(),
                      anchors=()) -> np.ndarray:
        """Run or skip the block at each step, in step order: a skipped step forbids `cache` heads at the next.
        ``skipped_steps``: whole steps skipped (the block does not run; the step after and the ``anchors`` of a
        skipped run compute it)."""
        T = damage.shape[0]
        choice = np.zeros(T, dtype=np.int64)
        skipped, run = False, 0
        for t in range(T):
            if t in skipped_steps:
                skipped, run = True, run + 1
                continue
            if t - 1 in skipped_steps or t in anchors:
                skipped, run = False, 0  # right after a skipped step and at anchors the block computes
                continue
            value = 0.0
            for m in modules:
                if skipped and self.cache_index is not None:
                    allowed = self.priced_allowed[m][t].copy()
                    allowed[:, self.cache_index] = False
                    heads[m][t] = lagrangian_choice(self.priced[m][t], self.saved[m], allowed, lam, self.full_index)
                rows = np.arange(heads[m].shape[1])
                c = heads[m][t]
                value += float((self.saved[m][c] - lam * self.priced[m][t][rows, c]).sum())
            skip = np.where(ok[t], saved - lam * damage[t], -np.inf)
            best = int(np.argmax(skip)) if ok[t].any() else 0
            skipped = bool(t >= self.full_steps and ok[t].any() and skip[best] > value and run < self.max_skip_run)
            run = run + 1 if skipped else 0
            if skipped:
                choice[t] = best
                for m in modules:
                    heads[m][t] = self.full_index  # the block does not run: its heads' methods do not matter
        return choice

    def totals(self, choices: dict[str, np.ndarray]) -> tuple[float, float]:
        """(cut of the cost model, predicted squared change of one sample's final latents)."""
        saved = damage = 0.0
        skipped = {}
        whole = choices.get("steps")
        if whole is not None and whole.any():
            T = len(whole)
            saved += self.step_saved * float(whole.sum())
            ran = [t for t in range(T) if not whole[t]]
            for i, b in enumerate(ran):
                e = (ran[i + 1] if i + 1 < len(ran) else T) - 1
                if e > b:
                    a = ran[i - 1] if i > 0 else b
                    damage += float(self.step_damage[a, b, e])
        for block, (modules, block_damage, _, block_saved) in self.blocks.items():
            c = choices[f"block:{block}"]
            steps = c > 0
            saved += block_saved * float(steps.sum())
            damage += float(block_damage[np.arange(len(c)), c][steps].sum())
            for m in modules:
                skipped[m] = steps | (whole if whole is not None else False)
        for n in self.names:
            c = choices[n]
            run = ~skipped.get(n, whole if whole is not None else np.zeros(c.shape[0], dtype=bool))
            saved += float(self.saved[n][c][run].sum())
            damage += float(np.take_along_axis(self.damage[n], c[..., None], -1)[..., 0][run].sum())
        return saved / self.dense_cost, damage

    def snr_db(self, damage: float) -> float:
        return self.sensitivity.snr_db(self.sensitivity.predicted_mse(damage))

    #: head-damage weights `solve` tries (see there)
    HEAD_WEIGHTS = (1.0, 4.0, np.inf)
    #: head-only plans: the rhythms of `cache` that `variants` offers (one computed step in every k)
    HEAD_RHYTHMS = (2, 3, 4)

    def variants(self, config: DiTFastAttnConfig) -> list[dict]:
        """The plan settings `solve` and `alternatives` explore, as JSON-ready dicts:

        * ``{"head_weight": w, "max_skip_run": r}``: the Lagrangian search with head damage priced ``w`` times
          (1, 4, or None = infinitely: heads full) and skipped runs of up to ``r`` steps (``max_skip_run`` or one
          fewer);
        * ``{"rhythm": k, "start": s}``: with skipped steps, the fixed rhythm of the peers' caches (diffusers'
          TaylorSeer, cache-dit): steps ``0 .. s`` computed, then one step computed in every ``k`` (``k - 1``
          skipped between, ``k - 1 <= max_skip_run``), every head full, with the latest start ``s`` that meets a
          ``target_cut`` (the earliest that meets a ``target_snr_db``).

        Without skipped steps (head methods only), beside ``{"head_weight": 1, "max_skip_run": max_skip_run}``, where
        `cache` is a candidate: ``{"head_rhythm": k, "start": s}``, steps ``0 .. s`` full, then every head computed
        at one step in every ``k`` and `cache` between (where the per-head cap allows it), started as the fixed
        rhythms above. Cached outputs refreshed on a fixed rhythm change the images far less than the error
        model predicts (it prices each cached step alone, along the flow of its own plan): on mini-mmdit at a 60%
        attention cut the model's plan measured 25.6 dB, one computed step in 3 from step 2 on 31.3 dB
        (docs/search.md). The measured check (`ditfa_optimum.calibrate.select_plan`) decides between them."""
        if self.step_damage is None:
            out = [{"head_weight": 1.0, "max_skip_run": self.max_skip_run}]
            if self.cache_index is None:
                return out
            for k in self.HEAD_RHYTHMS:
                start = self._rhythm_start(config, lambda s: self._head_rhythm(k, s), self.full_steps - 1,
                                           self.num_steps - 2)
                if start is not None:
                    out.append({"head_rhythm": k, "start": start})
            return out
        runs = sorted({self.max_skip_run, max(1, self.max_skip_run - 1)}, reverse=True)
        out = [{"head_weight": _finite(w), "max_skip_run": r} for w in self.HEAD_WEIGHTS for r in runs]
        for k in range(2, self.max_skip_run + 2):
            start = self._rhythm_start(config, lambda s: self._rhythm(k, s), max(self.full_steps, 1) - 1,
                                       self.num_steps - 2)
            if start is not None:
                out.append({"rhythm": k, "start": start})
        return out

    def _rhythm_start(self, config: DiTFastAttnConfig, build, first: int, last: int) -> int | None:
        """The start step in ``first .. last`` of the rhythm ``build(start)`` for the target: the latest one that
        meets a ``target_cut`` (the least damage), the earliest one that meets a ``target_snr_db`` (the most saving);
        None when no start meets it."""
        starts = range(last, first - 1, -1) if config.target()[0] == "cut" else range(first, last + 1)
        return next((s for s in starts if self._meets(config, build(s))), None)

    @property
    def num_steps(self) -> int:
        return self.step_damage.shape[0] if self.step_damage is not None else next(iter(self.damage.values())).shape[0]

    @staticmethod
    def _off_beats(k: int, start: int, T: int) -> np.ndarray:
        """``[T]`` bool: the steps after ``start`` that a rhythm of one computed step in every ``k`` (counted from
        ``start``) does not compute."""
        t = np.arange(T)
        return (t > start) & ((t - start) % k != 0)

    def _rhythm(self, k: int, start: int) -> dict[str, np.ndarray]:
        """Every head full; steps ``start + 1 ..`` skipped except every ``k``-th (counted from ``start``)."""
        T = self.num_steps
        heads = {n: np.full(self.damage[n].shape[:2], self.full_index, dtype=np.int64) for n in self.names}
        for block in self.blocks:
            heads[f"block:{block}"] = np.zeros(T, dtype=np.int64)
        heads["steps"] = self._off_beats(k, start, T)
        return heads

    def _head_rhythm(self, k: int, start: int) -> dict[str, np.ndarray]:
        """Steps ``0 .. start`` full; after it every head computed at every ``k``-th step (counted from ``start``)
        and cached between, where the cap allows `cache` (elsewhere full); blocks computed."""
        T = self.num_steps
        cached = self._off_beats(k, start, T)[:, None]
        heads = {n: np.where(cached & self.allowed[n][..., self.cache_index], self.cache_index,
                             self.full_index).astype(np.int64) for n in self.names}
        for block in self.blocks:
            heads[f"block:{block}"] = np.zeros(T, dtype=np.int64)
        return heads

    def solve_variant(self, config: DiTFastAttnConfig, variant: dict, warn: bool = True
                      ) -> tuple[float | None, dict]:
        """``lam`` (None for a rhythm) and the choices of one of the `variants` (kept set on the problem afterwards,
        so `describe` reports it); solved once per variant and target."""
        key = json.dumps([variant, config.target()], sort_keys=True, default=str)
        solved = self._solve_variant(config, variant, warn) if key not in self._solved else self._solved[key]
        if key in self._solved:  # the problem's state as solving it left it (`describe` reads it)
            self._solve_variant(config, variant, warn, state_only=True)
        self._solved[key] = solved
        return solved

    def _solve_variant(self, config: DiTFastAttnConfig, variant: dict, warn: bool, state_only: bool = False):
        self.variant = dict(variant)
        if "rhythm" in variant:
            k, start = int(variant["rhythm"]), int(variant["start"])
            if self.step_damage is None or not 2 <= k <= self.max_skip_run + 1:
                allows = ("skips no steps" if self.step_damage is None else
                          f"allows runs of up to max_skip_run={self.max_skip_run} skipped steps")
                raise ValueError(f"a selected rhythm computes one step in {k}, but this search {allows}; search "
                                 "with the config the rhythm was selected for")
            self.weigh_heads(np.inf)
            self.run_limit = k - 1
            return None if state_only else (None, self._rhythm(k, start))
        if "head_rhythm" in variant:
            if self.step_damage is not None or self.cache_index is None:
                raise ValueError(f"the selected plan variant {variant} refreshes cached heads on a rhythm, which "
                                 "this search does not offer (it skips whole steps, or has no `cache` candidate); "
                                 "search with the config the variant was selected for")
            k, start = int(variant["head_rhythm"]), int(variant["start"])
            if k < 2 or not 0 <= start < self.num_steps:
                raise ValueError(f"a head rhythm computes one step in k >= 2 after a start step inside the plan, "
                                 f"got k={k}, start={start}")
            self.weigh_heads(1.0)
            return None if state_only else (None, self._head_rhythm(k, start))
        weight, run = _weight(variant["head_weight"]), int(variant["max_skip_run"])
        if self.step_damage is not None and not 1 <= run <= self.max_skip_run:
            raise ValueError(f"a selected plan variant skips runs of up to {run} steps, but this search allows "
                             f"1 to max_skip_run={self.max_skip_run}; search with the config the variant was "
                             "selected for")
        self.weigh_heads(weight)
        self.run_limit = run
        return None if state_only else self._solve_one(config, warn)

    def alternatives(self, config: DiTFastAttnConfig) -> list[tuple[dict, float | None, dict]]:
        """Every distinct plan that one of the `variants` gives for the target: ``(variant, lam, choices)``, those
        meeting the target first, by predicted damage (``target_cut``) or cut (``target_snr_db``), then those missing
        it, closest first (the largest cut; the least damage)."""
        kind, value = config.target()
        found, seen = [], set()
        for variant in self.variants(config):
            lam, choices = self.solve_variant(config, variant, warn=False)
            key = tuple((n, c.tobytes()) for n, c in sorted(choices.items()))
            if key in seen:
                continue
            seen.add(key)
            cut, damage = self.totals(choices)
            meets = self._meets(config, choices)
            # meeting the target: least damage (a cut target) or most saving; missing it: the closest to it
            rank = (not meets, damage if (kind == "cut") == meets else -cut)
            found.append((rank, variant, lam, choices))
        found.sort(key=lambda f: f[0])
        if found[0][0][0] and kind == "cut":
            logger.warning("ditfa: target_cut %.3f cannot be reached with these candidates and max_head_rse; the "
                           "plan saves the most it can", value)
        return [(variant, lam, choices) for _, variant, lam, choices in found]

    def solve(self, config: DiTFastAttnConfig, variant: dict | None = None
              ) -> tuple[float | None, dict[str, np.ndarray]]:
        """``lam`` and the choices meeting the config's target (the closest plan when it cannot be met).

        With skipped steps the frontier of (saving, damage) is not convex: a plan of skipped steps alone can be
        better than every Lagrangian plan of heads and steps at the same cut, so the bisection over one price can
        miss it. `solve` therefore tries every one of the `variants` (head damage priced 1x, 4x and infinitely;
        shorter skipped runs; fixed rhythms) and keeps, among the plans meeting the target, the one with the least
        predicted damage (``target_cut``) or the largest cut (``target_snr_db``) — unless ``variant`` names the one
        to use (the variant a measurement selected, `ditfa_optimum.calibrate.select_plan`)."""
        if variant is None:
            variant = self.alternatives(config)[0][0]
        return self.solve_variant(config, variant)

    def _meets(self, config: DiTFastAttnConfig, choices) -> bool:
        kind, value = config.target()
        cut, damage = self.totals(choices)
        return cut >= value - 1e-9 if kind == "cut" else self.snr_db(damage) >= value

    def _solve_one(self, config: DiTFastAttnConfig, warn: bool = True) -> tuple[float, dict[str, np.ndarray]]:
        kind, value = config.target()
        if kind == "cut":
            def meets(lam):  # the largest lam still cutting enough: least damage at that cut
                return self.totals(self.choose(lam))[0] >= value
            search_largest = True
        else:
            def meets(lam):  # the smallest lam still predicted good enough: most saving at that quality
                return self.snr_db(self.totals(self.choose(lam))[1]) >= value
            search_largest = False
        lo, hi = -80.0, 80.0  # log10(lam), lam in units of saved cost per unit damage (scaled below)
        scale = self._scale()
        if search_largest:
            if not meets(0.0):
                if warn:
                    logger.warning("ditfa: target_cut %.3f cannot be reached with these candidates and "
                                   "max_head_rse; the plan saves the most it can", value)
                return 0.0, self.choose(0.0)
            if meets(scale * 10 ** hi):
                return scale * 10 ** hi, self.choose(scale * 10 ** hi)
            for _ in range(100):  # invariant: meets(10^lo), not meets(10^hi)
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if meets(scale * 10 ** mid) else (lo, mid)
            lam = scale * 10 ** lo
        else:
            if meets(0.0):
                return 0.0, self.choose(0.0)
            for _ in range(100):  # invariant: not meets(10^lo), meets(10^hi) (lam = inf keeps every head full)
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if meets(scale * 10 ** mid) else (mid, hi)
            lam = scale * 10 ** hi
        return lam, self.choose(lam)

    def _scale(self) -> float:
        saved = sum(float(np.abs(s).max()) for s in self.saved.values())
        damage = sum(float(d[a].max()) if a.any() else 0.0 for d, a in zip(self.damage.values(),
                                                                          self.allowed.values()))
        return saved / damage if damage > 0 else 1.0

    def describe(self, choices: dict[str, np.ndarray], lam: float, config: DiTFastAttnConfig) -> dict:
        cut, damage = self.totals(choices)
        mse = self.sensitivity.predicted_mse(damage)
        kind, value = config.target()
        steps = choices.get("steps")
        skipped = [] if steps is None else np.nonzero(steps)[0].tolist()
        return {"target": {kind: value}, "lambda": lam, "head_weight": _finite(self.head_weight),
                "max_skip_run": self.run_limit, "variant": self.variant,
                "predicted_cut": cut, "damage_scale": self.damage_scale,
                "skipped_steps": skipped,
                "predicted_final_mse": mse, "predicted_snr_db": _finite(self.snr_db(damage)),
                "predicted_psnr_db": _finite(self.sensitivity.psnr_db(mse))}


def _finite(value):
    """JSON has no infinity: None for 'no error predicted'."""
    return None if value is None or not np.isfinite(value) else float(value)
