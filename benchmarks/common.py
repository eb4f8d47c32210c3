"""Shared set-up for the benchmark scripts: the machine description, test data and a timer.

Run each script from the project root, for example `python -m benchmarks.epoch_time`.
Figures are ratios measured in one process, so the machine's load affects both sides.
"""

from __future__ import annotations

import csv
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COCO_MINI = PROJECT_ROOT.parent / "shared" / "data" / "coco-mini-comp5329"
CAPTIONS_CSV = PROJECT_ROOT.parent / "shared" / "data" / "comp5329-captions" / "train.csv"


def machine() -> str:
    """Describe the CPU, core count, torch build and accelerator in one line."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from core.trainer import cpu_has_native_bfloat16

    accelerator = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    bfloat16 = "native bfloat16" if cpu_has_native_bfloat16() else "no native bfloat16"
    return (f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {bfloat16}, "
            f"{accelerator}, torch {torch.__version__}, Python {platform.python_version()}")


def repeated_coco(root: Path, items: int) -> Path:
    """Write a dataset folder of `items` rows whose images are the real COCO photos, repeated.

    Each row gets its own file name (a hard link, or a copy across file systems), so
    that caches and loaders treat every row as a separate image.
    """
    if not COCO_MINI.is_dir():
        raise SystemExit(f"{COCO_MINI} not found; these benchmarks need the real COCO photos in ../shared/data")
    with (COCO_MINI / "train.csv").open(encoding="utf-8", newline="") as handle:
        source = list(csv.DictReader(handle))
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(items):
        row = source[index % len(source)]
        name = f"{index}.jpg"
        target = root / "data" / name
        if not target.exists():
            try:
                os.link(COCO_MINI / "data" / row["ImageID"], target)
            except OSError:
                shutil.copyfile(COCO_MINI / "data" / row["ImageID"], target)
        rows.append({"ImageID": name, "Labels": row["Labels"], "Caption": row["Caption"]})
    with (root / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ImageID", "Labels", "Caption"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def timed(function, *args, **kwargs) -> tuple[float, object]:
    """Return (seconds, result) of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def percentile(values: list[float], fraction: float) -> float:
    """Return the value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)
