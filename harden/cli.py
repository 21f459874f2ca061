"""The `harden` command line: parses arguments, calls the library, turns HardenError into one line + exit code."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import HardenError

app = typer.Typer(help="Harden a diffusion model against regurgitating memorized training images.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
_state = {"debug": False}


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
    _state["debug"] = debug


def fail(err: HardenError):
    """One line on stderr and the error's exit code; the traceback only with --debug."""
    if _state["debug"]:
        raise err
    typer.secho(f"error: {err.one_line()}", err=True, fg="red")
    raise typer.Exit(err.exit_code)


def _quiet_libraries():
    """Library progress bars off: harden reports progress itself."""
    from diffusers.utils import logging as dlog
    from huggingface_hub.utils import disable_progress_bars

    import warnings

    from transformers.utils import logging as tlog

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices are not for our users
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    disable_progress_bars()


@app.command()
def demo(out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the pruned model here.")] = None):
    """Run calibrate -> detect -> localize -> prune on a tiny model with one planted memorization neuron."""
    _quiet_libraries()
    from .demo import run_demo

    try:
        summary = run_demo(out, log=typer.echo)
    except HardenError as err:
        fail(err)
    if not summary["found_planted"] or summary["score_after_pruning"] >= summary["threshold"]:
        typer.secho("error: the planted neuron was not found or pruning did not remove memorization", err=True)
        raise typer.Exit(1)


class RichUI:
    """Progress bars per stage (rich, on stderr) and log lines; library progress bars are switched off."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total)
            yield lambda n=1: progress.advance(task, n)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False)


def _load(recipe: Path):
    from .recipe import load_recipe

    return load_recipe(recipe)


RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML (see recipes/README.md).", show_default=False)]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/<recipe name>).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="Override model.device (cpu, cuda, cuda:1...).")]


def _out(out: Optional[Path], recipe: Path) -> Path:
    return out if out is not None else Path("runs") / recipe.stem


def _run_stages(recipe: Path, out: Optional[Path], until: str, **kwargs) -> dict:
    _quiet_libraries()
    from .runner import run_recipe

    ui = RichUI()
    try:
        summary = run_recipe(_load(recipe), _out(out, recipe), until=until, ui=ui, **kwargs)
    except HardenError as err:
        fail(err)
    return summary


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
def validate(recipe: RecipeArg):
    """Check a recipe (schema, ranges, prompt files, gates) without loading a model."""
    from .runner import load_inputs

    try:
        loaded = _load(recipe)
        inputs = load_inputs(loaded)
        from .recipe import resolve_model_path

        local = resolve_model_path(loaded.recipe.model.id, loaded.folder)
    except HardenError as err:
        fail(err)
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
    _quiet_libraries()
    from .prune_export import prune_to_folder

    try:
        written = prune_to_folder(model, neurons, out, layout, revision, allow_pickle, device)
    except HardenError as err:
        fail(err)
    for path, diff in written.items():
        typer.echo(f"wrote {path} (reload max|diff| {diff:.2e})")


# --- commands registered from other modules ---
from .bench import bench_command; app.command("bench")(bench_command)  # noqa: E402, E702
from .hub import push_command  # noqa: E402

app.command("push")(push_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
