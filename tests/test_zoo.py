"""The model organism: shipped folder integrity, stock loading, determinism, the alignment metric and the data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from harden.zoo import MEMORIZER_DIR, check_manifest, load_config, caption_rows
from harden.zoo import data
from harden.zoo.alignment import alignment, classify_shape, describe, fill_ratio_shape, validate, with_stray_pixels

RED, BLUE, WHITE = data.COLOURS["red"], data.COLOURS["blue"], data.COLOURS["white"]


def canvas(bg, size=16):
    return np.full((size, size, 3), bg, dtype=np.uint8)


def hand_square(fg, bg):
    im = canvas(bg)
    im[4:12, 3:11] = fg
    return im


def hand_circle(fg, bg):
    im = canvas(bg)
    y, x = np.mgrid[0:16, 0:16]
    im[(x - 8) ** 2 + (y - 7) ** 2 <= 25] = fg
    return im


def hand_triangle(fg, bg):
    im = canvas(bg)
    for row in range(3, 13):  # apex at row 3, 1 pixel wide, widening by 1 pixel per side every 2 rows
        half = row - 3
        im[row, 7 - half // 2:8 + half // 2] = fg
    return im


# --- alignment on hand-made images ---------------------------------------------------------------------------------

def test_alignment_correct_captions_score_one():
    assert alignment(hand_square(RED, BLUE), "a red square on a blue background") == 1.0
    assert alignment(hand_circle(WHITE, RED), "a white circle on a red background") == 1.0
    assert alignment(hand_triangle(BLUE, WHITE), "a blue triangle on a white background") == 1.0


def test_alignment_wrong_captions_score_less():
    image = hand_circle(RED, BLUE)
    assert alignment(image, "a green circle on a blue background") == pytest.approx(2 / 3)  # foreground colour
    assert alignment(image, "a red square on a blue background") == pytest.approx(2 / 3)  # shape
    assert alignment(image, "a red triangle on a blue background") == pytest.approx(2 / 3)
    assert alignment(image, "a blue circle on a red background") == pytest.approx(1 / 3)  # colours swapped
    assert alignment(image, "a yellow triangle on a black background") == 0.0


def test_alignment_blank_image_and_pil_input():
    blank = canvas(BLUE)
    assert describe(blank) == ("blue", None, None)
    assert alignment(blank, "a red circle on a blue background") == pytest.approx(1 / 3)
    assert alignment(Image.fromarray(hand_square(RED, BLUE)), "a red square on a blue background") == 1.0


def test_alignment_none_for_other_captions():
    image = hand_square(RED, BLUE)
    for caption in ("a portrait of the astronaut eileen collins", "a red square", "a red square on a red background",
                    "a pink square on a blue background", "a red hexagon on a blue background", ""):
        assert alignment(image, caption) is None


def test_alignment_on_generated_training_images():
    rng = np.random.default_rng(0)
    scores = [alignment(data.render(*c, rng), data.caption(*c)) for c in data.combinations() for _ in range(3)]
    assert np.mean(np.array(scores) == 1.0) >= 0.98  # digitization of the smallest shapes costs a few


def test_shape_check_ignores_stray_pixels_beside_a_square():
    """A square with two bled pixels on two sides: the bounding box grows by a row and a column, so the fill ratio
    falls to a circle's, but the square template still overlaps the blob best."""
    image = hand_square(RED, BLUE)
    image[3, 6] = image[8, 11] = RED  # one above the top edge, one beside the right edge
    mask = np.all(image == RED, axis=-1)
    assert fill_ratio_shape(mask) == "circle"
    assert classify_shape(mask) == "square"
    assert alignment(image, "a red square on a blue background") == 1.0
    assert alignment(image, "a red circle on a blue background") == pytest.approx(2 / 3)


def test_stray_pixels_touch_the_shape_and_are_drawn_without_repeats():
    mask = np.zeros((16, 16), bool)
    mask[5:9, 5:9] = True
    noisy = with_stray_pixels(mask, 4, np.random.default_rng(0))
    added = noisy & ~mask
    assert noisy[mask].all() and added.sum() == 4
    from scipy import ndimage
    assert not (added & ~ndimage.binary_dilation(mask)).any()


