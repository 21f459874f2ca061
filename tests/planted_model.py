"""A tiny pipeline with two planted memorized prompts, saved as a diffusers folder, and recipes that use it.

Why two: resume and union tests need more than one localized prompt; a third listed prompt is ordinary, so the run
must report it as not reproducing memorization.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from harden.tiny import HELD_OUT, MEMORIZED, REFERENCES

SECOND = "the memorized coffee cup photo"
ORDINARY = "a plain prompt nobody memorized"
PLANTS = ((MEMORIZED, 0, 5), (SECOND, 3, 2))  # (prompt, target layer index, neuron)


def build_planted(folder: Path) -> dict[str, tuple[int, ...]]:
    """Save the planted pipeline to `folder`; return the planted neuron set as {layer name: (neuron,)}."""
    from harden.tiny import plant_memorization, tiny_pipeline

    pipe = tiny_pipeline(seed=0, sample_size=32)
    planted = {}
    for i, (prompt, layer, neuron) in enumerate(PLANTS):
        name = plant_memorization(pipe, prompt, REFERENCES, layer=layer, neuron=neuron,
                                  conv_out_gain=100.0 if i == 0 else 1.0)
        planted[name] = (neuron,)
    pipe.save_pretrained(folder, safe_serialization=True)
    return planted


def recipe_dict(**sections) -> dict:
    """A recipe for the planted model: thresholds pinned at NeMo's 0.428 (tau_mem of so tiny a model is ~0.2)."""
    data = {
        "name": "planted",
        "model": {"id": "model"},
        "memorized": {"prompts": [{"prompt": MEMORIZED, "image": "astronaut.png"}, SECOND, ORDINARY]},
        "reference": {"prompts": REFERENCES, "tau_prompts": 6},
        "detection": {"threshold": 0.428, "kernel_size": 7},
        "localization": {"tau_initial": 0.428, "tau_refine": 0.428},
        "verify": {"held_out": {"prompts": HELD_OUT}, "seeds": [0, 1], "steps": 2, "guidance_scale": 2.0,
                   "gates": {"memorized_score_after_max": {"max": 0.428}, "mitigated_fraction": {"min": 1.0},
                             "heldout_ssim_median": {"min": 0.1}}},
        "export": {"layout": "both"},
    }
    for key, value in sections.items():
        if value is None:
            data.pop(key, None)
        elif isinstance(value, dict) and isinstance(data.get(key), dict) and key != "model":
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def write_recipe(folder: Path, name: str = "recipe.yaml", **sections) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "astronaut.png"
    if not image.exists():
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(image)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe_dict(**sections), sort_keys=False))
    return path
