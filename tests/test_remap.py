"""A plan run at another step count: `CompressionPlan.remap_steps`, `apply(..., num_inference_steps=)`, the CLI."""

import logging
import random

import pytest
import torch

import ditfa_optimum as dfa
from ditfa_optimum.methods import block_method_class, method_class
from ditfa_optimum.plan import BlockSpec, CompressionPlan, ModuleSpec
from ditfa_optimum.remap import step_map
from ditfa_optimum.tiny import tiny_pipeline

SPECS = [ModuleSpec(f"transformer_blocks.{i}.attn", num_heads=3, head_dim=8) for i in range(3)]
BLOCKS = [BlockSpec(f"transformer_blocks.{i}", (f"transformer_blocks.{i}.attn",),
                    (f"transformer_blocks.{i}.ff",) if i < 2 else (), attn_proj_image=10, attn_proj_text=20,
                    mlp_image=30, mlp_text=40, modulation=50) for i in range(3)]
HEAD_METHODS = ["full", "arrow:1/8", "arrow:1/16", "cache", "cfg_share", "arrow_residual:1/4", "arrow_residual:1/8"]
BLOCK_METHODS = ["compute", "block_cache", "block_taylor", "mlp_cache"]


def random_plan(seed: int, steps: int) -> CompressionPlan:
    """A valid random plan with head methods, block methods and skipped steps: random changes, each kept only when
    the plan's own rules accept it."""
    rng = random.Random(seed)
    plan = CompressionPlan.uniform(SPECS, num_steps=steps, blocks=BLOCKS if seed % 2 else [])
    for _ in range(6 * steps):
        try:
            if plan.blocks and rng.random() < 0.2:
                plan.set_block(rng.choice(BLOCKS).name, rng.randrange(steps), rng.choice(BLOCK_METHODS))
            elif rng.random() < 0.1 and steps > 2:
                plan.set_skipped_steps(sorted(set(plan.skipped_steps) | {rng.randrange(1, steps)}))
            else:
                spec = rng.choice(SPECS)
                plan.set(spec.name, rng.randrange(steps), rng.randrange(spec.num_heads), rng.choice(HEAD_METHODS))
        except ValueError:
            pass
    return plan


def test_step_map_keeps_the_ends_and_the_order():
    assert step_map(20, 20) == list(range(20))
    assert step_map(20, 10) == [0, 2, 4, 6, 8, 11, 13, 15, 17, 19]
    assert step_map(4, 7) == [0, 1, 1, 2, 2, 3, 3]  # halves round up
    for searched in range(1, 12):
        for steps in range(1, 25):
            m = step_map(searched, steps)
            assert len(m) == steps and m[0] == 0 and (steps == 1 or m[-1] == searched - 1)
            assert all(a <= b for a, b in zip(m, m[1:]))
    with pytest.raises(ValueError, match="steps must be a positive number of steps, got 0"):
        step_map(20, 0)


def test_the_same_step_count_gives_the_same_plan():
    plan = random_plan(1, 6)
    assert plan.remap_steps(6) == plan


@pytest.mark.parametrize("seed", range(12))
def test_a_remapped_plan_is_valid_and_takes_the_searched_choices(seed):
    plan = random_plan(seed, steps=random.Random(seed).choice([4, 6, 9]))
    for steps in (1, 2, 3, plan.num_steps - 1, plan.num_steps + 1, 2 * plan.num_steps + 1):
        new = plan.remap_steps(steps)  # the constructor checks every rule of the schedule
        source = step_map(plan.num_steps, steps)
        assert new.num_steps == steps and new.metadata["remapped"]["from_steps"] == plan.num_steps
        assert all(not plan.runs_step(source[i]) for i in new.skipped_steps)
        for spec in SPECS:
            for i in range(steps):
                if not new.runs_step(i):
                    continue
                for head in range(spec.num_heads):
                    got = new.method(spec.name, i, head)
                    # the searched choice, or computed where it would read memory the new schedule never made
                    assert got == plan.method(spec.name, source[i], head) or str(got) == "full"
        for block in new.block_names:
            for i in range(steps):
                got = block_method_class(int(new.block_methods[block][i]))
                assert got.method_id in (int(plan.block_methods[block][source[i]]), 0)


def test_caches_only_reuse_a_step_that_ran():
    plan = CompressionPlan.uniform(SPECS, num_steps=6, method="cache")
    for name in plan.module_names:  # no cache right after the skipped step 3: step 4 computes
        plan.methods[name][4] = method_class("full").method_id
    plan.set_skipped_steps([3])
    assert step_map(6, 11) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    longer = plan.remap_steps(11)  # steps 5 and 6 both read searched step 3: one skip (the plan's longest run)
    assert longer.skipped_steps == [5]
    assert [str(m) for m in longer.step_methods(SPECS[0].name, 6)] == ["full"] * 3  # the cache after the skip
    assert [str(m) for m in longer.step_methods(SPECS[0].name, 7)] == ["full"] * 3  # searched step 4: full
    for i in range(1, 11):
        for name in longer.module_names:
            if any(str(m) == "cache" for m in longer.step_methods(name, i)):
                assert longer.runs_step(i - 1)


def test_apply_refuses_another_step_count_unless_asked_to_remap(caplog):
    pipe = tiny_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    plan = dfa.uniform_plan(pipe.transformer, num_steps=6, method="cache", block_size=16)
    kwargs = dict(prompt_embeds=torch.randn(1, 8, pipe.transformer.config.joint_attention_dim),
                  pooled_prompt_embeds=torch.randn(1, pipe.transformer.config.pooled_projection_dim),
                  guidance_scale=1.0, height=64, width=64, output_type="latent")
    dfa.apply(pipe, plan)
    with pytest.raises(ValueError, match=r"runs 4 denoising steps but the plan was searched for 6.*"
                                         r"apply\(pipe, plan, num_inference_steps=4\)"):
        pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    dfa.remove(pipe)

    with caplog.at_level(logging.WARNING):
        dfa.apply(pipe, plan, num_inference_steps=4)
    assert "searched for 6 steps and runs remapped at 4" in caplog.text
    assert dfa.get_runtime(pipe).plan == plan.remap_steps(4)
    remapped = pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    dfa.remove(pipe)
    dfa.apply(pipe, plan.remap_steps(4))
    explicit = pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    dfa.remove(pipe)
    dense = pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(remapped, explicit) and not torch.equal(remapped, dense)
