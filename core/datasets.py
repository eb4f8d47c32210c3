"""Dataset folders: CSV parsing, the label set, splits, images, transforms and the torch Dataset.

A dataset folder in the COMP5329 layout contains `train.csv` (ImageID,Labels,Caption),
optionally `test.csv` (ImageID,Caption) and `data/` with the images. A folder with
a `train.csv` and no `data/` is a caption-only dataset. An optional `labels.csv`
(Label,Name) names the label ids; without it, COCO category ids get COCO names.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from core.encoder import CaptionBatch, collate_captions, encode_trigrams
from core.runs import write_json

logger = logging.getLogger(__name__)

# COCO 2017 category ids and names; ids 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused.
COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}

COLUMNS = ("ImageID", "Labels", "Caption")
IMAGE_DIR_NAME = "data"
LABEL_NAMES_FILE = "labels.csv"
MAX_PROBLEMS_SHOWN = 20
# Captions of any length are valid. The csv module's default limit of 131,072 characters would
# also stop reading before an unclosed quote could be found and reported.
csv.field_size_limit(2**31 - 1)
LABEL_LIST = re.compile(r"\s*\d+(\s+\d+)*\s*")  # a Labels field: space-separated integer ids
AUGMENTATIONS = ("hflip", "vflip", "jitter", "sharpness")


class DatasetError(ValueError):
    """Invalid dataset content; the message lists every problem found (the first 20 in full)."""


@dataclass(frozen=True)
class SkippedRow:
    """A row that cannot be used, with the reason; training may skip such rows when the user allows it."""

    file: str  # the CSV file name, such as train.csv
    line: int  # the row's first line in that file
    image_id: str
    reason: str

    def describe(self) -> str:
        shown = self.image_id if self.image_id.isprintable() else repr(self.image_id)
        where = f"line {self.line}" + (f" ({shown})" if self.image_id else "")
        return f"{where}: {self.reason}"


# ----------------------------------------------------------------------------- CSV files


def format_problems(path: Path, problems: list[str], fix: str, what: str = "invalid row(s)") -> str:
    """Return a message that lists the first problems of a file, counts the rest and ends with the fix."""
    shown = "\n".join(f"  {problem}" for problem in problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return f"{path}: {len(problems)} {what}:\n{shown}{tail}\n{fix}"


def _swallowed_row(caption: str, image_id: str, positions: dict[str, int], width: int) -> str | None:
    """Return the ImageID of a row that an unclosed quote pulled into `caption`, or None.

    A line inside a quoted caption counts as a swallowed row when it splits into a
    full row whose ImageID has the same shape as this row's, such as "7.jpg" after
    "12.jpg". In a file with labels, a full row with a valid Labels field counts too.
    """
    lines = re.split(r"\r\n|\r|\n", caption)[1:]
    shape = re.compile(re.sub(r"\\d\+|\d+", r"\\d+", re.escape(image_id)))
    for line in lines:
        fields = next(csv.reader([line]), [])
        if len(fields) < width:
            continue
        candidate = fields[positions["ImageID"]].strip()
        if not candidate or any(char.isspace() for char in candidate):
            continue
        if shape.fullmatch(candidate):
            return candidate
        if "Labels" in positions and _parse_labels(fields[positions["Labels"]])[1] is None:
            return candidate
    return None


def _strip_trailing_empty(header: list[str]) -> list[str]:
    names = [name.strip() for name in header]
    while names and names[-1] == "":
        names.pop()  # spreadsheet exports add a trailing empty column
    return names


def _read_header(path: Path, header: list[str], require_labels: bool) -> dict[str, int]:
    """Map the standard column names to positions, matching case and surrounding spaces loosely."""
    names = _strip_trailing_empty(header)
    positions: dict[str, int] = {}
    for index, name in enumerate(names):
        for column in COLUMNS:
            if name.lower() == column.lower() and column not in positions:
                positions[column] = index
    required = ["ImageID", "Labels"] if require_labels else ["ImageID"]
    missing = [column for column in required if column not in positions]
    if missing:
        expected = ",".join(COLUMNS if require_labels else ("ImageID", "Caption"))
        separator = next((name for name in (";", "\t", "|") if any(name in field for field in names)), None)
        hint = f" The file seems to use {separator!r} between fields; save it with commas." if separator else ""
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; found {names or 'no header'}. "
            f"The first line must be the header {expected}.{hint}"
        )
    if "Caption" not in positions:
        unknown = [name for index, name in enumerate(names) if index not in positions.values()]
        logger.warning("%s: no Caption column (other columns: %s); every caption is empty", path, unknown or "none")
    return positions


def _parse_labels(text: str) -> tuple[list[int], str | None]:
    labels: list[int] = []
    for token in text.split():
        try:
            label = int(token)
        except ValueError:
            return [], f"label {token!r} is not an integer"
        if label < 0:
            return [], f"label {token!r} is negative"
        labels.append(label)
    if not labels:
        return [], "no labels"
    return sorted(set(labels)), None


def read_table(
    path: str | os.PathLike, require_labels: bool = True, skipped: list[SkippedRow] | None = None
) -> pd.DataFrame:
    """Read a train.csv or test.csv file without losing or mis-splitting rows.

    Handles a byte order mark, CRLF line ends, trailing empty columns, quoted
    captions with commas, doubled and stray quotes, and captions with unquoted
    commas when Caption is the last column (the extra fields are joined back).

    Args:
        path: the CSV file.
        require_labels: True for training files, which need a Labels column with
            at least one integer label per row.
        skipped: None to raise on the first invalid rows; a list to append each
            invalid row to instead, leaving it out of the result. A caption with an
            unclosed quote raises either way, because the rows after it cannot be distinguished.

    Returns:
        A DataFrame with columns ImageID (str), Labels (list of int, empty when the
        file has no Labels column), Caption (str) and line (the row's first line
        number in the file, for messages).

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetError: the file is empty, lacks a column or has invalid rows; the
            message lists the rows and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")

    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DatasetError(
            f"{path}: line {line} is not valid UTF-8 text (byte {error.start}); re-save the file with UTF-8 encoding"
        ) from error
    try:
        records = _read_records(path, io.StringIO(text, newline=""), require_labels, skipped)
    except csv.Error as error:
        raise DatasetError(f"{path}: cannot be parsed as CSV ({error}); check its quotes and separators") from error

    frame = pd.DataFrame(records, columns=["ImageID", "Labels", "Caption", "line"])
    logger.info("read %d rows from %s", len(frame), path)
    return frame


