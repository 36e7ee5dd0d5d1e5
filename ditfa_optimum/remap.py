"""Running a plan at another step count: each step takes the choices of the searched step at the same position.

A plan is searched for one number of denoising steps. `remap_steps` makes a plan for another number by one documented
rule (a pure function of the plan):

* step ``i`` of ``M`` reads the searched step ``i * (N - 1) / (M - 1)`` of ``N`` (rounded half up), the step at the same
  normalised position (for the flow-matching schedulers of SD3 and FLUX, the same normalised timestep up to the shift);
* a whole step is skipped only where the searched step was skipped, and never in a longer run than the plan has;
* an entry whose memory does not exist in the new schedule computes instead: a `cache` head whose previous step did not
  run (or whose block did not), an `arrow_residual` head whose recording `full` step is gone or recorded another
  fraction, a block method with nothing to reuse. Caches only ever reuse a step that ran.

What to expect: the plan was not searched for these steps. With fewer steps each cached output is reused across a
larger change of the latents (``(N - 1) / (M - 1)`` searched steps apart), so the image differs more from dense than
the search predicted; with more steps consecutive steps repeat one searched choice. docs/runtime.md has the measured
effect; search a plan for the new step count for the quality a search predicts.
"""

from __future__ import annotations

from .methods import Full, block_method_class, method_class
from .methods.block_compute import Compute


def step_map(searched: int, steps: int) -> list[int]:
    """For each of ``steps`` steps, the searched step (of ``searched``) at the same normalised position."""
    for name, value in (("searched", searched), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive number of steps, got {value!r}")
    if steps == 1:
        return [0]
    # round half up, in integers: i * (searched - 1) / (steps - 1) + 1/2, floored
    return [(2 * i * (searched - 1) + steps - 1) // (2 * (steps - 1)) for i in range(steps)]


def remap_steps(plan, steps: int):
    """A copy of ``plan`` for ``steps`` denoising steps (module docstring: the rule and what to expect).

    Example:
        >>> from ditfa_optimum.plan import CompressionPlan, ModuleSpec
        >>> plan = CompressionPlan.uniform([ModuleSpec("a", 2, 8)], num_steps=4, method="cache")
        >>> [str(m) for m in remap_steps(plan, 2).step_methods("a", 1)]
        ['cache', 'cache']
    """
    from .plan import CompressionPlan

    source = step_map(plan.num_steps, steps)
    skipped = _skipped(plan, source)
    runs = [i not in skipped for i in range(steps)]
    block_methods = {b.name: _blocks(plan.block_methods[b.name].tolist(), source, runs, b.mlps) for b in plan.blocks}
    block_runs = {b.name: [r and block_method_class(m).runs_block for m, r in zip(block_methods[b.name], runs)]
                  for b in plan.blocks}
    methods, params = {}, {}
    for spec in plan.modules:
        ids, par = plan.methods[spec.name][source].clone(), plan.params[spec.name][source].clone()
        block = plan.block_of(spec.name)
        ran = block_runs[block.name] if block is not None else runs
        for head in range(spec.num_heads):
            _repair_head(ids[:, head], par[:, head], runs, ran)
        methods[spec.name], params[spec.name] = ids, par
    metadata = {**plan.metadata, "remapped": {"from_steps": plan.num_steps, "to_steps": steps,
                                              "rule": "ditfa_optimum.remap (nearest normalised step)"}}
    return CompressionPlan(plan.modules, methods, params, block_size=plan.block_size, model_class=plan.model_class,
                           metadata=metadata, blocks=plan.blocks, block_methods=block_methods,
                           skipped_steps=sorted(skipped))


def _skipped(plan, source: list[int]) -> set[int]:
    longest, run = 0, 0
    for t in range(plan.num_steps):
        run = 0 if plan.runs_step(t) else run + 1
        longest = max(longest, run)
    out, run = set(), 0
    for i, t in enumerate(source):
        run = run + 1 if i > 0 and not plan.runs_step(t) and run < longest else 0
        if run:
            out.add(i)
    return out


def _blocks(ids: list[int], source: list[int], runs: list[bool], mlps) -> list[int]:
    out, ran, mlp_ran = [], [], []
    for i, t in enumerate(source):
        m = block_method_class(ids[t])()
        if not runs[i]:
            out.append(ids[t])  # not used at a skipped step
            continue
        try:
            m.sources(i, ran, mlp_ran, mlps)
            if i == 0:
                raise ValueError
        except ValueError:
            m = Compute()
        out.append(m.method_id)
        if m.runs_block:
            ran.append(i)
            if m.runs_mlp:
                mlp_ran.append(i)
    return out


def _repair_head(ids, params, runs: list[bool], ran: list[bool]) -> None:
    """In place, for one head: `full` where a remapped method would read memory the new schedule never made
    (`ditfa_optimum.plan.schedule_conflict`, the plan's own rules; ``runs``: whether the transformer runs at each
    step, ``ran``: whether the head's block does), one step at a time from the first."""
    from .plan import schedule_conflict

    full = Full()
    methods = [method_class(int(i)).from_param(float(p) or None) for i, p in zip(ids, params)]
    while (conflict := schedule_conflict(methods, runs, ran)) is not None:
        step = conflict[0]
        ids[step], params[step], methods[step] = full.method_id, full.param, full
