"""Workloads for `harden bench`: localization in the official order, exact mode and fast mode, timed in one run.

Why one run: the machine (and on CPU, whoever else uses it) changes between runs, so each mode's speed-up is only
meaningful against a reference measured in the same process on the same prompts. Forward counts are printed next to
wall times because they are deterministic: they are what the tests check, timings are what a user wants.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .audit.attack import embedding_attack, encode_images
from .audit.targets import fit, read_image
from .errors import BadInputError
from .nemo.batching import early_rejection
from .nemo.conditioning import encode
from .nemo.fast import compare_modes, localize_prompt_fast
from .nemo.localize import LocalizeSettings, PromptResult, localize_prompt, ood_candidates, schedule
from .nemo.pool import pool_workers, run_pooled
from .nemo.reference import reference_localize_prompt
from .nemo.score import (NoiseDiffScorer, ScoreSettings, calibrate_threshold, detection_timestep,
                         max_pairwise_scores)
from .nemo.stats import NeuronStats, compute_stats, encode_prompts, iter_embeddings, value_activations
from .scan.scores import CaptionScorer, ScanSettings
from .targets import Target, latent_size as native_latent_size, resolve_targets
from .tiny import HELD_OUT, MEMORIZED, REFERENCES, byte_tokenizer, plant_memorization, planted_neuron, tiny_pipeline
from .zoo.folder import caption_rows

MEMORIZER = Path(__file__).parent / "zoo" / "memorizer"
MODES = ("reference", "exact", "fast")
CROSS_ATTENTION_GAIN = 10.0
PLANT_OUT_GAIN = 100.0  # norm of a planted neuron's to_out column (harden.tiny's planted model uses the same)
SD14 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            layers_per_block=2)  # SD v1.4's UNet config (diffusers' defaults give its block types)


@dataclass
class Workload:
    """What is localized: a scorer over the model, statistics, and per prompt (text, embedding, acts, settings)."""

    name: str
    scorer_settings: ScoreSettings
    unet: torch.nn.Module
    timestep: int
    stats: NeuronStats
    prompts: list[tuple[str, torch.Tensor, dict[str, torch.Tensor], LocalizeSettings]]
    notes: list[str]
    setup_seconds: dict[str, float]

    def scorer(self) -> NoiseDiffScorer:
        return NoiseDiffScorer(self.unet, resolve_targets(self.unet), self.timestep, self.scorer_settings)


def kernel_for(size: int) -> int:
    """The official 11-pixel MS-SSIM window, or the largest odd one that 3 scales allow on smaller latents."""
    k = 11
    while k > 3 and (k - 1) * 4 >= size:
        k -= 2
    return k


def _acts(embed: torch.Tensor, targets) -> dict[str, torch.Tensor]:
    return {k: v[0] for k, v in value_activations(embed, targets).items()}


def _timed(seconds: dict, name: str, fn: Callable):
    start = time.perf_counter()
    out = fn()
    seconds[name] = round(time.perf_counter() - start, 3)
    return out


def _pipeline_workload(name: str, pipe, memorized: list[str], references: list[str], seeds: int, device,
                       seconds: dict, notes: list[str], settings: ScoreSettings | None = None,
                       tau_prompts: int = 0) -> Workload:
    """A real pipeline: statistics from the reference captions; NeMo's default thresholds, or with `tau_prompts`
    the calibrated tau_mem (mean + 1 std over that many references) for the seed filter and both search tests."""
    if len(references) < 2:
        raise BadInputError(f"{name}: need at least 2 reference prompts for the statistics, got {len(references)}")
    unet = pipe.unet.to(device).eval()
    pipe.text_encoder.to(device)
    targets = resolve_targets(unet)
    settings = settings or ScoreSettings(n_seeds=seeds, kernel_size=kernel_for(min(native_latent_size(unet))))
    timestep = detection_timestep(pipe.scheduler.config, settings)
    stats = _timed(seconds, "calibration", lambda: compute_stats(
        iter_embeddings(pipe.tokenizer, pipe.text_encoder, references, 64), targets))
    loc = LocalizeSettings()
    if tau_prompts:
        probe = NoiseDiffScorer(unet, targets, timestep, settings)  # not counted: calibration is not localization
        tau = _timed(seconds, "tau_mem", lambda: calibrate_threshold(max_pairwise_scores(
            probe, encode_prompts(pipe.tokenizer, pipe.text_encoder, references[:tau_prompts]))))
        settings = replace(settings, seed_threshold=tau)
        loc = LocalizeSettings(tau_initial=tau, tau_refine=tau)
        notes.append(f"tau_mem {tau:.4f} (mean + 1 std over {min(tau_prompts, len(references))} references) for the "
                     "seed filter, initial selection and refinement")
    embeds = _timed(seconds, "embeddings", lambda: encode_prompts(pipe.tokenizer, pipe.text_encoder, memorized))
    prompts = [(p, embeds[i:i + 1], _acts(embeds[i:i + 1], targets), loc) for i, p in enumerate(memorized)]
    return Workload(name, settings, unet, timestep, stats, prompts, notes, seconds)


def memorizer_workload(folder: Path, n_prompts: int, seeds: int, device) -> Workload:
    """The shipped memorizing model: its memorized captions, statistics from its ordinary captions."""
    if not (folder / "model_index.json").exists():
        raise BadInputError(f"no model at {folder} (model_index.json missing)",
                            "use --model planted or --model sd14-random, or --model-dir PATH")
    from diffusers import StableDiffusionPipeline

    seconds: dict[str, float] = {}
    pipe = _timed(seconds, "load", lambda: StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    rows = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines() if line.strip()]
    memorized = [r["caption"] for r in rows if r.get("memorized")]
    references = [r["caption"] for r in rows if not r.get("memorized")]
    memorized = memorized[:n_prompts] if n_prompts else memorized
    config = json.loads((folder / "harden_zoo.json").read_text()) if (folder / "harden_zoo.json").exists() else {}
    settings = None
    if "betas" in config:  # the organism's own MS-SSIM (16x16 latents: 2 scales), as recipes/demo.yaml uses it
        settings = ScoreSettings(n_seeds=seeds, kernel_size=config["kernel_size"], betas=tuple(config["betas"]))
    return _pipeline_workload(f"memorizer ({folder})", pipe, memorized, references, seeds, device, seconds, [],
                              settings, tau_prompts=40)


def planted_workload(n_prompts: int, seeds: int, device) -> Workload:
    """harden.tiny's pipeline with one planted memorization neuron; the memorized prompt, then held-out ones."""

    seconds: dict[str, float] = {}
    pipe = _timed(seconds, "load", lambda: tiny_pipeline(sample_size=32))
    plant_memorization(pipe, MEMORIZED, REFERENCES)
    prompts = [MEMORIZED, *HELD_OUT]
    prompts = prompts[:n_prompts] if n_prompts else prompts
    return _pipeline_workload("planted (tiny SD-v1 topology, 32x32 latents)", pipe, prompts, REFERENCES, seeds,
                              device, seconds, [])


