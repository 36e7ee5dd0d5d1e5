"""The 8-bit attention methods (`full_int8`, `arrow_int8`) through the runtime: signed widths, every backend,
a whole planned generation, the artifact, calibration and search (CPU; on a GPU the triton cases compile)."""

import json
import logging
import os

import pytest
import torch

import ditfa_optimum as dfa
from conftest import DEVICES, naive_attention, naive_keep, rand_qkv
from ditfa_optimum.calibrate import calibrate
from ditfa_optimum.fp8_attention import SCHEME, quantize_qkv, quantized_attention, relative_error
from ditfa_optimum.masks import TokenLayout, arrow_kept_pairs, window_blocks
from ditfa_optimum.methods import dense_flops, make_method, method_class
from ditfa_optimum.plan import CompressionPlan, ModuleSpec
from ditfa_optimum.prompts import default_prompts
from ditfa_optimum.runtime import PlanRuntime, get_backend
from ditfa_optimum.runtime.backends import Widths
from ditfa_optimum.search import search
from search_helpers import tiny_setup

LAYOUT = TokenLayout(num_image_tokens=70, num_text_tokens=9, image_first=True, block_size=32)
LAYOUT_GPU = TokenLayout(num_image_tokens=134, num_text_tokens=9, image_first=True, block_size=64)


def scheme(q, k, v, width=None, layout=LAYOUT):
    keep = None if width is None else naive_keep(layout, width)
    return quantized_attention(quantize_qkv(q, k, v, fp8_pv=False), keep)


def test_the_methods_are_registered_with_negative_widths_and_their_measured_cost():
    n = LAYOUT.num_image_blocks
    full8, arrow8 = make_method("full_int8"), make_method("arrow_int8:1/2")
    assert (method_class(5), method_class(6)) == (type(full8), type(arrow8))
    assert full8.quantized and arrow8.quantized and not make_method("full").quantized
    assert full8.kernel_widths(LAYOUT, 2, False) == [-n, -n]
    assert arrow8.kernel_widths(LAYOUT, 1, False) == [-window_blocks(0.5, n)]
    assert str(arrow8) == "arrow_int8:0.5" and make_method("arrow_int8", 0.5) == arrow8
    assert full8.flops(LAYOUT, 32, False) == pytest.approx(full8.COST_FACTOR * dense_flops(LAYOUT, 32))
    pairs = arrow_kept_pairs(LAYOUT, window_blocks(0.5, n))
    assert arrow8.flops(LAYOUT, 32, False) == pytest.approx(arrow8.COST_FACTOR * 4 * 32 * pairs)
    with pytest.raises(ValueError, match="window fraction"):
        make_method("arrow_int8")


def test_widths_split_into_plain_and_8bit_pairs():
    w = Widths(((3, -3, 0), (-1, 2, 0)), full=3)
    assert w.quantized and w.any and not w.all_full
    plain, eight = w.split()
    assert plain.rows == ((3, 0, 0), (0, 2, 0)) and eight.rows == ((0, 3, 0), (1, 0, 0))
    assert not plain.quantized and not Widths(((3,),), 3).quantized


