"""Training epoch time: the report-style loop against the default pipeline, and the data's share of it.

Benchmarks 1 and 2 of docs/benchmarks.md, on real COCO photos repeated to --items rows:

1. The report-style loop decodes every JPEG and runs every transform again in every
   epoch, in the main process, in float32. The default pipeline reads images decoded
   once from the image cache, augments whole batches, and uses channels-last memory
   and bfloat16 autocast where the CPU supports it natively.
2. The default pipeline's training throughput against the same model and precision
   fed random tensors already in memory: the share of time lost to data.

    python -m benchmarks.epoch_time [--items 2000] [--image-size 128] [--model cnn2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.common import machine, repeated_coco, timed
from core import datasets
from core.encoder import collate_captions, encode_trigrams
from core.imagecache import ImageCache
from core.models import create_model
from core.runs import ProgressWriter
from core.trainer import InputPipeline, autocast_dtype, build_loss, build_optimizer, train_one_epoch


def epoch_seconds(model_name: str, rows: datasets.CaptionedImages, inputs: InputPipeline, amp_dtype,
                  channels_last: bool, labels: int, batch_size: int, progress: ProgressWriter,
                  pin_memory: bool = True) -> float:
    """Train a fresh model for one epoch over `rows` on `inputs.device` and return the epoch's seconds.

    On CUDA the batches are pinned unless `pin_memory` is False, and float16 autocast
    gets a gradient scaler, as in training.
    """
    device = inputs.device
    torch.manual_seed(0)
    model = create_model(model_name, labels, captions=True, pretrained=False, image_size=rows.image_size).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer("adam", [p for p in model.parameters() if p.requires_grad], 1e-3, 0.0, device)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, num_workers=0, pin_memory=pin_memory and device.type == "cuda",
                        collate_fn=datasets.collate_rows, generator=torch.Generator().manual_seed(0))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    result = train_one_epoch(model, loader, build_loss("bce", None), optimizer, device, amp_dtype, scaler, 1,
                             progress, inputs)
    return result["train_seconds"]


def random_tensor_seconds(model_name: str, rows: datasets.CaptionedImages, amp_dtype, channels_last: bool,
                          labels: int, batch_size: int) -> float:
    """Train for one epoch's worth of steps on random batches prepared in memory beforehand."""
    torch.manual_seed(0)
    model = create_model(model_name, labels, captions=True, pretrained=False, image_size=rows.image_size)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = build_optimizer("adam", list(model.parameters()), 1e-3, 0.0, torch.device("cpu"))
    loss_fn = build_loss("bce", None)
    size = rows.image_size
    batches = []
    for start in range(0, len(rows), batch_size):
        count = min(batch_size, len(rows) - start)
        images = torch.randn(count, 3, size, size).contiguous(memory_format=memory_format)
        captions = collate_captions([rows.encoded[start + offset] for offset in range(count)])
        batches.append((images, captions, rows.targets[start : start + count]))

    def run() -> None:
        model.train()
        for images, captions, targets in batches:
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(images, captions).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return timed(run)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="rows, made by repeating the COCO photos")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default="cnn2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2,
                        help="epochs of each kind, alternated; the fastest counts, which filters out the noise of a "
                             "shared machine")
    args = parser.parse_args()
    print(f"machine: {machine()}")

    with tempfile.TemporaryDirectory() as scratch:
        root = repeated_coco(Path(scratch) / "coco", args.items)
        folder = datasets.load_dataset(root)
        paths = folder.image_paths(folder.train)
        captions = list(folder.train["Caption"])
        targets = datasets.targets_from_labels(folder.train["Labels"], folder.labels)
        labels = len(folder.labels)
        mean, std = [0.5] * 3, [0.25] * 3
        progress = ProgressWriter(Path(scratch) / "progress.jsonl")
        amp_dtype = autocast_dtype(torch.device("cpu"), amp=True)
        cpu = torch.device("cpu")

        report_rows = datasets.CaptionedImages(paths, captions, targets, args.image_size,
                                               datasets.build_transform(mean, std, ["hflip"]))
        report = min(epoch_seconds(args.model, report_rows, InputPipeline(cpu, None, False), None, False, labels,
                                   args.batch_size, progress) for _ in range(args.repeats))
        print(f"1. report-style loop (decode and transform every epoch, float32): {report:.1f} s per epoch, "
              f"{args.items / report:.0f} images/s")

        cache = ImageCache(Path(scratch) / "cache", folder.image_dir, args.image_size)
        build, cached = timed(cache.load, paths)
        print(f"   image cache built once in {build:.1f} s ({args.items} images, "
              f"{args.items * cache.slot_bytes / 1e6:.0f} MB)")
        default_rows = datasets.CaptionedImages(None, captions, targets, args.image_size, None, cached=cached)
        inputs = InputPipeline(cpu, datasets.BatchAugment(mean, std, ["hflip"]), True, torch.Generator().manual_seed(0))
        defaults, randoms = [], []
        for _ in range(args.repeats):
            defaults.append(epoch_seconds(args.model, default_rows, inputs, amp_dtype, True, labels, args.batch_size,
                                          progress))
            randoms.append(random_tensor_seconds(args.model, default_rows, amp_dtype, True, labels, args.batch_size))
        default, random = min(defaults), min(randoms)
        precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "float32"
        print(f"   default pipeline (image cache, batched augmentation, channels-last, {precision}): "
              f"{default:.1f} s per epoch, {args.items / default:.0f} images/s")
        print(f"   speed-up: {report / default:.2f}x")

        print(f"2. same model and precision on random tensors in memory: {args.items / random:.0f} images/s; "
              f"the default pipeline reaches {random / default:.0%} of it")


if __name__ == "__main__":
    main()
