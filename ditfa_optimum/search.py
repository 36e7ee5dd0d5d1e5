"""Plan search: per (attention module, step), one method per head by a small integer program.

For one module at one step with heads ``h`` and candidate methods ``c`` (``full`` always among them)::

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


def solve_layer(rse, saved, budget: float, full_index: int = 0) -> np.ndarray:
    """One method for every head (layer-wise, DiTFastAttn v1): the largest saving whose summed error fits the budget.

    Same arguments and result shape as `solve_heads`; ties go to the lower candidate index.
    """
    rse, saved = np.asarray(rse, dtype=np.float64), np.asarray(saved, dtype=np.float64)
    fits = (rse.sum(0) <= budget) & (saved > 0)
    best = int(np.argmax(np.where(fits, saved, -np.inf))) if fits.any() else full_index
    return np.full(rse.shape[0], best, dtype=np.int64)


SOLVERS = {"head": solve_heads, "layer": solve_layer}


def search(stats: CalibrationStats, config: DiTFastAttnConfig, *, threshold: float | None = None,
           granularity: str = "head") -> CompressionPlan:
    """The plan maximising the saved cost within ``config.threshold`` on ``stats``; pure and deterministic.

    Args:
        stats: from `ditfa_optimum.calibrate.calibrate`.
        config: threshold, candidate methods (a subset of the calibrated ones), cost model, full steps.
        threshold: override ``config.threshold`` (for sweeps over the same statistics).
        granularity: "head" (one method per head: the product) or "layer" (one per module and step: the DiTFastAttn
            v1 baseline the quality benchmark compares against).

    Returns:
        A `CompressionPlan` whose ``metadata["search"]`` holds the config, the predicted mean RSE per module and step
        (``predicted_rse``), the attention-FLOP cut and the search time.

    Example:
        >>> plan = search(stats, DiTFastAttnConfig(threshold=0.1))          # doctest: +SKIP
    """
    start = time.perf_counter()
    if granularity not in SOLVERS:
        raise ValueError(f"granularity must be one of {sorted(SOLVERS)}, got {granularity!r}")
    solve = SOLVERS[granularity]
    if threshold is not None:
        config = config.replace(threshold=threshold)
    if config.num_inference_steps != stats.num_steps:
        raise ValueError(f"the statistics cover {stats.num_steps} steps but the config asks for "
                         f"{config.num_inference_steps}; calibrate again with num_inference_steps="
                         f"{config.num_inference_steps}")
    names = [str(m) for m in config.candidates()]
    missing = [n for n in names if n not in stats.candidates]
    if missing:
        raise ValueError(f"candidate methods {missing} were not calibrated (the statistics have {stats.candidates}); "
                         "calibrate with them or leave them out of config.methods")
    use = [stats.candidates.index(n) for n in names]
    full_index = stats.candidates.index("full")
    methods = [make_method(n) for n in stats.candidates]
    thresholds = config.step_thresholds()

    ids, params, predicted = {}, {}, {}
    for spec in stats.modules:
        rse = stats.rse(spec.name, config.error_normalization).numpy()  # [T, H, C]
        saved = stats.saved(spec.name, config.cost_model).numpy()  # [C]
        mask = np.full(len(stats.candidates), np.inf)
        mask[use] = 0.0
        choice = np.full(rse.shape[:2], full_index, dtype=np.int64)
        for step in range(config.full_steps, stats.num_steps):
            budget = thresholds[step] * spec.num_heads
            choice[step] = solve(rse[step] + mask, saved, budget, full_index)
        chosen_rse = np.where(choice == full_index, 0.0, np.take_along_axis(rse, choice[..., None], axis=2)[..., 0])
        predicted[spec.name] = chosen_rse.mean(1).tolist()
        ids[spec.name] = torch.tensor([[methods[c].method_id for c in row] for row in choice], dtype=torch.int16)
        params[spec.name] = torch.tensor([[methods[c].param for c in row] for row in choice], dtype=torch.float64)

    plan = CompressionPlan(stats.modules, ids, params, block_size=stats.block_size, model_class=stats.model_class)
    report = plan.flops(stats.image_tokens, stats.text_tokens, cfg=stats.cfg)
    plan.metadata["search"] = {
        "config": config.to_dict(),
        "threshold": config.threshold,
        "granularity": granularity,
        "budget": "sum over heads of RSE <= step threshold * num_heads, per module and step",
        "step_thresholds": thresholds,
        "image_tokens": stats.image_tokens,
        "text_tokens": stats.text_tokens,
        "cfg": stats.cfg,
        "num_prompts": stats.num_prompts,
        "predicted_rse": predicted,
        "flop_cut": report.cut,
        "calibration_seconds": stats.seconds,
        "search_seconds": time.perf_counter() - start,
    }
    return plan
