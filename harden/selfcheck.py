"""`harden selfcheck`: the core job on a tiny model with one planted memorization neuron, in seconds on a CPU.

Why, next to the real demo (`harden run recipes/demo.yaml` on the shipped memorizer): a check with a known answer.
Calibration, detection, localization and both pruning layouts must find the one planted neuron, and pruning it must
bring the prompt's memorization score below the threshold; an installation that fails this is broken.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import BadInputError
from .checkpoint import save_pipeline
from .files import atomic_folder
from .nemo.localize import LocalizeSettings, localize_prompt
from .nemo.score import (
    NoiseDiffScorer,
    ScoreSettings,
    calibrate_threshold,
    detection_timestep,
    max_pairwise_scores,
)
from .nemo.stats import (
    compute_stats,
    encode_prompts,
    iter_embeddings,
    value_activations,
)
from .neurons import NeuronSet
from .prune import prune_compact, prune_dense
from .targets import resolve_targets
from .tiny import HELD_OUT, MEMORIZED, REFERENCES, plant_memorization, tiny_pipeline


def run_selfcheck(out: Path | None, log=print) -> dict:
    """Build, calibrate, detect, localize, prune; write neurons.json, summary.json and both layouts to `out`."""
    if out is not None and out.exists():  # refuse before any work, so nothing is half-written
        raise BadInputError(f"output folder {out} already exists", "choose another --out or delete it")
    torch.manual_seed(0)
    started = time.perf_counter()
    pipe = tiny_pipeline(sample_size=32)
    planted = plant_memorization(pipe, MEMORIZED, REFERENCES)
    targets = resolve_targets(pipe.unet)
    settings = ScoreSettings(kernel_size=7)  # 32x32 latents are too small for the official 11-pixel window
    scorer = NoiseDiffScorer(pipe.unet, targets, detection_timestep(pipe.scheduler.config, settings), settings)

    stats = compute_stats(iter_embeddings(pipe.tokenizer, pipe.text_encoder, REFERENCES, 8), targets)
    ref_scores = max_pairwise_scores(scorer, encode_prompts(pipe.tokenizer, pipe.text_encoder, REFERENCES))
    tau = calibrate_threshold(ref_scores)
    threshold = settings.seed_threshold
    log(f"calibrated on {len(REFERENCES)} reference prompts: tau_mem (mean + 1 std) = {tau:.3f}; "
        f"detection and localization use NeMo's default threshold {threshold}")

    prompts = [MEMORIZED, *HELD_OUT]
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    scores = max_pairwise_scores(scorer, embeds)
    for p, s in zip(prompts, scores.tolist()):
        log(f"detect  score {s:.3f} {'memorized' if s > threshold else 'not memorized':14s} {p}")

    loc = LocalizeSettings(tau_initial=threshold, tau_refine=threshold)
    acts = value_activations(embeds[:1], targets)
    result = localize_prompt(scorer, embeds[:1], {k: v[0] for k, v in acts.items()}, stats, loc, MEMORIZED)
    log(f"localize {result.refined.to_json()} score {result.refined_score:.3f} "
        f"({result.unet_forwards} UNet forwards, {result.sample_forwards} sample-forwards)")

    neurons = result.refined
    compact, dense = prune_compact(pipe.unet, neurons), prune_dense(pipe.unet, neurons)
    unmasked = NoiseDiffScorer(compact, [], scorer.timestep, scorer.settings)  # nothing is masked after pruning
    after = max_pairwise_scores(unmasked, embeds[:1])
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_dense = dense(x, scorer.timestep, encoder_hidden_states=embeds[1:3]).sample
        y_compact = compact(x, scorer.timestep, encoder_hidden_states=embeds[1:3]).sample
    summary = {
        "planted": {"layer": planted, "neuron": 5}, "tau_mem": tau, "found": neurons.to_json(),
        "found_planted": neurons == NeuronSet({planted: (5,)}),
        "score_before": float(scores[0]), "score_after_pruning": float(after[0]), "threshold": threshold,
        "held_out_scores": scores[1:].tolist(), "unet_forwards": result.unet_forwards,
        "max_abs_diff_dense_vs_compact": float((y_dense - y_compact).abs().max()),
        "seconds": round(time.perf_counter() - started, 2),
    }
    log(f"pruned: score {summary['score_before']:.3f} -> {summary['score_after_pruning']:.3f}; "
        f"dense vs compact max|diff| {summary['max_abs_diff_dense_vs_compact']:.2e}")
    if out is not None:
        _write(out, pipe, compact, dense, result, summary)
        log(f"wrote {out}")
    return summary


def _write(out: Path, pipe, compact, dense, result, summary) -> None:
    """Both layouts, neurons.json and summary.json, in a temporary sibling folder renamed into place at the end."""
    with atomic_folder(out) as tmp:
        save_pipeline(pipe, dense, tmp / "dense", "dense")
        save_pipeline(pipe, compact, tmp / "compact", "compact")
        (tmp / "neurons.json").write_text(json.dumps({result.prompt: result.to_json()}, indent=2))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