def forced_settings(scorer: NoiseDiffScorer, embed: torch.Tensor, acts: dict[str, torch.Tensor],
                    stats: NeuronStats, iterations: int, pass_fraction: float = 0.75,
                    base: LocalizeSettings = LocalizeSettings(use_theta=False)) -> LocalizeSettings:
    """Thresholds that force a given search path on a model that memorizes nothing (all seeds must be kept).

    A probe (its own scorer, so its forwards are not counted) scores the first `iterations` schedule steps and the
    single drops of the last one. tau_initial is set so that the search passes at step `iterations` (the sets grow
    with k, so earlier steps score higher), tau_refine so that about `pass_fraction` of single drops would pass on
    their own: a VM-like refinement where most initial neurons are removed, greedily fewer as the set shrinks.
    Thresholds sit half-way between probe scores, so float noise between batch layouts cannot flip a decision.
    """
    probe = NoiseDiffScorer(scorer.unet, scorer.targets, scorer.timestep, scorer.settings)
    kept = torch.arange(probe.settings.n_seeds)
    reference = probe.unblocked(embed)
    steps = schedule(replace(base, k_max=max(base.k_max, iterations + 1)))[:iterations]
    cands = [ood_candidates(acts, stats, theta, k) for theta, k in steps]
    initial_scores = [float(s.max()) for s in probe.blocked_scores(embed, kept, reference, cands)]
    last = initial_scores[-1]
    above = min((s for s in initial_scores[:-1] if s > last), default=1.0)
    singles = [{**cands[-1], layer: [x for j, x in enumerate(idx) if j != i]}
               for layer, idx in cands[-1].items() for i in range(len(idx))]
    if not singles:
        raise BadInputError(f"the forced path has no neurons after {iterations} iterations", "use more --iterations")
    drops = sorted(float(s.max()) for s in probe.blocked_scores(embed, kept, reference, singles)) + [1.0]
    target = round(pass_fraction * (len(drops) - 1))
    window = range(max(1, target - len(drops) // 4), min(len(drops), target + len(drops) // 4 + 1))
    cut = max(window, key=lambda i: drops[i] - drops[i - 1])  # the widest gap near the wanted fraction
    return replace(base, tau_initial=(last + above) / 2, tau_refine=(drops[cut - 1] + drops[cut]) / 2,
                   k_max=max(base.k_max, iterations + 1))


@torch.no_grad()
def amplify_cross_attention(targets, gain: float = CROSS_ATTENTION_GAIN) -> None:
    """Scale each target's `to_out`: with random weights the text barely reaches the output (blocked and unblocked
    scores agree to 1e-5, inside float noise), so forced thresholds would sit in noise. Cost is unchanged."""
    for t in targets:
        t.to_out.weight *= gain


@torch.no_grad()
def plant_value_neurons(targets, embed: torch.Tensor, refs: torch.Tensor, channels: dict[str, int],
                        out_gain: float = PLANT_OUT_GAIN) -> None:
    """Wire one value neuron in each named layer to fire for `embed` [1, tokens, dim] and to matter.

    Why: in a random SD-sized UNet one value channel carries about 1/320 of its layer's signal, so dropping any one
    from a blocked set moves the score by 1e-5 to 5e-5, inside fast mode's 1e-4 margin from its threshold (it then
    keeps its initial set). A planted neuron (to_v row C_ref^-1 m, as `harden.tiny.plant_memorization`: it fires
    far more for this prompt than for the references, so top-k selects it; a large to_out column) moves the score
    far more when it is dropped, and the forced thresholds fall in the gap between planted and other drops.
    """

    g = torch.Generator().manual_seed(3)
    for t in targets:
        if t.name not in channels:
            continue
        row, column = planted_neuron(refs, embed[0], t.to_out.out_features, out_gain, g)
        t.to_v.weight[channels[t.name]] = row.to(t.to_v.weight)
        t.to_out.weight[:, channels[t.name]] = column.to(t.to_out.weight)


def sd14_workload(n_prompts: int, seeds: int, latent_size: int, iterations: int, device) -> Workload:
    """An SD-v1.4-shaped UNet with random weights, random CLIP-sized embeddings and the forced search path."""
    from diffusers import UNet2DConditionModel

    seconds: dict[str, float] = {}
    torch.manual_seed(0)
    unet = _timed(seconds, "load", lambda: UNet2DConditionModel(sample_size=latent_size, **SD14).to(device).eval())
    targets = resolve_targets(unet)
    amplify_cross_attention(targets)
    settings = ScoreSettings(n_seeds=seeds, kernel_size=kernel_for(latent_size), seed_threshold=-1.0)
    g = torch.Generator().manual_seed(1)
    refs = torch.randn(64, 77, 768, generator=g)
    embeds = [torch.randn(1, 77, 768, generator=g) for _ in range(n_prompts or 1)]
    for embed in embeds:  # every other layer, a random channel: about 1 in 4 of the forced initial sets
        planted = {t.name: int(torch.randint(t.width, (1,), generator=g)) for t in targets[::2]}
        plant_value_neurons(targets, embed, refs, planted)  # CPU math, written into the weights on `device`
    stats = _timed(seconds, "calibration", lambda: compute_stats(iter(refs.split(16)), targets))
    scorer = NoiseDiffScorer(unet, targets, 961, settings)
    prompts = []
    start = time.perf_counter()
    for i, embed in enumerate(embeds):
        acts = _acts(embed, targets)
        prompts.append((f"random prompt {i}", embed, acts, forced_settings(scorer, embed, acts, stats, iterations)))
    seconds["probe_thresholds"] = round(time.perf_counter() - start, 3)
    notes = [f"SD-v1.4-shaped UNet, random weights, {latent_size}x{latent_size} latents, {seeds} seeds all kept, "
             f"forced path: {iterations} initial iterations (top-k only), tau_refine set so ~75% of single drops pass, "
             f"cross-attention outputs x{CROSS_ATTENTION_GAIN:g}, one value neuron planted per prompt in every other "
             f"layer (to_out column norm {PLANT_OUT_GAIN:g}) so that blocking matters beyond float noise"]
    return Workload("sd14-random", settings, unet, 961, stats, prompts, notes, seconds)


LOCALIZERS = {"reference": reference_localize_prompt, "exact": localize_prompt, "fast": localize_prompt_fast}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the process peak so far


def run_modes(work: Workload, modes=MODES, batch_size: int | None = None, refine_block: int | None = None,
              speculate: int | None = None, log=print, early_reject: bool | None = None,
              parallel_prompts: int | None = None) -> dict:
    """Localize every prompt in each mode; per prompt and total forwards, seconds, peak memory; speed-ups.

    Per-prompt seconds run from a prompt's start to its end; in exact and fast mode prompts overlap, so only the
    total is a cost. Totals are the scorer's own forward counts (a shared forward counts once)."""
    device = next(work.unet.parameters()).device
    out: dict = {"modes": {}}
    results: dict[str, list[PromptResult]] = {}
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        scorer = work.scorer()
        early = early_rejection(early_reject, device, mode == "fast") if mode != "reference" else False
        kwargs = {} if mode == "reference" else dict(batch_size=batch_size, refine_block=refine_block,
                                                     speculate=speculate, early_reject=early)
        def job(text, embed, acts, loc):
            def search(shared: NoiseDiffScorer):
                t0 = time.perf_counter()
                r = LOCALIZERS[mode](shared, embed, acts, work.stats, loc, text, **kwargs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return r, time.perf_counter() - t0
            return search

        def done(i: int, found: tuple[PromptResult, float]) -> None:
            (r, seconds), text = found, work.prompts[i][0]
            rows[i] = {"prompt": text, "memorized": r.memorized, "neurons": len(r.refined),
                       "neuron_set": r.refined.to_json(), "score": r.refined_score, "tau_refine": r.tau_refine,
                       "iterations": r.iterations, "unet_forwards": r.unet_forwards,
                       "sample_forwards": r.sample_forwards, "tie_checks": r.tie_checks, "tie_shift": r.tie_shift,
                       "seconds": round(seconds, 3)}
            log(f"  {mode:9s} {text[:40]:40s} neurons {len(r.refined):4d}  score {r.refined_score:.4f}  "
                f"forwards {r.unet_forwards:5d}  samples {r.sample_forwards:6d}  {seconds:8.2f} s")

        rows: list = [None] * len(work.prompts)
        jobs = [job(*p) for p in work.prompts]
        start, cpu_start = time.perf_counter(), time.process_time()
        # the official order searches one prompt at a time; exact and fast mode search prompts side by side
        found = run_pooled(scorer, jobs, batch_size, 1 if mode == "reference" else parallel_prompts, done)
        results[mode] = [r for r, _ in found]
        seconds, samples = time.perf_counter() - start, max(1, scorer.counter.sample_forwards)
        total = {"unet_forwards": scorer.counter.unet_forwards, "sample_forwards": scorer.counter.sample_forwards,
                 "seconds": round(seconds, 3), "peak_memory_mb": round(_peak_memory_mb(device), 1),
                 # where the time goes: inside UNet forwards, and the rest (MS-SSIM, search logic, thread hand-offs)
                 "forward_seconds": round(scorer.counter.forward_seconds, 3),
                 "ms_per_sample": round(1000 * seconds / samples, 3),
                 "forward_ms_per_sample": round(1000 * scorer.counter.forward_seconds / samples, 3),
                 "cpu_seconds": round(time.process_time() - cpu_start, 3),  # all threads, spinning included
                 "cpu_ms_per_sample": round(1000 * (time.process_time() - cpu_start) / samples, 3),
                 "load_average": round(os.getloadavg()[0], 2),  # > cores: other processes shared the CPU
                 "parallel_prompts": 1 if mode == "reference" else
                 pool_workers(scorer, len(jobs), batch_size, parallel_prompts),
                 "tie_checks": sum(r.tie_checks for r in results[mode]),
                 "tie_shift_max": max((r.tie_shift for r in results[mode]), default=0.0), "early_reject": early}
        out["modes"][mode] = {"prompts": rows, "total": total}
        log(f"{mode:9s} total: {total['unet_forwards']} UNet forwards, {total['sample_forwards']} sample-forwards, "
            f"{total['seconds']:.2f} s ({total['forward_seconds']:.2f} s in forwards; {total['ms_per_sample']:.2f} "
            f"ms per sample, {total['forward_ms_per_sample']:.2f} in forwards; CPU {total['cpu_seconds']:.2f} s), "
            f"peak memory {total['peak_memory_mb']:.0f} MiB, "
            f"{total['parallel_prompts']} prompts at a time, early rejection {'on' if early else 'off'}, "
            f"{total['tie_checks']} ties re-scored in the official layout (largest shift {total['tie_shift_max']:.1e})")
    if "reference" in results:
        ref = out["modes"]["reference"]["total"]
        out["speedup"] = {}
        for mode in modes:
            if mode == "reference":
                continue
            t = out["modes"][mode]["total"]
            sp = {"wall": ref["seconds"] / max(t["seconds"], 1e-9),
                  "unet_forwards": ref["unet_forwards"] / max(1, t["unet_forwards"]),
                  "sample_forwards": ref["sample_forwards"] / max(1, t["sample_forwards"])}
            out["speedup"][mode] = sp
            log(f"{mode:9s} speed-up {sp['wall']:.2f}  (UNet forwards {sp['unet_forwards']:.2f}x fewer, "
                f"sample-forwards {sp['sample_forwards']:.2f}x fewer)")
        if "exact" in results:
            same = all(a.refined == b.refined and a.initial == b.initial for a, b in
                       zip(results["reference"], results["exact"]))
            diff = max((abs(a.refined_score - b.refined_score) for a, b in
                        zip(results["reference"], results["exact"])), default=0.0)
            out["exact_equals_reference"] = {"same_sets": same, "max_score_diff": diff}
            log(f"exact vs reference: same neuron sets {'yes' if same else 'NO'}, max score difference {diff:.2e}")
    if "exact" in results and "fast" in results:
        cmp = compare_modes(results["exact"], results["fast"])
        out["compare"] = cmp
        log(f"fast vs exact: neurons per prompt median {cmp['fast']['neurons_median']} vs "
            f"{cmp['exact']['neurons_median']}, max {cmp['fast']['neurons_max']} vs {cmp['exact']['neurons_max']}; "
            f"below threshold {cmp['fast']['below_threshold']}/{cmp['prompts']} vs "
            f"{cmp['exact']['below_threshold']}/{cmp['prompts']}; identical sets {cmp['same_sets']}/{cmp['prompts']}")
    return out


def repeat_modes(work: Workload, modes=MODES, repeat: int = 3, log=print, **kwargs) -> dict:
    """`run_modes` `repeat` times, interleaved: round r runs every mode, in an order rotated by r, so that a slow
    spell of a shared machine hits all modes alike. Returns the first round's result plus `repeat`: per mode its
    seconds and ms per sample in each round, and per mode the speed-up of each round over the official order
    (same round), with their median and spread, so that one noisy run cannot decide a claim."""
    modes = list(modes)
    rounds = []
    for r in range(repeat):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        log(f"round {r + 1} of {repeat}: {', '.join(order)}")
        rounds.append(run_modes(work, order, log=log, **kwargs))
    out = dict(rounds[0])
    per_mode = {m: [rd["modes"][m]["total"] for rd in rounds] for m in modes}
    summary: dict = {"rounds": repeat, "modes": {}, "speedup": {}}
    for mode, totals in per_mode.items():
        summary["modes"][mode] = {
            "seconds": [t["seconds"] for t in totals], "ms_per_sample": [t["ms_per_sample"] for t in totals],
            "forward_ms_per_sample": [t["forward_ms_per_sample"] for t in totals],
            "cpu_ms_per_sample": [t["cpu_ms_per_sample"] for t in totals],
            "median_ms_per_sample": statistics.median(t["ms_per_sample"] for t in totals),
            # forward counts are deterministic: the same in every round, or the rounds did different work
            "same_counts": len({(t["unet_forwards"], t["sample_forwards"]) for t in totals}) == 1}
    if "reference" in per_mode:
        for mode in modes:
            if mode == "reference":
                continue
            pairs = list(zip(per_mode["reference"], per_mode[mode]))
            ratios = [r["seconds"] / max(m["seconds"], 1e-9) for r, m in pairs]
            # per-sample cost against the official order's in the same round (> 1: a pooled sample costs more)
            cost = [m["ms_per_sample"] / max(r["ms_per_sample"], 1e-9) for r, m in pairs]
            cpu_cost = [m["cpu_ms_per_sample"] / max(r["cpu_ms_per_sample"], 1e-9) for r, m in pairs]
            sp = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios,
                  "sample_cost_vs_reference": statistics.median(cost),
                  "cpu_sample_cost_vs_reference": statistics.median(cpu_cost)}
            summary["speedup"][mode] = sp
            log(f"{mode:9s} speed-up over {repeat} interleaved rounds: median {sp['median']:.2f}x (min "
                f"{sp['min']:.2f}, max {sp['max']:.2f}); a sample costs {sp['sample_cost_vs_reference']:.2f}x the "
                f"official order's (CPU time {sp['cpu_sample_cost_vs_reference']:.2f}x), median of rounds")
    out["repeat"] = summary
    return out


class _ValueOnly(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.to_v = torch.nn.Linear(768, width, bias=False)


def calibration_throughput(n_prompts: int, device, batch_size: int = 256, log=print) -> dict:
    """Prompts/s of the statistics pass with a CLIP-L-sized text encoder (random weights) and SD v1.4's 7 to_v.

    Only the text encoder and the value projections run (no UNet), as in `compute_stats`; fp16 autocast on CUDA.
    """
    from transformers import CLIPTextConfig, CLIPTextModel


    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                            num_hidden_layers=12, max_position_embeddings=77, projection_dim=768,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    encoder = CLIPTextModel(config).to(device).eval()
    targets = [Target(f"layer{i}", _ValueOnly(w).to(device)) for i, w in enumerate((320, 320, 640, 640, 1280, 1280,
                                                                                    1280))]
    prompts = [f"a photo of item {i} in style {i % 97}, detailed, trending" for i in range(n_prompts)]
    autocast = (torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    start = time.perf_counter()
    with autocast:
        compute_stats(iter_embeddings(tokenizer, encoder, prompts, batch_size), targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    rate = n_prompts / seconds
    out = {"prompts": n_prompts, "seconds": round(seconds, 3), "prompts_per_s": round(rate, 1),
           "seconds_for_50000": round(50000 / rate, 1)}
    log(f"calibration: {n_prompts} prompts in {seconds:.2f} s = {rate:.0f} prompts/s "
        f"(50,000 prompts: {out['seconds_for_50000']:.0f} s) - CLIP-L-sized text encoder, random weights")
    return out


def attack_throughput(folder: Path, n_prompts: int = 0, steps: int = 10, batch: int = 8, device=None,
                      log=print) -> dict:
    """The audit's embedding attack on the memorizer's memorized images: all prompts in shared forwards vs one
    prompt at a time, samples/s (samples = embeddings x batch x steps), in one run, with the same draws (each
    prompt's own generator), so both must also end at the same embeddings (max |difference| reported)."""
    from diffusers import DiffusionPipeline

    device = torch.device(device or "cpu")
    pipe = DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True).to(device)
    rows = [r for r in caption_rows(folder) if r["memorized"]]
    rows = rows[:n_prompts] if n_prompts else rows
    side = [n * pipe.vae_scale_factor for n in native_latent_size(pipe.unet)]
    latents = encode_images(pipe.vae, [fit(read_image(folder / r["image"], "bench"), side)[0] for r in rows])
    starts = encode_prompts(pipe.tokenizer, pipe.text_encoder, [r["caption"] for r in rows])
    n = len(rows)

    def gens(indices):
        return [torch.Generator().manual_seed(1000 + i) for i in indices]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    attack = dict(steps=steps, lr=0.1, batch=batch)
    embedding_attack(pipe.unet, pipe.scheduler, latents[:1], starts[:1], **{**attack, "steps": 1},
                     generator=gens([0]))  # warm-up (first-call allocations) outside both timings
    batched, t_batched = timed(lambda: embedding_attack(pipe.unet, pipe.scheduler, latents, starts, **attack,
                                                        generator=gens(range(n)))[0])
    single, t_single = timed(lambda: torch.cat([embedding_attack(pipe.unet, pipe.scheduler, latents[i:i + 1],
                                                                 starts[i:i + 1], **attack,
                                                                 generator=gens([i]))[0] for i in range(n)]))
    samples = n * batch * steps
    out = {"prompts": n, "steps": steps, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
           "batched": {"seconds": round(t_batched, 3), "samples_per_s": round(samples / t_batched, 2),
                       "samples_per_forward": n * batch},
           "one_at_a_time": {"seconds": round(t_single, 3), "samples_per_s": round(samples / t_single, 2),
                             "samples_per_forward": batch},
           "speedup": round(t_single / t_batched, 3),
           "max_abs_diff": float((batched.cpu() - single.cpu()).abs().max())}
    log(f"attack one prompt at a time: {out['one_at_a_time']['samples_per_s']:.1f} samples/s "
        f"({t_single:.2f} s, {batch} samples per forward)")
    log(f"attack batched:              {out['batched']['samples_per_s']:.1f} samples/s "
        f"({t_batched:.2f} s, {n * batch} samples per forward)")
    log(f"audit speed-up {out['speedup']:.2f}x ({n} prompts, {steps} Adam steps, batch {batch}, "
        f"{out['threads']} threads); batched vs one-at-a-time embeddings max|diff| {out['max_abs_diff']:.1e}")
    return out


def memorizer_scan_captions(folder: Path = MEMORIZER) -> list[dict]:
    """The memorizer's 134 captions for `harden scan`: prompts.jsonl (8 memorized, 116 ordinary training captions)
    and the 10 held-out procedural captions of harden_zoo.json, each {"caption", "memorized"}."""
    from .zoo.folder import load_config

    rows = [{"caption": r["caption"], "memorized": bool(r["memorized"])} for r in caption_rows(folder)]
    return rows + [{"caption": c, "memorized": False} for c in load_config(folder)["held_out"]]


SCAN_CONFIGS = (("wen", ("wen",)), ("wen+attn", ("wen", "attn")), ("nemo", ("nemo",)))  # wen: 1 seed


def scan_throughput(model: str, n_captions: int, device, batch_size: int = 64, latent_size: int = 32,
                    nemo_seeds: int = 10, folder: Path = MEMORIZER, log=print) -> dict:
    """Captions/s of `harden scan`'s scores: wen (1 seed, first step), wen + attn (same forward), nemo (`nemo_seeds`).

    memorizer: the shipped model and its 134 captions, text encoding included. sd14-random: an SD-v1.4-shaped UNet
    (random weights, fp16 on CUDA) at `latent_size` latents with random CLIP-sized embeddings (UNet only; the
    text encoder's rate is `--calib-prompts`'). One untimed caption first (first-call allocations)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    device = torch.device(device)
    if model == "memorizer":
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).to(device)
        captions = [r["caption"] for r in memorizer_scan_captions(folder)]
        captions = captions[:n_captions] if n_captions else captions
        unet, config = pipe.unet, pipe.scheduler.config
        uncond = encode(pipe, [""])

        def embed(texts):
            return encode(pipe, texts)
        name = f"memorizer ({folder}), {len(captions)} captions, text encoding included"
    elif model == "sd14-random":
        torch.manual_seed(0)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        unet = UNet2DConditionModel(sample_size=latent_size, **SD14).to(device, dtype).eval()
        config = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1).config
        g = torch.Generator().manual_seed(1)
        n = n_captions or (256 if device.type == "cuda" else 8)
        captions = list(range(n))
        table = torch.randn(n, 77, 768, generator=g)
        uncond = torch.randn(1, 77, 768, generator=g)

        def embed(indices):
            return table[list(indices)]
        name = (f"sd14-random ({latent_size}x{latent_size} latents, {dtype}), {n} captions, random embeddings "
                "(UNet only)")
    else:
        raise BadInputError(f"--model {model!r}: the scan workload runs on memorizer or sd14-random")
    log(f"bench: scan on {name}, {device}, batch {batch_size} samples per forward, torch threads "
        f"{torch.get_num_threads()}")
    out = {"model": model, "name": name, "device": str(device), "captions": len(captions), "batch_size": batch_size,
           "threads": torch.get_num_threads(), "scores": {}}
    for label, scores in SCAN_CONFIGS:
        seeds = nemo_seeds if scores == ("nemo",) else 1
        settings = ScanSettings(scores=scores, primary=scores[0], seeds=1, nemo_seeds=nemo_seeds,
                                batch_size=batch_size)
        scorer = CaptionScorer(unet, config, uncond, settings)
        scorer.score(embed(captions[:1]))  # warm-up
        scorer.unet_forwards = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(0, len(captions), 256):  # text encoding in batches of 256, as the scan
            scorer.score(embed(captions[i:i + 256]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rate = len(captions) / seconds
        out["scores"][label] = {"seconds": round(seconds, 3), "captions_per_s": float(f"{rate:.4g}"),
                                "cpu_seconds": round(cpu, 3), "unet_forwards": scorer.unet_forwards,
                                "seeds": seeds}
        log(f"scan {label:9s} {len(captions)} captions in {seconds:.2f} s = {rate:.3g} captions/s "
            f"({cpu:.2f} s of CPU time: on a shared CPU, wall time is the larger; {scorer.unet_forwards} UNet "
            f"forwards, {seeds} seed(s))")
    return out
