"""`harden run`: the stage order, resume, and the push. The only module that knows the whole pipeline.

calibrate -> detect -> localize -> prune -> repair -> audit -> verify -> export (-> push). Each stage
(harden.stages.*) reads what earlier stages wrote in the run folder and writes its own artifact atomically, then is
marked done in run.json; `--resume` skips done stages, and localization skips prompts whose result file exists, so a
killed run continues where it stopped and ends with the same neurons.json (repair continues from its last
checkpoint). Every check that can fail on bad input runs before the run folder is created.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from .errors import BadInputError, GateFailedError, RunInterrupted
from .hub import push_export
from .loading import load_pipeline
from .preflight import check_model, input_fingerprint, preflight
from .recipe import LoadedRecipe, Recipe
from .repair.inputs import check_base
from .stages.audit import audit
from .stages.calibrate import calibrate
from .stages.context import Run, SilentUI
from .stages.detect import detect
from .stages.export import export
from .stages.folder import prepare_folder, read_neurons, write_neurons
from .stages.localize import localize
from .stages.prune import prune
from .stages.repair import repair
from .stages.verify import verify
from .targets import resolve_targets

STAGES = {"calibrate": calibrate, "detect": detect, "localize": localize, "prune": prune, "repair": repair,
          "audit": audit, "verify": verify, "export": export}


def run_recipe(loaded: LoadedRecipe, out: Path, *, resume: bool = False, overwrite: bool = False,
               device: str | None = None, push: bool = True, until: str = "export", neurons: Path | None = None,
               ui: SilentUI | None = None) -> dict:
    """Run the stages up to `until` in `out`; returns a summary. Raises GateFailedError (exit 3) after export when a
    gate failed (the export is kept for inspection but marked failed and never pushed)."""
    ui = ui or SilentUI()
    inputs = preflight(loaded, out, device, resume=resume)
    given = read_neurons(neurons) if neurons is not None else None
    create = prepare_folder(out, loaded, resume, overwrite)
    pipe, model_dir = load_pipeline(loaded.recipe.model, loaded.folder, device)
    check_model(loaded.recipe, pipe.unet.config, getattr(getattr(pipe, "vae", None), "config", None),
                pipe.scheduler.config)  # a Hub id's configs are only known now
    targets = resolve_targets(pipe.unet, loaded.recipe.model.targets)
    check_base(loaded.recipe, pipe.unet)
    if given is not None:
        try:
            given.check_against({t.name: t.width for t in targets})
        except ValueError as err:
            raise BadInputError(f"--neurons: {err}", "the neuron set must come from localizing this model") from None
    folder = create(input_fingerprint(inputs, model_dir))
    run = Run(inputs, folder, pipe, model_dir, ui, targets)
    if given is not None and not folder.done("localize"):
        write_neurons(folder.file("localize", "neurons.json"), given)
        folder.state["stages"]["localize"] = {"done": True, "seconds": 0.0, "given": str(neurons)}
        folder.save()
    names = list(STAGES)
    _run_stages(run, names[:names.index(until) + 1], fresh=not resume)
    folder.finish()  # an --overwrite run replaces the previous one only now
    summary = {"run_dir": str(folder.path), "stages": folder.state["stages"]}
    if folder.file("verify", "verification.json").exists():
        verification = folder.read_json("verify/verification.json")
        summary["passed"] = verification["passed"]
        summary["gates"] = verification["gates"]
        if not verification["passed"]:
            failed = [g for g in verification["gates"] if not g["passed"]]
            g = failed[0]
            raise GateFailedError(
                f"{len(failed)} gate(s) failed, first: {g['name']} = {g['value']} (needs {g['op']} "
                f"{g['threshold']:.4g}); nothing was pushed",
                f"see {folder.file('verify', 'verification.json')}")
    if until == "export" and push and loaded.recipe.hub is not None:
        summary["push"] = push_run(folder.path, loaded.recipe)
        ui.log(f"pushed to {loaded.recipe.hub.repo_id}: {summary['push']}")
    return summary


# tests: signal this process once a stage is marked done: "localize" sends SIGKILL, "localize:INT" that signal
STAGE_FAULT_ENV = "HARDEN_FAULT_KILL_AFTER_STAGE"


def _run_stages(run: Run, stages: list[str], fresh: bool) -> None:
    """Each stage not done yet, marked done as it ends. Ctrl-C or SIGTERM (`errors.Terminated`) becomes
    RunInterrupted (exit 130 / 143) naming what is saved; a run that failed before finishing any stage leaves
    nothing behind (its folder was made by this process and holds no result)."""
    folder, ui = run.folder, run.ui
    stage = stages[0]
    try:
        for stage in stages:
            if folder.done(stage):
                ui.log(f"{stage}: done in an earlier run, skipped")
                continue
            started = time.perf_counter()
            STAGES[stage](run)
            folder.mark(stage, time.perf_counter() - started)
            fault, _, name = os.environ.get(STAGE_FAULT_ENV, "").partition(":")
            if fault == stage:
                os.kill(os.getpid(), getattr(signal, f"SIG{name or 'KILL'}"))
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        flags = "--resume --overwrite" if folder.replaces else "--resume"
        raise RunInterrupted(
            f"{signal.Signals(signum).name} stopped the run during {stage}; finished stages and localized prompts "
            f"are saved in {folder.path}",
            f"continue it with the same command and {flags}", signum, flags) from None
    except BaseException:
        if fresh and not any(s.get("done") for s in folder.state["stages"].values()):
            shutil.rmtree(folder.path, ignore_errors=True)  # made by this process; no result in it
        raise


def push_run(run_dir: Path, recipe: Recipe) -> dict:
    """Push the export chosen by the recipe's hub section (compact first when both layouts were exported)."""
    hub = recipe.hub
    layout = hub.layout or recipe.export.layouts[0]
    return push_export(Path(run_dir) / "export" / layout, hub.repo_id, private=hub.private,
                       create_pr=hub.create_pr, revision=hub.revision)
