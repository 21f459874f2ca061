"""The model organism's architecture: SD v1's block topology at tiny width, with a non-downsampling VAE.

Why these sizes: training has to fit in about an hour on 2 shared CPU cores. The VAE keeps the 16x16 resolution
(one block, 4 latent channels), so latents are 16x16: large enough for 3-scale MS-SSIM with a 3-pixel kernel.

"""

from __future__ import annotations

import torch

from ..tiny import PROMPT_LENGTH, byte_tokenizer
from .data import RESOLUTION

TEXT_WIDTH = 64
UNET_WIDTHS = (16, 32, 64, 64)
UNET_HEADS = (1, 1, 2, 2)  # heads per block: 16-32-wide heads (CPU attention is slow for narrower ones)
VAE_WIDTH = 32


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=PROMPT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def build_unet():
    """CrossAttnDownBlock2D x3 + DownBlock2D, cross-attention mid block, mirrored up blocks: 16 attn2 layers."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=UNET_WIDTHS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=UNET_HEADS, norm_num_groups=8,
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(VAE_WIDTH,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
        sample_size=RESOLUTION, mid_block_add_attention=False,
    )


def build_schedulers():
    """(DDPM for training, DDIM for sampling) with SD v1's noise schedule and 'leading' timestep spacing."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, steps_offset=1, prediction_type="epsilon")
    return DDPMScheduler(**common), DDIMScheduler(**common, set_alpha_to_one=False)


def build_components(seed: int):
    """All five components with weights drawn deterministically from `seed`."""
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    return tokenizer, build_text_encoder(tokenizer), build_unet(), build_vae()
