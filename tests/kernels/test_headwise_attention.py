"""The fused head-wise kernel against the definition, on fresh random inputs (CPU: Triton's interpreter, fp16/fp32;
on a GPU the same tests compile it)."""

import logging

import pytest
import torch

from conftest import naive_attention, naive_keep
from ditfa_optimum.masks import TokenLayout

triton = pytest.importorskip("triton")
from ditfa_optimum.kernels.headwise_attention import (check_inputs, headwise_attention, launch_table,  # noqa: E402
                                                     tune_key)
from ditfa_optimum.runtime import get_backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYOUTS = {
    "image-first-ragged": TokenLayout(70, 9, image_first=True, block_size=16),     # last image block 6 tokens
    "text-first-ragged": TokenLayout(70, 9, image_first=False, block_size=16),
    "text-first-long-text": TokenLayout(48, 40, image_first=False, block_size=16),  # text spans 3 query tiles
    "image-only": TokenLayout(64, 0, image_first=True, block_size=16),
    "block-32": TokenLayout(100, 13, image_first=True, block_size=32),            # 2 query tiles per image block
    "aligned": TokenLayout(128, 128, image_first=False, block_size=32),  # both lengths % 128 == 0: empty tails
}


def random_widths(layout, B, H):
    n = layout.num_image_blocks
    widths = torch.randint(0, n + 1, (B, H), dtype=torch.int32)
    widths[0, 0], widths[-1, -1], widths[0, -1] = 0, n, 1  # always a skip, a full head and the narrowest band
    return widths


def reference(q, k, v, layout, widths):
    """float64 attention of every computed (sample, head) with its own mask; NaN where skipped."""
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float64)
    for b, h in torch.nonzero(widths).tolist():
        keep = naive_keep(layout, int(widths[b, h]))
        qq, kk = q[b, h].double().cpu(), k[b, h].double().cpu()
        out[b, h] = naive_attention(qq, kk, v[b, h].cpu(), keep)
        scores = (qq @ kk.T / q.shape[-1] ** 0.5).masked_fill(~keep, float("-inf"))
        lse[b, h] = torch.logsumexp(scores, dim=-1)
    return out, lse


def torch_error(q, k, v, layout, widths, ref):
    """PyTorch's own same-precision error (masked SDPA in q's dtype) against the float64 reference."""
    worst = 0.0
    for b, h in torch.nonzero(widths).tolist():
        keep = naive_keep(layout, int(widths[b, h])).to(q.device)
        got = torch.nn.functional.scaled_dot_product_attention(q[b, h], k[b, h], v[b, h], attn_mask=keep)
        worst = max(worst, float((got.double().cpu() - ref[b, h]).abs().max()))
    return worst


# bf16 only compiled: Triton's CPU interpreter computes bf16 dots wrongly (2026-11-26, triton 3.6)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d).split(".")[-1] for d in DTYPES])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_kernel_matches_the_definition(name, head_dim, dtype):
    layout = LAYOUTS[name]
    B, H, S = 2, 3, layout.seq_len
    q, k, v = (torch.randn(B, H, S, head_dim, device=DEVICE).to(dtype) for _ in range(3))
    widths = random_widths(layout, B, H)
    out = torch.full((B, H, S, head_dim), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    lse = torch.full((B, H, S), float("nan"), device=DEVICE)
    headwise_attention(q, k, v, widths.to(DEVICE), layout.num_image_tokens, layout.num_text_tokens,
                       layout.image_first, layout.block_size, out=out, lse=lse)
    ref, ref_lse = reference(q, k, v, layout, widths)
    computed = widths > 0
    assert bool(out[~computed].isnan().all()), "the kernel wrote a skipped head"
    assert not bool(out[computed].isnan().any()), "the kernel left computed elements unwritten"
    err = float((out[computed].double().cpu() - ref[computed]).abs().max())
    if dtype == torch.float32:
        assert err < 1e-4
    else:  # flash-attn's rule, with a floor for the case where PyTorch computes in higher precision internally
        assert err <= max(2 * torch_error(q, k, v, layout, widths, ref), 2e-3), err
    lse_tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lse[computed].double().cpu(), ref_lse[computed], atol=lse_tol, rtol=lse_tol)


def test_strided_inputs_like_flux():
    """FLUX hands [B, S, H, D] tensors transposed to [B, H, S, D] views: non-contiguous heads."""
    layout = LAYOUTS["text-first-ragged"]
    B, H, S, D = 2, 3, layout.seq_len, 32
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    widths = random_widths(layout, B, H)
    out, _ = headwise_attention(q, k, v, widths.to(DEVICE), layout.num_image_tokens, layout.num_text_tokens,
                                layout.image_first, layout.block_size)
    ref, _ = reference(q, k, v, layout, widths)
    computed = widths > 0
    assert float((out[computed].double().cpu() - ref[computed]).abs().max()) < 1e-4