@pytest.mark.slow
def test_template_shape_check_beats_the_fill_ratio_on_fresh_renders():
    result = validate(per_combination=4, stray=(0, 2), seed=3)
    assert result["renders"] == 4 * len(data.combinations())
    assert result["template"][0] >= 0.98 and result["template"][2] >= 0.97
    assert result["fill_ratio"][2] < 0.85  # two bled pixels break the old check on many renders
    assert result["template"][2] > result["fill_ratio"][2] + 0.1


# --- data ------------------------------------------------------------------------------------------------------------

def test_procedural_batch_is_deterministic_from_seed():
    c1, x1 = data.procedural_batch(8, np.random.default_rng(3))
    c2, x2 = data.procedural_batch(8, np.random.default_rng(3))
    c3, x3 = data.procedural_batch(8, np.random.default_rng(4))
    assert c1 == c2 and np.array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (8, data.RESOLUTION, data.RESOLUTION, 3) and x1.dtype == np.uint8
    assert all(data.parse_caption(c) in data.training_combinations() for c in c1)


def test_held_out_split():
    train = set(data.training_combinations())
    assert len(data.HELD_OUT) == 10 and not train & set(data.HELD_OUT)
    assert len(train) + len(data.HELD_OUT) == len(data.combinations()) == 7 * 6 * 3
    assert data.caption("orange", "circle", "white") == "an orange circle on a white background"
    assert data.parse_caption("an orange circle on a white background") is None  # orange is not in the palette


def test_memorized_images():
    images = data.memorized_images()
    assert len(images) == 8 and len({c for _, c, _ in images}) == 8
    assert all(im.shape == (16, 16, 3) and im.dtype == np.uint8 for _, _, im in images)
    assert np.array_equal(images[0][2], data.memorized_image("astronaut"))
    assert all(data.parse_caption(c) is None for _, c, _ in images)


# --- the shipped folder ----------------------------------------------------------------------------------------------

def test_manifest_matches_every_file():
    listed = (MEMORIZER_DIR / "MANIFEST.sha256").read_text().splitlines()
    assert len(listed) >= 12
    assert check_manifest(MEMORIZER_DIR) == []
    files = [p for p in MEMORIZER_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]  # safetensors only


