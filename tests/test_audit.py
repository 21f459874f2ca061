"""harden.audit on tiny models: the attack, its batching, starts, surrogates, paraphrases, similarity and the control.

The attack and audit tests run on a tiny random SD-v1-topology pipeline (8x8 latents, 16x16 images), so each takes
seconds; what they check holds for any UNet: the loss falls, batching changes nothing, the bookkeeping is exact.
"""

import numpy as np
import pytest
import torch

from harden.audit.attack import diffusion_targets, embedding_attack, encode_images, random_starts
from harden.audit.core import AuditPrompt, AuditSettings, audit_model, summarize
from harden.audit.paraphrase import KINDS, paraphrases, perturbations
from harden.audit.similarity import DEFAULT_THRESHOLDS, make_similarity
from harden.audit.targets import Target, choose_surrogate, fit
from harden.errors import BadInputError
from harden.generation import generate
from harden.nemo.stats import encode_prompts
from harden.stages.context import SilentUI

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    from harden.tiny import tiny_pipeline

    p = tiny_pipeline(seed=0, sample_size=8)  # 8x8 latents, VAE scale 2: 16x16 images
    p.set_progress_bar_config(disable=True)
    return p


def _image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _held_out_loss(pipe, z0: torch.Tensor, emb: torch.Tensor, n: int = 96) -> float:
    """The diffusion loss of `emb` on fixed draws the attack never saw."""
    g = torch.Generator().manual_seed(12345)
    noise = torch.randn((n, *z0.shape[1:]), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    x_t, target = diffusion_targets(pipe.scheduler, z0.expand(n, -1, -1, -1), noise, t)
    with torch.no_grad():
        pred = pipe.unet(x_t, t, encoder_hidden_states=emb.expand(n, -1, -1)).sample
    return float((pred - target).pow(2).mean())


def test_the_attack_lowers_the_diffusion_loss_on_a_planted_image_and_leaves_the_unet_alone(pipe):
    z0 = encode_images(pipe.vae, [_image(0)])
    assert z0.shape == (1, 4, 8, 8) and z0.dtype == torch.float32
    ref = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a cat", "a dog", ""])
    start = random_starts(ref, 1, torch.Generator().manual_seed(0))
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    flags = {k: p.requires_grad for k, p in pipe.unet.named_parameters()}
    emb, losses = embedding_attack(pipe.unet, pipe.scheduler, z0, start, steps=12, lr=0.1, batch=8,
                                   generator=torch.Generator().manual_seed(1))
    assert len(losses) == 12 and emb.shape == start.shape and not emb.requires_grad
    before, after = _held_out_loss(pipe, z0, start), _held_out_loss(pipe, z0, emb)
    assert after < 0.97 * before, (before, after)  # measured: 1.126 -> 1.050 (random UNet, 12 steps)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert all(p.grad is None and p.requires_grad == flags[k] for k, p in pipe.unet.named_parameters())


def test_the_batched_attack_equals_one_attack_at_a_time(pipe):
    z0 = encode_images(pipe.vae, [_image(1), _image(2), _image(3)])
    start = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a cat", "a red square", "coffee"])

    def gens(idx):
        return [torch.Generator().manual_seed(100 + i) for i in idx]

    batched, losses = embedding_attack(pipe.unet, pipe.scheduler, z0, start, steps=4, generator=gens(range(3)))
    single = [embedding_attack(pipe.unet, pipe.scheduler, z0[i:i + 1], start[i:i + 1], steps=4, generator=gens([i]))
              for i in range(3)]
    moved = (batched - start).abs().max()
    assert moved > 0.05  # the attack did move the embeddings
    diff = (batched - torch.cat([e for e, _ in single])).abs()
    # float rounding of bigger batches only: Adam moves every element ~lr per step; they agree to 1 % of that
    assert diff.max() < 1e-3 and diff.median() < 1e-5, (diff.max(), diff.median())
    mean_single = [sum(ls[k] for _, ls in single) / 3 for k in range(4)]
    assert np.allclose(losses, mean_single, atol=1e-5)


def test_v_prediction_targets_and_random_starts(pipe):
    from diffusers import DDIMScheduler

    v_sched = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    z0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    x_t, target = diffusion_targets(v_sched, z0, noise, t)
    assert torch.allclose(target, v_sched.get_velocity(z0, noise, t), atol=1e-6)
    assert torch.allclose(x_t, v_sched.add_noise(z0, noise, t), atol=1e-6)
    assert torch.equal(diffusion_targets(pipe.scheduler, z0, noise, t)[1], noise)
    ref = torch.randn(5, 77, 32) * torch.linspace(0.5, 3.0, 77).view(1, 77, 1) + 2.0
    starts = random_starts(ref, 200, torch.Generator().manual_seed(0))
    assert starts.shape == (200, 77, 32)
    assert torch.allclose(starts.mean(dim=(0, 2)), ref.mean(dim=(0, 2)), atol=0.2)  # 5 standard errors
    assert torch.allclose(starts.std(dim=(0, 2)), ref.std(dim=(0, 2)), rtol=0.05)


def test_surrogates_are_chosen_as_documented():
    ssim = make_similarity("ssim", 0.7)
    base = _image(7)
    near = base.copy()
    near[:2] = 0  # close to base, further from the other copies than base is
    images = [_image(8), base, base.copy(), near, _image(9)]
    seeds = [10, 11, 12, 13, 14]
    target = choose_surrogate(images, seeds, ssim)
    # seeds 11, 12 (and 13) agree with each other; 11 comes first among the two best (same agreement and mean)
    assert target.source == "surrogate" and target.seed == 11 and np.array_equal(target.image, base)
    assert target.agreement == pytest.approx(2 / 4)
    noise = choose_surrogate([_image(s) for s in range(4)], [0, 1, 2, 3], ssim)
    assert noise.source == "none" and noise.image is None and "no consistent base image" in noise.note
    strict = choose_surrogate(images, seeds, ssim, min_agreement=0.75)
    assert strict.source == "none"
    with pytest.raises(BadInputError):
        choose_surrogate([base], [0], ssim)


def test_resized_targets_are_noted():
    image, note = fit(_image(0, 20), (16, 16))
    assert image.shape == (16, 16, 3) and note == "resized from 20x20 to 16x16"
    same, none = fit(_image(0), (16, 16))
    assert none == "" and np.array_equal(same, _image(0))


def test_paraphrases_are_deterministic_distinct_and_start_with_the_files_variants():
    text = "a cup of coffee on a saucer, photo"
    first = paraphrases(text, ("coffee cup on a saucer",), 5, seed=0)
    assert first == paraphrases(text, ("coffee cup on a saucer",), 5, seed=0)
    assert first[0] == ("variant", "coffee cup on a saucer") and len(first) == 6
    texts = [t for _, t in first]
    assert len(set(texts)) == 6 and text not in texts
    assert [k for k, _ in first[1:4]] == list(KINDS)  # the kinds cycle: word dropped, order, punctuation/case
    dropped = first[1][1].split()
    assert len(dropped) == len(text.split()) - 1
    assert sorted(first[2][1].replace(",", "").split()) == sorted(text.replace(",", "").split())
    assert paraphrases(text, (), 3, seed=1) != paraphrases(text, (), 3, seed=0)
    assert {kind for kind, _ in perturbations("x", 10, 0)} == {"punctuation"}  # nothing to drop or reorder


def test_similarity_metrics_thresholds_and_sscd(tmp_path):
    a, b = _image(0), _image(1)
    ssim = make_similarity("ssim", None)
    assert ssim.threshold == DEFAULT_THRESHOLDS["ssim"] and ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) < 0.3 and ssim.best([b, a], a) == (pytest.approx(1.0), 1)
    assert "uniform 7x7" in ssim.describe(a) and "gaussian" in ssim.describe(_image(0, 64))
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(BadInputError):
            make_similarity("ssim", bad)
    with pytest.raises(BadInputError):
        make_similarity("sscd", 0.5, None)
    with pytest.raises(BadInputError):
        make_similarity("sscd", 0.5, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(BadInputError):
        make_similarity("sscd", 0.5, tmp_path / "junk.pt")

    class Tiny(torch.nn.Module):  # a stand-in descriptor network, saved as TorchScript like SSCD's files
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 7, stride=4)

        def forward(self, x):
            assert x.shape[-2:] == (224, 224)
            return self.conv(x).mean(dim=(2, 3))

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Tiny()), str(tmp_path / "sscd.pt"))
    sscd = make_similarity("sscd", None, tmp_path / "sscd.pt")
    assert sscd.threshold == 0.5 and sscd(a, a) == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= sscd(a, b) < 0.999 and sscd(_image(0, 300)[:, :200], a) <= 1.0  # any size: resize + crop


