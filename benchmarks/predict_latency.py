"""Prediction latency per image, preprocessing included, as the Predict page and `predict` see it.

Benchmark 4 of docs/benchmarks.md. For each model, a run is first trained for one
epoch on a few real COCO photos. Then each photo is predicted --repeats times from
its JPEG bytes: decode, convert, resize, normalise, forward pass and sigmoid. The
script prints the median and the 95th percentile.

    python -m benchmarks.predict_latency [--models cnn2,efficientnet_lite0] [--repeats 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, median, percentile, repeated_coco
from core.predict import Predictor, decode_upload
from core.trainer import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn2,efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=20, help="predictions per photo")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, as on a 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as scratch:
        root = repeated_coco(Path(scratch) / "coco", 40)
        photos = [path.read_bytes() for path in sorted((root / "data").glob("*.jpg"))[:10]]
        for model in args.models.split(","):
            config = TrainConfig(data=str(root), runs_dir=str(Path(scratch) / "runs"), model=model, epochs=1,
                                 workers=0, run_name=model, freeze_backbone=model != "cnn2")
            predictor = Predictor(train(config))
            predictor.predict(decode_upload(photos[0]), "warm-up")
            latencies = []
            for _ in range(args.repeats):
                for data in photos:
                    started = time.perf_counter()
                    predictor.predict(decode_upload(data, "photo.jpg"), "a person riding a horse")
                    latencies.append((time.perf_counter() - started) * 1000)
            print(f"4. {model} at {predictor.image_size} px: median {median(latencies):.1f} ms, "
                  f"95th percentile {percentile(latencies, 0.95):.1f} ms per image "
                  f"({len(latencies)} predictions, {args.threads} threads)")


if __name__ == "__main__":
    main()
