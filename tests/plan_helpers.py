"""Hand-made plans shared by the runtime tests (compiled calls, CUDA graphs)."""

import ditfa_optimum as dfa


def residual_plan(pipe, family: str, num_steps: int = 4, block_size: int = 4):
    """Arrow, cache, CFG sharing (SD3) and an `arrow_residual` head (recorded at step 1, added at steps 2 and 3) over
    ``num_steps`` (at least 4) steps."""
    plan = dfa.uniform_plan(pipe, num_steps=num_steps, method="full", block_size=block_size)
    for name in plan.module_names:
        for step in range(1, num_steps):
            plan.set(name, step, 1, "cache" if step % 2 else "arrow:1/2")
        plan.set(name, 2, 0, "arrow_residual:1/2")
        plan.set(name, 3, 0, "arrow_residual:1/2")
        if family == "sd3":
            plan.set(name, 2, 2, "cfg_share")
            plan.set(name, 3, 3, "cfg_share")
    return plan
