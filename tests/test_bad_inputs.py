"""Corpus of bad inputs, each run through the command line (`core.__main__.main`) in this process.

Every case builds a small demo dataset (24 training rows, 32 px images) or copies
a trained run, breaks one thing, runs one command and checks the exit code and the
message or result. It also checks that no traceback reaches stdout, stderr or the log.
Categories:

1. CSV: train.csv content, such as encodings, quoting, columns, labels and ImageIDs.
2. Paths: ImageIDs and symlinks that leave data/.
3. Images: undecodable, unusual or oversized files in place of a training image.
4. Predict-time inputs: `evaluate --csv` and `predict --image` on bad files.
5. Checkpoints: a best.pt with pickled objects, or from another run.
6. Run names: `--run-name` and `--resume` values that leave the runs folder.

"""

from __future__ import annotations

import csv
import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.__main__ import main
from core.datasets import read_table
from core.demo import make_demo

TRAIN_ROWS = 24
DEMO_IDS = [f"{index}.jpg" for index in range(TRAIN_ROWS)]
SMALL_TRAINING = ("--image-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--hidden-size", "16")
MAX_PIXELS_TEXT = "is more than the 89,478,485 allowed"


# ----------------------------------------------------------------------------- running the command line


@dataclass
class Outcome:
    """What one command showed the user."""

    code: int
    out: str
    err: str
    log: str

    @property
    def text(self) -> str:
        return "\n".join((self.out, self.err, self.log))


def run_cli(capsys, caplog, *args) -> Outcome:
    """Run `python -m core ARGS` in this process and check that no traceback reaches the user."""
    capsys.readouterr()
    caplog.clear()
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    outcome = Outcome(code, captured.out, captured.err, caplog.text)
    for stream, text in (("stdout", outcome.out), ("stderr", outcome.err), ("log", outcome.log)):
        assert "Traceback" not in text, f"traceback in {stream}:\n{text}"
    return outcome


def train(capsys, caplog, root: Path, runs: Path, *extra, model: str = "cnn2") -> Outcome:
    return run_cli(capsys, caplog, "train", "--data", root, *SMALL_TRAINING, "--runs-dir", runs, "--run-name", "r",
                   "--model", model, *extra)


def assert_rejected(outcome: Outcome, *fragments: str) -> None:
    assert outcome.code == 1, f"exit code {outcome.code}:\n{outcome.text}"
    for fragment in fragments:
        assert fragment in outcome.log, f"{fragment!r} not in the log:\n{outcome.log}"


def assert_trained(outcome: Outcome, run_dir: Path, rows: int) -> dict:
    """Check a finished run of `rows` usable rows and return its config.json."""
    assert outcome.code == 0, f"exit code {outcome.code}:\n{outcome.text}"
    assert f"saved to {run_dir}" in outcome.out
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["train_rows"] + config["val_rows"] == rows
    return config


def read_skipped_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "skipped_rows.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def files_under(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A fresh demo dataset for one case to break."""
    return make_demo(tmp_path / "set", train_rows=TRAIN_ROWS, test_rows=4, image_size=32, seed=0)


# ----------------------------------------------------------------------------- building bad files


def csv_lines(root: Path) -> list[str]:
    return (root / "train.csv").read_text(encoding="utf-8").splitlines()


def write_lines(root: Path, lines: list[str], newline: str = "\n") -> None:
    (root / "train.csv").write_bytes((newline.join(lines) + newline).encode("utf-8"))


def set_line(root: Path, number: int, text: str) -> None:
    """Replace line `number` (1-based, the header is line 1) of train.csv."""
    lines = csv_lines(root)
    lines[number - 1] = text
    write_lines(root, lines)


def append_line(root: Path, text: str) -> None:
    write_lines(root, csv_lines(root) + [text])


