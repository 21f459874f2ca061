"""Fast mode (bisected initial selection, group-testing refinement): below the threshold, 1-minimal, fewer
evaluations, few extra neurons."""

import statistics

import pytest
import torch

from harden.neurons import NeuronSet
from harden.nemo.fast import bisect_initial, compare_modes, group_refine
from harden.nemo.localize import LocalizeSettings, PromptResult, initial_selection, refine, schedule
from harden.nemo.reference import synthetic_scorer
from harden.nemo.stats import NeuronStats

WIDTHS = [16, 16, 24, 24, 32, 32, 32]
NAMES = [f"layer{i}" for i in range(len(WIDTHS))]


def _problem(seed, n_important=4):
    g = torch.Generator().manual_seed(seed)
    acts = {n: torch.rand(w, generator=g) for n, w in zip(NAMES, WIDTHS)}
    stats = NeuronStats({n: torch.full((w,), 0.5) for n, w in zip(NAMES, WIDTHS)},
                        {n: torch.full((w,), 0.3) for n, w in zip(NAMES, WIDTHS)}, 100)
    lists_score, _ = synthetic_scorer(WIDTHS, seed, n_important=n_important)
    calls = []

    def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):
        calls.append(len(cands))
        return [_on(lists_score([c.get(n, []) for n in NAMES]), seeds) for c in cands]

    return score, acts, stats, calls


def _on(per_seed, seeds):
    """A scorer's answer on a subset of the kept seeds (fast mode's screening seeds)."""
    return per_seed if seeds is None else per_seed[list(seeds)]


def _check_minimal(score, final, tau):
    assert float(score([final])[0].max()) < tau
    for layer, idx in final.items():
        for n in idx:
            trial = {**final, layer: [x for x in idx if x != n]}
            assert float(score([trial])[0].max()) >= tau, f"{layer}:{n} could still be removed"


@pytest.mark.parametrize("block", [1, 4, 16])
def test_group_refinement_is_below_threshold_one_minimal_and_cheaper(block):
    exact_sizes, fast_sizes, exact_evals, fast_evals = [], [], 0, 0
    sparse_exact = sparse_fast = 0
    for seed in range(10):
        before = (exact_evals, fast_evals)
        score, acts, stats, calls = _problem(seed)
        settings = LocalizeSettings()
        initial = {n: list(range(w)) for n, w in zip(NAMES, WIDTHS)}  # a TM-like wide set: refinement dominates
        s0, tau = float(score([initial])[0].max()), settings.tau_refine
        assert s0 < tau
        calls.clear()
        exact, _ = refine(score, initial, tau, NAMES, s0, settings)
        exact_evals += sum(calls)
        calls.clear()
        fast, s1 = group_refine(score, initial, tau, NAMES, s0, settings, block)
        fast_evals += sum(calls) if block == 1 else len(calls)  # sets scored; with batching, scorer calls
        _check_minimal(score, fast, tau)
        assert s1 == pytest.approx(float(score([fast])[0].max()))
        assert NeuronSet(fast).layers.keys() <= NeuronSet(initial).layers.keys()
        assert all(set(fast[k]) <= set(initial[k]) for k in fast)
        exact_sizes.append(len(NeuronSet(exact)))
        fast_sizes.append(len(NeuronSet(fast)))
        if len(NeuronSet(exact)) <= 5:  # sparse (VM-like): group tests pay off
            sparse_exact, sparse_fast = sparse_exact + exact_evals - before[0], sparse_fast + fast_evals - before[1]
    assert statistics.median(fast_sizes) <= 1.25 * statistics.median(exact_sizes)
    assert sum(f <= e for f, e in zip(fast_sizes, exact_sizes)) >= 8  # rarely more neurons than exact mode
    assert sparse_fast < 0.75 * sparse_exact  # candidate sets scored, whatever the batching
    assert fast_evals < 1.5 * exact_evals  # dense sets: bounded overhead


