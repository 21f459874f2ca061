"""Stage 6, export: one pipeline folder per layout, with a model card, report.json, neurons, recipe and figures.

Each folder is built in a temporary sibling, reloaded as a user would load it and compared with the in-memory
hardened model, and only then renamed into place.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import yaml

from .. import card
from ..checkpoint import reload_check, reload_tolerance, save_pipeline
from ..errors import HardenError
from ..figures import heldout_grid_png, neurons_per_layer_png
from ..files import atomic_folder, file_hashes, write_atomic
from .context import Run
from .folder import read_neurons, write_neurons
from .report import build_report, redacted_recipe


def _heldout_pairs(run: Run) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from PIL import Image

    seed = run.recipe.verify.seeds[0]
    out = []
    for j, prompt in enumerate(run.inputs.held_out[:8]):
        base = run.folder.file("verify", "images", f"heldout_{j:06d}_seed{seed}_before.png")
        hard = run.folder.file("verify", "images", f"heldout_{j:06d}_seed{seed}_after.png")
        if base.exists() and hard.exists():
            out.append((prompt.text, np.asarray(Image.open(base)), np.asarray(Image.open(hard))))
    return out


def export(run: Run) -> None:
    """Each layout into run/export/<layout>, built in a temporary folder, checked by reloading, then renamed."""
    base_report = build_report(run)
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    widths = run.widths
    unets = run.hardened_unets()
    probe = run.inputs.held_out[:2] or run.inputs.references[:2]
    embeds = run.embeds(probe)
    timestep = run.scorer().timestep
    tolerance = reload_tolerance(run.pipe.unet)
    for layout, unet in unets.items():
        target = run.folder.file("export", layout)
        with atomic_folder(target) as tmp:
            save_pipeline(run.pipe, unet, tmp, layout)
            meta = tmp / "harden"
            meta.mkdir()
            write_neurons(meta / "neurons.json", neurons)
            write_atomic(meta / "recipe.yaml", yaml.safe_dump(redacted_recipe(run), sort_keys=False))
            if run.recipe.export.figures:
                (meta / "figures").mkdir()
                neurons_per_layer_png(meta / "figures" / "neurons_per_layer.png", neurons.counts(), widths)
                heldout_grid_png(meta / "figures" / "heldout_grid.png", _heldout_pairs(run))
                if run.recipe.export.publish_prompts and run.folder.file("audit", "figures").is_dir():
                    shutil.copytree(run.folder.file("audit", "figures"), meta / "figures" / "audit")  # memorized
            diff = reload_check(tmp, layout, unet, embeds, timestep)
            if not diff <= tolerance:
                raise HardenError(f"the {layout} export does not reproduce the hardened model (max|diff| {diff:.3g})",
                                  "this is a bug in harden; please report it with the run folder")
            report = copy.deepcopy(base_report)
            report["layout"] = layout
            report["export_check"] = {"max_abs_diff": diff, "tolerance": tolerance,
                                      "loaded_with": "trust_remote_code" if layout == "compact" else "stock"}
            card.write_card(tmp, report, run.model_dir)
            report["files"] = file_hashes(tmp, exclude={"harden/report.json", "README.md"})
            write_atomic(meta / "report.json", json.dumps(report, indent=2) + "\n")
        run.ui.log(f"exported the {layout} layout to {target} (reload max|diff| {diff:.2e})")
