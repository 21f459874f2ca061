"""Why some held-out captions score above tau_mem: `python -m studies.detection_seeds [--seeds 20]`.

Why: item 4 of the organism's spec asks every held-out ordinary caption to score below tau_mem, and tau_mem = mean +
1 std of the ordinary captions' own detection scores, so it flags the top of their distribution by construction.
Whether a held-out caption lands there could be luck of NeMo's detection seed (the one seed that draws all 10
latents) or a property of the caption, and whether the 10 all land below it could be the model or the choice of
held-out set. This measures all four, over many detection seeds:
- per seed: tau_mem from the reference captions (prompts.jsonl's ordinary ones), and how many reference, memorized
  and held-out captions fall on each side of it; the skewness of the reference scores (a threshold at mean + 1 std
  passes nearly all of a distribution only when it is skewed to the left);
- per caption: its mean score over seeds, the spread of those means across captions against the mean spread of one
  caption over seeds, and their rank correlation with the RGB contrast between foreground and background colour;
- held-out draws: at each seed, the share of random 10-caption held-out sets (20,000 drawn from all 126
  procedural captions, tau_mem from the rest, as the shipped split) whose 10 captions all score below tau_mem: how
  often a held-out set meets the target by being the set it is, for this model; and the same share for a model
  whose captions all had one expected score (each caption's scores moved to the common mean, the seed noise kept),
  which is what removing the captions' own differences (e.g. their contrast) could reach at best.
"""

from __future__ import annotations

import numpy as np

from harden.zoo import data
from harden.zoo.folder import caption_rows, load_config

from . import tool
from .evaluate import detection_scores, load_pipeline


def contrast(caption: str) -> float:
    """Euclidean RGB distance between a procedural caption's foreground and background colours."""
    fg, _, bg = data.parse_caption(caption)
    return float(np.linalg.norm(np.subtract(data.COLOURS[fg], data.COLOURS[bg], dtype=float)))


def tau_mem(scores: np.ndarray) -> np.ndarray:
    """mean + 1 unbiased std over the last axis (harden.nemo.score.calibrate_threshold, for many rows at once)."""
    return scores.mean(axis=-1) + scores.std(axis=-1, ddof=1)


def draw_pass_rate(scores: np.ndarray, k: int = 10, draws: int = 20000, seed: int = 0) -> float:
    """Share of random k-caption held-out sets whose k scores are all below tau_mem of the other captions' scores.

    `scores` [n]: one detection score per ordinary caption. Each draw splits them as the shipped model does (k held
    out, n - k reference) without looking at the scores."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((draws, len(scores))), axis=1)  # a uniform random permutation per draw
    held, reference = scores[order[:, :k]], scores[order[:, k:]]
    return float(np.mean((held < tau_mem(reference)[:, None]).all(axis=1)))


def same_mean(per_seed: np.ndarray) -> np.ndarray:
    """Scores [seeds, captions] with each caption's mean over seeds moved to the mean of all: seed noise only."""
    return per_seed - per_seed.mean(axis=0, keepdims=True) + per_seed.mean()


def spread(per_seed: np.ndarray) -> tuple[float, float]:
    """(std across captions of their mean score over seeds, mean over captions of their std over seeds) for scores
    [seeds, captions]: a caption's place in the ranking is its own when the first is well above the second."""
    return float(per_seed.mean(axis=0).std(ddof=1)), float(per_seed.std(axis=0, ddof=1).mean())


def sweep(pipe, captions: list[str], seeds, detect: dict, log=print) -> np.ndarray:
    """Detection scores [len(seeds), len(captions)], one row per detection seed."""
    rows = []
    for seed in seeds:
        rows.append(detection_scores(pipe, captions, seed=seed, **detect))
        log(f"detection seed {seed}: scored {len(captions)} captions")
    return np.array(rows)


