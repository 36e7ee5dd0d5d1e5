"""ONNX export with a plan (`ditfa_optimum.export`): the miniature model's step graphs run a whole 20-step CFG
generation in onnxruntime, the heads' memory fed from step to step, and draw the PyTorch runtime's images; what cannot
be exported is refused by name."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ditfa_optimum import apply, fp8_linears, remove  # noqa: E402
from ditfa_optimum.export import ExportError, OnnxPlanTransformer, export_onnx  # noqa: E402
from ditfa_optimum.mini import mini_pipeline  # noqa: E402
from ditfa_optimum.plan import CompressionPlan  # noqa: E402

STEPS, GUIDANCE = 20, 4.0
CAPTIONS = ["a small red circle in the center", "a large blue square on the left"]
#: per head and step >= 1, rotating: every method the runtime carries between steps, and arrows of two widths
ROTATION = ("full", "arrow:1/4", "cache", "cfg_share", "arrow:1/8", "cache")
SKIPPED = (7, 12, 16)


def mixed_plan(pipe, steps=STEPS, skipped=SKIPPED) -> CompressionPlan:
    from ditfa_optimum.adapters import get_adapter

    specs = get_adapter(pipe.transformer).module_specs(pipe.transformer)
    def method(h, step, i):
        m = ROTATION[(h + step + i) % len(ROTATION)]
        return "arrow:1/4" if m == "cache" and step - 1 in skipped else m  # nothing to reuse after a skipped step

    table = {s.name: [["full"] * s.num_heads] + [[method(h, step, i) for h in range(s.num_heads)]
                                                 for step in range(1, steps)] for i, s in enumerate(specs)}
    plan = CompressionPlan.from_methods(specs, table, block_size=32, model_class="SD3Transformer2DModel")
    plan.set_skipped_steps(list(skipped))
    return plan


def images(pipe, caption, seed, steps=STEPS):
    return pipe([caption], num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def planned_and_onnx(pipe, plan, out, draw, onnx=None):
    """``draw()`` with the plan applied in PyTorch, then with the export in onnxruntime in place of the transformer
    (``onnx``: that OnnxPlanTransformer, else a new one)."""
    apply(pipe, plan, backend="blocked")
    try:
        want = draw()
    finally:
        remove(pipe)
    stock = pipe.transformer
    pipe.transformer = onnx or OnnxPlanTransformer(out, stock)
    try:
        got = draw()
    finally:
        pipe.transformer = stock
    return want, got


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pipe = mini_pipeline()
    plan = mixed_plan(pipe)
    out = export_onnx(pipe, plan, tmp_path_factory.mktemp("onnx") / "mini", prompt=[CAPTIONS[0]],
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE, progress=False)
    return pipe, plan, out


def test_a_whole_cfg_generation_in_onnxruntime_draws_the_pytorch_images(exported):
    pipe, plan, out = exported
    assert plan.method_counts().keys() >= {"full", "arrow", "cache", "cfg_share"} and plan.skipped_steps
    onnx = OnnxPlanTransformer(out, pipe.transformer)
    held = []
    onnx.register_forward_hook(lambda *_: held.append(len(onnx.outputs)))
    # the generator starts a new generation each time
    want, got = planned_and_onnx(pipe, plan, out, lambda: [images(pipe, c, i) for i, c in enumerate(CAPTIONS)], onnx)
    # the outputs a skipped step extrapolates from are kept only until their last reader: two at most here
    assert max(held) == 2 and onnx.outputs == {}
    for a, b in zip(want, got):
        mse = float((a - b).pow(2).mean())
        assert mse == 0 or 10 * torch.log10(torch.tensor(1 / mse)) >= 60  # measured: identical or ~1e-7 apart
    dense = images(pipe, CAPTIONS[0], 0)
    assert not torch.allclose(dense, want[0], atol=1e-3)  # the plan changes the image: the check is not vacuous


def test_the_export_holds_one_graph_per_computed_step_and_one_copy_of_the_weights(exported):
    import onnx

    pipe, plan, out = exported
    manifest = json.loads((out / "export.json").read_text())
    graphs = [s["graph"] for s in manifest["steps"]]
    assert [g is None for g in graphs] == [not plan.runs_step(t) for t in range(STEPS)]
    assert manifest["skipped_steps"] == plan.skipped_steps
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    assert (out / "weights.bin").stat().st_size < 2 * weights  # shared, not once per graph
    model = onnx.load(out / graphs[0], load_external_data=False)
    assert sum(len(t.raw_data) for t in model.graph.initializer) < 1 << 20  # the weights live in weights.bin
    cached = next(s for s in manifest["steps"][1:] if s["graph"])
    assert cached["memory_in"] or cached["memory_out"]  # cache heads carry memory between the graphs


def test_the_dynamo_exporter_gives_the_same_images(tmp_path):
    """``dynamo=True`` (torch.export, then onnxscript): a short CFG plan with every carried method and a skipped
    step, exported step by step; one weights file (the exporter's per-graph data files merged and removed), and the
    PyTorch runtime's images in onnxruntime."""
    pytest.importorskip("onnxscript")
    pipe = mini_pipeline()
    plan = mixed_plan(pipe, steps=4, skipped=(3,))
    out = export_onnx(pipe, plan, tmp_path / "dyn", prompt=[CAPTIONS[0]], num_inference_steps=4,
                      guidance_scale=GUIDANCE, dynamo=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "step_00.onnx", "step_01.onnx", "step_02.onnx",
                                                     "weights.bin"]
    want, got = planned_and_onnx(pipe, plan, out, lambda: images(pipe, CAPTIONS[1], 3, steps=4))
    mse = float((want - got).pow(2).mean())
    assert mse == 0 or 10 * torch.log10(torch.tensor(1 / mse)) >= 60  # measured: 124.6 dB on the 20-step plan


def test_a_flux_plan_exports_and_draws_the_pytorch_latents(tmp_path):
    """FLUX (tiny, guidance-distilled: no CFG): its image and text ids and guidance become graph inputs; the
    TorchScript exporter has no RMSNorm at opset 18, so the export falls back to the dynamo exporter on its own."""
    pytest.importorskip("onnxscript")
    from ditfa_optimum.adapters import get_adapter
    from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline

    pipe = tiny_pipeline("flux")
    encode = TinyPromptEncoder(pipe.transformer)
    specs = get_adapter(pipe.transformer).module_specs(pipe.transformer)
    rotation = ("full", "arrow:1/4", "cache")
    table = {s.name: [["full"] * s.num_heads] + [[rotation[(h + t + i) % 3] for h in range(s.num_heads)]
                                                 for t in range(1, 4)] for i, s in enumerate(specs)}
    plan = CompressionPlan.from_methods(specs, table, block_size=4, model_class="FluxTransformer2DModel")
    plan.set_skipped_steps([3])
    call = dict(height=64, width=64, num_inference_steps=4, output_type="latent")
    out = export_onnx(pipe, plan, tmp_path / "flux", **encode(["a red cube"]), **call, progress=False)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["inputs"][:3] == ["hidden_states", "timestep", "encoder_hidden_states"]
    assert {"txt_ids", "img_ids"} <= set(manifest["inputs"])

    def latents():
        return pipe(**encode(["a blue ball"]), **call, generator=torch.Generator().manual_seed(1)).images

    dense = latents()
    want, got = planned_and_onnx(pipe, plan, out, latents)
    assert (want - got).abs().max() <= 1e-4 * want.abs().max()  # measured: 1.0e-5
    assert (want - dense).abs().max() > 0.1  # the plan changes the latents: the check is not vacuous


def test_what_cannot_be_exported_is_refused(tmp_path, monkeypatch):
    pipe = mini_pipeline()
    plan = mixed_plan(pipe)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_onnx(pipe, plan, tmp_path / "full", prompt=["a small red circle in the center"])
    monkeypatch.setattr(fp8_linears, "quantized_names", lambda t: ["transformer_blocks.0.ff.net.2"])
    with pytest.raises(ExportError, match="FP8 linear layers"):
        export_onnx(pipe, plan, tmp_path / "fp8", prompt=["a small red circle in the center"])


def test_the_cli_exports_an_artifact_and_refuses_a_remapped_plan(tmp_path, capsys):
    from ditfa_optimum import DiTFastAttnOptimizer
    from ditfa_optimum.apply import uniform_plan
    from ditfa_optimum.cli import main

    opt = DiTFastAttnOptimizer.from_pretrained("mini-mmdit")
    opt.plan = uniform_plan(opt.pipeline.transformer, num_steps=4, method="arrow:1/4", full_steps=1, block_size=32)
    opt.plan.metadata["search"] = {"config": opt.default_config().replace(num_inference_steps=4).to_dict()}
    art = opt.save_pretrained(tmp_path / "art", reproducibility_prompts=0)
    assert main(["export", "onnx", str(art), str(tmp_path / "onnx"), "--quiet"]) == 0
    manifest = json.loads((tmp_path / "onnx" / "export.json").read_text())
    # one file per distinct step program: step 0 full, steps 1-3 the same arrow program
    assert [s["graph"] for s in manifest["steps"]] == ["step_00.onnx"] + ["step_01.onnx"] * 3
    assert sorted(p.name for p in (tmp_path / "onnx").glob("*.onnx")) == ["step_00.onnx", "step_01.onnx"]
    assert main(["export", "onnx", str(art), str(tmp_path / "other"), "--steps", "8", "--quiet"]) == 1
    assert "the export runs the plan's own 4 steps" in capsys.readouterr().err