def rewrite_columns(root: Path, header: list[str]) -> None:
    """Rewrite train.csv with the standard columns in the order and spelling of `header`."""
    with (root / "train.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    standard = {name.strip().lower(): name for name in ("ImageID", "Labels", "Caption")}
    with (root / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([row[standard[name.strip().lower()]] for name in header] for row in rows)


def drop_column(root: Path, column: str) -> None:
    with (root / "train.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [name for name in ("ImageID", "Labels", "Caption") if name != column]
    with (root / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(kept)
        writer.writerows([row[name] for name in kept] for row in rows)


def replace_bytes(root: Path, transform) -> None:
    path = root / "train.csv"
    path.write_bytes(transform(path.read_bytes()))


def demo_image(root: Path) -> Image.Image:
    with Image.open(root / "data" / "3.jpg") as image:
        return image.convert("RGB")


def save_image(root: Path, convert, **options) -> None:
    """Overwrite data/3.jpg with `convert(original RGB image)`, saved with `options` (format and so on)."""
    converted = convert(demo_image(root))
    converted.save(root / "data" / "3.jpg", **options)


def write_sixteen_bit_png(root: Path) -> None:
    gray = np.asarray(demo_image(root).convert("L"), dtype=np.uint16) * 257
    image = Image.fromarray(gray)
    assert image.mode == "I;16"
    image.save(root / "data" / "3.jpg", format="PNG")


def write_exif_rotated_jpeg(root: Path) -> None:
    image = demo_image(root).resize((40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(root / "data" / "3.jpg", format="JPEG", exif=exif)


def write_palette_png_with_transparency(root: Path) -> None:
    image = demo_image(root).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.save(root / "data" / "3.jpg", format="PNG", transparency=0)


def write_rgba_png(root: Path) -> None:
    image = demo_image(root).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
    image.putalpha(Image.fromarray(alpha, mode="L"))
    image.save(root / "data" / "3.jpg", format="PNG")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_blank_bilevel_png(path: Path, side: int) -> None:
    """Write a valid all-black 1-bit grayscale PNG of side x side pixels, compressed about 1000:1."""
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale, no interlace
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed pixels
    compressor = zlib.compressobj(9)
    compressed = b"".join(compressor.compress(row * 100) for _ in range(side // 100)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", compressed)
                     + png_chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- 1. CSV files

# Rows of (mutation, model, expected log fragments). The command stops before training.
CSV_REJECTED = [
    pytest.param(lambda root: (root / "train.csv").write_bytes(b""), "caption_only",
                 ["the file is empty; expected a header line ImageID,Labels,Caption"], id="empty-file"),
    pytest.param(lambda root: write_lines(root, ["ImageID,Labels,Caption"]), "caption_only",
                 ["header only, no rows; add at least one labelled row"], id="header-only"),
    pytest.param(lambda root: drop_column(root, "Labels"), "caption_only",
                 ["missing column(s) Labels", "The first line must be the header ImageID,Labels,Caption"],
                 id="missing-labels-column"),
    pytest.param(lambda root: set_line(root, 1, "Image,Label,Caption"), "caption_only",
                 ["missing column(s) ImageID, Labels; found ['Image', 'Label', 'Caption']"], id="misspelt-columns"),
    pytest.param(lambda root: replace_bytes(root, lambda data: data.replace(b",", b";")), "caption_only",
                 ["missing column(s) ImageID, Labels; found ['ImageID;Labels;Caption']"], id="semicolon-separated"),
    pytest.param(lambda root: drop_column(root, "Caption"), "caption_only",
                 ["has no captions (no Caption column, or every caption is empty)"], id="no-caption-column"),
    pytest.param(lambda root: set_line(root, 5, '3.jpg,3 4,"A drawing made of flat colours.'), "caption_only",
                 ["line 5 (3.jpg): the caption opens a quote that is not closed"], id="unclosed-quote"),
    pytest.param(lambda root: append_line(root, "3.jpg,1,Another caption for the same image."), "caption_only",
                 ["line 26 (3.jpg): duplicate ImageID (first on line 5)", "--skip-bad-rows"], id="duplicate-image-id"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,3 four,A drawing."), "caption_only",
                 ["line 5 (3.jpg): label 'four' is not an integer"], id="non-integer-label"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,3.0,A drawing."), "caption_only",
                 ["line 5 (3.jpg): label '3.0' is not an integer"], id="decimal-label"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,,A drawing."), "caption_only",
                 ["line 5 (3.jpg): no labels; expected space-separated integer ids"], id="empty-labels"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,3 -4,A drawing."), "caption_only",
                 ["line 5 (3.jpg): label '-4' is negative"], id="negative-label"),
    pytest.param(lambda root: set_line(root, 5, ",3 4,A drawing."), "caption_only",
                 ["line 5: empty ImageID"], id="empty-image-id"),
    pytest.param(lambda root: replace_bytes(root, lambda data: data.replace(b"A drawing made", b"A caf\xe9 made")),
                 "caption_only", ["line 5 is not valid UTF-8 text", "re-save the file with UTF-8 encoding"],
                 id="latin-1-byte"),
    pytest.param(lambda root: replace_bytes(root, lambda data: data.decode("utf-8").encode("utf-16")), "caption_only",
                 ["line 1 is not valid UTF-8 text"], id="utf-16-file"),
    pytest.param(lambda root: (rewrite_columns(root, ["Caption", "ImageID", "Labels"]),
                               set_line(root, 5, "A drawing, made of flat colours.,3.jpg,3 4")), "caption_only",
                 ["line 5", "4 fields, expected 3; quote fields that contain commas"],
                 id="unquoted-comma-caption-not-last"),
    pytest.param(lambda root: write_lines(root, ["ImageID,Labels,Caption"] + [
                     f"{index}.jpg,x,A drawing." for index in range(TRAIN_ROWS)]), "caption_only",
                 ["line 2 (0.jpg): label 'x' is not an integer", "24 invalid row(s)"], id="every-row-invalid"),
    pytest.param(lambda root: (root / "data" / "3.jpg").unlink(), "cnn2",
                 ["line 5 (3.jpg): image not found in", "to train on the other 23 row(s)"], id="image-missing"),
    pytest.param(lambda root: set_line(root, 5, "3.j\x00pg,3 4,A drawing."), "cnn2",
                 ["line 5 ('3.j\\x00pg'): ImageID '3.j\\x00pg' contains a control character"], id="nul-byte-in-image-id"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,3,4,A drawing made of flat colours."), "caption_only",
                 ["line 5 (3.jpg): labels look comma-separated (3,4); separate label ids with spaces"],
                 id="comma-separated-labels"),
]


@pytest.mark.parametrize(("mutate", "model", "fragments"), CSV_REJECTED)
def test_csv_rejected(mutate, model, fragments, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    runs = tmp_path / "runs"
    outcome = train(capsys, caplog, dataset, runs, model=model)
    assert_rejected(outcome, *fragments)
    assert not (runs / "r").exists(), "a rejected dataset left a run folder"


def test_csv_every_row_invalid_skipped(dataset, tmp_path, capsys, caplog):
    write_lines(dataset, ["ImageID,Labels,Caption"] + [f"{index}.jpg,x,A drawing." for index in range(TRAIN_ROWS)])
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", "--skip-bad-rows", model="caption_only")
    assert_rejected(outcome, "24 invalid row(s)", "line 2 (0.jpg): label 'x' is not an integer", "... and 4 more",
                    "No row is valid")


# Rows of (mutation, model, skipped ImageID, its line, reason fragment, usable rows).
# Each trains with --skip-bad-rows.
CSV_SKIPPED = [
    pytest.param(lambda root: append_line(root, "3.jpg,1,Another caption for the same image."), "caption_only",
                 "3.jpg", 26, "duplicate ImageID (first on line 5)", TRAIN_ROWS, id="duplicate-image-id"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,3 four,A drawing."), "caption_only",
                 "3.jpg", 5, "label 'four' is not an integer", TRAIN_ROWS - 1, id="non-integer-label"),
    pytest.param(lambda root: (root / "data" / "3.jpg").unlink(), "cnn2",
                 "3.jpg", 5, "image not found in", TRAIN_ROWS - 1, id="image-missing"),
]


@pytest.mark.parametrize(("mutate", "model", "image_id", "line", "reason", "rows"), CSV_SKIPPED)
def test_csv_skipped(mutate, model, image_id, line, reason, rows, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    run_dir = tmp_path / "runs" / "r"
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", "--skip-bad-rows", model=model)
    config = assert_trained(outcome, run_dir, rows)
    assert config["skipped_rows"] == 1
    assert outcome.log.count("skipping 1 unusable row(s)") == 1
    assert (run_dir / "train.log").read_text(encoding="utf-8").count("skipping 1 unusable row(s)") == 1
    skipped = read_skipped_rows(run_dir)
    assert len(skipped) == 1
    assert skipped[0]["ImageID"] == image_id
    assert skipped[0]["line"] == str(line)
    assert reason in skipped[0]["reason"]


# Rows of (mutation, (ImageID, expected caption) or None, (ImageID, expected line) or None, log fragment or None).
# Each trains a caption_only run on all 24 rows.
CSV_ACCEPTED = [
    pytest.param(lambda root: replace_bytes(root, lambda data: "\ufeff".encode("utf-8") + data),
                 ("0.jpg", "A picture of a green square."), None, None, id="byte-order-mark"),
    pytest.param(lambda root: write_lines(root, csv_lines(root), newline="\r\n"),
                 ("0.jpg", "A picture of a green square."), ("23.jpg", 25), None, id="crlf-line-ends"),
    pytest.param(lambda root: write_lines(root, [line + ",," for line in csv_lines(root)]),
                 ("0.jpg", "A picture of a green square."), None, None, id="trailing-empty-columns"),
    pytest.param(lambda root: set_line(root, 5, "3.jpg,3 4,A drawing, made of, flat colours."),
                 ("3.jpg", "A drawing, made of, flat colours."), None,
                 "1 row(s) had unquoted commas in the caption (lines 5); the fields were joined back", id="unquoted-commas"),
    pytest.param(lambda root: set_line(root, 5, '3.jpg,3 4,"A sign saying ""stop"", drawn flat."'),
                 ("3.jpg", 'A sign saying "stop", drawn flat.'), None, None, id="doubled-quotes"),
    pytest.param(lambda root: set_line(root, 5, '3.jpg,3 4,A 12" ruler on a grey background.'),
                 ("3.jpg", 'A 12" ruler on a grey background.'), None, None, id="stray-quote"),
    pytest.param(lambda root: set_line(root, 5, '3.jpg,3 4,"A drawing\nmade of flat colours."'),
                 ("3.jpg", "A drawing\nmade of flat colours."), ("4.jpg", 7), None, id="embedded-newline"),
    pytest.param(lambda root: rewrite_columns(root, [" imageid ", "LABELS", "caption "]),
                 ("0.jpg", "A picture of a green square."), None, None, id="header-case-and-spaces"),
    pytest.param(lambda root: rewrite_columns(root, ["Caption", "Labels", "ImageID"]),
                 ("4.jpg", "A orange square and a blue cross, drawn flat."), None, None, id="columns-reordered"),
    pytest.param(lambda root: write_lines(root, [line for row in csv_lines(root) for line in (row, "", " ,,")]),
                 None, ("1.jpg", 7), None, id="blank-lines"),
]


@pytest.mark.parametrize(("mutate", "caption", "line", "warning"), CSV_ACCEPTED)
def test_csv_accepted(mutate, caption, line, warning, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    run_dir = tmp_path / "runs" / "r"
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_trained(outcome, run_dir, TRAIN_ROWS)
    assert not (run_dir / "skipped_rows.csv").exists()
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert sorted(split["train"] + split["val"]) == sorted(DEMO_IDS)
    if warning is not None:
        assert warning in outcome.log

    table = read_table(dataset / "train.csv").set_index("ImageID")
    assert len(table) == TRAIN_ROWS
    if caption is not None:
        image_id, text = caption
        assert table.loc[image_id, "Caption"] == text
    if line is not None:
        image_id, number = line
        assert table.loc[image_id, "line"] == number


def test_csv_image_without_row_named(dataset, tmp_path, capsys, caplog):
    shutil.copy(dataset / "data" / "3.jpg", dataset / "data" / "extra.jpg")
    outcome = train(capsys, caplog, dataset, tmp_path / "runs")
    assert outcome.code == 0
    warning = "have no row in train.csv or test.csv and are not used, for example extra.jpg"
    assert "1 file(s) in" in outcome.log
    # The rows are checked once, before the run folder exists, and train.log still gets the warning.
    assert outcome.log.count(warning) == 1
    assert (tmp_path / "runs" / "r" / "train.log").read_text(encoding="utf-8").count(warning) == 1
    config = json.loads((tmp_path / "runs" / "r" / "config.json").read_text(encoding="utf-8"))
    assert config["unused_images"] == 1


# ----------------------------------------------------------------------------- 2. paths that leave data/


def image_id_parent(root: Path) -> None:
    shutil.copy(root / "data" / "3.jpg", root / "x.jpg")
    set_line(root, 5, "../x.jpg,3 4,A drawing made of flat colours.")


def image_id_absolute(root: Path) -> None:
    shutil.copy(root / "data" / "3.jpg", root / "x.jpg")
    set_line(root, 5, f"{root / 'x.jpg'},3 4,A drawing made of flat colours.")


def symlink_outside(root: Path) -> None:
    shutil.copy(root / "data" / "3.jpg", root / "outside.jpg")
    (root / "data" / "3.jpg").unlink()
    (root / "data" / "3.jpg").symlink_to(root / "outside.jpg")


# Rows of (mutation, the ImageID as train.csv names it). None stands for the absolute path of x.jpg.
PATHS_OUTSIDE = [
    pytest.param(image_id_parent, "../x.jpg", id="parent-folder"),
    pytest.param(image_id_absolute, None, id="absolute-path"),
    pytest.param(symlink_outside, "3.jpg", id="symlink-outside"),
]


@pytest.mark.parametrize(("mutate", "image_id"), PATHS_OUTSIDE)
def test_path_outside_rejected(mutate, image_id, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    image_id = image_id or str(dataset / "x.jpg")
    outcome = train(capsys, caplog, dataset, tmp_path / "runs")
    assert_rejected(outcome, f"line 5 ({image_id}): ImageID {image_id!r} points outside {dataset / 'data'}")
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize(("mutate", "image_id"), PATHS_OUTSIDE)
def test_path_outside_skipped(mutate, image_id, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    image_id = image_id or str(dataset / "x.jpg")
    run_dir = tmp_path / "runs" / "r"
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", "--skip-bad-rows")
    assert_trained(outcome, run_dir, TRAIN_ROWS - 1)
    skipped = read_skipped_rows(run_dir)
    assert [row["ImageID"] for row in skipped] == [image_id]
    assert "points outside" in skipped[0]["reason"]
    split = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))
    assert image_id not in split["train"] + split["val"]


def test_path_symlink_loop(dataset, tmp_path, capsys, caplog):
    (dataset / "data" / "3.jpg").unlink()
    (dataset / "data" / "3.jpg").symlink_to("3.jpg")
    outcome = train(capsys, caplog, dataset, tmp_path / "runs")
    assert_rejected(outcome, "line 5 (3.jpg): ImageID '3.jpg' cannot be resolved (Symlink loop")


# ----------------------------------------------------------------------------- 3. images

# Each mutation replaces data/3.jpg. A cnn2 run on the default normalization decodes every training image.
IMAGES_ACCEPTED = [
    pytest.param(lambda root: save_image(root, lambda image: image, format="PNG"), id="png-named-jpg"),
    pytest.param(lambda root: save_image(root, lambda image: image, format="WEBP"), id="webp-named-jpg"),
    pytest.param(lambda root: save_image(root, lambda image: image.convert("L"), format="JPEG"), id="grayscale"),
    pytest.param(lambda root: save_image(root, lambda image: image.convert("CMYK"), format="JPEG"), id="cmyk-jpeg"),
    pytest.param(write_palette_png_with_transparency, id="palette-png-transparency"),
    pytest.param(write_rgba_png, id="rgba-png"),
    pytest.param(write_sixteen_bit_png, id="16-bit-png"),
    pytest.param(write_exif_rotated_jpeg, id="exif-rotated-jpeg"),
    pytest.param(lambda root: save_image(root, lambda image: image.convert("1"), format="PNG"), id="1-bit-png"),
    pytest.param(lambda root: save_image(root, lambda image: image.convert("F"), format="TIFF"), id="float-tiff"),
]


@pytest.mark.parametrize("mutate", IMAGES_ACCEPTED)
def test_image_accepted(mutate, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    run_dir = tmp_path / "runs" / "r"
    outcome = train(capsys, caplog, dataset, tmp_path / "runs")
    config = assert_trained(outcome, run_dir, TRAIN_ROWS)
    assert config["normalization"] == "auto"
    assert config["skipped_rows"] == 0
    assert not (run_dir / "skipped_rows.csv").exists()


def truncate_jpeg_header(root: Path) -> None:
    path = root / "data" / "3.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") // 2])  # cut before the start of scan (SOS) marker


def truncate_jpeg_scan(root: Path) -> None:
    """Cut the compressed pixel data in half, so the header opens but decoding runs out of bytes."""
    path = root / "data" / "3.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: (data.index(b"\xff\xda") + len(data)) // 2])


# Rows of (mutation, reason fragment). Training stops, or leaves the row out with --skip-bad-rows.
IMAGES_REJECTED = [
    pytest.param(lambda root: (root / "data" / "3.jpg").write_bytes(b""), "empty file (0 bytes)", id="zero-bytes"),
    pytest.param(truncate_jpeg_header, "cannot decode image (Truncated File Read)", id="truncated-jpeg-header"),
    pytest.param(truncate_jpeg_scan, "cannot decode image (image file is truncated", id="truncated-jpeg-data"),
    pytest.param(lambda root: (root / "data" / "3.jpg").write_text("not an image\n", encoding="utf-8"),
                 "not an image file Pillow can read (unknown format)", id="text-named-jpg"),
    pytest.param(lambda root: write_blank_bilevel_png(root / "data" / "3.jpg", 20_000),
                 f"400,000,000 pixels {MAX_PIXELS_TEXT}, which protects against decompression bombs",
                 id="decompression-bomb"),
    pytest.param(lambda root: write_blank_bilevel_png(root / "data" / "3.jpg", 10_000),
                 f"10000 x 10000 pixels {MAX_PIXELS_TEXT}", id="over-pixel-limit"),
    pytest.param(lambda root: ((root / "data" / "3.jpg").unlink(), (root / "data" / "3.jpg").mkdir()),
                 "image not found in", id="folder-named-jpg"),
]


@pytest.mark.parametrize(("mutate", "reason"), IMAGES_REJECTED)
def test_image_rejected(mutate, reason, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    outcome = train(capsys, caplog, dataset, tmp_path / "runs")
    assert_rejected(outcome, "1 unusable row(s)", f"line 5 (3.jpg): {reason}")
    assert not (tmp_path / "runs" / "r").exists()


@pytest.mark.parametrize(("mutate", "reason"), IMAGES_REJECTED)
def test_image_rejected_skipped(mutate, reason, dataset, tmp_path, capsys, caplog):
    mutate(dataset)
    run_dir = tmp_path / "runs" / "r"
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", "--skip-bad-rows")
    assert_trained(outcome, run_dir, TRAIN_ROWS - 1)
    skipped = read_skipped_rows(run_dir)
    assert [(row["ImageID"], row["line"]) for row in skipped] == [("3.jpg", "5")]
    assert reason in skipped[0]["reason"]


# ----------------------------------------------------------------------------- shared runs for 4 and 5


@dataclass
class SharedRuns:
    """Finished runs on the demo dataset, which tests copy before changing them."""

    dataset: Path
    image_run: Path  # cnn2 on labels 1-5
    caption_run: Path  # caption_only on labels 1-5, another architecture
    shifted_run: Path  # cnn2 on the same rows with labels 11-15, another label set


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory) -> SharedRuns:
    base = tmp_path_factory.mktemp("shared")
    dataset = make_demo(base / "set", train_rows=TRAIN_ROWS, test_rows=4, image_size=32, seed=0)
    shifted = make_demo(base / "shifted", train_rows=TRAIN_ROWS, test_rows=4, image_size=32, seed=0)
    rewrite = []
    for line in csv_lines(shifted):
        image_id, labels, caption = next(csv.reader([line]))
        if image_id != "ImageID":
            labels = " ".join(str(int(label) + 10) for label in labels.split())
        rewrite.append((image_id, labels, caption))
    with (shifted / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rewrite)

    runs = base / "runs"
    for name, data, model in (("image", dataset, "cnn2"), ("caption", dataset, "caption_only"),
                              ("shifted", shifted, "cnn2")):
        code = main(["train", "--data", str(data), *SMALL_TRAINING, "--runs-dir", str(runs), "--run-name", name,
                     "--model", model])
        assert code == 0, f"the shared {name} run failed to train"
    return SharedRuns(dataset, runs / "image", runs / "caption", runs / "shifted")


# ----------------------------------------------------------------------------- 4. predict-time inputs


def write_labelled_csv(shared: SharedRuns, path: Path, changes: dict[int, str]) -> Path:
    """Write the header and the first four rows of the demo train.csv, with `changes` (line number: text)."""
    lines = csv_lines(shared.dataset)[:5]
    for number, text in changes.items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_evaluate_csv_unseen_label(shared_runs, tmp_path, capsys, caplog):
    labelled = write_labelled_csv(shared_runs, tmp_path / "labelled.csv", {
        2: "0.jpg,2 99,A picture of a green square.",
        3: "1.jpg,99,A blue square and a blue triangle on a grey background.",
    })
    outcome = run_cli(capsys, caplog, "evaluate", shared_runs.image_run, "--csv", labelled,
                      "--images", shared_runs.dataset / "data")
    assert outcome.code == 0, outcome.text
    assert f"label(s) 99 of {labelled} (on 2 row(s), first on line 2) are not in run image's label set" in outcome.log
    assert "left out of the scores, because the run never saw them: labels 99" in outcome.out
    assert f"on {labelled}, 3 rows" in outcome.out  # line 3 has no known label, so it is left out
    lines = outcome.out.splitlines()
    table_start = next(index for index, line in enumerate(lines) if line.split()[:2] == ["label", "name"])
    per_label = [line.split()[0] for line in lines[table_start + 1:]]
    assert per_label == ["1", "2", "3", "4", "5"]


def test_evaluate_csv_only_unseen_labels(shared_runs, tmp_path, capsys, caplog):
    with_row = write_labelled_csv(shared_runs, tmp_path / "with.csv", {
        3: "1.jpg,99,A blue square and a blue triangle on a grey background.",
    })
    without_row = tmp_path / "without.csv"
    kept = [line for number, line in enumerate(with_row.read_text(encoding="utf-8").splitlines(), 1) if number != 3]
    without_row.write_text("\n".join(kept) + "\n", encoding="utf-8")
    scores = []
    for labelled in (with_row, without_row):
        outcome = run_cli(capsys, caplog, "evaluate", shared_runs.image_run, "--csv", labelled,
                          "--images", shared_runs.dataset / "data", "--json")
        assert outcome.code == 0, outcome.text
        scores.append(json.loads(outcome.out)["samples_f1_score"])
        if labelled == with_row:
            assert "1 row(s) of" in outcome.log
            assert "have only such labels and are left out, first on line 3" in outcome.log
            assert json.loads(outcome.out)["rows_left_out"] == 1
    assert scores[0] == pytest.approx(scores[1])


def test_evaluate_csv_no_known_label(shared_runs, tmp_path, capsys, caplog):
    labelled = tmp_path / "unknown.csv"
    labelled.write_text("ImageID,Labels,Caption\n0.jpg,98,A square.\n1.jpg,99,A circle.\n", encoding="utf-8")
    outcome = run_cli(capsys, caplog, "evaluate", shared_runs.image_run, "--csv", labelled,
                      "--images", shared_runs.dataset / "data")
    assert_rejected(outcome, "has a label of run", "evaluate a run trained on these labels")


def test_evaluate_csv_image_missing(shared_runs, tmp_path, capsys, caplog):
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("ImageID,Labels,Caption\n0.jpg,2,A square.\n404.jpg,1,A circle.\n", encoding="utf-8")
    outcome = run_cli(capsys, caplog, "evaluate", shared_runs.image_run, "--csv", labelled,
                      "--images", shared_runs.dataset / "data")
    assert_rejected(outcome, "1 image(s) not found", f"line 3: {shared_runs.dataset / 'data' / '404.jpg'}")


def write_text_file(path: Path) -> Path:
    path.write_text("not an image\n", encoding="utf-8")
    return path


def write_empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_bomb(path: Path) -> Path:
    write_blank_bilevel_png(path, 20_000)
    return path


# Rows of (builder of the --image file in tmp_path, expected log fragment with {image} for its path).
PREDICT_IMAGES = [
    pytest.param(lambda folder: write_text_file(folder / "notes.jpg"),
                 "{image}: not an image file Pillow can read (unknown format)", id="text-file"),
    pytest.param(lambda folder: write_empty_file(folder / "empty.jpg"), "{image}: empty file (0 bytes)",
                 id="zero-bytes"),
    pytest.param(lambda folder: write_bomb(folder / "bomb.png"),
                 f"{{image}}: 400,000,000 pixels {MAX_PIXELS_TEXT}", id="decompression-bomb"),
    pytest.param(lambda folder: folder / "missing.jpg", "image {image} not found", id="missing-file"),
    pytest.param(lambda folder: folder, "image {image} not found", id="folder"),
]


@pytest.mark.parametrize(("make_image", "fragment"), PREDICT_IMAGES)
def test_predict_image_rejected(make_image, fragment, shared_runs, tmp_path, capsys, caplog):
    image = make_image(tmp_path)
    outcome = run_cli(capsys, caplog, "predict", shared_runs.image_run, "--image", image, "--caption", "a circle")
    assert_rejected(outcome, fragment.format(image=image))
    assert "predicted:" not in outcome.out


# ----------------------------------------------------------------------------- 5. checkpoints

UNPICKLED: list = []  # filled by PickledPayload.__setstate__ if a checkpoint load ever runs pickled code


class PickledPayload:
    """Object that a weights-only load must reject. Unpickling it appends its state to UNPICKLED."""

    def __init__(self) -> None:
        self.note = "pickled by test_bad_inputs"

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append(state)
        self.__dict__.update(state)


def pickled_object(run_dir: Path, shared: SharedRuns) -> None:
    torch.save({"model": {}, "payload": PickledPayload()}, run_dir / "best.pt")


def other_architecture(run_dir: Path, shared: SharedRuns) -> None:
    shutil.copy(shared.caption_run / "best.pt", run_dir / "best.pt")


def other_label_set(run_dir: Path, shared: SharedRuns) -> None:
    shutil.copy(shared.shifted_run / "best.pt", run_dir / "best.pt")


def resized_weight(run_dir: Path, shared: SharedRuns) -> None:
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    name = next(iter(checkpoint["model"]))
    checkpoint["model"][name] = checkpoint["model"][name][:1]
    torch.save(checkpoint, run_dir / "best.pt")


def truncated_checkpoint(run_dir: Path, shared: SharedRuns) -> None:
    path = run_dir / "best.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# Rows of (change to a copy of the cnn2 run, expected log fragments). `predict` stops before predicting.
CHECKPOINTS_REJECTED = [
    pytest.param(pickled_object, ["cannot be loaded as a weights-only checkpoint", "PickledPayload",
                                  "It may be damaged or contain pickled objects"], id="pickled-object"),
    pytest.param(other_architecture, ["checkpoint is for model 'caption_only' but config.json says 'cnn2'",
                                      "the run folder mixes files from different runs"], id="other-architecture"),
    pytest.param(other_label_set, ["checkpoint label set [11, 12, 13, 14, 15] differs from config.json "
                                   "[1, 2, 3, 4, 5]"], id="other-label-set"),
    pytest.param(resized_weight, ["weights do not fit the model described in config.json"], id="resized-weight"),
    pytest.param(truncated_checkpoint, ["cannot be loaded as a weights-only checkpoint"], id="truncated-file"),
    pytest.param(lambda run_dir, shared: (run_dir / "best.pt").write_bytes(b""),
                 ["cannot be loaded as a weights-only checkpoint"], id="empty-file"),
    pytest.param(lambda run_dir, shared: torch.save({"weights": torch.zeros(3)}, run_dir / "best.pt"),
                 ["not a checkpoint written by this program (no 'model' entry)"], id="no-model-entry"),
    pytest.param(lambda run_dir, shared: (run_dir / "best.pt").unlink(),
                 ["not found; the run may not have finished an epoch yet"], id="missing-file"),
]


@pytest.mark.parametrize(("change", "fragments"), CHECKPOINTS_REJECTED)
def test_checkpoint_rejected(change, fragments, shared_runs, tmp_path, capsys, caplog):
    run_dir = tmp_path / "image"
    shutil.copytree(shared_runs.image_run, run_dir)
    change(run_dir, shared_runs)
    UNPICKLED.clear()
    outcome = run_cli(capsys, caplog, "predict", run_dir, "--image", shared_runs.dataset / "data" / "0.jpg",
                      "--caption", "a circle")
    assert_rejected(outcome, f"{run_dir / 'best.pt'}", *fragments)
    assert "predicted:" not in outcome.out
    assert UNPICKLED == [], "loading the checkpoint ran pickled code"


# ----------------------------------------------------------------------------- 6. run names


def existing_run_name(runs: Path) -> str:
    (runs / "taken").mkdir(parents=True)
    (runs / "taken" / "marker.txt").write_text("keep\n", encoding="utf-8")
    return "taken"


# Rows of (builder of the --run-name value from the runs folder, expected log fragment).
RUN_NAMES_REJECTED = [
    pytest.param(lambda runs: "../escape", "invalid run name '../escape'", id="parent-folder"),
    pytest.param(lambda runs: str(runs.parent / "absolute"), "invalid run name", id="absolute-path"),
    pytest.param(lambda runs: "..", "invalid run name '..'", id="dot-dot"),
    pytest.param(lambda runs: "a/b", "invalid run name 'a/b'", id="nested"),
    pytest.param(lambda runs: "r" * 101, "at most 100 characters", id="too-long"),
    pytest.param(existing_run_name, "already exists; choose another --run-name", id="existing-run"),
]


@pytest.mark.parametrize(("make_name", "fragment"), RUN_NAMES_REJECTED)
def test_run_name_rejected(make_name, fragment, dataset, tmp_path, capsys, caplog):
    runs = tmp_path / "runs"
    name = make_name(runs)
    before = files_under(tmp_path)
    outcome = run_cli(capsys, caplog, "train", "--data", dataset, *SMALL_TRAINING, "--runs-dir", runs,
                      "--run-name", name, "--model", "caption_only")
    assert_rejected(outcome, fragment)
    assert files_under(tmp_path) == before
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "absolute").exists()
    if (runs / "taken").exists():
        assert files_under(runs / "taken") == {"marker.txt"}


# Builders of the --resume value from the test's tmp_path. The working directory is the runs folder.
RESUME_OUTSIDE = [
    pytest.param(lambda base: "../nothing", id="parent-folder"),
    pytest.param(lambda base: str(base / "elsewhere"), id="absolute-path"),
    pytest.param(lambda base: "..", id="dot-dot"),
]


@pytest.mark.parametrize("make_run", RESUME_OUTSIDE)
def test_resume_outside_runs_rejected(make_run, tmp_path, capsys, caplog, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.chdir(runs)
    run = make_run(tmp_path)
    before = files_under(tmp_path)
    outcome = run_cli(capsys, caplog, "train", "--resume", run, "--runs-dir", runs)
    assert_rejected(outcome, f"run {run!r} not found: no config.json in")
    assert files_under(tmp_path) == before


# ----------------------------------------------------------------------------- 7. found by trying to break the product


def test_unclosed_quote_beyond_csv_field_limit(dataset, tmp_path, capsys, caplog):
    # More than 131,072 characters after the open quote: the csv module's default limit.
    lines = csv_lines(dataset)
    filler = [f"{24 + index}.jpg,1,A caption that is long enough to fill the file quickly." for index in range(3000)]
    lines[4] = '3.jpg,3 4,"A drawing with an open quote'
    write_lines(dataset, lines + filler)
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_rejected(outcome, "line 5 (3.jpg): the caption opens a quote that is not closed")


def test_caption_longer_than_csv_field_limit(dataset, tmp_path, capsys, caplog):
    set_line(dataset, 5, '3.jpg,3 4,"' + "a long caption " * 12_000 + '"')
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_trained(outcome, tmp_path / "runs" / "r", TRAIN_ROWS)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("Label,Name\n1,circle\n2\n3,triangle\n", "line 3 ('2,') is invalid; expected columns Label,Name"),
        ("Label,Name\n1,circle\n1,disc\n", "line 3 names label 1 again"),
        ("Label,Name\n1,\n", "line 2 ('1,') is invalid"),
        ("Label,Name\n1,carr\xe9\n".encode("latin-1"), "labels.csv: not valid UTF-8 text"),
    ],
    ids=["missing-name", "duplicate-label", "empty-name", "latin-1"],
)
def test_labels_csv_rejected(dataset, tmp_path, capsys, caplog, content, fragment):
    path = dataset / "labels.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_rejected(outcome, fragment)


def test_labels_csv_gaps_named_by_id(dataset, tmp_path, capsys, caplog):
    (dataset / "labels.csv").write_text("Label,Name\n1,circle\n", encoding="utf-8")
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    config = assert_trained(outcome, tmp_path / "runs" / "r", TRAIN_ROWS)
    assert config["label_names"]["1"] == "circle"
    assert config["label_names"]["2"] == "label 2"  # not the COCO name "bicycle"


def test_empty_test_csv_does_not_block_training(dataset, tmp_path, capsys, caplog):
    (dataset / "test.csv").write_bytes(b"")
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_trained(outcome, tmp_path / "runs" / "r", TRAIN_ROWS)
    assert "test.csv: the file is empty; expected a header line ImageID,Caption" in outcome.log
    assert "only submit needs test.csv" in outcome.log


@pytest.mark.parametrize("separator", [";", "\t"], ids=["semicolons", "tabs"])
def test_other_separator_named(dataset, tmp_path, capsys, caplog, separator):
    write_lines(dataset, [line.replace(",", separator, 2) for line in csv_lines(dataset)])
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_rejected(outcome, f"The file seems to use {separator!r} between fields; save it with commas.")


def test_dataset_path_is_a_file(dataset, tmp_path, capsys, caplog):
    outcome = train(capsys, caplog, dataset / "train.csv", tmp_path / "runs", model="caption_only")
    assert_rejected(outcome, "train.csv is a file; pass the folder that contains train.csv")


def test_full_disk_while_saving_named(dataset, tmp_path, capsys, caplog, monkeypatch):
    import errno

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 65852096 vs 65851988")

    monkeypatch.setattr(torch, "save", full_disk)
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert_rejected(outcome, "could not write", "last.pt", "free some space and try again")
    assert not list((tmp_path / "runs" / "r").glob(".*.tmp"))
    assert errno.ENOSPC  # the real error is ENOSPC, which torch reports as this RuntimeError


def test_run_files_follow_umask(dataset, tmp_path, capsys, caplog):
    outcome = train(capsys, caplog, dataset, tmp_path / "runs", model="caption_only")
    assert outcome.code == 0
    expected = 0o666 & ~_current_umask()
    for name in ("config.json", "metrics.json", "best.pt", "last.pt"):
        assert (tmp_path / "runs" / "r" / name).stat().st_mode & 0o777 == expected, name


def _current_umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_evaluate_csv_lists_every_unreadable_image(shared_runs, tmp_path, capsys, caplog):
    images = tmp_path / "data"
    shutil.copytree(shared_runs.dataset / "data", images)
    (images / "1.jpg").write_bytes(b"")
    (images / "2.jpg").write_text("not an image")
    labelled = write_labelled_csv(shared_runs, tmp_path / "labelled.csv", {})
    outcome = run_cli(capsys, caplog, "evaluate", shared_runs.image_run, "--csv", labelled, "--images", images)
    assert_rejected(outcome, "2 unreadable image(s)", "line 3 (1.jpg): empty file (0 bytes)",
                    "line 4 (2.jpg): not an image file")


def test_evaluate_header_only_csv(shared_runs, tmp_path, capsys, caplog):
    labelled = tmp_path / "empty.csv"
    labelled.write_text("ImageID,Labels,Caption\n", encoding="utf-8")
    outcome = run_cli(capsys, caplog, "evaluate", shared_runs.image_run, "--csv", labelled)
    assert_rejected(outcome, "header only, no rows to evaluate on")
