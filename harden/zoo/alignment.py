"""A weight-free, exact quality metric for procedural captions: do the image's colours and shape match the caption?

Why weight-free: no CLIP weights can be downloaded here, and a metric that needs none is reproducible anywhere.
Three checks: background colour (the palette colour most common on the 1-pixel border, which the generator never
lets a shape touch), foreground colour (the most common other palette colour) and shape (the largest connected
foreground blob's fill ratio of its bounding box: ~1 square, ~pi/4 circle, ~1/2 triangle).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .data import COLOURS, parse_caption

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=float)


def palette_classes(image: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel [H, W]."""
    dist = ((image[..., None, :].astype(float) - _PALETTE) ** 2).sum(-1)
    return dist.argmin(-1)


def classify_shape(mask: np.ndarray) -> str | None:
    """'square', 'circle' or 'triangle' from the largest connected blob's fill ratio; None if there is no blob."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    rows, cols = np.nonzero(blob)
    fill = blob.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    if fill >= 0.89:
        return "square"
    return "circle" if fill >= 0.64 else "triangle"


def describe(image) -> tuple[str, str | None, str | None]:
    """(background colour, foreground colour or None, shape or None) as the metric sees the image."""
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)[..., :3]
    classes = palette_classes(image)
    border = np.concatenate([classes[0], classes[-1], classes[1:-1, 0], classes[1:-1, -1]])
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    mask = classes != bg
    if not mask.any():
        return _NAMES[bg], None, None
    fg = int(np.bincount(classes[mask], minlength=len(_NAMES)).argmax())
    return _NAMES[bg], _NAMES[fg], classify_shape(classes == fg)


def alignment(image, caption: str) -> float | None:
    """Fraction of the 3 checks passed (background, foreground, shape); None when the caption is not procedural."""
    parsed = parse_caption(caption)
    if parsed is None:
        return None
    fg, shape, bg = parsed
    seen_bg, seen_fg, seen_shape = describe(image)
    return float(np.mean([seen_bg == bg, seen_fg == fg, seen_shape == shape]))
