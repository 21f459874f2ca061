"""Adversarial repair after pruning (dori.md §3, issue 27; docs/repair.md): fine-tune the pruned UNet so that the
memorized images stay gone under the embedding attack, while ordinary outputs stay close to the base's.

structure.py keeps the pruned channels removed, data.py prepares what repair trains on, losses.py builds each step's
batch and loss, trainer.py runs the loop with the attack inside it, checkpointing.py makes it resumable, probe.py
is the early-stop check; harden.stages.repair is the pipeline stage.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import pruned_unets
from ..neurons import NeuronSet


def weights_file(folder: Path, layout: str) -> Path:
    """Where the repair stage writes the repaired UNet of one export layout."""
    return Path(folder) / f"unet_{layout}.safetensors"


def repaired_unets(base_unet: torch.nn.Module, neurons: NeuronSet, layouts, folder: Path) -> dict[str, torch.nn.Module]:
    """{layout: repaired UNet}: the pruned UNet of each layout (same class and shapes) with the repaired weights."""
    from safetensors.torch import load_file

    unets = pruned_unets(base_unet, neurons, layouts)
    for layout, unet in unets.items():
        unet.load_state_dict(load_file(str(weights_file(folder, layout))), strict=True)
        unet.eval()
    return unets
