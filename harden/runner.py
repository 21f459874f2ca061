"""`harden run`: the stage order, the run folder, and resume. The only module that knows the whole pipeline.

calibrate -> detect -> localize -> prune -> verify -> export (-> push). Each stage reads what earlier stages wrote
in the run folder and writes its own artifact atomically, then marks itself done in run.json; `--resume` skips done
stages, and localization skips prompts whose result file exists, so a killed run continues where it stopped and ends
with the same neurons.json. Every check that can fail on bad input runs before the run folder is created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from . import __version__
from .errors import BadInputError, GateFailedError
from .export import save_tensors_atomic, write_atomic
from .loading import load_pipeline
from .nemo.batching import early_rejection
from .nemo.localize import LocalizeSettings, PromptResult, localize_prompt, union_of
from .nemo.score import NoiseDiffScorer, ScoreSettings, calibrate_threshold, detection_timestep, max_pairwise_scores
from .nemo.stats import NeuronStats, compute_stats, encode_prompts, iter_embeddings, value_activations
from .neurons import NeuronSet
from .prompts import Prompt, load_prompts
from .prune import prune_compact, prune_dense
from .recipe import LoadedRecipe, Recipe
from .targets import resolve_targets

STAGES = ("calibrate", "detect", "localize", "prune", "verify", "export")
FAULT_ENV = "HARDEN_FAULT_KILL_AFTER_PROMPTS"  # tests: SIGKILL this process after N localized prompts
UNBLOCKED_CACHE_BYTES = 1 << 30  # detection saves the unblocked deltas for localization up to this size
UNBLOCKED_FILE = "unblocked.safetensors"


class SilentUI:
    """What the runner reports progress to; the CLI passes a rich implementation."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def log(self, message: str) -> None:
        pass


@dataclass
class Inputs:
    """Everything a run needs, loaded and checked before anything is written."""

    loaded: LoadedRecipe
    memorized: list[Prompt]
    references: list[Prompt]
    held_out: list[Prompt]

    @property
    def recipe(self) -> Recipe:
        return self.loaded.recipe


def load_inputs(loaded: LoadedRecipe) -> Inputs:
    """Prompt lists and cross-section checks; no model is loaded (this is `harden validate`)."""
    r = loaded.recipe
    memorized = load_prompts(r.memorized, loaded.folder, "memorized")
    references = load_prompts(r.reference, loaded.folder, "reference")
    held_out = load_prompts(r.verify.held_out, loaded.folder, "verify.held_out") if r.verify.held_out else []
    if len(references) < 2:
        raise BadInputError("reference: need at least 2 prompts for statistics and tau_mem", "add reference prompts")
    needs = {
        "memorized_ssim_after_max": (any(p.image for p in memorized) and r.verify.generate,
                                     "memorized prompts with reference images and verify.generate: true"),
        "heldout_ssim_median": (bool(held_out) and r.verify.generate, "verify.held_out and verify.generate: true"),
        "heldout_ssim_min": (bool(held_out) and r.verify.generate, "verify.held_out and verify.generate: true"),
        "heldout_clip_drop": (bool(held_out) and r.verify.generate and r.verify.clip_model is not None,
                              "verify.held_out, verify.generate: true and verify.clip_model"),
        "heldout_alignment_drop": (bool(held_out) and r.verify.generate,
                                   "verify.held_out, verify.generate: true and the shipped memorizer model"),
    }
    for gate in r.verify.gates:
        ok, what = needs.get(gate, (True, ""))
        if not ok:
            raise BadInputError(f"gate {gate!r} cannot be measured by this recipe", f"it needs {what}")
    return Inputs(loaded, memorized, references, held_out)


# ------------------------------------------------------------------------------------------------------ run folder


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


# ---------------------------------------------------------------------------------------------------------- stages