def _read_records(
    path: Path, handle: io.StringIO, require_labels: bool, skipped: list[SkippedRow] | None
) -> list[tuple]:
    reader = csv.reader(handle)
    header = next(reader, None)
    expected = ",".join(COLUMNS if require_labels else ("ImageID", "Caption"))
    if header is None:
        raise DatasetError(f"{path}: the file is empty; expected a header line {expected} and rows")
    positions = _read_header(path, header, require_labels)
    width = max(len(_strip_trailing_empty(header)), max(positions.values()) + 1)
    caption_last = positions.get("Caption") == width - 1

    records: list[tuple] = []
    problems: list[SkippedRow] = []
    unclosed: list[SkippedRow] = []
    seen: dict[str, int] = {}
    joined_rows: list[int] = []  # lines whose unquoted caption commas were joined back
    line = reader.line_num + 1
    for fields in reader:
        start, line = line, reader.line_num + 1
        if not any(field.strip() for field in fields):
            continue  # blank line
        while len(fields) > width and fields[-1].strip() == "":
            fields = fields[:-1]
        image_id = fields[positions["ImageID"]].strip() if len(fields) > positions["ImageID"] else ""

        def reject(reason: str) -> None:
            problems.append(SkippedRow(path.name, start, image_id, reason))

        if len(fields) > width:
            if not caption_last:
                reject(f"{len(fields)} fields, expected {width}; quote fields that contain commas")
                continue
            if "Labels" in positions and positions["Labels"] == width - 2 and LABEL_LIST.fullmatch(fields[width - 1]):
                # "1.jpg,3,4,A dog": the label ids were separated by commas, not a caption with commas.
                reject(f"labels look comma-separated ({','.join(fields[width - 2 : width])}); separate label ids "
                       "with spaces, or quote a caption that starts with a number")
                continue
            fields = fields[: width - 1] + [",".join(fields[width - 1 :])]
            joined_rows.append(start)

        if not image_id:
            reject("empty ImageID")
            continue
        if any(ord(char) < 32 or ord(char) == 127 for char in image_id):
            reject(f"ImageID {image_id!r} contains a control character; remove it")
            continue
        if image_id in seen:
            reject(f"duplicate ImageID (first on line {seen[image_id]})")
            continue
        seen[image_id] = start

        labels: list[int] = []
        if "Labels" in positions:
            raw = fields[positions["Labels"]] if len(fields) > positions["Labels"] else ""
            labels, problem = _parse_labels(raw)
            if problem and (require_labels or raw.strip()):
                reject(f"{problem}; expected space-separated integer ids")
                continue
        caption_at = positions.get("Caption")
        caption = fields[caption_at].strip() if caption_at is not None and len(fields) > caption_at else ""
        swallowed = _swallowed_row(caption, image_id, positions, width) if "\n" in caption or "\r" in caption else None
        if swallowed:
            reject(
                f"the caption opens a quote that is not closed, so it runs into the next row "
                f"({swallowed!r}); close the quote or double it (\"\")"
            )
            unclosed.append(problems[-1])
            continue
        records.append((image_id, labels, caption, start))

    if problems and (skipped is None or unclosed):
        listed = unclosed if skipped is not None else problems
        fix = "Fix these rows and load the file again."
        raise DatasetError(format_problems(path, [row.describe() for row in listed], fix))
    if problems:
        skipped.extend(problems)
        logger.warning("%s: found %d invalid row(s)", path, len(problems))
    if joined_rows:
        shown = ", ".join(map(str, joined_rows[:5])) + (" and more" if len(joined_rows) > 5 else "")
        logger.warning("%s: %d row(s) had unquoted commas in the caption (lines %s); the fields were joined back",
                       path, len(joined_rows), shown)
    return records


