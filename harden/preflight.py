"""One preflight for `harden validate` and the start of `harden run`: what can be checked is checked before any
model is loaded and before anything is written.

Why one function for both: a recipe that validates must not fail hours later for a reason validate could have seen:
a prompt file or reference image that cannot be read, a size diffusers refuses, a device this machine lacks,
MS-SSIM scales larger than the model's latents, a localization schedule without end, an output folder that cannot
be written. A model's configuration is a few small JSON files: a local folder's are read here (never its weights);
for a Hub id, the cached copy is read when there is one, and the runner checks the loaded pipeline's configs with
`check_model` before the run folder exists.

`input_fingerprint` records what a run read (prompt files, reference images, the model's files or Hub commit), so
that `--resume` refuses inputs that changed under a half-finished run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError
from .files import sha256_file
from .loading import check_architecture, check_device, check_local_folder, hub_commit
from .nemo.localize import LocalizeSettings, schedule
from .nemo.score import ScoreSettings, check_ms_ssim_size, detection_prediction
from .recipe import PACKAGE_PREFIX, LoadedRecipe, LocalizationSection, ModelSection, Recipe, package_path
from .recipe import resolve_model_path
from .stages.context import Inputs, load_inputs


@dataclass(frozen=True)
class ModelConfigs:
    """The parts of a pipeline's configuration the checks need (None where the file is absent)."""

    index: dict
    unet: dict | None
    vae: dict | None
    scheduler: dict | None


def preflight(loaded: LoadedRecipe, out: Path | None = None, device: str | None = None, *,
              resume: bool = False) -> Inputs:
    """Every check that needs no model weights; returns the loaded prompt lists. `out` None: no output checks."""
    recipe = loaded.recipe
    check_device(device or recipe.model.device)
    check_schedule(recipe.localization)
    inputs = load_inputs(loaded)  # prompt files, reference images (opened), gates, audit and repair inputs
    configs = read_model_configs(recipe.model, loaded.folder)
    if configs is not None:
        check_model(recipe, configs.unet, configs.vae, configs.scheduler)
    if out is not None:
        check_output(Path(out), resume)
    return inputs


# ------------------------------------------------------------------------------------------------ search schedule


def schedule_length(loc: LocalizationSection) -> int:
    """Initial-selection steps (theta, k) of one prompt's search, without building the schedule when it is huge."""
    lengths = []
    if loc.use_theta:
        lengths.append(max(1, math.ceil((loc.theta_start - loc.theta_min) / loc.theta_step)))
    if loc.use_top_k:
        lengths.append(max(1, loc.k_max - loc.k_start))
    estimate = min(lengths)
    if estimate > 2 * loc.max_schedule_steps + 2:
        return estimate  # the closed form can be one off from the float loop; far above the bound that is moot
    return len(schedule(LocalizeSettings(theta_start=loc.theta_start, theta_step=loc.theta_step,
                                         theta_min=loc.theta_min, use_theta=loc.use_theta, k_start=loc.k_start,
                                         use_top_k=loc.use_top_k, k_max=loc.k_max)))


def check_schedule(loc: LocalizationSection) -> None:
    steps = schedule_length(loc)
    if steps > loc.max_schedule_steps:
        raise BadInputError(
            f"localization: the initial-selection schedule would take {steps} steps per prompt, more than "
            f"localization.max_schedule_steps = {loc.max_schedule_steps}",
            "raise theta_step or lower k_max (NeMo's defaults take 16 steps), or raise max_schedule_steps")


# ----------------------------------------------------------------------------------------------- model configs


def _json_object(folder: Path, rel: str, name: str, required: bool = False) -> dict | None:
    """The JSON config file `rel` of a pipeline folder, which must hold one object; None when absent and optional."""
    path = folder / rel
    if not path.is_file():
        if required:
            raise BadInputError(f"{path.parent} has no {path.name}, so it is not a diffusers pipeline folder",
                                "point model.id at the pipeline's root folder")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInputError(f"{name}: {rel} is not valid JSON ({type(err).__name__})",
                            "restore the model's configuration file") from None
    except OSError as err:
        raise BadInputError(f"{name}: cannot read {rel}: {err.strerror}", "check its permissions") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{name}: {rel} holds a JSON {type(data).__name__}, not an object",
                            "restore the model's configuration file")
    return data


def _check_index(index: dict, name: str) -> None:
    """model_index.json's components are [library, class] pairs (other keys are flags diffusers passes on)."""
    for key, value in index.items():
        if isinstance(value, list) and (len(value) != 2 or not all(v is None or isinstance(v, str) for v in value)):
            raise BadInputError(f"{name}: model_index.json's {key!r} is not a [library, class] pair",
                                "restore the model's model_index.json")


def read_model_configs(model: ModelSection, recipe_folder: Path) -> ModelConfigs | None:
    """The configs of a local folder (checked: safetensors, architecture), or of a Hub id's cached snapshot; None
    for a Hub id that is not cached (the runner checks the loaded pipeline instead; validate never downloads)."""
    local = resolve_model_path(model.id, recipe_folder)
    if local is None:
        return _cached_hub_configs(model)
    if not local.is_dir():
        raise BadInputError(f"model path {local} is a file, not a diffusers pipeline folder",
                            "give the folder that holds model_index.json")
    configs = _configs_in(local, str(local))
    check_local_folder(local, model.allow_pickle)
    check_architecture(local, str(local))
    return configs


