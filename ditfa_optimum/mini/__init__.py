"""The miniature MMDiT: a small SD3-architecture text-to-image model trained on procedural shape scenes.

It ships inside the package (``ditfa_optimum/assets/mini-mmdit``, safetensors + JSON) so that everything runs offline:
it is the default model of ``ditfa-optimum optimize``, realistic test data (trained attention has structure; random
weights have none) and the yardstick of compression quality, because its captions follow a known grammar
(`grammar`) that the faithfulness check scores generated images against. The package holds what runs (weights,
pipeline, text encoder, grammar); scene rendering, the faithfulness metric and the training script live outside
it, in the repository's ``training/`` folder. See docs/mini-model.md.

    >>> from ditfa_optimum.mini import mini_pipeline
    >>> pipe = mini_pipeline()
    >>> images = pipe(["a small red circle in the top left"], num_inference_steps=20).images  # doctest: +SKIP

A second, 128x128 px model (4096 image tokens, ``mini-mmdit-128``) is fine-tuned from it with
``python -m training.train_mini --init ... --size 128`` (`with_image_size` gives it its position table) and
loads with ``mini_pipeline(path)``; it generates 128x128 by default (its transformer's ``sample_size``).
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


def image_defaults(size: int, patch_size: int = 2) -> dict:
    """Calibration defaults (the form of ``embedded.DEFAULTS``) of a miniature model that makes ``size`` px images.

    64 px: those of ``mini-mmdit`` (the same dict). Other sizes: the same steps and CFG scale, and a mask block of one
    row of image tokens (``size / patch_size``): 32 at 64 px (1024 tokens), 64 at 128 px (4096 tokens), so an arrow
    fraction keeps the same rows of the image at every size.
    """
    base = EMBEDDED_DEFAULTS[NAME]
    return base if size == base["size"] else {**base, "size": size, "block_size": size // patch_size}


def saved_defaults(path: str | os.PathLike) -> dict:
    """`image_defaults` of a saved miniature-model directory, from its transformer's ``sample_size``."""
    import json

    try:
        config = json.loads((Path(path) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return image_defaults(int(config.get("sample_size", TRANSFORMER_CONFIG["sample_size"])),
                          int(config.get("patch_size", TRANSFORMER_CONFIG["patch_size"])))


def with_image_size(pipe: MiniMMDiTPipeline, size: int) -> MiniMMDiTPipeline:
    """``pipe`` with its transformer rebuilt for ``size`` px images: what fine-tuning at a new size starts from.

    The new transformer has ``sample_size=size`` and ``pos_embed_max_size=size / patch_size``; every weight is copied
    and only the fixed (not learned) sin-cos position table ``pos_embed.pos_embed`` is new. diffusers' ``PatchEmbed``
    builds that table over a ``pos_embed_max_size`` square grid with coordinates ``i * base / pos_embed_max_size``
    (``base = sample_size / patch_size``), i.e. 0, 1, ... 63 here, and crops its centre for smaller images; so the
    128 px table's top-left 32x32 corner is the 64 px model's whole table. Returns ``pipe`` (changed in place).
    """
    from diffusers import SD3Transformer2DModel

    old = pipe.transformer
    patch = old.config.patch_size
    if size % patch or size <= 0:
        raise ValueError(f"size must be a positive multiple of the patch size {patch}, got {size}")
    if old.config.sample_size == size and old.config.pos_embed_max_size == size // patch:
        return pipe
    config = {k: v for k, v in old.config.items() if not k.startswith("_")}
    config.update(sample_size=size, pos_embed_max_size=size // patch)
    with torch.random.fork_rng(devices=[]):  # the throwaway random init leaves the global generator alone
        new = SD3Transformer2DModel.from_config(config)
    weights = {k: v for k, v in old.state_dict().items() if k != "pos_embed.pos_embed"}
    missing, unexpected = new.load_state_dict(weights, strict=False)
    if missing != ["pos_embed.pos_embed"] or unexpected:
        raise RuntimeError(f"unexpected transformer layout: missing {missing}, unexpected {unexpected}")
    new = new.to(device=old.device, dtype=old.dtype).train(old.training)
    pipe.register_modules(transformer=new)
    return pipe


def new_pipeline(seed: int = 0) -> MiniMMDiTPipeline:
    """An untrained pipeline (random initialisation, deterministic for ``seed``): what training starts from."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from .grammar import WORDS

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
    pipe = MiniMMDiTPipeline.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
    pipe.to(dtype=torch_dtype)  # cast after loading: diffusers 0.37 reads `torch_dtype`, 0.42 `dtype`
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


__all__ = ["ASSET_DIR", "DEFAULTS", "NAME", "MiniMMDiTPipeline", "MiniTextEncoder", "image_defaults",
           "is_mini_pipeline_dir", "mini_pipeline", "new_pipeline", "saved_defaults", "with_image_size"]
