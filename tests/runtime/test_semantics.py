"""cache / cfg_share / arrow_residual over a 4-step denoising loop, against a hand-written loop."""

import pytest
import torch

from conftest import DEVICES, naive_attention, naive_keep, rand_qkv
from ditfa_optimum.masks import TokenLayout, window_blocks
from ditfa_optimum.plan import CompressionPlan, ModuleSpec
from ditfa_optimum.runtime import PlanRuntime

SPEC = ModuleSpec("blocks.0.attn", num_heads=5, head_dim=8, image_first=False)
# head:   0       1        2                    3               4
TABLE = [
    ["full", "full", "full",               "full",        "arrow:1/2"],  # step 0
    ["full", "cache", "cfg_share",          "arrow:1/4",   "cache"],      # step 1
    ["full", "cache", "arrow_residual:1/2", "full",        "cfg_share"],  # step 2
    ["full", "arrow:1/2", "arrow_residual:1/2", "cache",   "full"],       # step 3
]
TIMESTEPS = [1000.0, 750.0, 500.0, 250.0]


def make_plan():
    return CompressionPlan.from_methods([SPEC], {SPEC.name: TABLE}, block_size=4)


@pytest.mark.parametrize("device, backend", [(d, b) for d in DEVICES for b in ["reference", "blocked", "flex"]
                                             + (["triton"] if d == "cuda" else [])])
@pytest.mark.parametrize("image_first", [True, False], ids=["image-first", "text-first"])
def test_four_step_loop_matches_hand_written(device, backend, image_first):
    spec = ModuleSpec(SPEC.name, SPEC.num_heads, SPEC.head_dim, image_first=image_first)
    plan = CompressionPlan.from_methods([spec], {spec.name: TABLE}, block_size=4)
    runtime = PlanRuntime(plan, backend=backend, cfg=True)
    module = runtime.module(spec)
    layout = TokenLayout(num_image_tokens=30, num_text_tokens=7, image_first=image_first, block_size=4)
    n = layout.num_image_blocks
    B, S, D = 4, layout.seq_len, 8  # 2 prompts x [uncond, cond]

    def full(q, k, v):
        return naive_attention(q, k, v)

    def arrow(q, k, v, fraction):
        return naive_attention(q, k, v, naive_keep(layout, window_blocks(fraction, n)))

    outs = []
    for step, t in enumerate(TIMESTEPS):
        q, k, v = rand_qkv(B, 5, S, D)
        runtime.state.on_transformer_call(torch.tensor([t] * B), layout.num_text_tokens)
        got = module(*(x.to(device) for x in (q, k, v)), num_text_tokens=layout.num_text_tokens).double().cpu()

        h = lambda i: (q[:, i], k[:, i], v[:, i])  # noqa: E731
        if step == 0:
            want = [full(*h(i)) for i in range(4)] + [arrow(*h(4), 1 / 2)]
            residual_h2 = want[2] - arrow(*h(2), 1 / 2)
        elif step == 1:
            cond = full(*(x[2:] for x in h(2)))
            want = [full(*h(0)), outs[0][:, 1], torch.cat([cond, cond]), arrow(*h(3), 1 / 4), outs[0][:, 4]]
        elif step == 2:
            cond = full(*(x[2:] for x in h(4)))
            want = [full(*h(0)), outs[1][:, 1], arrow(*h(2), 1 / 2) + residual_h2, full(*h(3)),
                    torch.cat([cond, cond])]
        else:
            want = [full(*h(0)), arrow(*h(1), 1 / 2), arrow(*h(2), 1 / 2) + residual_h2, outs[2][:, 3], full(*h(4))]
        want = torch.stack(want, dim=1)
        torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5, msg=f"step {step}")
        outs.append(got)
        assert runtime.state.step == step

    # after the last step nothing is held any more
    assert runtime.state.memory_bytes() == 0


def test_cache_holds_only_heads_the_next_step_reads():
    plan = make_plan()
    runtime = PlanRuntime(plan, cfg=True)
    module = runtime.module(SPEC)
    layout = TokenLayout(num_image_tokens=30, num_text_tokens=7, image_first=False, block_size=4)
    B, S, D = 2, layout.seq_len, 8
    held = []
    for t in TIMESTEPS:
        runtime.state.on_transformer_call(t, 7)
        module(*rand_qkv(B, 5, S, D), num_text_tokens=7)
        mem = runtime.state.memory(SPEC.name)
        held.append(sorted(h for h, m in mem.items() if m.previous_output is not None))
    # step 0 keeps heads 1 and 4 (cached at step 1); step 1 keeps head 1 (cached at 2); step 2 keeps head 3
    assert held == [[1, 4], [1], [3], []]


def test_without_cfg_cfg_share_is_computed_in_full(caplog):
    plan = make_plan()
    runtime = PlanRuntime(plan, cfg=None)  # unknown: must not guess
    module = runtime.module(SPEC)
    layout = TokenLayout(num_image_tokens=30, num_text_tokens=7, image_first=False, block_size=4)
    for step, t in enumerate(TIMESTEPS[:2]):
        q, k, v = rand_qkv(4, 5, layout.seq_len, 8)
        runtime.state.on_transformer_call(t, 7)
        out = module(q, k, v, num_text_tokens=7)
    torch.testing.assert_close(out[:, 2].double(), naive_attention(q[:, 2], k[:, 2], v[:, 2]), atol=3e-5, rtol=1e-5)
    assert "cannot tell whether the batch is batched CFG" in caplog.text


def test_a_second_call_at_the_same_step_is_not_batched_cfg():
    """SD3's skip-layer guidance runs the conditional batch alone at the same timestep: `cfg_share` must not split it."""
    plan = make_plan()
    runtime = PlanRuntime(plan, cfg=True)
    module = runtime.module(SPEC)
    layout = TokenLayout(num_image_tokens=30, num_text_tokens=7, image_first=False, block_size=4)
    for t in TIMESTEPS[:2]:
        for batch in (4, 2):  # the CFG-batched call, then the conditional half alone (branch 1)
            q, k, v = rand_qkv(batch, 5, layout.seq_len, 8)
            runtime.state.on_transformer_call(t, 7)
            out = module(q, k, v, num_text_tokens=7)
    assert (runtime.state.step, runtime.state.branch) == (1, 1)
    torch.testing.assert_close(out[:, 2].double(), naive_attention(q[:, 2], k[:, 2], v[:, 2]), atol=3e-5, rtol=1e-5)
    assert not torch.allclose(out[0, 2], out[1, 2])  # each row its own attention, not a copied half


def test_step_tracking_from_timesteps():
    runtime = PlanRuntime(make_plan())
    st = runtime.state
    seen = []
    for t in [1000, 750, 750, 500, 250, 1000, 750]:  # a repeated timestep is a second call in the same step
        st.on_transformer_call(torch.tensor([t, t]), 7)
        seen.append((st.step, st.branch))
    assert seen == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (0, 0), (1, 0)]


def test_more_steps_than_the_plan_raises():
    runtime = PlanRuntime(make_plan())
    for t in TIMESTEPS:
        runtime.state.on_transformer_call(t, 7)
    with pytest.raises(ValueError, match="covers only 4 steps.*num_inference_steps=4"):
        runtime.state.on_transformer_call(100.0, 7)


def test_many_calls_at_one_timestep_warn_once(caplog):
    runtime = PlanRuntime(make_plan(), cfg=False)
    for _ in range(8):
        runtime.state.on_transformer_call(TIMESTEPS[0], 7)
    assert runtime.state.branch == 7
    assert caplog.text.count("transformer calls at the same step") == 1
    assert "reset_state" in caplog.text
