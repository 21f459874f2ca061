"""SD 2.x- and SDXL-shaped tiny pipelines with one planted memorized prompt, saved as diffusers folders, and the
recipes `harden run` hardens them with (tests/test_sd2.py, tests/test_sdxl.py).

Why planted: random weights memorize nothing, so without a planted neuron detection would find no prompt and the
run would localize and prune nothing. Planting strengths and layers were chosen so that the planted prompt scores
well above the references on each shape (SD 2.x: 0.70 vs <= 0.22; SDXL: 0.63 vs <= 0.19, 6 seeds, 32x32 latents).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from harden.tiny import HELD_OUT, MEMORIZED, REFERENCES

ORDINARY = "a plain prompt nobody memorized"
# (builder, plant keyword arguments): SDXL's neuron reads only text_encoder_2's part of the context (columns 32-96),
# so finding it needs the statistics of the second encoder's path
PLANTS = {
    "sd2": {"layer": 1, "neuron": 3, "out_gain": 300.0},
    "sdxl": {"layer": 1, "neuron": 3, "out_gain": 1000.0, "columns": slice(32, 96)},
}


def build(kind: str):
    from harden.tiny import tiny_sd2_pipeline, tiny_sdxl_pipeline

    return {"sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}[kind](seed=0, sample_size=32)


def build_planted(kind: str, folder: Path | None = None):
    """(pipeline, planted layer name, neuron); saved to `folder` with save_pretrained when given."""
    from harden.tiny import plant_memorization

    pipe = build(kind)
    plant = dict(PLANTS[kind])
    layer = plant_memorization(pipe, MEMORIZED, REFERENCES, **plant)
    if folder is not None:
        pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, layer, plant["neuron"]


def write_recipe(root: Path, model: str = "model", **sections) -> Path:
    data = {
        "name": "arch",
        "model": {"id": model, "device": "cpu"},
        "memorized": {"prompts": [MEMORIZED, ORDINARY]},
        "reference": {"prompts": REFERENCES, "tau_prompts": 6},
        "detection": {"threshold": 0.428, "kernel_size": 7, "n_seeds": 6},
        "localization": {"tau_initial": 0.428, "tau_refine": 0.428, "compare": False},
        "verify": {"held_out": {"prompts": HELD_OUT}, "seeds": [0, 1], "steps": 2, "guidance_scale": 2.0,
                   "gates": {"memorized_score_after_max": {"max": 0.428}, "mitigated_fraction": {"min": 1.0},
                             "heldout_ssim_median": {"min": 0.1}}},
        "export": {"layout": "both"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@torch.no_grad()
def unet_output(unet, embeds: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A fixed forward (latents from `seed`, t = 500) with packed embeddings, for comparing loaded UNets."""
    from harden.nemo.conditioning import call_unet
    from harden.targets import latent_size

    x = torch.randn((len(embeds), unet.config.in_channels, *latent_size(unet)),
                    generator=torch.Generator().manual_seed(seed))
    return call_unet(unet, x, 500, embeds)