# ----------------------------------------------------------------------------- label set


def read_label_names(root: Path, labels: Sequence[int]) -> dict[int, str]:
    """Name each label id: from `labels.csv` when the folder has one, else COCO names, else the id.

    Ids that labels.csv leaves out are named "label N"; COCO names are used only
    without a labels.csv, because they would mislabel another dataset's ids.

    Raises:
        DatasetError: labels.csv is not UTF-8 or has an invalid, duplicate or nameless row.
    """
    names: dict[int, str] = {}
    names_file = root / LABEL_NAMES_FILE
    if not names_file.is_file():
        coco = all(label in COCO_NAMES for label in labels)
        return {label: COCO_NAMES[label] if coco else f"label {label}" for label in labels}
    try:
        text = names_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{names_file}: not valid UTF-8 text (byte {error.start}); re-save it with UTF-8 encoding") \
            from error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fix = "expected columns Label,Name with an integer label and a name on every row"
    for row in reader:
        line = reader.line_num
        label_text, name = (row.get("Label") or "").strip(), (row.get("Name") or "").strip()
        if not label_text.lstrip("-").isdigit() or not name:
            raise DatasetError(f"{names_file}: line {line} ({','.join(value or '' for value in row.values())!r}) "
                               f"is invalid; {fix}")
        if int(label_text) in names:
            raise DatasetError(f"{names_file}: line {line} names label {label_text} again; keep one row per label")
        names[int(label_text)] = name
    return {label: names.get(label, f"label {label}") for label in labels}


def targets_from_labels(label_lists: Iterable[Sequence[int]], labels: Sequence[int]) -> np.ndarray:
    """Build the (rows, len(labels)) float32 0/1 target matrix; ids not in `labels` are ignored."""
    column = {label: index for index, label in enumerate(labels)}
    label_lists = list(label_lists)
    targets = np.zeros((len(label_lists), len(labels)), dtype=np.float32)
    for row, row_labels in enumerate(label_lists):
        for label in row_labels:
            if label in column:
                targets[row, column[label]] = 1.0
    return targets


