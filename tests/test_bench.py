"""`harden bench` on the planted model: speed-up lines, JSON with deterministic forward counts (no timed asserts)."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from harden.cli import app
from harden.nemo.fast import SCREEN_SHARE


@pytest.mark.slow
def test_bench_planted_prints_speedups_and_writes_forward_counts(tmp_path):
    threads = torch.get_num_threads()
    try:
        out = CliRunner().invoke(app, ["bench", "--model", "planted", "--prompts", "2", "--seeds", "6", "--threads",
                                       "1", "--calib-prompts", "8", "--no-early-reject",
                                       "--json", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(threads)
    assert out.exit_code == 0, out.output
    assert re.search(r"^exact +speed-up \d+\.\d\d ", out.output, re.M)
    assert re.search(r"^fast +speed-up \d+\.\d\d ", out.output, re.M)
    assert "same neuron sets yes" in out.output and "prompts/s" in out.output
    report = json.loads((tmp_path / "b.json").read_text())
    modes = report["modes"]
    memorized = {m: modes[m]["prompts"][0] for m in modes}
    # official budget: 2 forwards x 6 seeds per noise-diff call (unblocked, initial, re-baseline, all-blocked,
    # layer test, neuron test, final score) + one batch-1 activation forward
    assert (memorized["reference"]["unet_forwards"], memorized["reference"]["sample_forwards"]) == (15, 85)
    kept = 6  # the planted prompt keeps every seed
    # exact: the unblocked pass, initial step 0 (passes), the layer test and the neuron test (both fail)
    assert (memorized["exact"]["unet_forwards"], memorized["exact"]["sample_forwards"]) == (4, 6 + 3 * kept)
    # fast: the unblocked pass, initial step 0 and the layer test on the screening seeds only (a failed group of
    # one is not tested again); the screen is picked from step 0's known per-seed scores, and the result (the
    # initial set) needs no check on all kept seeds: it was scored on them in step 0
    screen = max(1, round(SCREEN_SHARE * kept))
    assert (memorized["fast"]["unet_forwards"], memorized["fast"]["sample_forwards"]) == (3, 6 + kept + screen)
    for m in modes:
        assert memorized[m]["neuron_set"] == {"down_blocks.0.attentions.0.transformer_blocks.0.attn2": [5]}
        assert memorized[m]["score"] < 0.428
        assert not modes[m]["prompts"][1]["memorized"]
    assert modes["reference"]["prompts"][1]["unet_forwards"] == 2 and modes["exact"]["prompts"][1]["unet_forwards"] == 1
    assert modes["reference"]["total"]["unet_forwards"] == 17 and modes["exact"]["total"]["sample_forwards"] == 30
    assert report["speedup"]["exact"]["sample_forwards"] == 97 / 30
    assert report["exact_equals_reference"] == {"same_sets": True, "max_score_diff": 0.0}
    assert report["compare"]["same_sets"] == 1 and report["calibration"]["prompts"] == 8
    assert [modes[m]["total"]["early_reject"] for m in modes] == [False, False, False]


def test_bench_refuses_bad_options(tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["bench", "--model", "nope"])
    assert out.exit_code == 2 and "nope" in out.output
    out = runner.invoke(app, ["bench", "--model-dir", str(tmp_path)])
    assert out.exit_code == 2 and "model_index.json" in out.output
    out = runner.invoke(app, ["bench", "--model", "planted", "--modes", "exact,slow"])
    assert out.exit_code == 2 and "slow" in out.output


def test_a_planted_value_neuron_is_selected_for_its_prompt_and_moves_the_score():
    """sd14-random plants neurons so that single drops matter beyond fast mode's 1e-4 margin: the planted channel
    must be the prompt's top activation in its layer (top-k selects it) and blocking it must move the score far
    more than blocking the same channel did before planting."""
    from micro_model import micro_model

    from harden.bench import _acts, plant_value_neurons
    from harden.nemo.score import NoiseDiffScorer

    unet, targets, _, settings, g = micro_model()
    refs, embed = torch.randn(32, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    scorer, kept, layer = NoiseDiffScorer(unet, targets, 961, settings), torch.arange(4), targets[0].name

    def effect() -> float:  # 1 - score of blocking channel 3 alone: how far it moves the output
        return 1 - float(scorer.blocked_scores(embed, kept, scorer.unblocked(embed), [{layer: [3]}])[0].max())

    before = effect()
    plant_value_neurons(targets, embed, refs, {layer: 3})
    assert int(_acts(embed, targets)[layer].argmax()) == 3
    after = effect()
    assert after > max(1e-3, 10 * before)
