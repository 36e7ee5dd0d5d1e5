"""`ditfa_optimum.use_cuda_graphs`: planned transformer calls replayed from CUDA graphs (`runtime/graphs.py`).

On the CPU a recording stand-in replaces the CUDA graph (a replay runs the captured call again on the graph's fixed
inputs, nothing runs at capture, as with a graph): the tests check the slots, the fixed inputs, the eager first call,
that what the plan keeps between steps stays in the same tensors (what a graph's replays write), and the refusals.
The GPU test captures real graphs with the fused kernel."""

import logging

import pytest
import torch

import ditfa_optimum as dfa
from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK
from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline
from plan_helpers import residual_plan

STEPS = 4


def generate(pipe, encode, family: str, size: int | None = None):
    size = size or (64 if family == "sd3" else 128)
    extra = {"guidance_scale": 5.0} if family == "sd3" else {}
    return pipe(**encode(["a red cube on a blue floor"]), num_inference_steps=STEPS, height=size, width=size,
                output_type="latent", generator=torch.Generator().manual_seed(0), **extra).images


def recording(fn):
    """A CPU stand-in for a CUDA graph capture: nothing runs now; each replay runs ``fn`` (on the fixed inputs)."""
    return fn


def graphed(pipe, plan, device_type="cpu", backend="reference"):
    from ditfa_optimum.runtime.graphs import StepGraphs

    dfa.apply(pipe, plan, backend=backend)
    graphs = dfa.use_cuda_graphs(pipe)
    assert isinstance(graphs, StepGraphs)
    graphs._capture, graphs.device_type = recording if device_type == "cpu" else None, device_type
    return graphs