@pytest.mark.parametrize("speculate", [1, 3, 6])
@pytest.mark.parametrize("tau", [0.6, 0.3, 0.1, 0.01])
def test_bisected_initial_selection_finds_the_sequential_step_in_fewer_tests(speculate, tau):
    """The synthetic score falls as neurons are blocked and the schedule's sets are nested, so the first passing
    step is unique: bisection must find exactly it (or give up exactly as the loop does) with fewer scored sets."""
    outcomes = set()
    for seed in range(6):
        score, acts, stats, calls = _problem(seed)
        settings = LocalizeSettings(tau_initial=tau, tau_refine=tau)
        exact = initial_selection(score, acts, stats, settings)
        exact_sets = sum(calls)
        calls.clear()
        fast = bisect_initial(score, acts, stats, settings, speculate)
        assert fast == exact
        steps = len(schedule(settings))
        gave_up = exact[3] == steps and exact[1] > tau
        outcomes.add("gave up" if gave_up else "passed")
        bound = 2 * (exact[3]).bit_length() + 1  # galloping to the bracket, then bisecting it
        if gave_up:
            # exact mode scores the give-up set once more, asking for the official layout (it becomes refinement's
            # threshold); a plain scorer answers the same
            assert exact_sets == steps + 1 and sum(calls) == len({min(2 ** i - 1, steps - 1) for i in range(6)})
        elif speculate == 1:
            assert sum(calls) <= bound
        else:
            assert len(calls) <= bound
    assert outcomes == ({"gave up"} if tau == 0.01 else {"passed"}) or tau == 0.1


def test_bisection_returns_the_first_passing_step_it_brackets_when_scores_are_not_monotone():
    steps = len(schedule(LocalizeSettings()))
    passing = {3, 4, 9, steps - 1}  # passes at 3 and 4, fails again at 5-8 (not monotone)

    def score(cands, reject=None, near=None):
        out = []
        for c in cands:
            j = next(i for i, (theta, k) in enumerate(schedule(LocalizeSettings())) if c == _cands[i])
            out.append(torch.tensor([0.1 if j in passing else 0.9]))
        return out

    acts = {"a": torch.linspace(0, 1, 40)}
    from harden.nemo.localize import ood_candidates
    from harden.nemo.stats import NeuronStats

    stats = NeuronStats({"a": torch.full((40,), 0.5)}, {"a": torch.full((40,), 0.1)}, 10)
    _cands = [ood_candidates(acts, stats, theta, k) for theta, k in schedule(LocalizeSettings())]
    lists, s, tau, step = bisect_initial(score, acts, stats, LocalizeSettings())
    assert s == pytest.approx(0.1) and step - 1 in passing and step - 2 not in passing  # a bracketed first pass
    assert lists == _cands[step - 1] and tau == LocalizeSettings().tau_refine


def test_single_necessary_neuron_costs_a_few_tests():
    truth = ("b", 7)
    calls = []

    def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):
        calls.extend(cands)
        return [torch.tensor([0.1 if truth[1] in c.get(truth[0], []) else 0.9]) for c in cands]

    initial = {"a": list(range(20)), "b": list(range(12)) + [7]}
    final, s = group_refine(score, initial, 0.5, ["a", "b"], 0.1, LocalizeSettings())
    assert final == {"a": [], "b": [7]} and s == pytest.approx(0.1)
    # exact mode's sequential refinement needs 2 + 12 here, one per neuron in "b"; fast mode 10, plus the initial
    # set once (its per-seed scores pick the screening seeds)
    assert len(calls) <= 11


def test_rel_threshold_and_nothing_removable():
    def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):  # every neuron matters
        return [torch.tensor([0.1 + 0.1 * (4 - sum(len(v) for v in c.values()))]) for c in cands]

    initial = {"a": [0, 1], "b": [2, 3]}
    final, s = group_refine(score, initial, 0.15, ["a", "b"], 0.1, LocalizeSettings())
    assert final == initial and s == pytest.approx(0.1)
    final, _ = group_refine(score, initial, 0.15, ["a", "b"], 0.1, LocalizeSettings(rel_threshold=1.5))
    assert final == {"a": [0, 1], "b": [3]}  # relative change < 150% allows one removal; layers in reverse order


def test_compare_modes_reports_the_numbers():
    def result(neurons, score, memorized=True):
        return PromptResult("p", memorized, [0.9], [0], {}, 0.1, 1, 0.428, NeuronSet({"l": tuple(neurons)}), score,
                            5, 50)

    exact = [result([1, 2], 0.2), result([3], 0.3), result([4, 5, 6], 0.1), result([], 0.0, False)]
    fast = [result([1, 2], 0.25), result([3, 9], 0.35), result([4, 5, 6, 7], 0.1), result([], 0.0, False)]
    out = compare_modes(exact, fast)
    assert out["prompts"] == 3 and out["same_sets"] == 1
    assert out["exact"]["neurons_median"] == 2 and out["fast"]["neurons_median"] == 2
    assert out["exact"]["neurons_max"] == 3 and out["fast"]["neurons_max"] == 4
    assert out["fast"]["score_max"] == pytest.approx(0.35) and out["exact"]["below_threshold"] == 3
    assert out["fast"]["union"] == 8 and out["exact"]["union"] == 6 and out["neurons_median_ratio"] == 1.0
    with pytest.raises(ValueError):
        compare_modes(exact, fast[:2])