@dataclass
class Run:
    inputs: Inputs
    folder: RunFolder
    pipe: object
    model_dir: Path | None
    ui: SilentUI
    targets: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)

    @property
    def recipe(self) -> Recipe:
        return self.inputs.recipe

    def threshold(self, value) -> float:
        if value == "tau_mem":
            return float(self.folder.read_json("calibrate/calibration.json")["tau_mem"])
        return float(value)

    def score_settings(self) -> ScoreSettings:
        """Detection settings; the seed threshold is only known (and only used) once calibration has run."""
        d = self.recipe.detection
        calibrated = self.folder.file("calibrate/calibration.json").exists()
        seed_threshold = self.threshold(d.threshold) if calibrated or d.threshold != "tau_mem" else 1.0
        return ScoreSettings(n_seeds=d.n_seeds, seed=d.seed, num_inference_steps=d.num_inference_steps,
                             timestep_index=d.timestep_index, kernel_size=d.kernel_size, betas=tuple(d.betas),
                             seed_threshold=seed_threshold, factor=self.recipe.localization.factor,
                             max_batch=d.batch_size, fp16_autocast=d.fp16_autocast)

    def scorer(self, unet=None, targets=None) -> NoiseDiffScorer:
        settings = self.score_settings()
        t = detection_timestep(self.pipe.scheduler.config, settings)
        return NoiseDiffScorer(unet if unet is not None else self.pipe.unet,
                               self.targets if targets is None else targets, t, settings)

    def embeds(self, prompts: list[Prompt]) -> torch.Tensor:
        return encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [p.text for p in prompts]).cpu()

    def scores(self, scorer: NoiseDiffScorer, prompts: list[Prompt], advance,
               keep_deltas: list | None = None) -> list[float]:
        """Max pairwise score per prompt, prompts batched by the UNet batch size (deltas kept on the CPU if asked)."""
        per_call = max(1, scorer.settings.max_batch // scorer.settings.n_seeds)
        out: list[float] = []
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start:start + per_call]
            kept: list | None = [] if keep_deltas is not None else None
            out += max_pairwise_scores(scorer, self.embeds(chunk), kept).tolist()
            if keep_deltas is not None:
                keep_deltas.extend(d.cpu() for d in kept)
            advance(len(chunk))
        return out


def stage_calibrate(run: Run) -> None:
    """Per-neuron mean/std over all reference prompts (text encoder + to_v only), tau_mem over the first N."""
    refs = run.inputs.references
    with run.ui.stage("calibrate: statistics", len(refs)) as advance:
        batches = iter_embeddings(run.pipe.tokenizer, run.pipe.text_encoder, [p.text for p in refs],
                                  run.recipe.reference.batch_size)
        stats = compute_stats(batches, run.targets, progress=advance)
    tau_refs = refs[:run.recipe.reference.tau_prompts]
    with run.ui.stage("calibrate: tau_mem", len(tau_refs)) as advance:
        scores = run.scores(run.scorer(), tau_refs, advance)
    tau = calibrate_threshold(torch.tensor(scores))
    save_tensors_atomic(run.folder.file("calibrate", "stats.safetensors"), stats.to_tensors())
    run.folder.write_json("calibrate/calibration.json", {
        "tau_mem": tau, "n_statistics": len(refs), "n_tau": len(tau_refs), "reference_scores": scores,
        "mean": float(torch.tensor(scores).mean()), "std": float(torch.tensor(scores).std()),
    })
    run.ui.log(f"calibrated on {len(refs)} reference prompts; tau_mem = {tau:.4f} (from {len(tau_refs)})")


def stage_detect(run: Run) -> None:
    """NeMo score of every memorized prompt at the detection seeds; memorized when > the detection threshold."""
    prompts = run.inputs.memorized
    threshold = run.threshold(run.recipe.detection.threshold)
    scorer = run.scorer()
    latent = scorer.latents[0].numel() * scorer.settings.n_seeds * 4  # bytes of one prompt's fp32 deltas
    deltas: list | None = [] if latent * len(prompts) <= UNBLOCKED_CACHE_BYTES else None
    with run.ui.stage("detect", len(prompts)) as advance:
        scores = run.scores(scorer, prompts, advance, deltas)
    if deltas is not None:  # localization (also a resumed one) reads these instead of recomputing them per prompt
        save_tensors_atomic(run.folder.file("detect", UNBLOCKED_FILE), {str(i): d for i, d in enumerate(deltas)})
    rows = [{"index": i, "score": s, "memorized": s > threshold} for i, s in enumerate(scores)]
    run.folder.write_json("detect/detection.json", {"threshold": threshold, "prompts": rows})
    n = sum(r["memorized"] for r in rows)
    run.ui.log(f"detected {n} of {len(rows)} prompts as reproducing memorized content (threshold {threshold:.4f})")
    if n < len(rows):
        run.ui.log(f"{len(rows) - n} prompts do not reproduce memorization; they are reported, not localized")


def localize_settings(run: Run) -> LocalizeSettings:
    loc = run.recipe.localization
    return LocalizeSettings(theta_start=loc.theta_start, theta_step=loc.theta_step, theta_min=loc.theta_min,
                            use_theta=loc.use_theta, k_start=loc.k_start, use_top_k=loc.use_top_k, k_max=loc.k_max,
                            tau_initial=run.threshold(loc.tau_initial), tau_refine=run.threshold(loc.tau_refine),
                            rel_threshold=loc.rel_threshold, refine=loc.refine)


