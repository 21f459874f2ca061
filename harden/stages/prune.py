"""Stage 4, prune: remove the localized neurons in each export layout; and `harden prune` as a stand-alone step.

Why a stand-alone step too: a release engineer may localize once (or receive a neurons.json) and build exports for
several layouts or revisions without rerunning the search.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import check_layout, pruned_unets, reload_check, reload_tolerance, save_pipeline
from ..errors import BadInputError
from ..files import atomic_folder
from ..loading import load_pipeline
from ..nemo.conditioning import encode
from ..preflight import check_output
from ..recipe import ModelSection
from .context import Run
from .folder import read_neurons, write_neurons


def prune(run: Run) -> None:
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    unets = run.hardened_unets()
    widths = run.widths
    params = {layout: sum(p.numel() for p in u.parameters()) for layout, u in unets.items()}
    run.folder.write_json("prune/prune.json", {
        "neurons": len(neurons), "per_layer": neurons.counts(), "layer_widths": widths,
        "layouts": list(unets), "parameters_base": sum(p.numel() for p in run.pipe.unet.parameters()),
        "parameters": params,
    })
    run.ui.log(f"pruned {len(neurons)} neurons; UNet parameters {params}")


def prune_to_folder(model: str, neurons_path: Path, out: Path, layout: str = "compact", revision: str | None = None,
                    allow_pickle: bool = False, device: str | None = None) -> dict[Path, float]:
    """Write OUT (one layout) or OUT/compact + OUT/dense (both); returns {folder: reload max|diff|}."""
    layouts = check_layout(layout, allow_both=True)
    out = Path(out)
    if out.exists():
        raise BadInputError(f"output folder {out} already exists", "choose another --out or delete it")
    check_output(out)  # no file on its path, a folder harden can write in
    neurons = read_neurons(neurons_path)
    pipe, _ = load_pipeline(ModelSection(id=model, revision=revision, allow_pickle=allow_pickle), Path.cwd(), device)
    unets = pruned_unets(pipe.unet, neurons, layouts)  # validates the set against the model
    embeds = encode(pipe, ["", "a photograph of a lighthouse at dusk"])
    written = {}
    with atomic_folder(out) as tmp:
        for name, unet in unets.items():
            folder = tmp if len(unets) == 1 else tmp / name
            save_pipeline(pipe, unet, folder, name)
            write_neurons(folder / "harden" / "neurons.json", neurons)
            diff = reload_check(folder, name, unet, embeds, 500)
            if not diff <= reload_tolerance(unet):
                raise BadInputError(f"the {name} export does not reproduce the pruned model (max|diff| {diff:.3g})",
                                    "this is a bug in harden; please report it")
            written[out if len(unets) == 1 else out / name] = diff
    return written
