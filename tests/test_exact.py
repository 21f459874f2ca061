"""Exact mode == the official execution order (harden.nemo.reference), with speculation, on synthetic scorers and on
a small random UNet with a forced search path; and strictly fewer forwards."""

import pytest
import torch
from micro_model import micro_model
from synthetic_search import NAMES, WIDTHS, search_problem

from harden.bench import forced_settings
from harden.nemo.localize import (TIE_BAND, LocalizeSettings, initial_selection, localize_prompt, refine,
                                  speculative_greedy)
from harden.nemo.reference import official_localize, reference_localize_prompt, settings_from_official, synthetic_scorer
from harden.nemo.score import NoiseDiffScorer
from harden.nemo.stats import value_activations


def _exact(score_lists, acts, stats, settings, speculate, block):
    calls = []

    def score(cands, reject=None, near=None, guess=None):
        calls.append(len(cands))
        return [score_lists([c.get(n, []) for n in NAMES]) for c in cands]

    initial, s0, tau, _ = initial_selection(score, dict(zip(NAMES, acts)), stats, settings, speculate)
    final, s1 = refine(score, initial, tau, NAMES, s0, settings, block)
    return [initial[n] for n in NAMES], [final.get(n, []) for n in NAMES], s1, calls


@pytest.mark.parametrize("params", [
    {}, dict(theta0=3.0, step=0.5, k0=2, tau_init=0.3, tau_ref=0.35), dict(no_top_k=True),
    dict(tau_init=0.05, tau_ref=0.05), dict(theta0=2.0, tau_init=0.6, tau_ref=0.6), dict(rel_threshold=0.5),
])
@pytest.mark.parametrize("block", [1, 2, 3, 8])
def test_speculative_refinement_matches_official_order(params, block):
    settings = settings_from_official(**params)
    for seed in range(6):
        acts, mean, std, stats = search_problem(seed)
        score, official_calls = synthetic_scorer(WIDTHS, seed + 7)
        expected = official_localize(score, acts, mean, std, **params)
        n_official = len(official_calls)
        initial, final, s, calls = _exact(score, acts, stats, settings, block, block)
        assert (initial, final) == (expected[0], expected[1])
        assert s == pytest.approx(expected[2], abs=1e-9)
        assert len(calls) < n_official  # no recomputed final score, no unused all-blocked call
        if block == 1:
            assert sum(calls) < n_official


def test_speculation_decides_like_the_sequential_loop_and_builds_on_predicted_states():
    outcome = [True, True, False, True, True, True, False, False, True, True, True]  # by trial index
    seen = []

    # trial i removes element i from [0..10]; the state after each decision is the set of survivors
    state = {"l": list(range(11))}
    trials = [lambda s, i=i: {"l": [x for x in s["l"] if x != i]} for i in range(11)]

    def sequential():
        s = state
        for t in trials:
            cand = t(s)
            idx = next(i for i in range(11) if i in s["l"] and i not in cand["l"])
            if outcome[idx]:
                s = cand
        return s

    def score_by_index(cands, reject=None, near=None, guess=None):
        seen.append(len(cands))
        out = []
        for c in cands:
            removed = [i for i in range(11) if i not in c["l"]]
            out.append(torch.tensor([0.1 if outcome[max(removed)] else 0.9]))
        return out

    final, _ = speculative_greedy(score_by_index, state, 1.0, trials, lambda r: float(r.max()) < 0.5, block=4)
    assert final == sequential() == {"l": [2, 6, 7]}
    assert sum(seen) >= 11 and len(seen) < 11  # batched, at least one evaluation per decision


