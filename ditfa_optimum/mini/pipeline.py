"""`MiniMMDiTPipeline`: text-to-image with the miniature MMDiT, in pixel space (no VAE).

A plain diffusers `DiffusionPipeline` (transformer, scheduler, text encoder) that saves and loads with
``save_pretrained`` / ``from_pretrained`` and runs the same rectified-flow Euler loop as Stable Diffusion 3, with
classifier-free guidance batched as [uncond, cond] like SD3, so every ditfa_optimum method (``cfg_share`` included)
applies unchanged.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .text import MiniTextEncoder


class MiniMMDiTPipeline(DiffusionPipeline):
    """Generate shape scenes from captions such as "a small red circle in the top left".

    Images are ``transformer.config.sample_size`` px square unless ``height``/``width`` say otherwise: 64x64 for the
    shipped ``mini-mmdit``, 128x128 for a model fine-tuned with ``--size 128``.

    Example:
        >>> from ditfa_optimum.mini import mini_pipeline
        >>> pipe = mini_pipeline()                                     # the trained model shipped in the package
        >>> image = pipe("a large blue square in the center", num_inference_steps=20).images[0]  # doctest: +SKIP
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    #: the transformer denoises pixels (no VAE): ``output_type="pil"`` gives images (read by the CLI's `generate`)
    pixel_space = True
    #: images = latents * latent_pixel_scale + 0.5 (pixel space, no VAE): lets the search predict image PSNR
    latent_pixel_scale = 0.5

    def __init__(self, transformer: SD3Transformer2DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 text_encoder: MiniTextEncoder):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder)
        self._guidance_scale = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call batches CFG as [uncond, cond] (read by ditfa_optimum's runtime)."""
        return self._guidance_scale > 1.0

    @staticmethod
    def default_prompts(n: int, seed: int = 0) -> list[str]:
        """``n`` captions of the training grammar (the calibration prompts `DiTFastAttnOptimizer` uses by default)."""
        from .grammar import evaluation_captions

        return evaluation_captions(n, seed)

    def encode_prompt(self, prompt: list[str], negative_prompt: list[str] | None = None):
        """(prompt_embeds, pooled, negative_embeds, negative_pooled) for the captions; the negative defaults to ""."""
        negative_prompt = negative_prompt if negative_prompt is not None else [""] * len(prompt)
        if len(negative_prompt) != len(prompt):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompt)} prompts")
        embeds, pooled = self.text_encoder.encode(list(prompt) + list(negative_prompt))
        n = len(prompt)
        return embeds[:n], pooled[:n], embeds[n:], pooled[n:]

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",)):
        """Generate images.

        Args:
            prompt: caption(s) in the shapes grammar (see `ditfa_optimum.mini.grammar`); or pass ``prompt_embeds``.
            height, width: pixels, multiples of the patch size (2); default the transformer's ``sample_size``
                (what it was trained at: 64 for the shipped model).
            num_inference_steps: Euler steps of the rectified flow.
            guidance_scale: CFG scale (``<= 1`` turns CFG off).
            generator: one generator, or one per image, for the initial noise.
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (the raw [-1, 1] pixels).
            callback_on_step_end: as in diffusers' pipelines: called after every step as
                ``callback(pipe, step, timestep, {name: tensor})`` with the tensors named in
                ``callback_on_step_end_tensor_inputs`` (only ``"latents"``); a returned ``"latents"`` replaces them.

        Returns:
            `ImagePipelineOutput` (``.images``), or a tuple when ``return_dict=False``.
        """
        patch = self.transformer.config.patch_size
        height = self.transformer.config.sample_size if height is None else height
        width = self.transformer.config.sample_size if width is None else width
        if height % patch or width % patch or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {patch}, got {height}x{width}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        self._guidance_scale = guidance_scale
        device = self._execution_device
        dtype = self.transformer.dtype

        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt (a caption or a list of captions) or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negatives = None
            if negative_prompt is not None:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds = \
                self.encode_prompt(prompts, negatives)
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")
        if self.do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt_embeds, negative_pooled_prompt_embeds = self.text_encoder.encode(
                [""] * prompt_embeds.shape[0])

        def repeat(x):
            return None if x is None else x.to(device, dtype).repeat_interleave(num_images_per_prompt, dim=0)

        embeds, pooled = repeat(prompt_embeds), repeat(pooled_prompt_embeds)
        if self.do_classifier_free_guidance:
            embeds = torch.cat([repeat(negative_prompt_embeds), embeds])
            pooled = torch.cat([repeat(negative_pooled_prompt_embeds), pooled])
        batch = prompt_embeds.shape[0] * num_images_per_prompt

        shape = (batch, self.transformer.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32)

        unknown = set(callback_on_step_end_tensor_inputs) - {"latents"}
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs can only name 'latents', got {sorted(unknown)}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            velocity = self.transformer(hidden_states=model_in.to(dtype), timestep=t.expand(model_in.shape[0]),
                                        encoder_hidden_states=embeds, pooled_projections=pooled,
                                        return_dict=False)[0].float()
            if self.do_classifier_free_guidance:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = returned.get("latents", latents)
        self.maybe_free_model_hooks()

        images = latents if output_type == "latent" else (latents / 2 + 0.5).clamp(0, 1)
        if output_type in ("np", "pil"):
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
