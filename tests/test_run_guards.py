"""A plan never runs silently wrong: a different step count, a replaced processor or a failed call are caught."""

import pytest
import torch

from ditfa_optimum import apply, get_runtime, remove, uniform_plan
from ditfa_optimum.embedded import DEFAULTS, embedded_pipeline


@pytest.fixture(scope="module")
def sd3():
    return embedded_pipeline("tiny-sd3")


def _run(pipe, encoder, steps, **extra):
    d = DEFAULTS["tiny-sd3"]
    return pipe(**dict(encoder(["a red square"])), num_inference_steps=steps, height=d["size"], width=d["size"],
                guidance_scale=d["guidance"], output_type="latent", **extra).images


def test_fewer_steps_than_the_plan_is_refused_and_the_next_run_is_clean(sd3):
    pipe, encoder = sd3
    plan = uniform_plan(pipe, 4, "cache", full_steps=1)
    apply(pipe, plan)
    try:
        with pytest.raises(ValueError, match="runs 3 denoising steps but the plan was searched for 4"):
            _run(pipe, encoder, 3)
        assert get_runtime(pipe).state.step == -1  # reset: nothing half-done carries over
        planned = _run(pipe, encoder, 4)
    finally:
        remove(pipe)
    assert planned.isfinite().all()


def test_a_replaced_processor_is_reported_and_kept_by_remove(sd3):
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe, encoder = sd3
    apply(pipe, uniform_plan(pipe, 4, "arrow:1/2", full_steps=1))
    mine = JointAttnProcessor2_0()
    pipe.transformer.transformer_blocks[0].attn.set_processor(mine)
    try:
        with pytest.raises(ValueError, match="no longer runs the ditfa plan: its processor was replaced"):
            _run(pipe, encoder, 4)
    finally:
        remove(pipe)
    assert pipe.transformer.transformer_blocks[0].attn.processor is mine  # what the user set stays
    pipe.transformer.transformer_blocks[0].attn.set_processor(JointAttnProcessor2_0())


def test_a_call_that_fails_in_step_0_does_not_poison_the_next_generation(sd3):
    pipe, encoder = sd3
    plan = uniform_plan(pipe, 4, "cache", full_steps=1)
    apply(pipe, plan)
    calls = {"n": 0}

    def fail_once(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure inside the first transformer call")

    handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            _run(pipe, encoder, 4)
        planned = _run(pipe, encoder, 4)  # would raise "a cache head found no output" if state leaked
    finally:
        handle.remove()
        remove(pipe)
    dense = _run(pipe, encoder, 4)
    assert planned.shape == dense.shape and planned.isfinite().all()


def test_an_image_smaller_than_two_mask_blocks_warns_once(sd3, caplog):
    pipe, encoder = sd3
    plan = uniform_plan(pipe, 4, "arrow:1/2", full_steps=1, block_size=256)  # 256 image tokens: one block
    apply(pipe, plan)
    try:
        with caplog.at_level("WARNING", logger="ditfa_optimum.runtime.headwise"):
            _run(pipe, encoder, 4)
    finally:
        remove(pipe)
    warnings = [r for r in caplog.records if "mask block" in r.getMessage()]
    assert len(warnings) == 1 and "nothing is saved" in warnings[0].getMessage()


@pytest.mark.parametrize("family", ["tiny-sd3", "tiny-flux"])
def test_a_loader_recreating_the_processor_class_gets_a_clear_error_not_a_crash(family):
    """diffusers' IP-adapter / LoRA loaders call ``type(processor)()``: that must work, and running such a processor
    (or the plan after it replaced ours) must say what to do."""
    pipe, _ = embedded_pipeline(family)
    apply(pipe, uniform_plan(pipe, 4, "full"))
    try:
        attn = next(m for m in pipe.transformer.modules() if hasattr(m, "processor") and hasattr(m, "set_processor"))
        recreated = type(attn.processor)()  # what diffusers' loaders do
        with pytest.raises(ValueError, match="created without one .*remove the plan first"):
            recreated(attn, torch.zeros(1, 4, attn.query_dim if hasattr(attn, "query_dim") else 8))
    finally:
        remove(pipe)


def test_backward_through_a_plan_with_full_heads_and_a_finishing_head():
    """Training-style use: every computed head full width (16 image tokens are one mask block, so the arrow band is
    the whole image and the backend returns SDPA's own output) and heads finished in place (`arrow_residual` adds its
    residual, `cache` fills in) must still give gradients (diffusers' FLUX training tests hit this)."""
    from ditfa_optimum.tiny import tiny_pipeline

    pipe = tiny_pipeline("flux")
    transformer = pipe.transformer.train()
    plan = uniform_plan(transformer, 2, "full")
    for spec in plan.modules:
        plan.set(spec.name, 1, 0, "arrow_residual:1/8")
        plan.set(spec.name, 1, 1, "cache")
    apply(transformer, plan, backend="reference")
    try:
        g = torch.Generator().manual_seed(0)
        d = transformer.config
        hidden = torch.randn(1, 16, d.in_channels, generator=g)
        text = torch.randn(1, 4, d.joint_attention_dim, generator=g)
        kwargs = dict(encoder_hidden_states=text, pooled_projections=torch.randn(1, d.pooled_projection_dim, generator=g),
                      img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3), return_dict=False)
        if d.guidance_embeds:
            kwargs["guidance"] = torch.tensor([3.5])
        for t in (1.0, 0.5):  # step 0 full, step 1 with a cached head
            out = transformer(hidden.requires_grad_(True), timestep=torch.tensor([t]), **kwargs)[0]
            out.square().mean().backward()
        assert hidden.grad is not None and hidden.grad.isfinite().all()
    finally:
        remove(transformer)
        transformer.eval()


