"""What pruning costs the model organism, whatever channels are pruned: `python -m studies.pruning_cost`.

Why: the demo's gate allows a held-out alignment drop of 0.02, and NeMo's search needs 85-107 value channels of
the memorizer's 288 (down + mid) to push every memorized caption below tau_mem. Zeroing n channels drawn uniformly at
random, several draws per n, at the demo's verify settings (4 seeds, 20 steps), measures the drop and the held-out
SSIM to the base images that pruning that many channels costs on its own, and how noisy the gate's metric is.
"""

from __future__ import annotations

import numpy as np
import torch

from harden.generation import generate, swapped_unet
from harden.metrics import ssim
from harden.neurons import NeuronSet
from harden.prune import prune_dense
from harden.targets import resolve_targets
from harden.zoo.alignment import alignment
from harden.zoo.folder import load_config

from . import tool
from .evaluate import load_pipeline

COUNTS = (5, 10, 20, 40, 85, 130)


def random_channels(widths: dict[str, int], n: int, seed: int) -> NeuronSet:
    """n value channels drawn uniformly without replacement from all target layers together."""
    flat = [(name, c) for name, width in widths.items() for c in range(width)]
    if not 0 <= n <= len(flat):
        raise ValueError(f"cannot draw {n} channels from {len(flat)}")
    layers: dict[str, list[int]] = {}
    for i in torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:n].tolist():
        layers.setdefault(flat[i][0], []).append(flat[i][1])
    return NeuronSet(layers)


def mean_alignment(images: list[list[np.ndarray]], captions: list[str]) -> float:
    return float(np.mean([alignment(im, c) for c, ims in zip(captions, images) for im in ims]))


def pruning_cost(pipe, captions: list[str], counts=COUNTS, draws: int = 3, seeds=(0, 1, 2, 3), steps: int = 20,
                 guidance: float = 3.0, log=print) -> dict:
    """Per (n, draw): mean alignment, its drop from the base model, and the median SSIM to the base images."""
    widths = {t.name: t.width for t in resolve_targets(pipe.unet)}
    base = generate(pipe, captions, seeds, steps, guidance)
    base_alignment = mean_alignment(base, captions)
    log(f"{len(widths)} layers, {sum(widths.values())} value channels; base alignment {base_alignment:.3f}")
    rows = []
    for n in counts:
        for draw in range(draws):
            with swapped_unet(pipe, prune_dense(pipe.unet, random_channels(widths, n, 1000 * n + draw))):
                images = generate(pipe, captions, seeds, steps, guidance)
            value = mean_alignment(images, captions)
            median = float(np.median([ssim(a, b) for xs, ys in zip(base, images) for a, b in zip(xs, ys)]))
            rows.append({"n": n, "draw": draw, "alignment": value, "drop": base_alignment - value,
                         "ssim_median": median})
            log(f"n={n:4d} draw {draw}: alignment {value:.3f} (drop {base_alignment - value:+.3f}), "
                f"held-out SSIM to base median {median:.3f}")
    return {"captions": captions, "seeds": list(seeds), "steps": steps, "guidance_scale": guidance,
            "channels": sum(widths.values()), "base_alignment": base_alignment, "rows": rows}


def main(argv=None) -> dict:
    parser = tool.parser(__doc__, "also write the rows to this file")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--draws", type=int, default=3)
    args = tool.parse(parser, argv)
    config = load_config(args.model)
    result = pruning_cost(load_pipeline(args.model), config["held_out"], args.counts, args.draws,
                          guidance=config["guidance_scale"], log=tool.log)
    for n in args.counts:
        drops = [r["drop"] for r in result["rows"] if r["n"] == n]
        medians = [r["ssim_median"] for r in result["rows"] if r["n"] == n]
        print(f"n={n}: drop mean {np.mean(drops):+.3f} (range {min(drops):+.3f}..{max(drops):+.3f}), "
              f"held-out SSIM median {np.mean(medians):.3f}")
    tool.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
