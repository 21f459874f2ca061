"""SD 2.x: v-prediction, linear projections, per-block head counts, the wider penultimate-layer text encoder; the
NeMo score on the epsilon a v-prediction implies (by hand); `harden run` end to end on a tiny SD-2.x-shaped model."""

from __future__ import annotations

import json

import pytest
import torch
from arch_models import build, build_planted, unet_output, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.nemo.conditioning import encode
from harden.nemo.score import (NoiseDiffScorer, Prediction, ScoreSettings, detection_prediction, detection_timestep,
                               initial_latents, normalize)
from harden.targets import latent_size, resolve_targets
from harden.tiny import MEMORIZED, byte_tokenizer, sd2_text_encoder, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


@pytest.fixture(scope="module")
def sd2():
    return build("sd2")


def test_sd2_shape(sd2):
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    unet = sd2.unet.config
    assert unet.use_linear_projection and unet.upcast_attention and list(unet.attention_head_dim) == [2, 2, 4, 4]
    targets = resolve_targets(sd2.unet)
    assert len(targets) == 7  # NeMo's 7 layers, as in SD v1 and SD 2.x
    heads = [t.heads for t in targets]
    assert heads == [2, 2, 2, 2, 4, 4, 4] and {t.head_dim for t in targets} == {8}  # a head count per block
    v1 = tiny_pipeline(sample_size=32)
    assert sd2.text_encoder.config.hidden_size == 2 * v1.text_encoder.config.hidden_size
    assert sd2.text_encoder.config.hidden_act == "gelu" and sd2.tokenizer.pad_token == "!"


def test_embedding_is_the_penultimate_layer_as_the_pipeline_conditions(sd2):
    prompts = [MEMORIZED, "a green circle on a black background"]
    ours = encode(sd2, prompts)
    pipeline, _ = sd2.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(ours, pipeline.float())
    full = sd2_text_encoder(byte_tokenizer(pad_token="!"), full=True)  # the encoder before its last layer was cut
    ids = sd2.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = full(ids, output_hidden_states=True)
        penultimate = full.final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(ours, penultimate, atol=1e-6)
    assert not torch.allclose(ours, out.last_hidden_state, atol=1e-3)  # not the last layer's


def test_v_prediction_is_scored_on_its_epsilon_by_hand(sd2):
    """delta = eps - x_T with eps = sqrt(ab) v + sqrt(1 - ab) x_T, ab = alpha-bar at t = 961, normalized; the same
    epsilon DDIM's own step implies (through its x_0 prediction)."""
    from diffusers import DDIMScheduler

    settings = ScoreSettings(n_seeds=3, kernel_size=7)
    t = detection_timestep(sd2.scheduler.config, settings)
    prediction = detection_prediction(sd2.scheduler.config, settings)
    scheduler = DDIMScheduler.from_config(sd2.scheduler.config)
    alpha_bar = float(scheduler.alphas_cumprod[t])
    assert t == 961 and prediction == Prediction("v_prediction", alpha_bar) and 0 < alpha_bar < 0.01
    scorer = NoiseDiffScorer(sd2.unet, resolve_targets(sd2.unet), t, settings, prediction=prediction)
    embed = encode(sd2, [MEMORIZED])
    got = scorer.unblocked(embed)

    x = initial_latents(3, (4, *latent_size(sd2.unet)), seed=1)
    with torch.no_grad():
        v = sd2.unet(x, t, encoder_hidden_states=embed.expand(3, -1, -1)).sample
    eps = alpha_bar ** 0.5 * v + (1 - alpha_bar) ** 0.5 * x
    assert torch.allclose(got, normalize(eps - x), atol=1e-5)
    scheduler.set_timesteps(50)
    x0 = scheduler.step(v, t, x).pred_original_sample  # diffusers' v -> x_0
    assert torch.allclose(eps, (x - alpha_bar ** 0.5 * x0) / (1 - alpha_bar) ** 0.5, atol=1e-4)
    as_if_epsilon = NoiseDiffScorer(sd2.unet, resolve_targets(sd2.unet), t, settings).unblocked(embed)
    assert (as_if_epsilon - got).abs().max() > 1e-2  # reading v as epsilon would score something else


@pytest.mark.slow
def test_harden_run_end_to_end(tmp_path):
    """calibrate -> detect -> localize -> prune -> verify -> export on a saved SD-2.x-shaped pipeline: the planted
    neuron is found and removed; both exports reload (compact with trust_remote_code) and agree within 1e-5."""
    from diffusers import DiffusionPipeline

    pipe, layer, neuron = build_planted("sd2", tmp_path / "model")
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    detection = json.loads((out / "detect" / "detection.json").read_text())
    assert [p["memorized"] for p in detection["prompts"]] == [True, False]
    neurons = json.loads((out / "localize" / "neurons.json").read_text())["layers"]
    assert neurons == {layer: [neuron]}
    report = json.loads((out / "export" / "compact" / "harden" / "report.json").read_text())
    assert report["passed"] and report["neurons"]["total"] == 1 and len(report["neurons"]["layers_total"]) == 7
    assert report["export_check"]["max_abs_diff"] <= 1e-5
    compact = DiffusionPipeline.from_pretrained(out / "export" / "compact", trust_remote_code=True)
    dense = DiffusionPipeline.from_pretrained(out / "export" / "dense")
    assert type(compact.unet).__name__ == "CompactUNet2DConditionModel"
    assert compact.scheduler.config.prediction_type == "v_prediction"
    embeds = encode(pipe, [MEMORIZED, "a green circle on a black background"])
    a, b = unet_output(compact.unet, embeds), unet_output(dense.unet, embeds)
    assert float((a - b).abs().max()) <= 1e-5
    assert float((unet_output(pipe.unet, embeds) - b).abs().max()) > 1e-3  # the planted neuron is gone
