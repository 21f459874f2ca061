"""Integration on a tiny UNet where one planted value neuron carries a prompt's memorization signal."""

from harden.tiny import HELD_OUT, MEMORIZED, REFERENCES
from harden.neurons import NeuronSet
from harden.nemo.localize import LocalizeSettings, localize_prompt
from harden.nemo.score import NoiseDiffScorer, ScoreSettings, calibrate_threshold, max_pairwise_scores
from harden.nemo.stats import compute_stats, encode_prompts, iter_embeddings, value_activations
from harden.prune import prune_compact, prune_dense
from harden.targets import resolve_targets


def _setup(planted):
    pipe, layer = planted
    targets = resolve_targets(pipe.unet)
    scorer = NoiseDiffScorer(pipe.unet, targets, 961, ScoreSettings(kernel_size=7))
    stats = compute_stats(iter_embeddings(pipe.tokenizer, pipe.text_encoder, REFERENCES, 8), targets)
    return pipe, layer, targets, scorer, stats


def test_calibration_and_detection_separate_the_planted_prompt(planted):
    pipe, layer, targets, scorer, stats = _setup(planted)
    embed = encode_prompts(pipe.tokenizer, pipe.text_encoder, [MEMORIZED])
    z = stats.zscores(value_activations(embed, targets))
    assert z[layer][0, 5] > 5  # the planted neuron is an outlier for the memorized prompt...
    ref_embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, REFERENCES + HELD_OUT)
    ref_scores = max_pairwise_scores(scorer, ref_embeds)
    tau = calibrate_threshold(ref_scores[: len(REFERENCES)])
    mem_score = max_pairwise_scores(scorer, embed)[0]
    assert mem_score > 0.428 > float(ref_scores.max())  # ...and only that prompt reproduces a fixed pattern
    assert mem_score > tau


def test_localization_returns_the_planted_neuron_and_pruning_removes_it(planted):
    pipe, layer, targets, scorer, stats = _setup(planted)
    embed = encode_prompts(pipe.tokenizer, pipe.text_encoder, [MEMORIZED])
    acts = {k: v[0] for k, v in value_activations(embed, targets).items()}
    result = localize_prompt(scorer, embed, acts, stats, LocalizeSettings(), MEMORIZED)
    assert result.memorized and len(result.kept_seeds) >= 5
    assert result.refined == NeuronSet({layer: (5,)})
    assert result.initial[layer] == [5] and result.iterations == 1 and result.refined_score < 0.428
    assert result.unet_forwards == 4  # unblocked, initial set, layer-level test, neuron-level test
    assert result.sample_forwards == 10 + 3 * len(result.kept_seeds)

    # a wide initial set (theta 2, top-3 per layer): refinement must still cut it down to the planted neuron
    wide = localize_prompt(scorer, embed, acts, stats, LocalizeSettings(theta_start=2.0, k_start=3), MEMORIZED)
    assert sum(map(len, wide.initial.values())) > 30 and all(wide.initial.values())
    assert wide.refined == NeuronSet({layer: (5,)})
    # 1 unblocked + 1 initial + 7 layer-level + one per neuron of the only layer that survives (a): dropping the
    # first of two copies leaves the same neurons blocked, so it is decided on the state's score without a forward
    assert len(set(wide.initial[layer])) < len(wide.initial[layer])  # the list has repeats (z-score and top-k)
    assert wide.unet_forwards == 1 + wide.iterations + 7 + len(set(wide.initial[layer]))

    fast = localize_prompt(NoiseDiffScorer(pipe.unet, targets, 961, ScoreSettings(kernel_size=7)), embed, acts,
                           stats, LocalizeSettings(), MEMORIZED, speculate=4)
    assert fast.refined == result.refined

    for pruned in (prune_compact(pipe.unet, result.refined), prune_dense(pipe.unet, result.refined)):
        after = max_pairwise_scores(NoiseDiffScorer(pruned, targets, 961, ScoreSettings(kernel_size=7)), embed)
        assert after[0] < 0.428


def test_non_memorized_prompt_is_reported_not_localized(planted):
    pipe, layer, targets, scorer, stats = _setup(planted)
    embed = encode_prompts(pipe.tokenizer, pipe.text_encoder, [HELD_OUT[1]])
    acts = {k: v[0] for k, v in value_activations(embed, targets).items()}
    result = localize_prompt(scorer, embed, acts, stats, LocalizeSettings(), HELD_OUT[1])
    assert not result.memorized and result.kept_seeds == [] and not result.refined
    assert result.unet_forwards == 1 and max(result.seed_scores) <= 0.428
    assert result.to_json()["neurons"] == {}
