"""A small random SD-v1-topology UNet whose cross-attention matters beyond float noise, for exact-mode tests."""

from __future__ import annotations

import torch

from harden.bench import amplify_cross_attention, kernel_for
from harden.nemo.score import ScoreSettings
from harden.nemo.stats import compute_stats
from harden.targets import resolve_targets
from harden.tiny import tiny_unet


def micro_model():
    """(unet, targets, stats, settings, generator): 24x24 latents (the smallest 3-scale MS-SSIM with sigma 1.5
    takes), statistics from 32 random embeddings, 4 seeds all kept; the generator then draws prompt embeddings."""
    unet = tiny_unet(cross_attention_dim=32, widths=(8, 8, 16, 16), heads=2, sample_size=24, seed=1,
                     layers_per_block=1)
    targets = resolve_targets(unet)
    amplify_cross_attention(targets)
    g = torch.Generator().manual_seed(0)
    stats = compute_stats(iter(torch.randn(32, 77, 32, generator=g).split(8)), targets)
    settings = ScoreSettings(n_seeds=4, kernel_size=kernel_for(24), seed_threshold=-1.0)
    return unet, targets, stats, settings, g
