"""benchmarks/flops.py and benchmarks/peers.py on the CPU: the FLOP counter against an analytic count of a tiny SD3
transformer; every available peer cache on the trained miniature model (2 captions, 32 px, 5 steps) skips FLOPs at an
aggressive setting and leaves the pipeline stock, bit for bit, once disabled."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from ditfa_optimum.tiny import tiny_inputs, tiny_transformer

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
STEPS, SIZE, GUIDANCE = 5, 32, 4.0  # 32 px: 256 image tokens, a quarter of the trained size, to stay fast
#: settings aggressive enough to skip something within 5 steps
AGGRESSIVE = {
    "fbcache": dict(threshold=1.0),
    "magcache": dict(threshold=1.0, max_skip_steps=4, retention_ratio=0.0),
    "taylorseer": dict(cache_interval=2, disable_cache_before_step=1, max_order=1),
    "taylorseer-lite": dict(cache_interval=2, disable_cache_before_step=1, max_order=1),
    "dbcache": dict(Fn=1, Bn=0, threshold=1.0, warmup=1),
    "dbcache+taylorseer": dict(Fn=1, Bn=0, threshold=1.0, warmup=1, order=1),
}
CACHE_DIT_PEERS = ("dbcache", "dbcache+taylorseer")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def flops():
    return load("flops")


@pytest.fixture(scope="module")
def peers():
    return load("peers")


@pytest.fixture(scope="module")
def pipe():
    from ditfa_optimum.mini import mini_pipeline

    return mini_pipeline()


def run(pipe, captions=None) -> torch.Tensor:
    captions = captions or pipe.default_prompts(2, 0)
    generators = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    return pipe(captions, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=generators, output_type="pt").images


def sd3_flops(config, batch: int, image_tokens: int, text_tokens: int, skip=()) -> float:
    """The matmul FLOPs of one SD3Transformer2DModel forward, written from its config (no dual attention layers)."""
    def linear(rows, n_in, n_out):
        return 2.0 * rows * n_in * n_out

    B, N, T = batch, image_tokens, text_tokens
    D = config.num_attention_heads * config.attention_head_dim
    p, C = config.patch_size, config.in_channels
    total = 2.0 * B * N * C * p * p * D  # patch embedding (a p x p convolution with stride p)
    total += linear(B, 256, D) + linear(B, D, D)  # timestep embedding
    total += linear(B, config.pooled_projection_dim, D) + linear(B, D, D)  # pooled text embedding
    total += linear(B * T, config.joint_attention_dim, config.caption_projection_dim)
    for layer in range(config.num_layers):
        if layer in skip:
            continue
        last = layer == config.num_layers - 1  # context_pre_only: no text output, MLP or output projection
        total += linear(B, D, 6 * D) + linear(B, D, 2 * D if last else 6 * D)  # adaLN of both streams
        total += 4 * linear(B * N, D, D) + (3 if last else 4) * linear(B * T, D, D)  # q, k, v, out per stream
        total += 4.0 * B * (N + T) ** 2 * config.attention_head_dim * config.num_attention_heads
        total += linear(B * N, D, 4 * D) + linear(B * N, 4 * D, D)
        if not last:
            total += linear(B * T, D, 4 * D) + linear(B * T, 4 * D, D)
    total += linear(B, D, 2 * D) + linear(B * N, D, p * p * config.out_channels)  # norm_out, proj_out
    return total


def test_dense_count_equals_the_analytic_formula(flops):
    model = tiny_transformer("sd3")
    inputs = tiny_inputs(model, batch=2, height=12, width=10, text_tokens=7)
    with torch.no_grad(), flops.count_flops(model) as counter:
        model(**inputs)
    assert counter.total == pytest.approx(sd3_flops(model.config, 2, 120, 7), rel=1e-12)
    assert counter.calls == 1 and counter.attention_calls == model.config.num_layers
    assert counter.attention == pytest.approx(model.config.num_layers * flops.dense_attention_flops(2, 127, 4, 8))
    assert counter.per_image(1) == counter.total and counter.as_dict(2)["per_image"] == counter.total / 2


def test_a_skipped_block_is_not_counted(flops):
    model = tiny_transformer("sd3")
    inputs = tiny_inputs(model, batch=2, height=12, width=10, text_tokens=7)
    with torch.no_grad(), flops.count_flops(model) as dense:
        model(**inputs)
    with torch.no_grad(), flops.count_flops(model) as skipped:
        model(**inputs, skip_layers=[1])
    assert skipped.total == pytest.approx(sd3_flops(model.config, 2, 120, 7, skip=(1,)), rel=1e-12)
    assert 0.2 < flops.skipped_share(skipped.total, dense.total) < 0.3  # one of 4 blocks, a little more than 1/4
    assert all(not name.startswith("transformer_blocks.1.") for name in skipped.by_module)


def test_attention_override_gets_the_call_shapes(flops):
    model = tiny_transformer("sd3")
    inputs = tiny_inputs(model, batch=2, height=12, width=10, text_tokens=7)
    seen = []

    def cost(name, batch, image_tokens, text_tokens, heads, head_dim):
        seen.append((name, batch, image_tokens, text_tokens, heads, head_dim))
        return 1000.0 if name == "transformer_blocks.0.attn" else None

    with torch.no_grad(), flops.count_flops(model, attention_flops=cost) as counter:
        model(**inputs)
    assert seen[0] == ("transformer_blocks.0.attn", 2, 120, 7, 4, 8) and len(seen) == model.config.num_layers
    dense = flops.dense_attention_flops(2, 127, 4, 8)
    assert counter.attention == pytest.approx(1000.0 + (model.config.num_layers - 1) * dense)
    with pytest.raises(ValueError, match="dense FLOPs must be > 0"):
        flops.skipped_share(1.0, 0.0)


@pytest.fixture(scope="module")
def stock(pipe):
    return run(pipe)


@pytest.fixture(scope="module")
def dense_flops(pipe, flops):
    with flops.count_flops(pipe.transformer) as counter:
        run(pipe)
    return counter.per_image(2)


@pytest.mark.parametrize("name", list(AGGRESSIVE), ids=list(AGGRESSIVE))
def test_peer_skips_and_disable_restores_stock(name, pipe, peers, flops, stock, dense_flops):
    if name in CACHE_DIT_PEERS:
        pytest.importorskip("cache_dit")
    assert peers.peer_unavailable(name) is None
    calibration = peers.calibrate_peers(pipe, pipe.default_prompts(2, 0), STEPS, GUIDANCE, 2, [name]) \
        if name == "magcache" else None
    if calibration:
        assert len(calibration["magcache"]["mag_ratios"]) == STEPS
    handle = peers.enable_peer(pipe, name, AGGRESSIVE[name], steps=STEPS, calibration=calibration)
    try:
        with flops.count_flops(pipe.transformer) as counter:
            first = run(pipe)
        second = run(pipe)  # a second generation starts from a fresh cache state
    finally:
        peers.disable_peer(pipe, handle)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert counter.calls == STEPS and counter.per_image(2) < dense_flops * 0.95
    assert not torch.equal(first, stock)
    assert torch.equal(run(pipe), stock)  # stock again, bit for bit
    for module in pipe.transformer.modules():
        assert not hasattr(module, "_diffusers_hook") and "forward" not in vars(module)
    assert not hasattr(pipe, "_context_manager") and "_is_cached" not in vars(type(pipe))
    with pytest.raises(RuntimeError, match="already disabled"):
        peers.disable_peer(pipe, handle)


def test_magcache_needs_its_calibration(pipe, peers):
    with pytest.raises(ValueError, match="calibrate_peers"):
        peers.enable_peer(pipe, "magcache", peers.PEERS["magcache"][0], steps=STEPS)
    assert not hasattr(pipe.transformer, "_diffusers_hook")
    with pytest.raises(ValueError, match="unknown peer"):
        peers.enable_peer(pipe, "teacache", {}, steps=STEPS)


def test_every_peer_has_settings_and_cache_dit_is_optional(peers):
    assert set(peers.PEERS) == set(AGGRESSIVE)
    assert all(len(settings) >= 4 for settings in peers.PEERS.values())
    for name in CACHE_DIT_PEERS:
        reason = peers.peer_unavailable(name)
        assert reason is None or "pip install cache-dit" in reason


def test_sweep_rows(pipe, peers):
    captions = pipe.default_prompts(2, 0)
    dense = peers.generate(pipe, captions, [0, 1], 3, GUIDANCE, 2)
    rows = peers.run_peer_sweep(pipe, captions, [0, 1], dense, captions, 3, GUIDANCE, 2,
                                peers={"fbcache": (dict(threshold=1.0),)}, log=None)
    assert [(r["curve"], r["setting"]) for r in rows] == [("fbcache", "threshold=1")]
    row = rows[0]
    assert 0 < row["whole_cut"] < 1 and 0 < row["attention_cut"] < 1 and 0 < row["ssim"] <= 1 and row["psnr"] > 0
    assert 0 <= row["faithfulness"] <= 1 and row["drift_px"] >= 0 and row["area_change"] >= 0
    assert peers.table(rows).splitlines()[-1].startswith("| fbcache | threshold=1 |")