BACKENDS = [(d, b) for d in DEVICES for b in ("reference", "blocked")]
if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
    BACKENDS += [(d, "triton") for d in DEVICES if d == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"]


@pytest.mark.parametrize("device, backend", BACKENDS)
def test_every_backend_computes_8bit_heads_as_the_scheme_and_the_others_as_before(device, backend, caplog):
    # the compiled kernel's 8-bit heads need 64-token blocks on a GPU (refused otherwise, and handed elsewhere)
    layout = LAYOUT_GPU if (device, backend) == ("cuda", "triton") else LAYOUT
    n = layout.num_image_blocks
    q, k, v = rand_qkv(2, 4, layout.seq_len, 64 if layout is LAYOUT_GPU else 32)  # GPU 8-bit tiles: D 64 or 128
    rows = ((n, -n, -1, 0), (-2, 1, n, -n))
    with caplog.at_level(logging.WARNING):
        out = get_backend(backend, torch.device(device)).attend(*(x.to(device) for x in (q, k, v)), layout,
                                                                Widths(rows, n)).cpu()
    assert "hands these calls" not in caplog.text  # computed by the backend asked for
    for b, row in enumerate(rows):
        for h, w in enumerate(row):
            if w > 0:
                want = naive_attention(q[b, h], k[b, h], v[b, h], naive_keep(layout, w)).float()
                assert relative_error(out[b, h], want) < 1e-5
            elif w < 0:
                want = scheme(q[b:b + 1, h:h + 1], k[b:b + 1, h:h + 1], v[b:b + 1, h:h + 1], -w, layout)[0, 0]
                kernel = (device, backend) == ("cuda", "triton")  # the compiled kernel's ex2.approx
                assert relative_error(out[b, h], want) < (1e-4 if kernel else 1e-5)
                exact = naive_attention(q[b, h], k[b, h], v[b, h], naive_keep(layout, -w)).float()
                assert relative_error(out[b, h], exact) < 3e-2  # the scheme's own error on random inputs


SPEC = ModuleSpec("blocks.0.attn", num_heads=3, head_dim=32, image_first=True)


def test_the_runtime_runs_8bit_heads_and_refuses_gradients():
    plan = CompressionPlan.from_methods([SPEC], {SPEC.name: [["full", "full_int8", "arrow_int8:1/2"]]},
                                        block_size=32)
    runtime = PlanRuntime(plan, backend="blocked", cfg=False)
    module = runtime.module(SPEC)
    q, k, v = rand_qkv(1, 3, LAYOUT.seq_len, 32)
    runtime.state.on_transformer_call(torch.tensor([1000.0]), LAYOUT.num_text_tokens)
    with torch.no_grad():
        out = module(q, k, v, num_text_tokens=LAYOUT.num_text_tokens)
    assert torch.allclose(out[:, 0], naive_attention(q[:, 0], k[:, 0], v[:, 0]).float(), atol=1e-5)
    assert relative_error(out[:, 1], scheme(q[:, 1:2], k[:, 1:2], v[:, 1:2])[:, 0]) < 1e-5
    n = LAYOUT.num_image_blocks
    assert relative_error(out[:, 2], scheme(q[:, 2:3], k[:, 2:3], v[:, 2:3], window_blocks(0.5, n))[:, 0]) < 1e-5

    runtime.state.on_transformer_call(torch.tensor([1000.0]), LAYOUT.num_text_tokens)
    with pytest.raises(ValueError, match="inference-only"):
        module(q.requires_grad_(), k, v, num_text_tokens=LAYOUT.num_text_tokens)


def test_a_planned_generation_with_8bit_heads_and_its_artifact(tmp_path):
    pipe, encoder, config = tiny_setup("sd3")
    prompts = default_prompts(1)
    from ditfa_optimum.calibrate import run_pipeline

    dense = run_pipeline(pipe, prompts, config, prompt_encoder=encoder)
    plan = dfa.uniform_plan(pipe, num_steps=config.num_inference_steps, method="full_int8", block_size=16)
    for name in plan.module_names[::2]:
        for step in range(1, config.num_inference_steps):
            plan.set(name, step, 0, "arrow_int8:1/2")
    dfa.apply(pipe, plan, backend="blocked")
    planned = run_pipeline(pipe, prompts, config, prompt_encoder=encoder)
    dfa.remove(pipe)
    assert torch.isfinite(planned).all() and not torch.equal(planned, dense)
    assert relative_error(planned, dense) < 0.1  # 8-bit rounding and a few bands, not another image

    loaded = CompressionPlan.load(plan.save(tmp_path / "plan"))
    assert loaded.method_counts() == plan.method_counts() and "full_int8" in loaded.method_counts()
    for name in plan.module_names:
        assert torch.equal(loaded.methods[name], plan.methods[name])
        assert torch.equal(loaded.params[name], plan.params[name])
    info = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert info["attention_quantization"] == {"scheme": SCHEME, "scales": "dynamic"}
    info["attention_quantization"]["scheme"] = "int8-qk:some-future-scheme"
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="computes them as"):
        CompressionPlan.load(tmp_path / "plan")
    del info["attention_quantization"]
    (tmp_path / "plan" / "plan.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="8 bits"):
        CompressionPlan.load(tmp_path / "plan")
    plain = dfa.uniform_plan(pipe, num_steps=config.num_inference_steps, method="full", block_size=16)
    assert "attention_quantization" not in plain.to_json_dict()


def test_calibration_and_search_weigh_8bit_candidates():
    pipe, encoder, config = tiny_setup("sd3", methods=["arrow:1/4", "full_int8"], threshold=0.05,
                                       max_head_rse=1e9, num_prompts=2, batch_size=2)
    stats = calibrate(pipe, config, default_prompts(2), prompt_encoder=encoder, progress=False)
    assert stats.candidates == ["full", "arrow:0.25", "full_int8"]
    name = stats.modules[0].name
    rse = stats.rse(name)[1:, :, 2]  # after step 0, every head
    assert torch.isfinite(rse).all() and float(rse.max()) < 0.05  # INT8 Q.K^T: small errors
    assert float(rse.mean()) < float(stats.rse(name)[1:, :, 1].mean())  # smaller than a band of 1/4
    saved = stats.saved(name)
    assert 0 < float(saved[2]) < float(saved[1])  # cheaper than full at its measured price, dearer than the band
    plan = search(stats, config)
    assert "full_int8" in plan.method_counts(), plan.method_counts()