# ----------------------------------------------------------------------------- dataset folders


@dataclass
class DatasetFolder:
    """A dataset folder on disk: its tables, label set and image folder."""

    root: Path
    train: pd.DataFrame
    test: pd.DataFrame | None
    labels: list[int]  # sorted label ids found in train.csv
    label_names: dict[int, str]
    image_dir: Path | None  # None for a caption-only dataset

    @property
    def has_images(self) -> bool:
        return self.image_dir is not None

    def image_paths(self, frame: pd.DataFrame) -> list[Path]:
        """Return the image path of every row of `frame`, rejecting ids that leave the image folder."""
        if self.image_dir is None:
            raise DatasetError(f"{self.root} has no {IMAGE_DIR_NAME}/ folder, so it has no images")
        return [resolve_image_path(self.image_dir, image_id) for image_id in frame["ImageID"]]

    def image_problems(self, frame: pd.DataFrame, check=None) -> list[SkippedRow]:
        """Return the rows of `frame` whose image is missing, outside the image folder or unreadable.

        Args:
            frame: rows of train.csv.
            check: a function from image paths to a list of problems (None for a
                readable image), such as `ImageChecks.check`; None checks only that
                the files exist.
        """
        if self.image_dir is None:
            raise DatasetError(f"{self.root} has no {IMAGE_DIR_NAME}/ folder, so it has no images")
        problems: list[SkippedRow] = []
        present: list[tuple[int, str, Path]] = []
        for image_id, line in zip(frame["ImageID"], frame["line"]):
            try:
                path = resolve_image_path(self.image_dir, image_id)
            except DatasetError as error:
                problems.append(SkippedRow("train.csv", int(line), image_id, str(error)))
                continue
            if not path.is_file():
                problems.append(SkippedRow("train.csv", int(line), image_id, f"image not found in {self.image_dir}"))
            else:
                present.append((int(line), image_id, path))
        if check is not None and present:
            for (line, image_id, _), problem in zip(present, check([path for _, _, path in present])):
                if problem is not None:
                    problems.append(SkippedRow("train.csv", line, image_id, problem))
        return sorted(problems, key=lambda row: row.line)

    def unused_images(self, other_names: Iterable[str] = ()) -> list[str]:
        """Return the files in the image folder that no row of train.csv or test.csv names, sorted.

        `other_names` are ImageIDs named elsewhere, such as those of invalid rows.
        """
        if self.image_dir is None:
            return []
        named = {str(image_id) for image_id in self.train["ImageID"]} | set(other_names)
        if self.test is not None:
            named |= {str(image_id) for image_id in self.test["ImageID"]}
        found = []
        for directory, _, files in os.walk(self.image_dir):
            for name in files:
                relative = (Path(directory) / name).relative_to(self.image_dir).as_posix()
                if relative not in named and not name.startswith("."):
                    found.append(relative)
        return sorted(found)


def resolve_image_path(image_dir: Path, image_id: str) -> Path:
    """Join an ImageID to the image folder, rejecting ids that point outside it."""
    try:
        candidate = (image_dir / image_id).resolve()
    except (RuntimeError, OSError) as error:  # Python 3.11 raises RuntimeError for a symlink loop
        raise DatasetError(f"ImageID {image_id!r} cannot be resolved ({error}); replace the symlink with the image") from error
    root = image_dir.resolve()
    if os.path.isabs(image_id) or root not in candidate.parents:
        raise DatasetError(f"ImageID {image_id!r} points outside {image_dir}; use a file name inside that folder")
    return candidate