def test_backend_equals_reference_backend_and_falls_back(caplog):
    layout = LAYOUTS["image-first-ragged"]
    q, k, v = (torch.randn(2, 4, layout.seq_len, 16, device=DEVICE) for _ in range(3))
    widths = random_widths(layout, 2, 4).long()
    triton_backend = get_backend("triton", DEVICE)
    computed = widths > 0
    ours = triton_backend.attend(q, k, v, layout, widths)
    ref = get_backend("reference", DEVICE).attend(q, k, v, layout, widths)
    torch.testing.assert_close(ours[computed], ref[computed], atol=1e-4, rtol=1e-4)
    full = torch.full_like(widths, layout.num_image_blocks)
    assert torch.equal(triton_backend.attend(q, k, v, layout, full),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v))  # all full: SDPA
    q8, k8, v8 = (torch.randn(2, 4, layout.seq_len, 8, device=DEVICE) for _ in range(3))
    with caplog.at_level(logging.WARNING):
        out8 = triton_backend.attend(q8, k8, v8, layout, widths)
    assert "head dim must be one of" in caplog.text
    torch.testing.assert_close(out8[computed], get_backend("reference", DEVICE).attend(q8, k8, v8, layout, widths)[
        computed], atol=1e-4, rtol=1e-4)


def test_custom_op_registration():
    layout = LAYOUTS["text-first-ragged"]
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, device=DEVICE) for _ in range(3))
    widths = torch.tensor([[1, layout.num_image_blocks]], dtype=torch.int32, device=DEVICE)
    table = torch.tensor([[1, layout.num_image_blocks], [0, 1]], dtype=torch.int32, device=DEVICE)
    assert torch.equal(launch_table(widths), table)  # longest first: (sample * H + head, width) rows
    args = (q, k, v, widths, table, 1, layout.num_image_tokens, layout.num_text_tokens, layout.image_first,
            layout.block_size)
    torch.library.opcheck(torch.ops.ditfa.headwise_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    out, lse = torch.ops.ditfa.headwise_attention(*args)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32


def test_tune_key_is_the_rounded_log2_of_the_mean_computed_width():
    assert tune_key(torch.tensor([[16, 16, 0]])) == 4          # skipped heads do not count
    assert tune_key(torch.tensor([[8, 8], [8, 8]])) == 3
    assert tune_key(torch.tensor([[128, 16, 8, 0]])) == 6      # mean 50.7
    assert tune_key(torch.tensor([[1, 1]])) == 0
    assert tune_key(torch.zeros(1, 3, dtype=torch.int32)) == 0  # nothing computed


def test_autotuning_candidates_fit_every_block_size_and_head_dim():
    from ditfa_optimum.kernels.headwise_attention import CONFIGS, HEAD_DIMS, TILES, _prune, _tile

    for block_size in (64, 128, 192, 256):
        for head_dim in HEAD_DIMS:
            chosen = _prune(CONFIGS, dict(BS=block_size, HEAD_DIM=head_dim))
            assert chosen, (block_size, head_dim)
            assert all(block_size % c.kwargs["BLOCK_M"] == 0 and block_size % c.kwargs["BLOCK_N"] == 0
                       for c in chosen)
    shortlist = {_tile(c) for c in _prune(CONFIGS, dict(BS=128, HEAD_DIM=128))}
    assert shortlist == set(TILES[128])  # the measured front-runners only, at the default block size


def test_one_named_configuration_matches_the_default_launch():
    """``config=`` (the benchmarks' sweep) runs the same function; tiles that do not divide the block are refused."""
    layout = LAYOUTS["block-32"]
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16, device=DEVICE) for _ in range(3))
    widths = torch.tensor([[1, 2]], dtype=torch.int32, device=DEVICE)
    args = (q, k, v, widths, layout.num_image_tokens, layout.num_text_tokens, layout.image_first, layout.block_size)
    out, lse = headwise_attention(*args)
    named = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1 if DEVICE.type == "cpu" else 4, num_stages=2)
    out2, lse2 = headwise_attention(*args, config=named)
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse2, lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="must divide the mask block size 32"):
        headwise_attention(*args, config=triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}))


