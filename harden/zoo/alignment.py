"""A weight-free, exact quality metric for procedural captions: do the image's colours and shape match the caption?

Why weight-free: no CLIP weights can be downloaded here, and a metric that needs none is reproducible anywhere.
Three checks: background colour (the palette colour most common on the 1-pixel border, which the generator never
lets a shape touch), foreground colour (the most common other palette colour) and shape (which of the generator's
own squares, discs and triangles, at any size and position, overlaps the largest connected foreground blob best).

`python -m harden.zoo.alignment` measures the shape check on fresh renders, clean and with stray foreground pixels
next to the shape (what a sampled image's colour bleeding looks like), against the bounding-box fill-ratio check
this module used before.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
from scipy import ndimage

from . import MEMORIZER_DIR
from .data import COLOURS, RESOLUTION, SHAPES, Style, combinations, parse_caption, render, shape_mask
from .folder import load_config

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=float)


def palette_classes(image: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for every pixel [H, W]."""
    dist = ((image[..., None, :].astype(float) - _PALETTE) ** 2).sum(-1)
    return dist.argmin(-1)


def largest_blob(mask: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected component of a boolean mask, or None if the mask is empty."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


@functools.cache
def templates(resolution: int = RESOLUTION) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every distinct rasterization of each shape, as float rows [N, H*W] with their areas [N]: sizes from 1/8 to
    15/16 of the side and centres anywhere in the image, both on a grid of 1/32 of the side (0.5 px at 16x16). Why so
    wide: a sample may draw a shape smaller, larger or nearer the edge than the training data does, and it should
    still be judged."""
    step = resolution / 32
    size, cx, cy = np.meshgrid(np.arange(4, 31) * step, np.arange(0, 33) * step, np.arange(0, 33) * step,
                               indexing="ij")
    params = [p.reshape(-1, 1, 1) for p in (cx, cy, size)]
    bank = {}
    for shape in SHAPES:
        masks = shape_mask(shape, *params, resolution=resolution).reshape(len(params[0]), -1)
        masks = masks[masks.sum(1) >= 2]
        unique = np.unique(np.packbits(masks, axis=1), axis=0)
        rows = np.unpackbits(unique, axis=1)[:, :resolution * resolution].astype(np.float32)
        bank[shape] = rows, rows.sum(1)
    return bank


def shape_overlaps(mask: np.ndarray) -> dict[str, float]:
    """Best intersection-over-union of the mask's largest blob with any template of each shape ({} if no blob)."""
    blob = largest_blob(mask)
    if blob is None:
        return {}
    if blob.shape[0] != blob.shape[1]:
        raise ValueError(f"the alignment metric needs square images, got {blob.shape[1]}x{blob.shape[0]}")
    b = blob.ravel().astype(np.float32)
    best = {}
    for shape, (bank, areas) in templates(blob.shape[0]).items():
        inter = bank @ b
        best[shape] = float((inter / (areas + b.sum() - inter)).max())
    return best


def classify_shape(mask: np.ndarray) -> str | None:
    """'circle', 'square' or 'triangle': the shape whose best template overlaps the largest blob most; None if there
    is no blob. Why templates, not the blob's fill ratio of its bounding box: one stray pixel beside a square widens
    the box and turns the ratio into a circle's, while it lowers every template's overlap alike."""
    overlaps = shape_overlaps(mask)
    return max(overlaps, key=overlaps.get) if overlaps else None


def fill_ratio_shape(mask: np.ndarray) -> str | None:
    """The shape check this module used before (the largest blob's fill ratio of its bounding box: ~1 square, ~pi/4
    circle, ~1/2 triangle). Kept only as the baseline `validate` measures the template check against."""
    blob = largest_blob(mask)
    if blob is None:
        return None
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


def with_stray_pixels(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The mask plus k pixels drawn from those 4-adjacent to it: colour bleeding beside a shape, in miniature."""
    ring = np.flatnonzero(ndimage.binary_dilation(mask) & ~mask)
    out = mask.ravel().copy()
    out[rng.choice(ring, size=min(k, len(ring)), replace=False)] = True
    return out.reshape(mask.shape)


def validate(per_combination: int = 50, stray=(0, 1, 2, 4), seed: int = 0, style: Style | None = None,
             classifiers=None) -> dict:
    """Accuracy of each shape classifier on independent fresh renders of every combination (one generator for all,
    so no two combinations share a geometry), with k stray foreground pixels added beside the shape."""
    classifiers = classifiers or {"template": classify_shape, "fill_ratio": fill_ratio_shape}
    if style is None:  # the data the shipped model was last trained on
        style = Style.from_json(load_config(MEMORIZER_DIR).get("style"))
    rng = np.random.default_rng(seed)
    hits = {(name, k): 0 for name in classifiers for k in stray}
    total = 0
    for fg, shape, bg in combinations():
        for _ in range(per_combination):
            mask = palette_classes(render(fg, shape, bg, rng, style=style)) == _NAMES.index(fg)
            total += 1
            for k in stray:
                noisy = with_stray_pixels(mask, k, rng) if k else mask
                for name, classify in classifiers.items():
                    hits[name, k] += classify(noisy) == shape
    return {name: {k: hits[name, k] / total for k in stray} for name in classifiers} | {"renders": total}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="Measure the alignment metric's shape check on fresh renders.")
    parser.add_argument("--per-combination", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = validate(args.per_combination, seed=args.seed)
    print(f"{result['renders']} renders (the shipped data style), shape check accuracy by stray pixels beside the "
          "shape:")
    for name in ("template", "fill_ratio"):
        print(f"  {name:10s} " + "  ".join(f"{k} px: {v:.4f}" for k, v in result[name].items()))
    return result


if __name__ == "__main__":
    main()
