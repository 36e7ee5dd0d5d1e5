"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): joint attention, image tokens first, text second.

Each `JointTransformerBlock` has ``attn`` (joint image+text attention); SD3.5 layers listed in
``dual_attention_layers`` also have ``attn2``, a second attention over the image tokens only. qk-norm (SD3.5) is applied
as the stock processor does. The last block is ``context_pre_only``: its text outputs are discarded, but its text
queries are still part of the joint attention, so they are planned like any other.

Blocks (`blocks`): ``transformer_blocks.i``, each a `JointTransformerBlock` called as ``block(hidden_states,
encoder_hidden_states, temb, joint_attention_kwargs)`` and returning ``(encoder_hidden_states, hidden_states)``; its
MLPs are ``ff`` (image) and ``ff_context`` (text). The last block has no ``ff_context`` and returns None for the text
stream, which block methods treat as absent.
"""

from __future__ import annotations

import torch

from ..plan import ModuleSpec
from ..runtime.processor import PlannedProcessor
from .base import Adapter, double_stream_block_spec, register_adapter


class SD3PlannedAttnProcessor(PlannedProcessor):
    """diffusers' `JointAttnProcessor2_0` / `FusedJointAttnProcessor2_0`, its attention computed by the plan."""

    @staticmethod
    def _heads(attn, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    def _qkv(self, attn, x, fused_name, names, norms):
        if attn.fused_projections:
            q, k, v = getattr(attn, fused_name)(x).chunk(3, dim=-1)
        else:
            q, k, v = (getattr(attn, n)(x) for n in names)
        q, k, v = self._heads(attn, q), self._heads(attn, k), self._heads(attn, v)
        norm_q, norm_k = (getattr(attn, n, None) for n in norms)
        if norm_q is not None:
            q = norm_q(q)
        if norm_k is not None:
            k = norm_k(k)
        return q, k, v

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        # like the stock processor, attention_mask is not used by SD3's joint attention
        batch, n_img = hidden_states.shape[:2]
        q, k, v = self._qkv(attn, hidden_states, "to_qkv", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        if encoder_hidden_states is not None:
            eq, ek, ev = self._qkv(attn, encoder_hidden_states, "to_added_qkv",
                                   ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"))
            q, k, v = torch.cat([q, eq], dim=2), torch.cat([k, ek], dim=2), torch.cat([v, ev], dim=2)

        out = self.attend(q, k, v, encoder_hidden_states)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(q.dtype)

        if encoder_hidden_states is not None:
            out, text_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text_out) if encoder_hidden_states is not None else out


@register_adapter
class SD3Adapter(Adapter):
    model_class = "SD3Transformer2DModel"
    stock_processors = ("JointAttnProcessor2_0", "FusedJointAttnProcessor2_0", "SD3PlannedAttnProcessor")

    def attention_modules(self, transformer):
        found = []
        for i, block in enumerate(transformer.transformer_blocks):
            for attr, joint in (("attn", True), ("attn2", False)):
                attn = getattr(block, attr, None)
                if attn is None:
                    continue
                heads = attn.heads
                spec = ModuleSpec(f"transformer_blocks.{i}.{attr}", num_heads=heads,
                                  head_dim=attn.inner_dim // heads, image_first=True, joint=joint)
                found.append((spec, attn))
        return found

    def blocks(self, transformer):
        return [(double_stream_block_spec(f"transformer_blocks.{i}", block), block)
                for i, block in enumerate(transformer.transformer_blocks)]

    def image_tokens(self, transformer, height, width, vae_scale_factor=8):
        patch = transformer.config.patch_size
        return (height // vae_scale_factor // patch) * (width // vae_scale_factor // patch)

    def make_processor(self, spec, module_runtime):
        return SD3PlannedAttnProcessor(module_runtime, spec)
