"""Models harden cannot harden are refused before any work, from their configs alone, with one line that says why
(exit 2): SD3/Flux-style joint-attention transformers, pixel-space UNets without text, DeepFloyd-IF-style added
key/value attention, SDXL refiners, UNets without cross-attention blocks, and fused QKV projections.

The folders hold only JSON configs: had harden tried to load weights, diffusers would have failed differently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from planted_model import write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.errors import TargetError
from harden.targets import resolve_targets

runner = CliRunner()
CLIP = ["transformers", "CLIPTextModel"]
TOKENIZER = ["transformers", "CLIPTokenizer"]
VAE = ["diffusers", "AutoencoderKL"]
SD_UNET = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768,
           "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D",
                                                                                        "CrossAttnUpBlock2D"]}

CASES = {
    "sd3": ({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": CLIP, "vae": VAE}, None, "transformer (SD3Transformer2DModel), not a UNet"),
    "flux": ({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
              "text_encoder": CLIP, "text_encoder_2": ["transformers", "T5EncoderModel"], "vae": VAE}, None,
             "transformer (FluxTransformer2DModel), not a UNet"),
    "ddpm": ({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
              "scheduler": ["diffusers", "DDPMScheduler"]}, {"_class_name": "UNet2DModel"}, "has no text encoder"),
    "pixel_unet_with_text_model": ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DModel"],
                                    "text_encoder": CLIP, "tokenizer": TOKENIZER}, {"_class_name": "UNet2DModel"},
                                   "takes no text"),
    "deepfloyd_if": ({"_class_name": "IFPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                      "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"]},
                     {**SD_UNET, "down_block_types": ["SimpleCrossAttnDownBlock2D"], "encoder_hid_dim": 4096,
                      "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "added key-value"),
    "sdxl_refiner": ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
                      "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": [None, None],
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "vae": VAE},
                     {**SD_UNET, "addition_embed_type": "text_time"}, "refiner"),
    "no_cross_attention": ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                            "text_encoder": CLIP, "tokenizer": TOKENIZER, "vae": VAE},
                           {**SD_UNET, "down_block_types": ["DownBlock2D"], "mid_block_type": "UNetMidBlock2D",
                            "up_block_types": ["UpBlock2D"]}, "no cross-attention blocks"),
}


def _config_only_folder(root: Path, index: dict, unet: dict | None) -> Path:
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.42.1", **index}))
    if unet is not None:
        (root / "unet").mkdir()
        (root / "unet" / "config.json").write_text(json.dumps(unet))
    return root


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_from_its_configs_with_one_line(tmp_path, case):
    index, unet, needle = CASES[case]
    model = _config_only_folder(tmp_path / "model", index, unet)
    recipe = write_recipe(tmp_path, model={"id": str(model), "device": "cpu"})
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_fused_qkv_projections_are_refused():
    from harden.tiny import tiny_unet

    unet = tiny_unet(sample_size=16)
    unet.fuse_qkv_projections()
    with pytest.raises(TargetError, match="fused key/value projections") as err:
        resolve_targets(unet)
    assert err.value.exit_code == 2 and "\n" not in err.value.one_line()
    unet.unfuse_qkv_projections()  # diffusers keeps to_kv (a copy of the value rows) after unfusing: still refused
    kept = unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn2").to_kv.weight
    assert torch.equal(kept[-resolve_width(unet):], unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v
                       .weight)
    with pytest.raises(TargetError, match="fused key/value projections") as err:
        resolve_targets(unet)
    assert "load the UNet again" in err.value.one_line()
    assert len(resolve_targets(tiny_unet(sample_size=16))) == 7  # what the message asks for works


def resolve_width(unet) -> int:
    return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_v.out_features
