"""FLUX.1 (`FluxTransformer2DModel`): text tokens first, image second, rotary embeddings.

Double-stream blocks (``transformer_blocks.i.attn``) project image and text separately and concatenate text first;
single-stream blocks (``single_transformer_blocks.i.attn``) receive the concatenated sequence, so their text length is
the one the transformer call reported (its ``encoder_hidden_states``), never a constant.

Blocks (`blocks`): ``transformer_blocks.i`` (`FluxTransformerBlock`, MLPs ``ff`` and ``ff_context``) and
``single_transformer_blocks.i`` (`FluxSingleTransformerBlock`). In diffusers 0.42 both are called as ``block(
hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)`` and return
``(encoder_hidden_states, hidden_states)``: the single-stream block concatenates and splits the streams itself. Its MLP
(``proj_mlp`` -> GELU) is fused with the attention output into ``proj_out``, so it has no separately callable MLP and
no `mlp_cache`; its FLOPs split ``proj_out``'s input columns into the attention and MLP parts.
"""

from __future__ import annotations

import torch

from ..plan import BlockSpec, ModuleSpec
from ..runtime.processor import PlannedProcessor
from .base import Adapter, double_stream_block_spec, linear_flops, register_adapter


class FluxPlannedAttnProcessor(PlannedProcessor):
    """diffusers' `FluxAttnProcessor`, its attention computed by the plan. In a single-stream block the sequence
    arrives concatenated (text first); its text length is the one the transformer call reported."""

    def __init__(self, module_runtime=None, spec=None):
        super().__init__(module_runtime, spec)
        from diffusers.models.embeddings import apply_rotary_emb  # public; late: diffusers is slow to import

        self._rotary = apply_rotary_emb

    @staticmethod
    def _projections(attn, x: torch.Tensor, fused: str, names: tuple[str, str, str]):
        if attn.fused_projections and hasattr(attn, fused):
            return getattr(attn, fused)(x).chunk(3, dim=-1)
        return tuple(getattr(attn, n)(x) for n in names)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("ditfa_optimum's FLUX runtime does not take an attention_mask (text padding masks); "
                             "run without one or remove the plan")
        q, k, v = self._projections(attn, hidden_states, "to_qkv", ("to_q", "to_k", "to_v"))
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            eq, ek, ev = self._projections(attn, encoder_hidden_states, "to_added_qkv",
                                           ("add_q_proj", "add_k_proj", "add_v_proj"))
            eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = self._rotary(q, image_rotary_emb, sequence_dim=1)
            k = self._rotary(k, image_rotary_emb, sequence_dim=1)

        # [B, S, H, D] -> [B, H, S, D] (views) for the runtime, and back
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), encoder_hidden_states)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)

        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            text_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(text_out.contiguous())
        return out


@register_adapter
class FluxAdapter(Adapter):
    model_class = "FluxTransformer2DModel"
    stock_processors = ("FluxAttnProcessor", "FluxAttnProcessor2_0", "FluxPlannedAttnProcessor")

    def attention_modules(self, transformer):
        found = []
        for prefix in ("transformer_blocks", "single_transformer_blocks"):
            for i, block in enumerate(getattr(transformer, prefix)):
                spec = ModuleSpec(f"{prefix}.{i}.attn", num_heads=block.attn.heads, head_dim=block.attn.head_dim,
                                  image_first=False, joint=True)
                found.append((spec, block.attn))
        return found

    def blocks(self, transformer):
        found = [(double_stream_block_spec(f"transformer_blocks.{i}", block), block)
                 for i, block in enumerate(transformer.transformer_blocks)]
        for i, block in enumerate(transformer.single_transformer_blocks):
            found.append((self._single_block_spec(f"single_transformer_blocks.{i}", block), block))
        return found

    @staticmethod
    def _single_block_spec(name: str, block: torch.nn.Module) -> BlockSpec:
        # every token (text and image) goes through the same weights; proj_out maps [attn | mlp] -> dim
        out = block.proj_out
        attn_columns = out.in_features - block.mlp_hidden_dim
        attn = sum(linear_flops(getattr(block.attn, n)) for n in ("to_q", "to_k", "to_v")) + 2 * attn_columns * \
            out.out_features
        mlp = linear_flops(block.proj_mlp) + 2 * block.mlp_hidden_dim * out.out_features
        return BlockSpec(name, (f"{name}.attn",), (), attn_proj_image=attn, attn_proj_text=attn, mlp_image=mlp,
                         mlp_text=mlp, modulation=linear_flops(block.norm))

    def image_tokens(self, transformer, height, width, vae_scale_factor=8):
        # FLUX packs 2x2 latent patches into one token
        return (height // vae_scale_factor // 2) * (width // vae_scale_factor // 2)

    def spatial_latents(self, latents, height, width, vae_scale_factor):
        # FLUX packs 2x2 latent patches into tokens: [B, (h/2)(w/2), 4C] -> [B, C, h, w]
        if latents.dim() != 3:
            return latents
        B, _, packed = latents.shape
        h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
        latents = latents.view(B, h // 2, w // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(B, packed // 4, h, w)

    def batched_cfg(self, pipeline) -> bool | None:
        # FLUX.1 is guidance-distilled; its true-CFG mode runs the negative prompt as a separate call
        return False

    def processor_check_inputs(self, spec, module, image_tokens, text_tokens, generator):
        args, kwargs = super().processor_check_inputs(spec, module, image_tokens, text_tokens, generator)
        param = next(module.parameters())
        n = image_tokens + text_tokens
        cos, sin = (torch.randn(n, module.head_dim, generator=generator).to(param.device, param.dtype)
                    for _ in range(2))
        return args, {**kwargs, "image_rotary_emb": (cos, sin)}

    def make_processor(self, spec, module_runtime):
        return FluxPlannedAttnProcessor(module_runtime, spec)
