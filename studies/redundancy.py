"""Where the memorizer keeps its memorized images: `python -m studies.redundancy [--neurons neurons.json]`.

Why: NeMo prunes value channels until the first-step score of every memorized caption falls below tau_mem, and on
this model that removes only some of the images from full generations. Zeroing whole groups of value channels (one
block, NeMo's 7 layers, the up blocks, every other channel) and generating measures how redundantly the text reaches
each image: an image that survives with all of NeMo's 288 channels zeroed cannot be removed by any neuron set NeMo's
search space holds. Each ablation also reports what it costs the held-out captions, at the demo's gate metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harden.generation import generate, swapped_unet
from harden.metrics import best_of_seeds_ssim, load_reference, ssim
from harden.neurons import NeuronSet
from harden.prune import prune_dense
from harden.targets import SELECT_ALL, SELECT_NEMO, Target, latent_size, resolve_targets
from harden.zoo.folder import caption_rows, load_config

from . import tool
from .evaluate import load_pipeline
from .pruning_cost import mean_alignment

REMOVED_BELOW = 0.3  # the demo's gate: best-of-seeds SSIM to the training image <= 0.3


def image_size(pipe) -> tuple[int, int]:
    """(height, width) of the pipeline's native images: the UNet's latent size times the VAE's scale."""
    return tuple(side * pipe.vae_scale_factor for side in latent_size(pipe.unet))


def block_of(target: Target) -> str:
    """The UNet block a cross-attention layer sits in, e.g. "down_blocks.2" or "mid_block"."""
    return target.name.split(".attentions.")[0]


def channels(targets: list[Target], keep: Callable[[Target], bool], step: int = 1) -> NeuronSet:
    """Every `step`-th value channel (0, step, 2*step, ...) of the targets that `keep` accepts."""
    return NeuronSet({t.name: tuple(range(0, t.width, step)) for t in targets if keep(t)})


def ablations(unet) -> dict[str, NeuronSet]:
    """Named channel groups of the UNet, from one block to every cross-attention layer."""
    everything = resolve_targets(unet, SELECT_ALL)
    nemo = {t.name for t in resolve_targets(unet, SELECT_NEMO)}
    blocks = dict.fromkeys(block_of(t) for t in everything)  # in model order; blocks without cross-attention drop out
    out = {f"all channels of {b}": channels(everything, lambda t, b=b: block_of(t) == b) for b in blocks}
    out["all channels of NeMo's layers (down + mid)"] = channels(everything, lambda t: t.name in nemo)
    out["all channels of the up blocks"] = channels(everything, lambda t: t.name not in nemo)
    out["every other channel of NeMo's layers"] = channels(everything, lambda t: t.name in nemo, step=2)
    out["every other channel of all layers"] = channels(everything, lambda t: True, step=2)
    out["all channels of all layers (no text reaches the UNet)"] = channels(everything, lambda t: True)
    return out


def redundancy(pipe, memorized: list[dict], folder: Path, held_out: list[str], sets: dict[str, NeuronSet],
               seeds=tuple(range(10)), steps: int = 20, guidance: float = 2.5, log=print) -> dict:
    """Per ablation: each memorized caption's best-of-seeds SSIM to its training image (the demo gate's metric),
    how many fall below REMOVED_BELOW, the held-out mean alignment (and its drop) and the held-out SSIM to the base
    images at the same seeds (median)."""
    captions = [p["caption"] for p in memorized]
    refs = [load_reference(folder / p["image"], image_size(pipe)) for p in memorized]

    def measure(unet) -> tuple[list[float], list[list[np.ndarray]]]:
        with swapped_unet(pipe, unet):
            images = generate(pipe, captions + held_out, seeds, steps, guidance)
        return [best_of_seeds_ssim(ims, ref) for ims, ref in zip(images, refs)], images[len(captions):]

    base_ssim, base_held = measure(pipe.unet)
    base_alignment = mean_alignment(base_held, held_out)
    rows = [{"ablation": "none", "channels": 0, "best_ssim": base_ssim,
             "removed": sum(s <= REMOVED_BELOW for s in base_ssim), "held_out_alignment": base_alignment,
             "alignment_drop": 0.0, "held_out_ssim_median": 1.0}]
    log(f"none: {rows[0]['removed']} of {len(captions)} removed; held-out alignment {base_alignment:.3f}")
    for name, neurons in sets.items():
        best, held = measure(prune_dense(pipe.unet, neurons))
        value = mean_alignment(held, held_out)
        median = float(np.median([ssim(a, b) for xs, ys in zip(base_held, held) for a, b in zip(xs, ys)]))
        rows.append({"ablation": name, "channels": len(neurons), "best_ssim": best,
                     "removed": sum(s <= REMOVED_BELOW for s in best), "held_out_alignment": value,
                     "alignment_drop": base_alignment - value, "held_out_ssim_median": median})
        log(f"{name} ({len(neurons)} channels): {rows[-1]['removed']} of {len(captions)} removed "
            f"(best SSIM {_values(best)}); held-out alignment {value:.3f} "
            f"(drop {base_alignment - value:+.3f}), SSIM to base median {median:.3f}")
    return {"captions": captions, "held_out": held_out, "seeds": list(seeds), "steps": steps,
            "guidance_scale": guidance, "removed_below": REMOVED_BELOW, "rows": rows}