def load_dataset(root: str | os.PathLike, skipped: list[SkippedRow] | None = None) -> DatasetFolder:
    """Load a dataset folder: `train.csv`, optional `test.csv`, optional `data/` and `labels.csv`.

    Args:
        root: the dataset folder.
        skipped: None to raise on invalid rows of train.csv; a list to collect them
            instead (see `read_table`). An unreadable test.csv raises without
            `skipped`; with it, test.csv is left out with a warning, because only
            submit needs it (and submit reads it strictly).
    """
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"{root} is a file; pass the folder that contains train.csv")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found; pass a folder that contains train.csv")
    train_csv = root / "train.csv"
    if train_csv.is_dir():
        raise DatasetError(f"{train_csv} is a folder; train.csv must be a CSV file")
    if (root / IMAGE_DIR_NAME).is_file():
        raise DatasetError(f"{root / IMAGE_DIR_NAME} is a file; images belong in a folder named {IMAGE_DIR_NAME}/")
    if not train_csv.is_file():
        raise FileNotFoundError(
            f"{train_csv} not found; a dataset folder needs a train.csv with columns {','.join(COLUMNS)}"
        )

    train = read_table(train_csv, require_labels=True, skipped=skipped)
    if train.empty and skipped:
        raise DatasetError(format_problems(train_csv, [row.describe() for row in skipped],
                                           "No row is valid; fix them and load the file again."))
    if train.empty:
        raise DatasetError(f"{train_csv}: header only, no rows; add at least one labelled row")
    test_csv = root / "test.csv"
    test = None
    if test_csv.is_file():
        try:
            test = read_table(test_csv, require_labels=False)
        except DatasetError as error:
            if skipped is None:
                raise
            logger.warning("%s; only submit needs test.csv, so the rest of the dataset is used", error)

    labels = sorted({label for row_labels in train["Labels"] for label in row_labels})
    image_dir = root / IMAGE_DIR_NAME
    return DatasetFolder(
        root=root,
        train=train,
        test=test,
        labels=labels,
        label_names=read_label_names(root, labels),
        image_dir=image_dir if image_dir.is_dir() else None,
    )


# ----------------------------------------------------------------------------- splits


def split_indices(targets: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into seeded train and validation index arrays.

    Every label with at least two rows gets at least one row on each side where
    such a split exists. Labels are placed rarest first. Then the remaining rows
    fill the validation part in a seeded random order up to `val_fraction` of all
    rows. When the greedy placement strands a label on one side, it is retried with
    other seeded row orders (up to `SPLIT_ATTEMPTS`), and the split that covers the
    most labels is kept.

    Args:
        targets: (rows, labels) 0/1 matrix.
        val_fraction: share of rows for validation, in (0, 1).
        seed: random seed; the same seed and targets give the same split.

    Returns:
        (train_indices, val_indices), each sorted.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"invalid validation fraction {val_fraction}; expected a number between 0 and 1")
    rows = len(targets)
    if rows < 2:
        raise DatasetError(f"{rows} labelled row(s) cannot be split into train and validation; add rows")

    targets = np.asarray(targets) > 0
    splittable = targets.sum(axis=0) >= 2
    rng = np.random.default_rng(seed)
    best_side, best_missing = None, None
    for _ in range(SPLIT_ATTEMPTS):
        side = _greedy_split(targets, val_fraction, rng)
        on_both = targets[side == 0].any(axis=0) & targets[side == 1].any(axis=0)
        missing = int((splittable & ~on_both).sum())
        if best_missing is None or missing < best_missing:
            best_side, best_missing = side, missing
        if missing == 0:
            break
    if best_missing:
        logger.warning("%d label(s) with two or more rows could not be placed on both sides of the split", best_missing)
    return np.flatnonzero(best_side == 0), np.flatnonzero(best_side == 1)


SPLIT_ATTEMPTS = 50