def _rows(n_attack, k_attack, n_control, k_control):
    rows = [{"index": i, "condition": c, "reproduced": c != "prompt" and i < k_attack,
             "starts": [{"start": "noise 1", "similarity": 0.9 if i < k_attack else 0.1}]}
            for i in range(n_attack) for c in ("prompt", "attack")]
    rows += [{"index": j, "condition": "control", "reproduced": j < k_control, "starts": []} for j in range(n_control)]
    return rows


def test_summary_counts_and_the_control_bound():
    ssim = make_similarity("ssim", 0.7)
    settings = AuditSettings(seeds=(0, 1), steps=2, guidance=2.0, control_bound=0.25)
    prompts = [AuditPrompt(f"p{i}", Target(_image(i), "training")) for i in range(4)]
    controls = [Target(_image(10 + j), "control") for j in range(4)]
    ok = summarize(_rows(4, 3, 4, 1), prompts, controls, ssim, settings)
    assert (ok["n"], ok["prompt_reproduced"], ok["attack_reproduced"], ok["control_reproduced"], ok["control_n"]) \
        == (4, 0, 3, 1, 4)
    assert ok["attack_reproduced_fraction"] == 0.75 and ok["control_reproduced_fraction"] == 0.25
    assert ok["attack_from_noise_reproduced"] == 3 and ok["attack_from_prompt_reproduced"] == 0
    assert not ok["inconclusive"]  # 1 of 4 is at the bound, not above it
    bad = summarize(_rows(4, 3, 4, 2), prompts, controls, ssim, settings)
    assert bad["inconclusive"] and bad["control_reproduced_fraction"] == 0.5
    none = summarize(_rows(4, 3, 0, 0), prompts, [], ssim, settings)
    assert none["control_reproduced_fraction"] is None and not none["inconclusive"] and not none["control_measured"]


