"""`torch.compile(fullgraph=True)` of a planned transformer, driven by its pipeline: no graph break, the compiled
generation equals the eager one, and a second generation compiles nothing new.

The graphs are counted with a counting backend (each graph Dynamo captures is handed to it once) that runs them as
traced, so the test checks what Dynamo sees -- graph breaks, guards, recompiles -- on CPU in seconds; inductor's code
generation is exercised by the GPU benchmark (`benchmarks/e2e.py --compile`)."""

import pytest
import torch

import ditfa_optimum as dfa
from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline
from plan_helpers import residual_plan

STEPS = 4


def mixed_plan(pipe, family: str):
    plan = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    for step in range(1, STEPS):
        for name in plan.module_names:
            plan.set(name, step, 0, "arrow:1/2")
            plan.set(name, step, 1, "cache" if step % 2 or family == "flux" else "cfg_share")
    return plan


def generate(pipe, encode, family: str):
    size = 64 if family == "sd3" else 128
    extra = {"guidance_scale": 5.0} if family == "sd3" else {}
    return pipe(**encode(["a red cube on a blue floor"]), num_inference_steps=STEPS, height=size, width=size,
                output_type="latent", generator=torch.Generator().manual_seed(0), **extra).images


@pytest.mark.parametrize("backend", ["auto", "reference"])  # on the CPU "auto" is `blocked`: no tables
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fullgraph_compile_of_a_planned_transformer(family, backend):
    torch._dynamo.reset()
    pipe = tiny_pipeline(family)  # compiled from its first call (nothing cached by an eager run before)
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    dfa.apply(pipe, mixed_plan(pipe, family), backend=backend)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    pipe.transformer.compile(fullgraph=True, backend=counting_backend)  # fullgraph: any graph break raises
    try:
        with torch.no_grad():
            compiled = generate(pipe, encode, family)
            first = len(graphs)
            generate(pipe, encode, family)
            second = len(graphs)
            again = generate(pipe, encode, family)
    finally:
        torch._dynamo.reset()

    reference = tiny_pipeline(family)  # the same weights, eager
    reference.set_progress_bar_config(disable=True)
    dfa.apply(reference, mixed_plan(reference, family), backend=backend)
    with torch.no_grad():
        eager = generate(reference, encode, family)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, compiled)
    if family == "flux" and backend == "reference":
        # FLUX's pipeline opens a cache context before each call: the hook advances the step there, eagerly, and the
        # compiled transformer runs the plan's tables: two graphs (the first call finds no kept output yet)
        assert first <= 2 and second == first
    else:
        # SD3's pipeline opens none (and `blocked` takes no widths tensor): the traced hook reads the step, a Python
        # value, so about one graph per step; the second generation may add one (memory left by the first), after
        # that nothing compiles again
        assert 1 <= first <= STEPS + 1 and second <= first + 1
    assert len(graphs) == second


def block_kinds(transformer) -> int:
    return len({type(block).__name__ + str(getattr(block, "context_pre_only", ""))
                for _, block in dfa.get_adapter(transformer).blocks(transformer)})


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_compiled_blocks_share_their_graphs_over_blocks_and_steps(family):
    """Regional compilation with a plan runs the plan's step-independent form (`runtime/tables.py`): the blocks of one
    kind and all steps share one graph (two: the first call of a generation finds no memory yet) instead of one graph
    per block and step, and the generation equals the eager one."""
    torch._dynamo.reset()
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    encode = TinyPromptEncoder(pipe.transformer)
    dfa.apply(pipe, residual_plan(pipe, family), backend="reference")
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dfa.compile_blocks(pipe, fullgraph=True, backend=counting_backend)
    kinds = block_kinds(pipe.transformer)
    try:
        with torch.no_grad():
            compiled = generate(pipe, encode, family)
            first = len(graphs)
            again = generate(pipe, encode, family)
    finally:
        torch._dynamo.reset()
    reference = tiny_pipeline(family)
    reference.set_progress_bar_config(disable=True)
    dfa.apply(reference, residual_plan(reference, family), backend="reference")
    with torch.no_grad():
        eager = generate(reference, encode, family)
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, compiled)
    # per block kind: the first call (no memory yet) and the later ones; nothing compiles in the second generation.
    # (The step programs compile one graph per block and step: 4 x 4 (SD3) and 6 x 4 (FLUX) here)
    assert first <= 2 * kinds and len(graphs) == first


