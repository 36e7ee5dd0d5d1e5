"""Calibration + search time on full-size MMDiT architectures with random weights, on one GPU.

For each architecture in ``benchmarks/configs/`` asked for: build the transformer in bf16 directly on the GPU, wrap it
in its diffusers pipeline (no VAE or text encoders: word-hash prompt embeddings of the real text length stand in), time
one dense generation of the calibration batch for scale, then time ``DiTFastAttnOptimizer.optimize`` (calibration over
every candidate on every head + the per-(layer, step) integer programs). Writes one JSON per run.

    python benchmarks/search_time.py --out docs/benchmarks/search-time.json
    python benchmarks/search_time.py --models sd3_medium --prompts 8 --steps 28 --size 1024
    python benchmarks/search_time.py --check        (calibration flow == runtime on the GPU, 2-block models)

Defaults follow the targets: SD3-medium architecture, 1024^2, 28 steps, 8 prompts (CFG: transformer batch 16);
FLUX.1-dev architecture, 1024^2, 28 steps, 4 prompts.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditfa_optimum import DiTFastAttnConfig, DiTFastAttnOptimizer  # noqa: E402
from ditfa_optimum.calibrate import run_pipeline  # noqa: E402
from ditfa_optimum.prompts import default_prompts  # noqa: E402
from ditfa_optimum.tiny import TinyPromptEncoder  # noqa: E402

DEFAULT_PROMPTS = {"sd3_medium": 8, "flux_dev": 4}


def build_pipeline(name: str, device: str = "cuda", layers: int | None = None, dtype: torch.dtype = torch.bfloat16):
    import diffusers

    config = json.loads((ROOT / "benchmarks" / "configs" / f"{name}.json").read_text())
    cls = getattr(diffusers, config["_class_name"])
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if not k.startswith("_")}
    if layers is not None:  # a shortened model for quick checks
        kwargs["num_layers"] = layers
        if "num_single_layers" in kwargs:
            kwargs["num_single_layers"] = layers
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in bf16 on the GPU: FLUX.1-dev in fp32 would need 48 GB
    try:
        with torch.device(device):
            transformer = cls(**kwargs).eval()
    finally:
        torch.set_default_dtype(default)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    if cls.__name__ == "FluxTransformer2DModel":
        pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler, **dict.fromkeys(
            ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]))
    else:
        pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **dict.fromkeys(
            ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe, TinyPromptEncoder(transformer, text_tokens=config["_text_tokens"], scale=0.5)


def run(name: str, prompts: int, steps: int, size: int, threshold: float, cost_model: str, backend: str | None):
    pipe, encoder = build_pipeline(name)
    config = DiTFastAttnConfig(threshold=threshold, num_inference_steps=steps, height=size, width=size,
                               num_prompts=prompts, batch_size=prompts, cost_model=cost_model, backend=backend)
    captions = default_prompts(prompts, config.seed)
    with torch.inference_mode():  # warm-up: cuDNN/cuBLAS plans, allocator
        run_pipeline(pipe, captions, config.replace(num_inference_steps=2), prompt_encoder=encoder)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        run_pipeline(pipe, captions, config, prompt_encoder=encoder)
    torch.cuda.synchronize()
    dense_seconds = time.perf_counter() - start

    torch.cuda.reset_peak_memory_stats()
    base_memory = torch.cuda.memory_allocated()
    opt = DiTFastAttnOptimizer(pipe, prompt_encoder=encoder, source=f"random-weight {name} architecture")
    start = time.perf_counter()
    plan = opt.optimize(config, calibration_prompts=captions, progress=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    info = plan.metadata["search"]
    result = dict(
        model=name, prompts=prompts, steps=steps, size=size, threshold=threshold, cost_model=cost_model,
        backend=backend or "auto", transformer_batch=prompts * (2 if info["cfg"] else 1),
        image_tokens=info["image_tokens"], text_tokens=info["text_tokens"],
        dense_generation_seconds=dense_seconds, optimize_wall_seconds=wall,
        calibration_seconds=info["calibration_seconds"], search_seconds=info["search_seconds"],
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
        model_memory_gib=base_memory / 2**30, flop_cut=info["flop_cut"], method_counts=plan.method_counts())
    print(json.dumps(result), flush=True)
    del opt, pipe, plan
    gc.collect()
    torch.cuda.empty_cache()
    return result


def check_flow(name: str, backend: str | None) -> dict:
    """On a 2-block version of the architecture: the latents that flow during calibration equal those of the searched
    plan run by the runtime (same backend), and differ clearly from dense ones. In fp32: in bf16 the runtime's mixed
    calls (FlexAttention for full heads too) and the calibration's all-full calls (SDPA) round differently, by about as
    much as a random-weight model's attention changes its output. Pass: the gap is at most 2% of the plan's effect or
    4x the gap between two dense runs through different SDPA kernels (default vs math), the rounding floor."""
    import importlib

    from ditfa_optimum import apply, remove, search
    from ditfa_optimum.calibrate import calibrate

    calibrate_module = importlib.import_module("ditfa_optimum.calibrate")
    pipe, encoder = build_pipeline(name, layers=2, dtype=torch.float32)
    # no `cache`: random-weight models change so little between steps that it would take every head
    config = DiTFastAttnConfig(threshold=0.3, methods=("arrow:1/8", "arrow:1/16", "cfg_share"),
                               num_inference_steps=4, height=512, width=512, batch_size=2, backend=backend)
    captions = default_prompts(2)
    captured = []
    original = calibrate_module.run_pipeline

    def capture(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    calibrate_module.run_pipeline = capture
    try:
        stats = calibrate(pipe, config, captions, prompt_encoder=encoder, progress=False)
    finally:
        calibrate_module.run_pipeline = original
    plan = search(stats, config)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.inference_mode():
        dense = run_pipeline(pipe, captions, config, prompt_encoder=encoder).float()
        with sdpa_kernel([SDPBackend.MATH]):  # the same dense model through another attention kernel: rounding floor
            dense_math = run_pipeline(pipe, captions, config, prompt_encoder=encoder).float()
        apply(pipe, plan, backend=backend)
        planned = run_pipeline(pipe, captions, config, prompt_encoder=encoder).float()
        remove(pipe)
    flow_gap = float((planned - captured[0].float()).abs().max())
    plan_effect = float((planned - dense).abs().max())
    kernel_noise = float((dense_math - dense).abs().max())
    result = dict(check=f"calibration flow == runtime ({name}, 2 blocks, 512^2, backend {backend or 'auto'})",
                  methods=plan.method_counts(), flow_gap=flow_gap, plan_effect=plan_effect, kernel_noise=kernel_noise,
                  ok=flow_gap <= max(0.02 * plan_effect, 4 * kernel_noise))
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sd3_medium", "flux_dev"], choices=list(DEFAULT_PROMPTS))
    parser.add_argument("--prompts", type=int, help="calibration prompts (default: 8 for SD3, 4 for FLUX)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--cost-model", default="flops", choices=["flops", "measured"])
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--check", action="store_true",
                        help="instead of timing, check calibration flow == runtime on 2-block models (fp32)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("search_time.py needs a CUDA GPU", file=sys.stderr)
        return 1
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), runs=[])
    if args.check:
        results["checks"] = [check_flow(name, args.backend) for name in args.models]
    for name in [] if args.check else args.models:
        results["runs"].append(run(name, args.prompts or DEFAULT_PROMPTS[name], args.steps, args.size,
                                   args.threshold, args.cost_model, args.backend))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(c["ok"] for c in results.get("checks", [])) else 1


if __name__ == "__main__":
    sys.exit(main())
