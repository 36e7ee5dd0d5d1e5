import math

import pytest
import torch

from conftest import naive_keep
from ditfa_optimum.masks import TokenLayout, arrow_kept_pairs, arrow_mask, window_blocks

LAYOUTS = [
    TokenLayout(num_image_tokens=30, num_text_tokens=7, image_first=True, block_size=4),
    TokenLayout(num_image_tokens=30, num_text_tokens=7, image_first=False, block_size=4),
    TokenLayout(num_image_tokens=33, num_text_tokens=5, image_first=False, block_size=8),
    TokenLayout(num_image_tokens=16, num_text_tokens=0, image_first=True, block_size=4),
    TokenLayout(num_image_tokens=5, num_text_tokens=3, image_first=True, block_size=16),
]
IDS = ["sd3-30+7", "flux-7+30", "flux-5+33-b8", "image-only", "one-short-block"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_arrow_mask_matches_definition_and_count(layout):
    for width in range(1, layout.num_image_blocks + 1):
        mask = arrow_mask(layout, width)
        assert torch.equal(mask, naive_keep(layout, width)), width
        assert int(mask.sum()) == arrow_kept_pairs(layout, width), width


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_full_width_is_dense_and_text_is_dense(layout):
    assert bool(arrow_mask(layout, layout.num_image_blocks).all())
    mask = arrow_mask(layout, 1)
    assert bool(mask[layout.text_slice()].all()) and bool(mask[:, layout.text_slice()].all())


def test_every_image_row_keeps_the_same_number_of_image_blocks():
    layout = TokenLayout(num_image_tokens=64, num_text_tokens=3, block_size=4)  # 16 whole blocks
    for width in (1, 2, 3, 5, 16):
        img = arrow_mask(layout, width)[layout.image_slice(), layout.image_slice()]
        assert set(img.sum(1).tolist()) == {width * 4}


@pytest.mark.parametrize("fraction,n_blk,expected", [
    (1 / 8, 128, 16), (1 / 16, 128, 8), (1 / 32, 128, 4), (1 / 8, 32, 4), (1 / 32, 32, 1), (1.0, 7, 7),
    (1 / 3, 3, 1), (0.01, 10, 1), (0.5, 5, 3),
])
def test_window_blocks(fraction, n_blk, expected):
    assert window_blocks(fraction, n_blk) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0001, math.nan])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        window_blocks(fraction, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_image_tokens=0, num_text_tokens=3), "num_image_tokens"),
    (dict(num_image_tokens=4, num_text_tokens=-1), "num_text_tokens"),
    (dict(num_image_tokens=4, num_text_tokens=1, block_size=0), "block_size"),
])
def test_bad_layout(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout(**kwargs).check()  # ModuleSpec.layout checks every layout the runtime makes
