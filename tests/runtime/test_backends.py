"""Backends on a whole layer's mixed plan: every (sample, head) with its own band width, one call."""

import pytest
import torch

from conftest import DEVICES, naive_attention, naive_keep, rand_qkv
from ditfa_optimum.masks import TokenLayout
from ditfa_optimum.runtime import get_backend
from ditfa_optimum.runtime.backends import ENV_VAR

LAYOUTS = [
    TokenLayout(num_image_tokens=37, num_text_tokens=11, image_first=True, block_size=4),
    TokenLayout(num_image_tokens=37, num_text_tokens=11, image_first=False, block_size=4),
    TokenLayout(num_image_tokens=64, num_text_tokens=5, image_first=False, block_size=16),
]
IDS = ["image-first", "text-first", "text-first-b16"]
CPU = torch.device("cpu")
# FlexAttention's eager CPU path vs SDPA, both fp32: same math, different summation order
FLEX_TOL = dict(atol=1e-5, rtol=1e-5)


def mixed_widths(layout, B, H):
    n = layout.num_image_blocks
    widths = torch.randint(0, n + 1, (B, H))
    widths[0, 0], widths[-1, -1], widths[0, -1] = 0, n, 1  # always a skip, a full and a narrowest band
    return widths


def expected(q, k, v, layout, widths):
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    for b, h in torch.nonzero(widths).tolist():
        keep = naive_keep(layout, int(widths[b, h]))
        out[b, h] = naive_attention(q[b, h], k[b, h], v[b, h], keep)
    return out


#: (device, backend): every backend on the CPU, and on CUDA where there is one (the fused kernel there too; its
#: CPU interpreter is tested in tests/kernels)
ON_DEVICES = [(d, b) for d in DEVICES for b in ["reference", "blocked", "flex"] + (["triton"] if d == "cuda" else [])]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("device, backend", ON_DEVICES)
def test_backend_mixed_plan_matches_naive(layout, device, backend):
    B, H = 2, 5
    q, k, v = rand_qkv(B, H, layout.seq_len, 8)
    widths = mixed_widths(layout, B, H)
    out = get_backend(backend, torch.device(device)).attend(*(x.to(device) for x in (q, k, v)), layout, widths)
    ref = expected(q, k, v, layout, widths)
    computed = widths > 0
    torch.testing.assert_close(out.cpu()[computed].double(), ref[computed], atol=2e-5, rtol=1e-5)


# the blocked backend also on the mini model's layout (1024 image tokens in blocks of 32) and an image-only call
BLOCKED_LAYOUTS = LAYOUTS + [TokenLayout(1024, 32, image_first=True, block_size=32),
                             TokenLayout(50, 0, image_first=False, block_size=8)]
BLOCKED_IDS = IDS + ["mini-mmdit", "image-only"]
BLOCKED_TOL = dict(atol=2e-6, rtol=1e-5)  # the same SDPA math on fewer keys


@pytest.mark.parametrize("backend, layout, tol",
                         [("flex", layout, FLEX_TOL) for layout in LAYOUTS]
                         + [("blocked", layout, BLOCKED_TOL) for layout in BLOCKED_LAYOUTS],
                         ids=[f"flex-{i}" for i in IDS] + [f"blocked-{i}" for i in BLOCKED_IDS])
def test_backend_equals_reference(backend, layout, tol, device):
    B, H = 3, 4
    q, k, v = rand_qkv(B, H, layout.seq_len, 16, device=device)
    widths = mixed_widths(layout, B, H)
    ref = get_backend("reference", device).attend(q, k, v, layout, widths)
    out = get_backend(backend, device).attend(q, k, v, layout, widths)
    computed = widths > 0
    torch.testing.assert_close(out[computed], ref[computed], **tol)


@pytest.mark.parametrize("head_dim", [8, 16])
def test_flex_pads_narrow_heads_without_changing_the_result(head_dim):
    """Compiled FlexAttention on CUDA takes heads of 16 dimensions or more; narrower ones are zero-padded (tested here
    through the eager path; on a GPU test_backend_mixed_plan_matches_naive runs 8-dimension heads through it)."""
    from torch.nn.attention.flex_attention import flex_attention

    from ditfa_optimum.runtime.flex import arrow_block_mask, padded_call

    layout = LAYOUTS[0]
    q, k, v = rand_qkv(2, 3, layout.seq_len, head_dim)
    widths = mixed_widths(layout, 2, 3)
    mask = arrow_block_mask(layout, widths, tile=8)
    seen = []

    def flex(q_, k_, v_, **kwargs):
        seen.append(q_.shape[-1])
        return flex_attention(q_, k_, v_, **kwargs)

    out = padded_call(flex, q, k, v, mask, 16)
    assert seen == [16] and out.shape == q.shape
    computed = widths > 0
    torch.testing.assert_close(out[computed], flex_attention(q, k, v, block_mask=mask)[computed], **FLEX_TOL)


def test_reference_all_full_is_plain_sdpa():
    layout = TokenLayout(num_image_tokens=20, num_text_tokens=3, block_size=4)
    q, k, v = rand_qkv(2, 3, layout.seq_len, 8)
    widths = torch.full((2, 3), layout.num_image_blocks)
    out = get_backend("reference", CPU).attend(q, k, v, layout, widths)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_dispatch(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    # flex's CPU path is eager-only and the reference is the test oracle: neither is picked automatically
    assert get_backend("auto", CPU).name == "blocked"
    assert get_backend("flex", CPU).name == "flex"
    monkeypatch.setenv(ENV_VAR, "flex")
    assert get_backend(None, CPU).name == "flex"
    with pytest.raises(ValueError, match="unknown attention backend 'cuda-magic'"):
        get_backend("cuda-magic", CPU)
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=r"\$DITFA_BACKEND"):
        get_backend(None, CPU)