def _greedy_split(targets: np.ndarray, val_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Return a side per row (0 train, 1 validation), placing each label rarest first."""
    rows = len(targets)
    order = rng.permutation(rows)
    rank = np.empty(rows, dtype=np.int64)
    rank[order] = np.arange(rows)
    side = np.full(rows, -1, dtype=np.int8)  # -1 unassigned

    label_counts = targets.sum(axis=0)
    for label in np.argsort(label_counts, kind="stable"):
        if label_counts[label] < 2:
            continue
        members = np.flatnonzero(targets[:, label])
        members = members[np.argsort(rank[members])]
        for wanted in rng.permutation([0, 1]):
            if (side[members] == wanted).any():
                continue
            free = members[side[members] == -1]
            if free.size:
                side[free[0]] = wanted

    target_val = max(1, round(rows * val_fraction))
    val_count = int((side == 1).sum())
    for row in order:
        if side[row] == -1:
            side[row] = 1 if val_count < target_val else 0
            val_count += int(side[row])
    if not (side == 0).any():
        side[order[-1]] = 0
    return side


# ----------------------------------------------------------------------------- images


MAX_IMAGE_PIXELS = 89_478_485  # Pillow's decompression bomb limit (about 9,500 x 9,500); larger images are refused


BOMB_ADVICE = "which protects against decompression bombs"
# check_dimensions rejects the sizes that Pillow only warns about, so its warning would repeat the error.
# A module-level filter, because warnings.catch_warnings is not thread-safe and ImageChecks uses threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def check_dimensions(image: Image.Image, name: str | os.PathLike) -> None:
    """Raise ValueError when an opened image declares more pixels than any real photo has."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{name}: {width} x {height} pixels is more than the {MAX_IMAGE_PIXELS:,} allowed, {BOMB_ADVICE}"
        )


def _decode_failure(path: str | os.PathLike, error: BaseException) -> str:
    if isinstance(error, Image.DecompressionBombError):
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "its size"
        return f"{size} is more than the {MAX_IMAGE_PIXELS:,} allowed, {BOMB_ADVICE}"
    if isinstance(error, UnidentifiedImageError):
        size = os.path.getsize(path) if os.path.exists(path) else 0
        return "empty file (0 bytes)" if size == 0 else "not an image file Pillow can read (unknown format)"
    return f"cannot decode image ({error})"


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB, applying its EXIF orientation.

    Transparent images are composited on white; 16-bit and 32-bit grayscale is
    scaled to 8 bits; CMYK, palette and grayscale images are converted. The format
    comes from the file content, so a PNG named .jpg opens too.

    Raises:
        ValueError: the file is not a decodable image or is a decompression bomb;
            the message names the file.
    """
    try:
        with Image.open(path) as image:
            check_dimensions(image, path)
            return to_rgb(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: {_decode_failure(path, error)}; replace or remove the file") from error


def check_image(path: str | os.PathLike) -> str | None:
    """Return why an image file cannot be used, or None when it decodes.

    JPEG files are decoded at reduced scale, which still reads every byte, so a
    truncated file is found at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(path) as image:
            check_dimensions(image, Path(path).name)
            image.draft("RGB", (64, 64))
            image.load()
    except ValueError as error:
        return str(error).split(": ", 1)[-1]
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        return _decode_failure(path, error)
    return None


def file_stamp(path: str | os.PathLike) -> list[int]:
    """Return [size, modification time, status change time] of a file, which change when its content does.

    The status change time also catches a file copied over another with its size and
    modification time kept (cp -p, rsync -a, tar).
    """
    stat = Path(path).stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class ImageChecks:
    """`check_image` results for many files, run in threads and remembered in a JSON file.

    A result is reused while the file's size, modification time and status change
    time are unchanged, so a second run on the same folder does not decode its images again.
    """

    def __init__(self, cache_file: str | os.PathLike | None = None) -> None:
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._known: dict[str, list] = {}
        if self.cache_file is not None and self.cache_file.is_file():
            try:
                self._known = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("ignored the unreadable image check cache %s", self.cache_file)

    def check(self, paths: Sequence[Path]) -> list[str | None]:
        """Return one problem (or None) per path, in order."""
        stamps = [file_stamp(path) for path in paths]
        todo = [index for index, path in enumerate(paths) if self._known.get(str(path), [])[:3] != stamps[index]]
        if todo:
            logger.info("checking %d image(s) for decoding problems", len(todo))
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for index, problem in zip(todo, pool.map(check_image, [paths[index] for index in todo])):
                    self._known[str(paths[index])] = [*stamps[index], problem]
            self._save()
        return [self._known[str(path)][3] for path in paths]

    def _save(self) -> None:
        if self.cache_file is None:
            return
        try:
            write_json(self.cache_file, self._known)
        except OSError as error:
            logger.warning("could not save the image check cache %s: %s", self.cache_file, error)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB, applying its EXIF orientation."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """Resize an RGB image to a (3, image_size, image_size) uint8 tensor, ignoring the aspect ratio.

    Squashing rather than cropping keeps objects near the borders, which may carry labels.
    """
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_resized(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decode an image file and resize it to (3, image_size, image_size) uint8."""
    return resize_to_tensor(open_image(path), image_size)


