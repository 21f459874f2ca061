"""Image metrics and gates: did hardening remove memorization, and did it keep everything else?

Why these: the NeMo score is the method's own proxy, so it is measured before/after at the same seeds; a proxy can
disagree with full generation on small models, so when a reference (training) image is known, the best-of-seeds SSIM
of real generations to it is measured too. Quality is SSIM of hardened vs base images at the same seeds (what changed
for ordinary prompts), plus an alignment or CLIP score when available. A random-neuron control with the same
per-layer counts shows the effect comes from *these* neurons, not from pruning as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import BadInputError
from .neurons import NeuronSet
from .recipe import GATE_METRICS, Gate


def ssim(a: np.ndarray, b: np.ndarray, gaussian: bool = True) -> float:
    """SSIM of two uint8 RGB images: Wang et al.'s Gaussian setting (window shrunk for tiny images), or with
    `gaussian=False` scikit-image's default 7x7 uniform window (what the memorizer's own measurements use)."""
    from skimage.metrics import structural_similarity

    if not gaussian:
        return float(structural_similarity(a, b, channel_axis=-1, data_range=255))
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
