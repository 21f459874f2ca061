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
    # --overwrite of an existing run: this run is built in a sibling (`path`) and takes the place of `replaces` only
    # when it finished (`finish`); until then the previous run is untouched
    replaces: Path | None = None

    def finish(self) -> None:
        """Swap a finished --overwrite run into place; the previous run is deleted only now. A kill between the two
        renames is repaired by the next `prepare_folder` (`_recover_swap`)."""
        if self.replaces is None:
            return
        old = _replaced(self.replaces)
        if self.replaces.exists():
            self.replaces.rename(old)
        self.path.rename(self.replaces)
        self.path, self.replaces = self.replaces, None
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """An --overwrite run that failed: its partial replacement goes; the previous run was never touched."""
        if self.replaces is not None:
            shutil.rmtree(self.path, ignore_errors=True)

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


def staging(out: Path) -> Path:
    """Where an --overwrite run is built, beside the run it replaces (and resumed from, with --resume --overwrite)."""
    return out.with_name(f".{out.name}.overwrite")


def _replaced(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced")


def _recover_swap(out: Path) -> None:
    """A swap killed between its renames: the finished replacement, else the previous run, takes `out` again."""
    old = _replaced(out)
    if not old.exists():
        return
    if out.exists():
        shutil.rmtree(old)  # killed after both renames: the new run is in place
    else:
        old.rename(out)  # killed between them: the previous run goes back; the replacement stays resumable


def _read_state(out: Path) -> dict:
    state_path = out / "run.json"
    if not state_path.is_file():
        raise BadInputError(f"--resume: {out} is not a harden run folder (no run.json)",
                            "give the --out folder of an earlier run, or drop --resume")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as err:
        raise BadInputError(f"--resume: {state_path} is damaged ({type(err).__name__})",
                            "start a new run: another --out, or --overwrite") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict) or not all(
            isinstance(v, dict) for v in state["stages"].values()):
        raise BadInputError(f"--resume: {state_path} is not the run.json harden writes",
                            "start a new run: another --out, or --overwrite")
    return state


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / "run.json").is_file())


def check_inputs(state: dict, fingerprint: dict | None) -> None:
    """--resume: the prompt files, reference images and model a run started with (`preflight.input_fingerprint`)
    must be the ones it continues with; runs recorded before harden kept fingerprints are not checked."""
    recorded = state.get("inputs")
    if fingerprint is None or not isinstance(recorded, dict):
        return
    changed = [f"prompt file of {k}" for k in sorted(set(recorded.get("prompt_files") or {}) |
                                                      set(fingerprint["prompt_files"]))
               if (recorded.get("prompt_files") or {}).get(k) != fingerprint["prompt_files"].get(k)]
    if recorded.get("reference_images") != fingerprint["reference_images"]:
        changed.append("the reference images")
    old, new = recorded.get("model") or {}, fingerprint["model"]
    if old != new:
        files = sorted(p for p in set(old.get("files") or {}) | set(new.get("files") or {})
                       if (old.get("files") or {}).get(p) != (new.get("files") or {}).get(p))
        changed.append(f"the model ({files[0]})" if files else "the model (its Hub commit)")
    if changed:
        raise BadInputError(f"--resume: {changed[0]} changed since this run started",
                            "restore it, or start a new run: another --out, or --overwrite")


def prepare_folder(out: Path, loaded: LoadedRecipe, resume: bool, overwrite: bool) -> Callable[..., RunFolder]:
    """Check the output folder now; return the function that creates (or reopens) it once the model has loaded
    (`create(fingerprint)`, the run's `preflight.input_fingerprint`).

    --overwrite never deletes before success: when `out` holds a run, the new one is built in `staging(out)` and
    swapped in by `RunFolder.finish`; `--resume --overwrite` continues an interrupted replacement."""
    out = Path(out)
    _recover_swap(out)
    stage_dir = staging(out)
    if resume:
        replacing = overwrite and (stage_dir / "run.json").is_file()
        where = stage_dir if replacing else out
        state = _read_state(where)
        if state.get("recipe_sha256") != loaded.sha256:
            raise BadInputError("--resume: the recipe changed since this run started",
                                "restore the recipe, or start a new run in another folder")

        def reopen(fingerprint: dict | None = None) -> RunFolder:
            check_inputs(state, fingerprint)
            return RunFolder(where, state, replaces=out if replacing else None)

        return reopen
    replacing = out.exists()
    if replacing:
        if not overwrite:
            raise BadInputError(f"output folder {out} already exists",
                                "choose another --out, add --resume to continue it, or --overwrite to replace it")
        if not _is_run_folder(out):
            raise BadInputError(f"--overwrite refuses to replace {out}: it is not a harden run folder",
                                "choose another --out")
        if stage_dir.exists() and not _is_run_folder(stage_dir):
            raise BadInputError(f"--overwrite: {stage_dir} is in the way and is not a harden run folder",
                                "move it away")

    def create(fingerprint: dict | None = None) -> RunFolder:
        where = stage_dir if replacing else out
        if replacing and where.exists():
            shutil.rmtree(where)  # an earlier replacement that never finished (checked above: a run folder)
        where.mkdir(parents=True)
        state = {"harden_version": __version__, "recipe_sha256": loaded.sha256,
                 "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
        if fingerprint is not None:
            state["inputs"] = fingerprint
        folder = RunFolder(where, state, replaces=out if replacing else None)
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