def kept_tensors(pipe) -> dict:
    runtime = dfa.get_runtime(pipe)
    return {(name, branch, what): t for name, table in runtime.tables.items()
            for branch, memory in table.memory.items() for what, t in memory.items()}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_graphed_generations_equal_eager_and_keep_memory_in_place(family):
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    graphs = graphed(pipe, residual_plan(pipe, family))
    with torch.no_grad():
        first = generate(pipe, encode, family)
        assert (graphs.eager_calls, graphs.captures, graphs.replays) == (1, 1, STEPS - 1)
        kept = {key: (t, t.data_ptr()) for key, t in kept_tensors(pipe).items()}
        second = generate(pipe, encode, family)
    assert (graphs.eager_calls, graphs.captures, graphs.replays) == (1, 1, 2 * STEPS - 1)
    # a graph's replays write what the plan keeps into the tensors its capture saw: the same tensors, every step
    assert kept and {key: (t, t.data_ptr()) for key, t in kept_tensors(pipe).items()} == kept
    assert any("previous" in key for key in kept) and any("residual" in key for key in kept)

    reference = tiny_pipeline(family)  # the same weights, eager, the step programs
    reference.set_progress_bar_config(disable=True)
    dfa.apply(reference, residual_plan(reference, family), backend="reference")
    with torch.no_grad():
        eager = generate(reference, encode, family)
    assert torch.allclose(first, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(second, first)

    assert dfa.use_cuda_graphs(pipe, False) is None  # plain calls again, the same images
    with torch.no_grad():
        assert torch.allclose(generate(pipe, encode, family), eager, atol=1e-5, rtol=1e-5)
    assert graphs.replays == 2 * STEPS - 1 and not kept_tensors(pipe)


def test_graphs_around_compiled_blocks():
    """`use_cuda_graphs` with `compile_blocks`: the compiled blocks run the tables and write what they keep into the
    kept tensors (an input mutation in the graph Dynamo traces); the generation equals eager, without graph breaks."""
    torch._dynamo.reset()
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    graphs = graphed(pipe, residual_plan(pipe, "flux"))
    dfa.compile_blocks(pipe, fullgraph=True, backend="eager")
    try:
        first = generate(pipe, encode, "flux")
        kept = {key: t.data_ptr() for key, t in kept_tensors(pipe).items()}
        second = generate(pipe, encode, "flux")
        assert kept and {key: t.data_ptr() for key, t in kept_tensors(pipe).items()} == kept
    finally:
        torch._dynamo.reset()
    reference = tiny_pipeline("flux")
    reference.set_progress_bar_config(disable=True)
    dfa.apply(reference, residual_plan(reference, "flux"), backend="reference")
    with torch.no_grad():
        eager = generate(reference, encode, "flux")
    assert (graphs.eager_calls, graphs.captures) == (1, 1)
    assert torch.allclose(first, eager, atol=1e-5, rtol=1e-5) and torch.allclose(second, first, atol=1e-6)


def test_a_changed_call_runs_eagerly_once_then_is_captured_again():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    graphs = graphed(pipe, residual_plan(pipe, "flux"))
    reference = tiny_pipeline("flux")
    reference.set_progress_bar_config(disable=True)
    dfa.apply(reference, residual_plan(reference, "flux"), backend="reference")
    with torch.no_grad():
        generate(pipe, encode, "flux")
        bigger = generate(pipe, encode, "flux", size=160)
        eager = generate(reference, encode, "flux", size=160)
    assert (graphs.eager_calls, graphs.captures) == (2, 2)
    assert torch.allclose(bigger, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_skipped_steps_stay_in_the_hook_around_the_graphs(family):
    """A plan that skips a whole step (`step_taylor`): the hook extrapolates it from the graph's returned outputs
    (copies, which the next replay does not overwrite) and calls nothing, the graph replays the computed steps."""
    steps = 6

    def plan_of(pipe):
        plan = dfa.uniform_plan(pipe, num_steps=steps, method="full", block_size=4)
        for name in plan.module_names:
            plan.set(name, 1, 1, "arrow:1/2")
            plan.set(name, 2, 1, "cache")
        plan.set_skipped_steps([4])
        return plan

    def run(pipe):
        size = 64 if family == "sd3" else 128
        extra = {"guidance_scale": 5.0} if family == "sd3" else {}
        with torch.no_grad():
            return pipe(**encode(["a red cube on a blue floor"]), num_inference_steps=steps, height=size, width=size,
                        output_type="latent", generator=torch.Generator().manual_seed(0), **extra).images

    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    graphs = graphed(pipe, plan_of(pipe))
    first, second = run(pipe), run(pipe)
    assert (graphs.eager_calls, graphs.captures, graphs.replays) == (1, 1, 2 * (steps - 1) - 1)
    reference = tiny_pipeline(family)
    reference.set_progress_bar_config(disable=True)
    dfa.apply(reference, plan_of(reference), backend="reference")
    eager = run(reference)
    assert torch.allclose(first, eager, atol=1e-5, rtol=1e-5) and torch.equal(second, first)


def test_moved_weights_are_captured_again_never_replayed_stale():
    """A graph reads the weights where its capture found them: weights moved since (CPU offloading puts them back
    elsewhere) make the next call run eagerly and the one after capture anew."""
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    graphs = graphed(pipe, residual_plan(pipe, "flux"))
    first = generate(pipe, encode, "flux")
    for p in pipe.transformer.parameters():  # every weight to a new address, the same values
        p.data = p.data.clone()
    again = generate(pipe, encode, "flux")
    assert (graphs.eager_calls, graphs.captures) == (2, 2)
    assert torch.allclose(again, first, atol=1e-6)


def test_adapter_changes_are_captured_again_never_replayed_stale():
    """A graph bakes in the Python state of its capture, a LoRA's scales and switches among it: loading an adapter,
    `set_adapters` weights, `disable_lora` each make the next generation run its first call eagerly and capture again
    (a real graph would otherwise replay the old adapters' kernels and scales, silently wrong)."""
    peft = pytest.importorskip("peft")
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    graphs = graphed(pipe, residual_plan(pipe, "flux"))
    transformer = pipe.transformer

    def counts():
        return graphs.eager_calls, graphs.captures

    def eager_reference():  # the same generation without graphs, same adapters
        hook = transformer._diffusers_hook.get_hook(TRANSFORMER_HOOK)
        kept, hook.graphs = hook.graphs, None
        try:
            return generate(pipe, encode, "flux")
        finally:
            hook.graphs = kept
            dfa.reset_state(pipe)

    with torch.no_grad():
        plain = generate(pipe, encode, "flux")
        assert counts() == (1, 1)
        transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                                init_lora_weights=False), adapter_name="style")
        with_lora = generate(pipe, encode, "flux")
        assert counts() == (2, 2)  # the loaded adapter: first call eager, second captured
        assert not torch.allclose(with_lora, plain) and torch.allclose(with_lora, eager_reference(), atol=1e-6)
        transformer.set_adapters(["style"], weights=[0.25])
        weaker = generate(pipe, encode, "flux")
        assert counts() == (3, 3)  # a new scale
        assert torch.allclose(weaker, eager_reference(), atol=1e-6) and not torch.allclose(weaker, with_lora)
        transformer.disable_lora()
        off = generate(pipe, encode, "flux")
        assert counts() == (4, 4) and torch.allclose(off, plain, atol=1e-6)
        replays = graphs.replays
        generate(pipe, encode, "flux")  # nothing changed: replayed
        assert counts() == (4, 4) and graphs.replays == replays + STEPS