def test_screening_seeds_grow_until_the_result_passes_on_every_seed():
    """The search runs on the seeds closest to failing; a result that fails on another seed brings that seed into
    the screen, and the final set passes on all seeds and is 1-minimal on all of them."""
    from harden.nemo.fast import SCREEN_SHARE

    base = torch.tensor([0.40, 0.30, 0.10, 0.05, 0.05])  # with the initial set blocked: seed 0 is the screen
    assert round(SCREEN_SHARE * len(base)) == 2

    def per_seed(c):  # "x" only matters for seed 2 (not screened at first), "y" for seeds 0 and 1, "z" for none
        blocked = set(c.get("a", []))
        s = base.clone()
        s[2] += 0.0 if "x" in blocked else 0.6
        s[:2] += 0.0 if "y" in blocked else 0.3
        return s

    calls = []

    def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):
        calls.append((len(cands), None if seeds is None else tuple(seeds)))
        return [_on(per_seed(c), seeds) for c in cands]

    initial = {"a": ["x", "y", "z"]}
    final, s = group_refine(score, initial, 0.5, ["a"], 0.4, LocalizeSettings(), block=4)
    assert final == {"a": ["x", "y"]} and s == pytest.approx(0.4)
    _check_minimal(lambda cands: [per_seed(c) for c in cands], final, 0.5)
    screens = [seeds for _, seeds in calls if seeds is not None]
    assert screens[0] == (0, 1) and screens[-1] == (0, 1, 2)  # seed 2 joined after the first result failed on it


def test_fast_mode_batches_its_tests_on_any_device_and_whatever_the_pooling():
    """Exact mode speculates only on CUDA; fast mode's rounds are tests that run anyway: FAST_BLOCK per call on a CPU
    too, independent of how many prompts share the forwards (so a prompt's result does not depend on them)."""
    from types import SimpleNamespace

    from harden.nemo.batching import FAST_BLOCK, Batching, resolve_batching

    cpu = SimpleNamespace(unet=torch.nn.Linear(1, 1), _auto_batch_size=160)
    assert resolve_batching(cpu, 10, sharing=8) == Batching(160, 1, 1)
    assert resolve_batching(cpu, 10, sharing=8, early_reject=True) == Batching(160, 1, 1)
    assert resolve_batching(cpu, 10, sharing=8, independent=True) == Batching(160, 1, FAST_BLOCK)
    assert resolve_batching(cpu, 10, sharing=1, independent=True) == Batching(160, 1, FAST_BLOCK)
    # with early rejection fast mode's initial selection is exact mode's sweep, probed with one seed per step
    assert resolve_batching(cpu, 10, sharing=8, independent=True, early_reject=True) == Batching(160, 20, FAST_BLOCK)
    assert resolve_batching(cpu, 10, 64, 3, 5, sharing=8, independent=True) == Batching(64, 3, 5)


def test_early_rejection_is_on_by_default_except_exact_mode_on_cuda():
    from harden.nemo.batching import early_rejection

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert early_rejection(None, cpu, fast=False) and early_rejection(None, cpu, fast=True)
    assert early_rejection(None, cuda, fast=True) and not early_rejection(None, cuda, fast=False)
    assert not early_rejection(False, cpu, fast=True) and early_rejection(True, cuda, fast=False)


