"""Run Stable Diffusion 3 with a head-wise attention plan and compare it with dense attention.

    python examples/sd3_headwise_plan.py --model stabilityai/stable-diffusion-3-medium-diffusers \
        --method arrow:1/8 --method cache --full-steps 4 --prompt "a lighthouse at dusk"

Needs the model weights (Hub or a local directory) and, for speed, a CUDA GPU. Writes dense.png, planned.png and the
plan (plan.json + plan.safetensors) into --out. The plan is a hand-made mix, to see the runtime on its own: after
--full-steps dense steps, heads take the given methods round-robin. For a searched plan (heads and skipped steps,
calibrated on the model) see examples/optimize_and_publish.py.
"""

import argparse
import time
from pathlib import Path

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
    parser.add_argument("--prompt", default="a lighthouse at dusk, oil painting")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", default="sd3-headwise")
    args = parser.parse_args()

    from diffusers import StableDiffusion3Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = StableDiffusion3Pipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    methods = args.method or ["full", "arrow:1/8", "arrow:1/16", "cache"]
    plan = demo_plan(pipe.transformer, args.steps, methods, block_size=128)
    for step in range(1, args.full_steps):  # demo_plan makes step 0 full; make the first --full-steps full
        for spec in plan.modules:
            for head in range(spec.num_heads):
                plan.set(spec.name, step, head, "full")
    tokens = dfa.get_adapter(pipe.transformer).image_tokens(pipe.transformer, args.size, args.size,
                                                            pipe.vae_scale_factor)
    print(plan.summary())
    print(f"attention FLOPs cut: {plan.flops(tokens, 333, cfg=True).cut:.1%}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def generate(name):
        start = time.perf_counter()
        image = pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                     generator=torch.Generator(device).manual_seed(0)).images[0]
        print(f"{name}: {time.perf_counter() - start:.1f} s")
        image.save(out / f"{name}.png")

    generate("dense")
    dfa.apply(pipe, plan, backend=args.backend)
    generate("planned")
    plan.save(out)
    print(f"images and plan in {out}/")


if __name__ == "__main__":
    main()
