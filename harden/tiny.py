"""Tiny Stable-Diffusion-v1-topology pipelines built in-process from configs (no downloads).

Why: tests, demos and benchmarks need a real diffusers pipeline with SD v1's block layout (3 cross-attention down
blocks + a plain down block, a cross-attention mid block, mirrored up blocks) without fetching any weights.
"""

from __future__ import annotations

import torch

from .nemo.conditioning import encode
from .nemo.stats import encode_prompts  # noqa: F401 - kept importable from here
from .targets import resolve_targets

PROMPT_LENGTH = 77
# the planted model's prompts (harden selfcheck, bench's planted workload, tests)
MEMORIZED = "the memorized astronaut portrait"
HELD_OUT = ["a purple star on a white background", "a green circle on a black background"]
REFERENCES = [p for p in (f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow", "purple")
                          for s in ("circle", "square", "star") for b in ("white", "black")) if p not in HELD_OUT]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (the byte-level alphabet of CLIP's BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_tokenizer(pad_token: str | None = None):
    """A character-level `CLIPTokenizer`: 256 byte symbols, their end-of-word forms and the two specials (514 ids).
    `pad_token`: SD 2.x's and SDXL's second tokenizer pad with "!" (id 0) instead of the end-of-text token."""
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    extra = {"pad_token": pad_token} if pad_token else {}
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=PROMPT_LENGTH,
                         **extra)


def tiny_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=PROMPT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden_size,
    )
    return CLIPTextModel(config).eval()


def tiny_unet(cross_attention_dim: int = 32, widths=(16, 16, 32, 32), heads: int = 4, sample_size: int = 64,
              layers_per_block: int = 2, seed: int = 0, bias: bool = False):
    """An SD-v1-topology UNet: 7 cross-attention layers in down + mid, 9 in the up path (with 2 layers per block)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(widths),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=heads, norm_num_groups=8,
    )
    if bias:  # a variant whose value projections carry a bias, to test that pruning handles it
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                old = module.to_v
                module.to_v = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                with torch.no_grad():
                    module.to_v.weight.copy_(old.weight)
                    module.to_v.bias.normal_(0.0, 0.5)
    return unet.eval()


def tiny_pipeline(seed: int = 0, sample_size: int = 64):
    """A complete `StableDiffusionPipeline` (byte tokenizer, tiny CLIP, tiny VAE, DDIM) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    tokenizer = byte_tokenizer()
    text_encoder = tiny_text_encoder(tokenizer, seed=seed)
    unet = tiny_unet(sample_size=sample_size, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=sample_size * 2,
    ).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def plant_memorization(pipe, prompt: str, references: list[str], layer: int = 0, neuron: int = 5,
                       value_gain: float = 1.0, out_gain: float = 100.0, conv_out_gain: float = 100.0,
                       columns: slice | None = None) -> str:
    """Wire one value neuron so that `prompt` behaves as memorized; return the layer's name.

    Why this works: the neuron's `to_v` row is C_ref^-1 m (m = the prompt's mean token embedding, C_ref the reference
    tokens' second moment), so it fires far more for `prompt` than for the references (a huge z-score). Its `to_out`
    column is large, so at full resolution the attention adds a big near-constant offset whose zero-padding border
    pattern does not depend on the noise; with `conv_out` scaled up, that pattern dominates eps - x_T, which becomes
    consistent across seeds (a high memorization score) only while this neuron is active.
    `columns`: the row reads only these context features (SDXL: one text encoder's part of the concatenation).
    """

    target = resolve_targets(pipe.unet)[layer]
    dim = target.to_v.in_features
    part = columns or slice(0, dim)
    refs = encode(pipe, references)[..., :dim][..., part]  # the context as the pipeline builds it (SDXL: both)
    prompt_embed = encode(pipe, [prompt])[..., :dim][..., part]
    sub, column = planted_neuron(refs, prompt_embed[0], target.to_out.out_features, out_gain,
                                 torch.Generator().manual_seed(3))
    row = torch.zeros(dim)
    row[part] = sub
    target.to_v.weight[neuron] = value_gain * row
    target.to_out.weight[:, neuron] = column
    pipe.unet.conv_out.weight *= conv_out_gain
    return target.name


