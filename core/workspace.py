"""Dashboard workspace: the remembered dataset choice and a quick summary of a dataset folder."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from core import datasets
from core.demo import DEFAULT_DEMO_DIR, ensure_demo_dataset, is_demo_dataset
from core.runs import DEFAULT_RUNS_DIR, read_json, write_json

logger = logging.getLogger(__name__)

STATE_FILE = ".dashboard.json"  # inside the runs folder, next to the run folders


def _state_path(runs_dir: str | os.PathLike) -> Path:
    return Path(runs_dir) / STATE_FILE


def remembered_dataset(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> str | None:
    """Return the dataset folder chosen in an earlier visit, or None."""
    path = _state_path(runs_dir)
    if not path.is_file():
        return None
    try:
        state = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("ignored unreadable dashboard state %s: %s", path, error)
        return None
    value = state.get("dataset") if isinstance(state, dict) else None
    return value if isinstance(value, str) and value else None


def remember_dataset(dataset: str | None, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> None:
    """Store the chosen dataset folder (None: the demo dataset) for later visits."""
    write_json(_state_path(runs_dir), {"dataset": dataset})


def default_dataset(demo_dir: str | os.PathLike = DEFAULT_DEMO_DIR) -> Path:
    """Return the generated demo dataset, making it first if it is missing."""
    return ensure_demo_dataset(demo_dir)


def dataset_version(root: str | os.PathLike) -> tuple[str, int, int]:
    """Return (resolved path, train.csv modification time in ns, size) to key caches on."""
    train_csv = Path(root) / "train.csv"
    stat = train_csv.stat()
    return str(train_csv.resolve()), stat.st_mtime_ns, stat.st_size


@dataclass
class DatasetSummary:
    """The contents of a dataset folder, as the home page shows them."""

    root: Path
    rows: int
    labels: list[int]
    label_names: dict[int, str]
    has_image_folder: bool
    images_found: int  # training rows whose image file exists
    test_rows: int | None  # None when there is no test.csv
    is_demo: bool
    invalid_rows: list[str]  # rows of train.csv left out because they are invalid, described


def summarize_dataset(root: str | os.PathLike) -> DatasetSummary:
    """Load a dataset folder and count what it contains; invalid rows are counted, not fatal.

    Raises:
        FileNotFoundError, ValueError: the folder or its train.csv is missing, or train.csv
            cannot be read at all (no header, a missing column, an unclosed quote).
    """
    skipped: list[datasets.SkippedRow] = []
    folder = datasets.load_dataset(root, skipped)
    images_found = 0
    if folder.image_dir is not None:
        names = set(os.listdir(folder.image_dir))
        images_found = sum(1 for image_id in folder.train["ImageID"] if image_id in names)
    return DatasetSummary(
        root=folder.root,
        rows=len(folder.train),
        labels=folder.labels,
        label_names=folder.label_names,
        has_image_folder=folder.has_images,
        images_found=images_found,
        test_rows=len(folder.test) if folder.test is not None else None,
        is_demo=is_demo_dataset(folder.root),
        invalid_rows=[row.describe() for row in skipped],
    )


def runs_summary_rows(summaries) -> list[dict]:
    """Turn `core.runs.RunSummary` objects into table rows for display."""
    rows = []
    for summary in summaries:
        best = summary.best_metrics
        rows.append({
            "run": summary.name,
            "model": summary.model,
            "captions": summary.captions,
            "status": summary.status,
            "epochs": f"{summary.epochs_done}/{summary.epochs_planned}",
            "samples F1": best.get("samples_f1_score"),
            "micro F1": best.get("micro_f1_score"),
            "macro F1": best.get("macro_f1_score"),
        })
    return rows


def describe_labels(summary: DatasetSummary, limit: int = 30) -> str:
    """Return "1 person, 2 bicycle, ..." for the first `limit` labels."""
    shown = [f"{label} {summary.label_names[label]}" for label in summary.labels[:limit]]
    more = len(summary.labels) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