@pytest.mark.parametrize("layout", LAYOUTS + [TokenLayout(100, 21, image_first=False, block_size=8)],
                         ids=IDS + ["text-first-unaligned"])
@pytest.mark.parametrize("tile", [4, 8, 16])
def test_flex_block_mask_matches_create_block_mask(layout, tile):
    from torch.nn.attention.flex_attention import create_block_mask

    from ditfa_optimum.runtime.flex import arrow_block_mask, arrow_mask_mod

    widths = mixed_widths(layout, 2, 3)
    S = layout.seq_len
    ours = arrow_block_mask(layout, widths, tile=tile)
    theirs = create_block_mask(arrow_mask_mod(layout, widths), 2, 3, S, S, device="cpu", BLOCK_SIZE=tile)
    # same tiles visited, and the same split between full tiles (no mask_mod) and partial ones
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)


def test_host_cache_shares_equal_keys_and_keeps_at_most_its_size():
    from ditfa_optimum.runtime.backends import HostCache, Widths

    cache, made = HostCache(2), []

    def make(tag):
        return lambda: made.append(tag) or tag

    a, b = Widths(((1, 4),), 4), Widths(((1, 4),), 4)  # equal widths of two modules
    assert cache.get(a.rows, make("a")) == "a" and cache.get(b.rows, make("b")) == "a" and made == ["a"]
    cache.get(((2, 4),), make("c"))
    cache.get(a.rows, make("a again"))  # used last: survives the next eviction
    cache.get(((3, 4),), make("d"))
    assert cache.get(a.rows, make("a third")) == "a" and cache.get(((2, 4),), make("c again")) == "c again"
    assert made == ["a", "c", "d", "c again"]


def test_a_plan_with_more_width_tables_than_the_cache_derives_each_once(monkeypatch):
    """The triton backend's launch tables live on the runtime's `Widths` (one per module program and shape): a plan
    with more distinct width tables than the shared cache holds derived every table again at every call of every
    generation (an LRU read in order always misses), a host-to-device copy per call that made eager 1K trajectories
    host-bound on an H200."""
    pytest.importorskip("triton")
    import ditfa_optimum as dfa
    from ditfa_optimum.kernels import headwise_attention as kernel
    from ditfa_optimum.runtime import backends
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    model = tiny_transformer("flux")
    steps = 3
    plan = dfa.uniform_plan(model, num_steps=steps, block_size=16)
    for i, name in enumerate(plan.module_names):  # a distinct width table per (module, step)
        for step in range(1, steps):
            plan.set(name, step, (i + step) % 2, "arrow:1/2")
    dfa.apply(model, plan, backend="triton")
    backends._BACKENDS["triton"]._widths.size = 1  # the shared cache holds one table
    made = []
    original = kernel.launch_table
    monkeypatch.setattr(kernel, "launch_table", lambda *a, **k: made.append(1) or original(*a, **k))
    inputs = tiny_inputs(model, batch=1, height=8, width=8, text_tokens=16)
    try:
        with torch.no_grad():
            for generation in range(2):
                for step in range(steps):
                    model(**{**inputs, "timestep": inputs["timestep"] * 0 + 1 - step / steps})
                if generation == 0:
                    first = len(made)
    finally:
        backends._BACKENDS["triton"]._widths.size = 256
    distinct = sum(len({id(p) for p in dfa.get_runtime(model).programs[n][1:]}) for n in plan.module_names)
    assert 0 < first <= distinct and len(made) == first  # the second generation derives nothing


def test_calls_that_need_gradients_get_a_differentiable_backend(monkeypatch, caplog):
    """Training through a plan on CUDA failed in diffusers' own training tests: "auto" chose the fused kernel (no
    backward) or FlexAttention (its BlockMask lacks the backward's query blocks). With gradients needed, "auto" skips
    backends that declare ``differentiable = False`` and a named one is refused with what to use."""
    import ditfa_optimum as dfa
    from ditfa_optimum.runtime import backends
    from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

    class NoGradients:
        name, differentiable = "no-gradients", False

        def available(self, device):
            return True

        def attend(self, q, k, v, layout, widths):
            assert not backends.needs_grad(q, k, v), "called for a call that needs gradients"
            return backends._BACKENDS["blocked"].attend(q, k, v, layout, widths)

    monkeypatch.setitem(backends._BACKENDS, "no-gradients", NoGradients())
    monkeypatch.setattr(backends, "AUTO_ORDER", ("no-gradients", "blocked"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert get_backend("auto", CPU).name == "no-gradients"
    monkeypatch.setattr(backends, "_warned_grad", set())
    assert get_backend("auto", CPU, grad=True).name == "blocked"
    assert "need gradients, which no-gradients cannot compute, so they run on 'blocked'" in caplog.text
    with pytest.raises(ValueError, match="'no-gradients' computes no gradients.*backend='auto'"):
        get_backend("no-gradients", CPU, grad=True)

    model = tiny_transformer("flux").train()
    inputs = tiny_inputs(model, batch=1, height=8, width=8)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, method="arrow:1/2", full_steps=0, block_size=4))
    model(**inputs)[0].square().mean().backward()  # through "blocked"
    assert model.transformer_blocks[0].attn.to_q.weight.grad is not None
    with torch.no_grad():
        model(**{**inputs, "timestep": inputs["timestep"] * 0.5})  # no gradients: the first choice again
    dfa.remove(model)
    dfa.apply(model, dfa.uniform_plan(model, num_steps=2, method="arrow:1/2", full_steps=0, block_size=4),
              backend="no-gradients")
    with pytest.raises(ValueError, match="computes no gradients"):
        model(**inputs)