def detection_seeds(folder, seeds=tuple(range(1, 21)), draws: int = 20000, log=print) -> dict:
    """All the measurements above as a dict (also printed)."""
    from scipy.stats import skew, spearmanr

    if len(seeds) < 2:
        raise ValueError("a detection-seed sweep needs at least 2 seeds (a caption's spread over seeds)")
    config = load_config(folder)
    prompts = caption_rows(folder)
    detect = {"kernel_size": config["kernel_size"], "betas": config.get("betas", (0.33, 0.33, 0.33))}
    memorized = [p["caption"] for p in prompts if p["memorized"]]
    reference = [p["caption"] for p in prompts if not p["memorized"]]
    held_out = list(config["held_out"])
    ordinary = reference + held_out
    scores = sweep(load_pipeline(folder), ordinary + memorized, seeds, detect, log=log)
    ref = scores[:, :len(reference)]
    held = scores[:, len(reference):len(ordinary)]
    mem = scores[:, len(ordinary):]
    taus = tau_mem(ref)
    per_seed = []
    for i, seed in enumerate(seeds):
        row = {"seed": int(seed), "tau_mem": float(taus[i]),
               "reference_above": int((ref[i] > taus[i]).sum()), "reference_count": len(reference),
               "memorized_above": int((mem[i] > taus[i]).sum()), "memorized_count": len(memorized),
               "held_out_below": int((held[i] < taus[i]).sum()), "held_out_count": len(held_out),
               "draw_pass_rate": draw_pass_rate(scores[i, :len(ordinary)], k=len(held_out), draws=draws, seed=i)}
        per_seed.append(row)
        log(f"seed {seed:3d}: tau_mem {row['tau_mem']:.3f}; above it: reference {row['reference_above']} of "
            f"{len(reference)}, memorized {row['memorized_above']} of {len(memorized)}; held-out below it "
            f"{row['held_out_below']} of {len(held_out)}; random held-out sets all below it: "
            f"{row['draw_pass_rate']:.1%}")
    between, within = spread(scores[:, :len(ordinary)])
    noise_only = same_mean(scores[:, :len(ordinary)])
    noise_only_rates = [draw_pass_rate(row, k=len(held_out), draws=draws, seed=i) for i, row in enumerate(noise_only)]
    means = scores[:, :len(ordinary)].mean(axis=0)
    rho, p = spearmanr(means, [contrast(c) for c in ordinary])
    captions = [{"caption": c, "held_out": c in held_out, "mean_score": float(means[j]),
                 "seed_std": float(scores[:, j].std(ddof=1)), "contrast": contrast(c),
                 "seeds_above_tau": int((scores[:, j] > taus).sum()), "scores": scores[:, j].tolist()}
                for j, c in enumerate(ordinary)]
    summary = {
        "seeds": len(seeds),
        "seeds_all_held_out_below": sum(r["held_out_below"] == len(held_out) for r in per_seed),
        "held_out_below_min": min(r["held_out_below"] for r in per_seed),
        "held_out_below_max": max(r["held_out_below"] for r in per_seed),
        "seeds_all_memorized_above": sum(r["memorized_above"] == len(memorized) for r in per_seed),
        "tau_mem_min": float(taus.min()), "tau_mem_max": float(taus.max()),
        "reference_above_share": float(np.mean([r["reference_above"] / len(reference) for r in per_seed])),
        "reference_skewness_mean": float(np.mean(skew(ref, axis=1))),
        "draw_pass_rate_mean": float(np.mean([r["draw_pass_rate"] for r in per_seed])),
        "same_mean_draw_pass_rate_mean": float(np.mean(noise_only_rates)),
        "same_mean_draw_pass_rate_min": float(np.min(noise_only_rates)),
        "same_mean_draw_pass_rate_max": float(np.max(noise_only_rates)),
        "caption_mean_std": between, "seed_std_mean": within,
        "contrast_spearman": float(rho), "contrast_spearman_p": float(p),
    }
    for row in sorted(captions, key=lambda r: -r["mean_score"])[:5]:
        log(f"highest mean score {row['mean_score']:.3f} (sd {row['seed_std']:.3f} over seeds, contrast "
            f"{row['contrast']:.0f}, above tau_mem at {row['seeds_above_tau']} of {len(seeds)} seeds"
            f"{', held out' if row['held_out'] else ''}): {row['caption']}")
    for row in (r for r in captions if r["held_out"]):
        log(f"held-out: mean score {row['mean_score']:.3f}, above tau_mem at {row['seeds_above_tau']} of "
            f"{len(seeds)} seeds: {row['caption']}")
    log(f"summary: over {len(seeds)} detection seeds, all {len(held_out)} held-out captions below tau_mem at "
        f"{summary['seeds_all_held_out_below']} seeds ({summary['held_out_below_min']}-"
        f"{summary['held_out_below_max']} per seed); all {len(memorized)} memorized above at "
        f"{summary['seeds_all_memorized_above']}; tau_mem {summary['tau_mem_min']:.3f}-{summary['tau_mem_max']:.3f} "
        f"lets {summary['reference_above_share']:.1%} of the reference captions through (their scores' skewness "
        f"{summary['reference_skewness_mean']:+.2f}); a random held-out set "
        f"passes at {summary['draw_pass_rate_mean']:.1%} of seeds' draws on average (captions moved to one mean score: "
        f"{summary['same_mean_draw_pass_rate_mean']:.1%}); caption means spread "
        f"{between:.3f} across captions vs {within:.3f} within a caption over seeds; Spearman with contrast "
        f"{rho:.2f} (p {p:.1g})")
    return {"model": str(folder), "detection": detect, "seeds": [int(s) for s in seeds], "draws": draws,
            "per_seed": per_seed, "captions": captions, "summary": summary}


def main(argv=None) -> dict:
    parser = tool.parser(__doc__)
    parser.add_argument("--seeds", type=int, default=20, help="detection seeds 1..N (NeMo's default is seed 1)")
    parser.add_argument("--draws", type=int, default=20000, help="random held-out sets per seed")
    args = tool.parse(parser, argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2")
    result = detection_seeds(args.model, seeds=tuple(range(1, args.seeds + 1)), draws=args.draws, log=tool.log)
    tool.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
