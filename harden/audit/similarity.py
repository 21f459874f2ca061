"""How alike a generation is to its target image: SSIM (default) or SSCD (a local TorchScript copy-detection model).

Why two: the papers report SSCD (cosine of copy-detection descriptors, 224 px), which needs a download and makes no
sense at the shipped memorizer's 16x16; SSIM (scikit-image) works at any size and needs nothing.

SSIM window (documented choice): below 64 px a side, scikit-image's uniform 7x7 window (`harden.metrics.ssim(...,
gaussian=False)`). Why: scikit-image drops (window-1)/2 border pixels from the mean, so Wang et al.'s 11-tap Gaussian
would score only the central 6x6 of a 16x16 image (14 % of it), the 7x7 window the central 10x10 (39 %); from 64 px
up the Gaussian setting of Wang et al. (11 taps, sigma 1.5) loses little and is what the papers use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BadInputError
from ..metrics import ssim

DEFAULT_THRESHOLDS = {"ssim": 0.7, "sscd": 0.5}  # dori.md §4 (SSIM on the memorizer); SSCD: Somepalli et al.'s 0.5
GAUSSIAN_FROM = 64  # smallest side (px) from which SSIM uses Wang et al.'s Gaussian window
SSCD_RESIZE, SSCD_CROP = 256, 224
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ssim_window(image: np.ndarray) -> str:
    """The SSIM window used at this image size, as written into audit.json."""
    return "gaussian 11x11 sigma 1.5" if min(image.shape[:2]) >= GAUSSIAN_FROM else "uniform 7x7"


@dataclass
class Similarity:
    """`sim(image, target)` -> float, higher = more alike; an image reproduces its target when >= threshold."""

    name: str
    threshold: float

    def __call__(self, image: np.ndarray, target: np.ndarray) -> float:
        raise NotImplementedError

    def best(self, images: Sequence[np.ndarray], target: np.ndarray) -> tuple[float, int]:
        """(best similarity over `images`, its index): a target counts as reproduced by its best seed."""
        values = [self(img, target) for img in images]
        i = int(np.argmax(values))
        return float(values[i]), i

    def describe(self, image: np.ndarray) -> str:
        return self.name


class SSIM(Similarity):
    def __call__(self, image: np.ndarray, target: np.ndarray) -> float:
        if image.shape != target.shape:
            raise ValueError(f"image {image.shape} and target {target.shape} differ in size")
        return ssim(image, target, gaussian=min(image.shape[:2]) >= GAUSSIAN_FROM)

    def describe(self, image: np.ndarray) -> str:
        return f"ssim ({ssim_window(image)} window)"


@dataclass
class SSCD(Similarity):
    """Cosine of SSCD descriptors: resize the short side to 256, centre-crop 224, ImageNet normalisation."""

    model: object = None
    _cache: dict = field(default_factory=dict, repr=False)

    def embed(self, image: np.ndarray):
        import torch
        from PIL import Image

        key = hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        w, h = img.size
        scale = SSCD_RESIZE / min(w, h)
        img = img.resize((max(SSCD_RESIZE, round(w * scale)), max(SSCD_RESIZE, round(h * scale))), Image.BILINEAR)
        left, top = (img.size[0] - SSCD_CROP) // 2, (img.size[1] - SSCD_CROP) // 2
        img = img.crop((left, top, left + SSCD_CROP, top + SSCD_CROP))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        with torch.no_grad():
            out = self.model(x.unsqueeze(0))
        vec = torch.nn.functional.normalize(out.reshape(1, -1).float(), dim=1)[0]
        self._cache[key] = vec
        return vec

    def __call__(self, image: np.ndarray, target: np.ndarray) -> float:
        return float((self.embed(image) * self.embed(target)).sum())

    def describe(self, image: np.ndarray) -> str:
        return "sscd (cosine, 224 px centre crop)"


def load_sscd(path: Path):
    """A TorchScript SSCD model from a local file (never downloaded), on the CPU, in eval mode."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"audit.sscd_model {path} does not exist",
                            "give the path of a local TorchScript file (e.g. sscd_disc_mixup.torchscript.pt)")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"audit.sscd_model {path} is not a TorchScript model: {first[:160]}",
                            "export SSCD with torch.jit.save or use the published .torchscript.pt file") from None
    return model.eval()


def make_similarity(name: str, threshold: float | None, sscd_model: Path | None = None) -> Similarity:
    """The metric the recipe names, with its threshold (None: the metric's default, DEFAULT_THRESHOLDS)."""
    if name not in DEFAULT_THRESHOLDS:
        raise BadInputError(f"unknown similarity {name!r}", "use ssim or sscd")
    value = DEFAULT_THRESHOLDS[name] if threshold is None else float(threshold)
    if not 0.0 < value <= 1.0:
        raise BadInputError(f"{name} threshold {value} is out of range",
                            "a similarity threshold is in (0, 1]: an image counts when its best seed reaches it")
    if name == "ssim":
        return SSIM("ssim", value)
    if sscd_model is None:
        raise BadInputError("metric sscd needs audit.sscd_model", "give a local TorchScript SSCD file, or use ssim")
    return SSCD("sscd", value, load_sscd(Path(sscd_model)))
