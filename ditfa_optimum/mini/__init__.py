"""The miniature MMDiT: a small SD3-architecture text-to-image model trained on procedural shape scenes.

It ships inside the package (``ditfa_optimum/assets/mini-mmdit``, safetensors + JSON) so that everything runs offline:
it is the default model of ``ditfa-optimum optimize``, realistic test data (trained attention has structure; random
weights have none) and the yardstick of compression quality, because `scenes.faithfulness` scores a generated image
against its caption. See docs/mini-model.md.

    >>> from ditfa_optimum.mini import mini_pipeline
    >>> pipe = mini_pipeline()
    >>> images = pipe(["a small red circle in the top left"], num_inference_steps=20).images  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..embedded import DEFAULT_MODEL, DEFAULTS as EMBEDDED_DEFAULTS
from .pipeline import MiniMMDiTPipeline
from .text import MiniTextEncoder

#: where the trained model lives inside the installed package
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini-mmdit"
#: the embedded model's name (CLI, artifacts' base_model id)
NAME = DEFAULT_MODEL

#: the transformer: diffusers' SD3 architecture, 64x64 RGB pixels in patches of 2 (1024 image tokens), 6 joint blocks
#: of 6 heads x 32
TRANSFORMER_CONFIG = dict(sample_size=64, patch_size=2, in_channels=3, out_channels=3, num_layers=6,
                          attention_head_dim=32, num_attention_heads=6, joint_attention_dim=128,
                          caption_projection_dim=192, pooled_projection_dim=128, pos_embed_max_size=32,
                          qk_norm="rms_norm")
TEXT_CONFIG = dict(max_length=32, width=128, num_layers=4, num_heads=4, pooled_dim=128)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
#: what the model was trained for (and what ``ditfa-optimum optimize`` calibrates at by default)
DEFAULTS = dict(height=EMBEDDED_DEFAULTS[NAME]["size"], width=EMBEDDED_DEFAULTS[NAME]["size"],
                num_inference_steps=EMBEDDED_DEFAULTS[NAME]["steps"], guidance_scale=EMBEDDED_DEFAULTS[NAME]["guidance"],
                block_size=EMBEDDED_DEFAULTS[NAME]["block_size"])


def new_pipeline(seed: int = 0) -> MiniMMDiTPipeline:
    """An untrained pipeline (random initialisation, deterministic for ``seed``): what training starts from."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from .scenes import WORDS

    torch.manual_seed(seed)
    return MiniMMDiTPipeline(transformer=SD3Transformer2DModel(**TRANSFORMER_CONFIG),
                             scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
                             text_encoder=MiniTextEncoder(vocab=list(WORDS), **TEXT_CONFIG))


def is_mini_pipeline_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by `MiniMMDiTPipeline.save_pretrained`."""
    import json

    index = Path(path) / "model_index.json"
    try:
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == MiniMMDiTPipeline.__name__
    except (OSError, ValueError):
        return False


def mini_pipeline(path: str | os.PathLike | None = None, *, torch_dtype: torch.dtype = torch.float32,
                  device: str | torch.device | None = None) -> MiniMMDiTPipeline:
    """Load the trained miniature model (default: the one shipped in the package) as a `MiniMMDiTPipeline`."""
    path = Path(path) if path is not None else ASSET_DIR
    if not (path / "model_index.json").is_file():
        hint = ("the package was installed without its assets; reinstall ditfa-optimum" if path == ASSET_DIR else
                "expected a directory written by MiniMMDiTPipeline.save_pretrained")
        raise FileNotFoundError(f"no miniature model at {path} ({hint})")
    pipe = MiniMMDiTPipeline.from_pretrained(path, dtype=torch_dtype, use_safetensors=True, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


__all__ = ["ASSET_DIR", "DEFAULTS", "NAME", "MiniMMDiTPipeline", "MiniTextEncoder", "is_mini_pipeline_dir",
           "mini_pipeline", "new_pipeline"]
