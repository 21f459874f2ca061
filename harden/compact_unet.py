"""A Stable Diffusion UNet whose cross-attention value projections have had channels physically removed.

Self-contained on purpose (imports only torch and diffusers): an exported checkpoint carries a copy of this file as
`unet/compact_unet.py`, so `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` can load it without
harden installed. Written by harden (https://pypi.org/project/harden); the config key `kept_value_channels` lists,
per attention module, the value channels of the base model that were kept.

Why a processor: with uneven per-head widths, stock processors cannot reshape the values into heads. This one pads
each head's kept channels to the widest head, runs one scaled-dot-product attention, and gathers the real channels
back; padded channels are zeros, so the result equals the base model with the removed channels zeroed.
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401 - ModelMixin: diffusers' class check (below)

# Exports name this module "compact_unet" in model_index.json. With harden installed, registering it under that
# name lets `DiffusionPipeline.from_pretrained(repo, unet=CompactUNet2DConditionModel.from_pretrained(...))` load
# without remote code: diffusers resolves the library "compact_unet" from sys.modules and checks against ModelMixin.
sys.modules.setdefault("compact_unet", sys.modules[__name__])


class CompactValueAttnProcessor:
    """Attention with the full query/key heads and a narrowed, per-head uneven value projection."""

    def __init__(self, kept: list[int], heads: int, head_dim: int):
        kept = sorted(int(c) for c in kept)
        widths = [sum(1 for c in kept if c // head_dim == h) for h in range(heads)]
        self.heads, self.max_width = heads, max(widths)
        offsets = [sum(widths[:h]) for h in range(heads)]
        # position of each kept channel in the padded [heads * max_width] layout, in kept order
        self.gather = torch.tensor([h * self.max_width + (i - offsets[h])
                                    for h in range(heads) for i in range(offsets[h], offsets[h] + widths[h])],
                                   dtype=torch.long)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                     else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.max_width == 0:  # every value channel removed: attention contributes only to_out's bias
            out = value.new_zeros(batch, query.shape[2], 0)
        else:
            gather = self.gather.to(value.device)
            padded = value.new_zeros(batch, value.shape[1], self.heads * self.max_width)
            padded[..., gather] = value
            padded = padded.view(batch, -1, self.heads, self.max_width).transpose(1, 2)
            out = F.scaled_dot_product_attention(query, key, padded, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, self.heads * self.max_width)[..., gather]
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


_SIGNATURE = inspect.signature(UNet2DConditionModel.__init__)
_SIGNATURE = _SIGNATURE.replace(parameters=[
    *_SIGNATURE.parameters.values(),
    inspect.Parameter("kept_value_channels", inspect.Parameter.KEYWORD_ONLY, default=None),
])


class CompactUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` whose listed attention modules keep only `kept_value_channels[name]` value channels.

    The narrowed `to_v` / `to_out[0]` are built in `__init__`, so `from_pretrained` creates the right shapes before it
    loads the weights (stock loading would refuse the shapes, or, with ignore_mismatched_sizes, re-randomize them).
    """

    def __init__(self, *args, kept_value_channels: dict[str, list[int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        kept_value_channels = {k: [int(c) for c in v] for k, v in (kept_value_channels or {}).items()}
        self.register_to_config(kept_value_channels=kept_value_channels)
        for name, kept in kept_value_channels.items():
            attn = self.get_submodule(name)
            head_dim = attn.to_k.out_features // attn.heads
            old_v, old_out = attn.to_v, attn.to_out[0]
            attn.to_v = torch.nn.Linear(old_v.in_features, len(kept), bias=old_v.bias is not None)
            attn.to_out[0] = torch.nn.Linear(len(kept), old_out.out_features, bias=old_out.bias is not None)
            attn.set_processor(CompactValueAttnProcessor(kept, attn.heads, head_dim))

    __init__.__signature__ = _SIGNATURE

    def _restore_compact_processors(self):
        for name, kept in (self.config.kept_value_channels or {}).items():
            attn = self.get_submodule(name)
            attn.set_processor(CompactValueAttnProcessor(kept, attn.heads, attn.to_k.out_features // attn.heads))

    def set_attn_processor(self, processor):
        """Other processors (xformers, defaults...) apply to every layer except the pruned ones, which keep theirs."""
        super().set_attn_processor(processor)
        self._restore_compact_processors()

    def fuse_qkv_projections(self):
        raise NotImplementedError("pruned value projections cannot be fused with their keys")