def test_only_modules_with_residual_heads_record_and_only_modules_with_cache_heads_keep():
    """A module's tables launch the recording arrow call only when the module has `arrow_residual` heads, and keep its
    output only when it has `cache` heads (each a second kernel launch or a whole output per module and step)."""
    from ditfa_optimum.runtime.tables import ModuleTable, Vocabulary

    pipe = tiny_pipeline("flux")
    plan = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    first, second = plan.module_names[:2]
    plan.set(first, 2, 0, "arrow_residual:1/2")
    plan.set(second, 2, 0, "cache")
    vocabulary = Vocabulary(plan)
    recording, caching = ModuleTable(plan, first, vocabulary), ModuleTable(plan, second, vocabulary)
    assert recording.records is not None and int((recording.records != vocabulary.none).sum()) == 1
    assert not recording.keeps and caching.keeps and caching.records is None
    full = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    assert ModuleTable(full, first, Vocabulary(full)).all_full and not recording.all_full


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_fused_kernel_runs_the_tables_as_the_step_programs(family):
    """The triton backend's step-independent call (`attend_widths`: the launch table made on the device, every
    (sample, head) launched) equals the reference's at every step of a plan, under Triton's interpreter."""
    pytest.importorskip("triton")
    from ditfa_optimum.runtime.backends import get_backend
    from ditfa_optimum.runtime.tables import ModuleTable, Vocabulary

    pipe = tiny_pipeline(family)
    plan = residual_plan(pipe, family, block_size=16)
    vocabulary = Vocabulary(plan)
    name = plan.module_names[0]
    table = ModuleTable(plan, name, vocabulary)
    spec = plan.spec(name)
    layout = spec.layout(64, 8, 16)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: Triton's interpreter (conftest)
    table.place(device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, spec.num_heads, layout.seq_len, 16, generator=gen).to(device) for _ in range(3))
    for step in range(STEPS):
        widths = vocabulary.widths(layout, 2, True, device).index_select(0, table.choice[step]).t()
        fused = get_backend("triton", device).attend_widths(q, k, v, layout, widths, 0)
        expected = get_backend("reference", device).attend_widths(q, k, v, layout, widths, 0)
        computed = (widths > 0)[:, :, None, None].expand_as(q)
        assert computed.any() and torch.allclose(fused[computed], expected[computed], atol=2e-5), step
        # into a given output (CUDA graphs: the kept output): computed pairs written, skipped ones left as they were
        for backend in ("triton", "reference"):
            given = torch.randn(q.shape, generator=gen).to(device)
            before = given.clone()
            written = get_backend(backend, device).attend_widths(q, k, v, layout, widths, 0, out=given)
            assert written is given and torch.equal(given[~computed], before[~computed]), (backend, step)
            assert torch.allclose(given[computed], expected[computed], atol=2e-5), (backend, step)


def _diffusers_version() -> tuple[int, ...]:
    import diffusers

    return tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())


# diffusers 0.37's hook registry wraps forward as (module, *args, **kwargs), which torch.export cannot bind keyword
# inputs to: it fails in torch's argument binding before the plan is reached (a TypeError naming 'module')
@pytest.mark.skipif(_diffusers_version() < (0, 42), reason="export of a hooked model fails in torch before the plan")
def test_torch_export_of_a_planned_transformer_is_refused_clearly():
    """An exported graph cannot follow the plan's steps (found by diffusers' own AOT-compile test with a plan applied,
    which otherwise failed deep in torch on the timestep read); the refusal says what to do, and leaves the plan
    runnable."""
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("flux")
    inputs = tiny_inputs(model, batch=1, height=4, width=4)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    with pytest.raises(RuntimeError, match=r"reads the step from this call's timestep, which this trace cannot read.*"
                                           r"ditfa_optimum.remove\(model\)"):
        torch.export.export(model, args=(), kwargs=inputs)
    with torch.no_grad():
        model(**inputs)
    assert dfa.get_runtime(model).state.step == 0
    dfa.remove(model)
    torch.export.export(model, args=(), kwargs=inputs)  # the stock model exports again


def test_a_torchscript_trace_of_a_planned_transformer_is_refused():
    """torch.jit.trace (and the legacy torch.onnx.export, dynamo=False, built on it) would record step 0's methods as
    constants: a graph that runs them at every step with no warning. It is refused; the stock model still traces."""
    import warnings

    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("sd3")
    inputs = tiny_inputs(model, batch=1, height=4, width=4)
    args = tuple(inputs.values())  # positionally: diffusers 0.37's hooked forward takes no keyword inputs to trace
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about Python branches
        with pytest.raises(RuntimeError, match=r"TorchScript trace .* silently wrong.*ditfa_optimum.remove\(model\)"):
            torch.jit.trace(model, args, strict=False)
        with torch.no_grad():
            model(**inputs)  # the plan still runs, from step 0
        assert dfa.get_runtime(model).state.step == 0
        dfa.remove(model)
        torch.jit.trace(model, args, strict=False)


