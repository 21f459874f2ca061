"""The official NeMo execution order, kept as the baseline that exact mode must reproduce and `harden bench` times.

Why a second implementation: it is a deliberately naive port of `3_detect_memorized_neurons.py` +
`neuron_refinement` (list of per-layer lists, a `while` loop, deep copies, one candidate set per call), and with a
real UNet it spends forwards the way the official code does (spec §5): every noise-diff call runs the UNet twice on
all seeds and throws the first pass away, each initial iteration runs one batch-1 forward to read activations, the
unblocked baseline is recomputed and the all-blocked set scored at the start of refinement, and the final score is
computed once more. Harden's own search (`localize.py`) is checked against it and must reach the same sets and
scores with fewer forwards.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..neurons import NeuronSet
from .localize import LocalizeSettings, PromptResult
from .score import NoiseDiffScorer, ms_ssim
from .stats import NeuronStats

ListsByIndex = list[list[int]]

# the official script's keyword -> the LocalizeSettings field it sets, for the options that map one to one
OFFICIAL_NAMES = {"theta0": "theta_start", "step": "theta_step", "min_theta": "theta_min", "k0": "k_start",
                  "tau_init": "tau_initial", "tau_ref": "tau_refine", "rel_threshold": "rel_threshold"}


def settings_from_official(**official) -> LocalizeSettings:
    """harden's settings for the keyword arguments `official_localize` takes, so both run the same parameters."""
    fields = {OFFICIAL_NAMES[k]: v for k, v in official.items() if k in OFFICIAL_NAMES}
    if official.get("no_top_k"):
        fields["use_top_k"] = False
    if official.get("no_theta"):
        fields["use_theta"] = False
    return LocalizeSettings(**fields)


@dataclass
class OfficialRun:
    initial: ListsByIndex
    refined: ListsByIndex
    refined_score: float
    initial_score: float
    tau_refine: float
    iterations: int


def official_localize(score: Callable[[ListsByIndex], torch.Tensor], acts, mean, std, **kwargs):
    """score(per-layer lists) -> per-seed scores. Returns (initial lists, refined lists, refined score)."""
    run = official_search(score, acts, mean, std, **kwargs)
    return run.initial, run.refined, run.refined_score


def official_search(score: Callable[[ListsByIndex], torch.Tensor], acts, mean, std, theta0=5.0, step=0.25,
                    min_theta=1.0, k0=0, tau_init=0.428, tau_ref=0.428, no_theta=False, no_top_k=False,
                    k_max=1280, stop_theta=1.0, rel_threshold=None, refine=True, on_iteration=None,
                    on_refinement=None) -> OfficialRun:
    """The official loop. `stop_theta` is its literal `theta == 1`; `on_iteration` / `on_refinement` let a caller
    spend the official activation forward and the recomputed baseline. The all-blocked set is scored as the
    official code does (it is the baseline of `rel_threshold`)."""
    ssim, theta, k = 1.0, theta0, k0
    if no_top_k:
        k = 0
    if no_theta:
        theta = np.inf
    threshold = tau_ref
    iterations = 0
    while ssim > tau_init:
        if on_iteration:
            on_iteration()
        blocked = []
        for a, m, s in zip(acts, mean, std):
            diff = (a - m).abs() / s
            idx = (diff > theta).nonzero().flatten().tolist()
            idx += [e.item() for e in a.abs().topk(k=min(k, len(m))).indices]
            blocked.append(idx)
        ssim = float(score(blocked).max())
        iterations += 1
        if ssim > tau_init:
            if theta > min_theta and not no_theta:
                theta = theta - step
            if not no_top_k:
                k += 1
        if theta == stop_theta or k >= k_max:
            threshold = ssim
            break
    initial = copy.deepcopy(blocked)
    if not refine:
        return OfficialRun(initial, copy.deepcopy(initial), ssim, ssim, threshold, iterations)
    if on_refinement:
        on_refinement()
    all_blocked = score(initial)

    def passes(s: torch.Tensor) -> bool:
        if rel_threshold is None:
            return float(s.max()) < threshold
        return float(((s - all_blocked) / (all_blocked.abs() + 1e-9)).abs().max()) < rel_threshold

    blocking = copy.deepcopy(blocked)
    for layer_idx, layer_list in reversed(list(enumerate(blocking))):
        if len(layer_list) == 0:
            continue
        curr = copy.deepcopy(blocking)
        curr[layer_idx] = []
        if passes(score(curr)):
            blocking[layer_idx] = []
    for layer_idx, layer_list in reversed(list(enumerate(blocking))):
        if len(layer_list) == 0:
            continue
        for neuron in copy.deepcopy(blocking)[layer_idx]:
            curr = copy.deepcopy(blocking)
            curr[layer_idx].remove(neuron)
            if passes(score(curr)):
                blocking[layer_idx].remove(neuron)
    return OfficialRun(initial, blocking, float(score(blocking).max()), ssim, threshold, iterations)


