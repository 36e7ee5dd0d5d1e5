"""apply / remove on tiny SD3, SD3.5 and FLUX transformers and real diffusers pipelines (CPU, fp32)."""

import pytest
import torch

import ditfa_optimum as dfa
from ditfa_optimum.plan import CompressionPlan
from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

FAMILIES = ["sd3", "sd35", "flux"]


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("family", FAMILIES)
def test_all_full_plan_equals_stock(family, device):
    model = tiny_transformer(family).to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in tiny_inputs(model, batch=3, height=9, width=7, text_tokens=5).items()}
    stock = forward(model, inputs)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    assert (forward(model, inputs) - stock).abs().max() <= 1e-5
    # so is arrow(1.0): the band covers every image block
    dfa.remove(model)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, method="arrow:1", full_steps=0, block_size=4))
    assert (forward(model, inputs) - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_arrow_changes_output_and_remove_restores_stock_exactly(family, device):
    model = tiny_transformer(family).to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
              for k, v in tiny_inputs(model, batch=2, height=8, width=8, text_tokens=6).items()}
    stock = forward(model, inputs)
    processors = {name: p for name, p in model.attn_processors.items()}

    runtime = dfa.apply(model, dfa.uniform_plan(model, num_steps=1, method="arrow:1/4", full_steps=0, block_size=4))
    assert runtime.plan.model_class == type(model).__name__
    planned = forward(model, inputs)
    assert not torch.allclose(planned, stock, atol=1e-3)  # 16 blocks of 4 tokens: the band really drops keys

    dfa.remove(model)
    assert all(model.attn_processors[n] is p for n, p in processors.items())
    assert not model._forward_pre_hooks
    assert torch.equal(forward(model, inputs), stock)
    assert dfa.get_runtime(model) is None


def test_apply_twice_and_remove_without_plan_raise():
    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=2)
    dfa.apply(model, plan)
    with pytest.raises(ValueError, match="already runs a ditfa plan .*call ditfa_optimum.remove"):
        dfa.apply(model, plan)
    dfa.remove(model)
    with pytest.raises(ValueError, match="runs no ditfa plan"):
        dfa.remove(model)


def test_plan_for_another_model_is_refused():
    sd3, flux = tiny_transformer("sd3"), tiny_transformer("flux")
    with pytest.raises(ValueError, match="made for a SD3Transformer2DModel, but the transformer is a Flux"):
        dfa.apply(flux, dfa.uniform_plan(sd3, num_steps=2))
    other = tiny_transformer("sd3", num_layers=3)
    with pytest.raises(ValueError, match=r"the model lacks \['transformer_blocks.3.attn'\]"):
        dfa.apply(other, dfa.uniform_plan(sd3, num_steps=2))
    wide = tiny_transformer("sd3", num_attention_heads=2, attention_head_dim=16)
    with pytest.raises(ValueError, match="the plan has 4 heads of dim 8, the model 2 heads of dim 16"):
        dfa.apply(wide, dfa.uniform_plan(sd3, num_steps=2))


def test_unknown_transformer_and_custom_processor_are_refused():
    with pytest.raises(ValueError, match="no adapter for Linear; supported transformers"):
        dfa.apply(torch.nn.Linear(2, 2), None)
    model = tiny_transformer("sd3")

    class MyProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            raise AssertionError

    model.transformer_blocks[1].attn.set_processor(MyProcessor())
    with pytest.raises(ValueError, match="'transformer_blocks.1.attn' uses processor MyProcessor"):
        dfa.apply(model, dfa.uniform_plan(model, num_steps=2))
    assert dfa.get_runtime(model) is None  # nothing half-installed


def test_flux_single_blocks_read_the_text_length_of_each_call():
    model = tiny_transformer("flux")
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, method="arrow:1/4", full_steps=0, block_size=4))
    for text_tokens in (5, 11):
        inputs = tiny_inputs(model, batch=1, height=8, width=8, text_tokens=text_tokens)
        dfa.reset_state(model)
        forward(model, inputs)
        runtime = model.single_transformer_blocks[0].attn.processor.runtime
        assert any(call.layout.num_text_tokens == text_tokens for call in calls_seen(runtime).values())


