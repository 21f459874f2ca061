"""Fast localization mode: a bisected (or probed) initial selection and adaptive group testing, instead of NeMo's
one-step-at-a-time search.

Why: the schedule's candidate sets grow with every step (theta falls, k rises), so the first passing step can be
found by galloping and bisection (or, with early rejection, by probing every step with one seed), and a prompt that
fails even the last (widest) step is known after 5 tests instead of 16. The official refinement spends one scorer
call per neuron of the initial set, although most of them are not needed (on the shipped memorizer: median 26.5
initial -> 4 final neurons). Removing whole groups and splitting only the groups that turn out to be needed costs
about d·log2(N/d) tests for d needed neurons among N, and the groups of one round are independent, so they share
UNet batches on any device. Tests run on a few screening seeds, the ones closest to failing; only the result is
checked on all kept seeds. A final single-drop pass makes the result 1-minimal: removing any one of its neurons
brings the score to the threshold or above (within `TIE_BAND`: fast mode counts a score that close to the threshold
as failing, so its result passes in any batch layout). The result may differ from exact mode's (greedy order
matters) but ends below the same threshold.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch

from ..neurons import NeuronSet
from .localize import (TIE_BAND, Lists, LocalizeSettings, PromptResult, ScoreFn, SearchPolicy, initial_selection,
                       localize_with, ood_candidates, rejects_above, schedule)
from .stats import NeuronStats

Entry = tuple[str, int]  # (layer, channel)
SCREEN_SHARE = 0.4  # of the kept seeds screen the search's tests (at least 1); all of them check its result


def _lists(entries: Sequence[Entry], layer_order: Sequence[str]) -> Lists:
    out: Lists = {name: [] for name in layer_order}
    for layer, n in entries:
        out[layer].append(n)
    return out


def bisect_initial(score: ScoreFn, acts: dict[str, torch.Tensor], stats: NeuronStats, settings: LocalizeSettings,
                   speculate: int = 1) -> tuple[Lists, float, float, int]:
    """Initial selection by galloping search -> (candidate lists, score, tau for refinement, step number).

    Assumes what the nesting of the candidate sets suggests: once a step passes, later steps pass too. Steps 0, 1,
    3, 7, 15, ... (and the last) are tested until one passes, then the first passing step is bisected out of the
    bracket, `speculate` probes per scorer call. A prompt that passes at step j costs about 2·log2(j + 1) tests
    instead of j + 1; one that never passes gives up after about log2(16) + 1 tests instead of 16, with the last
    step's set and score, as the sequential loop gives up. When scores are not monotone in the step, this may
    return a later step than exact mode.
    """
    steps = schedule(settings)
    cands = [ood_candidates(acts, stats, theta, k) for theta, k in steps]
    last, per_call = len(steps) - 1, max(1, speculate)
    gallop = sorted({min(2 ** i - 1, last) for i in range(last.bit_length() + 1)})
    known: dict[int, float] = {}

    def passed(i: int) -> bool:
        return known[i] <= settings.tau_initial

    reject = rejects_above(settings.tau_initial, strict=True)

    def probe(indices: list[int]) -> None:
        full = last in indices  # a give-up needs the last step's full score
        for i, s in zip(indices, score([cands[i] for i in indices], reject=None if full else reject)):
            known[i] = float(s.max())

    while not any(passed(i) for i in known):
        todo = [i for i in gallop if i not in known][:per_call]
        if not todo:  # even the last (widest) step failed: give up as the loop does, refining against its score
            return cands[last], known[last], known[last], len(steps)
        probe(todo)
    while True:
        hi = min(i for i in known if passed(i))
        lo = max([i for i in known if i < hi and not passed(i)], default=-1)
        between = sorted({lo + round((hi - lo) * j / (per_call + 1)) for j in range(1, per_call + 1)} - {lo, hi})
        if not between:
            break
        probe(between)
    theta, k = steps[hi]
    stopped = (settings.use_theta and theta <= settings.theta_min) or k >= settings.k_max
    return cands[hi], known[hi], (known[hi] if stopped else settings.tau_refine), hi + 1


def group_refine(score: ScoreFn, initial: Lists, tau: float, layer_order: Sequence[str], initial_score: float,
                 settings: LocalizeSettings, block: int = 1) -> tuple[Lists, float]:
    """Group testing on a few screening seeds, then one check of the result on all kept seeds.

    Why: a test that removes neurons must show that every kept seed stays below the threshold, so each passing
    test costs all kept seeds, and passing tests are most of the cost. A set that fails on the screening seeds
    fails on all of them (the score is a max over seeds), so single drops that fail on the screening seeds still
    prove 1-minimality; only the final set needs all seeds to prove it passes. The screening seeds are those whose
    score with the initial set blocked is highest (closest to failing). If the result fails on another seed, that
    seed joins the screen and the search resumes from the last set it accepted that passes on the grown screen (at
    most once per kept seed).
    Returns (lists, score of the final set on all kept seeds).
    """
    start = score([initial])[0]  # per kept seed: which seeds are closest to failing
    kept = len(start)
    baseline = start if settings.rel_threshold is not None else None
    limit = (tau if baseline is None else settings.rel_threshold) - TIE_BAND  # a margin: true in any batch layout
    reject = rejects_above(tau, strict=False) if baseline is None else None

    def measure(per_seed: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:  # per seed, compared with `limit`
        if baseline is None:
            return per_seed
        ref = baseline[list(seeds)]
        return ((per_seed - ref) / (ref.abs() + 1e-9)).abs()

    def passes(per_seed: torch.Tensor, seeds: Sequence[int]) -> bool:
        return float(measure(per_seed, seeds).max()) < limit

    screen = sorted(torch.argsort(start, descending=True)[:max(1, round(SCREEN_SHARE * kept))].tolist())
    trail: list[Lists] = []  # the sets accepted since the initial one, in order, each passing on its screen
    base, base_seeds = initial, start[screen]
    while True:
        found, found_score, history = _group_search(score, base, base_seeds, layer_order, block, screen, passes,
                                                    reject)
        if len(screen) == kept:
            return found, found_score
        check = score([found])[0]
        if passes(check, range(kept)):
            return found, float(check.max())
        failing = torch.nonzero(measure(check, range(kept)) >= limit).flatten().tolist()
        new = set(failing) - set(screen)  # none: the screen's own seeds, a float-noise tie between layouts
        screen = sorted(set(screen) | new) if new else list(range(kept))
        # resume from the most reduced accepted set that passes on the grown screen, probing from the last one
        # back; the initial set passes on every seed
        trail += history
        steps = list(reversed(trail))
        results = score(steps, reject=reject, guess=False, seeds=screen) if steps else []
        back = next((i for i, r in enumerate(results) if passes(r, screen)), None)
        if back is None:
            trail, base, base_seeds = [], initial, start[screen]
        else:
            trail, base, base_seeds = trail[:len(trail) - back], steps[back], results[back]


def _group_search(score: ScoreFn, initial: Lists, initial_seeds: torch.Tensor, layer_order: Sequence[str], block: int,
                  seeds: Sequence[int], passes, reject) -> tuple[Lists, float, list[Lists]]:
    """Group removal on the `seeds` (positions in kept): first whole layers (reverse order), then parts of the
    groups that could not be removed; then single-drop sweeps until the set is 1-minimal on those seeds.

    Parts are halves while few neurons turn out to be needed and shrink to single neurons as the estimated share of
    needed neurons grows (Hwang's generalized binary splitting), so a dense set costs about what exact mode costs.
    Per round, up to `block` groups are tested against the current set in one scorer call. When several pass, the
    longest prefix of them that passes together is removed and the others are tested again. Groups of one that
    fail are remembered with the version of the set they failed against, so a sweep only re-tests neurons whose
    test is out of date; a sweep's single drops are a round's groups, so several that pass go together (removing
    only the first of them, as a sequential sweep would, re-tests all the others after each removal: on the
    memorizer a dense set's sweeps cost up to 14 passing tests per neuron removed). With early rejection a round
    is scored on one seed only (the scorer's probe: the seed that last failed a test), and the groups that pass
    there are confirmed on the other seeds only through the union they join: a group that passes on the probe
    seed nearly always passes on the others (123 of 141 on the memorizer), so testing each one there first cost
    3 samples per passing group for nothing. `passes(per_seed, seeds)` decides a test; `reject` lets the scorer
    stop at a seed that proves a fail. Returns (lists, max score of the final set on `seeds`, the set after each
    removal in order).
    """
    seeds = list(seeds)

    def run(cands: Sequence[Lists], guess: bool | None = None, probe: str | None = None) -> list[torch.Tensor]:
        return score(cands, reject=reject, guess=guess, seeds=seeds, probe=probe)

    def ok(per_seed: torch.Tensor) -> bool:
        return passes(per_seed, seeds)

    order = list(reversed(list(layer_order)))
    current: list[Entry] = list(dict.fromkeys((layer, n) for layer in order for n in initial.get(layer, [])))
    current_seeds, version = initial_seeds, 0
    history: list[Lists] = []  # the set after each accepted removal
    failed_at: dict[Entry, int] = {}  # single neuron -> version of `current` its removal failed against

    def without(group: Sequence[Entry]) -> Lists:
        drop = set(group)
        return _lists([e for e in current if e not in drop], layer_order)

    pending = [[e for e in current if e[0] == layer] for layer in order]
    pending = [g for g in pending if g]
    size = max(1, block)
    necessary, resolved = 1, 8  # prior: about 1 in 8 neurons is needed (memorizer: median 26.5 initial, 4 final)

    def fail(group: list[Entry]) -> None:  # a failing test: a single is resolved, a group is split
        nonlocal necessary, resolved
        if len(group) == 1:
            if group[0] not in failed_at:  # first resolved: counts towards the share of needed neurons
                necessary, resolved = necessary + 1, resolved + 1
            failed_at[group[0]] = version
        else:
            part = max(1, min((len(group) + 1) // 2, int(resolved / necessary) - 1))
            pending.extend(group[i:i + part] for i in range(0, len(group), part))

    while pending:  # rounds; when they run out, a sweep re-tests every single drop that failed on an older set
        batch, pending = pending[:size], pending[size:]
        # with early rejection, a round is scored on one seed (the last one that failed a test): a survivor is
        # confirmed on the other seeds by the union it joins, not alone
        results = run([without(g) for g in batch], probe="only" if len(seeds) >= 3 else None)
        passing = []
        for g, r in zip(batch, results):
            if ok(r):
                passing.append((g, r))
            else:
                fail(g)
        confirmed = all(r.numel() == len(seeds) for _, r in passing)  # scored on every seed of the screen
        took = 0
        if len(passing) == 1 and confirmed:
            took = 1
        elif passing:
            passing.sort(key=lambda gr: float(gr[1].max()))  # most slack first: likelier to go together
            took = _longest_union(run, without, ok, passing, confirmed)
            if not took:  # the most promising group alone failed on the other seeds
                fail(passing[0][0])
            pending = [g for g, _ in passing[max(1, took):]] + pending  # tested against an older set: again
        if took:
            group, r = passing[0]
            resolved += len(group)
            drop = set(group)
            current = [e for e in current if e not in drop]
            current_seeds, version = r, version + 1
            history.append(_lists(current, layer_order))
        if not pending:  # 1-minimal once every single drop failed against the final set
            pending = [[e] for e in current if failed_at.get(e) != version]
    return _lists(current, layer_order), float(current_seeds.max()), history


def _longest_union(run, without, ok, passing: list, confirmed: bool = True) -> int:
    """How many of the `passing` (group, scores) pairs go together: the longest prefix whose union passes, put with
    its scores in passing[0]. `confirmed`: each group passed on all seeds alone, so at least 1 goes; otherwise
    (passed on one seed) the first group alone is tested too, and 0 means that it failed.

    Why this order: the whole union alone first, on all seeds at once, as the groups of a round usually go
    together, so it costs one test instead of one per prefix; otherwise the shorter prefixes, longest first, in
    one call that ends at the first one that passes (with early rejection, every prefix probed on one seed and
    only survivors scored on the others, one at a time).
    """
    sizes = list(range(len(passing), 1 if confirmed else 0, -1))
    unions = [[e for g, _ in passing[:k] for e in g] for k in sizes]
    results = run([without(unions[0])], probe="never")  # likely to pass: all seeds at once, no probe first
    if not ok(results[0]) and len(unions) > 1:
        results += run([without(u) for u in unions[1:]], guess=False)
    for k, u, r in zip(sizes, unions, results):
        if ok(r):
            passing[0] = (u, r)
            return k
    return 1 if confirmed else 0


def localize_prompt_fast(scorer, embed: torch.Tensor, acts: dict[str, torch.Tensor], stats: NeuronStats,
                         settings: LocalizeSettings = LocalizeSettings(), prompt: str = "",
                         speculate: int | None = None, *, refine_block: int | None = None,
                         batch_size: int | None = None, unblocked: torch.Tensor | None = None,
                         early_reject: bool = False) -> PromptResult:
    """`localize_prompt` with a fast initial selection and group-testing refinement (`localization.mode: fast`).

    The seed filter is exact mode's; with `early_reject` so is the initial selection (its steps probed with one
    seed each, so the sweep costs about one sample per failing step), without it the schedule is bisected. Same
    keyword arguments.
    """
    return localize_with(FAST, scorer, embed, acts, stats, settings, prompt, speculate, refine_block=refine_block,
                         batch_size=batch_size, unblocked=unblocked, early_reject=early_reject)


FAST = SearchPolicy("fast", bisect_initial, group_refine, independent=True, initial_early=initial_selection)


def compare_modes(exact: Sequence[PromptResult], fast: Sequence[PromptResult]) -> dict:
    """Report rows for exact vs fast mode: neurons per prompt (median, max), final scores, union size, forwards.

    Only prompts that both modes localized (memorized) enter the per-prompt statistics; prompts are matched by
    position, so pass both lists in the same prompt order.
    """
    if len(exact) != len(fast):
        raise ValueError(f"exact has {len(exact)} results and fast {len(fast)}: compare the same prompts")
    pairs = [(e, f) for e, f in zip(exact, fast) if e.memorized and f.memorized]

    def side(results: Sequence[PromptResult]) -> dict:
        counts = [len(r.refined) for r in results]
        scores = [r.refined_score for r in results]
        return {
            "neurons_median": statistics.median(counts) if counts else 0.0, "neurons_max": max(counts, default=0),
            "score_mean": statistics.fmean(scores) if scores else None, "score_max": max(scores, default=None),
            "below_threshold": sum(r.refined_score < r.tau_refine for r in results),
            "union": len(NeuronSet().union(*(r.refined for r in results))),
            "unet_forwards": sum(r.unet_forwards for r in results),
            "sample_forwards": sum(r.sample_forwards for r in results),
        }

    out = {"prompts": len(pairs), "exact": side([e for e, _ in pairs]), "fast": side([f for _, f in pairs])}
    med = out["exact"]["neurons_median"]
    out["neurons_median_ratio"] = out["fast"]["neurons_median"] / med if med else None
    out["same_sets"] = sum(e.refined == f.refined for e, f in pairs)
    return out
