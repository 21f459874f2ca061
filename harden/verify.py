"""Verification metrics and gates: did pruning remove memorization, and did it keep everything else?

Why these: the NeMo score is the method's own proxy, so it is measured before/after at the same seeds; a proxy can
disagree with full generation on small models, so when a reference (training) image is known, the best-of-seeds SSIM
of real generations to it is measured too. Quality is SSIM of hardened vs base images at the same seeds (what changed
for ordinary prompts), plus an alignment or CLIP score when available. A random-neuron control with the same
per-layer counts shows the effect comes from *these* neurons, not from pruning as such.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import BadInputError
from .nemo.batching import CPU_LATENT_PIXELS
from .neurons import NeuronSet
from .recipe import GATE_METRICS, Gate
from .targets import latent_size


@contextlib.contextmanager
def swapped_unet(pipe, unet):
    """Generate with `unet` in place of the pipeline's, restoring it even on errors."""
    base = pipe.unet
    pipe.unet = unet
    try:
        yield pipe
    finally:
        pipe.unet = base


def images_per_call(pipe, height: int | None, width: int | None) -> int:
    """Images per pipeline call: bigger calls cost less per image (the memorizer on 2 CPU cores: half at 40 images
    as at 4). CPU: UNet batches as big as localization's forwards (with guidance a batch holds 2 samples per image);
    CUDA 4x that."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    side = latent_size(pipe.unet)
    latent = ((height // scale) if height else side[0]) * ((width // scale) if width else side[1])
    per_call = max(1, CPU_LATENT_PIXELS // (2 * latent))
    return per_call * 4 if pipe.device.type == "cuda" else per_call


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
             height: int | None = None, width: int | None = None, batch_images: int | None = None,
             advance=None) -> list[list[np.ndarray]]:
    """HxWx3 uint8 images [prompt][seed] for every prompt x seed, in shared pipeline calls of `batch_images`.

    Each image has its own CPU generator seeded with its seed, so an image does not depend on which others share
    its call (up to the last bits of batched float math). `advance(n)` reports n more prompts done.
    """
    pairs = [(p, s) for p in prompts for s in seeds]
    per_call = batch_images or images_per_call(pipe, height, width)
    flat: list[np.ndarray] = []
    for start in range(0, len(pairs), per_call):
        chunk = pairs[start:start + per_call]
        out = pipe(prompt=[p for p, _ in chunk], generator=[torch.Generator().manual_seed(int(s)) for _, s in chunk],
                   num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, output_type="np")
        flat += [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in out.images]
        if advance is not None:
            advance(len(flat) // len(seeds) - (len(flat) - len(chunk)) // len(seeds))
    return [flat[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(prompts))]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 RGB images (Wang et al.'s Gaussian setting; window shrunk for tiny images)."""
    from skimage.metrics import structural_similarity

    side = min(a.shape[0], a.shape[1])
    win = min(11, side if side % 2 else side - 1)
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, win_size=win))


def load_reference(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The reference image as uint8 RGB resized to the generated (H, W)."""
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC))


def best_of_seeds_ssim(images: Sequence[np.ndarray], reference: np.ndarray) -> float:
    return max(ssim(img, reference) for img in images)


def random_control(neurons: NeuronSet, widths: dict[str, int], seed: int) -> NeuronSet:
    """Random channels with the same count per layer, disjoint from `neurons` where the layer allows it."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, idx in neurons.layers.items():
        pool = torch.tensor(sorted(set(range(widths[name])) - set(idx)))
        if len(pool) < len(idx):
            pool = torch.arange(widths[name])
        out[name] = tuple(pool[torch.randperm(len(pool), generator=gen)[:len(idx)]].tolist())
    return NeuronSet(out)


class ClipScorer:
    """CLIP score (100 * max(cos(image, text), 0)) with a transformers CLIPModel, computed directly.

    Why not torchmetrics' CLIPScore: with transformers 5 it fails on the new output types (see ecosystem notes).
    """

    def __init__(self, name_or_path: str, device: torch.device):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise BadInputError(f"could not load CLIP model {name_or_path!r}: {first[:200]}",
                                "verify.clip_model must be a transformers CLIPModel (safetensors)") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray], prompt: str) -> list[float]:
        inputs = self.processor(text=[prompt] * len(images), images=list(images), return_tensors="pt", padding=True,
                                truncation=True)
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
        return (100 * cos.clamp_min(0)).tolist()


def evaluate_gates(metrics: dict[str, float | None], gates: dict[str, Gate], tau_mem: float) -> list[dict]:
    """Each gate with its value and outcome. A gate on a metric that was not measured fails, loudly."""
    results = []
    for name, gate in gates.items():
        op, bound = (">=", gate.min) if gate.min is not None else ("<=", gate.max)
        threshold = tau_mem if bound == "tau_mem" else float(bound)
        value = metrics.get(name)
        if value is None:
            passed, note = False, "not measured (see the verify section: held_out, reference images, clip_model)"
        else:
            passed = value >= threshold if op == ">=" else value <= threshold
            note = ""
        results.append({"name": name, "metric": GATE_METRICS[name][0], "op": op, "threshold": threshold,
                        "value": value, "passed": bool(passed), "note": note})
    return results
