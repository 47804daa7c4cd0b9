"""Rasterising the synthetic suite's objects and backgrounds (numpy + Pillow, deterministic).

Objects are geometric shapes drawn as polygons, and real handwritten digits from scikit-learn's bundled
8x8 digits set (no download), upscaled smoothly and thresholded into strokes. Every object is drawn
at ``SUPERSAMPLE`` times the target resolution and box-filtered down, giving an anti-aliased coverage
``alpha`` in [0, 1]; the object's instance mask is ``alpha >= 0.5``, the pixels it mostly covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4

# Named colours (RGB); captions use the names, pixels are jittered around these values.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 215, 45),
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "pink": (240, 125, 185),
    "cyan": (40, 200, 215),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}

BACKGROUNDS = ("gradient", "noise", "stripes", "checker")

DIGIT_WORDS = {
    0: "zero",
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
}

# The 8x8 glyph is padded by 2 pixels on each side before scaling, so a rotated digit stays inside
# its patch; the patch side is therefore 12/8 of the object's nominal size.
_DIGIT_PAD = 2
_DIGIT_EXTENT = (8 + 2 * _DIGIT_PAD) / 8
# Stroke threshold on the bicubic-upscaled glyph (values in [0, 1]): keeps strokes about as thick as
# a pen line at every size.
_DIGIT_STROKE_THRESHOLD = 0.45


def _regular_polygon(sides: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(sides) / sides
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _cross(arm: float = 0.95, half_width: float = 0.3) -> np.ndarray:
    a, w = arm, half_width
    return np.array(
        [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    )


# Each shape: (filled polygon, hole polygon or None, max rotation in degrees) in unit coordinates
# (every vertex within radius 1 of the centre, so any rotation stays inside the object's square).
# Square and diamond rotate little so that one never looks like the other; circle, ring and
# hexagon are drawn as polygons too, so all shapes share one rasteriser.
SHAPES: dict[str, tuple[np.ndarray, np.ndarray | None, float]] = {
    "circle": (_regular_polygon(64), None, 0.0),
    "square": (_regular_polygon(4, radius=0.99, phase=math.pi / 4), None, 15.0),
    "triangle": (_regular_polygon(3), None, 180.0),
    "star": (_star(), None, 180.0),
    "cross": (_cross(), None, 20.0),
    "diamond": (np.array([(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]), None, 15.0),
    "ring": (_regular_polygon(64), _regular_polygon(64, radius=0.55), 0.0),
    "hexagon": (_regular_polygon(6), None, 180.0),
}
DIGIT_MAX_ROTATION = 15.0


@lru_cache(maxsize=1)
def digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: images (1797, 8, 8) float32 in [0, 1] and labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@dataclass(frozen=True)
class ObjectSpec:
    """One object to draw.

    Attributes:
        category: a shape name from ``SHAPES`` or "digit <word>".
        colour: a key of ``COLOURS``.
        scale: nominal size in pixels (the side of the square the object fills).
        cx, cy: centre in pixels (continuous coordinates).
        angle: rotation in degrees, counter-clockwise.
        glyph: index into ``digit_glyphs()`` for digits, -1 for shapes.
    """

    category: str
    colour: str
    scale: float
    cx: float
    cy: float
    angle: float
    glyph: int = -1


@dataclass
class Patch:
    """An object's coverage on a square patch placed at (top, left) in image pixels.

    ``alpha``: (P, P) float32 in [0, 1]; ``top``/``left`` may be negative or run past the image border,
    the part outside the image is simply not drawn.
    """

    alpha: np.ndarray
    top: int
    left: int

    @property
    def mask(self) -> np.ndarray:
        """(P, P) bool: the pixels the object mostly covers."""
        return self.alpha >= 0.5

    def paste(self, height: int, width: int) -> np.ndarray:
        """The object's mask on the (height, width) image grid, bool; the part outside is cut off."""
        full = np.zeros((height, width), dtype=bool)
        size = self.alpha.shape[0]
        y0, x0 = max(self.top, 0), max(self.left, 0)
        y1, x1 = min(self.top + size, height), min(self.left + size, width)
        if y1 > y0 and x1 > x0:
            full[y0:y1, x0:x1] = self.mask[y0 - self.top : y1 - self.top, x0 - self.left : x1 - self.left]
        return full


def _downsample(canvas: np.ndarray) -> np.ndarray:
    """Box-filter a (P*S, P*S) uint8 canvas to (P, P) float32 coverage in [0, 1]."""
    size = canvas.shape[0] // SUPERSAMPLE
    blocks = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).astype(np.float32)
    return blocks.mean(axis=(1, 3)) / 255.0


