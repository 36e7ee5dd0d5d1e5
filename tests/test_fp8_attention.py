"""The FP8 attention scheme (`ditfa_optimum.fp8_attention`) against float64 attention on the CPU: e4m3 rounding is
emulated with casts, so these run in CI (the fused kernel's FP8 path will be checked against the same reference on
a GPU)."""

import pytest
import torch

from ditfa_optimum.fp8_attention import (E4M3, E4M3_MAX, fp8_attention, quantize, reference_attention,
                                         relative_error)
from ditfa_optimum.masks import TokenLayout, arrow_mask


def qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g) for _ in range(3))


@pytest.mark.parametrize("granularity,block", [("head", 128), ("block", 16), ("block", 7)])
def test_quantize_round_trips_within_e4m3_precision(granularity, block):
    x = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(1)) * 5
    x8, scale = quantize(x, granularity, block)
    assert x8.dtype == E4M3 and scale.dtype == torch.float32
    back = x8.float() * scale
    # 3 mantissa bits: relative rounding error at most 2^-4 in the normal range; below it, half the smallest step
    assert bool(((back - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -10).all())
    assert float(x8.float().abs().amax()) == E4M3_MAX  # the largest value of each group uses the whole range


def test_block_scales_follow_the_tokens_and_zero_groups_stay_zero():
    x = torch.zeros(1, 1, 10, 4)
    x[0, 0, :4] = 1.0
    x[0, 0, 4:8] = 100.0  # tokens 8, 9: all zero
    x8, scale = quantize(x, "block", block=4)
    assert scale.shape == (1, 1, 10, 1)
    assert torch.allclose(scale[0, 0, :, 0], torch.tensor([1 / 448] * 4 + [100 / 448] * 4 + [1.0] * 2))
    assert torch.equal(x8.float()[0, 0, 8:], torch.zeros(2, 4))
    v8, vscale = quantize(x, per_channel=True)
    assert vscale.shape == (1, 1, 1, 4)


def test_fp8_attention_is_close_to_float64_attention():
    q, k, v = qkv(2, 3, 256, 64)
    ref = reference_attention(q, k, v)
    err = relative_error(fp8_attention(q, k, v), ref)
    bf16 = relative_error(torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(),
                                                                           v.bfloat16()), ref)
    # random inputs are the hard case (a near-uniform softmax averages small outputs); measured 5.5e-2 at 4096 tokens
    assert bf16 < err < 0.08


def test_k_smoothing_removes_a_shared_key_offset():
    """A channel whose keys all sit far from zero leaves the token-to-token differences few e4m3 levels; subtracting
    the keys' mean (which the softmax cancels) gives them back."""
    q, k, v = qkv(1, 2, 256, 64, seed=3)
    k = k.clone()
    k[..., :4] += 40.0
    ref = reference_attention(q, k, v)
    smoothed = relative_error(fp8_attention(q, k, v, smooth_k=True), ref)
    raw = relative_error(fp8_attention(q, k, v, smooth_k=False), ref)
    assert smoothed < raw / 2


def test_block_scales_help_when_token_magnitudes_differ():
    q, k, v = qkv(1, 2, 256, 64, seed=4)
    q = q.clone()
    q[..., :64, :] *= 30.0  # one block of queries far larger than the rest
    ref = reference_attention(q, k, v)
    per_block = relative_error(fp8_attention(q, k, v, granularity="block", block=64), ref)
    per_head = relative_error(fp8_attention(q, k, v, granularity="head"), ref)
    assert per_block < per_head


def test_masked_keys_play_no_part():
    layout = TokenLayout(num_image_tokens=96, num_text_tokens=8, image_first=True, block_size=16)
    keep = arrow_mask(layout, 2)  # the first image block keeps image blocks 0 and 1 and the text
    q, k, v = qkv(1, 2, layout.seq_len, 32, seed=5)
    out = fp8_attention(q, k, v, keep)
    assert relative_error(out, reference_attention(q, k, v, keep)) < 0.08
    # keys of image block 2 change: the first block's rows do not, as long as no scale or mean that spans that block
    # changes (per-block K scales aligned with the mask blocks, no smoothing: its mean is over every key)
    k2 = k.clone()
    k2[:, :, 32:48] = torch.randn(1, 2, 16, 32) * 10
    kw = dict(granularity="block", block=16, smooth_k=False)
    assert torch.equal(fp8_attention(q, k2, v, keep, **kw)[:, :, :16], fp8_attention(q, k, v, keep, **kw)[:, :, :16])
    assert not torch.equal(fp8_attention(q, k2, v, keep, **kw)[:, :, 32:48],
                           fp8_attention(q, k, v, keep, **kw)[:, :, 32:48])


def test_bad_inputs_are_refused_with_the_shapes():
    q, k, v = qkv(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"\[B, H, S, D\].*\(1, 2, 16, 8\), \(1, 2, 15, 8\)"):
        fp8_attention(q, k[:, :, :15], v)
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize(q, "row")
    with pytest.raises(ValueError, match="block must be a positive"):
        quantize(q, "block", block=0)


def test_v_smoothing_and_bfloat16_pv_variants():
    """V smoothing is exact before rounding (a convex combination of V's rows moves by the subtracted mean) and
    removes a shared value offset from the rounding; keeping P.V in bfloat16 leaves only Q.K^T's rounding."""
    q, k, v = qkv(1, 2, 256, 64, seed=6)
    v = v + 6.0
    ref = reference_attention(q, k, v)
    plain = relative_error(fp8_attention(q, k, v), ref)
    assert relative_error(fp8_attention(q, k, v, smooth_v=True), ref) < plain / 2
    assert relative_error(fp8_attention(q, k, v, fp8_pv=False), ref) < plain


def test_int8_rounding_of_q_and_k():
    """INT8 values are integers in [-127, 127] within half a step of the input; seven bits round Q.K^T closer than
    e4m3's three mantissa bits (measured on the trained miniature model: docs/benchmarks.md)."""
    x = torch.randn(2, 2, 40, 16, generator=torch.Generator().manual_seed(7))
    x8, scale = quantize(x, "block", 8, fmt="int8")
    assert torch.equal(x8, torch.round(x8)) and float(x8.abs().amax()) == 127.0
    assert bool(((x8 * scale - x).abs() <= scale / 2 + 1e-7).all())
    q, k, v = qkv(1, 2, 256, 64, seed=8)
    ref = reference_attention(q, k, v)
    int8 = relative_error(fp8_attention(q, k, v, qk_format="int8", fp8_pv=False), ref)
    assert int8 < relative_error(fp8_attention(q, k, v, fp8_pv=False), ref)
    with pytest.raises(ValueError, match="fmt must be one of"):
        quantize(x, fmt="int4")