def test_without_the_lse_the_output_is_the_same():
    """``store_lse=False`` (the runtime's launches) writes the same output and allocates no LSE."""
    layout = LAYOUTS["block-32"]
    q, k, v = (torch.randn(2, 3, layout.seq_len, 16, device=DEVICE) for _ in range(3))
    widths = random_widths(layout, 2, 3).to(DEVICE)
    args = (q, k, v, widths, layout.num_image_tokens, layout.num_text_tokens, layout.image_first, layout.block_size)
    out, lse = headwise_attention(*args)
    out2, placeholder = headwise_attention(*args, store_lse=False)
    computed = widths > 0
    assert torch.equal(out2[computed], out[computed])
    assert lse.shape == (2, 3, layout.seq_len) and placeholder.numel() == 1


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the autotuner runs on a GPU only (the interpreter runs one tile)")
def test_later_launches_run_the_tuned_configuration_directly(monkeypatch):
    """The first launch of a shape goes through the autotuner; later ones launch its choice without it: the same
    output on the same inputs, and the definition's on fresh ones."""
    from ditfa_optimum.kernels import headwise_attention as kernel

    monkeypatch.setattr(kernel, "AUTOTUNE", True)  # (the suite's conftest switches autotuning off)

    layout = TokenLayout(512, 77, image_first=False, block_size=64)
    B, H, D = 1, 4, 64
    widths = torch.tensor([[0, 1, 4, layout.num_image_blocks]], dtype=torch.int32, device=DEVICE)
    args = (widths, layout.num_image_tokens, layout.num_text_tokens, layout.image_first, layout.block_size)
    q, k, v = (torch.randn(B, H, layout.seq_len, D, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    tuned = len(kernel._TUNED)
    first, _ = headwise_attention(q, k, v, *args, store_lse=False)
    assert len(kernel._TUNED) == tuned + 1
    calls = []
    original = kernel._autotuned_kernel.run
    kernel._autotuned_kernel.run = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        second, _ = headwise_attention(q, k, v, *args, store_lse=False)
        q2, k2, v2 = (torch.randn_like(q) for _ in range(3))
        fresh, _ = headwise_attention(q2, k2, v2, *args, store_lse=False)
    finally:
        kernel._autotuned_kernel.run = original
    assert not calls, "a tuned shape went through the autotuner again"
    computed = (widths > 0).cpu()
    assert torch.equal(second[computed], first[computed])
    ref, _ = reference(q2, k2, v2, layout, widths.cpu())
    err = float((fresh[computed].double().cpu() - ref[computed]).abs().max())
    assert err <= max(2 * torch_error(q2, k2, v2, layout, widths.cpu(), ref), 2e-3), err


@pytest.mark.parametrize("problem, words", [
    (dict(head_dim=24), "head dim must be one of"),
    (dict(dtype=torch.float64), "dtype must be fp16, bf16 or fp32"),
    (dict(block_size=8), "multiple of 16"),
])
def test_the_host_wrapper_validates(problem, words):
    D, dtype, bs = problem.get("head_dim", 16), problem.get("dtype", torch.float32), problem.get("block_size", 16)
    q = torch.randn(1, 1, 20, D, dtype=dtype)
    assert words in check_inputs(q, q, q, bs)
    with pytest.raises(ValueError, match=words):
        headwise_attention(q, q, q, torch.ones(1, 1, dtype=torch.int32), 10, 10, True, bs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_plan_through_diffusers_with_the_triton_backend(family):
    """A mixed plan in a real pipeline loop: the triton backend gives the reference backend's latents."""
    from ditfa_optimum import apply, remove
    from ditfa_optimum.calibrate import run_pipeline
    from ditfa_optimum.cli import demo_plan
    from ditfa_optimum.config import DiTFastAttnConfig
    from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline

    overrides = dict(attention_head_dim=16, caption_projection_dim=64) if family == "sd3" else {}  # FLUX: D=16
    pipe = tiny_pipeline(family, **overrides).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    encoder = TinyPromptEncoder(pipe.transformer)
    px = 64 if family == "sd3" else 128  # 64 image tokens
    config = DiTFastAttnConfig(num_inference_steps=3, height=px, width=px, guidance_scale=None if family == "flux"
                               else 4.0)
    plan = demo_plan(pipe.transformer, 3, ["full", "arrow:1/4", "cache", "cfg_share", "arrow:1/2"], block_size=16)
    latents = {}
    for backend in ("reference", "triton"):
        apply(pipe, plan, backend=backend)
        latents[backend] = run_pipeline(pipe, ["a red cube"], config, prompt_encoder=encoder)
        remove(pipe)
    torch.testing.assert_close(latents["triton"], latents["reference"], atol=1e-4, rtol=1e-4)


def test_eager_calls_skip_the_dispatcher_and_traces_see_the_custom_op(monkeypatch):
    """The backend launches the kernel directly in eager calls (the custom op's dispatch is host time only tracing
    needs), with the custom op's result; under a fake-tensor mode (what tracing runs) it goes through the custom op,
    whose fake implementation gives the shapes without launching."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ditfa_optimum.runtime import triton_backend

    layout = LAYOUTS["image-first-ragged"]
    q, k, v = (torch.randn(2, 4, layout.seq_len, 16, device=DEVICE) for _ in range(3))
    widths = random_widths(layout, 2, 4)
    backend = get_backend("triton", DEVICE)
    computed = widths > 0
    through_op = []
    op = triton_backend.headwise_attention
    monkeypatch.setattr(triton_backend, "headwise_attention", lambda *a: through_op.append(1) or op(*a))
    eager = backend.attend(q, k, v, layout, widths)
    assert not through_op  # launched directly
    op_out, _ = op(q, k, v, *backend.device_widths(widths, q.device), layout.num_image_tokens,
                   layout.num_text_tokens, layout.image_first, layout.block_size)
    assert torch.equal(eager[computed], op_out[computed])
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the cached launch table is a real tensor
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = backend.attend(fq, fk, fv, layout, widths)
    assert fake.shape == q.shape and through_op == [1]
