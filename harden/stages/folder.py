"""The run folder: its bookkeeping (run.json, done stages), and the formats of the artifacts stages share.

Why one module: every stage reads what earlier stages wrote (neurons.json, per-prompt results); when those formats
live here, no stage imports another stage or the runner.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import BadInputError
from ..files import write_atomic
from ..nemo.localize import PromptResult
from ..neurons import NeuronSet
from ..recipe import LoadedRecipe

UNBLOCKED_FILE = "unblocked.safetensors"


@dataclass
class RunFolder:
    path: Path
    state: dict = field(default_factory=dict)

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def done(self, stage: str) -> bool:
        return bool(self.state["stages"].get(stage, {}).get("done"))

    def mark(self, stage: str, seconds: float) -> None:
        self.state["stages"][stage] = {"done": True, "seconds": round(seconds, 3)}
        self.save()

    def save(self) -> None:
        write_atomic(self.file("run.json"), json.dumps(self.state, indent=2) + "\n")

    def write_json(self, rel: str, data) -> None:
        write_atomic(self.file(rel), json.dumps(data, indent=2) + "\n")

    def read_json(self, rel: str):
        return json.loads(self.file(rel).read_text())


def prepare_folder(out: Path, loaded: LoadedRecipe, resume: bool, overwrite: bool) -> Callable[[], RunFolder]:
    """Check the output folder now; return the function that creates (or reopens) it once the model has loaded."""
    out = Path(out)
    if resume:
        state_path = out / "run.json"
        if not state_path.is_file():
            raise BadInputError(f"--resume: {out} is not a harden run folder (no run.json)",
                                "give the --out folder of an earlier run, or drop --resume")
        state = json.loads(state_path.read_text())
        if state.get("recipe_sha256") != loaded.sha256:
            raise BadInputError("--resume: the recipe changed since this run started",
                                "restore the recipe, or start a new run in another folder")
        return lambda: RunFolder(out, state)
    if out.exists():
        if not overwrite:
            raise BadInputError(f"output folder {out} already exists",
                                "choose another --out, add --resume to continue it, or --overwrite to replace it")
        if out.is_file() or (any(out.iterdir()) and not (out / "run.json").is_file()):
            raise BadInputError(f"--overwrite refuses to delete {out}: it is not a harden run folder",
                                "choose another --out")

    def create() -> RunFolder:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        state = {"harden_version": __version__, "recipe_sha256": loaded.sha256,
                 "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
        folder = RunFolder(out, state)
        write_atomic(folder.file("recipe.yaml"), loaded.text)
        folder.save()
        return folder

    return create


def load_results(folder: RunFolder, sub: str = "prompts") -> list[tuple[int, PromptResult]]:
    """(prompt index, result) of every per-prompt file under localize/<sub>/, in prompt order."""
    out = []
    for path in sorted(folder.file("localize", sub).glob("*.json")):
        data = json.loads(path.read_text())
        index = data.pop("index")
        data.pop("seconds", None)
        data.pop("early_reject", None)  # how it was searched, not part of the result
        out.append((index, PromptResult.from_json(data)))
    return out


def write_neurons(path: Path, neurons: NeuronSet) -> None:
    write_atomic(path, json.dumps({"count": len(neurons), "per_layer": neurons.counts(),
                                   "layers": neurons.to_json()}, indent=2) + "\n")


def read_neurons(path: Path) -> NeuronSet:
    """neurons.json as harden writes it ({"layers": {...}}), or a bare {layer: [channels]} mapping."""
    try:
        data = json.loads(Path(path).read_text())
        return NeuronSet.from_json(data["layers"] if isinstance(data, dict) and "layers" in data else data)
    except FileNotFoundError:
        raise BadInputError(f"neuron file {path} does not exist", "give the neurons.json of a localize run") from None
    except (ValueError, TypeError, KeyError) as err:
        raise BadInputError(f"{path} is not a neuron set: {err}",
                            'expected {"layers": {layer name: [channel, ...]}}') from None
