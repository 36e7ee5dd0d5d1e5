"""Block methods through the runtime on tiny SD3 / SD3.5 / FLUX transformers, against the stock blocks run by hand."""

import copy

import pytest
import torch

import ditfa_optimum as dfa
from ditfa_optimum.adapters import get_adapter
from ditfa_optimum.plan import CompressionPlan
from ditfa_optimum.runtime.blocks import BLOCK_HOOK, MLP_HOOK, install_blocks
from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

TIMESTEPS = [999.0, 800.0, 600.0, 400.0, 250.0, 100.0]
TOL = dict(atol=1e-5, rtol=1e-5)  # the same fp32 operations in the same order: differences are rounding only

# block -> method per step; c compute, C block_cache, T block_taylor, M mlp_cache
SCHEDULES = {
    "sd3": {
        "transformer_blocks.0": "cTcccc",  # taylor with one earlier run: plain reuse
        "transformer_blocks.1": "ccCTMT",  # taylor from (1, 0); mlp_cache from step 1; taylor from (4, 1)
        "transformer_blocks.2": "cMMCcT",  # mlp_cache twice from step 0; block_cache from an mlp_cache step
        "transformer_blocks.3": "cCCcMC",  # the last block: no text output, only `ff`
    },
    "sd35": {
        "transformer_blocks.0": "cMCTcC",  # attn + attn2
        "transformer_blocks.1": "ccTTMc",
        "transformer_blocks.2": "cccccc",
        "transformer_blocks.3": "cMTcCc",
    },
    "flux": {
        "transformer_blocks.0": "cMTcCT",
        "transformer_blocks.1": "ccCTMc",
        "single_transformer_blocks.0": "cCTcTC",
        "single_transformer_blocks.1": "ccTTcC",
    },
}
LETTERS = {"c": "compute", "C": "block_cache", "T": "block_taylor", "M": "mlp_cache"}
OVERRIDES = {"flux": dict(num_layers=2, num_single_layers=2)}


def make_plan(model, family, heads):
    """The family's block schedule, with full heads (``heads="full"``) or a head mix: arrow, and `cache` wherever the
    block ran at the step before."""
    plan = dfa.uniform_plan(model, num_steps=len(TIMESTEPS), block_size=4)
    for block, letters in SCHEDULES[family].items():
        for step, letter in enumerate(letters):
            if letter != "c":
                plan.set_block(block, step, LETTERS[letter])
    if heads == "mixed":
        for spec in plan.modules:
            runs = plan.block_runs(plan.block_of(spec.name).name)
            for step in range(1, plan.num_steps):
                for head in range(spec.num_heads):
                    if runs[step - 1] and (step + head) % 3 == 0:
                        plan.set(spec.name, step, head, "cache")
                    elif head % 2:
                        plan.set(spec.name, step, head, "arrow:1/2")
    return plan


class Record(torch.nn.Module):
    def __init__(self, mlp, into, name):
        super().__init__()
        self.mlp, self.into, self.name = mlp, into, name

    def forward(self, x):
        self.into[self.name] = out = self.mlp(x)
        return out


