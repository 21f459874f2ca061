"""Figures for the export and the card, drawn with PIL (no matplotlib): neurons per layer, image grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def neurons_per_layer_png(path: Path, counts: dict[str, int], widths: dict[str, int]) -> None:
    """A horizontal bar per target layer: neurons removed (and the layer's width), drawn with PIL (no matplotlib)."""
    from PIL import Image, ImageDraw

    names = list(widths)
    top = max([1, *counts.values()])
    row, label_w, bar_w = 18, 330, 300
    img = Image.new("RGB", (label_w + bar_w + 90, row * (len(names) + 2)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), f"neurons removed per layer (total {sum(counts.values())})", fill="black")
    for i, name in enumerate(names):
        y = row * (i + 1) + 4
        n = counts.get(name, 0)
        draw.text((4, y), name.replace("_blocks.", ".").replace(".attentions.", ".a")[-52:], fill="black")
        draw.rectangle([label_w, y, label_w + max(1, int(bar_w * n / top)), y + row - 6],
                       fill="#c0392b" if n else "#dddddd")
        draw.text((label_w + bar_w + 6, y), f"{n} / {widths[name]}", fill="black")
    img.save(path)


def heldout_grid_png(path: Path, pairs: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """One row per held-out prompt: base | hardened at the same seed."""
    from PIL import Image, ImageDraw

    if not pairs:
        return
    h, w = pairs[0][1].shape[:2]
    scale = max(1, 128 // max(h, w))
    cell_h, cell_w, label = h * scale, w * scale, 16
    img = Image.new("RGB", (2 * cell_w + 12, (cell_h + label) * len(pairs) + label), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), "base", fill="black")
    draw.text((cell_w + 8, 2), "hardened", fill="black")
    for i, (caption, base, hard) in enumerate(pairs):
        y = label + i * (cell_h + label)
        for j, arr in enumerate((base, hard)):
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            img.paste(tile, (j * (cell_w + 8), y))
        draw.text((4, y + cell_h + 2), caption[:60], fill="black")
    img.save(path)


def image_row_png(path: Path, columns: list[tuple[str, np.ndarray | None]], caption: str = "") -> None:
    """One row of labelled images (a missing one is a grey cell), e.g. the audit's target | base | hardened from
    the prompt | hardened under attack; small images are scaled up to ~128 px with nearest neighbours."""
    from PIL import Image, ImageDraw

    shapes = [img.shape[:2] for _, img in columns if img is not None]
    h, w = shapes[0] if shapes else (16, 16)
    scale = max(1, 128 // max(h, w))
    cell_h, cell_w, label, gap = h * scale, w * scale, 16, 8
    width = max(len(columns) * (cell_w + gap) + gap, 6 * len(caption) + 8)
    img = Image.new("RGB", (width, cell_h + 2 * label + 4), "white")
    draw = ImageDraw.Draw(img)
    for j, (title, arr) in enumerate(columns):
        x = gap + j * (cell_w + gap)
        draw.text((x, 2), title[:max(4, cell_w // 6)], fill="black")
        if arr is None:
            draw.rectangle([x, label, x + cell_w - 1, label + cell_h - 1], fill="#cccccc")
        else:
            img.paste(Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST), (x, label))
    if caption:
        draw.text((gap, label + cell_h + 2), caption[:120], fill="black")
    img.save(path)
