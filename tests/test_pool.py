"""Prompts searched side by side share UNet forwards and still get each prompt's sequential results."""

import threading

import pytest
import torch
from micro_model import micro_model

from harden.bench import forced_settings
from harden.nemo.fast import localize_prompt_fast
from harden.nemo.localize import TIE_BAND, LocalizeSettings, localize_prompt
from harden.nemo.pool import ForwardPool, PooledScorer, run_pooled
from harden.nemo.reference import reference_localize_prompt
from harden.nemo.score import NoiseDiffScorer
from harden.nemo.stats import value_activations


@pytest.fixture(scope="module")
def three_prompts():
    """`micro_model` with three random prompts, each with its own forced search path."""
    unet, targets, stats, settings, g = micro_model()
    prompts = []
    for i in range(3):
        embed = torch.randn(1, 77, 32, generator=g)
        acts = {k: v[0] for k, v in value_activations(embed, targets).items()}
        loc = forced_settings(NoiseDiffScorer(unet, targets, 961, settings), embed, acts, stats, 2 + i % 2)
        prompts.append((embed, acts, loc))
    return unet, targets, stats, settings, prompts


GIVE_UP = LocalizeSettings(use_theta=False, k_start=2, k_max=4, tau_initial=-1.0)  # refine against the last score


@pytest.mark.parametrize("localize,path", [(localize_prompt, "forced"), (localize_prompt_fast, "forced"),
                                           (localize_prompt, "give-up")])
def test_side_by_side_prompts_get_their_sequential_results_in_fewer_forwards(three_prompts, localize, path):
    """A give-up refines against its own last score, where many drops change the score by less than float noise:
    side by side those ties are decided in the official layout, and the sets are the official order's."""
    unet, targets, stats, settings, prompts = three_prompts
    if path == "give-up":
        prompts = [(e, a, GIVE_UP) for e, a, _ in prompts]
    jobs = [lambda s, p=p: localize(s, p[0], p[1], stats, p[2], "p") for p in prompts]
    runs = {}
    for workers in (1, 3):
        scorer = NoiseDiffScorer(unet, targets, 961, settings)
        finished = []
        results = run_pooled(scorer, jobs, batch_size=64, workers=workers,
                             on_done=lambda i, r: finished.append(i))
        runs[workers] = (results, scorer.counter.unet_forwards, scorer.counter.sample_forwards)
        assert sorted(finished) == [0, 1, 2]
    (alone, alone_forwards, alone_samples), (shared, shared_forwards, shared_samples) = runs[1], runs[3]
    assert all(r.memorized and len(r.refined) > 0 for r in alone)
    assert len({str(r.refined.to_json()) for r in alone}) > 1  # three different searches, not one repeated
    for a, s in zip(alone, shared):
        assert (a.initial, a.refined, a.iterations) == (s.initial, s.refined, s.iterations)
        assert s.refined_score == pytest.approx(a.refined_score, abs=5e-6)  # another batch layout: last-bit rounding
        # alone, each test already runs in the official layout; side by side, a score within TIE_BAND of its
        # threshold is scored again alone (plus, once, the official unblocked deltas), and the give-up score,
        # which becomes the threshold, is scored alone instead of in a shared forward
        assert a.tie_checks == 0
        official = s.tie_checks + (s.tie_checks > 0) - (path == "give-up")
        assert s.unet_forwards == a.unet_forwards + official
        assert s.sample_forwards == a.sample_forwards + official * settings.n_seeds
    assert alone_samples == sum(r.sample_forwards for r in alone)
    assert alone_forwards == sum(r.unet_forwards for r in alone)
    assert shared_samples == sum(r.sample_forwards for r in shared)
    # each shared forward holds one request of every prompt still searching (all fit in 64 samples), so without
    # re-checks there are as many as the longest search needs; a re-check is a forward of its own
    assert max(r.unet_forwards for r in shared) <= shared_forwards < alone_forwards
    if not any(r.tie_checks for r in shared):
        assert shared_forwards == max(r.unet_forwards for r in alone)
    if path == "give-up":
        assert all(r.tie_checks > 0 for r in shared)
        # whatever the shared layout moved (float noise, or nothing where the kernels are layout-invariant: the
        # machine decides) stayed far inside the band
        assert 0 <= max(r.tie_shift for r in shared) < TIE_BAND / 10
        for p, s in zip(prompts, shared):
            official = reference_localize_prompt(NoiseDiffScorer(unet, targets, 961, settings), p[0], p[1], stats,
                                                 p[2], "p")
            assert (official.initial, official.refined) == (s.initial, s.refined) and len(s.refined) > 0
            assert official.refined_score == pytest.approx(s.refined_score, abs=5e-6)


