"""GPU training throughput: the report-style loop against the default pipeline, for cnn2 and resnet18.

The GPU check of docs/benchmarks.md. It needs no dataset: it writes --items JPEG
photos of generated content (640x480, like COCO's) with random labels and captions,
then trains each model for one epoch both ways and prints images per second:

- report-style loop: every JPEG decoded, resized and transformed again in the main
  process, float32, batches copied to the GPU from unpinned memory;
- default pipeline: images decoded once into the image cache, whole uint8 batches
  pinned, copied without blocking and augmented on the GPU, channels-last, mixed
  precision (bfloat16 where the GPU supports it, else float16 with a gradient scaler).

    python -m benchmarks.gpu_epoch [--items 2000] [--models cnn2 resnet18] [--repeats 2]

`--device cpu` with a few items checks the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine, timed
from benchmarks.epoch_time import epoch_seconds
from core import datasets
from core.imagecache import ImageCache
from core.models import get_model_spec, list_models
from core.runs import ProgressWriter
from core.trainer import InputPipeline, autocast_dtype

WORDS = ["a", "man", "woman", "dog", "cat", "riding", "on", "the", "street", "beach", "with", "red", "bus", "table"]
PHOTO_SIZE = (640, 480)


def write_photo(path: Path, seed: int) -> None:
    """Write a JPEG of smooth colour gradients with noise, which compresses and decodes like a photo."""
    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [np.sin(xs / rng.uniform(20, 120) + rng.uniform(0, 6)) + np.cos(ys / rng.uniform(20, 120))
                for _ in range(3)]
    pixels = (np.stack(channels, axis=-1) * 60 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def generated_dataset(root: Path, items: int, labels: int = 18) -> Path:
    """Write a dataset folder of `items` generated photos with random labels and captions."""
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(items):
        chosen = sorted(rng.choice(np.arange(1, labels + 1), size=rng.integers(1, 4), replace=False))
        caption = " ".join(rng.choice(WORDS, size=10))
        rows.append({"ImageID": f"{index}.jpg", "Labels": " ".join(map(str, chosen)), "Caption": caption})
    with ThreadPoolExecutor() as pool:
        list(pool.map(lambda index: write_photo(root / "data" / f"{index}.jpg", index), range(items)))
    with (root / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ImageID", "Labels", "Caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """A help formatter that keeps the description's layout and shows each option's default."""


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; expected a positive integer")
    return value


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Reject unusable settings before any photo is written; return the device."""
    for name in args.models:
        if name not in list_models():
            parser.error(f"unknown model {name!r}; choose from {', '.join(list_models())}")
        if not get_model_spec(name).uses_images:
            parser.error(f"{name} reads captions only, so it has no image pipeline to measure")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"invalid device {args.device!r}; expected cuda, cuda:N or cpu")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"invalid device {args.device!r}; expected cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible to torch; run this on a GPU machine, or pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        parser.error(f"invalid device {args.device!r}: torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def compare(model_name: str, image_size: int, folder: datasets.DatasetFolder, scratch: Path,
            device: torch.device, args: argparse.Namespace, progress: ProgressWriter) -> None:
    paths = folder.image_paths(folder.train)
    captions = list(folder.train["Caption"])
    targets = datasets.targets_from_labels(folder.train["Labels"], folder.labels)
    labels = len(folder.labels)
    mean, std = [0.5] * 3, [0.25] * 3
    items = len(paths)

    report_rows = datasets.CaptionedImages(paths, captions, targets, image_size,
                                           datasets.build_transform(mean, std, ["hflip"]))
    report_inputs = InputPipeline(device, None, False)
    report = min(epoch_seconds(model_name, report_rows, report_inputs, None, False, labels, args.batch_size,
                               progress, pin_memory=False) for _ in range(args.repeats))

    cache = ImageCache(scratch / "cache", folder.image_dir, image_size)
    build, cached = timed(cache.load, paths)
    default_rows = datasets.CaptionedImages(None, captions, targets, image_size, None, cached=cached)
    inputs = InputPipeline(device, datasets.BatchAugment(mean, std, ["hflip"]), True,
                           torch.Generator().manual_seed(0))
    amp_dtype = autocast_dtype(device, amp=True)
    default = min(epoch_seconds(model_name, default_rows, inputs, amp_dtype, True, labels, args.batch_size,
                                progress) for _ in range(args.repeats))

    precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"
    print(f"{model_name} at {image_size} px, batch {args.batch_size}, {items} images:")
    print(f"  report-style loop (decode and transform every epoch, float32): {items / report:.0f} images/s "
          f"({report:.1f} s per epoch)")
    print(f"  default pipeline (image cache, augmentation on the {device.type}, channels-last, {precision}): "
          f"{items / default:.0f} images/s ({default:.1f} s per epoch); cache built once in {build:.1f} s")
    print(f"  speed-up: {report / default:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_epoch", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--items", type=positive, default=2000, help="generated photos to train on")
    parser.add_argument("--models", nargs="+", default=["cnn2", "resnet18"], metavar="MODEL",
                        help=f"models to measure, from: {', '.join(list_models())}")
    parser.add_argument("--image-size", type=positive, default=argparse.SUPPRESS,
                        help="input size for every model (default: each model's own, 128 px for cnn2 and 224 for "
                             "resnet18)")
    parser.add_argument("--batch-size", type=positive, default=64, help="rows per training step")
    parser.add_argument("--repeats", type=positive, default=2,
                        help="epochs of each kind; the fastest counts, so the first epoch's start-up cost drops out")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to check the script itself")
    args = parser.parse_args(argv)
    device = check_arguments(parser, args)
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        seconds, root = timed(generated_dataset, scratch / "generated", args.items)
        print(f"wrote {args.items} generated {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG photos in {seconds:.1f} s", flush=True)
        folder = datasets.load_dataset(root)
        progress = ProgressWriter(scratch / "progress.jsonl")
        for model_name in args.models:
            image_size = getattr(args, "image_size", None) or get_model_spec(model_name).input_size
            try:
                compare(model_name, image_size, folder, scratch, device, args, progress)
            except (ValueError, RuntimeError) as error:  # for example an input too small for the model
                print(f"{model_name} at {image_size} px failed: {str(error).splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
