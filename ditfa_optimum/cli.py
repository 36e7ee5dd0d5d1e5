"""The ``ditfa-optimum`` command line.

``ditfa-optimum demo`` runs a head-wise plan on the embedded default model (a tiny random-weight SD3 transformer inside
a real diffusers `StableDiffusion3Pipeline` denoising loop, on CPU, offline) and reports the attention-FLOP cut, the time
per step and the error against dense attention; ``--out`` saves the plan.

Exit codes: 0 success, 1 user error (message on stderr, no traceback), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import __version__

DEMO_MIX = ("full", "arrow:1/4", "cfg_share", "cache")


class UserError(Exception):
    """A problem the user can fix; printed without a traceback."""


def demo_plan(transformer, num_steps: int, methods: list[str], block_size: int):
    """Step 0 full; later steps give the heads ``methods`` round-robin, shifted by one per module and per step."""
    from .adapters import get_adapter
    from .plan import CompressionPlan

    adapter = get_adapter(transformer)
    specs = adapter.module_specs(transformer)
    table = {}
    for m, spec in enumerate(specs):
        rows = [["full"] * spec.num_heads]
        for step in range(1, num_steps):
            rows.append([methods[(h + m + step) % len(methods)] for h in range(spec.num_heads)])
        table[spec.name] = rows
    return CompressionPlan.from_methods(specs, table, block_size=block_size, model_class=adapter.model_class,
                                        metadata={"made_by": "ditfa-optimum demo", "methods": methods})


def run_demo(family: str = "sd3", methods: list[str] | None = None, steps: int = 8, latent_size: int = 32,
             block_size: int = 128, guidance: float = 5.0, backend: str | None = None, seed: int = 0,
             out: str | None = None, repeats: int = 2) -> dict:
    """Run the demo; returns the numbers it prints (see module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from .apply import apply, remove
    from .runtime import get_backend
    from .tiny import tiny_transformer

    methods = list(methods or DEMO_MIX)
    transformer = tiny_transformer(family, seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler()
    if family == "flux":
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                            **dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]))
    else:
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **dict.fromkeys(
            ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]))
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed + 1)
    text_tokens = 16
    emb = torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    px = latent_size * pipe.vae_scale_factor * (2 if family == "flux" else 1)
    kwargs = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=px, width=px, num_inference_steps=steps,
                  output_type="latent")
    if family != "flux":
        kwargs.update(negative_prompt_embeds=torch.zeros_like(emb), negative_pooled_prompt_embeds=torch.zeros_like(
            pooled), guidance_scale=guidance)

    def generate():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            latents = pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images
            best = min(best, time.perf_counter() - start)
        return latents, best / steps

    plan = demo_plan(transformer, steps, methods, block_size)
    with torch.inference_mode():
        dense, dense_time = generate()
        runtime = apply(pipe, plan, backend=backend)
        planned, planned_time = generate()
        remove(pipe)
    adapter_tokens = latent_size * latent_size
    batched_cfg = family != "flux" and guidance > 1
    report = plan.flops(adapter_tokens, text_tokens, cfg=batched_cfg)
    rse = float(((planned - dense) ** 2).mean() / dense.var())
    result = dict(family=family, plan=plan.summary(), image_tokens=adapter_tokens, text_tokens=text_tokens,
                  steps=steps, flop_cut=report.cut, dense_ms_per_step=dense_time * 1e3,
                  planned_ms_per_step=planned_time * 1e3, latent_rse=rse,
                  backend=get_backend(runtime.backend_name, dense.device).name)
    if out:
        result["saved"] = str(plan.save(out))
    return result


def _cmd_demo(args) -> int:
    try:
        result = run_demo(args.family, args.method, args.steps, args.latent_size, args.block_size, args.guidance,
                          args.backend, args.seed, args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"\n{result['plan']}")
    print(f"model        tiny random-weight {result['family']} transformer, {result['image_tokens']} image + "
          f"{result['text_tokens']} text tokens, {result['steps']} steps, backend {result['backend']}")
    print(f"attention    {result['flop_cut']:.1%} of dense attention FLOPs cut")
    print(f"time/step    dense {result['dense_ms_per_step']:.1f} ms, planned {result['planned_ms_per_step']:.1f} ms "
          "(CPU reference backend: correctness path, not the fast one)")
    print(f"error        final latents RSE vs dense = {result['latent_rse']:.3g} (random weights: no quality meaning)")
    if "saved" in result:
        print(f"saved        plan.json + plan.safetensors in {result['saved']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditfa-optimum", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"ditfa-optimum {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a head-wise plan on the embedded tiny model and report cut, time, error")
    demo.add_argument("--family", choices=["sd3", "sd35", "flux"], default="sd3")
    demo.add_argument("--method", action="append", metavar="METHOD",
                      help=f"a method such as full, arrow:1/8, cache, cfg_share, arrow_residual:1/4; repeat to mix "
                           f"(heads take them round-robin). Default: {' '.join(DEMO_MIX)}")
    demo.add_argument("--steps", type=int, default=8)
    demo.add_argument("--latent-size", type=int, default=32, help="latent tokens per side (default 32: 1024 tokens)")
    demo.add_argument("--block-size", type=int, default=128, help="arrow mask block size in tokens")
    demo.add_argument("--guidance", type=float, default=5.0)
    demo.add_argument("--backend", default=None, help="auto (default), reference or flex")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default=None, help="directory to save the plan in")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"ditfa-optimum: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