# ---------------------------------------------------------------- real pipelines
def sd3_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    return StableDiffusion3Pipeline(transformer=tiny_transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    **none)


def run_sd3(pipe, prompts=2, guidance=5.0, steps=4, seed=0):
    g = torch.Generator().manual_seed(123)
    emb, pooled = torch.randn(prompts, 9, 32, generator=g), torch.randn(prompts, 64, generator=g)
    return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(emb),
                negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=64, width=64,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def calls_seen(runtime):
    """What a module's runtime derived per call shape: (image tokens, text tokens, batch, cfg, device, grad) ->
    `_Call`, over all its step programs."""
    return {key: call for program in runtime.runtime.module_programs(runtime.spec.name)
            for key, call in program.calls.items()}


def call_keys_seen(pipe):
    return {key for attn in (b.attn for b in pipe.transformer.transformer_blocks)
            for key in calls_seen(attn.processor.runtime)}


@pytest.mark.parametrize("guidance,prompts", [(5.0, 1), (5.0, 3), (1.0, 3)], ids=["cfg", "cfg-x3", "no-cfg-x3"])
def test_sd3_pipeline_all_full_equals_stock(guidance, prompts):
    pipe = sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stock = run_sd3(pipe, prompts=prompts, guidance=guidance)
    dfa.apply(pipe, dfa.uniform_plan(pipe, num_steps=4, block_size=4))
    assert (run_sd3(pipe, prompts=prompts, guidance=guidance) - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["cfg", "no-cfg"])
def test_sd3_pipeline_mixed_plan(guidance):
    pipe = sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stock = run_sd3(pipe, guidance=guidance)
    specs = dfa.get_adapter(pipe.transformer).module_specs(pipe.transformer)
    row = ["full", "cache", "cfg_share", "arrow:1/4"]
    table = {s.name: [["full"] * 4] + [row] * 2 + [["arrow_residual:1/2"] * 4] for s in specs}
    plan = CompressionPlan.from_methods(specs, table, block_size=4, model_class="SD3Transformer2DModel")
    runtime = dfa.apply(pipe, plan)
    first = run_sd3(pipe, guidance=guidance)
    assert runtime.state.step == 3
    assert torch.isfinite(first).all() and not torch.allclose(first, stock, atol=1e-4)
    # each generation starts afresh at step 0 with empty caches: the same call gives the same latents
    assert torch.equal(run_sd3(pipe, guidance=guidance), first)
    # CFG is read from the pipeline's call: batched [uncond, cond] only when guidance > 1
    cfg_flags = {key[3] for key in call_keys_seen(pipe)}
    assert cfg_flags == {guidance > 1}
    batches = {key[2] for key in call_keys_seen(pipe)}
    assert batches == {4 if guidance > 1 else 2}


def test_sd3_pipeline_with_more_steps_than_the_plan_raises():
    pipe = sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    dfa.apply(pipe, dfa.uniform_plan(pipe, num_steps=3, block_size=4))
    with pytest.raises(ValueError, match="runs 5 denoising steps but the plan was searched for 3; .*"
                                         "num_inference_steps=3"):
        run_sd3(pipe, steps=5)  # refused before the first step, not after three silently planned ones
    run_sd3(pipe, steps=3)  # and the pipeline still works with the right step count afterwards


def test_flux_pipeline_all_full_equals_stock_and_mixed_plan_runs():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(transformer=tiny_transformer("flux"), scheduler=FlowMatchEulerDiscreteScheduler(),
                        **dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]))
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(5)
    emb, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)

    def run():
        return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=64, width=64, num_inference_steps=3,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    stock = run()
    dfa.apply(pipe, dfa.uniform_plan(pipe, num_steps=3, block_size=4))
    assert (run() - stock).abs().max() <= 1e-5
    dfa.remove(pipe)
    runtime = dfa.apply(pipe, dfa.uniform_plan(pipe, num_steps=3, method="cfg_share", block_size=4))
    # FLUX never batches CFG, so cfg_share heads are computed in full: same as stock
    assert (run() - stock).abs().max() <= 1e-5
    assert runtime.state.cfg(needed=True) is False


