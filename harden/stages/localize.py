"""Stage 3, localize: the memorization neurons of each detected prompt (NeMo), then their union.

One result file per prompt (localize/prompts/NNNNNN.json), saved as soon as it is found, so a killed run resumes
where it stopped; localize/neurons.json is the union. In fast mode with `localization.compare`, exact mode runs too
(localize/exact/) and localize/compare.json compares the two; verify measures both.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from safetensors import safe_open
from safetensors.torch import load_file

from ..nemo.batching import early_rejection
from ..nemo.fast import compare_modes
from ..nemo.localize import PromptResult, localize_with, union_of
from ..nemo.modes import POLICIES
from ..nemo.pool import run_pooled
from ..nemo.score import NoiseDiffScorer
from ..nemo.stats import NeuronStats, value_activations
from .context import Run
from .folder import UNBLOCKED_FILE, load_results, write_neurons

# tests: signal this process once N prompts are localized: "N" sends SIGKILL, "N:INT" / "N:TERM" that signal
FAULT_ENV = "HARDEN_FAULT_KILL_AFTER_PROMPTS"


def localize(run: Run) -> None:
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
    stats = NeuronStats.from_tensors(load_file(str(run.folder.file("calibrate", "stats.safetensors"))))
    settings, scorer = run.localize_settings(), run.scorer()
    cached = run.folder.file("detect", UNBLOCKED_FILE)
    unblocked = safe_open(str(cached), "pt") if cached.exists() else None
    device = next(scorer.unet.parameters()).device
    early = early_rejection(run.recipe.localization.early_reject, device, mode == "fast")
    localize = _localizer(run, mode, early)
    run.ui.log(f"{label}: {mode} mode on {device.type}, early rejection {'on' if early else 'off'}")
    count, _, name = os.environ.get(FAULT_ENV, "0").partition(":")
    kill_after, fault_signal = int(count), getattr(signal, f"SIG{name or 'KILL'}")
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
            if kill_after and done_here == kill_after:
                os.kill(os.getpid(), fault_signal)

        loc = run.recipe.localization
        run_pooled(scorer, [job(index) for index in todo], loc.batch_size, loc.parallel_prompts, save)
    run.folder.write_json(wall, {"seconds": round(spent + time.perf_counter() - started, 3)})


def _localizer(run: Run, mode: str, early_reject: bool):
    """The search of `mode` (exact: the official algorithm; fast: group search), with the recipe's batching."""
    loc = run.recipe.localization
    policy = POLICIES[mode]
    return lambda scorer, embed, acts, stats, settings, prompt, unblocked: localize_with(
        policy, scorer, embed, acts, stats, settings, prompt, loc.speculate, refine_block=loc.refine_block,
        batch_size=loc.batch_size, unblocked=unblocked, early_reject=early_reject)
