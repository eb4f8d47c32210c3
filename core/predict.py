"""Using a finished run: load its model once, predict, evaluate on labelled rows and write submissions."""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader

from core import datasets
from core.datasets import CaptionedImages, collate_rows
from core.encoder import encode_batch
from core.metrics import decide, f1_scores, per_label_scores, sigmoid
from core.models import create_model
from core.runs import atomic_write, check_checkpoint_matches, load_checkpoint, read_json

logger = logging.getLogger(__name__)

CHECKPOINTS = ("best", "last")
# config.json keys that rebuilding a run's model and preprocessing reads.
PREDICTOR_CONFIG_KEYS = ("labels", "label_names", "model", "captions", "dropout", "batch_norm", "conv_layers",
                         "fc_layers", "hidden_size", "image_size", "uses_images", "mean", "std", "threshold")
UPLOAD_FORMATS = {"JPEG", "PNG", "WEBP"}
MAX_UPLOAD_PIXELS = 50_000_000  # about 7000 x 7000; larger uploads are rejected before decoding
MAX_UPLOAD_SIDE = 20_000  # longer sides are not photos, and the browser preview fails to encode them


def decode_upload(data: bytes, name: str = "upload") -> Image.Image:
    """Validate and decode an uploaded image (JPEG, PNG or WebP) into RGB.

    The format is read from the file content, not the name. The pixel count is
    checked from the header before the pixels are decoded.

    Raises:
        ValueError: empty, not an image, another format, too many pixels, or truncated.
    """
    if not data:
        raise ValueError(f"{name} is empty; upload a JPEG, PNG or WebP image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in UPLOAD_FORMATS:
                raise ValueError(f"{name} is a {image.format} image; upload a JPEG, PNG or WebP image")
            width, height = image.size
            if max(width, height) > MAX_UPLOAD_SIDE:
                raise ValueError(
                    f"{name} is {width} x {height} pixels, more than {MAX_UPLOAD_SIDE:,} on a side; "
                    "upload a smaller image"
                )
            if width * height > MAX_UPLOAD_PIXELS:
                raise ValueError(
                    f"{name} is {width} x {height} pixels, more than the {MAX_UPLOAD_PIXELS:,} allowed; "
                    "upload a smaller image"
                )
            return datasets.to_rgb(image)
    except ValueError:
        raise
    except UnidentifiedImageError as error:
        raise ValueError(f"{name} is not in a known image format; upload a JPEG, PNG or WebP image") from error
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name} cannot be decoded as an image ({error}); upload a JPEG, PNG or WebP image") from error


def finished_runs(runs_dir: str | os.PathLike) -> list:
    """Return summaries of the runs that have a best checkpoint: finished runs first, each group newest first."""
    from core.runs import list_runs

    runs = [summary for summary in list_runs(runs_dir) if (summary.path / "best.pt").is_file()]
    # Finished runs first, each group newest first (list_runs sorts by time).
    return sorted(runs, key=lambda summary: summary.status != "finished")


@dataclass
class LabelScore:
    """One label's probability for one input, and whether it is predicted."""

    label: int
    name: str
    probability: float
    threshold: float
    predicted: bool