def test_an_attack_that_paints_a_never_seen_image_makes_the_audit_inconclusive(pipe):
    """The control image is what the model draws from the empty prompt at seed 0; an attack that barely moves
    (lr 1e-6) still draws it, so the control counts as painted and the audit is inconclusive under bound 0.25."""
    seeds = (0, 1)
    painted = generate(pipe, [""], [0], steps=2, guidance=2.0)[0][0]
    settings = AuditSettings(seeds=seeds, steps=2, guidance=2.0, attack_steps=1, lr=1e-6, batch=2, restarts=0,
                             paraphrases=1, control_bound=0.25)
    ssim = make_similarity("ssim", 0.7)
    prompts = [AuditPrompt("a red circle", Target(_image(3), "training"))]
    controls = [Target(painted, "control")]
    result = audit_model(pipe, pipe.unet, "tiny", prompts, controls, ssim, settings, SilentUI())
    control = next(r for r in result.rows if r["condition"] == "control")
    assert control["reproduced"] and control["similarity"] > 0.99 and control["best_start"] == "empty prompt"
    assert result.summary["control_reproduced"] == 1 and result.summary["inconclusive"]
    assert [r["condition"] for r in result.rows] == ["prompt", "paraphrase", "attack", "control"]
    assert not result.summary["attack_reproduced"]  # a random image is not what the tiny model draws
    lenient = summarize(result.rows, prompts, controls, ssim, AuditSettings(seeds=seeds, steps=2, guidance=2.0,
                                                                             control_bound=1.0))
    assert not lenient["inconclusive"]


def test_a_v_prediction_model_is_audited_and_an_sdxl_style_one_refused():
    from harden.audit.inputs import check_model
    from harden.tiny import tiny_sd2_pipeline, tiny_sdxl_pipeline

    sd2 = tiny_sd2_pipeline(seed=0, sample_size=8)
    sd2.set_progress_bar_config(disable=True)
    check_model(sd2)
    size = generate(sd2, ["x"], [0], steps=1, guidance=1.0)[0][0].shape[0]
    settings = AuditSettings(seeds=(0, 1), steps=1, guidance=2.0, attack_steps=1, batch=2, restarts=1, paraphrases=0)
    prompts = [AuditPrompt("a cat", Target(_image(4, size), "training"))]
    result = audit_model(sd2, sd2.unet, "sd2", prompts, [], make_similarity("ssim", 0.7), settings, SilentUI())
    attack = next(r for r in result.rows if r["condition"] == "attack")
    assert [s["start"] for s in attack["starts"]] == ["prompt", "noise 1"]
    assert all(np.isfinite(s["final_loss"]) for s in attack["starts"])
    with pytest.raises(BadInputError, match="SDXL"):
        check_model(tiny_sdxl_pipeline(seed=0, sample_size=8))
