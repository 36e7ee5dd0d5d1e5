"""Block methods: registry, references, what they read from earlier steps, and their cost."""

import dataclasses

import pytest
import torch

from ditfa_optimum.methods import (
    BlockCache,
    BlockMemory,
    BlockMethod,
    BlockTaylor,
    Compute,
    MemoryRef,
    MlpCache,
    Streams,
    add_residual,
    block_method_class,
    block_method_names,
    make_block_method,
    register_block_method,
    residual,
)


def streams(text=True, b=2, n_img=12, n_txt=5, c=8):
    return Streams(torch.randn(b, n_img, c), torch.randn(b, n_txt, c) if text else None)


def test_registry_ids_are_stable():
    assert {n: block_method_class(n).method_id for n in block_method_names()} == {
        "compute": 0, "block_cache": 1, "block_taylor": 2, "mlp_cache": 3}
    assert block_method_class(2) is BlockTaylor and make_block_method("mlp_cache") == MlpCache()
    assert make_block_method(BlockCache()) == BlockCache()
    with pytest.raises(ValueError, match=r"unknown block method 'skip'; known block methods: compute \(id 0\), "
                                         r"block_cache \(id 1\)"):
        make_block_method("skip")
    with pytest.raises(ValueError, match="unknown block method 7"):
        block_method_class(7)


def test_registering_a_taken_id_or_name_raises():
    @dataclasses.dataclass(frozen=True)
    class Clash(BlockMethod):
        name = "clash"
        method_id = 1

    with pytest.raises(ValueError, match="block method 1 is registered twice"):
        register_block_method(Clash)
    assert "clash" not in block_method_names()


@pytest.mark.parametrize("text", [True, False], ids=["text", "no-text-output"])
def test_residual_and_block_cache(text):
    inputs, output = streams(), streams(text)
    res = residual(output, inputs)
    torch.testing.assert_close(res.image, output.image - inputs.image, rtol=0, atol=0)
    assert (res.text is None) == (not text)
    later = streams()
    got = BlockCache.reference(later, res)
    torch.testing.assert_close(got.image, later.image + output.image - inputs.image)
    if text:
        torch.testing.assert_close(got.text, later.text + output.text - inputs.text)
    else:  # SD3's last block: the text stream stays absent
        assert got.text is None
    mem = {3: res}
    assert BlockCache().skip(later, 5, mem, (MemoryRef("residual", 3),)).image.equal(got.image)


def test_block_cache_refuses_a_changed_shape():
    res = residual(streams(), streams())
    with pytest.raises(RuntimeError, match=r"stored image residual has shape \(2, 12, 8\) but this step's image "
                                           r"input has \(2, 20, 8\).*resolution changed"):
        add_residual(streams(n_img=20), res)


@pytest.mark.parametrize("a,b,t", [(1, 0, 2), (4, 1, 5), (3, 1, 6)])
def test_block_taylor_is_exact_on_residuals_linear_in_the_step(a, b, t):
    r0, slope = streams(), streams()

    def r(step):  # a residual that moves linearly with the step: first order extrapolation is exact
        return Streams(r0.image + step * slope.image, r0.text + step * slope.text)

    inputs = streams()
    got = BlockTaylor.reference(inputs, r(a), r(b), a, b, t)
    torch.testing.assert_close(got.image, inputs.image + r(t).image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.text, inputs.text + r(t).text, atol=1e-5, rtol=1e-5)
    # and written out: r(a) + (r(a) - r(b)) (t - a) / (a - b)
    want = r(a).image + (r(a).image - r(b).image) * (t - a) / (a - b)
    torch.testing.assert_close(got.image - inputs.image, want, atol=1e-5, rtol=1e-5)


def test_block_taylor_falls_back_to_reuse_with_one_earlier_run():
    inputs, res = streams(), residual(streams(), streams())
    one = BlockTaylor().skip(inputs, 1, {0: res}, (MemoryRef("residual", 0),))
    assert torch.equal(one.image, BlockCache.reference(inputs, res).image)
    with pytest.raises(ValueError, match="a > b to t > a, got a=1, b=2, t=3"):
        BlockTaylor.extrapolate(res.image, res.image, 1, 2, 3)


def test_mlp_cache_returns_the_stored_output_and_checks_its_shape():
    stored, x = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    assert MlpCache.reference(stored, x) is stored
    with pytest.raises(RuntimeError, match=r"ff's stored output has shape \(2, 12, 8\) but this step's input has "
                                           r"\(1, 12, 8\).*chunks"):
        MlpCache.reference(stored, torch.randn(1, 12, 8), "ff")


@pytest.mark.parametrize("method,ran,mlp_ran,mlps,want", [
    (Compute(), [0, 1], [0], ("ff",), ()),
    (BlockCache(), [0, 2, 3], [0], (), (("residual", 3),)),
    (BlockTaylor(), [0], [0], (), (("residual", 0),)),
    (BlockTaylor(), [0, 2, 3], [0], (), (("residual", 3), ("residual", 2))),
    (MlpCache(), [0, 2, 3], [0, 2], ("ff", "ff_context"), (("mlp", 2),)),
])
def test_sources(method, ran, mlp_ran, mlps, want):
    assert method.sources(4, ran, mlp_ran, mlps) == tuple(MemoryRef(*w) for w in want)


@pytest.mark.parametrize("method,ran,mlp_ran,mlps,match", [
    (BlockCache(), [], [], ("ff",), "block runs at no earlier step; run it"),
    (BlockTaylor(), [], [], ("ff",), "block runs at no earlier step; run it"),
    (MlpCache(), [0], [], ("ff",), "MLP runs at no earlier step; run the block"),
    (MlpCache(), [0], [0], (), "no separately callable MLP .*use `block_cache` or `block_taylor`"),
])
def test_sources_say_what_is_missing(method, ran, mlp_ran, mlps, match):
    with pytest.raises(ValueError, match=match):
        method.sources(3, ran, mlp_ran, mlps)


def test_costs():
    attention, projections, mlp = 7.0, 11.0, 13.0
    assert Compute().cost(attention, projections, mlp) == 31.0
    assert MlpCache().cost(attention, projections, mlp) == 18.0
    assert BlockCache().cost(attention, projections, mlp) == 0.0
    assert BlockTaylor().cost(attention, projections, mlp) == 0.0
    assert [m.runs_block for m in (Compute(), BlockCache(), BlockTaylor(), MlpCache())] == [True, False, False, True]
    assert [m.runs_mlp for m in (Compute(), BlockCache(), BlockTaylor(), MlpCache())] == [True, False, False, False]


def test_block_memory_drops_and_counts_bytes():
    mem = BlockMemory()
    mem.residuals[1] = Streams(torch.zeros(2, 3), None)
    mem.mlp[1] = {"ff": torch.zeros(4)}
    assert mem.nbytes() == (6 + 4) * 4
    mem.drop(MemoryRef("residual", 1))
    mem.drop(MemoryRef("mlp", 1))
    assert mem.nbytes() == 0 and not mem.residuals and not mem.mlp
