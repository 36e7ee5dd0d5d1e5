"""Run Stable Diffusion 3 with a head-wise attention plan and compare it with dense attention.

    python examples/sd3_headwise_plan.py --model stabilityai/stable-diffusion-3-medium-diffusers \
        --method arrow:1/8 --method cache --full-steps 4 --prompt "a lighthouse at dusk"
    python examples/sd3_headwise_plan.py --model mini-mmdit --out mini-headwise      # offline, CPU, seconds

Needs the model weights (Hub or a local directory) and, for speed, a CUDA GPU; ``--model mini-mmdit`` runs the
embedded miniature SD3-architecture model instead (64 px, its shapes grammar). Writes dense.png, planned.png and the
plan (plan.json + plan.safetensors) into --out, and prints the PSNR of the planned image against the dense one. The plan is a hand-made mix, to see the runtime on its own: after
--full-steps dense steps, heads take the given methods round-robin. For a searched plan (heads and skipped steps,
calibrated on the model) see examples/optimize_and_publish.py.
"""

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

import ditfa_optimum as dfa
from ditfa_optimum.cli import demo_plan


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stabilityai/stable-diffusion-3-medium-diffusers")
    parser.add_argument("--method", action="append", help="e.g. arrow:1/8, cache, cfg_share (repeat to mix)")
    parser.add_argument("--full-steps", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--prompt", help="default: a lighthouse (SD3) / a small red circle (mini-mmdit)")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", default="sd3-headwise")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "mini-mmdit":
        from ditfa_optimum.embedded import DEFAULTS
        from ditfa_optimum.mini import TEXT_CONFIG, mini_pipeline

        pipe = mini_pipeline(device=device)
        d = DEFAULTS["mini-mmdit"]
        size, block_size, text_tokens, scale = d["size"], d["block_size"], TEXT_CONFIG["max_length"], 1  # pixels
        prompt = args.prompt or "a small red circle in the top left"
    else:
        from diffusers import StableDiffusion3Pipeline

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        size, block_size, text_tokens, scale = args.size, 128, 333, pipe.vae_scale_factor
        prompt = args.prompt or "a lighthouse at dusk, oil painting"
    methods = args.method or ["full", "arrow:1/8", "arrow:1/16", "cache"]
    plan = demo_plan(pipe.transformer, args.steps, methods, block_size=block_size)
    for step in range(1, args.full_steps):  # demo_plan makes step 0 full; make the first --full-steps full
        for spec in plan.modules:
            for head in range(spec.num_heads):
                plan.set(spec.name, step, head, "full")
    tokens = dfa.get_adapter(pipe.transformer).image_tokens(pipe.transformer, size, size, scale)
    print(plan.summary())
    print(f"attention FLOPs cut: {plan.flops(tokens, text_tokens, cfg=True).cut:.1%}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def generate(name):
        start = time.perf_counter()
        image = pipe(prompt, num_inference_steps=args.steps, height=size, width=size,
                     generator=torch.Generator(device).manual_seed(0)).images[0]
        print(f"{name}: {time.perf_counter() - start:.1f} s")
        image.save(out / f"{name}.png")
        return torch.tensor(np.asarray(image), dtype=torch.float64) / 255

    dense = generate("dense")
    dfa.apply(pipe, plan, backend=args.backend)
    planned = generate("planned")
    plan.save(out)
    mse = float(((planned - dense) ** 2).mean())
    print(f"PSNR of the planned image against the dense one: {10 * math.log10(1 / mse) if mse else math.inf:.1f} dB "
          "(a hand-made plan: the search chooses far better, see examples/optimize_and_publish.py)")
    print(f"images and plan in {out}/")


if __name__ == "__main__":
    main()
