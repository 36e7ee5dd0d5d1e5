"""Shared set-up for calibration and search tests: tiny pipelines with 256 image tokens and a few steps."""

import logging

from ditfa_optimum.config import DiTFastAttnConfig
from ditfa_optimum.tiny import TinyPromptEncoder, tiny_pipeline

logging.getLogger("diffusers").setLevel(logging.ERROR)

FAMILIES = ("sd3", "sd35", "flux")
PIXELS = {"sd3": 128, "sd35": 128, "flux": 256}  # 16 x 16 latent tokens each


def tiny_setup(family: str, **changes):
    """(pipeline, prompt encoder, config) for a quick calibration of the tiny ``family`` model."""
    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    px = PIXELS[family]
    config = DiTFastAttnConfig(**{**dict(threshold=0.1, allocation="local", num_inference_steps=6, height=px, width=px, block_size=16,
                                         num_prompts=4, batch_size=4,
                                         guidance_scale=None if family == "flux" else 5.0), **changes})
    return pipe, TinyPromptEncoder(pipe.transformer), config


def synthetic_stats(num_modules: int = 3, num_steps: int = 6, num_heads: int = 4, methods=None, seed: int = 0,
                    image_tokens: int = 256, text_tokens: int = 16, block_size: int = 16, cfg: bool = True):
    """`CalibrationStats` made up from random numbers (no model): errors, variances and the real FLOP costs of the
    candidates at the given token counts, so a plan's FLOP report agrees with the search's own cut. Step 0 has only
    `full` (like a real calibration: nothing to reuse yet)."""
    import torch

    from ditfa_optimum.calibrate import CalibrationStats
    from ditfa_optimum.config import DEFAULT_METHODS
    from ditfa_optimum.plan import ModuleSpec

    candidates = DiTFastAttnConfig(methods=methods or DEFAULT_METHODS).candidates()
    names = [str(m) for m in candidates]
    g = torch.Generator().manual_seed(seed)
    specs = [ModuleSpec(f"transformer_blocks.{i}.attn", num_heads, 8) for i in range(num_modules)]
    T, H, C = num_steps, num_heads, len(candidates)
    err, ref, guided, flops = {}, {}, {}, {}
    for spec in specs:
        ref[spec.name] = torch.rand(T, H, generator=g, dtype=torch.float64) * 100 + 50
        # relative errors spread over two decades, so some exceed a per-head cap and the allocation has choices
        rse = 10 ** (torch.rand(T, H, C, generator=g, dtype=torch.float64) * 2.5 - 2.5)
        e = rse * ref[spec.name][..., None]
        e[:, :, 0] = 0.0
        e[0, :, 1:] = torch.inf
        err[spec.name] = e
        guided[spec.name] = torch.where(torch.isfinite(e), e * (0.2 + torch.rand(T, H, C, generator=g,
                                                                                 dtype=torch.float64)), e)
        layout = spec.layout(image_tokens, text_tokens, block_size)
        flops[spec.name] = torch.tensor([m.flops(layout, spec.head_dim, cfg) for m in candidates], dtype=torch.float64)
    return CalibrationStats(
        modules=specs, candidates=names, num_steps=T, err=err, ref=ref,
        chosen={s.name: torch.zeros(T, H, dtype=torch.int16) for s in specs}, cost_flops=flops, err_guided=guided,
        image_tokens=image_tokens, text_tokens=text_tokens, cfg=cfg, block_size=block_size, num_prompts=1,
        seconds=1.0)


def attach_sensitivity(stats, seed: int = 0, step_factor=None, guidance_scale: float | None = 5.0):
    """Give ``stats`` a made-up `Sensitivity`: gains falling over the steps (early errors travel further), spread
    over heads, and optional step factors (default: none, i.e. 1). Returns ``stats``."""
    import torch

    from ditfa_optimum.sensitivity import Sensitivity

    g = torch.Generator().manual_seed(seed + 1000)
    T = stats.num_steps
    trend = torch.linspace(1.0, 0.05, T, dtype=torch.float64)[:, None]
    gain = {s.name: trend * 10 ** (torch.rand(T, s.num_heads, generator=g, dtype=torch.float64) * 2 - 3)
            for s in stats.modules}
    stats.sensitivity = Sensitivity(modules=list(stats.modules), num_steps=T, gain=gain, final_numel=1024,
                                    final_variance=1.0, pixel_scale=0.5, num_prompts=2, seconds=0.5,
                                    guidance_scale=guidance_scale, step_factor=list(step_factor or []))
    return stats