def sample_indices(count: int, max_images: int = 2000, seed: int = 0) -> list[int]:
    """Return all of range(count), or a sorted seeded sample of `max_images` of it."""
    if count <= max_images:
        return list(range(count))
    return sorted(np.random.default_rng(seed).choice(count, size=max_images, replace=False).tolist())


def channel_stats(
    paths: Sequence[Path], image_size: int, max_images: int = 2000, seed: int = 0
) -> tuple[list[float], list[float]]:
    """Compute per-channel mean and standard deviation of images scaled to [0, 1].

    Images are resized to `image_size` first, as in training. With more
    than `max_images` paths, a seeded random sample of that many is used, which
    estimates the statistics of the whole set.
    """
    if not paths:
        raise ValueError("no images to compute channel statistics from")
    chosen = [paths[index] for index in sample_indices(len(paths), max_images, seed)]
    return stats_of_images(load_resized(path, image_size) for path in chosen)


def stats_of_images(images: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Compute per-channel mean and standard deviation of uint8 (3, H, W) images on the [0, 1] scale."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for image in images:
        image = image.to(torch.float64) / 255.0
        total += image.sum(dim=(1, 2))
        total_sq += (image**2).sum(dim=(1, 2))
        pixels += image.shape[1] * image.shape[2]
    mean = total / pixels
    std = (total_sq / pixels - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def build_transform(
    mean: Sequence[float], std: Sequence[float], augmentations: Iterable[str] = ()
) -> v2.Compose:
    """Build the tensor pipeline applied to a resized uint8 image: augmentations, then standardisation.

    Args:
        mean, std: per-channel statistics for `Normalize`, on the [0, 1] scale.
        augmentations: any of "hflip", "vflip" (random flips, p=0.5), "jitter"
            (brightness, contrast and saturation within 20%, hue within 0.05) and
            "sharpness" (sharpness factor 2 with p=0.5). Empty for evaluation.
    """
    steps: list[v2.Transform] = []
    chosen = set(augmentations)
    unknown = chosen - set(AUGMENTATIONS)
    if unknown:
        raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    if "hflip" in chosen:
        steps.append(v2.RandomHorizontalFlip())
    if "vflip" in chosen:
        steps.append(v2.RandomVerticalFlip())
    if "jitter" in chosen:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05))
    if "sharpness" in chosen:
        steps.append(v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# ----------------------------------------------------------------------------- torch Dataset


class BatchAugment:
    """Augment and standardise a batch of uint8 images (B, 3, H, W) on whatever device it is on.

    Training applies this after the batch reaches the device, so the cached and the
    decoded paths share it, and on a GPU the work leaves the CPU. Random draws come
    from a CPU `torch.Generator`, so the same seed gives the same batch anywhere.
    Flips and sharpness run on the whole batch at once; colour jitter needs its own
    factors per image and runs image by image.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augmentations: Iterable[str] = ()) -> None:
        self.augmentations = tuple(name for name in AUGMENTATIONS if name in set(augmentations))
        unknown = set(augmentations) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentation(s) {sorted(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        device = images.device
        batch = images.shape[0]

        def coin() -> torch.Tensor:  # one fair coin per image, as a (B, 1, 1, 1) mask on the device
            return (torch.rand(batch, generator=generator) < 0.5).view(batch, 1, 1, 1).to(device)

        if "hflip" in self.augmentations:
            images = torch.where(coin(), images.flip(-1), images)
        if "vflip" in self.augmentations:
            images = torch.where(coin(), images.flip(-2), images)
        images = images.float().div_(255.0)
        if "jitter" in self.augmentations:
            images = torch.stack([_jitter(image, generator) for image in images])
        if "sharpness" in self.augmentations:
            images = torch.where(coin(), v2.functional.adjust_sharpness(images, 2.0), images)
        if self.mean.device != device:  # moved once, not copied to the GPU with every batch
            self.mean, self.std = self.mean.to(device), self.std.to(device)
        return (images - self.mean) / self.std


def _jitter(image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Apply brightness, contrast and saturation within 20% and hue within 0.05, in a random order."""
    factors = 0.8 + 0.4 * torch.rand(3, generator=generator)
    hue = (torch.rand(1, generator=generator).item() - 0.5) * 0.1
    steps = [
        lambda tensor: v2.functional.adjust_brightness(tensor, factors[0].item()),
        lambda tensor: v2.functional.adjust_contrast(tensor, factors[1].item()),
        lambda tensor: v2.functional.adjust_saturation(tensor, factors[2].item()),
        lambda tensor: v2.functional.adjust_hue(tensor, hue),
    ]
    for index in torch.randperm(4, generator=generator).tolist():
        image = steps[index](image)
    return image


class CaptionedImages(Dataset):
    """Rows of (image, encoded caption, target); the image is omitted when the rows have no images.

    Images come from `image_paths` (decoded on every read) or from `cached`, an
    (array, slots) pair from `ImageCache.load` (read from memory). Without a
    `transform` they are uint8 (3, size, size) tensors for `BatchAugment`; with one,
    the transform turns each decoded image into the model's input. Captions are
    encoded once here, not on every epoch.
    """

    def __init__(
        self,
        image_paths: Sequence[Path] | None,
        captions: Sequence[str],
        targets: np.ndarray,
        image_size: int,
        transform: v2.Compose | None,
        cached: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if image_paths is not None and len(image_paths) != len(captions):
            raise ValueError(f"{len(image_paths)} image paths but {len(captions)} captions")
        if cached is not None and len(cached[1]) != len(captions):
            raise ValueError(f"{len(cached[1])} cached images but {len(captions)} captions")
        if len(targets) != len(captions):
            raise ValueError(f"{len(targets)} target rows but {len(captions)} captions")
        self.image_paths = list(image_paths) if image_paths is not None else None
        self.cached = cached
        self.encoded = [encode_trigrams(caption) for caption in captions]
        self.targets = torch.from_numpy(np.asarray(targets, dtype=np.float32))
        self.image_size = image_size
        self.transform = transform

    @property
    def has_images(self) -> bool:
        return self.image_paths is not None or self.cached is not None

    def __len__(self) -> int:
        return len(self.encoded)

    def _image(self, index: int) -> torch.Tensor | None:
        if self.cached is not None:
            array, slots = self.cached
            image = torch.from_numpy(np.array(array[slots[index]]))
        elif self.image_paths is not None:
            image = load_resized(self.image_paths[index], self.image_size)
        else:
            return None
        return self.transform(image) if self.transform is not None else image

    def __getitem__(self, index: int):
        return self._image(index), self.encoded[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> list:
        """Read a whole batch; from the cache, in one sorted read of the memory-mapped array."""
        if self.cached is None or self.transform is not None:
            return [self[index] for index in indices]
        array, slots = self.cached
        wanted = slots[indices]
        order = np.argsort(wanted, kind="stable")
        block = torch.from_numpy(np.asarray(array[wanted[order]]))  # fancy indexing copies out of the file
        images = [None] * len(indices)
        for position, source in enumerate(order):
            images[source] = block[position]
        return [(images[row], self.encoded[index], self.targets[index]) for row, index in enumerate(indices)]


def collate_rows(rows: list) -> tuple[torch.Tensor | None, CaptionBatch, torch.Tensor]:
    """Stack dataset rows into (images or None, CaptionBatch, targets)."""
    images, encoded, targets = zip(*rows)
    stacked = None if images[0] is None else torch.stack(images)
    return stacked, collate_captions(encoded), torch.stack(targets)
