"""Frozen EfficientNet-Lite0 with the caption head: feature cache against running the backbone every epoch.

Benchmark 3 of docs/benchmarks.md. Both runs go through the product's own `train()`
and train the same rows (real COCO photos repeated to --items) for --epochs epochs
with a frozen pretrained backbone. Both read images from the image cache, and both
find the image checks done, because both are prepared before the timing starts.

    python -m benchmarks.feature_cache [--items 2000] [--epochs 10]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import machine, repeated_coco, timed
from core import datasets
from core.imagecache import ImageCache
from core.trainer import CACHE_DIR, IMAGE_CHECKS_FILE, TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="rows, made by repeating the COCO photos")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as scratch:
        root = repeated_coco(Path(scratch) / "coco", args.items)
        runs = Path(scratch) / "runs"
        folder = datasets.load_dataset(root)
        paths = folder.image_paths(folder.train)
        # Both runs then start with the same warm caches: the image checks and the decoded images.
        checks, _ = timed(datasets.ImageChecks(runs / IMAGE_CHECKS_FILE).check, paths)
        build, _ = timed(ImageCache(runs / CACHE_DIR / "images", folder.image_dir, args.image_size).load, paths)
        print(f"image checks done once in {checks:.1f} s, image cache built once in {build:.1f} s")

        seconds = {}
        for feature_cache in (True, False):
            config = TrainConfig(data=str(root), runs_dir=str(runs), model="efficientnet_lite0", freeze_backbone=True,
                                 image_size=args.image_size, epochs=args.epochs, feature_cache=feature_cache,
                                 augment=[], workers=0, run_name=f"features-{feature_cache}")
            seconds[feature_cache], _ = timed(train, config)
            label = "feature cache" if feature_cache else "backbone every epoch"
            print(f"{label}: {args.epochs} epochs in {seconds[feature_cache]:.1f} s")
        print(f"3. speed-up of the feature cache over {args.epochs} epochs: {seconds[False] / seconds[True]:.1f}x")


if __name__ == "__main__":
    main()
