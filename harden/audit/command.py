"""`harden audit RECIPE --model DIR --out OUT`: audit any pipeline folder against a recipe's memorized prompts.

Why any folder: the question "what do these weights still give back?" is the same for the base model, a harden export
(compact or dense), or another tool's output; only the loading differs. Every input is checked before the model
runs, and OUT is written through a temporary folder, so bad input leaves nothing behind (exit 2) and a failed gate
(exit 3) leaves the complete audit for inspection.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..checkpoint import is_compact, load_hardened
from ..errors import BadInputError, GateFailedError
from ..files import atomic_folder, write_atomic
from ..loading import check_local_folder, pick_device, pick_dtype
from ..metrics import evaluate_gates
from ..prompts import load_prompts
from ..recipe import AUDIT_GATES, Gate, LoadedRecipe, resolve_model_path
from ..stages.context import SilentUI
from .core import audit_model
from .inputs import (build_prompts, check_model, check_targets, control_paths, image_size, load_controls,
                     settings_from_recipe, similarity_from_recipe)
from .output import audit_json, table_lines, write_images

_GATE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


def parse_gates(values: list[str]) -> dict[str, Gate]:
    """`name<=x` / `name>=x` command-line gates on the audit's metrics."""
    out = {}
    for value in values:
        m = _GATE.match(value)
        if not m:
            raise BadInputError(f"--gate {value!r} is not NAME<=VALUE or NAME>=VALUE",
                                "e.g. --gate attack_reproduced_fraction<=0")
        name, op, number = m.groups()
        if name not in AUDIT_GATES:
            raise BadInputError(f"--gate {name!r} is not an audit metric", "use one of " + ", ".join(AUDIT_GATES))
        try:
            bound = float(number)
        except ValueError:
            raise BadInputError(f"--gate {value!r}: {number!r} is not a number", "e.g. 0.25") from None
        if not 0.0 <= bound <= 1.0:
            raise BadInputError(f"--gate {value!r}: a fraction bound is in [0, 1]", "e.g. 0.25")
        out[name] = Gate(max=bound) if op == "<=" else Gate(min=bound)
    return out


def load_any_pipeline(folder: Path, device: str, allow_pickle: bool = False, what: str = "--model"):
    """A diffusers pipeline folder as it is: harden's compact layout through `load_hardened` (no remote code)."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    if not folder.exists():
        raise BadInputError(f"{what} {folder} does not exist", "give a diffusers pipeline folder")
    check_local_folder(folder, allow_pickle)
    dev = pick_device(device)
    kwargs = {"torch_dtype": pick_dtype("auto", dev)}
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        if is_compact(folder):
            pipe = load_hardened(folder, **kwargs)
        else:
            pipe = DiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                     **kwargs)
    except Exception as err:  # diffusers raises OSError, ValueError, KeyError... for broken folders
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"{what} {folder} could not be loaded as a pipeline: {first[:200]}",
                            "check that the folder is a complete diffusers pipeline") from None
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, part, None) is None:
            raise BadInputError(f"{what} {folder} has no {part}; the audit needs a Stable-Diffusion-style pipeline",
                                "give a text-to-image pipeline folder with a UNet, a VAE and a CLIP text encoder")
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise BadInputError(f"output folder {out} already exists", "choose another --out or add --overwrite")
        if out.is_file() or not (out / "audit.json").is_file():
            raise BadInputError(f"--overwrite refuses to replace {out}: it is not an audit folder",
                                "choose another --out")


def audit_folder(loaded: LoadedRecipe, model_dir: Path, out: Path, *, base: Path | None = None,
                 gates: list[str] | None = None, threshold: float | None = None, device: str | None = None,
                 overwrite: bool = False, ui=None) -> dict:
    """Audit `model_dir`, write OUT/audit.json (+ targets, images, figures); returns audit.json's content. Raises
    BadInputError before writing anything, GateFailedError (exit 3) after writing when a gate failed."""
    ui = ui or SilentUI()
    recipe = loaded.recipe
    out = Path(out)
    _check_out(out, overwrite)
    memorized = load_prompts(recipe.memorized, loaded.folder, "memorized")
    settings = settings_from_recipe(recipe)
    sim = similarity_from_recipe(recipe.audit, loaded.folder, threshold)
    controls = control_paths(recipe.audit, loaded.folder)
    chosen = {k: g for k, g in recipe.verify.gates.items() if k in AUDIT_GATES}
    chosen.update(parse_gates(gates or []))
    needs_base = any(p.image is None for p in memorized)
    base_dir = None
    if needs_base:
        if base is not None:
            base_dir = Path(base)
        else:
            base_dir = resolve_model_path(recipe.model.id, loaded.folder)
            if base_dir is None:
                raise BadInputError("memorized prompts without images need the base model for surrogates, and the "
                                    f"recipe's model {recipe.model.id!r} is a Hub id",
                                    "download it and pass --base DIR, or give each prompt its training image")
    check_targets(memorized, base_dir is not None or not needs_base, settings)
    dev = device or recipe.model.device
    pipe = load_any_pipeline(Path(model_dir), dev, recipe.model.allow_pickle)
    check_model(pipe, f"--model {model_dir}")
    base_pipe = None
    if base_dir is not None:
        same = base_dir.resolve() == Path(model_dir).resolve()
        base_pipe = pipe if same else load_any_pipeline(base_dir, dev, recipe.model.allow_pickle, "--base")
    size = image_size(pipe, settings)
    prompts, _ = build_prompts(memorized, size, sim, settings, base_pipe, None, ui)
    control_targets = load_controls(controls, size)
    audit = audit_model(pipe, pipe.unet, "model", prompts, control_targets, sim, settings, ui)
    results = evaluate_gates({k: audit.summary[k] for k in AUDIT_GATES}, chosen, math.nan) if chosen else []
    data = audit_json({"model": audit}, "model", prompts, control_targets, sim, settings,
                      model=str(Path(model_dir).resolve()), base=str(base_dir.resolve()) if base_dir else None,
                      recipe_sha256=loaded.sha256, gates=results, passed=all(g["passed"] for g in results))
    with atomic_folder(out) as tmp:
        write_atomic(tmp / "audit.json", json.dumps(data, indent=2) + "\n")
        write_images(tmp, {"model": audit}, prompts, [("from the prompt", "model", "prompt"),
                                                      ("paraphrase", "model", "paraphrase"),
                                                      ("under attack", "model", "attack")])
    for line in table_lines({"model": audit.summary}):
        ui.log(line)
    failed = [g for g in results if not g["passed"]]
    if failed:
        g = failed[0]
        raise GateFailedError(f"{len(failed)} audit gate(s) failed, first: {g['name']} = {g['value']} (needs "
                              f"{g['op']} {g['threshold']:g})", f"see {out / 'audit.json'}")
    return data