def test_a_failing_prompt_stops_the_pool_without_hanging_the_others(three_prompts):
    unet, targets, stats, settings, prompts = three_prompts
    scorer = NoiseDiffScorer(unet, targets, 961, settings)
    started = []

    def broken(shared):
        shared.unblocked(prompts[0][0])  # one shared forward, then a bug in the search
        raise ValueError("search bug")

    def slow(shared):
        started.append(1)
        for _ in range(3):
            shared.unblocked(prompts[1][0])
        return "ok"

    with pytest.raises(ValueError, match="search bug"):
        run_pooled(scorer, [broken, slow, slow, slow], batch_size=64, workers=2)
    assert len(started) == 1  # the job after the failure was never taken
    assert threading.active_count() == 1 or all(not t.name.startswith("harden-localize")
                                                for t in threading.enumerate())


def test_a_forward_error_reaches_every_waiting_prompt(three_prompts):
    unet, targets, stats, settings, prompts = three_prompts
    scorer = NoiseDiffScorer(unet, targets, 961, settings)
    pool = ForwardPool(scorer, 2, 64)
    bad = {"no_such_layer": torch.ones(1, 8)}  # channel_masks refuses unknown layers inside the shared forward
    errors = []

    def request(worker, masks):
        try:
            PooledScorer(scorer, pool, worker).noise_diff(prompts[0][0].expand(2, -1, -1), torch.arange(2), masks)
        except KeyError as err:
            errors.append((worker, str(err)))

    threads = [threading.Thread(target=request, args=(0, None)), threading.Thread(target=request, args=(1, bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(w for w, _ in errors) == [0, 1] and "no_such_layer" in errors[0][1]


def test_masks_of_different_layers_merge_per_sample(three_prompts):
    """One shared forward with differently masked requests == each request's own forward."""
    unet, targets, stats, settings, prompts = three_prompts
    scorer = NoiseDiffScorer(unet, targets, 961, settings)
    a, b = targets[0].name, targets[-1].name
    requests = [(prompts[0][0].expand(2, -1, -1), torch.tensor([0, 1]), {a: torch.zeros(1, targets[0].width)}),
                (prompts[1][0].expand(3, -1, -1), torch.tensor([1, 2, 3]), None),
                (prompts[2][0].expand(2, -1, -1), torch.tensor([2, 3]),
                 {b: torch.rand(2, targets[-1].width, generator=torch.Generator().manual_seed(3))})]
    alone = [scorer.noise_diff(*r) for r in requests]
    pool = ForwardPool(scorer, len(requests), 64)
    shared = [None] * len(requests)

    def request(worker):
        shared[worker] = PooledScorer(scorer, pool, worker).noise_diff(*requests[worker])

    before = scorer.counter.unet_forwards
    threads = [threading.Thread(target=request, args=(w,)) for w in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert scorer.counter.unet_forwards - before == 1
    for x, y in zip(alone, shared):
        assert x.shape == y.shape and (x - y).abs().max() < 1e-4
    assert (alone[0] - scorer.noise_diff(*requests[0][:2])).abs().max() > 1e-3  # the mask did matter
