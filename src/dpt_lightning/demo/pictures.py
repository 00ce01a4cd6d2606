"""The demo's synthetic pictures: four classes that differ visibly (shape and colour).

`draw_demo_image` draws one picture; `write_demo_dataset` writes a data set in the image-folder
layout (``<class>/<n>.png``); `demo_dataset_dir` keeps one such folder in the cache, built once.
The demo's data module (`dpt_lightning.data.demo`) reads that folder like any user's image folder,
and the demo's pre-training (`dpt_lightning.demo.pretrain`) draws fresh pictures of its own.

The multi-label demo: `draw_multilabel_image` puts any subset of the four shapes (none: a "normal"
picture) into the quadrants of one picture; `write_demo_multilabel_dataset` writes such pictures
with a ``labels.csv`` (``path,labels``: ``circle|cross``, ``No Finding``), cached by
`demo_multilabel_dir`.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from PIL import Image, ImageDraw

from dpt_lightning.files import atomic_directory, cache_root

#: Class folder -> (shape, base colour). Class names are words of the tiny model's vocabulary.
DEMO_CLASSES = {
    "circle": ("circle", (220, 60, 60)),
    "square": ("square", (60, 200, 80)),
    "stripes": ("stripes", (70, 90, 230)),
    "cross": ("cross", (230, 220, 70)),
}
#: One caption per class, used by the demo's contrastive pre-training of the tiny backbone.
DEMO_CAPTIONS = {
    "circle": "a red round circle",
    "square": "a green square",
    "stripes": "blue horizontal stripes",
    "cross": "a yellow cross",
}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], rng: random.Random,
                x0: int, y0: int, size: int) -> None:
    """The shape in a jittered colour, placed at random inside the square ``(x0, y0, size)``."""
    fill = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in colour)
    half = rng.randint(size // 5, size // 3)
    cx, cy = x0 + rng.randint(half, size - half), y0 + rng.randint(half, size - half)
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "stripes":
        width = rng.randint(3, 6)
        for y in range(y0 + rng.randint(0, width), y0 + size, 2 * width):
            draw.rectangle([x0, y, x0 + size - 1, min(y + width - 1, y0 + size - 1)], fill=fill)
    elif shape == "cross":
        arm = max(2, half // 3)
        draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=fill)


def _picture(shapes: list[tuple[str, tuple[int, int, int], int, int, int]], rng: random.Random,
             size: int) -> Image.Image:
    """A noisy dark background, the ``(shape, colour, x0, y0, square size)`` shapes, then speckle."""
    background = tuple(rng.randint(0, 60) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for shape, colour, x0, y0, square in shapes:
        _draw_shape(draw, shape, colour, rng, x0, y0, square)
    for _ in range(size * 2):  # sensor-like speckle
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randint(0, 255)
        image.putpixel((x, y), (v, v, v))
    return image


def draw_demo_image(shape: str, colour: tuple[int, int, int], rng: random.Random, size: int = 64) -> Image.Image:
    """One picture: a noisy dark background with the class's shape in a jittered colour."""
    return _picture([(shape, colour, 0, 0, size)], rng, size)


def draw_multilabel_image(shapes: list[str], rng: random.Random, size: int = 64) -> Image.Image:
    """One picture with each of ``shapes`` (demo class names) in its own random quadrant."""
    half = size // 2
    cells = rng.sample(range(4), len(shapes))
    return _picture([(shape, DEMO_CLASSES[shape][1], half * (cell % 2), half * (cell // 2), half)
                     for shape, cell in zip(shapes, cells)], rng, size)


def write_demo_dataset(folder: Path, per_class: int, seed: int = 0) -> Path:
    """Write ``per_class`` images of every demo class into ``folder/<class>/<n>.png``."""
    rng = random.Random(seed)
    for name, (shape, colour) in DEMO_CLASSES.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            draw_demo_image(shape, colour, rng).save(folder / name / f"{n:03d}.png")
    return folder


def demo_dataset_dir(per_class: int = 40, seed: int = 0) -> Path:
    """The cached demo image folder (generated on first use, about a second)."""
    key = hashlib.sha256(repr((sorted(DEMO_CLASSES.items()), per_class, seed, 1)).encode()).hexdigest()[:12]
    folder = cache_root() / f"demo-data-{key}"
    if not folder.is_dir():
        with atomic_directory(folder) as tmp:
            write_demo_dataset(tmp, per_class, seed)
    return folder


def write_demo_multilabel_dataset(folder: Path, num_images: int, seed: int = 0, p_shape: float = 0.45) -> Path:
    """Write ``num_images`` pictures ``folder/images/<n>.png``, each with every demo shape present
    with probability ``p_shape`` (none: a normal picture), and ``folder/labels.csv``
    (``path,labels``, the shapes in class order joined by ``|``, or ``No Finding``)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = ["path,labels"]
    for n in range(num_images):
        shapes = [name for name in DEMO_CLASSES if rng.random() < p_shape]
        draw_multilabel_image(shapes, rng).save(folder / "images" / f"{n:03d}.png")
        lines.append(f"images/{n:03d}.png,{'|'.join(shapes) or 'No Finding'}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def demo_multilabel_dir(num_images: int = 240, seed: int = 0) -> Path:
    """The cached multi-label demo folder (``labels.csv`` and ``images/``; generated on first use)."""
    recipe = (sorted(DEMO_CLASSES.items()), num_images, seed, "multilabel", 1)
    key = hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]
    folder = cache_root() / f"demo-multilabel-{key}"
    if not folder.is_dir():
        with atomic_directory(folder) as tmp:
            write_demo_multilabel_dataset(tmp, num_images, seed)
    return folder