def stage_localize(run: Run) -> None:
    """One result file per prompt, saved as soon as it is found; the union is written when all are done.

    In fast mode with `localization.compare`, the same prompts are then localized in exact mode too (files under
    localize/exact/, resumable the same way) and localize/compare.json compares the two; verify measures both."""
    detection = run.folder.read_json("detect/detection.json")["prompts"]
    loc = run.recipe.localization
    wanted = [r["index"] for r in detection if r["memorized"] or not loc.only_detected]
    _localize_all(run, wanted, loc.mode, "prompts", "localize")
    results = load_results(run.folder)
    neurons = union_of([r for _, r in results])
    write_neurons(run.folder.file("localize", "neurons.json"), neurons)
    run.ui.log(f"localized {len(results)} prompts: {len(neurons)} neurons in {len(neurons.layers)} layers")
    if loc.mode == "fast" and loc.compare:
        from .nemo.fast import compare_modes

        _localize_all(run, wanted, "exact", "exact", "localize: exact mode (comparison)")
        exact = load_results(run.folder, "exact")
        exact_neurons = union_of([r for _, r in exact])
        write_neurons(run.folder.file("localize", "exact_neurons.json"), exact_neurons)
        comparison = compare_modes([r for _, r in exact], [r for _, r in results])
        for mode, sub in (("fast", "prompts"), ("exact", "exact")):
            comparison[mode]["seconds"] = run.folder.read_json(f"localize/{sub}_seconds.json")["seconds"]
        comparison["speedup_seconds"] = (comparison["exact"]["seconds"] / comparison["fast"]["seconds"]
                                         if comparison["fast"]["seconds"] else None)
        run.folder.write_json("localize/compare.json", comparison)
        run.ui.log(f"exact mode for comparison: union {len(exact_neurons)} neurons; fast mode's median neurons "
                   f"per prompt is {comparison['neurons_median_ratio'] or 0:.2f}x exact mode's")


def _localize_all(run: Run, wanted: list[int], mode: str, sub: str, label: str) -> None:
    """Localize `wanted` prompts in `mode`, side by side (`pool.run_pooled`); one result file per prompt under
    localize/<sub>/, written as soon as that prompt is done (prompts with a file are skipped)."""
    from .nemo.pool import run_pooled

    stats = NeuronStats.from_tensors(load_file(str(run.folder.file("calibrate", "stats.safetensors"))))
    settings, scorer = localize_settings(run), run.scorer()
    cached = run.folder.file("detect", UNBLOCKED_FILE)
    unblocked = safe_open(str(cached), "pt") if cached.exists() else None
    device = next(scorer.unet.parameters()).device
    early = early_rejection(run.recipe.localization.early_reject, device, mode == "fast")
    localize = _localizer(run, mode, early)
    run.ui.log(f"{label}: {mode} mode on {device.type}, early rejection {'on' if early else 'off'}")
    kill_after = int(os.environ.get(FAULT_ENV, "0"))
    todo = [i for i in wanted if not run.folder.file("localize", sub, f"{i:06d}.json").exists()]
    reading = threading.Lock()  # the text encoder and the cached-deltas file serve one worker at a time

    def job(index: int):
        def search(shared: NoiseDiffScorer) -> tuple[PromptResult, float]:
            started = time.perf_counter()
            with reading:  # inputs are read when the prompt starts, so memory holds only the running prompts'
                prompt = run.inputs.memorized[index]
                embed = run.embeds([prompt])
                acts = {k: v[0] for k, v in value_activations(embed, run.targets).items()}
                deltas = unblocked.get_tensor(str(index)).to(device) if unblocked is not None else None
            result = localize(shared, embed, acts, stats, settings, prompt.text, deltas)
            return result, round(time.perf_counter() - started, 4)
        return search

    wall = f"localize/{sub}_seconds.json"  # wall time of this mode, summed over resumed runs
    spent = run.folder.read_json(wall)["seconds"] if run.folder.file(wall).exists() else 0.0
    started = time.perf_counter()
    with run.ui.stage(label, len(wanted)) as advance:
        advance(len(wanted) - len(todo))
        done_here = 0

        def save(position: int, found: tuple[PromptResult, float]) -> None:
            nonlocal done_here
            index, (result, seconds) = todo[position], found
            run.folder.write_json(f"localize/{sub}/{index:06d}.json",
                                  {"index": index, **result.to_json(), "seconds": seconds, "early_reject": early})
            run.folder.write_json(wall, {"seconds": round(spent + time.perf_counter() - started, 3)})
            advance(1)
            done_here += 1
            if kill_after and done_here >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        loc = run.recipe.localization
        run_pooled(scorer, [job(index) for index in todo], loc.batch_size, loc.parallel_prompts, save)
    run.folder.write_json(wall, {"seconds": round(spent + time.perf_counter() - started, 3)})