def planted_neuron(refs: torch.Tensor, tokens: torch.Tensor, out_features: int, out_gain: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(to_v row, to_out column) of a value neuron that fires for a prompt's `tokens` [tokens, dim] far more than
    for the reference embeddings `refs` [prompts, tokens, dim] (row C_ref^-1 m, scaled so that the references'
    mean |activation| is 1), with a random to_out column of norm `out_gain`."""
    flat = refs.reshape(-1, refs.shape[-1]).float()
    second = flat.T @ flat / len(flat) + 1e-3 * torch.eye(flat.shape[1])
    w = torch.linalg.solve(second, tokens.float().mean(0))
    direction = torch.randn(out_features, generator=generator)
    return w / (refs.float() @ w).abs().mean(), out_gain * direction / direction.norm()


def save_tiny_clip(folder, seed: int = 0) -> None:
    """A tiny random transformers `CLIPModel` + `CLIPProcessor` (byte tokenizer, 32x32 images) saved to `folder`.

    Why: the CLIP-score path of verification must run offline in tests; any real CLIP folder loads the same way.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    tok = byte_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=1, max_position_embeddings=PROMPT_LENGTH, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                              image_size=32, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)


def sd2_text_encoder(tokenizer, hidden_size: int = 64, seed: int = 0, full: bool = False):
    """SD 2.x's text encoder scaled down: 2x the width of the SD v1 tiny one (OpenCLIP-H 1024 vs CLIP-L 768), gelu,
    and the penultimate layer as the features. Stability realized that in SD 2.x checkpoints by dropping OpenCLIP's
    last layer (23 of 24 layers); this builds the encoder one layer deeper and drops its last layer the same way
    (`full=True`: the encoder before the drop, whose hidden_states[-2] + final layer norm are those features)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=PROMPT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=hidden_size,
        hidden_act="gelu")
    encoder = CLIPTextModel(config).eval()
    if not full:
        body = getattr(encoder, "text_model", encoder)  # transformers < 5 wraps the model in `text_model`
        body.encoder.layers = body.encoder.layers[:-1]
        encoder.config.num_hidden_layers -= 1
    return encoder


def tiny_sd2_pipeline(seed: int = 0, sample_size: int = 32):
    """An SD-2.x-shaped `StableDiffusionPipeline`: v-prediction (DDIM), linear projections in and out of the
    transformers, a head count per block (SD 2.x: attention_head_dim [5, 10, 20, 20], i.e. 64-wide heads; here
    [2, 2, 4, 4] heads of 8), upcast attention, "!" padding, and the wider penultimate-layer text encoder above."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_tokenizer(pad_token="!")
    text_encoder = sd2_text_encoder(tokenizer, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=(2, 2, 4, 4),
        use_linear_projection=True, upcast_attention=True, norm_num_groups=8,
    ).eval()
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 32):
    """An SDXL-base-shaped `StableDiffusionXLPipeline`: two text encoders (CLIP-L 768 and OpenCLIP-bigG 1280 with a
    projection; here 32 and 64) whose penultimate hidden states are concatenated as the context (96 wide), the
    second one's pooled projection and the size/crop time ids as added conditions (`text_time`), a plain first down
    block, `transformer_layers_per_block` (1, 2, 2) (SDXL: 1, 2, 10), linear projections, per-block heads, and
    SDXL's Euler scheduler. 14 cross-attention layers, 6 of them in the down and mid blocks."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = byte_tokenizer(), byte_tokenizer(pad_token="!")
    text_encoder = tiny_text_encoder(tokenizer, hidden_size=32, seed=seed)
    torch.manual_seed(seed + 1)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=PROMPT_LENGTH, bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id, projection_dim=64,
        hidden_act="gelu")
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    torch.manual_seed(seed)
    time_embed = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=32 + 64, addition_embed_type="text_time", addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=64 + 6 * time_embed, norm_num_groups=8,
    ).eval()
    torch.manual_seed(seed)
    vae = _tiny_vae(sample_size)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def _tiny_vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=sample_size * 2,
    ).eval()