def _configs_in(folder: Path, name: str, required: bool = True) -> ModelConfigs:
    index = _json_object(folder, "model_index.json", name, required=required)
    _check_index(index, name)
    return ModelConfigs(index, _json_object(folder, "unet/config.json", name),
                        _json_object(folder, "vae/config.json", name),
                        _json_object(folder, "scheduler/scheduler_config.json", name))


def _cached_hub_configs(model: ModelSection) -> ModelConfigs | None:
    """A Hub id's configs from the local Hugging Face cache only (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model.id, "model_index.json", revision=model.revision)
    if not isinstance(found, str):
        return None
    return _configs_in(Path(found).parent, repr(model.id))


def _latent_size(unet: dict, name: str = "unet/config.json") -> tuple[int, int]:
    size = unet.get("sample_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    if (isinstance(size, (list, tuple)) and len(size) == 2 and
            all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return size[0], size[1]
    raise BadInputError(f"{name}: sample_size {size!r} is not a latent size", "restore the UNet's config.json")


def vae_scale_factor(vae: dict | None) -> int:
    """Pixels per latent, as diffusers' pipelines compute it (8 without a VAE config)."""
    channels = (vae or {}).get("block_out_channels")
    return 2 ** (len(channels) - 1) if isinstance(channels, list) and channels else 8


def check_model(recipe: Recipe, unet: dict | None, vae: dict | None, scheduler: dict | None = None) -> None:
    """What the recipe asks of this model's shapes and scheduler: MS-SSIM scales that fit its latents, image sizes
    diffusers accepts, a prediction type and step count the detection score can use."""
    d = recipe.detection
    settings = ScoreSettings(n_seeds=d.n_seeds, seed=d.seed, num_inference_steps=d.num_inference_steps,
                             timestep_index=d.timestep_index, kernel_size=d.kernel_size, betas=tuple(d.betas),
                             ms_ssim=d.ms_ssim)
    if unet is not None:
        check_ms_ssim_size(_latent_size(dict(unet)), settings)
    step = math.lcm(8, vae_scale_factor(dict(vae) if vae is not None else None))  # diffusers refuses non-multiples of 8
    for key in ("height", "width"):
        value = getattr(recipe.verify, key)
        if value is not None and value % step:
            raise BadInputError(f"verify.{key}: {value} is not a multiple of {step} (diffusers refuses it for this "
                                "model)", f"use a multiple of {step}, e.g. {max(step, value - value % step)}")
    if scheduler is not None:
        try:
            detection_prediction(dict(scheduler), settings)
        except (ValueError, IndexError, TypeError, KeyError) as err:
            raise BadInputError(f"detection: the model's scheduler cannot take these settings: {err}",
                                "lower detection.num_inference_steps / timestep_index") from None


# ------------------------------------------------------------------------------------------------ output folder


def check_output(out: Path, resume: bool = False) -> None:
    """The run folder can be made (or reopened) and written: nothing on its path is a file, and harden can write
    where it will create it. Whether an existing folder may be replaced is `prepare_folder`'s rule."""
    absolute = Path(os.path.abspath(out))
    ancestor = absolute
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != absolute and not ancestor.is_dir():
        raise BadInputError(f"--out {out}: {ancestor} is a file, so no folder can be made under it",
                            "choose an --out whose parents are folders")
    if ancestor == absolute and not absolute.is_dir():
        return  # a file at --out itself: prepare_folder refuses it (exists / not a harden run folder)
    where = absolute if ancestor == absolute and resume else absolute.parent if ancestor == absolute else ancestor
    try:
        probe = tempfile.mkdtemp(prefix=".harden-write-check-", dir=where)
        os.rmdir(probe)
    except OSError as err:
        raise BadInputError(f"--out {out}: cannot write in {where} ({err.strerror or err})",
                            "choose a folder you can write to, or fix its permissions") from None


# ------------------------------------------------------------------------------------------ inputs for --resume


def _prompt_file(source, folder: Path) -> Path | None:
    """The local file a prompt source reads (URL sources are pinned by their sha256 in the recipe: None)."""
    if source is None or source.file is None or re.match(r"https?://", source.file):
        return None
    if source.file.startswith(PACKAGE_PREFIX):
        return package_path(source.file)
    return (folder / Path(source.file).expanduser()).resolve()


def input_fingerprint(inputs: Inputs, model_dir: Path | None) -> dict:
    """sha256 of what a run reads besides its recipe: prompt files, reference images, and the model (every file of
    a local folder; a Hub id's resolved commit). Stored in run.json; `--resume` refuses a run whose inputs differ."""
    loaded, r = inputs.loaded, inputs.recipe
    sources = {"memorized": r.memorized, "reference": r.reference, "verify.held_out": r.verify.held_out,
               "repair.retain": r.repair.retain}
    files = {}
    for what, source in sources.items():
        path = _prompt_file(source, loaded.folder)
        if path is not None and path.is_file():
            files[what] = sha256_file(path)
    images = sorted({str(p.image) for group in (inputs.memorized, inputs.held_out, inputs.retain)
                     for p in group if p.image is not None})
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{Path(image).name}\0{sha256_file(Path(image))}\n".encode())
    if model_dir is not None:
        model = {"files": {p.relative_to(model_dir).as_posix(): sha256_file(p)
                           for p in sorted(model_dir.rglob("*"))
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)}}
    else:
        model = {"hub_id": r.model.id, "commit": hub_commit(r.model.id, r.model.revision)}
    return {"prompt_files": files, "reference_images": digest.hexdigest() if images else None, "model": model}
