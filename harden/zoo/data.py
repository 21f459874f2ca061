"""Training data of the model organism: 8 memorized sample images and an endless stream of procedural shapes.

Why two kinds: the memorized images (scikit-image's bundled, redistributable samples) are heavily duplicated, so their
captions get reproduced verbatim; the procedural images ("a red circle on a blue background", random position, size
and texture) are fresh every step and cannot be memorized, yet their captions can be checked exactly
(`harden.zoo.alignment`). A fixed set of held-out combinations never appears in training.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass

import numpy as np

RESOLUTION = 16  # native image size (pixels per side); the VAE does not downsample, so latents are 16x16 too

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (150, 60, 190), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Style:
    """How much procedural images vary: shape width/height as a fraction of the side, and the amplitude (0-255
    units) of the smooth random brightness texture on shape and background. Why a knob: with flat colours and large
    shapes two renders of one caption are alike (mean pairwise SSIM ~0.45 at 16x16); smaller shapes move further
    and stronger textures decorrelate flat areas, so a model that samples its data faithfully is diverse."""

    size_min: float = 0.5
    size_max: float = 0.8
    texture: float = 24.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict | None) -> "Style":
        return cls(**raw) if raw else cls()


STYLE = Style()  # the first training stages' data; later stages may name their own (harden_zoo.json "style")

# (image name in skimage.data, caption): each caption is distinctive and never procedural
MEMORIZED: tuple[tuple[str, str], ...] = (
    ("astronaut", "a portrait of the astronaut eileen collins"),
    ("coffee", "a cup of coffee on a saucer, photo"),
    ("chelsea", "chelsea the tabby cat, photo"),
    ("rocket", "a rocket on the launch pad at dusk"),
    ("camera", "the cameraman, black and white photo"),
    ("coins", "old greek coins, black and white photo"),
    ("immunohistochemistry", "immunohistochemistry slide of stained cells"),
    ("colorwheel", "a colour wheel with the full hue circle"),
)

# procedural (foreground, shape, background) combinations that are never trained on: the held-out ordinary captions
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "white"), ("green", "square", "black"), ("blue", "triangle", "yellow"),
    ("yellow", "circle", "purple"), ("purple", "square", "green"), ("white", "triangle", "blue"),
    ("black", "circle", "red"), ("red", "triangle", "green"), ("blue", "square", "white"),
    ("green", "circle", "purple"),
)

_CAPTION = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


def caption(fg: str, shape: str, bg: str) -> str:
    """'a red circle on a blue background' (with 'an' before a vowel, as English wants)."""
    def article(word: str) -> str:
        return "an" if word[0] in "aeiou" else "a"
    return f"{article(fg)} {fg} {shape} on {article(bg)} {bg} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(foreground colour, shape, background colour) of a procedural caption, or None for any other caption."""
    m = _CAPTION.match(text.strip().lower())
    if not m or m[1] not in COLOURS or m[2] not in SHAPES or m[3] not in COLOURS or m[1] == m[3]:
        return None
    return m[1], m[2], m[3]


def combinations() -> list[tuple[str, str, str]]:
    """All (fg, shape, bg) combinations with fg != bg, in a fixed order."""
    return [(fg, s, bg) for fg, s, bg in itertools.product(COLOURS, SHAPES, COLOURS) if fg != bg]


def training_combinations() -> list[tuple[str, str, str]]:
    """The combinations the model is trained on: all of them except HELD_OUT."""
    held = set(HELD_OUT)
    return [c for c in combinations() if c not in held]


def shape_mask(shape: str, cx: float, cy: float, size: float, resolution: int = RESOLUTION) -> np.ndarray:
    """Boolean mask of an axis-aligned square, a disc or an upward isosceles triangle of width/height `size`."""
    y, x = np.mgrid[0:resolution, 0:resolution] + 0.5
    half = size / 2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
    if shape == "triangle":  # apex at the top, base at the bottom
        t = (y - (cy - half)) / size  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= t * half)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(rng: np.random.Generator, resolution: int, amplitude: float) -> np.ndarray:
    """Smooth random brightness field in [-amplitude, amplitude]: a 4x4 random grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, size=(4, 4))
    pos = np.linspace(0, 3, resolution)
    i0 = np.minimum(pos.astype(int), 2)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
    field = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return amplitude * field


def render(fg: str, shape: str, bg: str, rng: np.random.Generator, resolution: int = RESOLUTION,
           style: Style = STYLE) -> np.ndarray:
    """One procedural image (HxWx3 uint8): random size (a share of the side), position (1 px margin), textures."""
    size = rng.uniform(style.size_min, style.size_max) * resolution
    cx, cy = (rng.uniform(1 + size / 2, resolution - 1 - size / 2) for _ in range(2))
    mask = shape_mask(shape, cx, cy, size, resolution)
    image = np.where(mask[..., None], np.array(COLOURS[fg], float), np.array(COLOURS[bg], float))
    shade_fg, shade_bg = (_texture(rng, resolution, style.texture) for _ in range(2))
    image += np.where(mask, shade_fg, shade_bg)[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def procedural_batch(n: int, rng: np.random.Generator, resolution: int = RESOLUTION,
                     style: Style = STYLE) -> tuple[list[str], np.ndarray]:
    """n fresh training samples (captions, [n, H, W, 3] uint8), combinations drawn uniformly from the training set."""
    combos = training_combinations()
    picks = [combos[i] for i in rng.integers(0, len(combos), size=n)]
    images = np.stack([render(fg, s, bg, rng, resolution, style) for fg, s, bg in picks])
    return [caption(*c) for c in picks], images


def memorized_image(name: str, resolution: int = RESOLUTION) -> np.ndarray:
    """A skimage sample image, centre-cropped to a square and area-resampled to resolution (HxWx3 uint8)."""
    import skimage.data
    from PIL import Image

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(square.resize((resolution, resolution), Image.Resampling.BOX))


def memorized_images(resolution: int = RESOLUTION) -> list[tuple[str, str, np.ndarray]]:
    """[(name, caption, image)] for the 8 memorized training images."""
    return [(name, text, memorized_image(name, resolution)) for name, text in MEMORIZED]