class Replay(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


class HandBlock(torch.nn.Module):
    """A stock block run as its schedule says, written straight from the method definitions. Keeps every residual
    and MLP output of every step (per branch); the test sets ``step`` and ``branch`` before each call."""

    def __init__(self, block, methods):
        super().__init__()
        self.block, self.methods = block, methods
        self.mlp_names = [n for n in ("ff", "ff_context") if getattr(block, n, None) is not None]
        self.memory, self.step, self.branch = {}, None, 0

    def forward(self, hidden_states, encoder_hidden_states, **kwargs):
        mem = self.memory.setdefault(self.branch, {"residual": {}, "mlp": {}})
        t, method = self.step, self.methods[self.step]
        if method in ("compute", "mlp_cache"):
            originals = {n: getattr(self.block, n) for n in self.mlp_names}
            recorded = {}
            for n, mlp in originals.items():
                if method == "compute":
                    setattr(self.block, n, Record(mlp, recorded, n))
                else:  # the MLP outputs of the last step where the MLP ran
                    setattr(self.block, n, Replay(mem["mlp"][max(mem["mlp"])][n]))
            try:
                text, image = self.block(hidden_states, encoder_hidden_states, **kwargs)
            finally:
                for n, mlp in originals.items():
                    setattr(self.block, n, mlp)
            if method == "compute":
                mem["mlp"][t] = recorded
            mem["residual"][t] = (image - hidden_states, None if text is None else text - encoder_hidden_states)
            return text, image
        ran = sorted(mem["residual"])
        r = mem["residual"][ran[-1]]
        if method == "block_taylor" and len(ran) > 1:
            a, b = ran[-1], ran[-2]
            r_b = mem["residual"][b]
            r = tuple(None if x is None else x + (x - y) * (t - a) / (a - b) for x, y in zip(r, r_b))
        return (None if r[1] is None else encoder_hidden_states + r[1]), hidden_states + r[0]


def hand_model(model, plan, heads):
    """A copy of the stock model whose blocks are `HandBlock`s; for mixed heads, the head-only plan runs in it."""
    ref = copy.deepcopy(model)
    if heads == "mixed":
        head_plan = CompressionPlan(plan.modules, plan.methods, plan.params, block_size=plan.block_size,
                                    model_class=plan.model_class)
        dfa.apply(ref, head_plan, backend="reference")
    hands = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(ref, prefix, [])
        for i in range(len(blocks)):
            name = f"{prefix}.{i}"
            hands.append(HandBlock(blocks[i], [str(plan.block_method(name, t)) for t in range(plan.num_steps)]))
            blocks[i] = hands[-1]
    return ref, hands


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("heads", ["full", "mixed"])
@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_block_methods_match_the_stock_blocks_run_by_hand(family, heads):
    model = tiny_transformer(family, **OVERRIDES.get(family, {}))
    plan = make_plan(model, family, heads)
    stock = copy.deepcopy(model)
    ref, hands = hand_model(model, plan, heads)
    runtime = dfa.apply(model, plan, backend="reference")
    branches = 2 if family == "flux" else 1  # FLUX true-CFG: a second call at the same timestep, its own memory
    differs = []
    for step, t in enumerate(TIMESTEPS):
        for branch in range(branches):
            inputs = tiny_inputs(model, batch=2, height=6, width=8, text_tokens=5, timestep=t,
                                 seed=int(torch.randint(0, 2**31, ())))
            got = forward(model, inputs)
            assert (runtime.state.step, runtime.state.branch) == (step, branch)
            for hand in hands:
                hand.step, hand.branch = step, branch
            torch.testing.assert_close(got, forward(ref, inputs), **TOL, msg=f"step {step} branch {branch}")
            differs.append(not torch.allclose(got, forward(stock, inputs), atol=1e-3))
    assert not differs[0] and all(differs[branches:])  # step 0 is stock; every later step skips something
    assert runtime.state.memory_bytes() == 0  # nothing is held after the last step


def test_memory_holds_only_what_later_steps_read():
    model = tiny_transformer("sd3")
    plan = make_plan(model, "sd3", "full")
    runtime = dfa.apply(model, plan)
    held = []
    for t in TIMESTEPS:
        forward(model, tiny_inputs(model, height=4, width=4, timestep=t))
        mem = runtime.state.block_memory("transformer_blocks.1")
        held.append((sorted(mem.residuals), sorted(mem.mlp)))
    # "ccCTMT": step 2 reads residual 1; step 3 residuals 1, 0; step 4 the MLP of step 1; step 5 residuals 4, 1
    assert held == [([0], []), ([0, 1], [1]), ([0, 1], [1]), ([1], [1]), ([1, 4], []), ([], [])]
    assert plan.block_keeps("transformer_blocks.1") == {("residual", 1): 5, ("residual", 0): 3, ("mlp", 1): 4,
                                                         ("residual", 4): 5}


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_remove_gives_the_stock_model_back_exactly(family):
    model = tiny_transformer(family)
    inputs = tiny_inputs(model, height=6, width=6)
    stock_state = {k: v.clone() for k, v in model.state_dict().items()}
    stock_out = forward(model, inputs)
    processors = dict(model.attn_processors)
    plan = dfa.uniform_plan(model, num_steps=3, block_size=4)
    for block in plan.block_names:
        plan.set_block(block, 1, "block_cache" if "single" in block else "mlp_cache")
        plan.set_block(block, 2, "block_taylor")
    dfa.apply(model, plan)
    assert any(hasattr(m, "_diffusers_hook") for m in model.modules())
    for t in TIMESTEPS[:3]:
        forward(model, {**inputs, "timestep": inputs["timestep"] * 0 + t / (1000 if family == "flux" else 1)})
    dfa.remove(model)

    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in model.modules())
    assert all(model.attn_processors[n] is p for n, p in processors.items())
    state = model.state_dict()
    assert state.keys() == stock_state.keys() and all(torch.equal(state[k], stock_state[k]) for k in state)
    assert torch.equal(forward(model, inputs), stock_out)


def test_all_compute_blocks_install_no_block_hooks():
    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=2, block_size=4)
    assert plan.blocks and not plan.skips_blocks
    dfa.apply(model, plan)
    hooked = [m for m in model.modules() if hasattr(m, "_diffusers_hook")]
    assert hooked == [model] and list(model._diffusers_hook.hooks) == ["ditfa_transformer"]  # the step state only
    dfa.remove(model)
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in model.modules())


