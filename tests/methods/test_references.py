"""Each method's reference against a naive masked-dense computation (float64, explicit -inf mask)."""

import pytest
import torch

from conftest import naive_attention, naive_keep, rand_qkv
from ditfa_optimum.masks import TokenLayout
from ditfa_optimum.methods import Arrow, ArrowResidual, Cache, CfgShare, Full, HeadMemory, make_method

LAYOUTS = [
    TokenLayout(num_image_tokens=35, num_text_tokens=9, image_first=True, block_size=4),   # SD3 order, odd lengths
    TokenLayout(num_image_tokens=35, num_text_tokens=9, image_first=False, block_size=4),  # FLUX order
    TokenLayout(num_image_tokens=50, num_text_tokens=13, image_first=False, block_size=8),
]
IDS = ["image-first", "text-first", "text-first-b8"]
TOL = dict(atol=2e-5, rtol=1e-5)  # fp32 SDPA vs a float64 naive softmax


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("heads", [3, 5])
def test_full(layout, heads):
    q, k, v = rand_qkv(2, heads, layout.seq_len, 16)
    torch.testing.assert_close(Full.reference(q, k, v).double(), naive_attention(q, k, v), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("fraction", [1 / 8, 1 / 4, 1 / 3, 1.0])
def test_arrow(layout, fraction):
    q, k, v = rand_qkv(2, 3, layout.seq_len, 8)
    method = Arrow(fraction)
    keep = naive_keep(layout, method.width(layout))
    torch.testing.assert_close(method.reference(q, k, v, layout).double(), naive_attention(q, k, v, keep), **TOL)
    if fraction < 1:  # the band really drops something, so the test can tell arrow from full
        assert not bool(keep.all())


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_arrow_residual(layout):
    q, k, v = rand_qkv(2, 3, layout.seq_len, 8)
    residual = torch.randn(2, 3, layout.seq_len, 8)
    method = ArrowResidual(0.25)
    keep = naive_keep(layout, method.width(layout))
    expected = naive_attention(q, k, v, keep) + residual.double()
    torch.testing.assert_close(method.reference(q, k, v, layout, residual).double(), expected, **TOL)
    out = method.finalize(method.reference(q, k, v, layout), HeadMemory(residual=residual), cfg=False)
    torch.testing.assert_close(out.double(), expected, **TOL)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_cfg_share(layout):
    q, k, v = rand_qkv(4, 3, layout.seq_len, 8)  # 2 prompts x [uncond, cond]
    cond = naive_attention(q[2:], k[2:], v[2:])
    torch.testing.assert_close(CfgShare.reference(q, k, v).double(), torch.cat([cond, cond]), **TOL)
    n = layout.num_image_blocks
    assert CfgShare().kernel_widths(layout, 4, cfg=True) == [0, 0, n, n]
    assert CfgShare().kernel_widths(layout, 4, cfg=False) == [n] * 4
    with pytest.raises(ValueError, match="odd size 3"):
        CfgShare().kernel_widths(layout, 3, cfg=True)


def test_cache_returns_previous_output_and_checks_it():
    prev = torch.randn(2, 10, 8)
    assert Cache().finalize(torch.empty(2, 10, 8), HeadMemory(previous_output=prev), cfg=False) is prev
    with pytest.raises(RuntimeError, match="no output from the previous step"):
        Cache().finalize(torch.empty(2, 10, 8), HeadMemory(), cfg=False)
    with pytest.raises(RuntimeError, match="batch size or resolution changed"):
        Cache().finalize(torch.empty(4, 10, 8), HeadMemory(previous_output=prev), cfg=False)


@pytest.mark.parametrize("text,expected", [
    ("full", Full()), ("arrow:0.125", Arrow(0.125)), ("arrow:1/8", Arrow(0.125)), ("cache", Cache()),
    ("cfg_share", CfgShare()), ("arrow_residual:1/16", ArrowResidual(1 / 16)),
])
def test_make_method(text, expected):
    assert make_method(text) == expected
    assert make_method(expected.method_id, expected.param or None) == expected


@pytest.mark.parametrize("text,match", [
    ("windowed", "unknown attention method 'windowed'"), ("arrow", "needs its window fraction"),
    ("arrow:0", r"fraction must be in \(0, 1\]"), ("arrow:1.5", r"fraction must be in \(0, 1\]"),
    ("arrow:-0.2", r"fraction must be in \(0, 1\]"), ("arrow:abc", "must be a number"),
    ("cache:0.5", "takes no parameter"),
])
def test_bad_methods(text, match):
    with pytest.raises(ValueError, match=match):
        make_method(text)


def test_flops_match_mask_counts():
    layout = TokenLayout(num_image_tokens=35, num_text_tokens=9, image_first=False, block_size=4)
    D, S = 8, layout.seq_len
    for method in (Full(), Arrow(0.25), ArrowResidual(0.5)):
        width = layout.num_image_blocks if isinstance(method, Full) else method.width(layout)
        assert method.flops(layout, D, cfg=False) == 4 * D * int(naive_keep(layout, width).sum())
    assert Cache().flops(layout, D, cfg=True) == 0
    assert CfgShare().flops(layout, D, cfg=True) == 2 * D * S * S
    assert CfgShare().flops(layout, D, cfg=False) == 4 * D * S * S
