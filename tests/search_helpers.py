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
    config = DiTFastAttnConfig(**{**dict(threshold=0.1, num_inference_steps=6, height=px, width=px, block_size=16,
                                         num_prompts=4, batch_size=4,
                                         guidance_scale=None if family == "flux" else 5.0), **changes})
    return pipe, TinyPromptEncoder(pipe.transformer), config