@pytest.fixture(scope="module")
def micro():
    """`micro_model` and one random prompt. One thread: on a shared CPU two threads on such small ops mostly
    wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    unet, targets, stats, settings, g = micro_model()
    embed = torch.randn(1, 77, 32, generator=g)
    acts = {k: v[0] for k, v in value_activations(embed, targets).items()}
    yield unet, targets, stats, embed, acts, settings
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["default", "wider", "theta"])
def test_exact_equals_reference_on_a_unet_with_fewer_forwards(micro, variant):
    unet, targets, stats, embed, acts, settings = micro
    scorer = lambda: NoiseDiffScorer(unet, targets, 961, settings)  # noqa: E731
    if variant == "theta":  # OOD z-scores instead of top-k, non-default theta schedule
        base = LocalizeSettings(theta_start=2.0, theta_step=0.5, k_max=1280)
        loc = forced_settings(scorer(), embed, acts, stats, 2, base=base)
    else:
        loc = forced_settings(scorer(), embed, acts, stats, 2 if variant == "default" else 3,
                              0.75 if variant == "default" else 0.5)
    ref = reference_localize_prompt(scorer(), embed, acts, stats, loc, "p")
    assert ref.memorized and len(ref.kept_seeds) == 4 and len(ref.refined) > 0
    assert 0 < len(ref.refined) < sum(len(set(v)) for v in ref.initial.values())  # some removed, some kept
    samples = {}
    # speculative blocks, also with early rejection: every candidate of a block is probed with one seed, and the
    # block stops at its first outcome against the guess
    for name, kwargs in (("sequential", {}), ("batched", dict(speculate=4, refine_block=4, batch_size=64)),
                         ("probed", dict(speculate=4, refine_block=4, batch_size=64, early_reject=True))):
        got = localize_prompt(scorer(), embed, acts, stats, loc, "p", **kwargs)
        assert got.initial == ref.initial and got.refined == ref.refined
        assert got.iterations == ref.iterations
        # sequential: the same batches of the same seeds, so bit-identical; batched: fp32 GEMMs of another batch size
        # round differently in the last bits (scores here are ~0.99999, where that is ~1e-6)
        tol = 0.0 if not kwargs else 5e-6
        assert got.refined_score == pytest.approx(ref.refined_score, abs=tol)
        assert got.initial_score == pytest.approx(ref.initial_score, abs=tol)
        assert got.unet_forwards < ref.unet_forwards and got.sample_forwards < ref.sample_forwards
        samples[name] = got.sample_forwards
    assert samples["probed"] < samples["batched"]
    # the official budget: 2 forwards of all seeds per call, +1 batch-1 forward per initial iteration
    n_init = sum(len(v) > 0 for v in ref.initial.values())
    assert ref.unet_forwards >= 2 * (1 + ref.iterations + 2 + 1) + ref.iterations + 2 * n_init


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "theta"])
def test_exact_equals_reference_on_the_shipped_memorizer(variant):
    """The shipped organism with its calibrated tau_mem, one caption per variant, 4 seeds (fewer than NeMo's 10 keep
    the suite fast). Default schedule, and a non-default theta/k schedule."""
    from dataclasses import replace

    from harden.bench import MEMORIZER, memorizer_workload, run_modes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        work = memorizer_workload(MEMORIZER, 2, 4, torch.device("cpu"))
        if variant == "theta":  # the astronaut, with a short non-default schedule
            work.prompts = [(p, e, a, replace(loc, theta_start=2.5, theta_step=0.5, k_start=2))
                            for p, e, a, loc in work.prompts[:1]]
        else:  # the coffee cup with the default schedule
            work.prompts = work.prompts[1:]
        # the theta variant also stops at the first failing seed: same sets and bit-identical scores
        out = run_modes(work, ("reference", "exact"), log=lambda *_: None, early_reject=variant == "theta")
    finally:
        torch.set_num_threads(threads)
    assert out["exact_equals_reference"] == {"same_sets": True, "max_score_diff": 0.0}
    ref, exact = out["modes"]["reference"], out["modes"]["exact"]
    for r, e in zip(ref["prompts"], exact["prompts"]):
        assert r["memorized"] and r["neurons"] > 0 and r["neuron_set"] == e["neuron_set"]
        assert r["iterations"] == e["iterations"] and r["score"] == e["score"]
        assert e["sample_forwards"] * 2 < r["sample_forwards"]  # the discarded passes are gone, at least


def test_early_rejection_keeps_every_decision_and_scores_fewer_seeds():
    """A scorer that stops at the first seed proving a candidate fails (as localize_with's does) must leave initial
    selection and refinement with the same results, and score fewer seeds. Fast mode's rounds then run on the probe
    seed only (`probe="only"`), which may change its path: its result must still pass on every seed and be
    1-minimal."""
    from harden.nemo.fast import bisect_initial, group_refine

    totals = {False: 0, True: 0}
    for seed in range(6):
        acts, _, _, stats = search_problem(seed)
        score_lists, _ = synthetic_scorer(WIDTHS, seed, n_seeds=5)
        act_map = dict(zip(NAMES, acts))
        settings = LocalizeSettings(tau_initial=0.3, tau_refine=0.35)
        runs = {}
        for early in (False, True):
            seeds_scored = [0]

            def score(cands, reject=None, near=None, guess=None, seeds=None, probe=None):
                out = []
                for c in cands:
                    s = score_lists([c.get(n, []) for n in NAMES])
                    s = s if seeds is None else s[list(seeds)]
                    if early and reject is not None and probe == "only" and len(s) > 1:
                        seeds_scored[0] += 1
                        out.append(s[:1])  # the probe seed's score alone; survivors are confirmed by the caller
                        continue
                    if early and reject is not None:
                        first = s[:1]  # seed 0 alone: a partial answer
                        seeds_scored[0] += 1
                        if reject(first):
                            out.append(first)
                            continue
                    seeds_scored[0] += len(s)
                    out.append(s)
                return out

            initial, s0, tau, it = initial_selection(score, act_map, stats, settings)
            final, s1 = refine(score, initial, tau, NAMES, s0, settings)
            f_initial, f0, f_tau, _ = bisect_initial(score, act_map, stats, settings)
            fast, f1 = group_refine(score, f_initial, f_tau, NAMES, f0, settings)
            runs[early] = ((initial, s0, tau, it, final, s1, f_initial, f0), seeds_scored[0])
            assert float(score_lists([fast.get(n, []) for n in NAMES]).max()) == f1 < f_tau
            for layer in NAMES:  # 1-minimal on all seeds: every single drop fails
                for x in fast.get(layer, []):
                    trial = {**fast, layer: [y for y in fast[layer] if y != x]}
                    assert float(score_lists([trial.get(n, []) for n in NAMES]).max()) >= f_tau - TIE_BAND
        assert runs[True][0] == runs[False][0]
        totals[False], totals[True] = totals[False] + runs[False][1], totals[True] + runs[True][1]
    assert totals[True] < 0.8 * totals[False]
