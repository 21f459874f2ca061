"""Loading the base pipeline a recipe names: Hub id or local folder, safetensors only unless the recipe allows pickles.

Why checks before diffusers: diffusers' own errors for a missing folder, a pickle-only checkpoint or an offline Hub id
are long tracebacks; a release engineer needs one line that says what is wrong and what to change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import BadInputError
from .recipe import ModelSection, resolve_model_path
from .targets import resolve_targets

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {name} was asked for but CUDA is not available", "use --device cpu or auto")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def check_local_folder(folder: Path, allow_pickle: bool) -> None:
    """A diffusers pipeline folder whose weights are safetensors (or pickles, when explicitly allowed)."""
    if not folder.is_dir():
        raise BadInputError(f"model path {folder} is a file, not a diffusers pipeline folder",
                            "give the folder that holds model_index.json")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise BadInputError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder",
                            "point model.id at the pipeline's root folder")
    index = json.loads(index_path.read_text())
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / component
        if not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.is_file()]
        has_safe = any(p.suffix == ".safetensors" for p in files)
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles and not has_safe and not allow_pickle:
            raise BadInputError(
                f"{component}/ holds only pickle weights ({pickles[0]}); loading them could run arbitrary code",
                "convert the model to safetensors, or set model.allow_pickle: true if you trust its source")


def load_pipeline(model: ModelSection, recipe_folder: Path, device: str | None = None):
    """(pipeline on its device in its dtype, local folder or None for a Hub id). Refuses models without targets."""
    from diffusers import DiffusionPipeline

    local = resolve_model_path(model.id, recipe_folder)
    if local is not None:
        check_local_folder(local, model.allow_pickle)
    dev = pick_device(device or model.device)
    dtype = pick_dtype(model.dtype, dev)
    kwargs = {"torch_dtype": dtype, "revision": model.revision}
    if not model.allow_pickle:
        kwargs["use_safetensors"] = True
    if local is not None and "safety_checker" in json.loads((local / "model_index.json").read_text()):
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # harden never generates for users
    elif local is None:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local or model.id), **kwargs)
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError, HF errors...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = ("check the Hub id and revision, your network / HF_HUB_OFFLINE, and access rights"
                if local is None else "check that the folder is a complete diffusers pipeline")
        raise BadInputError(f"could not load model {model.id!r}: {first[:300]}", hint) from None
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise BadInputError(f"model {model.id!r} has no {part}; harden needs a Stable-Diffusion-style pipeline",
                                "use a text-to-image pipeline with a UNet and a CLIP text encoder")
    resolve_targets(pipe.unet, model.targets)  # refuses models without cross-attention, fused projections...
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe, local
