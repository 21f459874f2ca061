"""SDXL: two text encoders whose penultimate states form the context, the pooled embedding and time ids as added
conditions, several transformer layers per block; harden encodes, scores and gathers statistics as the pipeline
conditions its UNet; refiner-style pipelines are refused; `harden run` end to end on a tiny SDXL-shaped model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from arch_models import PLANTS, build, build_planted, unet_output, write_recipe
from typer.testing import CliRunner

from harden.cli import app
from harden.errors import BadInputError
from harden.nemo.conditioning import check_supported, encode, iter_encoded, unet_inputs
from harden.nemo.score import NoiseDiffScorer, ScoreSettings, detection_timestep, initial_latents, normalize
from harden.nemo.stats import compute_stats
from harden.targets import latent_size, resolve_targets
from harden.tiny import MEMORIZED, REFERENCES

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
PROMPTS = [MEMORIZED, "a green circle on a black background"]


@pytest.fixture(scope="module")
def sdxl():
    return build("sdxl")


def _pipeline_conditioning(pipe, prompts):
    context, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return context, pooled, time_ids.expand(len(prompts), -1)


def test_sdxl_shape(sdxl):
    config = sdxl.unet.config
    assert config.addition_embed_type == "text_time" and list(config.transformer_layers_per_block) == [1, 2, 2]
    assert config.cross_attention_dim == sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    everything = resolve_targets(sdxl.unet, "all")
    nemo = [t.name for t in resolve_targets(sdxl.unet)]
    assert len(everything) == 14 and nemo == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.2.attentions.0.transformer_blocks.1.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.1.attn2",
    ]
    assert all(t.to_v.in_features == 96 for t in everything)  # every value projection reads both encoders


def test_embedding_is_what_the_pipeline_gives_its_unet(sdxl):
    packed = encode(sdxl, PROMPTS)
    context, added = unet_inputs(sdxl.unet, packed)
    expected_context, pooled, time_ids = _pipeline_conditioning(sdxl, PROMPTS)
    assert torch.equal(context, expected_context) and torch.equal(added["text_embeds"], pooled)
    assert torch.equal(added["time_ids"], time_ids)
    penultimate = []  # both encoders' penultimate hidden states, concatenated (SDXL's context)
    for tokenizer, encoder in ((sdxl.tokenizer, sdxl.text_encoder), (sdxl.tokenizer_2, sdxl.text_encoder_2)):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            penultimate.append(encoder(ids, output_hidden_states=True).hidden_states[-2])
    assert torch.allclose(context, torch.cat(penultimate, dim=-1), atol=1e-6)
    assert torch.allclose(packed[:1], encode(sdxl, PROMPTS[:1]), atol=1e-5)  # each row: its own prompt's conditions
    with pytest.raises(ValueError, match="not packed"):
        unet_inputs(sdxl.unet, context)


def test_scorer_calls_the_unet_with_the_added_conditions(sdxl):
    settings = ScoreSettings(n_seeds=3, kernel_size=7)
    t = detection_timestep(sdxl.scheduler.config, settings)
    scorer = NoiseDiffScorer(sdxl.unet, resolve_targets(sdxl.unet), t, settings)
    got = scorer.unblocked(encode(sdxl, PROMPTS[:1]))
    context, pooled, time_ids = _pipeline_conditioning(sdxl, PROMPTS[:1])
    x = initial_latents(3, (4, *latent_size(sdxl.unet)), seed=1)
    with torch.no_grad():
        eps = sdxl.unet(x, t, encoder_hidden_states=context.expand(3, -1, -1),
                        added_cond_kwargs={"text_embeds": pooled.expand(3, -1), "time_ids": time_ids.expand(3, -1)})
    assert torch.allclose(got, normalize(eps.sample - x), atol=1e-5)
    other = encode(sdxl, PROMPTS[:1]).clone()
    other[..., 96:160] = encode(sdxl, PROMPTS[1:])[..., 96:160]  # another prompt's pooled embedding only
    assert (scorer.unblocked(other) - got).abs().max() > 1e-3  # the pooled embedding reaches the UNet


def test_statistics_cover_both_text_encoders_paths(sdxl):
    targets = resolve_targets(sdxl.unet)
    stats = compute_stats(iter_encoded(sdxl, REFERENCES, 8), targets)
    context = _pipeline_conditioning(sdxl, REFERENCES)[0]
    for t in targets:
        acts = F.linear(context, t.to_v.weight).abs().mean(1)
        assert torch.allclose(stats.mean[t.name], acts.mean(0), atol=1e-5)
        assert torch.allclose(stats.std[t.name], acts.std(0), atol=1e-5)
    saved = {k: v.clone() for k, v in sdxl.text_encoder_2.state_dict().items()}
    try:  # the second encoder alone changes: every layer's statistics move
        with torch.no_grad():
            for p in sdxl.text_encoder_2.parameters():
                p.mul_(1.1)
        moved = compute_stats(iter_encoded(sdxl, REFERENCES, 8), targets)
    finally:
        sdxl.text_encoder_2.load_state_dict(saved)
    assert all((moved.mean[t.name] - stats.mean[t.name]).abs().max() > 1e-3 for t in targets)


def test_refiner_style_pipeline_is_refused(sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=sdxl.vae, text_encoder=None, text_encoder_2=sdxl.text_encoder_2, tokenizer=None,
        tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet, scheduler=sdxl.scheduler, requires_aesthetics_score=True)
    with pytest.raises(BadInputError, match="refiner") as err:
        check_supported(refiner)
    assert err.value.exit_code == 2
    with pytest.raises(BadInputError, match="refiner"):
        encode(refiner, PROMPTS)
    check_supported(sdxl)  # the base is fine


@pytest.mark.slow
def test_harden_run_end_to_end(tmp_path):
    """The planted neuron reads only text_encoder_2's features, so finding it needs statistics of that path.
    Verification generates without guidance: SDXL zeroes the negative prompt's context, so under guidance a neuron
    that also fires weakly for ordinary prompts would change every guided image."""
    from diffusers import DiffusionPipeline

    pipe, layer, neuron = build_planted("sdxl", tmp_path / "model")
    assert PLANTS["sdxl"]["columns"] == slice(32, 96)
    row = pipe.unet.get_submodule(layer).to_v.weight[neuron]
    assert not row[:32].any() and row[32:].abs().sum() > 0
    recipe = write_recipe(tmp_path, verify={"guidance_scale": 1.0})
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    detection = json.loads((out / "detect" / "detection.json").read_text())
    assert [p["memorized"] for p in detection["prompts"]] == [True, False]
    assert json.loads((out / "localize" / "neurons.json").read_text())["layers"] == {layer: [neuron]}
    report = json.loads((out / "export" / "compact" / "harden" / "report.json").read_text())
    assert report["passed"] and len(report["neurons"]["layers_total"]) == 6
    assert report["export_check"]["max_abs_diff"] <= 1e-5
    compact = DiffusionPipeline.from_pretrained(out / "export" / "compact", trust_remote_code=True)
    dense = DiffusionPipeline.from_pretrained(out / "export" / "dense")
    assert type(compact).__name__ == "StableDiffusionXLPipeline"
    assert type(compact.unet).__name__ == "CompactUNet2DConditionModel"
    embeds = encode(pipe, PROMPTS)
    a, b = unet_output(compact.unet, embeds), unet_output(dense.unet, embeds)
    assert float((a - b).abs().max()) <= 1e-5
    assert float((unet_output(pipe.unet, embeds) - b).abs().max()) > 1e-3
