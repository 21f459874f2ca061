"""The audit's inputs from a recipe: settings, similarity, control images and each prompt's target.

Why checked up front: `harden audit` and the audit stage refuse bad input (a missing or unreadable image, no way to
make a surrogate, a threshold out of range) with one line before anything is written, as every harden command does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BadInputError
from ..generation import generate, swapped_unet
from ..nemo.conditioning import needs_added_conditions
from ..prompts import Prompt
from ..recipe import PACKAGE_PREFIX, AuditSection, Recipe, package_path
from ..targets import latent_size
from .core import AuditPrompt, AuditSettings
from .similarity import Similarity, make_similarity
from .targets import Target, choose_surrogate, control_target, read_image, training_target


def settings_from_recipe(recipe: Recipe) -> AuditSettings:
    """The audit section with its nulls filled from the verify section (seeds, steps, guidance) and the recipe."""
    a, v = recipe.audit, recipe.verify
    return AuditSettings(seeds=tuple(a.seeds or v.seeds), steps=a.steps or v.steps,
                         guidance=v.guidance_scale if a.guidance_scale is None else a.guidance_scale,
                         height=v.height, width=v.width, attack_steps=a.attack_steps, lr=a.attack_lr,
                         batch=a.attack_batch, restarts=a.restarts, prompt_start=a.prompt_start,
                         paraphrases=a.paraphrases, seed=recipe.seed if a.seed is None else a.seed,
                         control_bound=a.control_bound, surrogate_agreement=a.surrogate_agreement,
                         samples_per_forward=a.batch_size, images_per_call=v.batch_images)


def _resolve(value: str, folder: Path) -> Path:
    if value.startswith(PACKAGE_PREFIX):
        return package_path(value)
    return (folder / Path(value).expanduser()).resolve()


def similarity_from_recipe(section: AuditSection, folder: Path, threshold: float | None = None) -> Similarity:
    sscd = _resolve(section.sscd_model, folder) if section.sscd_model else None
    return make_similarity(section.metric, section.threshold if threshold is None else threshold, sscd)


def control_paths(section: AuditSection, folder: Path) -> list[Path]:
    """The control images' paths (a listing file or a list in the recipe); each must exist and be readable."""
    value = section.control_images
    if value is None:
        return []
    if isinstance(value, list):
        paths = [_resolve(p, folder) for p in value]
    else:
        listing = _resolve(value, folder)
        if not listing.is_file():
            raise BadInputError(f"audit.control_images: listing {listing} does not exist",
                                "give a .txt (one image path per line) or .jsonl (`image` key) file, or a list")
        paths = [(listing.parent / p).resolve() for p in _listing(listing)]
    if not paths:
        raise BadInputError("audit.control_images lists no image", "list at least one image the model never saw")
    for p in paths:
        read_image(p, "audit.control_images")
    return paths


def _listing(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise BadInputError(f"audit.control_images: {path.name} line {n} is not JSON",
                                    "one JSON object per line with an `image` key") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise BadInputError(f"audit.control_images: {path.name} line {n} has no `image`",
                                    "one JSON object per line with an `image` key")
            out.append(row["image"])
        return out
    if path.suffix.lower() == ".txt":
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    raise BadInputError(f"audit.control_images: unsupported listing {path.name}", "use .txt or .jsonl")


def image_size(pipe, settings: AuditSettings) -> tuple[int, int]:
    """(H, W) of the images the audit generates: the recipe's size, else the model's native one."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = latent_size(pipe.unet)
    return (settings.height or side[0] * scale, settings.width or side[1] * scale)


def load_controls(paths: Sequence[Path], size: tuple[int, int]) -> list[Target]:
    return [control_target(p, size) for p in paths]


def check_targets(prompts: Sequence[Prompt], can_make_surrogates: bool, settings: AuditSettings) -> None:
    """Refuse, before anything runs, prompts that have no image when there is no base model to make a surrogate."""
    missing = [i for i, p in enumerate(prompts) if p.image is None]
    if missing and not can_make_surrogates:
        raise BadInputError(f"memorized prompt {missing[0]} (and {len(missing) - 1} more) has no training image and "
                            "there is no base model to make a surrogate from",
                            "give each prompt an image (image_field) or audit with the base model available (--base)")
    if missing and len(settings.seeds) < 2:
        raise BadInputError("surrogate targets need at least 2 audit seeds", "set audit.seeds to 2 or more seeds")
    for i, p in enumerate(prompts):
        if p.image is not None:
            read_image(p.image, f"memorized prompt {i}")


def build_prompts(prompts: Sequence[Prompt], size: tuple[int, int], sim: Similarity, settings: AuditSettings,
                  base_pipe=None, base_unet=None, ui=None,
                  all_base_images: bool = False) -> tuple[list[AuditPrompt], list[list[np.ndarray]] | None]:
    """Each prompt with its target: the training image, else a surrogate from the base model's generations at the
    audit seeds (targets.choose_surrogate). Returns (prompts, base images [prompt][seed] or None); with
    `all_base_images` the base generates every prompt (its condition (a), reused by the base's audit)."""
    need = [i for i, p in enumerate(prompts) if p.image is None]
    base_images = None
    if need or all_base_images:
        which = list(range(len(prompts))) if all_base_images else need
        gen = {"steps": settings.steps, "guidance": settings.guidance, "height": settings.height,
               "width": settings.width, "batch_images": settings.images_per_call}
        with ui.stage("audit: base generations for targets", len(which)) as advance:
            with swapped_unet(base_pipe, base_unet if base_unet is not None else base_pipe.unet):
                made = generate(base_pipe, [prompts[i].text for i in which], list(settings.seeds), **gen,
                                advance=advance)
        base_images = [None] * len(prompts)
        for i, imgs in zip(which, made):
            base_images[i] = imgs
    out = []
    for i, p in enumerate(prompts):
        if p.image is not None:
            target = training_target(p.image, size, f"memorized prompt {i}")
        else:
            target = choose_surrogate(base_images[i], settings.seeds, sim, settings.surrogate_agreement)
        out.append(AuditPrompt(p.text, target, p.variants))
    return out, (base_images if all_base_images else None)


def check_audit_inputs(loaded, memorized: Sequence[Prompt]) -> None:
    """Everything about the audit section that can be checked without a model (for `harden validate` / run)."""
    settings = settings_from_recipe(loaded.recipe)
    similarity_from_recipe(loaded.recipe.audit, loaded.folder)
    control_paths(loaded.recipe.audit, loaded.folder)
    check_targets(memorized, True, settings)


def check_model(pipe, what: str = "the model") -> None:
    """The attack optimises the text context alone; SDXL-style UNets also take pooled embeddings and time ids."""
    if needs_added_conditions(pipe.unet):
        raise BadInputError(f"{what} is an SDXL-style pipeline (added text/time conditions); the audit supports "
                            "UNets conditioned on the text context only (SD 1.x / 2.x)",
                            "audit an SD 1.x/2.x-style model, or run without an audit section")
