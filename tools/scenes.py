"""Procedurally generated scenes with captions and object masks, for training and checking a
small FILIP end to end (tools/train_filip.py, tools/demo.py, tests/test_trained.py).

A scene is a ``SIZE`` x ``SIZE`` RGB picture of one to three non-overlapping shapes on a
textured background, the caption that describes it, and each object's pixel mask. Every
draw comes from a ``numpy.random.Generator``, so a scene is a pure function of its seed.

Distributions (each independent unless said):
- background: a base grey in 70..150 with a colour cast of +-25 per channel, and one
  texture of equal probability: pixel noise (std 12), stripes (period 4..10 px, amplitude
  18, random angle), a checkerboard (cell 4..8 px, amplitude 14) or a linear gradient
  (+-30 across the image);
- objects: 1, 2 or 3 with probabilities 0.3, 0.45, 0.25; shape uniform over
  :data:`SHAPES`; colour uniform over :data:`COLOURS` without repetition of the same
  (colour, shape) pair, each channel jittered by +-20; size ``small`` (radius 6..8 px) or
  ``large`` (radius 10..13 px) with equal probability; centres uniform where the shape fits
  inside the picture, placed by rejection so that objects keep 2 px apart;
- captions (words tokenised by CLIP's BPE like any caption):
  one object: "a {size} {colour} {shape}" (size word included with probability 0.5);
  two: "a {colour} {shape} {relation} a {colour} {shape}" with the spatial relation of the
  first to the second ("left of" / "right of" when the horizontal distance dominates, else
  "above" / "below") with probability 0.6, else "a {colour} {shape} and a {colour} {shape}";
  three: "a {colour} {shape}, a {colour} {shape} and a {colour} {shape}". Objects are named
  in a random order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 60, 190), "white": (245, 245, 245)}
SIZES = {"small": (6, 8), "large": (10, 13)}
RELATIONS = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]      # (x, y) in pixels
    radius: float
    mask: np.ndarray                 # bool [SIZE, SIZE]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: np.ndarray                # uint8 [SIZE, SIZE, 3]
    caption: str
    objects: tuple[SceneObject, ...]

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


def _background(rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(70, 150) + rng.uniform(-25, 25, 3)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).astype(np.float32).copy()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        img += rng.normal(0, 12, (SIZE, SIZE, 1))
    elif kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 10)
        img += 18 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)[..., None]
    elif kind == 2:
        cell = int(rng.integers(4, 9))
        img += 14 * (((xx // cell + yy // cell) % 2) * 2 - 1)[..., None]
    else:
        angle = rng.uniform(0, 2 * math.pi)
        img += 30 * ((xx * math.cos(angle) + yy * math.sin(angle)) / SIZE)[..., None]
    return img


def _draw(shape: str, centre: tuple[float, float], r: float) -> np.ndarray:
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    x, y = centre
    if shape == "circle":
        d.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        s = r * 0.85
        d.rectangle((x - s, y - s, x + s, y + s), fill=255)
    elif shape == "triangle":
        d.polygon([(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=255)
    else:  # cross
        w = r * 0.38
        d.rectangle((x - r, y - w, x + r, y + w), fill=255)
        d.rectangle((x - w, y - r, x + w, y + r), fill=255)
    return np.asarray(m) > 127


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def make_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    img = _background(rng)
    n = n_objects or int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    taken = np.zeros((SIZE, SIZE), bool)
    while len(objects) < n:
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if (colour, shape) in used:
            continue
        size = str(rng.choice(list(SIZES)))
        r = rng.uniform(*SIZES[size])
        for _ in range(200):
            centre = (rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1))
            mask = _draw(shape, centre, r)
            grown = _draw("circle", centre, r + 2) | mask
            if not (grown & taken).any():
                break
        else:
            return make_scene(rng, n_objects)          # too crowded: draw the whole scene again
        taken |= grown
        used.add((colour, shape))
        rgb = np.clip(np.array(COLOURS[colour]) + rng.uniform(-20, 20, 3), 0, 255)
        img[mask] = rgb
        objects.append(SceneObject(shape, colour, size, centre, r, mask))
    order = rng.permutation(len(objects))
    named = [objects[i] for i in order]
    if len(named) == 1:
        o = named[0]
        caption = f"a {o.size} {o.name}" if rng.random() < 0.5 else f"a {o.name}"
    elif len(named) == 2:
        a, b = named
        if rng.random() < 0.6:
            caption = f"a {a.name} {_relation(a, b)} a {b.name}"
        else:
            caption = f"a {a.name} and a {b.name}"
    else:
        caption = f"a {named[0].name}, a {named[1].name} and a {named[2].name}"
    return Scene(np.clip(img, 0, 255).astype(np.uint8), caption, tuple(named))


def scenes(seed: int, n: int, n_objects: int | None = None) -> list[Scene]:
    """``n`` scenes from one seed (the held-out sets use seeds the training never draws)."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, n_objects) for _ in range(n)]


def patch_masks(obj: SceneObject, grid: int, share: float = 0.25) -> np.ndarray:
    """bool [grid * grid]: the patches (row-major, as the image tokens) of which at least
    ``share`` of the pixels belong to the object."""
    p = SIZE // grid
    cover = obj.mask.reshape(grid, p, grid, p).mean(axis=(1, 3))
    return (cover >= share).reshape(-1)