def to_uint8(pipe, latents: torch.Tensor) -> np.ndarray:
    """Decoded latents as HxWx3 uint8 images, as the pipeline's output_type="np" and verify.generate make them."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def x0_trajectory(pipe, caption: str, target: np.ndarray, seed: int, steps: int = 20, guidance: float = 2.5) -> dict:
    """SSIM to `target` of the decoded predicted x0 at every DDIM step of one guided generation (the pipeline's own
    embeddings, initial latents and scheduler), and of the generated image.

    Why: NeMo's score looks at the first step only. A pruned model whose first prediction is far from the training
    image can still come back to it later; this shows at which step it does.
    """
    device = pipe.unet.device
    cond, uncond = pipe.encode_prompt(caption, device, 1, True)
    embeds = torch.cat([uncond, cond])
    height, width = image_size(pipe)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, embeds.dtype, device,
                                   torch.Generator().manual_seed(int(seed)))
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    x0_ssim = []
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps_u, eps_c = pipe.unet(model_in, t, encoder_hidden_states=embeds).sample.chunk(2)
        out = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents)
        latents = out.prev_sample
        x0_ssim.append(ssim(to_uint8(pipe, out.pred_original_sample)[0], target))
    image = to_uint8(pipe, latents)[0]
    return {"timesteps": [int(t) for t in scheduler.timesteps], "x0_ssim": x0_ssim,
            "image_ssim": ssim(image, target), "image": image}


def _values(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def trajectories(pipe, unet, memorized: list[dict], folder: Path, seeds=tuple(range(10)), steps: int = 20,
                 guidance: float = 2.5, log=print) -> list[dict]:
    """Per memorized caption, at the seed where `unet`'s generation comes closest to the training image: the
    predicted-x0 SSIM to it at every step, for the base UNet and for `unet` (a pruned one)."""
    rows = []
    for p in memorized:
        ref = load_reference(folder / p["image"], image_size(pipe))
        with swapped_unet(pipe, unet):
            runs = [x0_trajectory(pipe, p["caption"], ref, s, steps, guidance) for s in seeds]
        best = int(np.argmax([r["image_ssim"] for r in runs]))
        base = x0_trajectory(pipe, p["caption"], ref, seeds[best], steps, guidance)
        rows.append({"caption": p["caption"], "seed": int(seeds[best]), "timesteps": base["timesteps"],
                     "base_x0_ssim": base["x0_ssim"], "pruned_x0_ssim": runs[best]["x0_ssim"],
                     "base_image_ssim": base["image_ssim"], "pruned_image_ssim": runs[best]["image_ssim"]})
        log(f"{p['caption'][:40]:40s} seed {seeds[best]}: predicted x0 SSIM per step, base {_values(base['x0_ssim'])}; "
            f"pruned {_values(runs[best]['x0_ssim'])}")
    return rows


def main(argv=None) -> dict:
    parser = tool.parser(__doc__, "also write the rows to this file")
    parser.add_argument("--neurons", type=Path, action="append", default=[],
                        help="also ablate a found set: a run's localize/neurons.json (repeatable)")
    parser.add_argument("--seeds", type=int, default=10, help="generation seeds 0..N-1 (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, the demo's verify setting)")
    args = tool.parse(parser, argv)
    config = load_config(args.model)
    pipe = load_pipeline(args.model)
    sets = ablations(pipe.unet)
    found = {path: NeuronSet.from_json(json.loads(path.read_text())["layers"]) for path in args.neurons}
    sets.update({f"found set {path}": neurons for path, neurons in found.items()})
    memorized = [p for p in caption_rows(args.model) if p["memorized"]]
    seeds, g = tuple(range(args.seeds)), config["guidance_scale"]
    result = redundancy(pipe, memorized, args.model, config["held_out"], sets, seeds, args.steps, g, log=tool.log)
    result["trajectories"] = {}
    for path, neurons in found.items():
        tool.log(f"trajectories with the found set {path} ({len(neurons)} channels):")
        result["trajectories"][str(path)] = trajectories(pipe, prune_dense(pipe.unet, neurons), memorized,
                                                         args.model, seeds, args.steps, g, log=tool.log)
    tool.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