def official_noise_diff(scorer: NoiseDiffScorer, embed: torch.Tensor, lists: ListsByIndex | None) -> torch.Tensor:
    """One official `compute_noise_diff` call: all n seeds, a discarded pass, then the scored one (2 forwards)."""
    n = scorer.settings.n_seeds
    masks = None
    if lists is not None:
        names = [t.name for t in scorer.targets]
        masks = scorer.candidate_masks([dict(zip(names, lists))], 1)  # [1, width]: the same mask for every seed
    scorer.noise_diff(embed.expand(n, -1, -1), torch.arange(n), masks)  # t=981 in the official code, thrown away
    return scorer.noise_diff(embed.expand(n, -1, -1), torch.arange(n), masks)


def reference_localize_prompt(scorer: NoiseDiffScorer, embed: torch.Tensor, acts: dict[str, torch.Tensor],
                              stats: NeuronStats, settings: LocalizeSettings = LocalizeSettings(),
                              prompt: str = "") -> PromptResult:
    """`localize_prompt` in the official execution order and forward budget (the baseline of `harden bench`).

    The activation forward of each initial iteration is run and counted, but the candidates use `acts` (to_v of the
    text embedding), which the official forward reads up to fp16 rounding, so both orders search the same sets.
    """
    before = (scorer.counter.unet_forwards, scorer.counter.sample_forwards)
    names = [t.name for t in scorer.targets]
    unblocked = official_noise_diff(scorer, embed, None)
    per_seed, kept = scorer.seed_filter(unblocked)
    result = PromptResult(prompt, bool(len(kept)), per_seed.tolist(), kept.tolist())
    if result.memorized:
        state = {"reference": unblocked[kept]}

        def score(lists: ListsByIndex) -> torch.Tensor:
            return ms_ssim(state["reference"], official_noise_diff(scorer, embed, lists)[kept], scorer.settings)

        def activation_forward():  # batch 1, first seed, hooks reading to_v: one UNet forward
            scorer.noise_diff(embed, torch.arange(1))

        def rebaseline():
            state["reference"] = official_noise_diff(scorer, embed, None)[kept]

        s = settings
        run = official_search(
            score, [acts[n] for n in names], [stats.mean[n] for n in names], [stats.std[n] for n in names],
            theta0=s.theta_start, step=s.theta_step, min_theta=s.theta_min, k0=s.k_start, tau_init=s.tau_initial,
            tau_ref=s.tau_refine, no_theta=not s.use_theta, no_top_k=not s.use_top_k, k_max=s.k_max,
            stop_theta=s.theta_min, rel_threshold=s.rel_threshold, refine=s.refine, on_iteration=activation_forward,
            on_refinement=rebaseline)
        result.initial = dict(zip(names, run.initial))
        result.initial_score, result.tau_refine, result.iterations = run.initial_score, run.tau_refine, run.iterations
        result.refined, result.refined_score = NeuronSet.from_lists(names, run.refined), run.refined_score
    result.unet_forwards = scorer.counter.unet_forwards - before[0]
    result.sample_forwards = scorer.counter.sample_forwards - before[1]
    return result


def synthetic_scorer(widths: Sequence[int], seed: int, n_important: int = 4, n_seeds: int = 3):
    """score = per-seed base * exp(-sum of weights of the blocked neurons): a deterministic function of the set.

    For tests and benches without a UNet; returns (score(per-layer lists) -> per-seed tensor, list of calls).
    """
    g = torch.Generator().manual_seed(seed)
    weights = [torch.zeros(w) for w in widths]
    for _ in range(n_important):
        layer = int(torch.randint(len(widths), (1,), generator=g))
        weights[layer][int(torch.randint(widths[layer], (1,), generator=g))] = float(torch.rand(1, generator=g)) * 1.5
    for w in weights:  # weak background effects
        w += torch.rand(len(w), generator=g) * 0.02
    base = 0.7 + 0.25 * torch.rand(n_seeds, generator=g)
    calls = []

    def score(lists):
        calls.append(1)
        total = sum(float(weights[i][sorted(set(idx))].sum()) for i, idx in enumerate(lists) if idx)
        return base * float(np.exp(-total))

    return score, calls
