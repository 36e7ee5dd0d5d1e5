"""Whole skipped steps (`step_taylor`) through the runtime, against the stock transformer run by hand."""

import copy

import pytest
import torch

import ditfa_optimum as dfa
from ditfa_optimum.methods import step_taylor
from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK
from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

TIMESTEPS = [999.0, 800.0, 600.0, 400.0, 250.0, 100.0, 50.0]
SKIPPED = [2, 4, 5]  # 2 from (1, 0); 4 from (3, 1); 5 from (3, 1) again, two steps ahead


def forward(model, inputs, return_dict=True):
    with torch.no_grad():
        out = model(**inputs, return_dict=return_dict)
    return out.sample if return_dict else out[0]


def by_hand(outputs: dict, step: int) -> torch.Tensor:
    ran = sorted(s for s in outputs if s < step)
    a, b = ran[-1], ran[-2]
    return outputs[a] + (outputs[a] - outputs[b]) * (step - a) / (a - b)


@pytest.mark.parametrize("return_dict", [True, False])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_skipped_steps_extrapolate_the_stock_outputs(family, return_dict):
    model = tiny_transformer(family)
    stock = copy.deepcopy(model)
    plan = dfa.uniform_plan(model, num_steps=len(TIMESTEPS), block_size=4)
    plan.set_skipped_steps(SKIPPED)
    runtime = dfa.apply(model, plan, backend="reference")
    scale = 1000 if family == "flux" else 1
    inputs = tiny_inputs(model, batch=2, height=6, width=8, text_tokens=5)
    seen = {}
    for step, t in enumerate(TIMESTEPS):
        step_inputs = {**inputs, "timestep": inputs["timestep"] * 0 + t / scale,
                       "hidden_states": torch.randn_like(inputs["hidden_states"])}
        got = forward(model, step_inputs, return_dict)
        assert runtime.state.step == step
        if step in SKIPPED:
            torch.testing.assert_close(got, by_hand(seen, step), atol=1e-6, rtol=1e-6)
        else:
            seen[step] = forward(stock, step_inputs)
            torch.testing.assert_close(got, seen[step], atol=1e-5, rtol=1e-5)
    assert runtime.state.memory_bytes() == 0  # every kept output was freed after its last reader
    dfa.remove(model)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in model.modules())


def test_a_skipped_step_runs_no_block_and_no_attention():
    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=3, block_size=4)
    plan.set_skipped_steps([2])
    dfa.apply(model, plan)
    assert model._diffusers_hook.get_hook(TRANSFORMER_HOOK).step_handler is not None
    ran = []
    handles = [b.register_forward_pre_hook(lambda *_: ran.append(1)) for b in model.transformer_blocks]
    inputs = tiny_inputs(model, height=4, width=4)
    for t in TIMESTEPS[:3]:
        before = len(ran)
        forward(model, {**inputs, "timestep": inputs["timestep"] * 0 + t})
        ran_now = len(ran) - before
    assert ran_now == 0 and len(ran) == 2 * len(model.transformer_blocks)
    for h in handles:
        h.remove()


def test_the_reference_extrapolates_in_the_step_index():
    outputs = {1: torch.tensor([1.0, 2.0]), 3: torch.tensor([3.0, 2.0])}
    assert step_taylor.sources(4, [0, 1, 3]) == (3, 1)
    assert step_taylor.sources(1, [0]) == (0,)
    assert torch.equal(step_taylor.extrapolate(outputs, 4, (3, 1)), torch.tensor([4.0, 2.0]))
    assert torch.equal(step_taylor.extrapolate(outputs, 5, (3,)), outputs[3])
    with pytest.raises(ValueError, match="runs at no earlier step"):
        step_taylor.sources(0, [])
    with pytest.raises(ValueError, match="forward from earlier steps"):
        step_taylor.extrapolate(outputs, 2, (3, 1))


def test_plan_rules_for_skipped_steps(tmp_path):
    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=5, block_size=4)
    name = plan.module_names[0]
    plan.set(name, 3, 0, "cache")
    with pytest.raises(ValueError, match=r"step 3 head 0: `cache` reuses the head's output of step 2, but the plan "
                                         r"skips step 2"):
        plan.set_skipped_steps([2])
    assert plan.skipped_steps == []  # rolled back
    for bad in ([0], [5], [1.5], ["x"]):
        with pytest.raises(ValueError, match="skipped_steps"):
            plan.set_skipped_steps(bad)
    plan.set_skipped_steps([1, 4])
    flops = plan.flops(16, 5)
    assert float(flops.planned[:, [1, 4]].abs().sum()) == 0 and float(flops.planned[:, 0].sum()) > 0
    whole = plan.transformer_flops(16, 5)
    assert float(whole.planned[:, [1, 4]].abs().sum()) == 0
    assert not plan.output_keeps(name)[[0, 3]].any()  # nothing reads step 0 or 3's head output across a skip
    loaded = type(plan).load(plan.save(tmp_path / "plan"))
    assert loaded == plan and loaded.skipped_steps == [1, 4]
    assert "steps skipped (step_taylor): [1, 4]" in plan.summary()
    plan.set_skipped_steps([])
    assert plan.output_keeps(name)[2, 0]  # without the skip, step 3's cache head reads step 2


def test_format_2_plans_load_without_skipped_steps(tmp_path):
    import json

    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=4, block_size=4)
    plan.save(tmp_path)
    info = json.loads((tmp_path / "plan.json").read_text())
    assert info.pop("schema_version") == dfa.schema.SCHEMA_VERSION and info["skipped_steps"] == []
    info["format_version"] = 2  # schema 1: plan format 2, before skipped steps
    del info["skipped_steps"]
    (tmp_path / "plan.json").write_text(json.dumps(info))
    assert type(plan).load(tmp_path) == plan
    info.update(format_version=3, skipped_steps=[2, "3"])
    (tmp_path / "plan.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="'skipped_steps' must be a list of step indices"):
        type(plan).load(tmp_path)


def test_repeated_generations_hold_no_memory_after_the_last_step():
    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=5, block_size=4)
    for spec in plan.modules:
        for head in range(spec.num_heads):
            plan.set(spec.name, 1, head, "arrow:1/2")
            plan.set(spec.name, 4, head, "cache")
    plan.set_skipped_steps([2])
    runtime = dfa.apply(model, plan)
    inputs = tiny_inputs(model, height=4, width=4)
    held = []
    for _ in range(3):
        for t in TIMESTEPS[:5]:
            forward(model, {**inputs, "timestep": inputs["timestep"] * 0 + t})
            held.append(runtime.state.memory_bytes())
        assert runtime.state.memory_bytes() == 0
    assert held[:5] == held[5:10] == held[10:]  # the same memory at each step of every generation
    assert max(held) > 0
