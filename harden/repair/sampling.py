"""Sampling latents from text embeddings (not only from prompt strings), and decoding them to images.

Why embeddings: repair generates from attack embeddings (the early-stop probe) and keeps the generated *latents*
as training targets (surrogates, distillation data), so it calls the pipeline with `prompt_embeds` and
`output_type="latent"`. Seeding follows harden.generation: one CPU generator per image, seeded with its seed, so a
(embedding, seed) pair gives the same sample whichever others share its call.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..generation import images_per_call, swapped_unet
from ..nemo.stats import encode_prompts


@torch.no_grad()
def sample_latents(pipe, unet, embeds: torch.Tensor, seeds: Sequence[int], steps: int, guidance: float,
                   per_call: int | None = None, advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """Final latents [N, S, C, h, w] of `unet` for each embedding [N, L, D] x seed (the usual empty-prompt
    unconditional branch, `guidance` scale, `steps` scheduler steps)."""
    pairs = [(i, int(s)) for i in range(len(embeds)) for s in seeds]
    per_call = per_call or images_per_call(pipe, None, None)
    device = pipe.device
    dtype = next(unet.parameters()).dtype  # repair trains an fp32 copy inside a half-precision pipeline
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""]).to(device, dtype)
    out = []
    with swapped_unet(pipe, unet):
        for start in range(0, len(pairs), per_call):
            chunk = pairs[start:start + per_call]
            cond = embeds[[i for i, _ in chunk]].to(device, dtype)
            result = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond.expand(len(chunk), -1, -1),
                          generator=[torch.Generator().manual_seed(s) for _, s in chunk], num_inference_steps=steps,
                          guidance_scale=guidance, output_type="latent")
            out.append(result.images.float().cpu())
            if advance is not None:
                advance(len(chunk))
    latents = torch.cat(out)
    return latents.view(len(embeds), len(seeds), *latents.shape[1:])


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, per_call: int = 64) -> list[np.ndarray]:
    """uint8 HxWx3 images of latents [N, C, h, w], decoded as the pipeline decodes them."""
    vae = pipe.vae
    param = next(vae.parameters())
    images: list[np.ndarray] = []
    for start in range(0, len(latents), per_call):
        z = latents[start:start + per_call].to(param.device, param.dtype) / vae.config.scaling_factor
        decoded = vae.decode(z).sample
        arrays = pipe.image_processor.postprocess(decoded, output_type="np")
        images += [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in arrays]
    return images
