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


def tiny_pipeline(family: str = "sd3", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A real diffusers pipeline (`StableDiffusion3Pipeline` or `FluxPipeline`) around a tiny transformer.

    It has no VAE and no text encoders: call it with ``output_type="latent"`` and prompt embeddings, e.g. from
    `TinyPromptEncoder`. Pixel sizes map to latent tokens as for the real models (SD3: 8 px per token side; FLUX: 16).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    transformer = tiny_transformer(family, seed=seed, dtype=dtype, **overrides)
    scheduler = FlowMatchEulerDiscreteScheduler()
    if family == "flux":
        return FluxPipeline(transformer=transformer, scheduler=scheduler,
                            **dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]))
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **dict.fromkeys(
        ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]))


class TinyPromptEncoder:
    """A deterministic stand-in text encoder for the tiny pipelines: each word maps to a fixed random vector.

    Calling it with a list of prompts returns the pipeline keyword arguments (``prompt_embeds``,
    ``pooled_prompt_embeds`` and, for SD3 with CFG, the empty prompt's ``negative_*``). Different prompts give
    different conditioning, the same prompt always the same, on any machine.

    Example:
        >>> pipe = tiny_pipeline("sd3")
        >>> encode = TinyPromptEncoder(pipe.transformer)
        >>> encode(["a red cube"])["prompt_embeds"].shape
        torch.Size([1, 16, 32])
    """

    def __init__(self, transformer, text_tokens: int = 16, scale: float = 1.0):
        cfg = transformer.config
        self.family = "flux" if type(transformer).__name__ == "FluxTransformer2DModel" else "sd3"
        self.dim, self.pooled_dim = cfg.joint_attention_dim, cfg.pooled_projection_dim
        self.text_tokens = text_tokens
        self.scale = scale
        self.dtype = next(transformer.parameters()).dtype
        self.device = next(transformer.parameters()).device

    def record(self) -> dict:
        """What an artifact stores to rebuild this encoder (`ditfa_optimum.serialization.Artifact.prompt_encoder`)."""
        return {"name": "tiny", "text_tokens": self.text_tokens, "scale": self.scale}

    def _vector(self, word: str, size: int) -> torch.Tensor:
        import hashlib

        seed = int.from_bytes(hashlib.sha256(f"{word}/{size}".encode()).digest()[:8], "little") % 2**63
        return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * self.scale

    def _one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        words = prompt.lower().split()[: self.text_tokens]
        tokens = [self._vector(w, self.dim) for w in words]
        tokens += [self._vector("<pad>", self.dim)] * (self.text_tokens - len(tokens))
        pooled = torch.stack([self._vector(w, self.pooled_dim) for w in words or ["<pad>"]]).mean(0)
        return torch.stack(tokens), pooled

    def __call__(self, prompts: list[str]) -> dict:
        def encode(texts):
            embeds, pooled = zip(*(self._one(p) for p in texts))
            return (torch.stack(embeds).to(self.device, self.dtype), torch.stack(pooled).to(self.device, self.dtype))

        embeds, pooled = encode(prompts)
        out = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        if self.family == "sd3":
            neg, neg_pooled = encode([""] * len(prompts))
            out.update(negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
        return out
