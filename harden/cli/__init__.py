"""The `harden` command line: thin commands that parse arguments, call the library and print one-line errors.

One module per command family: this file holds the pipeline commands (run, validate, localize, verify, prune,
selfcheck); push, bench and the others live beside it and are registered below. Commands import the library when
they run (not at start-up), so `harden --help` and argument errors answer without loading torch.
"""

from __future__ import annotations

from . import openmp  # noqa: F401  (first: it sets OMP_WAIT_POLICY before anything loads torch)
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import __version__
from .audit import audit_command
from .bench import bench_command
from .push import push_command
from .scan import scan_command
from .ui import RichUI, failing_as_one_line, quiet_libraries, state

app = typer.Typer(help="Harden a diffusion model against regurgitating memorized training images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool):
    if value:
        typer.echo(f"harden {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    state["debug"] = debug


RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML (see recipes/README.md).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<recipe name>).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="Override model.device (cpu, cuda, cuda:1...).")]


def _out(out: Optional[Path], recipe: Path) -> Path:
    return out if out is not None else Path("runs") / recipe.stem


RESUMABLE = {"export": "run", "localize": "localize"}  # the commands with --resume, by the stage they stop at


def _run_stages(recipe: Path, out: Optional[Path], until: str, **kwargs) -> dict:
    import shlex

    from ..errors import RunInterrupted
    from ..recipe import load_recipe
    from ..runner import run_recipe

    quiet_libraries()
    with failing_as_one_line():
        try:
            return run_recipe(load_recipe(recipe), _out(out, recipe), until=until, ui=RichUI(), **kwargs)
        except RunInterrupted as err:  # say exactly how to continue
            command = RESUMABLE.get(until)
            err.hint = (f"continue with: harden {command} {shlex.quote(str(recipe))} --out "
                        f"{shlex.quote(str(_out(out, recipe)))} {err.resume_flags}" if command else
                        "run the same command again with --overwrite")
            raise


@app.command()
def run(recipe: RecipeArg, out: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
        device: DeviceOpt = None,
        no_push: Annotated[bool, typer.Option("--no-push", help="Do not push even if the recipe has a hub section.")]
        = False):
    """Calibrate, detect, localize, prune, verify and export (then push, if the recipe has a hub section)."""
    summary = _run_stages(recipe, out, "export", resume=resume, overwrite=overwrite, device=device,
                          push=not no_push)
    typer.echo(f"done: {summary['run_dir']}/export (all gates passed)")


@app.command()
def validate(recipe: RecipeArg,
             out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also check that this run folder can "
                                                                              "be written.")] = None,
             device: DeviceOpt = None):
    """Check a recipe without loading a model: schema, ranges, prompt files and images, gates, devices, the model's
    configs (local folder or cached Hub id), the search schedule and, with --out, the run folder (`harden run` runs
    the same checks first)."""
    from ..preflight import preflight
    from ..recipe import load_recipe, resolve_model_path

    with failing_as_one_line():
        loaded = load_recipe(recipe)
        inputs = preflight(loaded, out, device)
        local = resolve_model_path(loaded.recipe.model.id, loaded.folder)
    where = f"local folder {local}" if local else f"Hub id {loaded.recipe.model.id}"
    typer.echo(f"{recipe}: valid; model {where}; {len(inputs.memorized)} memorized, {len(inputs.references)} "
               f"reference, {len(inputs.held_out)} held-out prompts; {len(loaded.recipe.verify.gates)} gates; "
               f"sha256 {loaded.sha256[:12]}")


@app.command()
def localize(recipe: RecipeArg, out: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             device: DeviceOpt = None):
    """Run calibrate, detect and localize only; writes OUT/localize/neurons.json."""
    summary = _run_stages(recipe, out, "localize", resume=resume, overwrite=overwrite, device=device, push=False)
    typer.echo(f"neurons: {summary['run_dir']}/localize/neurons.json")


@app.command()
def verify(recipe: RecipeArg,
           neurons: Annotated[Path, typer.Option("--neurons", help="neurons.json to verify (from harden localize).")],
           out: OutOpt = None, overwrite: OverwriteOpt = False, device: DeviceOpt = None):
    """Verify a given neuron set against the recipe's gates (calibrate, detect, prune, verify); exit 3 on failure."""
    summary = _run_stages(recipe, out, "verify", overwrite=overwrite, device=device, push=False, neurons=neurons)
    typer.echo(f"verification: {summary['run_dir']}/verify/verification.json (all gates passed)")


@app.command()
def prune(model: Annotated[str, typer.Argument(help="Base pipeline: local folder or Hub id.")],
          neurons: Annotated[Path, typer.Option("--neurons", help="neurons.json (from harden localize).")],
          out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist).")],
          layout: Annotated[str, typer.Option(help="compact, dense or both.")] = "compact",
          revision: Annotated[Optional[str], typer.Option(help="Hub revision of the base model.")] = None,
          allow_pickle: Annotated[bool, typer.Option(help="Allow pickle (.bin) weights in the base model.")] = False,
          device: DeviceOpt = None):
    """Remove the given neurons from a pipeline and save it (safetensors; checked by reloading)."""
    from ..stages.prune import prune_to_folder

    quiet_libraries()
    with failing_as_one_line():
        written = prune_to_folder(model, neurons, out, layout, revision, allow_pickle, device)
    for path, diff in written.items():
        typer.echo(f"wrote {path} (reload max|diff| {diff:.2e})")


SelfcheckOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned toy model here.")]


@app.command()
def selfcheck(out: SelfcheckOut = None):
    """Check the core job on a tiny model with one planted neuron (not the demo: see recipes/demo.yaml)."""
    from ..selfcheck import run_selfcheck

    quiet_libraries()
    with failing_as_one_line():
        summary = run_selfcheck(out, log=typer.echo)
    if not summary["found_planted"] or summary["score_after_pruning"] >= summary["threshold"]:
        typer.secho("error: the planted neuron was not found or pruning did not remove memorization", err=True)
        raise typer.Exit(1)


@app.command("demo", hidden=True, deprecated=True)
def demo_alias(out: SelfcheckOut = None):
    """Old name of `harden selfcheck` (kept for one release)."""
    selfcheck(out)


app.command("bench")(bench_command)
app.command("push")(push_command)
app.command("audit")(audit_command)
app.command("scan")(scan_command)