def test_uncapturable_calls_run_eagerly_and_say_why(caplog):
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    dfa.apply(pipe, residual_plan(pipe, "flux"), backend="reference")
    graphs = dfa.use_cuda_graphs(pipe)  # CUDA graphs, CPU inputs
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = generate(pipe, encode, "flux")
    assert graphs.eager_calls == STEPS and graphs.captures == 0 and out.isfinite().all()
    assert sum("not all on a cuda device" in r.getMessage() for r in caplog.records) == 1  # said once

    graphs.device_type = "cpu"
    transformer = pipe.transformer
    inputs = dict(hidden_states=torch.randn(1, 64, transformer.config.in_channels),
                  encoder_hidden_states=torch.randn(1, 8, transformer.config.joint_attention_dim),
                  pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim),
                  timestep=torch.tensor([1.0]), img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3))
    dfa.reset_state(pipe)
    with caplog.at_level(logging.WARNING):  # gradients enabled: eagerly, tables; they refuse gradient tracking
        with pytest.raises(RuntimeError, match="cannot run under CUDA graphs: the call needs gradients"):
            transformer(**inputs)
    assert any("gradients are enabled" in r.getMessage() for r in caplog.records)


def test_plans_the_tables_cannot_express_are_refused():
    pipe = tiny_pipeline("flux")
    plan = residual_plan(pipe, "flux")
    dfa.apply(pipe, plan, backend="blocked")
    with pytest.raises(ValueError, match="backend 'blocked' takes no widths tensor"):
        dfa.use_cuda_graphs(pipe)
    dfa.remove(pipe)

    eight = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    eight.set(eight.module_names[0], 1, 0, "full_int8")
    dfa.apply(pipe, eight, backend="reference")
    with pytest.raises(ValueError, match="cannot run from CUDA graphs: it computes heads in 8 bits"):
        dfa.use_cuda_graphs(pipe)
    dfa.remove(pipe)

    blocks = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    blocks.set_block(blocks.block_names[1], 2, "block_cache")
    dfa.apply(pipe, blocks, backend="reference")
    with pytest.raises(ValueError, match="block methods"):
        dfa.use_cuda_graphs(pipe)
    dfa.remove(pipe)
    with pytest.raises(ValueError, match="runs no ditfa plan"):
        dfa.use_cuda_graphs(pipe)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: a GPU test")
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cuda_graphs_replay_planned_generations(family, backend):
    """Real graphs: a generation replayed from them equals the same calls run eagerly (the tables, the CPU stand-in's
    replays) and, within half-precision rounding, the step programs."""
    dtype = torch.float16  # (the fused kernel: fp16 / bf16)
    encode = TinyPromptEncoder(tiny_pipeline(family).transformer)

    def run(pipe):
        embeds = {k: v.to("cuda", dtype) for k, v in encode(["a red cube on a blue floor"]).items()}
        size = 64 if family == "sd3" else 128
        extra = {"guidance_scale": 5.0} if family == "sd3" else {}
        with torch.no_grad():
            return pipe(**embeds, num_inference_steps=STEPS, height=size, width=size, output_type="latent",
                        generator=torch.Generator("cuda").manual_seed(0), **extra).images.float()

    def pipeline():
        pipe = tiny_pipeline(family, dtype=dtype).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = pipeline()
    graphs = graphed(pipe, residual_plan(pipe, family), device_type="cuda", backend=backend)
    first, second = run(pipe), run(pipe)
    assert (graphs.eager_calls, graphs.captures, graphs.replays) == (1, 1, 2 * STEPS - 1)
    assert torch.equal(first, second)

    tables = pipeline()  # the same calls eagerly: the stand-in replays each captured call by running it again
    stand_in = graphed(tables, residual_plan(tables, family), device_type="cuda", backend=backend)
    stand_in._capture = recording
    assert torch.allclose(first, run(tables), atol=1e-3, rtol=1e-3)

    dfa.use_cuda_graphs(pipe, False)  # the step programs (another order of operations in fp16)
    eager = run(pipe)
    assert float((first - eager).norm() / eager.norm()) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: a GPU test")
def test_real_graphs_follow_adapter_changes():
    """Real graphs bake in a LoRA's kernels and scales: after loading, re-weighting and disabling one, each graphed
    generation equals the same generation run eagerly (a stale replay would return the old adapters' images)."""
    peft = pytest.importorskip("peft")
    dtype = torch.float16
    pipe = tiny_pipeline("flux", dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    embeds = {k: v.to("cuda", dtype) for k, v in encode(["a red cube on a blue floor"]).items()}

    def run():
        with torch.no_grad():
            return pipe(**embeds, num_inference_steps=STEPS, height=128, width=128, output_type="latent",
                        generator=torch.Generator("cuda").manual_seed(0)).images.float()

    def eager():
        dfa.use_cuda_graphs(pipe, False)
        try:
            return run()
        finally:
            dfa.use_cuda_graphs(pipe)

    dfa.apply(pipe, residual_plan(pipe, "flux"), backend="reference")
    dfa.use_cuda_graphs(pipe)
    run(), run()  # captured, then replayed
    pipe.transformer.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                                 init_lora_weights=False), adapter_name="style")
    for change in (lambda: None, lambda: pipe.transformer.set_adapters(["style"], weights=[0.25]),
                   pipe.transformer.disable_lora):
        change()
        graphed_images = (run(), run())  # captured again, then replayed
        want = eager()
        for got in graphed_images:
            assert float((got - want).norm() / want.norm()) < 1e-3
