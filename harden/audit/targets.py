"""What each audited prompt must not reproduce: its training image, or else a surrogate from the base model.

Why surrogates: for SD v1.4 the training images are not at hand, but a memorized prompt makes the base model draw
the same picture at most seeds; that picture (the memorized mode) is what the hardened model must no longer give.

Surrogate rule (documented, tested): the base model's images of the prompt at the audit seeds are compared pairwise
with the audit's similarity. The surrogate is the seed's image that reaches the threshold with the most other seeds
(ties: the higher mean similarity to the others, then the earlier seed). It is *consistent* when it reaches the
threshold with at least `min_agreement` (default half) of the other seeds; otherwise the base draws nothing
consistent for this prompt, and the prompt is reported as such ("no consistent base image") and not audited,
rather than audited against one arbitrary sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import BadInputError
from .similarity import Similarity


@dataclass
class Target:
    """One audited image: pixels at the model's size (None: nothing to audit against), where it came from, notes."""

    image: np.ndarray | None
    source: str  # "training" | "surrogate" | "control" | "none"
    note: str = ""
    path: str | None = None
    seed: int | None = None  # the base seed a surrogate was taken from
    agreement: float | None = None  # share of the other seeds a surrogate agrees with

    def to_json(self) -> dict:
        return {"source": self.source, "note": self.note, "path": self.path, "seed": self.seed,
                "agreement": self.agreement}


def read_image(path: Path, what: str) -> np.ndarray:
    """An image file as uint8 RGB (any size); a missing or unreadable file is bad input."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{what}: image {path} does not exist", "fix the image path (relative to its listing)")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadInputError(f"{what}: {path.name} is not a readable image ({type(err).__name__})",
                            "give a PNG or JPEG file") from None


def fit(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """The image at (H, W) = size, and a note when it had to be resized (bicubic, aspect ratio not kept)."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image, ""
    note = f"resized from {image.shape[1]}x{image.shape[0]} to {size[1]}x{size[0]}"
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC)), note


def training_target(path: Path, size: tuple[int, int], what: str) -> Target:
    image, note = fit(read_image(path, what), size)
    return Target(image, "training", note, str(path))


def control_target(path: Path, size: tuple[int, int]) -> Target:
    image, note = fit(read_image(path, "audit.control_images"), size)
    return Target(image, "control", note, str(path))


def choose_surrogate(images: Sequence[np.ndarray], seeds: Sequence[int], sim: Similarity,
                     min_agreement: float = 0.5) -> Target:
    """The base's memorized mode among its images of one prompt at `seeds` (see the module docstring)."""
    n = len(images)
    if n < 2:
        raise BadInputError("a surrogate target needs at least 2 audit seeds", "give audit.seeds with 2 or more")
    values = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            values[i, j] = values[j, i] = sim(images[i], images[j])
    others = ~np.eye(n, dtype=bool)
    agree = [int((values[i][others[i]] >= sim.threshold).sum()) for i in range(n)]
    mean = [float(values[i][others[i]].mean()) for i in range(n)]
    best = max(range(n), key=lambda i: (agree[i], mean[i], -i))
    share = agree[best] / (n - 1)
    detail = (f"seed {seeds[best]} agrees with {agree[best]} of {n - 1} other seeds (mean {sim.name} "
              f"{mean[best]:.3f})")
    if share < min_agreement:
        return Target(None, "none", f"no consistent base image: {detail}", seed=int(seeds[best]), agreement=share)
    return Target(np.asarray(images[best]), "surrogate", f"surrogate: {detail}", seed=int(seeds[best]),
                  agreement=share)