class Predictor:
    """A run's model, loaded once in evaluation mode, with its preprocessing and thresholds."""

    def __init__(self, run_dir: str | os.PathLike, checkpoint: str = "best", device: str = "cpu") -> None:
        if checkpoint not in CHECKPOINTS:
            raise ValueError(f"invalid checkpoint {checkpoint!r}; choose one of: {', '.join(CHECKPOINTS)}")
        self.run_dir = Path(run_dir)
        self.config: dict[str, Any] = read_json(self.run_dir / "config.json")
        missing = [key for key in PREDICTOR_CONFIG_KEYS if key not in self.config]
        if missing and not (self.run_dir / f"{checkpoint}.pt").is_file():
            raise ValueError(
                f"run {self.run_dir.name} stopped before training started, so it has no model; "
                "see its progress.jsonl or train.log for the reason"
            )
        if missing:
            raise ValueError(
                f"{self.run_dir / 'config.json'} lacks {', '.join(missing)}; the file was edited or damaged, "
                "so the model cannot be rebuilt. Restore the file or retrain."
            )
        self.labels: list[int] = [int(label) for label in self.config["labels"]]
        self.label_names = {int(label): name for label, name in self.config["label_names"].items()}
        self.device = torch.device(device)

        state = load_checkpoint(self.run_dir / f"{checkpoint}.pt")
        check_checkpoint_matches(state, self.config, self.run_dir / f"{checkpoint}.pt")
        self.model = create_model(
            self.config["model"], len(self.labels), captions=self.config["captions"], pretrained=False,
            dropout=self.config["dropout"], batch_norm=self.config["batch_norm"],
            conv_layers=self.config["conv_layers"], fc_layers=self.config["fc_layers"],
            hidden_size=self.config["hidden_size"], image_size=self.config["image_size"],
        )
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ValueError(
                f"{self.run_dir / (checkpoint + '.pt')}: weights do not fit the model described in config.json ({error})"
            ) from error
        self.model.to(self.device).eval()
        self.epoch = int(state["epoch"])

        self.uses_images = bool(self.config["uses_images"])
        self.image_size = self.config["image_size"]
        self.transform = datasets.build_transform(self.config["mean"], self.config["std"]) if self.uses_images else None
        self.thresholds = self._read_thresholds()

    @property
    def has_tuned_thresholds(self) -> bool:
        return (self.run_dir / "thresholds.json").is_file()

    def _read_thresholds(self) -> np.ndarray:
        thresholds = np.full(len(self.labels), float(self.config["threshold"]))
        path = self.run_dir / "thresholds.json"
        if path.is_file():
            tuned = read_json(path)["thresholds"]
            for index, label in enumerate(self.labels):
                thresholds[index] = float(tuned.get(str(label), thresholds[index]))
        return thresholds

    def _image_tensor(self, image: Image.Image | str | os.PathLike) -> torch.Tensor:
        if isinstance(image, Image.Image):
            tensor = datasets.resize_to_tensor(datasets.to_rgb(image), self.image_size)
        else:
            tensor = datasets.load_resized(image, self.image_size)
        return self.transform(tensor)

    @torch.no_grad()
    def predict_probs(
        self, images: Sequence[Image.Image | str | os.PathLike] | None, captions: Sequence[str]
    ) -> np.ndarray:
        """Return (rows, labels) probabilities for images (paths or PIL images) with their captions."""
        batch = None
        if self.uses_images:
            if images is None or len(images) != len(captions):
                raise ValueError("this run's model needs one image per caption")
            batch = torch.stack([self._image_tensor(image) for image in images]).to(self.device)
        logits = self.model(batch, encode_batch(list(captions)).to(self.device) if self.config["captions"] else None)
        return sigmoid(logits.float().cpu().numpy())

    def predict(self, image: Image.Image | str | os.PathLike | None, caption: str = "") -> list[LabelScore]:
        """Score every label for one image and caption, most probable first."""
        probs = self.predict_probs([image] if image is not None else None, [caption])[0]
        predicted = decide(probs[None, :], self.thresholds)[0]
        scores = [
            LabelScore(label, self.label_names.get(label, str(label)), float(probs[index]),
                       float(self.thresholds[index]), bool(predicted[index]))
            for index, label in enumerate(self.labels)
        ]
        return sorted(scores, key=lambda score: score.probability, reverse=True)

    def predict_rows(self, rows: pd.DataFrame, image_dir: Path | None, batch_size: int = 64, workers: int = 0) -> np.ndarray:
        """Return probabilities for the rows of a table (ImageID, Caption), reading images from `image_dir`."""
        paths = None
        if self.uses_images:
            if image_dir is None:
                raise ValueError(f"run {self.run_dir.name} needs images, but the dataset has no image folder")
            paths = [datasets.resolve_image_path(image_dir, image_id) for image_id in rows["ImageID"]]
            missing = [f"line {line}: {path}" for line, path in zip(rows["line"], paths) if not path.is_file()]
            if missing:
                shown = "\n  ".join(missing[:5])
                raise FileNotFoundError(f"{len(missing)} image(s) not found:\n  {shown}\nAdd the files or remove their rows.")
            unreadable = [f"line {line} ({image_id}): {problem}" for line, image_id, problem
                          in zip(rows["line"], rows["ImageID"], datasets.ImageChecks().check(paths)) if problem]
            if unreadable:
                raise datasets.DatasetError(datasets.format_problems(
                    image_dir, unreadable, "Replace these images or remove their rows.", what="unreadable image(s)"))
        captions = list(rows["Caption"]) if self.config["captions"] else [""] * len(rows)
        dataset = CaptionedImages(paths, captions, np.zeros((len(rows), len(self.labels)), np.float32),
                                  self.image_size or 0, self.transform)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_rows)
        outputs = []
        with torch.no_grad():
            for images, encoded, _ in loader:
                images = images.to(self.device) if images is not None else None
                outputs.append(self.model(images, encoded.to(self.device)).float().cpu().numpy())
        return sigmoid(np.concatenate(outputs)) if outputs else np.zeros((0, len(self.labels)))


