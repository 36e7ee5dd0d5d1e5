"""Search a plan (head methods and skipped steps) for a real SD3 / FLUX pipeline, save the artifact, check it, publish it, load it back.

    python examples/optimize_and_publish.py --model stabilityai/stable-diffusion-3-medium-diffusers --out sd3-ditfa
    python examples/optimize_and_publish.py --tiny --out tiny-ditfa           # offline, CPU, seconds

Needs a GPU and the model's weights for real models (accept the model's license on the Hub first); ``--tiny`` runs the
embedded random-weight SD3 transformer instead. ``--repo me/name`` also uploads the artifact (needs a Hub token).
"""

from __future__ import annotations

import argparse

import torch

from ditfa_optimum import DiTFastAttnConfig, DiTFastAttnOptimizer, load_pipeline, verify_artifact
from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stabilityai/stable-diffusion-3-medium-diffusers")
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny model (CPU, offline)")
    parser.add_argument("--target-cut", type=float, default=0.3,
                        help="share of the whole transformer's FLOPs to skip (heads and whole steps)")
    parser.add_argument("--out", default="ditfa-artifact")
    parser.add_argument("--repo", help="also push to this Hub repo (user/name)")
    args = parser.parse_args()

    if args.tiny:
        pipe = tiny_pipeline("sd3")
        opt = DiTFastAttnOptimizer(pipe, prompt_encoder=TinyPromptEncoder(pipe.transformer), source="tiny-sd3")
        config = DiTFastAttnConfig(target_cut=args.target_cut, num_inference_steps=8, height=128, width=128,
                                   block_size=16, guidance_scale=5.0)
    else:
        opt = DiTFastAttnOptimizer.from_pretrained(args.model, torch_dtype=torch.bfloat16)
        opt.pipeline.to("cuda")
        config = DiTFastAttnConfig(target_cut=args.target_cut, num_inference_steps=28, height=1024, width=1024)

    plan = opt.optimize(config, save_dir=args.out)          # calibrate, search, write the artifact
    print(plan.report().table())
    print(verify_artifact(args.out).text())                  # regenerates the recorded references
    if args.repo:
        print(opt.push_to_hub(args.repo, private=True))

    pipe = load_pipeline(args.out, device="cuda" if torch.cuda.is_available() and not args.tiny else None)
    print(f"loaded {type(pipe).__name__} running a plan over {pipe.ditfa_artifact.plan.num_steps} steps")


if __name__ == "__main__":
    main()
