"""Generating images with a pipeline, for verification and the audit: one place decides call sizes and seeding.

Why per-image CPU generators: an image must not depend on which other images share its pipeline call, so the
same (prompt, seed) gives the same picture in verify, in the audit and in a user's own script.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch

from .nemo.batching import CPU_LATENT_PIXELS
from .targets import latent_size


@contextlib.contextmanager
def swapped_unet(pipe, unet):
    """Generate with `unet` in place of the pipeline's, restoring it even on errors."""
    base = pipe.unet
    pipe.unet = unet
    try:
        yield pipe
    finally:
        pipe.unet = base


def images_per_call(pipe, height: int | None, width: int | None) -> int:
    """Images per pipeline call: bigger calls cost less per image (the memorizer on 2 CPU cores: half at 40 images
    as at 4). CPU: UNet batches as big as localization's forwards (with guidance a batch holds 2 samples per image);
    CUDA 4x that."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = latent_size(pipe.unet)
    latent = ((height // scale) if height else side[0]) * ((width // scale) if width else side[1])
    per_call = max(1, CPU_LATENT_PIXELS // (2 * latent))
    return per_call * 4 if pipe.device.type == "cuda" else per_call


@torch.no_grad()
def generate(pipe, prompts: Sequence[str] | torch.Tensor, seeds: Sequence[int], steps: int, guidance: float,
             height: int | None = None, width: int | None = None, batch_images: int | None = None,
             advance=None) -> list[list[np.ndarray]]:
    """HxWx3 uint8 images [prompt][seed] for every prompt x seed, in shared pipeline calls of `batch_images`.

    `prompts` are texts, or text-encoder outputs [N, L, D] (the audit's attack embeddings; the unconditional
    branch is the empty prompt's, as for texts). Each image has its own CPU generator seeded with its seed, so an
    image does not depend on which others share its call (up to the last bits of batched float math).
    `advance(n)` reports n more prompts done.
    """
    pairs = [(p, s) for p in range(len(prompts)) for s in seeds]
    per_call = batch_images or images_per_call(pipe, height, width)
    flat: list[np.ndarray] = []
    for start in range(0, len(pairs), per_call):
        chunk = pairs[start:start + per_call]
        rows = [p for p, _ in chunk]
        given = ({"prompt_embeds": prompts[rows]} if isinstance(prompts, torch.Tensor)
                 else {"prompt": [prompts[p] for p in rows]})
        out = pipe(**given, generator=[torch.Generator().manual_seed(int(s)) for _, s in chunk],
                   num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, output_type="np")
        flat += [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in out.images]
        if advance is not None:
            advance(len(flat) // len(seeds) - (len(flat) - len(chunk)) // len(seeds))
    return [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]
