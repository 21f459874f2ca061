"""Resumable repair checkpoints: safetensors for every tensor (weights, optimizer state, RNG states, attack
embeddings) and JSON for the rest. Never pickle: a checkpoint is as safe to open as the export itself.

Layout: repair/checkpoints/step-NNNNNNNN/{unet,optimizer,state}.safetensors + state.json, each folder written
through a temporary sibling and renamed (harden.files.atomic_folder); repair/checkpoints/latest.json names the
newest complete one and is replaced atomically after it, then older folders are deleted. A SIGKILL at any instant
leaves a complete checkpoint to resume from (or none, and repair starts over from its saved data).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..files import atomic_folder, save_tensors_atomic, write_atomic

LATEST = "latest.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into safetensors-able tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def generator_state(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state().clone()


def save_checkpoint(folder: Path, step: int, unet: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoint `step` under `folder` (repair/checkpoints), point latest.json at it, drop older ones."""
    target = folder / f"step-{step:08d}"
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    with atomic_folder(target) as tmp:
        save_tensors_atomic(tmp / "unet.safetensors", unet.state_dict())
        save_tensors_atomic(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors_atomic(tmp / "state.safetensors", tensors)
        write_atomic(tmp / "state.json", json.dumps({**state, "step": step, "optimizer": opt_meta}) + "\n")
    write_atomic(folder / LATEST, json.dumps({"step": step, "folder": target.name}) + "\n")
    for old in folder.glob("step-*"):
        if old.is_dir() and old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path) -> tuple[dict, dict, dict, dict] | None:
    """(unet state, optimizer tensors, state tensors, state JSON) of the latest complete checkpoint, or None."""
    from safetensors.torch import load_file

    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / json.loads(pointer.read_text())["folder"]
    state = json.loads((path / "state.json").read_text())
    return (load_file(str(path / "unet.safetensors")), load_file(str(path / "optimizer.safetensors")),
            load_file(str(path / "state.safetensors")), state)