def test_the_dynamo_onnx_export_of_a_planned_transformer_is_refused(tmp_path):
    """torch.onnx.export(dynamo=True) retries a failed torch.export as a draft export, which would bake one step's
    methods into the graph: every export mode is refused (export_onnx exports a plan, one graph per step)."""
    pytest.importorskip("onnxscript")
    import warnings

    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("sd3")
    inputs = tiny_inputs(model, batch=1, height=4, width=4)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, block_size=4))
    # diffusers < 0.42: torch.export cannot bind keyword inputs to the hooked forward and fails before the plan is
    # reached (a TypeError naming 'module', see above); the export must still fail and write nothing
    message = (r"(?s)reads the step from this call's timestep.*export_onnx" if _diffusers_version() >= (0, 42)
               else r"(?s)reads the step from this call's timestep.*export_onnx|required argument: 'module'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match=message):
            torch.onnx.export(model, (), tmp_path / "x.onnx", kwargs=inputs, dynamo=True, verbose=False)
    assert not (tmp_path / "x.onnx").exists()
    with torch.no_grad():
        model(**inputs)
    assert dfa.get_runtime(model).state.step == 0


def test_the_runtime_logs_from_inside_a_compiled_transformer(caplog):
    """Dynamo cannot trace a logger call, so under fullgraph a message the runtime logs mid-step was a compile error
    (found on a GPU: a generation cut short, then another started in the same compiled transformer, failed with
    "logging.Logger method not supported"). Now the restart compiles and runs as eager, and a message without step
    numbers (the CFG warning, `runtime.log.say`) still reaches the log from the compiled graph."""
    import logging

    from ditfa_optimum.tiny import tiny_inputs

    torch._dynamo.reset()
    pipe = tiny_pipeline("sd3")
    plan = dfa.uniform_plan(pipe, num_steps=STEPS, method="full", block_size=4)
    for name in plan.module_names:
        plan.set(name, 1, 0, "cfg_share")  # the pipeline is not running, so the runtime cannot tell CFG: a warning
        plan.set(name, 1, 1, "arrow:1/2")
    dfa.apply(pipe, plan)
    pipe.scheduler.set_timesteps(STEPS)  # the plan's step count, as the pipeline would set it
    inputs = tiny_inputs(pipe.transformer, batch=2, height=8, width=8)
    compiled = torch.compile(pipe.transformer, fullgraph=True, backend="eager")

    def call(step):  # positioned as a pipeline positions its calls: the scheduler's step_index, no device sync
        pipe.scheduler._step_index = step
        return compiled(**inputs).sample

    try:
        with caplog.at_level(logging.INFO, logger="ditfa_optimum"), torch.no_grad():
            first, second = call(0), call(1)
            restarted = call(0)  # a new generation after step 1 of 4, without the pipeline's reset
            eager_pipe = tiny_pipeline("sd3")
            dfa.apply(eager_pipe, plan)
            eager_pipe.scheduler.set_timesteps(STEPS)
            eager_pipe.scheduler._step_index = 0
            eager_first = eager_pipe.transformer(**inputs).sample
            eager_pipe.scheduler._step_index = 1
            eager_second = eager_pipe.transformer(**inputs).sample
    finally:
        torch._dynamo.reset()
    text = caplog.text
    assert "cannot tell whether the batch is batched CFG" in text
    assert torch.equal(restarted, first)
    assert torch.allclose(first, eager_first, atol=1e-5) and torch.allclose(second, eager_second, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor with the triton kernel: a GPU test")
@pytest.mark.parametrize("mode", ["whole", "blocks"])
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_inductor_compile_with_the_triton_kernel_follows_the_plan(family, mode):
    """What users run on a GPU: `torch.compile(transformer, fullgraph=True)` (inductor) with the fused kernel as a
    custom op, stepped as a pipeline steps it (scheduler ``step_index``), equal to eager at every step of a plan with
    arrow, cache and (SD3) cfg_share heads; and the same with only the blocks compiled (regional compilation)."""
    import types

    from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    heads = dict(attention_head_dim=64, num_attention_heads=2)  # 128 wide
    heads.update(axes_dims_rope=(16, 24, 24)) if family == "flux" else heads.update(caption_projection_dim=128)
    # float32 (the kernel computes it without TF32): in bfloat16, inductor's fusions alone moved the all-full step 0
    # of this random model by 4% (relative norm) from eager, more than a plan's error would show
    model = tiny_transformer(family, **heads).to("cuda")
    inputs = {k: v.to("cuda") for k, v in tiny_inputs(model, batch=2, height=32, width=32, text_tokens=16).items()}
    plan = dfa.uniform_plan(model, num_steps=STEPS, method="full", block_size=64)  # 1024 image tokens, 16 blocks
    for name in plan.module_names:
        for step in range(1, STEPS):
            plan.set(name, step, 0, "arrow:1/4")
            plan.set(name, step, 1, "cache" if step % 2 or family == "flux" else "cfg_share")

    def generation(run):
        dfa.apply(model, plan, backend="triton", cfg=family == "sd3")
        hook = model._diffusers_hook.get_hook(TRANSFORMER_HOOK)
        outs = []
        try:
            with torch.no_grad():
                for step in range(STEPS):
                    hook.scheduler = types.SimpleNamespace(step_index=step)
                    outs.append(run(**inputs).sample)
        finally:
            dfa.remove(model)
        return outs

    eager = generation(model)
    torch._dynamo.reset()
    try:
        if mode == "whole":
            compiled = generation(torch.compile(model, fullgraph=True))
        else:  # regional: the plan's step-independent form (runtime/tables.py)
            dfa.compile_blocks(model, fullgraph=True)
            compiled = generation(model)
    finally:
        torch._dynamo.reset()
    for step, (c, e) in enumerate(zip(compiled, eager)):  # a wrong step or cached head would differ wholesale
        assert float((c - e).norm() / e.norm()) < 1e-3, (step, float((c - e).norm() / e.norm()))


def test_a_branch_that_starts_at_a_cached_step_is_refused_before_it_runs():
    """The tables' finishing cannot check on the host whether a `cache` head has a stored output; the transformer hook
    checks instead: a call whose branch ran no earlier step of the generation, at a step where the plan reads memory,
    is refused (as the step programs refuse it in the module), and the next generation runs clean."""
    import types

    from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("sd3")
    inputs = tiny_inputs(model, batch=1, height=8, width=8)
    plan = dfa.uniform_plan(model, num_steps=STEPS, method="full", block_size=4)
    for name in plan.module_names:
        plan.set(name, 2, 0, "cache")
    dfa.apply(model, plan)
    hook = model._diffusers_hook.get_hook(TRANSFORMER_HOOK)
    with torch.no_grad():
        for step in (0, 1, 2):
            hook.scheduler = types.SimpleNamespace(step_index=step)
            model(**inputs)  # branch 0 at step 2 reads what it kept at step 1
        with pytest.raises(RuntimeError, match=r"no earlier step of this generation"):
            model(**inputs)  # a second call at step 2 (another branch, like SD3's skip-layer guidance): nothing kept
    state = dfa.get_runtime(model).state
    assert state.step == -1  # reset: the next call starts a new generation


def test_the_step_tensor_follows_every_way_the_step_is_set():
    """Compiled blocks read the step from the state's device tensor: the hook fills it at every call, and so does
    `set_step` (blocks driven by hand), so a traced block never runs a stale step."""
    import types

    from ditfa_optimum.runtime.transformer_hook import TRANSFORMER_HOOK
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("flux")
    inputs = tiny_inputs(model, batch=1, height=8, width=8)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=STEPS, method="arrow:1/2", block_size=4))
    state = dfa.get_runtime(model).state
    hook = model._diffusers_hook.get_hook(TRANSFORMER_HOOK)
    assert state.step_tensor is None  # made at the first call, on its device
    with torch.no_grad():
        for step in range(2):
            hook.scheduler = types.SimpleNamespace(step_index=step)
            model(**inputs)
            assert state.step_tensor.tolist() == [step] and state.step_tensor.device == inputs["hidden_states"].device
    state.set_step(3)
    assert state.step_tensor.tolist() == [3]
    table = dfa.get_runtime(model).tables[dfa.get_runtime(model).plan.module_names[0]]
    assert table.choice.device == state.step_tensor.device


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_compile_blocks_without_a_plan_compiles_every_block_of_the_stock_model(family):
    """`compile_blocks` is regional compilation for any family the adapters know (SD3's class names no repeated
    blocks for diffusers' `compile_repeated_blocks`): every block compiled, the output the stock model's."""
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    torch._dynamo.reset()
    model = tiny_transformer(family)
    inputs = tiny_inputs(model, batch=1, height=8, width=8)
    with torch.no_grad():
        stock = model(**inputs).sample
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    try:
        count = dfa.compile_blocks(model, fullgraph=True, backend=counting_backend)
        with torch.no_grad():
            compiled = model(**inputs).sample
    finally:
        torch._dynamo.reset()
    blocks = dfa.get_adapter(model).blocks(model)
    assert count == len(blocks) and all(block._compiled_call_impl is not None for _, block in blocks)
    assert graphs and len(graphs) <= block_kinds(model)
    assert torch.allclose(compiled, stock, atol=1e-6)
