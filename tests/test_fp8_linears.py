"""FP8 linear layers (`ditfa_optimum.fp8_linears`): which layers convert, the FP8 matmul against a PyTorch reference
on fresh random inputs, the artifact round trip (weights and scales as plain safetensors tensors, `torch.equal`), and
clear refusals where they cannot run (CPU, older GPUs, wrong dtype). The conversion itself runs on the CPU here
(``check=False``); only running it for users needs a GPU of compute capability 8.9+."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("torchao")

from ditfa_optimum import DiTFastAttnConfig, fp8_linears  # noqa: E402
from ditfa_optimum.apply import uniform_plan  # noqa: E402
from ditfa_optimum.serialization import LINEARS_FILE, ArtifactError, read_artifact, write_artifact  # noqa: E402
from ditfa_optimum.tiny import tiny_inputs, tiny_transformer  # noqa: E402

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, bit for bit for float8 (which torch.equal does not take on the CPU)."""
    if a.dtype != b.dtype:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)


@pytest.fixture(autouse=True)
def _quiet_torchao_import():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def bf16(family="sd3", seed=0):
    return tiny_transformer(family, seed=seed, dtype=torch.bfloat16)


def run(model, family="sd3"):
    device = next(model.parameters()).device
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).to(device)
              for k, v in tiny_inputs(model).items()}
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_only_the_blocks_linear_layers_with_widths_of_16_convert(family):
    model = bf16(family)
    names = fp8_linears.eligible(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names and set(names) < set(linears)
    assert all(n.split(".")[0] in fp8_linears.BLOCK_LISTS and ".norm" not in n for n in names)
    assert any(".norm" in n for n in linears)  # the modulation layers exist and stay
    assert not any(n.startswith(("time_text_embed", "context_embedder", "norm_out", "proj_out", "x_embedder"))
                   for n in names)
    assert all(model.get_submodule(n).in_features % 16 == 0 and model.get_submodule(n).out_features % 16 == 0
               for n in names)
    assert fp8_linears.quantize(model, check=False) == names == fp8_linears.quantized_names(model)


def reference_rowwise_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The scheme by hand: x and the weight each quantized to e4m3 with one scale per row (amax / 448), multiplied
    in float32, rescaled, bias added."""
    def rowwise(t):
        scale = t.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float(), scale

    xq, xs = rowwise(x)
    wq, ws = rowwise(weight)
    return (xq @ wq.T) * xs * ws.T + bias.float()


@pytest.mark.cpu_fp8
def test_an_fp8_linear_matches_the_rowwise_reference_on_fresh_inputs():
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs on every run
    linear = torch.nn.Linear(64, 96).to(torch.bfloat16)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16) * 3
    container = torch.nn.Module()
    container.transformer_blocks = torch.nn.ModuleList([linear])
    fp8_linears.quantize(container, check=False)
    got = linear(x).float()
    want = reference_rowwise_fp8_linear(x.reshape(-1, 64), weight, bias).reshape(5, 7, 96)
    exact = x.float() @ weight.float().T + bias.float()
    assert (got - want).norm() / want.norm() < 2e-2  # bfloat16 output rounding only
    assert (got - exact).norm() / exact.norm() < 0.08  # and the scheme stays close to the bfloat16 layer


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_stored_fp8_weights_load_back_exactly(family):
    model = bf16(family)
    names = fp8_linears.quantize(model, check=False)
    tensors = fp8_linears.state(model)
    assert {t.dtype for k, t in tensors.items() if k.endswith(".weight")} == {torch.float8_e4m3fn}
    assert {t.dtype for k, t in tensors.items() if k.endswith("_scale")} == {torch.float32}
    fresh = bf16(family, seed=9)  # other bfloat16 weights: every quantized one must come from the file
    fp8_linears.load(fresh, names, tensors, "test")
    assert fp8_linears.quantized_names(fresh) == names
    again = fp8_linears.state(fresh)
    assert same_state(again, tensors)


def test_refusals_name_the_problem_and_the_fix(monkeypatch):
    with pytest.raises(fp8_linears.Fp8Unavailable, match="bfloat16 transformer .* got float32.*torch_dtype="):
        fp8_linears.quantize(tiny_transformer("sd3"), check=False)
    model = bf16()
    fp8_linears.quantize(model, check=False)
    with pytest.raises(fp8_linears.Fp8Unavailable, match="already FP8"):
        fp8_linears.quantize(model, check=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(fp8_linears.Fp8Unavailable, match="only on a CUDA GPU .* 8.9 or newer"):
        fp8_linears.check_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(fp8_linears.Fp8Unavailable, match="NVIDIA A100 has 8.0"):
        fp8_linears.check_available()
    with pytest.raises(ValueError, match="quantize_linears must be None or one of"):
        DiTFastAttnConfig(quantize_linears="int4")


def test_load_refuses_tensors_that_do_not_fit():
    model = bf16()
    names = fp8_linears.quantize(model, check=False)
    tensors = fp8_linears.state(model)
    first = names[0]
    for edit, words in [
        (lambda t: t.pop(f"{first}.weight_scale"), "do not match the recorded layers"),
        (lambda t: t.__setitem__(f"{first}.weight", t[f"{first}.weight"].float()), "expected float8_e4m3fn"),
        (lambda t: t.__setitem__(f"{first}.weight_scale", -t[f"{first}.weight_scale"]), "positive finite"),
    ]:
        edited = dict(tensors)
        edit(edited)
        with pytest.raises(ValueError, match=words):
            fp8_linears.load(bf16(), names, edited, "f.safetensors")
    with pytest.raises(ValueError, match="not a linear layer ditfa quantizes"):
        fp8_linears.load(bf16(), ["proj_out"], {"proj_out.weight": tensors[f"{first}.weight"],
                                                "proj_out.weight_scale": tensors[f"{first}.weight_scale"]}, "f")


# ---------------------------------------------------------------------------------------------- the artifact
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("base") / "tiny-sd3-bf16"
    bf16(seed=3).save_pretrained(root / "transformer", safe_serialization=True)
    return root


def loaded(base_dir):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(base_dir / "transformer", torch_dtype=torch.bfloat16).eval()


def save(transformer, path, base_dir, **kwargs):
    plan = uniform_plan(transformer, num_steps=2, method="arrow:1/2", block_size=16)
    return write_artifact(path, transformer=transformer, plan=plan, prompt_encoder={"name": "tiny", "text_tokens": 16},
                          base_model={"id": str(base_dir), "revision": None, "embedded": False}, **kwargs)


@pytest.mark.cpu_fp8
def test_an_fp8_artifact_stores_only_the_fp8_layers_and_loads_them_exactly(base_dir, tmp_path, monkeypatch):
    transformer = loaded(base_dir)
    names = fp8_linears.quantize(transformer, check=False)
    path = save(transformer, tmp_path / "art", base_dir)
    config = json.loads((path / "ditfa_config.json").read_text())
    assert config["transformer"]["weights"] == "base" and config["transformer"]["dtype"] == "bfloat16"
    assert config["transformer"]["linears"]["modules"] == names
    stored = load_file(path / LINEARS_FILE)
    assert stored.keys() == fp8_linears.state(transformer).keys()
    weights = sum(p.stat().st_size for p in (base_dir / "transformer").glob("*.safetensors"))
    assert (path / LINEARS_FILE).stat().st_size < weights  # one byte per weight instead of two

    art = read_artifact(path)
    assert art.linears == names
    with pytest.raises(ArtifactError, match="FP8 linear layers, which cannot load here: .*CUDA GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        art.load_transformer()
    monkeypatch.setattr(fp8_linears, "check_available", lambda: None)  # the GPU check, as on an H100
    with pytest.raises(ArtifactError, match="run in bfloat16; got torch_dtype=torch.float16"):
        art.load_transformer(torch.float16)
    back = art.load_transformer()
    mine, theirs = fp8_linears.state(transformer), fp8_linears.state(back)
    assert same_state(mine, theirs)
    other = {k: v for k, v in back.state_dict().items() if not any(k == f"{n}.weight" for n in names)}
    assert all(torch.equal(v, transformer.state_dict()[k]) for k, v in other.items())
    assert torch.equal(run(back), run(transformer))


def test_fp8_artifacts_refuse_what_they_cannot_hold(base_dir, tmp_path):
    transformer = loaded(base_dir)
    fp8_linears.quantize(transformer, check=False)
    with pytest.raises(ArtifactError, match="self-contained artifact of a transformer with FP8 linear layers"):
        save(transformer, tmp_path / "a", base_dir, self_contained=True)
    plan = uniform_plan(transformer, num_steps=2, method="arrow:1/2", block_size=16)
    with pytest.raises(ArtifactError, match="cannot save a transformer with FP8 linear layers: the pipeline was "
                                            "given as an object"):
        write_artifact(tmp_path / "b", transformer=transformer, plan=plan, base_model={"id": None})


def test_an_edited_fp8_record_is_refused(base_dir, tmp_path):
    transformer = loaded(base_dir)
    fp8_linears.quantize(transformer, check=False)
    path = save(transformer, tmp_path / "art", base_dir)
    config_file = path / "ditfa_config.json"
    original = json.loads(config_file.read_text())
    for edit, words in [
        (lambda c: c["transformer"]["linears"].__setitem__("modules", []), "transformer.linears must be"),
        (lambda c: c["transformer"]["linears"].__setitem__("quantization", "int8"), "transformer.linears must be"),
        (lambda c: c["transformer"].__setitem__("dtype", "float16"), "bfloat16 with FP8 linear layers"),
        (lambda c: c["files"].pop(LINEARS_FILE), "does not list transformer_fp8.safetensors"),
    ]:
        config = json.loads(json.dumps(original))
        edit(config)
        config_file.write_text(json.dumps(config))
        with pytest.raises(ArtifactError, match=words):
            read_artifact(path)
    config_file.write_text(json.dumps(original))
    data = (path / LINEARS_FILE).read_bytes()
    (path / LINEARS_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="transformer_fp8.safetensors"):
        read_artifact(path)


def test_the_optimizer_refuses_fp8_on_a_machine_without_fp8_tensor_cores(monkeypatch):
    from ditfa_optimum import DiTFastAttnOptimizer
    from ditfa_optimum.tiny import tiny_pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opt = DiTFastAttnOptimizer(tiny_pipeline("sd3"))
    config = DiTFastAttnConfig(num_inference_steps=2, height=64, width=64, num_prompts=1, batch_size=1,
                               quantize_linears="fp8")
    with pytest.raises(fp8_linears.Fp8Unavailable, match="only on a CUDA GPU"):
        opt.optimize(config, progress=False)
    assert not fp8_linears.quantized_names(opt.pipeline.transformer)


def test_unfused_adapters_are_refused_with_the_fix():
    """A LoRA loaded without fusing wraps each linear (``to_q.base_layer``, ``to_q.lora_A.default``): quantizing would
    put the adapter in FP8 and record names the base model lacks. Refused, naming the fix (fuse and unload)."""
    model = bf16("sd3")
    attn = model.transformer_blocks[0].attn
    wrapped = torch.nn.Module()
    wrapped.base_layer = attn.to_q
    wrapped.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(attn.to_q.in_features, 16, bias=False)})
    wrapped.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(16, attn.to_q.out_features, bias=False)})
    attn.to_q = wrapped
    with pytest.raises(fp8_linears.Fp8Unavailable, match=r"unfused adapter layers .*fuse_lora\(\); "
                                                          r"pipe.unload_lora_weights\(\)"):
        fp8_linears.quantize(model, check=False)
    assert not fp8_linears.quantized_names(model)


def test_a_real_peft_lora_is_refused_and_a_fused_one_converts():
    peft = pytest.importorskip("peft")
    model = bf16("sd3")
    model.add_adapter(peft.LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k"], init_lora_weights=False))
    with pytest.raises(fp8_linears.Fp8Unavailable, match="unfused adapter layers"):
        fp8_linears.quantize(model, check=False)
    model.fuse_lora()
    model.unload_lora()
    assert fp8_linears.quantize(model, check=False) == fp8_linears.eligible(model)
    assert not [n for n in fp8_linears.quantized_names(model) if "lora" in n or "base_layer" in n]


def _fp8_gpu() -> bool:
    try:
        fp8_linears.check_available()
    except fp8_linears.Fp8Unavailable:
        return False
    return True


@pytest.mark.skipif(not _fp8_gpu(), reason="needs torchao and a GPU of compute capability 8.9+")
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_fp8_linears_on_the_gpu_match_the_rowwise_reference(family):
    """On an FP8 GPU (the FP8 tensor-core matmul): each converted layer against the reference on fresh inputs, and
    the stored tensors load back bit for bit there."""
    torch.manual_seed(torch.seed() % 2**31)
    model = bf16(family).cuda()
    originals = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone())
                 for n in fp8_linears.eligible(model)}
    names = fp8_linears.quantize(model)
    for name in names[:6]:
        weight, bias = originals[name]
        x = torch.randn(3, 40, weight.shape[1], dtype=torch.bfloat16, device="cuda")
        got = model.get_submodule(name)(x).float()
        want = reference_rowwise_fp8_linear(x.reshape(-1, x.shape[-1]), weight, bias).reshape(got.shape)
        assert (got - want).norm() / want.norm() < 2e-2, name
    fresh = bf16(family, seed=9).cuda()
    fp8_linears.load(fresh, names, fp8_linears.state(model), "test")
    assert same_state({k: v.cpu() for k, v in fp8_linears.state(fresh).items()}, fp8_linears.state(model))


@pytest.mark.cpu_fp8
def test_optimize_with_fp8_linears_searches_the_fp8_model_and_saves_it(monkeypatch, tmp_path):
    """The whole flow on the CPU (the GPU check stubbed): the linears convert before calibrating, the sensitivity
    sweep differentiates through them (straight through their activation rounding), and the artifact stores them."""
    from ditfa_optimum import DiTFastAttnOptimizer
    from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline

    monkeypatch.setattr(fp8_linears, "check_available", lambda: None)
    pipe = tiny_pipeline("sd3", dtype=torch.bfloat16)
    opt = DiTFastAttnOptimizer(pipe, prompt_encoder=TinyPromptEncoder(pipe.transformer, text_tokens=16))
    config = DiTFastAttnConfig(num_inference_steps=3, height=64, width=64, num_prompts=2, batch_size=2,
                               block_size=16, sensitivity_prompts=1, verify_plans=1, quantize_linears="fp8")
    plan = opt.optimize(config, progress=False)
    assert fp8_linears.quantized_names(pipe.transformer) == fp8_linears.eligible(pipe.transformer)
    assert plan.metadata["search"]["config"]["quantize_linears"] == "fp8"


@pytest.mark.cpu_fp8
def test_gradients_pass_through_fp8_linears_while_differentiable():
    linear = torch.nn.Linear(32, 48).to(torch.bfloat16)
    container = torch.nn.Module()
    container.transformer_blocks = torch.nn.ModuleList([linear])
    fp8_linears.quantize(container, check=False)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="derivative for aten::_scaled_mm is not implemented"):
        linear(x).sum().backward()
    with fp8_linears.differentiable(container):
        linear(x).float().sum().backward()
    want = linear.weight.dequantize().float().sum(0)  # d sum(x W^T) / dx = column sums of W
    assert torch.allclose(x.grad.float(), want.expand(4, -1), rtol=1e-2, atol=1e-2)
    assert "forward" not in vars(linear)  # the FP8 matmul is back


@pytest.mark.cpu_fp8
def test_an_fp8_artifact_of_the_mini_model_loads_as_a_pipeline_and_draws(monkeypatch, tmp_path):
    """`load_pipeline` end to end: the embedded model's files in bfloat16, the stored FP8 layers, the plan applied."""
    from ditfa_optimum import DiTFastAttnOptimizer, load_pipeline

    monkeypatch.setattr(fp8_linears, "check_available", lambda: None)
    opt = DiTFastAttnOptimizer.from_pretrained("mini-mmdit")
    opt.pipeline.transformer.to(torch.bfloat16)
    names = fp8_linears.quantize(opt.pipeline.transformer, check=False)
    opt.plan = uniform_plan(opt.pipeline.transformer, num_steps=3, method="arrow:1/4", block_size=32)
    opt.plan.metadata["search"] = {"config": opt.default_config().replace(num_inference_steps=3).to_dict()}
    path = opt.save_pretrained(tmp_path / "art", reproducibility_prompts=0)
    pipe = load_pipeline(path)
    assert fp8_linears.quantized_names(pipe.transformer) == names
    assert same_state(fp8_linears.state(pipe.transformer), fp8_linears.state(opt.pipeline.transformer))
    images = pipe(["a small red circle in the center"], num_inference_steps=3, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and bool(images.isfinite().all())
