"""The demo's synthetic pictures: four classes that differ visibly (shape and colour).

`draw_demo_image` draws one picture; `write_demo_dataset` writes a data set in the image-folder
layout (``<class>/<n>.png``); `demo_dataset_dir` keeps one such folder in the cache, built once.
The demo's data module (`dpt_lightning.data.demo`) reads that folder like any user's image folder,
and the demo's pre-training (`dpt_lightning.demo.pretrain`) draws fresh pictures of its own.
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


def draw_demo_image(shape: str, colour: tuple[int, int, int], rng: random.Random, size: int = 64) -> Image.Image:
    """One picture: a noisy dark background with the class's shape in a jittered colour."""
    background = tuple(rng.randint(0, 60) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    fill = tuple(max(0, min(255, c + rng.randint(-35, 35))) for c in colour)
    half = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(half, size - half), rng.randint(half, size - half)
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "stripes":
        width = rng.randint(3, 6)
        for y in range(rng.randint(0, width), size, 2 * width):
            draw.rectangle([0, y, size, y + width - 1], fill=fill)
    elif shape == "cross":
        arm = max(2, half // 3)
        draw.rectangle([cx - half, cy - arm, cx + half, cy + arm], fill=fill)
        draw.rectangle([cx - arm, cy - half, cx + arm, cy + half], fill=fill)
    for _ in range(size * 2):  # sensor-like speckle
        x, y = rng.randrange(size), rng.randrange(size)
        v = rng.randint(0, 255)
        image.putpixel((x, y), (v, v, v))
    return image


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
