"""Tiny random-weight MMDiT transformers (diffusers' own test-sized configs) for tests, the demo and CPU examples.

`tiny_inputs` makes matching random transformer inputs. Until the trained miniature model ships, `tiny_sd3` is the
embedded default model of the CLI.
"""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    "sd3": dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4),
    "sd35": dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                 caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
                 dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "flux": dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
}


def tiny_transformer(family: str = "sd3", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny transformer of ``family`` ("sd3", "sd35" or "flux"), deterministic for ``seed``."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {sorted(TINY_CONFIGS)}")
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    torch.manual_seed(seed)
    model = cls(**{**TINY_CONFIGS[family], **overrides}).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    with torch.no_grad():  # every weight random and sizeable, so every path (and any plan) shows in the output
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def tiny_inputs(model, batch: int = 2, height: int = 12, width: int = 10, text_tokens: int = 7,
                timestep: float = 999.0, seed: int = 1) -> dict:
    """Random keyword inputs for one forward call of a tiny transformer (latent ``height x width``)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    dtype = next(model.parameters()).dtype

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    t = torch.full((batch,), float(timestep))
    if type(model).__name__ == "FluxTransformer2DModel":
        n_img = height * width
        img_ids = torch.zeros(height, width, 3)
        img_ids[..., 1] = torch.arange(height)[:, None]
        img_ids[..., 2] = torch.arange(width)[None, :]
        return dict(hidden_states=rand(batch, n_img, cfg.in_channels),
                    encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), timestep=t / 1000,
                    img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3))
    return dict(hidden_states=rand(batch, cfg.in_channels, height, width),
                encoder_hidden_states=rand(batch, text_tokens, cfg.joint_attention_dim),
                pooled_projections=rand(batch, cfg.pooled_projection_dim), timestep=t)