def default_workers_for(predictor: Predictor) -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1)) if predictor.uses_images else 0


def evaluate_run(
    run_dir: Path, csv_path: str | None = None, image_dir: str | None = None, checkpoint: str = "best"
) -> dict[str, Any]:
    """Score a run on its validation part, or on any labelled CSV, at its fixed and tuned thresholds."""
    predictor = Predictor(run_dir, checkpoint)
    if csv_path is None:
        folder = datasets.load_dataset(predictor.config["data"], skipped=[])
        val_ids = set(read_json(run_dir / "split.json")["val"])
        rows = folder.train[folder.train["ImageID"].isin(val_ids)]
        if len(rows) != len(val_ids):
            raise ValueError(
                f"{len(val_ids) - len(rows)} validation row(s) of run {run_dir.name} are no longer in "
                f"{folder.root / 'train.csv'}; evaluate on a CSV with --csv instead"
            )
        images = folder.image_dir
        source = f"validation part of {folder.root}"
    else:
        rows = datasets.read_table(csv_path, require_labels=True)
        if rows.empty:
            raise datasets.DatasetError(f"{csv_path}: header only, no rows to evaluate on; add labelled rows")
        images = Path(image_dir) if image_dir else Path(csv_path).parent / datasets.IMAGE_DIR_NAME
        source = str(csv_path)

    known = set(predictor.labels)
    unknown = sorted({label for row in rows["Labels"] for label in row} - known)
    unscored: list[int] = []
    if unknown:
        lines = [line for line, labels in zip(rows["line"], rows["Labels"]) if set(labels) - known]
        logger.warning(
            "label(s) %s of %s (on %d row(s), first on line %d) are not in run %s's label set, so the model cannot "
            "predict them; they are left out of the scores", ", ".join(map(str, unknown)), source, len(lines),
            lines[0], run_dir.name,
        )
        # A row with no known label would count every prediction as a false positive.
        unscored = [line for line, labels in zip(rows["line"], rows["Labels"]) if not set(labels) & known]
        if len(unscored) == len(rows):
            raise ValueError(f"no row of {source} has a label of run {run_dir.name}'s label set "
                             f"({', '.join(map(str, predictor.labels))}); evaluate a run trained on these labels")
        if unscored:
            logger.warning("%d row(s) of %s have only such labels and are left out, first on line %d",
                           len(unscored), source, unscored[0])
            rows = rows[~rows["line"].isin(unscored)]
    targets = datasets.targets_from_labels(rows["Labels"], predictor.labels)
    probs = predictor.predict_rows(rows, images if predictor.uses_images else None,
                                   workers=default_workers_for(predictor))
    fixed = decide(probs, float(predictor.config["threshold"]))
    tuned = decide(probs, predictor.thresholds)
    return {
        "source": source,
        "rows": len(rows),
        "checkpoint": checkpoint,
        "epoch": predictor.epoch,
        "threshold": float(predictor.config["threshold"]),
        **f1_scores(targets, fixed),
        "tuned": f1_scores(targets, tuned) if predictor.has_tuned_thresholds else None,
        "per_label": per_label_scores(targets, fixed, predictor.labels, predictor.label_names),
        "unknown_labels": unknown,
        "rows_left_out": len(unscored),
    }


def write_submission(run_dir: Path, data_dir: str, out_path: str, checkpoint: str = "best") -> int:
    """Write `ImageID,Labels` for every row of DATA/test.csv; return the number of rows written.

    Labels are space-separated ids in ascending order; every row has at least one.
    """
    predictor = Predictor(run_dir, checkpoint)
    test_csv = Path(data_dir) / "test.csv"
    if not test_csv.is_file():
        raise FileNotFoundError(f"{test_csv} not found; a submission needs the dataset's test.csv (ImageID,Caption)")
    rows = datasets.read_table(test_csv, require_labels=False)
    if rows.empty:
        logger.warning("%s has no rows, so the submission has only its header", test_csv)
    image_dir = Path(data_dir) / datasets.IMAGE_DIR_NAME
    probs = predictor.predict_rows(rows, image_dir if predictor.uses_images else None,
                                   workers=default_workers_for(predictor))
    predictions = decide(probs, predictor.thresholds)

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["ImageID", "Labels"])
    for image_id, row in zip(rows["ImageID"], predictions):
        writer.writerow([image_id, " ".join(str(predictor.labels[index]) for index in np.flatnonzero(row))])
    atomic_write(Path(out_path), lambda handle: handle.write(text.getvalue().encode("utf-8")))
    logger.info("wrote %d rows to %s", len(rows), out_path)
    return len(rows)