def test_a_block_not_called_when_its_residual_is_needed_raises():
    model = tiny_transformer("sd3")
    plan = dfa.uniform_plan(model, num_steps=3, block_size=4)
    plan.set_block("transformer_blocks.1", 2, "block_cache")
    dfa.apply(model, plan)
    inputs = tiny_inputs(model, height=4, width=4)
    forward(model, {**inputs, "timestep": inputs["timestep"] * 0 + 999})
    forward(model, {**inputs, "timestep": inputs["timestep"] * 0 + 500, "skip_layers": [1]})
    with pytest.raises(RuntimeError, match=r"block 'transformer_blocks.1' at step 2 reads the residual recorded at "
                                           r"step 1, but none was recorded.*skip_layers"):
        forward(model, {**inputs, "timestep": inputs["timestep"] * 0 + 100})


def test_sd3_pipeline_with_block_methods_and_cfg():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=tiny_transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(),
                                    **dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2",
                                                     "tokenizer_2", "text_encoder_3", "tokenizer_3"]))
    pipe.set_progress_bar_config(disable=True)
    emb, pooled = torch.randn(2, 9, 32), torch.randn(2, 64)

    def run():
        return pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=torch.zeros_like(emb),
                    negative_pooled_prompt_embeds=torch.zeros_like(pooled), height=48, width=48,
                    num_inference_steps=6, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    stock = run()
    runtime = dfa.apply(pipe, make_plan(pipe.transformer, "sd3", "mixed"))
    first = run()
    assert runtime.state.step == 5 and torch.isfinite(first).all() and not torch.allclose(first, stock, atol=1e-4)
    assert torch.equal(run(), first)  # a new generation starts afresh
    dfa.remove(pipe)
    assert torch.equal(run(), stock)


class CountingHandler:
    """Another component's handler (the install_blocks contract): runs every block and MLP, counting the calls and
    checking the streams it reads and rebuilds."""

    def __init__(self, adapter):
        self.adapter, self.calls = adapter, []

    def block(self, spec):
        def call(module, original_forward, args, kwargs):
            streams = self.adapter.block_inputs(spec, module, args, kwargs)
            out = original_forward(*args, **kwargs)
            back = self.adapter.block_output_streams(spec, out)
            assert back.image.shape == streams.image.shape
            self.calls.append(spec.name)
            return self.adapter.block_output(spec, back)
        return call

    def mlp(self, spec, name):
        def call(module, original_forward, args, kwargs):
            self.calls.append(name)
            return original_forward(*args, **kwargs)
        return call if name.endswith(".ff") else None


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_install_blocks_with_another_handler(family):
    model = tiny_transformer(family)
    inputs = tiny_inputs(model, height=4, width=6)
    stock = forward(model, inputs)
    adapter = get_adapter(model)
    handler = CountingHandler(adapter)
    blocks = adapter.blocks(model)
    installed = install_blocks(model, adapter, blocks, handler)
    assert torch.equal(forward(model, inputs), stock)
    expected = []
    for spec, _ in blocks:
        expected += [n for n in spec.mlps if n.endswith(".ff")] + [spec.name]  # an MLP returns inside its block
    assert handler.calls == expected
    assert model.transformer_blocks[0]._diffusers_hook.get_hook(BLOCK_HOOK) is not None
    assert model.transformer_blocks[0].ff._diffusers_hook.get_hook(MLP_HOOK) is not None
    with pytest.raises(ValueError, match="already has a 'ditfa_block' hook"):
        install_blocks(model, adapter, blocks, handler)
    installed.remove()
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    assert torch.equal(forward(model, inputs), stock)


# ---------------------------------------------------------------------------------------------------- adapter metadata
@pytest.mark.parametrize("family", ["sd3", "sd35", "flux"])
def test_block_specs_count_every_linear_once(family):
    model = tiny_transformer(family)
    blocks = get_adapter(model).blocks(model)
    attention = [s.name for s in get_adapter(model).module_specs(model)]
    assert [n for spec, _ in blocks for n in spec.attention] == attention
    for spec, block in blocks:
        total = sum(2 * m.in_features * m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear))
        if spec.mlps:  # separate image and text weights
            counted = spec.attn_proj_image + spec.attn_proj_text + spec.mlp_image + spec.mlp_text + spec.modulation
        else:  # FLUX single stream: every token through the same weights
            assert (spec.attn_proj_image, spec.mlp_image) == (spec.attn_proj_text, spec.mlp_text)
            counted = spec.attn_proj_image + spec.mlp_image + spec.modulation
        assert counted == total, spec.name
        for name in spec.mlps:
            assert isinstance(model.get_submodule(name), torch.nn.Module)
