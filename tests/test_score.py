import pytest
import torch
from torchmetrics.functional import multiscale_structural_similarity_index_measure as tm_ms_ssim

from harden.errors import BadInputError
from harden.hooks import channel_masks
from harden.nemo.score import (NoiseDiffScorer, ScoreSettings, calibrate_threshold, detection_timestep,
                               initial_latents, max_pairwise_scores, ms_ssim, ms_ssim_groups, normalize,
                               pairwise_max)
from harden.nemo.stats import encode_prompts
from harden.targets import resolve_targets

SD14_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def test_timestep_is_961_for_sd_v1():
    assert detection_timestep(SD14_SCHEDULER, ScoreSettings()) == 961


def test_latents_are_one_seeded_draw():
    torch.manual_seed(1)
    expected = torch.randn(10, 4, 64, 64)
    assert torch.equal(initial_latents(10, (4, 64, 64), 1), expected)


def test_normalize_is_per_sample_and_channel():
    d = torch.randn(3, 4, 8, 8) * torch.arange(1, 5).view(1, 4, 1, 1) + 5
    n = normalize(d)
    assert torch.allclose(n.amin(dim=(2, 3)), torch.zeros(3, 4))
    assert torch.allclose(n.amax(dim=(2, 3)), torch.ones(3, 4))


def test_pairwise_max_is_the_official_computation():
    x = normalize(torch.randn(10, 4, 64, 64, generator=torch.Generator().manual_seed(0)))
    x[3] = x[7] * 0.9 + 0.05  # one very similar pair
    pairs = torch.combinations(torch.arange(10), r=2)
    official = tm_ms_ssim(x[pairs[:, 0]], x[pairs[:, 1]], reduction="none", kernel_size=11,
                          betas=(0.33, 0.33, 0.33))
    expected = torch.stack([official[(pairs == i).max(-1).values].max() for i in range(10)])
    got = pairwise_max(x, ScoreSettings())
    assert torch.equal(got, expected)
    assert got[3] == got[7] and got[3] > 0.9 and got[0] < 0.3


def test_identical_inputs_score_one_and_small_latents_are_refused():
    x = normalize(torch.randn(2, 4, 64, 64))
    assert torch.allclose(ms_ssim(x, x, ScoreSettings()), torch.ones(2))
    with pytest.raises(BadInputError, match="too small"):
        ms_ssim(x[..., :32, :32], x[..., :32, :32], ScoreSettings())
    small = ScoreSettings(kernel_size=3)  # passes torchmetrics' own size check, but the 11-tap window does not fit
    with pytest.raises(BadInputError, match="coarsest scale"):
        ms_ssim(x[..., :16, :16], x[..., :16, :16], small)
    two_scales = ScoreSettings(kernel_size=3, betas=(0.5, 0.5))
    assert torch.allclose(ms_ssim(x[..., :16, :16], x[..., :16, :16], two_scales), torch.ones(2))


@pytest.mark.parametrize("side, settings", [(64, ScoreSettings()), (16, ScoreSettings(kernel_size=7, betas=(0.5, 0.5))),
                                            (48, ScoreSettings(kernel_size=5, betas=(0.2, 0.3, 0.5)))])
def test_grouped_ms_ssim_equals_one_torchmetrics_call_per_group(side, settings):
    """Each group keeps its own data range (max - min over the group, at every scale): groups of very different
    ranges and sizes, one pass, equal to one `ms_ssim` call per group."""
    g = torch.Generator().manual_seed(side)
    sizes = [1, 4, 10, 3, 1]
    gains = torch.tensor([1.0, 0.05, 3.0, 1.0, 0.5]).repeat_interleave(torch.tensor(sizes)).view(-1, 1, 1, 1)
    a = torch.rand(sum(sizes), 4, side, side, generator=g) * gains
    b = (a + 0.2 * torch.rand(a.shape, generator=g)) * gains
    expected = torch.cat([ms_ssim(x, y, settings) for x, y in zip(a.split(sizes), b.split(sizes))])
    got = ms_ssim_groups(a, b, sizes, settings)
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ms_ssim(a, b, settings), expected, atol=1e-3)  # one batch-wide range differs
    with pytest.raises(ValueError, match="do not split"):
        ms_ssim_groups(a, b, [5, 5], settings)
    with pytest.raises(BadInputError, match="too small"):
        ms_ssim_groups(a[..., :8, :8], b[..., :8, :8], sizes, settings)


def test_threshold_is_mean_plus_one_std():
    s = torch.tensor([0.3, 0.35, 0.4, 0.45])
    assert calibrate_threshold(s) == pytest.approx(float(s.mean() + s.std()))


def _scorer(pipe, **kw):
    targets = resolve_targets(pipe.unet)
    settings = ScoreSettings(kernel_size=7, n_seeds=4, **kw)
    return NoiseDiffScorer(pipe.unet, targets, 961, settings), targets


def test_batched_candidates_equal_separate_module_wide_masks(tiny):
    scorer, targets = _scorer(tiny, max_batch=5)  # forces candidates to straddle UNet batches
    embed = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a cat on a mat"])
    kept = torch.tensor([0, 2, 3])
    ref = scorer.unblocked(embed)[kept]
    cands = [{targets[0].name: [1, 2, 2]}, {}, {targets[3].name: [0], targets[6].name: list(range(10))}]
    together = scorer.blocked_scores(embed, kept, ref, cands)
    for cand, got in zip(cands, together):
        masks = {n: torch.ones(1, scorer.widths[n]).index_fill_(1, torch.tensor(sorted(set(i))), 0.0)
                 for n, i in cand.items()}
        with torch.no_grad(), channel_masks(targets, masks):
            eps = tiny.unet(scorer.latents[kept], 961, encoder_hidden_states=embed.expand(3, -1, -1)).sample
        direct = ms_ssim(ref, normalize(eps - scorer.latents[kept]), scorer.settings)
        assert torch.allclose(got, direct, atol=1e-5)
    assert torch.allclose(together[1], torch.ones(3), atol=1e-5)  # blocking nothing = the reference itself


def test_prompt_batched_detection_equals_per_prompt(tiny):
    scorer, _ = _scorer(tiny)
    embeds = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["one prompt", "another prompt", "a third"])
    batched = max_pairwise_scores(scorer, embeds)
    single = torch.stack([pairwise_max(scorer.unblocked(e[None]), scorer.settings).max() for e in embeds])
    assert torch.allclose(batched, single, atol=1e-5)
    assert scorer.counter.unet_forwards == 1 + 3 and scorer.counter.sample_forwards == 12 + 12


def test_broadcast_mask_spans_unet_chunks(tiny):
    scorer, targets = _scorer(tiny, max_batch=3)
    embed = encode_prompts(tiny.tokenizer, tiny.text_encoder, ["a cat on a mat"])
    name = targets[1].name
    broadcast = {name: torch.ones(1, scorer.widths[name]).index_fill_(1, torch.tensor([0, 4]), 0.0)}
    per_sample = {name: broadcast[name].expand(4, -1)}
    seeds = torch.arange(4)
    a = scorer.noise_diff(embed.expand(4, -1, -1), seeds, broadcast)
    b = scorer.noise_diff(embed.expand(4, -1, -1), seeds, per_sample)
    assert torch.allclose(a, b, atol=1e-6) and scorer.counter.unet_forwards == 4