def rasterize(spec: ObjectSpec) -> Patch:
    """Draw one object's coverage on its own patch (see ``Patch``)."""
    extent = _DIGIT_EXTENT if spec.glyph >= 0 else 1.0
    size = math.ceil(spec.scale * extent) + 2
    left = math.floor(spec.cx - size / 2)
    top = math.floor(spec.cy - size / 2)
    # The object's centre inside the patch, in supersampled pixels (keeps sub-pixel placement).
    centre_x = (spec.cx - left) * SUPERSAMPLE
    centre_y = (spec.cy - top) * SUPERSAMPLE
    canvas = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)

    if spec.glyph >= 0:
        glyph = np.pad(digit_glyphs()[0][spec.glyph], _DIGIT_PAD)
        side = max(4, round(spec.scale * extent * SUPERSAMPLE))
        smooth = Image.fromarray(glyph).resize((side, side), Image.BICUBIC).rotate(spec.angle, resample=Image.BILINEAR)
        strokes = Image.fromarray(((np.asarray(smooth) > _DIGIT_STROKE_THRESHOLD) * 255).astype(np.uint8))
        canvas.paste(strokes, (round(centre_x - side / 2), round(centre_y - side / 2)))
    else:
        outline, hole, _ = SHAPES[spec.category]
        theta = math.radians(spec.angle)
        # Image y points down, so a counter-clockwise rotation on screen negates the sine terms.
        rotation = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        radius = spec.scale / 2 * SUPERSAMPLE
        draw = ImageDraw.Draw(canvas)
        for polygon, fill in ((outline, 255), (hole, 0)):
            if polygon is None:
                continue
            points = polygon @ rotation.T * radius + np.array([centre_x, centre_y])
            draw.polygon([tuple(p) for p in points.tolist()], fill=fill)
    return Patch(alpha=_downsample(np.asarray(canvas)), top=top, left=left)


def _two_tones(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two muted, similar colours (low saturation, mid brightness) so that objects stand out."""
    level = rng.uniform(70, 190)
    first = np.clip(level + rng.normal(0, 18, size=3), 0, 255)
    second = np.clip(first + rng.choice([-1, 1]) * rng.uniform(20, 50) + rng.normal(0, 8, size=3), 0, 255)
    return first, second


def render_background(rng: np.random.Generator, height: int, width: int, kind: str) -> np.ndarray:
    """A textured background (height, width, 3) float32 in [0, 255] of the given ``kind``."""
    first, second = _two_tones(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    elif kind == "noise":
        cells = int(rng.integers(3, 9))
        coarse = rng.random((cells, cells)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(6, 20) * height / 128
        t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
    elif kind == "checker":
        cell = rng.uniform(8, 24) * height / 128
        t = ((np.floor(xs / cell) + np.floor(ys / cell)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {kind!r}; choose from {BACKGROUNDS}")
    return (first * (1 - t[..., None]) + second * t[..., None]).astype(np.float32)


def paint(image: np.ndarray, patch: Patch, colour: str, rng: np.random.Generator) -> None:
    """Blend one object onto ``image`` (H, W, 3) float32 in place, by its coverage ``alpha``.

    The colour is jittered a little and shaded with a gentle linear ramp, so objects of one colour
    name are not one exact RGB value.
    """
    height, width = image.shape[:2]
    size = patch.alpha.shape[0]
    y0, x0 = max(patch.top, 0), max(patch.left, 0)
    y1, x1 = min(patch.top + size, height), min(patch.left + size, width)
    base = np.clip(np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 10, size=3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.25)
    if y1 <= y0 or x1 <= x0:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    centre = np.array([patch.top + size / 2, patch.left + size / 2], dtype=np.float32)
    ramp = ((xs - centre[1]) * math.cos(angle) + (ys - centre[0]) * math.sin(angle)) / max(size, 1)
    shaded = np.clip(base[None, None, :] * (1 + strength * ramp[..., None]), 0, 255)
    alpha = patch.alpha[y0 - patch.top : y1 - patch.top, x0 - patch.left : x1 - patch.left][..., None]
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - alpha) + shaded * alpha


def finish(image: np.ndarray, rng: np.random.Generator, noise_std: float = 3.0) -> np.ndarray:
    """Add mild sensor noise and quantise (H, W, 3) float to uint8."""
    noisy = image + rng.normal(0, noise_std, size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