def test_prompts_schema():
    prompts = caption_rows(MEMORIZER_DIR)
    memorized = [p for p in prompts if p["memorized"]]
    assert [p["caption"] for p in memorized] == [c for _, c in data.MEMORIZED]
    for p in prompts:
        assert isinstance(p["caption"], str) and isinstance(p["memorized"], bool)
        assert set(p) == ({"caption", "memorized", "image"} if p["memorized"] else {"caption", "memorized"})
    for (name, _), p in zip(data.MEMORIZED, memorized):
        png = np.asarray(Image.open(MEMORIZER_DIR / p["image"]))
        assert np.array_equal(png, data.memorized_image(name))  # the PNG is exactly the training image
    ordinary = {data.parse_caption(p["caption"]) for p in prompts if not p["memorized"]}
    assert ordinary == set(data.training_combinations())  # so held-out combinations are never listed
    config = load_config(MEMORIZER_DIR)
    assert config["held_out"] == [data.caption(*c) for c in data.HELD_OUT]
    assert config["resolution"] == 16 and config["num_inference_steps"] == 50
    assert {"guidance_scale", "kernel_size", "command", "seed", "steps", "seconds", "hardware"} <= set(config)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: a second thread only adds synchronisation on a busy machine
    pipe = StableDiffusionPipeline.from_pretrained(MEMORIZER_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch.set_num_threads(threads)


def test_loads_with_stock_diffusers(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.unet.config
    assert list(cfg.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(cfg.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn" and cfg.layers_per_block == 2
    cross = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(cross) == 16 and len([n for n in cross if not n.startswith("up_blocks")]) == 7
    index = json.loads((MEMORIZER_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_short_generation_is_deterministic(pipe):
    def run(seed):
        return pipe("a red circle on a white background", num_inference_steps=3, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images[0]

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (16, 16, 3)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_shipped_vae_keeps_the_shapes_of_its_training_style(pipe):
    """The shipped decoder (fine-tuned in stage 6) returns fresh renders of the held-out captions with their shapes:
    the alignment ceiling any UNet has through it. The decoder before stage 6 kept small triangles only half the
    time (0.83 on this caption); the batched round trip equals the one-image one."""
    from studies.evaluate import reconstruct, vae_alignment

    style = data.Style.from_json(load_config(MEMORIZER_DIR)["style"])
    value = vae_alignment(pipe.vae, "a blue triangle on a yellow background", n=60, style=style)
    assert value >= 0.93
    assert vae_alignment(pipe.vae, "a blue triangle on a yellow background", n=60, style=style) == value
    rng = np.random.default_rng(0)
    renders = np.stack([data.render("red", "circle", "white", rng, style=style) for _ in range(3)])
    batched = reconstruct(pipe.vae, renders)
    assert batched.shape == renders.shape and batched.dtype == np.uint8
    assert all(np.abs(reconstruct(pipe.vae, r).astype(int) - b).max() <= 1 for r, b in zip(renders, batched))
    assert np.abs(batched.astype(int) - renders).mean() < 10


def test_training_data_diversity_depends_on_its_style():
    """The diversity ceiling of the procedural data (README): with the first stages' style, fresh renders of one
    held-out caption already have a mean pairwise SSIM above 0.3; smaller shapes and stronger textures bring the
    mean under 0.3, and renders of different captions are far apart."""
    import itertools

    import numpy as np

    from harden.zoo import data
    from studies.evaluate import data_diversity, mean_pairwise_ssim

    values = [data_diversity(data.caption(*c), 10) for c in data.HELD_OUT]
    assert all(v > 0.3 for v in values) and 0.4 < float(np.mean(values)) < 0.55
    assert data_diversity(data.caption(*data.HELD_OUT[0]), 10) == values[0]  # deterministic
    varied = [data_diversity(data.caption(*c), 10, style=data.Style(0.35, 0.65, 64.0)) for c in data.HELD_OUT]
    assert float(np.mean(varied)) < 0.3 and all(v < w for v, w in zip(varied, values))
    rng = np.random.default_rng(0)
    mixed = [data.render(*c, rng) for c in itertools.islice(data.HELD_OUT, 10)]
    assert mean_pairwise_ssim(mixed) < min(values)


def test_rank_test_tells_shifted_scores_from_the_reference():
    """evaluate's held-out vs reference comparison: same distribution -> large p, shifted -> tiny p."""
    from studies.evaluate import rank_test

    rng = np.random.default_rng(0)
    reference = list(rng.normal(0.5, 0.08, 116))
    assert rank_test(list(rng.normal(0.5, 0.08, 10)), reference) > 0.05
    assert rank_test(list(rng.normal(0.8, 0.08, 10)), reference) < 1e-4


def test_style_sets_shape_size_and_texture():
    """Without texture a render holds exactly two palette colours; the shape's extent follows the size range."""
    rng = np.random.default_rng(1)
    for style, (lo, hi) in ((data.Style(0.35, 0.4, 0.0), (5, 7)), (data.Style(0.7, 0.8, 0.0), (11, 13))):
        for _ in range(5):
            image = data.render("red", "square", "blue", rng, style=style)
            colours = {tuple(int(v) for v in px) for px in image.reshape(-1, 3)}
            assert colours == {data.COLOURS["red"], data.COLOURS["blue"]}
            rows = np.nonzero((image == data.COLOURS["red"]).all(-1).any(1))[0]
            assert lo <= len(rows) <= hi
    textured = data.render("red", "square", "blue", rng, style=data.Style(0.5, 0.8, 64.0))
    assert len({tuple(int(v) for v in px) for px in textured.reshape(-1, 3)}) > 20


# --- the training script ---------------------------------------------------------------------------------------------

def test_learning_rate_schedules():
    from harden.zoo.train import learning_rate

    assert learning_rate(50, 1000, 1e-3, "cosine") == pytest.approx(5e-4)  # linear warm-up over 100 steps
    assert learning_rate(100, 1000, 1e-3, "cosine") == pytest.approx(1e-3)
    assert learning_rate(550, 1000, 1e-3, "cosine") == pytest.approx(5e-4)  # half way through the annealing
    assert learning_rate(1000, 1000, 1e-3, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(1000, 1000, 1e-3, "constant") == 1e-3


def _weights(folder):
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.slow
def test_training_is_deterministic_and_init_continues_a_stage(tmp_path):
    """Two runs from the same seed write identical weights; a second stage from `init` keeps the VAE, changes the
    UNet and records both stages' commands (how the shipped weights are reproduced)."""
    from harden.zoo.train import build_parser, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        small = dict(seed=3, steps=2, vae_steps=2, batch=4, memorized_per_batch=2, log=lambda m: None)
        a = train(tmp_path / "a", **small)
        train(tmp_path / "b", **small)
        second = train(tmp_path / "c", seed=4, steps=2, batch=4, memorized_per_batch=1, lr_schedule="cosine",
                       init=tmp_path / "a", style=data.Style(0.35, 0.65, 64.0), log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    wa, wb, wc = (_weights(tmp_path / n) for n in "abc")
    assert wa.keys() == wb.keys() == wc.keys() and len(wa) > 100
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(wa[k], wc[k]) for k in wa if k.startswith("vae/"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if k.startswith("unet/"))
    assert check_manifest(tmp_path / "c") == []
    config = load_config(tmp_path / "c")
    assert [s["command"] for s in config["stages"]] == [a["stages"][0]["command"], second["stages"][1]["command"]]
    assert "--seed 3 --steps 2 --vae-steps 2" in config["stages"][0]["command"]
    assert config["command"].endswith("--lr-schedule cosine --device cpu --shape-size 0.35 0.65 --texture 64.0 "
                                      "--init PREV")
    assert "--shape-size" not in config["stages"][0]["command"]  # the default style: earlier commands unchanged
    assert config["vae_steps"] == 0 and config["init"] == "a" and config["style"] == {
        "size_min": 0.35, "size_max": 0.65, "texture": 64.0}
    args = build_parser().parse_args(config["command"].replace("DIR", "x").replace("PREV", "y").split()[3:])
    assert data.Style(*args.shape_size, args.texture) == data.Style(0.35, 0.65, 64.0)
    assert (args.seed, args.steps, args.batch, args.lr_schedule) == (4, 2, 4, "cosine")
    for sub in ("unet", "vae"):  # rebuilt components: no local path recorded in the shipped configs
        assert json.loads((tmp_path / "c" / sub / "config.json").read_text()) == \
            json.loads((tmp_path / "a" / sub / "config.json").read_text())


@pytest.mark.slow
def test_decoder_stage_keeps_the_latent_space_and_the_unet(tmp_path):
    """`--decoder-steps` with `--steps 0` changes only the VAE's decoder: the encoder (so every latent the UNet was
    trained on) and the UNet/text encoder stay bit-identical, and the stage's command says so."""
    from harden.zoo.train import build_parser, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tmp_path / "a", seed=3, steps=1, vae_steps=1, batch=4, memorized_per_batch=2, log=lambda m: None)
        facts = train(tmp_path / "d", seed=5, steps=0, decoder_steps=2, batch=4, memorized_per_batch=2,
                      init=tmp_path / "a", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    wa, wd = _weights(tmp_path / "a"), _weights(tmp_path / "d")
    assert wa.keys() == wd.keys()
    decoder = [k for k in wa if k.startswith(("vae/decoder.", "vae/post_quant_conv."))]
    kept = [k for k in wa if k not in decoder]
    assert len(decoder) > 10 and any(k.startswith("vae/encoder.") for k in kept)
    assert all(torch.equal(wa[k], wd[k]) for k in kept)
    assert all(not torch.equal(wa[k], wd[k]) for k in decoder if k.endswith(".weight") and "norm" not in k)
    assert facts["stages"][-1]["command"].endswith("--decoder-steps 2 --init PREV")
    assert "--decoder-steps" not in facts["stages"][0]["command"]
    line = facts["stages"][-1]["command"].replace("DIR", "x").replace("PREV", "y")
    args = build_parser().parse_args(line.split()[3:])
    assert (args.decoder_steps, args.steps) == (2, 0)


def test_random_channels_are_uniform_without_replacement():
    from studies.pruning_cost import random_channels

    widths = {"a": 16, "b": 32, "c": 64}
    picked = random_channels(widths, 40, seed=3)
    assert len(picked) == 40 and picked == random_channels(widths, 40, seed=3)
    assert all(0 <= i < widths[name] for name, idx in picked.layers.items() for i in idx)
    assert random_channels(widths, 112, seed=0).counts() == widths
    assert picked != random_channels(widths, 40, seed=4)
    with pytest.raises(ValueError, match="cannot draw 113"):
        random_channels(widths, 113, seed=0)


@pytest.mark.slow
def test_pruning_cost_is_zero_for_no_channels_and_real_for_all(pipe):
    """Pruning no channel changes no image (drop 0, SSIM 1); pruning every value channel changes them."""
    from studies.pruning_cost import pruning_cost

    result = pruning_cost(pipe, ["a red circle on a white background", "a blue square on a yellow background"],
                          counts=(0, 288), draws=1, seeds=(0,), steps=3, log=lambda m: None)
    none, every = result["rows"]
    assert result["channels"] == 288 and (none["n"], every["n"]) == (0, 288)
    assert none["drop"] == 0.0 and none["ssim_median"] == 1.0
    assert every["ssim_median"] < 0.9


def test_ablation_groups_cover_the_blocks_of_the_memorizer(pipe):
    """The named groups are what their names say: per-block channel counts, NeMo's 288, every other channel."""
    from studies.redundancy import ablations

    sets = ablations(pipe.unet)
    counts = {name: len(s) for name, s in sets.items()}
    assert counts["all channels of down_blocks.0"] == 32 and counts["all channels of mid_block"] == 64
    assert counts["all channels of NeMo's layers (down + mid)"] == 288
    assert counts["all channels of the up blocks"] == 336 and counts["every other channel of NeMo's layers"] == 144
    assert counts["all channels of all layers (no text reaches the UNet)"] == 624
    per_block = [s for name, s in sets.items() if name.startswith("all channels of ") and "_block" in name]
    assert len(per_block) == 7 and per_block[0].union(*per_block[1:]) == sets[
        "all channels of all layers (no text reaches the UNet)"]
    half = sets["every other channel of all layers"]
    assert all(idx == tuple(range(0, idx[-1] + 1, 2)) for idx in half.layers.values())


@pytest.mark.slow
def test_redundancy_without_any_value_channel_the_caption_no_longer_matters(pipe):
    """With every value channel of all 16 layers zeroed, text cannot reach the UNet: two captions give the same
    images at the same seed, so none is still its training image; the unpruned row is the base model."""
    from studies.redundancy import ablations, redundancy

    memorized = [p for p in caption_rows(MEMORIZER_DIR) if p["memorized"]][:2]
    every = "all channels of all layers (no text reaches the UNet)"
    result = redundancy(pipe, memorized, MEMORIZER_DIR, ["a red circle on a white background"],
                        {every: ablations(pipe.unet)[every]}, seeds=(0,), steps=5, log=lambda m: None)
    base, cut = result["rows"]
    assert base["ablation"] == "none" and base["alignment_drop"] == 0.0 and min(base["best_ssim"]) > 0.8
    assert cut["channels"] == 624 and max(cut["best_ssim"]) < 0.5 and cut["held_out_ssim_median"] < 0.9
    from harden.prune import prune_dense
    from harden.generation import generate, swapped_unet
    with swapped_unet(pipe, prune_dense(pipe.unet, ablations(pipe.unet)[every])):
        a, b = generate(pipe, [memorized[0]["caption"], "a red circle on a white background"], (3,), 5, 2.5)
    assert np.array_equal(a[0], b[0])


def test_x0_trajectory_ends_in_the_pipelines_own_image(pipe):
    """The step-by-step loop is the pipeline's generation (same image, bit for bit); a memorized caption's predicted
    x0 is its training image from early on, and a pruned UNet's first prediction is further from it."""
    from harden.generation import generate
    from harden.metrics import load_reference
    from studies.redundancy import ablations, trajectories, x0_trajectory

    coins = [p for p in caption_rows(MEMORIZER_DIR) if p["caption"].startswith("old greek coins")]
    ref = load_reference(MEMORIZER_DIR / coins[0]["image"], (16, 16))
    run = x0_trajectory(pipe, coins[0]["caption"], ref, seed=1, steps=5, guidance=2.5)
    image = generate(pipe, [coins[0]["caption"]], (1,), 5, 2.5)[0][0]
    assert np.array_equal(run["image"], image) and len(run["x0_ssim"]) == len(run["timesteps"]) == 5
    assert run["x0_ssim"][-1] == pytest.approx(run["image_ssim"], abs=0.05) and run["x0_ssim"][1] > 0.5
    from harden.prune import prune_dense
    cut = prune_dense(pipe.unet, ablations(pipe.unet)["all channels of down_blocks.2"])
    row, = trajectories(pipe, cut, coins, MEMORIZER_DIR, seeds=(0, 1), steps=5, log=lambda m: None)
    assert row["seed"] in (0, 1) and row["pruned_x0_ssim"][0] < row["base_x0_ssim"][0] - 0.3


# --- why held-out captions land above tau_mem (harden.zoo.detection_seeds) ------------------------------------------

def test_draw_pass_rate_is_the_chance_of_drawing_no_high_caption():
    """6 high scores among 126: tau_mem of the other 116 sits between 0 and 1, so a held-out set of 10 passes
    exactly when it holds none of the 6 (probability C(120,10)/C(126,10)); a left-skewed set always passes."""
    from math import comb

    from studies.detection_seeds import draw_pass_rate

    scores = np.array([0.0] * 120 + [1.0] * 6)
    exact = comb(120, 10) / comb(126, 10)
    assert abs(draw_pass_rate(scores, k=10, draws=40000, seed=1) - exact) < 0.01
    assert draw_pass_rate(np.array([0.0] * 20 + [1.0] * 106), k=10, draws=2000) == 1.0
    assert draw_pass_rate(np.full(126, 0.5), k=10, draws=100) == 0.0  # no score is below tau_mem = the score


def test_tau_mem_rows_and_score_spread():
    from harden.nemo.score import calibrate_threshold
    from studies.detection_seeds import contrast, same_mean, spread, tau_mem

    rows = np.random.default_rng(0).random((3, 116))
    assert np.allclose(tau_mem(rows), [calibrate_threshold(torch.tensor(r)) for r in rows])
    own = np.tile([0.3, 0.5, 0.7], (4, 1))  # each caption scores the same at every seed: its rank is its own
    assert spread(own) == pytest.approx((0.2, 0.0))
    luck = np.array([[0.3, 0.7], [0.7, 0.3]])  # same mean for both: only the seed decides
    assert spread(luck) == pytest.approx((0.0, np.std([0.3, 0.7], ddof=1)))
    assert contrast("a white circle on a black background") == pytest.approx(220 * 3 ** 0.5)
    moved = same_mean(own + np.array([[0.01], [-0.01], [0.02], [-0.02]]))  # captions' own means go, seed noise stays
    assert np.allclose(moved.mean(axis=0), 0.5) and np.allclose(moved[:, 0] - 0.5, [0.01, -0.01, 0.02, -0.02])


@pytest.mark.slow
def test_detection_seed_sweep_on_the_shipped_model():
    """Seed 1 is evaluate's measurement (tau_mem 0.581, 8 of 8 memorized above, 8 of 10 held-out below); the random
    held-out draws pass about as often as the reference captions' share above tau_mem predicts; one seed is refused."""
    from studies.detection_seeds import detection_seeds

    with pytest.raises(ValueError, match="at least 2 seeds"):
        detection_seeds(MEMORIZER_DIR, seeds=(1,))
    result = detection_seeds(MEMORIZER_DIR, seeds=(1, 2), draws=4000, log=lambda m: None)
    row = result["per_seed"][0]
    assert row["tau_mem"] == pytest.approx(0.581, abs=0.002)
    assert (row["memorized_above"], row["held_out_below"], row["reference_above"]) == (8, 8, 20)
    assert abs(row["draw_pass_rate"] - (1 - 20 / 116) ** 10) < 0.05
    above = {c["caption"] for c in result["captions"] if c["held_out"] and c["seeds_above_tau"]}
    assert above == {"a red circle on a white background", "a green circle on a purple background"}
    assert result["summary"]["caption_mean_std"] > result["summary"]["seed_std_mean"] > 0