def _localizer(run: Run, mode: str, early_reject: bool):
    """localize_prompt (exact, the official algorithm) or localize_prompt_fast (search), with batching."""
    from .nemo.fast import localize_prompt_fast

    loc = run.recipe.localization
    fn = localize_prompt if mode == "exact" else localize_prompt_fast
    return lambda scorer, embed, acts, stats, settings, prompt, unblocked: fn(
        scorer, embed, acts, stats, settings, prompt, loc.speculate, refine_block=loc.refine_block,
        batch_size=loc.batch_size, unblocked=unblocked, early_reject=early_reject)


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


def hardened_unets(run: Run) -> dict[str, torch.nn.Module]:
    """{layout: pruned UNet}, built once per process from neurons.json (pruning is deterministic and cheap)."""
    if "unets" not in run.cache:
        neurons = read_neurons(run.folder.file("localize", "neurons.json"))
        build = {"compact": prune_compact, "dense": prune_dense}
        run.cache["unets"] = {layout: build[layout](run.pipe.unet, neurons) for layout in run.recipe.export.layouts}
    return run.cache["unets"]


def stage_prune(run: Run) -> None:
    neurons = read_neurons(run.folder.file("localize", "neurons.json"))
    unets = hardened_unets(run)
    widths = {t.name: t.width for t in run.targets}
    params = {layout: sum(p.numel() for p in u.parameters()) for layout, u in unets.items()}
    run.folder.write_json("prune/prune.json", {
        "neurons": len(neurons), "per_layer": neurons.counts(), "layer_widths": widths,
        "layouts": list(unets), "parameters_base": sum(p.numel() for p in run.pipe.unet.parameters()),
        "parameters": params,
    })
    run.ui.log(f"pruned {len(neurons)} neurons; UNet parameters {params}")


def stage_verify(run: Run) -> None:
    """Memorization before/after/control at the same seeds, held-out quality, gates -> verify/verification.json."""
    from .verify_stage import verify

    data = verify(run)
    run.folder.write_json("verify/verification.json", data)
    failed = [g["name"] for g in data["gates"] if not g["passed"]]
    run.ui.log(f"verification: {len(data['gates']) - len(failed)} of {len(data['gates'])} gates passed"
               + (f"; failed: {', '.join(failed)}" if failed else ""))


def stage_export(run: Run) -> None:
    from .report import export_all

    export_all(run)


STAGE_FUNCS = {"calibrate": stage_calibrate, "detect": stage_detect, "localize": stage_localize,
               "prune": stage_prune, "verify": stage_verify, "export": stage_export}


def run_recipe(loaded: LoadedRecipe, out: Path, *, resume: bool = False, overwrite: bool = False,
               device: str | None = None, push: bool = True, until: str = "export", neurons: Path | None = None,
               ui: SilentUI | None = None) -> dict:
    """Run the stages up to `until` in `out`; returns a summary. Raises GateFailedError (exit 3) after export when a
    gate failed (the export is kept for inspection but marked failed and never pushed)."""
    ui = ui or SilentUI()
    inputs = load_inputs(loaded)
    given = read_neurons(neurons) if neurons is not None else None
    create = prepare_folder(out, loaded, resume, overwrite)
    pipe, model_dir = load_pipeline(loaded.recipe.model, loaded.folder, device)
    targets = resolve_targets(pipe.unet, loaded.recipe.model.targets)
    if given is not None:
        try:
            given.check_against({t.name: t.width for t in targets})
        except ValueError as err:
            raise BadInputError(f"--neurons: {err}", "the neuron set must come from localizing this model") from None
    folder = create()
    run = Run(inputs, folder, pipe, model_dir, ui, targets)
    if given is not None and not folder.done("localize"):
        write_neurons(folder.file("localize", "neurons.json"), given)
        folder.state["stages"]["localize"] = {"done": True, "seconds": 0.0, "given": str(neurons)}
        folder.save()
    for stage in STAGES[:STAGES.index(until) + 1]:
        if folder.done(stage):
            ui.log(f"{stage}: done in an earlier run, skipped")
            continue
        started = time.perf_counter()
        STAGE_FUNCS[stage](run)
        folder.mark(stage, time.perf_counter() - started)
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


def push_run(run_dir: Path, recipe: Recipe) -> dict:
    """Push the export chosen by the recipe's hub section (compact first when both layouts were exported)."""
    from .hub import push_export

    hub = recipe.hub
    layout = hub.layout or recipe.export.layouts[0]
    return push_export(Path(run_dir) / "export" / layout, hub.repo_id, private=hub.private,
                       create_pr=hub.create_pr, revision=hub.revision)