# not sd35: diffusers 0.42.1's own fused SD3.5 fails (FusedJointAttnProcessor2_0 on attn2, which has no text stream)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_plan_runs_on_fused_qkv_projections(family):
    """`fuse_qkv_projections()` before `apply`: the planned processors compute with the fused weights, as the stock
    ones do (the fused weights are changed here, so a processor reading the separate ones would differ)."""
    model = tiny_transformer(family)
    inputs = tiny_inputs(model, batch=2, height=8, width=8, text_tokens=5)
    unfused = forward(model, inputs)
    model.fuse_qkv_projections()
    fused = [m for _, m in dfa.get_adapter(model).attention_modules(model)]
    assert all(m.fused_projections for m in fused)
    with torch.no_grad():
        for m in fused:
            m.to_qkv.weight.mul_(1.1)
    stock = forward(model, inputs)
    assert not torch.allclose(stock, unfused, atol=1e-3)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    assert (forward(model, inputs) - stock).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_half_precision_model_passes_the_processor_check_and_runs(family):
    model = tiny_transformer(family, dtype=torch.float16)
    inputs = tiny_inputs(model, batch=2, height=8, width=8, text_tokens=5)
    stock = forward(model, inputs)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))  # the check runs in the model's dtype
    out = forward(model, inputs)
    assert out.dtype == torch.float16 and torch.allclose(out.float(), stock.float(), atol=1e-2, rtol=1e-2)


def test_the_processor_check_skips_modules_whose_weights_are_not_initialised():
    """``from_pretrained(low_cpu_mem_usage=False)`` builds the model with empty weights before loading them (found by
    diffusers' own save/load tests with a plan applied at construction): NaN outputs there are no sign of another
    diffusers, so the check moves on to the next module of the same kind, and still refuses a changed processor."""
    model = tiny_transformer("sd3")
    first, second = model.transformer_blocks[0].attn, model.transformer_blocks[1].attn
    with torch.no_grad():
        first.to_q.weight.fill_(float("nan"))
    stock_class = type(second.processor)
    changed = type(stock_class.__name__, (stock_class,), {
        "__call__": lambda self, attn, *a, **k: tuple(o * 1.01 for o in stock_class.__call__(self, attn, *a, **k))})
    second.set_processor(changed())
    with pytest.raises(RuntimeError, match="'transformer_blocks.1.attn'.* does not reproduce this diffusers version"):
        dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    second.set_processor(stock_class())
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    dfa.remove(model)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_a_plan_runs_under_autocast_with_sd35_qk_norm(backend):
    """Under ``torch.autocast`` SD3.5's qk-norm gives float32 q and k beside a half-precision v; the planned processor
    hands the runtime what autocast hands the stock SDPA (all three in autocast's dtype), so an arrow plan trains and an
    all-full plan computes what the stock model does (found by diffusers' own mixed-precision training test on a GPU;
    CPU autocast in bfloat16 shows the same)."""
    model = tiny_transformer("sd35")
    inputs = tiny_inputs(model, batch=2, height=8, width=8, text_tokens=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(**inputs)[0]
        dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4), backend=backend)
        assert torch.equal(model(**inputs)[0], stock)
        dfa.remove(model)
        plan = dfa.uniform_plan(model, num_steps=2, method="arrow:1/2", full_steps=0, block_size=4)
        for name in plan.module_names:  # full and arrow heads side by side: the backends group them by width
            plan.set(name, 0, 0, "full")
        dfa.apply(model, plan, backend=backend)
        out = model(**inputs)[0]
    out.float().square().mean().backward()
    assert out.dtype == stock.dtype and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.transformer_blocks[0].attn.to_q.parameters())
    dfa.remove(model)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_flux_latents_unpack_as_the_pipeline_does(size):
    """The FLUX adapter's own unpacking of packed latents (used by verify) equals diffusers' pipeline helper."""
    from diffusers import FluxPipeline

    height, width = size
    packed = torch.randn(2, (height // 16) * (width // 16), 64)
    adapter = dfa.get_adapter(tiny_transformer("flux"))
    assert torch.equal(adapter.spatial_latents(packed, height, width, 8),
                       FluxPipeline._unpack_latents(packed, height, width, 8))
    spatial = torch.randn(2, 16, 8, 8)
    assert dfa.get_adapter(tiny_transformer("sd3")).spatial_latents(spatial, 64, 64, 8) is spatial
