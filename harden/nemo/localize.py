"""NeMo localization for one prompt: OOD initial selection (Alg. 3), then greedy refinement (Alg. 4).

The search logic only sees a `score(candidates) -> per-seed scores` callable (`search_scorer.ScoreFn`), so it is
tested without a UNet, and the scorer (`search_scorer.SearchScorer`) decides how candidates are batched. The order
and comparisons follow the official code exactly (strict `<`/`>`, reverse layer order, list order with repeats, the
theta/k schedule; docs/method.md and the NeMo notes, sections 2.2-2.4).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..neurons import NeuronSet
from .search_scorer import ALWAYS, TIE_BAND, Lists, ScoreFn, SearchScorer, as_set
from .stats import NeuronStats

__all__ = ["ALWAYS", "TIE_BAND", "Lists", "ScoreFn", "SearchPolicy", "EXACT", "LocalizeSettings", "PromptResult",
           "initial_selection", "refine", "localize_prompt", "localize_with", "ood_candidates", "schedule",
           "union_of", "unblocked_deltas", "rejects_above", "near_threshold", "speculative_greedy"]

REJECT_MARGIN = 1e-4  # a single seed rejects only this far past the threshold: far above float noise across batches


def near_threshold(tau: float) -> Callable[[torch.Tensor], bool]:
    return lambda per_seed: abs(float(per_seed.max()) - tau) < TIE_BAND


def rejects_above(tau: float, strict: bool) -> Callable[[torch.Tensor], bool]:
    """The early-rejection test for 'fails when the max over seeds is > tau' (strict) or '>= tau'; with a margin,
    so a seed scored in another batch layout can never reject a candidate that the full batch would pass."""
    return lambda per_seed: float(per_seed.max()) > tau + REJECT_MARGIN if strict else \
        float(per_seed.max()) >= tau + REJECT_MARGIN


@dataclass(frozen=True)
class LocalizeSettings:
    """Official defaults. `theta_min` also ends the search: official code stops when theta == 1 (its default)."""

    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    use_theta: bool = True  # official --no_theta turns OOD selection off
    k_start: int = 0
    use_top_k: bool = True  # official --no_top_k keeps k at 0
    k_max: int = 1280  # the search also ends when k reaches this (SD v1's widest layer)
    tau_initial: float = 0.428  # initial selection succeeds when the score is <= this
    tau_refine: float = 0.428  # refinement drops a neuron when the score without it stays < this
    rel_threshold: float | None = None  # official --rel_threshold_refinement (off by default)
    refine: bool = True

    def __post_init__(self):
        if not self.use_theta and not self.use_top_k:
            raise ValueError("initial selection needs OOD (use_theta) or top-k (use_top_k); both are off")
        if self.theta_step <= 0 or self.theta_min <= 0 or self.theta_start < self.theta_min:
            raise ValueError("need theta_start >= theta_min > 0 and theta_step > 0")


@dataclass
class PromptResult:
    """What localization found for one prompt. `memorized` is False when the seed filter kept no seed."""

    prompt: str
    memorized: bool
    seed_scores: list[float]  # max pairwise MS-SSIM per seed (unblocked)
    kept_seeds: list[int]
    initial: Lists = field(default_factory=dict)
    initial_score: float = 0.0
    iterations: int = 0
    tau_refine: float = 0.0
    refined: NeuronSet = field(default_factory=NeuronSet)
    refined_score: float = 0.0
    unet_forwards: int = 0
    sample_forwards: int = 0
    tie_checks: int = 0  # scores taken in the official layout: near a threshold, or becoming one
    tie_shift: float = 0.0  # the largest change such a re-check made: float noise between batch layouts

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt, "memorized": self.memorized, "seed_scores": self.seed_scores,
            "kept_seeds": self.kept_seeds, "initial": self.initial, "initial_score": self.initial_score,
            "iterations": self.iterations, "tau_refine": self.tau_refine, "neurons": self.refined.to_json(),
            "score": self.refined_score, "unet_forwards": self.unet_forwards,
            "sample_forwards": self.sample_forwards, "tie_checks": self.tie_checks, "tie_shift": self.tie_shift,
        }

    @classmethod
    def from_json(cls, d: dict) -> "PromptResult":
        d = dict(d)
        d["refined"] = NeuronSet.from_json(d.pop("neurons"))
        d["refined_score"] = d.pop("score")
        return cls(**d)


def ood_candidates(acts: dict[str, torch.Tensor], stats: NeuronStats, theta: float, k: int) -> Lists:
    """Per layer: channels with |z| > theta (ascending), then the top-k by activation (descending), concatenated."""
    z = stats.zscores(acts)
    out: Lists = {}
    for name, a in acts.items():
        idx = torch.nonzero(z[name] > theta).flatten().tolist()
        idx += a.abs().topk(min(k, a.numel())).indices.tolist()
        out[name] = idx
    return out


def schedule(settings: LocalizeSettings) -> list[tuple[float, int]]:
    """The (theta, k) of each initial-selection iteration. They do not depend on outcomes, so they can be batched."""
    theta = settings.theta_start if settings.use_theta else float("inf")
    k = settings.k_start if settings.use_top_k else 0
    steps = []
    while True:
        steps.append((theta, k))
        if settings.use_theta and theta > settings.theta_min:
            theta -= settings.theta_step
        if settings.use_top_k:
            k += 1
        if (settings.use_theta and theta <= settings.theta_min) or k >= settings.k_max:
            return steps


def initial_selection(score: ScoreFn, acts: dict[str, torch.Tensor], stats: NeuronStats,
                      settings: LocalizeSettings, speculate: int = 1) -> tuple[Lists, float, float, int]:
    """Alg. 3 -> (candidate lists, its score, tau for refinement, iterations used).

    Evaluates `speculate` schedule steps per scorer call and takes the first that passes: same result as the
    sequential loop, since the candidate sets are fixed in advance. On give-up, refinement uses the last score; a
    score that becomes refinement's threshold is the official layout's, so ties with it are decided as officially.
    """
    steps = schedule(settings)
    reject = rejects_above(settings.tau_initial, strict=True)
    near_init, near_refine = near_threshold(settings.tau_initial), near_threshold(settings.tau_refine)

    def near(per_seed: torch.Tensor) -> bool:  # a passing score is also refinement's starting score
        return near_init(per_seed) or near_refine(per_seed)

    start = 0
    while start < len(steps):
        block = steps[start:start + max(1, speculate)]
        cands = [ood_candidates(acts, stats, theta, k) for theta, k in block]
        last = start + len(block) == len(steps)  # a give-up refines against the last step's full score
        head = cands[:-1] if last else cands  # steps that may stop at the first seed proving a fail
        scores = [float(s.max()) for s in score(head, reject=reject, near=near, guess=False)] if head else []
        if last and len(scores) == len(head) and min(scores, default=float("inf")) > settings.tau_initial:
            scores.append(float(score(cands[-1:], near=near)[0].max()))
        for j, s in enumerate(scores):
            if s <= settings.tau_initial:
                theta, k = block[j]  # official: the stop test also runs after a success
                stopped = (settings.use_theta and theta <= settings.theta_min) or k >= settings.k_max
                if stopped:
                    s = float(score([cands[j]], near=ALWAYS)[0].max())
                return cands[j], s, (s if stopped else settings.tau_refine), start + j + 1
        start += len(scores)  # a block ends early at a pass that a tie check turned into a fail
    final = float(score([cands[-1]], near=ALWAYS)[0].max())
    return cands[-1], final, final, len(steps)


def _drop(lists: Lists, layer: str, neuron: int | None) -> Lists:
    out = copy.deepcopy(lists)
    if neuron is None:
        out[layer] = []
    else:
        out[layer].remove(neuron)  # one occurrence, as list.remove in the official code
    return out


def speculative_greedy(score: ScoreFn, state: Lists, state_score: float, trials: Sequence[Callable[[Lists], Lists]],
                       passes: Callable[[torch.Tensor], bool], block: int = 1,
                       reject: Callable[[torch.Tensor], bool] | None = None,
                       near: Callable[[torch.Tensor], bool] | None = None,
                       state_seeds: torch.Tensor | None = None) -> tuple[Lists, float]:
    """Apply `trials` greedily in order (trial i is kept when `passes(score(trial_i(state)))`), batched.

    Why it is exact: up to `block` trials are evaluated in one scorer call, each built on the state that the
    predicted outcomes of the trials before it would give. Outcomes are read in order until the first wrong
    prediction; that trial's own set was still built on the true state, so its outcome counts too, and the rest is
    re-speculated from there. Every decision therefore uses the set the sequential loop would use. The prediction
    is the majority outcome so far (ties: pass), and the block shrinks to twice the last useful run when
    predictions fail, so a wrong guess wastes little.
    A trial that only drops a repeated occurrence blocks the same neurons as the state: the official code scores it
    again and gets the state's score bit for bit, so with the state's per-seed scores known (`state_seeds`) it is
    decided on them without a forward. `reject` lets the scorer stop at the first seed that proves a trial fails;
    `near` marks scores that are decided in the official layout.
    """
    outcomes = [0, 0]  # fails, passes
    size = max(1, block)
    i = 0
    while i < len(trials):
        same = trials[i](state)
        if state_seeds is not None and as_set(same) == as_set(state):
            if passes(state_seeds):
                state = same
            i += 1
            continue
        guess = outcomes[1] >= outcomes[0]
        cands, s = [], state
        for trial in trials[i:i + size]:
            cands.append(trial(s))
            if guess:
                s = cands[-1]
        used = 0
        for cand, per_seed in zip(cands, score(cands, reject=reject, near=near, guess=guess)):
            ok = passes(per_seed)
            used += 1
            outcomes[ok] += 1
            if ok:
                state, state_score, state_seeds = cand, float(per_seed.max()), per_seed
            if ok != guess:
                break
        i += used
        size = max(1, min(block, 2 * used))
    return state, state_score


def _drop_layer(layer: str) -> Callable[[Lists], Lists]:
    return lambda lists: _drop(lists, layer, None)


def _drop_neuron(layer: str, neuron: int) -> Callable[[Lists], Lists]:
    return lambda lists: _drop(lists, layer, neuron)


def refine(score: ScoreFn, initial: Lists, tau: float, layer_order: Sequence[str], initial_score: float,
           settings: LocalizeSettings, block: int = 1) -> tuple[Lists, float]:
    """Alg. 4, official order: (a) whole layers in reverse order, (b) single neurons, reverse layers, list order.

    Greedy: each test uses the already-reduced set. `block` > 1 evaluates that many trials per scorer call
    (`speculative_greedy`), with the same decisions. Scores within `TIE_BAND` of the threshold are decided in the
    official layout. Returns (lists, score of the final set).
    """
    current = copy.deepcopy(initial)
    baseline = score([initial], near=ALWAYS)[0] if settings.rel_threshold is not None else None

    def relative(per_seed: torch.Tensor) -> float:
        return float(((per_seed - baseline) / (baseline.abs() + 1e-9)).abs().max())

    def passes(per_seed: torch.Tensor) -> bool:
        if baseline is None:
            return float(per_seed.max()) < tau
        return relative(per_seed) < settings.rel_threshold

    if baseline is None:  # refinement keeps a drop when < tau
        reject, near, known = rejects_above(tau, strict=False), near_threshold(tau), torch.tensor([initial_score])
    else:  # the state's seeds are the baseline itself
        reject, near, known = None, (lambda ps: abs(relative(ps) - settings.rel_threshold) < TIE_BAND), baseline
    layers = [layer for layer in reversed(list(layer_order)) if current.get(layer)]
    current, current_score = speculative_greedy(score, current, initial_score, [_drop_layer(x) for x in layers],
                                                passes, block, reject, near, known)
    # a layer's list only changes during its own turn, so the whole neuron-level sequence is known here
    trials = [_drop_neuron(layer, n) for layer in reversed(list(layer_order)) for n in list(current.get(layer, []))]
    if baseline is None:
        known = torch.tensor([current_score])  # the decision only reads the max
    elif as_set(current) != as_set(initial):
        known = None
    return speculative_greedy(score, current, current_score, trials, passes, block, reject, near, known)


def localize_prompt(scorer, embed: torch.Tensor, acts: dict[str, torch.Tensor], stats: NeuronStats,
                    settings: LocalizeSettings = LocalizeSettings(), prompt: str = "",
                    speculate: int | None = None, *, refine_block: int | None = None,
                    batch_size: int | None = None, unblocked: torch.Tensor | None = None,
                    early_reject: bool = False) -> PromptResult:
    """Seed filter -> initial selection -> refinement for one prompt, with a `NoiseDiffScorer` (exact mode).

    The unblocked deltas are computed once (or passed in as `unblocked`, e.g. from a batched detection pass) and
    reused; blocked passes run only the kept seeds. `speculate` (initial-selection steps per forward),
    `refine_block` (speculative refinement trials per forward) and `batch_size` (samples per forward) default to
    `batching.resolve_batching`: sequential on CPU, from free memory on CUDA. Results never depend on them, nor on
    sharing forwards with other prompts (`pool`): a score within `TIE_BAND` of a threshold is decided in the
    official layout.
    """
    return localize_with(EXACT, scorer, embed, acts, stats, settings, prompt, speculate, refine_block=refine_block,
                         batch_size=batch_size, unblocked=unblocked, early_reject=early_reject)


@dataclass(frozen=True)
class SearchPolicy:
    """How one prompt's neurons are searched: an initial selection, a refinement, and whether a scorer call's
    candidates are `independent` tests (fast mode's groups) or a sequential chain (exact mode's greedy steps).

    `initial_early` replaces `initial` when early rejection is on (fast mode bisects the schedule without it)."""

    name: str
    initial: Callable
    refine: Callable
    independent: bool = False
    initial_early: Callable | None = None

    def initial_for(self, early_reject: bool) -> Callable:
        return self.initial_early if early_reject and self.initial_early is not None else self.initial


EXACT = SearchPolicy("exact", initial_selection, refine)


def localize_with(policy: SearchPolicy, scorer, embed: torch.Tensor, acts: dict[str, torch.Tensor],
                  stats: NeuronStats, settings: LocalizeSettings, prompt: str, speculate: int | None, *,
                  refine_block: int | None, batch_size: int | None, unblocked: torch.Tensor | None,
                  early_reject: bool = False) -> PromptResult:
    """Seed filter, then `policy`'s initial selection and refinement, scored through one `SearchScorer`."""
    before = (scorer.counter.unet_forwards, scorer.counter.sample_forwards)
    search = SearchScorer(scorer, embed, unblocked, batch_size=batch_size, speculate=speculate,
                          refine_block=refine_block, early_reject=early_reject, independent=policy.independent)
    result = PromptResult(prompt, bool(len(search.kept)), search.seed_scores.tolist(), search.kept.tolist())
    if result.memorized:
        plan = search.plan
        initial, s0, tau, iters = policy.initial_for(early_reject)(search, acts, stats, settings, plan.speculate)
        result.initial, result.initial_score, result.tau_refine, result.iterations = initial, s0, tau, iters
        order = [t.name for t in scorer.targets]
        final, s1 = (policy.refine(search, initial, tau, order, s0, settings, plan.refine_block) if settings.refine
                     else (initial, s0))
        result.refined, result.refined_score = NeuronSet(final), s1
    result.tie_checks, result.tie_shift = search.tie_checks, search.tie_shift
    result.unet_forwards = scorer.counter.unet_forwards - before[0]
    result.sample_forwards = scorer.counter.sample_forwards - before[1]
    return result


def unblocked_deltas(scorer, embeds: torch.Tensor, batch_size: int | None = None) -> list[torch.Tensor]:
    """The unblocked deltas of many prompts [P, tokens, dim] in shared UNet batches (pass each to `unblocked=`)."""
    n = scorer.settings.n_seeds
    deltas = scorer.noise_diff(embeds.repeat_interleave(n, dim=0), torch.arange(n).repeat(len(embeds)),
                               max_batch=batch_size)
    return list(deltas.split(n))


def union_of(results: Sequence[PromptResult]) -> NeuronSet:
    """The neurons to prune for a whole prompt set: the union of the per-prompt refined sets."""
    return NeuronSet().union(*(r.refined for r in results))