def test_a_deep_copy_of_a_planned_transformer_refuses_to_run_and_leaves_the_original_intact():
    """copy.deepcopy copies the step hooks' closures, which point at the original: the copy would advance the original's
    step state and run itself at a stale step. It refuses instead, and the original keeps its place."""
    import copy

    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("sd3")
    apply(model, uniform_plan(model, num_steps=3, method="cache", block_size=4))
    inputs = tiny_inputs(model, height=4, width=4)

    def call(m, t):
        with torch.no_grad():
            return m(**{**inputs, "timestep": inputs["timestep"] * 0 + t})

    call(model, 999)
    twin = copy.deepcopy(model)
    for action in (lambda: call(twin, 500), lambda: remove(twin), lambda: apply(twin, get_runtime(model).plan)):
        with pytest.raises(RuntimeError, match=r"is a copy \(copy.deepcopy\) of one that runs a ditfa plan"):
            action()
    assert get_runtime(model).state.step == 0  # untouched by the copy's attempts
    call(model, 500)
    assert get_runtime(model).state.step == 1
    remove(model)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_stock_processor_that_computes_something_else_is_refused_at_apply(family):
    """Our processors compute q, k, v as diffusers' do; a diffusers release that changes its processor must be refused
    (checked against the installed stock processor at apply), never run silently wrong."""
    from ditfa_optimum.tiny import tiny_transformer

    model = tiny_transformer(family)
    module = model.transformer_blocks[0].attn
    stock_class = type(module.processor)
    changed = type(stock_class.__name__, (stock_class,), {
        "__call__": lambda self, attn, *a, **k: _scaled(stock_class.__call__(self, attn, *a, **k))})
    module.set_processor(changed())
    with pytest.raises(RuntimeError, match="does not reproduce this diffusers version"):
        apply(model, uniform_plan(model, num_steps=2, block_size=4))
    assert not hasattr(model, "_ditfa_installed") and type(module.processor) is changed
    module.set_processor(stock_class())
    apply(model, uniform_plan(model, num_steps=2, block_size=4))  # the stock one passes
    remove(model)


def _scaled(out):
    return tuple(None if o is None else o * 1.01 for o in out) if isinstance(out, tuple) else out * 1.01


def _gradients(model, steps_timesteps, inputs):
    out = []
    for t in steps_timesteps:
        model.zero_grad()
        model(**{**inputs, "timestep": torch.full((2,), t)}).sample.pow(2).sum().backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    return out


@pytest.mark.parametrize("method", ["arrow:1/4", "cfg_share"])
def test_gradient_checkpointing_trains_a_plan_that_keeps_nothing_between_steps(method):
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_transformer("sd3").train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        apply(model, uniform_plan(model, num_steps=2, method=method, block_size=4))
        torch.manual_seed(1)
        grads.append(_gradients(model, (1000.0, 500.0), tiny_inputs(model, batch=2, height=8, width=8,
                                                                      text_tokens=6)))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_with_heads_that_reuse_an_earlier_step_is_refused():
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("sd3").train()
    model.enable_gradient_checkpointing()
    apply(model, uniform_plan(model, num_steps=2, method="cache", block_size=4))
    inputs = tiny_inputs(model, batch=2, height=8, width=8, text_tokens=6)
    with pytest.raises(ValueError, match=r"gradient checkpointing recomputes .*disable_gradient_checkpointing\(\)"):
        _gradients(model, (1000.0,), inputs)
    with torch.no_grad():  # no backward, no recomputation: runs
        for t in (1000.0, 500.0):
            model(**{**inputs, "timestep": torch.full((2,), t)})
    model.disable_gradient_checkpointing()
    _gradients(model, (1000.0, 500.0), inputs)  # and trains without checkpointing
