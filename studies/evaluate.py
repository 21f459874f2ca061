"""Measure the model organism: `python -m studies.evaluate [--model DIR] [--json FILE]`.

At the native resolution, 50 DDIM steps and the shipped guidance scale (harden_zoo.json):
- memorized captions: best-of-10-seeds SSIM to the training image, and NeMo's detection score;
- tau_mem = mean + 1 std of the detection scores of the ordinary (non-memorized) captions in prompts.jsonl, and how
  many of them score above it;
- held-out ordinary captions (never in prompts.jsonl): mean pairwise SSIM over 10 seeds (diversity), mean alignment,
  and NeMo's detection score; for comparison, the training data's own diversity and its alignment after a VAE round
  trip (what a perfect UNet would reach).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch

from harden.generation import generate as harden_generate
from harden.loading import load_pipeline as harden_load_pipeline
from harden.metrics import ssim as harden_ssim
from harden.nemo.score import (NoiseDiffScorer, ScoreSettings, calibrate_threshold, detection_timestep,
                               max_pairwise_scores)
from harden.nemo.stats import encode_prompts
from harden.recipe import ModelSection
from harden.targets import resolve_targets
from harden.zoo import MEMORIZER_DIR, data
from harden.zoo.alignment import alignment
from harden.zoo.folder import caption_rows, load_config

from . import tool

SEEDS = tuple(range(10))


def load_pipeline(folder: Path):
    """The memorizer (or a retrain) on the CPU in float32, loaded as harden loads any base model."""
    return harden_load_pipeline(ModelSection(id=str(Path(folder).resolve()), device="cpu"), Path.cwd())[0]


def generate(pipe, caption: str, seeds=SEEDS, guidance_scale: float = 3.0, steps: int = 50) -> list[np.ndarray]:
    """One HxWx3 uint8 image per seed, all seeds in one pipeline call (harden.generation.generate)."""
    return harden_generate(pipe, [caption], seeds, steps, guidance_scale, batch_images=len(seeds))[0]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-image's default SSIM (7x7 uniform window): what the memorizer's measurements are stated in."""
    return harden_ssim(a, b, gaussian=False)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """Encode (latent mean) and decode HxWx3 or NxHxWx3 uint8 images: the best any UNet could reproduce them through
    this VAE."""
    batch = np.array(images, dtype=np.uint8)  # a copy: PIL-backed arrays are read-only
    x = torch.from_numpy(batch.reshape(-1, *batch.shape[-3:])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.permute(0, 2, 3, 1).numpy()
    return np.clip(np.rint((y + 1) * 127.5), 0, 255).astype(np.uint8).reshape(batch.shape)


def mean_pairwise_ssim(images: list[np.ndarray]) -> float:
    return float(np.mean([ssim(a, b) for a, b in itertools.combinations(images, 2)]))


def data_renders(caption: str, n: int, seed: int = 0, style: data.Style = data.STYLE) -> np.ndarray:
    """n fresh training renders of a procedural caption [n, H, W, 3] uint8, deterministic from `seed`."""
    fg, shape, bg = data.parse_caption(caption)
    rng = np.random.default_rng(seed)
    return np.stack([data.render(fg, shape, bg, rng, style=style) for _ in range(n)])


def data_diversity(caption: str, n: int, seed: int = 0, style: data.Style = data.STYLE) -> float:
    """Mean pairwise SSIM of n fresh training renders of a procedural caption: the diversity the data itself has,
    i.e. what a model that samples its training distribution faithfully would score."""
    return mean_pairwise_ssim(list(data_renders(caption, n, seed, style)))


def vae_alignment(vae, caption: str, n: int = 100, seed: int = 0, style: data.Style = data.STYLE) -> float:
    """Mean alignment of n fresh training renders of a procedural caption after a VAE round trip: the most any UNet
    could score on that caption through this VAE (a decoder that rounds small triangles caps it)."""
    renders = reconstruct(vae, data_renders(caption, n, seed, style))
    return float(np.mean([alignment(im, caption) for im in renders]))


def rank_test(a: list[float], b: list[float]) -> float:
    """Two-sided Mann-Whitney U p-value: do the held-out captions' scores come from the reference captions'
    distribution? Why: tau_mem = mean + 1 std lets ~16 % of that distribution through by construction, so a held-out
    caption above it is expected unless its scores are shifted."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def detection_scores(pipe, captions: list[str], kernel_size: int, betas=(0.33, 0.33, 0.33),
                     seed: int = 1) -> list[float]:
    """NeMo's detection score (max pairwise MS-SSIM of first-step noise differences over 10 seeds) per caption;
    `seed` draws all 10 latents (NeMo's default: 1)."""
    settings = ScoreSettings(kernel_size=kernel_size, betas=tuple(betas), seed=seed)
    scorer = NoiseDiffScorer(pipe.unet, resolve_targets(pipe.unet), detection_timestep(pipe.scheduler.config,
                                                                                       settings), settings)
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, captions)
    return [float(s) for s in max_pairwise_scores(scorer, embeds)]


def evaluate(folder: Path = MEMORIZER_DIR, grid: Path | None = None, log=print, seeds=SEEDS) -> dict:
    """All item-4 measurements as a dict (also printed); `grid`: a PNG of all samples, one row per caption; `seeds`:
    the generation seeds (another set of 10 shows how much the per-caption numbers owe to the seeds drawn)."""
    from PIL import Image

    config = load_config(folder)
    prompts = caption_rows(folder)
    pipe = load_pipeline(folder)
    g, steps = config["guidance_scale"], config["num_inference_steps"]
    detect = {"kernel_size": config["kernel_size"], "betas": config.get("betas", (0.33, 0.33, 0.33))}
    memorized = [p for p in prompts if p["memorized"]]
    ordinary = [p["caption"] for p in prompts if not p["memorized"]]
    held_out = config["held_out"]
    style = data.Style.from_json(config.get("style"))  # the data of the last training stage

    ref_scores = detection_scores(pipe, ordinary, **detect)
    tau = calibrate_threshold(torch.tensor(ref_scores, dtype=torch.float64))
    ref_above = sum(s > tau for s in ref_scores)
    log(f"tau_mem = {tau:.3f} (mean + 1 std over {len(ordinary)} ordinary training captions; "
        f"guidance {g}, {steps} DDIM steps, MS-SSIM {detect}); {ref_above} of those {len(ordinary)} score above it "
        f"({ref_above / len(ordinary):.1%}): the share of ordinary captions such a threshold lets through")
    mem_scores = detection_scores(pipe, [p["caption"] for p in memorized], **detect)
    rows_mem, picture = [], []
    for p, score in zip(memorized, mem_scores):
        target = np.asarray(Image.open(folder / p["image"]).convert("RGB"))
        images = generate(pipe, p["caption"], seeds, guidance_scale=g, steps=steps)
        sims = [ssim(im, target) for im in images]
        picture.append([target, *images])
        rows_mem.append({"caption": p["caption"], "best_ssim": max(sims), "best_seed": int(seeds[int(np.argmax(sims))]),
                         "vae_ssim": ssim(reconstruct(pipe.vae, target), target), "score": score,
                         "detected": score > tau})
        log(f"memorized  best SSIM {max(sims):.3f} (VAE round trip {rows_mem[-1]['vae_ssim']:.3f})  "
            f"score {score:.3f}  {p['caption']}")
    held_scores = detection_scores(pipe, held_out, **detect)
    rows_held = []
    for caption, score in zip(held_out, held_scores):
        images = generate(pipe, caption, seeds, guidance_scale=g, steps=steps)
        picture.append([np.zeros_like(images[0]), *images])
        row = {"caption": caption, "pairwise_ssim": mean_pairwise_ssim(images),
               "data_pairwise_ssim": data_diversity(caption, len(images), style=style),
               "alignment": float(np.mean([alignment(im, caption) for im in images])),
               "vae_alignment": vae_alignment(pipe.vae, caption, style=style), "score": score,
               "detected": score > tau}
        rows_held.append(row)
        log(f"held-out   pairwise SSIM {row['pairwise_ssim']:.3f} (training data {row['data_pairwise_ssim']:.3f})  "
            f"alignment {row['alignment']:.2f} (VAE round trip {row['vae_alignment']:.2f})  score {score:.3f}  "
            f"{caption}")
    if grid is not None:  # first column: the training image (black for held-out captions)
        Image.fromarray(np.concatenate([np.concatenate(row, axis=1) for row in picture])).save(grid)
    summary = {
        "memorized_reproduced": sum(r["best_ssim"] >= 0.7 for r in rows_mem),
        "memorized_detected": sum(r["detected"] for r in rows_mem),
        "held_out_diverse": sum(r["pairwise_ssim"] <= 0.3 for r in rows_held),
        "held_out_aligned": sum(r["alignment"] >= 0.8 for r in rows_held),
        "held_out_not_detected": sum(not r["detected"] for r in rows_held),
        "held_out_mean_alignment": float(np.mean([r["alignment"] for r in rows_held])),
        "held_out_mean_pairwise_ssim": float(np.mean([r["pairwise_ssim"] for r in rows_held])),
        "held_out_data_mean_pairwise_ssim": float(np.mean([r["data_pairwise_ssim"] for r in rows_held])),
        "held_out_vae_mean_alignment": float(np.mean([r["vae_alignment"] for r in rows_held])),
        "reference_score_mean": float(np.mean(ref_scores)), "reference_score_max": float(np.max(ref_scores)),
        "reference_above_tau": int(ref_above), "reference_count": len(ref_scores),
        "held_out_vs_reference_p": rank_test(held_scores, ref_scores),
    }
    log(f"summary: {len(rows_mem)} memorized: {summary['memorized_reproduced']} reproduced (SSIM >= 0.7), "
        f"{summary['memorized_detected']} above tau_mem; {len(rows_held)} held-out: {summary['held_out_diverse']} "
        f"diverse (<= 0.3), {summary['held_out_aligned']} aligned (>= 0.8), {summary['held_out_not_detected']} "
        f"below tau_mem (the reference captions: {ref_above} of {len(ref_scores)} above; held-out vs reference "
        f"scores, Mann-Whitney p = {summary['held_out_vs_reference_p']:.2f}); mean alignment "
        f"{summary['held_out_mean_alignment']:.3f}")
    return {"model": str(folder), "guidance_scale": g, "num_inference_steps": steps, "detection": detect,
            "seeds": list(seeds), "tau_mem": tau, "memorized": rows_mem, "held_out": rows_held, "summary": summary}


def main(argv=None) -> dict:
    parser = tool.parser(__doc__)
    parser.add_argument("--grid", type=Path, help="also save all samples as one PNG (a row per caption)")
    parser.add_argument("--first-seed", type=int, default=0, help="generate with seeds N..N+9 (default 0..9)")
    args = tool.parse(parser, argv)
    seeds = tuple(range(args.first_seed, args.first_seed + len(SEEDS)))
    result = evaluate(args.model, grid=args.grid, log=tool.log, seeds=seeds)
    tool.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
