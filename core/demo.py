"""A generated demo dataset in the COMP5329 layout: scenes of coloured shapes.

Each image shows one to three distinct shapes on a noisy background; its labels
are the shapes present. The caption is built from templates and names each shape
with probability 0.6, so captions alone cannot recover every label: a model has
to look at the image. Shapes are drawn with unequal frequencies (circles on about
half the images) so the label imbalance resembles a real dataset's.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = {1: "circle", 2: "square", 3: "triangle", 4: "cross", 5: "star"}
SHAPE_PROBABILITIES = {1: 0.5, 2: 0.35, 3: 0.3, 4: 0.2, 5: 0.15}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (230, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30),
}
MENTION_PROBABILITY = 0.6
DEMO_MARKER = "demo.json"
DEFAULT_DEMO_DIR = Path("demo-data")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    radius = (right - left) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "cross":
        arm = radius / 3
        draw.rectangle((cx - arm, top, cx + arm, bottom), fill=fill)
        draw.rectangle((left, cy - arm, right, cy + arm), fill=fill)
    elif shape == "star":
        points = []
        for index in range(10):
            angle = -math.pi / 2 + index * math.pi / 5
            distance = radius if index % 2 == 0 else radius * 0.45
            points.append((cx + distance * math.cos(angle), cy + distance * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _scene(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, list[int], list[tuple[str, str]]]:
    labels = [label for label, probability in SHAPE_PROBABILITIES.items() if rng.random() < probability]
    if not labels:
        labels = [int(rng.choice(list(SHAPES)))]
    labels = labels[:3]

    shade = int(rng.integers(150, 235))
    noise = rng.normal(0, 12, size=(image_size, image_size, 3))
    background = np.clip(shade + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)

    # Place shapes in different cells of a 2x2 grid so they rarely overlap.
    cells = rng.permutation(4)[: len(labels)]
    cell = image_size / 2
    described = []
    for label, cell_index in zip(labels, cells):
        size = rng.uniform(0.55, 0.9) * cell
        left = (cell_index % 2) * cell + rng.uniform(0, cell - size)
        top = (cell_index // 2) * cell + rng.uniform(0, cell - size)
        colour = str(rng.choice(list(COLOURS)))
        _draw_shape(draw, SHAPES[label], (left, top, left + size, top + size), COLOURS[colour])
        described.append((colour, SHAPES[label]))
    return image, sorted(labels), described


def _caption(rng: np.random.Generator, described: list[tuple[str, str]]) -> str:
    mentioned = [f"a {colour} {shape}" for colour, shape in described if rng.random() < MENTION_PROBABILITY]
    if not mentioned:
        return str(rng.choice(["A simple picture with some shapes.", "Shapes on a plain background.",
                               "A drawing made of flat colours."]))
    listed = mentioned[0] if len(mentioned) == 1 else ", ".join(mentioned[:-1]) + " and " + mentioned[-1]
    template = str(rng.choice(["{} on a grey background.", "A picture of {}.", "There is {} here.", "{}, drawn flat."]))
    text = template.format(listed)
    return text[0].upper() + text[1:]


def make_demo(
    root: str | os.PathLike, train_rows: int = 600, test_rows: int = 100, image_size: int = 96, seed: int = 0
) -> Path:
    """Write a demo dataset: train.csv, test.csv, labels.csv, data/*.jpg and demo.json.

    Raises:
        ValueError: invalid sizes, or `root` already contains files that are not a demo dataset.
    """
    if train_rows < 2 or test_rows < 0 or image_size < 32:
        raise ValueError(
            f"invalid demo size: train_rows={train_rows} (at least 2), test_rows={test_rows} (0 or more), "
            f"image_size={image_size} (at least 32)"
        )
    root = Path(root)
    if root.is_dir() and any(root.iterdir()) and not (root / DEMO_MARKER).is_file():
        raise ValueError(f"{root} is not empty and is not a demo dataset; choose an empty or new folder")
    image_dir = root / "data"
    image_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(train_rows + test_rows):
        image, labels, described = _scene(rng, image_size)
        image.save(image_dir / f"{index}.jpg", quality=90)
        rows.append((f"{index}.jpg", labels, _caption(rng, described)))

    with (root / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "Labels", "Caption"])
        for image_id, labels, caption in rows[:train_rows]:
            writer.writerow([image_id, " ".join(map(str, labels)), caption])
    with (root / "test.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "Caption"])
        for image_id, _, caption in rows[train_rows:]:
            writer.writerow([image_id, caption])
    with (root / "labels.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Label", "Name"])
        writer.writerows(SHAPES.items())
    settings = {"train_rows": train_rows, "test_rows": test_rows, "image_size": image_size, "seed": seed}
    (root / DEMO_MARKER).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote demo dataset to %s (%d train rows, %d test rows)", root, train_rows, test_rows)
    return root


def ensure_demo_dataset(root: str | os.PathLike = DEFAULT_DEMO_DIR) -> Path:
    """Return the default demo dataset folder, generating it first if it is missing."""
    root = Path(root)
    if not (root / DEMO_MARKER).is_file() or not (root / "train.csv").is_file():
        make_demo(root)
    return root.resolve()


def is_demo_dataset(root: str | os.PathLike) -> bool:
    return (Path(root) / DEMO_MARKER).is_file()
