"""How a pipeline's prompts reach its UNet: the cross-attention context, and for SDXL-style UNets the added
conditions (the pooled text embedding of the second text encoder and the size/crop time ids).

Why one tensor: a prompt's embedding passes through many hands during a search (the scorer, the forward pool,
batching) that index, repeat and concatenate it per sample. For an SDXL-style UNet the pooled embedding and the time
ids travel as extra feature columns after the context, repeated on every token row, so every slice of the tensor
keeps its own sample's added conditions. `unet_inputs` unpacks them right before a UNet call; statistics read only
the first `cross_attention_dim` columns, which is what every `to_v` sees (for SDXL the concatenation of both text
encoders' penultimate hidden states, exactly as the pipeline builds it).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import BadInputError
from .stats import encode_prompts

TIME_IDS = 6  # SDXL base: original (h, w), crop top-left (y, x), target (h, w)


def needs_added_conditions(unet) -> bool:
    """Whether the UNet takes SDXL's `added_cond_kwargs` (text_embeds, time_ids)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def context_dim(unet) -> int:
    dim = unet.config.cross_attention_dim
    if not isinstance(dim, int):
        raise BadInputError(f"the UNet has per-block cross_attention_dim {dim}; harden supports one context width",
                            "use a UNet whose cross-attention layers all read the same text features")
    return dim


def pooled_dim(unet) -> int:
    """Width of the pooled text embedding an SDXL-style UNet expects (its add-embedding input minus the time ids)."""
    cfg = unet.config
    return cfg.projection_class_embeddings_input_dim - TIME_IDS * cfg.addition_time_embed_dim


def pack(context: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """[B, tokens, dim + pooled + 6]: the context with each prompt's pooled embedding and time ids on every row."""
    extra = torch.cat([pooled, time_ids.to(pooled.dtype).expand(len(pooled), -1)], dim=-1)
    return torch.cat([context, extra[:, None, :].expand(-1, context.shape[1], -1)], dim=-1).contiguous()


def unet_inputs(unet, embeds: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states, added_cond_kwargs or None) for `unet` from (packed) embeddings [B, tokens, width]."""
    dim = context_dim(unet)
    if not needs_added_conditions(unet):
        if embeds.shape[-1] != dim:
            raise ValueError(f"embeddings of width {embeds.shape[-1]} for a UNet whose context is {dim} wide")
        return embeds, None
    pooled = pooled_dim(unet)
    if embeds.shape[-1] != dim + pooled + TIME_IDS:
        raise ValueError(f"embeddings of width {embeds.shape[-1]} are not packed for this SDXL-style UNet "
                         f"(context {dim} + pooled {pooled} + {TIME_IDS} time ids); use conditioning.encode")
    extra = embeds[:, 0, dim:]
    return embeds[..., :dim], {"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled:]}


def call_unet(unet, sample: torch.Tensor, timestep, embeds: torch.Tensor) -> torch.Tensor:
    """The UNet's raw output for (packed) embeddings: one place unpacks the added conditions."""
    context, added = unet_inputs(unet, embeds)
    return unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]


def default_time_ids(pipe) -> torch.Tensor:
    """[1, 6] time ids of the pipeline's default generation: original = target = its default image size, no crop
    (what `StableDiffusionXLPipeline.__call__` uses when no size is given)."""
    side = pipe.unet.config.sample_size
    height, width = (side, side) if isinstance(side, int) else tuple(side)
    scale = pipe.vae_scale_factor
    size = (height * scale, width * scale)
    return torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32)


def check_supported(pipe) -> None:
    """Refuse SDXL refiner-style pipelines (aesthetic-score conditioning, no first text encoder)."""
    if getattr(pipe.config, "requires_aesthetics_score", False) or (
            needs_added_conditions(pipe.unet) and getattr(pipe, "text_encoder", None) is None):
        raise BadInputError(
            "this is an SDXL refiner-style pipeline (aesthetic-score conditioning, second text encoder only): it "
            "denoises the last steps of an image it is given, so NeMo's first-step score from pure noise does not "
            "describe it", "harden the SDXL base model; a refiner is not supported")


@torch.no_grad()
def encode(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """float32 embeddings of `prompts` as the pipeline conditions its UNet when generating without guidance.

    SD v1/v2: the text encoder's last hidden state (SD 2.x checkpoints ship a text encoder whose last layer is
    OpenCLIP's penultimate one). SDXL: the pipeline's own `encode_prompt` (both encoders' penultimate hidden states
    concatenated, the second encoder's pooled projection), packed with the default time ids (see `pack`).
    """
    if not needs_added_conditions(pipe.unet):
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    check_supported(pipe)
    device = next(pipe.text_encoder_2.parameters()).device
    context, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    return pack(context.float(), pooled.float(), default_time_ids(pipe).to(device))


def iter_encoded(pipe, prompts: Sequence[str], batch_size: int = 256):
    """`encode` in batches, so that 50,000 prompts never sit in memory at once."""
    for start in range(0, len(prompts), batch_size):
        yield encode(pipe, prompts[start:start + batch_size])


def blank(unet, batch: int, tokens: int = 77) -> torch.Tensor:
    """Zero embeddings in the layout `unet` takes (memory probes)."""
    width = context_dim(unet) + (pooled_dim(unet) + TIME_IDS if needs_added_conditions(unet) else 0)
    return torch.zeros(batch, tokens, width)
