"""Repair's inputs that are checked before a run folder exists (so bad input leaves nothing written)."""

from __future__ import annotations

from ..errors import BadInputError
from ..prompts import Prompt, load_prompts
from ..recipe import LoadedRecipe, Recipe


def load_retain(loaded: LoadedRecipe) -> list[Prompt]:
    """The user's retain pairs (empty list for data-free distillation); every pair needs its image. Runs before the
    run folder exists, so a missing or empty file is refused with nothing written."""
    r = loaded.recipe.repair
    if not r.enabled or r.retain is None:
        return []
    pairs = load_prompts(r.retain, loaded.folder, "repair.retain")
    missing = [p.text for p in pairs if p.image is None]
    if missing:
        raise BadInputError(f"repair.retain: {len(missing)} of {len(pairs)} pairs have no image in "
                            f"{r.retain.image_field!r}", "give every caption its image, or drop repair.retain")
    return pairs


def check_base(recipe: Recipe, unet) -> None:
    """Repair keeps the channels harden itself pruned; a base UNet of any other class (another tool's compact
    model, custom code) has a structure harden cannot know, so it is refused before anything is written."""
    if recipe.repair.enabled:
        from diffusers import UNet2DConditionModel

        if type(unet) is not UNet2DConditionModel:
            raise BadInputError(f"repair needs a stock diffusers UNet2DConditionModel as the base, got "
                                f"{type(unet).__name__} (a model pruned by another tool?)",
                                "give the unpruned base model, or set repair.enabled: false")