@pytest.mark.parametrize("early_reject", [False, True])
def test_fast_mode_on_a_unet_ends_below_threshold_and_one_minimal_on_every_seed(early_reject):
    """End to end with a real scorer (screening seeds; with early rejection a survivor's probe counts as its seed's
    score in the screen; the initial set's known scores pick the screen): the result, scored here afresh on all
    seeds, is below tau_refine, and every single drop from it is not (within TIE_BAND, which fast mode counts as
    failing)."""
    from micro_model import micro_model

    from harden.bench import forced_settings
    from harden.nemo.fast import localize_prompt_fast
    from harden.nemo.localize import TIE_BAND
    from harden.nemo.score import NoiseDiffScorer
    from harden.nemo.stats import value_activations

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet, targets, stats, settings, g = micro_model()
        embed = torch.randn(1, 77, 32, generator=g)
        acts = {k: v[0] for k, v in value_activations(embed, targets).items()}
        loc = forced_settings(NoiseDiffScorer(unet, targets, 961, settings), embed, acts, stats, 3)
        found = localize_prompt_fast(NoiseDiffScorer(unet, targets, 961, settings), embed, acts, stats, loc, "p",
                                     early_reject=early_reject)
        check = NoiseDiffScorer(unet, targets, 961, settings)
        kept = torch.tensor(found.kept_seeds)
        reference = check.unblocked(embed)[kept]
        final = {t.name: list(found.refined.to_json().get(t.name, [])) for t in targets}
        drops = [{**final, layer: [x for x in idx if x != n]} for layer, idx in final.items() for n in idx]
        scores = check.blocked_scores(embed, kept, reference, [final] + drops)
    finally:
        torch.set_num_threads(threads)
    assert found.memorized and len(kept) == settings.n_seeds and 0 < len(found.refined) < len(NeuronSet(found.initial))
    assert float(scores[0].max()) == pytest.approx(found.refined_score, abs=5e-6)
    assert found.refined_score < loc.tau_refine
    assert min(float(s.max()) for s in scores[1:]) >= loc.tau_refine - TIE_BAND - 5e-6


def test_a_sweep_removes_its_passing_drops_together():
    """Scores are not monotone in the set: while "z" is blocked, unblocking any "p" costs 0.3 more, so every "p" fails
    in the group phase; once "z" is gone, each "p" passes alone (and all four together, 0.34 < 0.35). The sweep must
    remove the four in one step (a sequential sweep removes one per sweep and re-tests the rest each time)."""
    from harden.nemo.fast import _group_search
    from harden.nemo.localize import rejects_above

    def per_seed(c):
        blocked = set(c.get("a", []))
        if "n" not in blocked:
            return torch.tensor([0.9])
        free = sum(p not in blocked for p in ("p1", "p2", "p3", "p4"))
        return torch.tensor([0.1 + (0.3 if "z" in blocked and free else 0.0) + 0.06 * free])

    def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):
        return [per_seed(c) for c in cands]

    initial = {"a": ["z", "n", "p1", "p2", "p3", "p4"]}
    final, s, history = _group_search(score, initial, per_seed(initial), ["a"], 32, [0],
                                      lambda r, seeds: float(r.max()) < 0.35 - 1e-4, rejects_above(0.35, False))
    assert final == {"a": ["n"]} and s == pytest.approx(0.34)
    assert history == [{"a": ["n", "p1", "p2", "p3", "p4"]}, {"a": ["n"]}]  # "z" first, then the four together


def test_probe_rounds_pass_on_every_seed_one_minimal_and_score_fewer_seeds():
    """With early rejection a round is scored on the probe seed only (`probe="only"`) and its survivors are
    confirmed through their union on the other screening seeds. The result must still pass on every kept seed and
    be 1-minimal, for fewer seed evaluations than confirming each survivor on its own."""
    totals = {None: 0, "only": 0}
    for seed in range(8):
        lists_score, _ = synthetic_scorer(WIDTHS, seed, n_important=6, n_seeds=10)
        initial = {n: list(range(w)) for n, w in zip(NAMES, WIDTHS)}
        per_seed = lists_score([initial[n] for n in NAMES])
        tau = float(per_seed.max()) * 1.4  # the initial set passes; the planted neurons are needed
        settings = LocalizeSettings(tau_refine=tau)
        for honour in totals:
            lead = [0]  # the probe: the seed that last failed a test, as localize_with's scorer keeps it

            def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):
                out = []
                for c in cands:
                    s = _on(lists_score([c.get(n, []) for n in NAMES]), seeds)
                    mine = list(range(len(s)))
                    first = lead[0] if lead[0] in mine else 0
                    if reject is not None and len(s) > 1 and probe != "never":
                        totals[honour] += 1
                        if probe == "only" and honour == "only" or reject(s[first:first + 1]):
                            out.append(s[first:first + 1])
                            continue
                    totals[honour] += len(s)
                    if reject is not None and reject(s):
                        lead[0] = int(s.argmax())
                    out.append(s)
                return out

            final, s1 = group_refine(score, initial, tau, NAMES, float(per_seed.max()), settings)
            full = lambda lists: lists_score([lists.get(n, []) for n in NAMES])  # noqa: E731
            assert float(full(final).max()) == pytest.approx(s1) and s1 < tau
            for layer, idx in final.items():
                for x in idx:
                    assert float(full({**final, layer: [y for y in idx if y != x]}).max()) >= tau - 1e-4
    assert totals["only"] < 0.8 * totals[None]
