"""`harden prune MODEL --neurons N --out DIR`: pruning as a stand-alone step with explicit inputs.

Why: a release engineer may localize once (or receive a neurons.json) and build exports for several layouts or
revisions without rerunning the search.
"""

from __future__ import annotations

from pathlib import Path


from .errors import BadInputError
from .export import LAYOUTS, atomic_folder, save_pipeline
from .loading import load_pipeline
from .nemo.stats import encode_prompts
from .prune import prune_compact, prune_dense
from .recipe import ModelSection
from .report import reload_check, reload_tolerance
from .runner import read_neurons, write_neurons


def prune_to_folder(model: str, neurons_path: Path, out: Path, layout: str = "compact", revision: str | None = None,
                    allow_pickle: bool = False, device: str | None = None) -> dict[Path, float]:
    """Write OUT (one layout) or OUT/compact + OUT/dense (both); returns {folder: reload max|diff|}."""
    layouts = LAYOUTS if layout == "both" else (layout,)
    if layout not in (*LAYOUTS, "both"):
        raise BadInputError(f"unknown layout {layout!r}", "use compact, dense or both")
    out = Path(out)
    if out.exists():
        raise BadInputError(f"output folder {out} already exists", "choose another --out or delete it")
    neurons = read_neurons(neurons_path)
    pipe, _ = load_pipeline(ModelSection(id=model, revision=revision, allow_pickle=allow_pickle), Path.cwd(), device)
    build = {"compact": prune_compact, "dense": prune_dense}
    unets = {name: build[name](pipe.unet, neurons) for name in layouts}  # validates the set against the model
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", "a photograph of a lighthouse at dusk"])
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
