"""Tests for core.datasets: CSV reading, label names, splits, image decoding, transforms, Dataset."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.datasets import (
    AUGMENTATIONS,
    CaptionedImages,
    DatasetError,
    ImageChecks,
    build_transform,
    channel_stats,
    check_image,
    collate_rows,
    load_dataset,
    open_image,
    read_label_names,
    read_table,
    resolve_image_path,
    split_indices,
    targets_from_labels,
)
from core.encoder import TRIGRAM_DIM, CaptionBatch

HYDRANT_CAPTION = 'A yellow and blue fire hydrant that has falling into the street with caution" tape around it."'


def _write(path: Path, text: str) -> Path:
    """Write `text` as UTF-8 exactly as given (no newline translation)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def _read_with_csv_module(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.reader(handle))[1:]


def _resave_with_trailing_column(source: Path, target: Path, bom: bool) -> Path:
    """Copy a CSV with CRLF line ends and an empty last column, as a spreadsheet export writes it."""
    text = source.read_bytes().decode("utf-8-sig")
    # Split on CRLF or LF only, because some quoted captions contain bare carriage returns.
    lines = re.split(r"\r\n|\n", text)
    while lines and lines[-1] == "":
        lines.pop()
    body = "".join(line + ",\r\n" for line in lines)
    return _write(target, ("\ufeff" if bom else "") + body)


def _solid_image(path: Path, colour, size=(10, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


# ----------------------------------------------------------------------------- the real train.csv


def test_read_table_real_file_row_count(captions_csv):
    frame = read_table(captions_csv)
    assert len(frame) == 30000
    assert list(frame.columns) == ["ImageID", "Labels", "Caption", "line"]
    assert frame["ImageID"].is_unique


def test_read_table_real_file_label_counts(captions_csv):
    frame = read_table(captions_csv)
    labels = sorted({label for row_labels in frame["Labels"] for label in row_labels})
    assert sum(1 in row_labels for row_labels in frame["Labels"]) == 22797
    assert len(labels) == 18
    assert 12 not in labels
    assert labels == [label for label in range(1, 20) if label != 12]


def test_read_table_real_file_doubled_quotes(captions_csv):
    frame = read_table(captions_csv)
    row = frame[frame["ImageID"] == "552.jpg"]
    assert len(row) == 1
    assert row["Caption"].iloc[0] == HYDRANT_CAPTION
    assert row["Labels"].iloc[0] == [11]


def test_read_table_real_file_comma_captions(captions_csv):
    frame = read_table(captions_csv).set_index("ImageID")
    expected = {row[0]: row[2] for row in _read_with_csv_module(captions_csv)}
    # Each of these captions has commas inside a quoted field.
    for image_id in ("173.jpg", "216.jpg", "334.jpg", "1814.jpg"):
        assert "," in frame.at[image_id, "Caption"], image_id
        assert frame.at[image_id, "Caption"] == expected[image_id], image_id
    assert frame.at["173.jpg", "Caption"] == "A room with a rug, table, and chairs, and other items"


def test_read_table_matches_csv_module(captions_csv):
    frame = read_table(captions_csv)
    rows = _read_with_csv_module(captions_csv)
    assert frame["ImageID"].tolist() == [row[0] for row in rows]
    assert frame["Caption"].tolist() == [row[2].strip() for row in rows]
    assert frame["Labels"].tolist() == [sorted({int(token) for token in row[1].split()}) for row in rows]


def test_load_dataset_real_caption_folder(captions_csv):
    dataset = load_dataset(captions_csv.parent)
    assert dataset.image_dir is None
    assert not dataset.has_images
    assert dataset.test is None
    assert len(dataset.labels) == 18
    assert dataset.label_names[1] == "person"
    assert dataset.label_names[19] == "horse"
    assert dataset.label_names[11] == "fire hydrant"


@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf-bom"])
def test_read_table_spreadsheet_resave_identical(captions_csv, tmp_path, bom):
    resaved = _resave_with_trailing_column(captions_csv, tmp_path / "train.csv", bom=bom)
    assert resaved.read_bytes().startswith(("\ufeff" if bom else "").encode() + b"ImageID,Labels,Caption,\r\n")
    original = read_table(captions_csv)
    assert resaved.read_bytes().count(b",\r\n") == len(original) + 1
    copy = read_table(resaved)
    assert len(copy) == len(original)
    assert copy["ImageID"].tolist() == original["ImageID"].tolist()
    assert copy["Labels"].tolist() == original["Labels"].tolist()
    assert copy["Caption"].tolist() == original["Caption"].tolist()


# ----------------------------------------------------------------------------- small generated CSVs


def test_read_table_basic_rows(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n0.jpg,1,A woman.\n1.jpg,19 1 1,Two horses\n")
    frame = read_table(path)
    assert frame["ImageID"].tolist() == ["0.jpg", "1.jpg"]
    assert frame["Labels"].tolist() == [[1], [1, 19]]
    assert frame["Caption"].tolist() == ["A woman.", "Two horses"]
    assert frame["line"].tolist() == [2, 3]


def test_read_table_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_table(tmp_path / "nothing.csv")


def test_read_table_empty_file(tmp_path):
    path = _write(tmp_path / "train.csv", "")
    with pytest.raises(DatasetError, match="the file is empty") as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_read_table_bom_only_file(tmp_path):
    path = _write(tmp_path / "train.csv", "\ufeff")
    with pytest.raises(DatasetError, match="the file is empty"):
        read_table(path)


def test_load_dataset_header_only(tmp_path):
    _write(tmp_path / "train.csv", "ImageID,Labels,Caption\r\n")
    with pytest.raises(DatasetError, match="header only, no rows") as error:
        load_dataset(tmp_path)
    assert str(tmp_path / "train.csv") in str(error.value)


def test_load_dataset_empty_train_file(tmp_path):
    _write(tmp_path / "train.csv", "")
    with pytest.raises(DatasetError, match="the file is empty"):
        load_dataset(tmp_path)


def test_load_dataset_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder"):
        load_dataset(tmp_path / "absent")


def test_load_dataset_missing_train_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv not found"):
        load_dataset(tmp_path)


def test_read_table_missing_labels_column(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Caption\n1.jpg,a cat\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) Labels") as error:
        read_table(path)
    assert str(path) in str(error.value)
    assert "ImageID,Labels,Caption" in str(error.value)


def test_read_table_test_file_no_labels(tmp_path):
    path = _write(tmp_path / "test.csv", "ImageID,Caption\n1.jpg,a cat\n2.jpg,a dog\n")
    frame = read_table(path, require_labels=False)
    assert frame["ImageID"].tolist() == ["1.jpg", "2.jpg"]
    assert frame["Labels"].tolist() == [[], []]
    assert frame["Caption"].tolist() == ["a cat", "a dog"]


def test_read_table_misspelt_columns(tmp_path):
    path = _write(tmp_path / "train.csv", "Image_ID,Lables,Caption\n1.jpg,1,a cat\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) ImageID, Labels") as error:
        read_table(path)
    assert "Lables" in str(error.value)
    assert str(path) in str(error.value)


def test_read_table_header_case_whitespace(tmp_path):
    path = _write(tmp_path / "train.csv", " imageid ,LABELS,  caption \n1.jpg,3,a car\n")
    frame = read_table(path)
    assert frame["ImageID"].tolist() == ["1.jpg"]
    assert frame["Labels"].tolist() == [[3]]
    assert frame["Caption"].tolist() == ["a car"]


def test_read_table_reordered_columns(tmp_path):
    path = _write(tmp_path / "train.csv", "Caption,ImageID,Labels\n\"a cat, a dog\",1.jpg,17 18\n")
    frame = read_table(path)
    assert frame["ImageID"].tolist() == ["1.jpg"]
    assert frame["Labels"].tolist() == [[17, 18]]
    assert frame["Caption"].tolist() == ["a cat, a dog"]


def test_read_table_non_integer_label(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n0.jpg,1,ok\n1.jpg,1 dog,a dog\n")
    with pytest.raises(DatasetError, match=r"line 3 \(1\.jpg\): label 'dog' is not an integer") as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_read_table_empty_labels_train(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n0.jpg,1,ok\n1.jpg,,no labels here\n")
    with pytest.raises(DatasetError, match=r"line 3 \(1\.jpg\): no labels") as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_read_table_empty_labels_test_allowed(tmp_path):
    path = _write(tmp_path / "test.csv", "ImageID,Labels,Caption\n0.jpg,,a cat\n1.jpg,  ,a dog\n")
    frame = read_table(path, require_labels=False)
    assert frame["Labels"].tolist() == [[], []]
    assert frame["Caption"].tolist() == ["a cat", "a dog"]


def test_read_table_test_file_bad_label(tmp_path):
    # Labels may be absent in a test file, but present ones must still be integers.
    path = _write(tmp_path / "test.csv", "ImageID,Labels,Caption\n0.jpg,x,a cat\n")
    with pytest.raises(DatasetError, match="line 2 .*label 'x' is not an integer"):
        read_table(path, require_labels=False)


def test_load_dataset_test_csv_without_labels(tmp_path):
    _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n0.jpg,1,a person\n1.jpg,19,a horse\n")
    _write(tmp_path / "test.csv", "ImageID,Labels,Caption\n2.jpg,,a cat\n3.jpg,,\n")
    dataset = load_dataset(tmp_path)
    assert dataset.test is not None
    assert dataset.test["ImageID"].tolist() == ["2.jpg", "3.jpg"]
    assert dataset.test["Labels"].tolist() == [[], []]
    assert dataset.test["Caption"].tolist() == ["a cat", ""]
    assert dataset.labels == [1, 19]


def test_read_table_duplicate_image_id(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n1.jpg,1,a\n2.jpg,1,b\n1.jpg,2,c\n")
    with pytest.raises(DatasetError, match=r"line 4 \(1\.jpg\): duplicate ImageID \(first on line 2\)") as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_read_table_collects_skipped_rows(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n1.jpg,1,a\n2.jpg,x,b\n1.jpg,2,c\n3.jpg,3,d\n")
    skipped = []
    frame = read_table(path, skipped=skipped)
    assert frame["ImageID"].tolist() == ["1.jpg", "3.jpg"]
    assert [(row.file, row.line, row.image_id) for row in skipped] == [("train.csv", 3, "2.jpg"), ("train.csv", 4, "1.jpg")]
    assert "not an integer" in skipped[0].reason
    assert "duplicate ImageID (first on line 2)" in skipped[1].reason


def test_read_table_unclosed_quote_raises_even_when_skipping(tmp_path):
    # The rows after an unclosed quote cannot be distinguished, so skipping it would lose them silently.
    path = _write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n1.jpg,1,"a cat\n2.jpg,1,a dog\n3.jpg,2,a cow\n')
    with pytest.raises(DatasetError, match="opens a quote that is not closed"):
        read_table(path, skipped=[])


def test_read_table_empty_image_id(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n  ,1,a\n")
    with pytest.raises(DatasetError, match="line 2: empty ImageID"):
        read_table(path)


def test_read_table_lists_every_bad_row(tmp_path):
    # Problems are collected so that one message lists all of them.
    path = _write(
        tmp_path / "train.csv",
        "ImageID,Labels,Caption\n0.jpg,x,a\n1.jpg,1,b\n2.jpg,,c\n1.jpg,1,d\n",
    )
    with pytest.raises(DatasetError, match=r"3 invalid row\(s\)") as error:
        read_table(path)
    message = str(error.value)
    assert "line 2 (0.jpg)" in message
    assert "line 4 (2.jpg)" in message
    assert "line 5 (1.jpg): duplicate" in message


def test_read_table_many_bad_rows_truncated(tmp_path):
    rows = "".join(f"{index}.jpg,bad,caption\n" for index in range(25))
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n" + rows)
    with pytest.raises(DatasetError, match=r"25 invalid row\(s\)") as error:
        read_table(path)
    message = str(error.value)
    assert "line 21 (19.jpg)" in message
    assert "line 22 (20.jpg)" not in message
    assert "... and 5 more" in message


def test_read_table_unquoted_commas_joined(tmp_path, caplog):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n1.jpg,1 2,a man, a bike, and a dog\n2.jpg,3,a car\n")
    with caplog.at_level(logging.WARNING, logger="core.datasets"):
        frame = read_table(path)
    assert frame["Caption"].tolist() == ["a man, a bike, and a dog", "a car"]
    assert frame["Labels"].tolist() == [[1, 2], [3]]
    assert "1 row(s) had unquoted commas" in caplog.text


def test_read_table_unquoted_commas_not_last(tmp_path):
    # When Caption is not the last column, extra fields cannot be joined back safely.
    path = _write(tmp_path / "train.csv", "ImageID,Caption,Labels\n1.jpg,a cat, a dog,1\n")
    with pytest.raises(DatasetError, match=r"line 2 \(1\.jpg\): 4 fields, expected 3") as error:
        read_table(path)
    assert str(path) in str(error.value)


def test_read_table_embedded_newline_caption(tmp_path):
    path = _write(
        tmp_path / "train.csv",
        'ImageID,Labels,Caption\n0.jpg,1,first\n1.jpg,2,"a bike\nleaning, on a wall"\n2.jpg,3,after\n',
    )
    frame = read_table(path)
    assert frame["ImageID"].tolist() == ["0.jpg", "1.jpg", "2.jpg"]
    assert frame["Caption"].tolist() == ["first", "a bike\nleaning, on a wall", "after"]
    # `line` is the first line of each row, so the row after the two-line caption starts on line 5.
    assert frame["line"].tolist() == [2, 3, 5]


def test_read_table_embedded_newline_error_line(tmp_path):
    path = _write(
        tmp_path / "train.csv",
        'ImageID,Labels,Caption\n0.jpg,1,"one\ntwo\nthree"\n1.jpg,x,bad\n',
    )
    with pytest.raises(DatasetError, match=r"line 5 \(1\.jpg\)"):
        read_table(path)


def test_read_table_blank_lines_skipped(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\r\n0.jpg,1,a\r\n\r\n1.jpg,2,b\r\n\r\n")
    frame = read_table(path)
    assert frame["ImageID"].tolist() == ["0.jpg", "1.jpg"]
    assert frame["line"].tolist() == [2, 4]


def test_read_table_non_ascii_caption(tmp_path):
    path = _write(tmp_path / "train.csv", "\ufeffImageID,Labels,Caption\r\n0.jpg,1,Un café à Zürich — “nice”\r\n")
    frame = read_table(path)
    assert frame["ImageID"].tolist() == ["0.jpg"]
    assert frame["Caption"].tolist() == ["Un café à Zürich — “nice”"]


def test_read_table_non_utf8_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"ImageID,Labels,Caption\n0.jpg,1,a caf\xe9 in Paris\n")
    with pytest.raises(DatasetError, match="not valid UTF-8") as error:
        read_table(path)
    assert str(path) in str(error.value)
    assert "re-save the file with UTF-8 encoding" in str(error.value)


def _latin1_file_after_8k(path: Path) -> tuple[Path, int, int]:
    """Write a CSV whose first invalid byte lies beyond the first 8 KiB.

    Returns the path, the file offset of the invalid byte and its line number.
    """
    header = b"ImageID,Labels,Caption\n"
    rows = b"".join(b"%d.jpg,1,a cat sitting on a mat number %d\n" % (index, index) for index in range(400))
    bad_row = b"400.jpg,1,a caf\xe9\n"
    path.write_bytes(header + rows + bad_row)
    offset = len(header) + len(rows) + bad_row.index(b"\xe9")
    return path, offset, 2 + 400


def test_read_table_non_utf8_byte_offset(tmp_path):
    path, offset, _ = _latin1_file_after_8k(tmp_path / "train.csv")
    assert offset > 8192
    with pytest.raises(DatasetError) as error:
        read_table(path)
    assert f"byte {offset}" in str(error.value)


def test_read_table_non_utf8_names_line(tmp_path):
    path, _, line = _latin1_file_after_8k(tmp_path / "train.csv")
    with pytest.raises(DatasetError) as error:
        read_table(path)
    assert f"line {line}" in str(error.value)


def test_read_table_extra_column_after_caption(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption,Source\n1.jpg,1,a cat,web\n")
    frame = read_table(path)
    assert frame["Caption"].tolist() == ["a cat"]


def test_read_table_unclosed_quote_keeps_rows(tmp_path):
    path = _write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n1.jpg,1,"a cat\n2.jpg,2,a dog\n3.jpg,3,a bird\n')
    # Either every row is kept or the bad row is reported. Silently losing rows 2 and 3 is wrong.
    try:
        frame = read_table(path)
    except DatasetError as error:
        assert "line 2" in str(error)
    else:
        assert frame["ImageID"].tolist() == ["1.jpg", "2.jpg", "3.jpg"]


def test_read_table_unclosed_quote_ids_without_extension(tmp_path):
    # ImageIDs without a file extension: the swallowed rows are recognised by their valid labels.
    rows = ["ImageID,Labels,Caption"] + [f"{index},{index % 5 + 1},caption {index}" for index in range(20)]
    rows[4] = '3,1,"open quote'
    path = _write(tmp_path / "train.csv", "\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"line 5 \(3\): the caption opens a quote that is not closed"):
        read_table(path)


def test_read_table_unclosed_quote_test_file(tmp_path):
    path = _write(tmp_path / "test.csv", 'ImageID,Caption\n1,"a cat\n2,a dog\n')
    with pytest.raises(DatasetError, match="line 2 .*runs into the next row \\('2'\\)"):
        read_table(path, require_labels=False)


def test_read_table_multiline_caption_with_comma_kept(tmp_path):
    # A real multi-line caption whose second line has a comma is not mistaken for a swallowed row.
    path = _write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n1.jpg,1,"a cat\nsitting, on a mat"\n2.jpg,2,dog\n')
    frame = read_table(path)
    assert frame["Caption"].tolist() == ["a cat\nsitting, on a mat", "dog"]
    assert frame["line"].tolist() == [2, 4]


def test_read_table_negative_label(tmp_path):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n1.jpg,1 -3,a cat\n")
    with pytest.raises(DatasetError, match=r"line 2 \(1\.jpg\): label '-3' is negative"):
        read_table(path)


def test_read_table_missing_caption_column_warns(tmp_path, caplog):
    path = _write(tmp_path / "train.csv", "ImageID,Labels,Captions\n1.jpg,1,a cat\n")
    frame = read_table(path)
    assert frame["Caption"].tolist() == [""]
    assert "no Caption column (other columns: ['Captions'])" in caplog.text


def test_image_problems_outside_folder_line(tmp_path):
    root = tmp_path / "set"
    _solid_image(root / "data" / "1.jpg", (1, 2, 3))
    _write(root / "train.csv", "ImageID,Labels,Caption\n1.jpg,1,a\n../x.jpg,1,b\n")
    folder = load_dataset(root)
    problems = folder.image_problems(folder.train)
    assert [(problem.line, problem.image_id) for problem in problems] == [(3, "../x.jpg")]
    assert re.match(r"line 3 \(\.\./x\.jpg\): ImageID '\.\./x\.jpg' points outside", problems[0].describe())


# ----------------------------------------------------------------------------- label names and targets


def test_read_label_names_coco_default(tmp_path):
    names = read_label_names(tmp_path, [1, 11, 19])
    assert names == {1: "person", 11: "fire hydrant", 19: "horse"}


def test_read_label_names_file_overrides(tmp_path):
    _write(tmp_path / "labels.csv", "Label,Name\n1, human \n")
    names = read_label_names(tmp_path, [1, 19])
    assert names[1] == "human"
    # With a labels.csv, its gaps are not filled with COCO names, which would mislabel another dataset's ids.
    assert names[19] == "label 19"


def test_read_label_names_non_coco_ids(tmp_path):
    # 12 is not a COCO id, so no id in the set gets a COCO name.
    names = read_label_names(tmp_path, [1, 12])
    assert names == {1: "label 1", 12: "label 12"}


def test_read_label_names_file_non_coco(tmp_path):
    _write(tmp_path / "labels.csv", "\ufeffLabel,Name\r\n100,widget\r\n")
    names = read_label_names(tmp_path, [1, 100])
    assert names[100] == "widget"
    assert names[1] == "label 1"


def test_read_label_names_invalid_file(tmp_path):
    path = _write(tmp_path / "labels.csv", "Label,Name\none,person\n")
    with pytest.raises(DatasetError, match="expected columns Label,Name with an integer label") as error:
        read_label_names(tmp_path, [1])
    assert str(path) in str(error.value)


def test_load_dataset_labels_csv_names(tmp_path):
    _write(tmp_path / "train.csv", "ImageID,Labels,Caption\n0.jpg,1 3,a\n1.jpg,3,b\n")
    _write(tmp_path / "labels.csv", "Label,Name\n3,automobile\n")
    dataset = load_dataset(tmp_path)
    assert dataset.labels == [1, 3]
    assert dataset.label_names == {1: "label 1", 3: "automobile"}


def test_targets_from_labels_matrix():
    targets = targets_from_labels([[1, 19], [3], [], [99]], [1, 3, 19])
    assert targets.dtype == np.float32
    assert targets.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]]


# ----------------------------------------------------------------------------- splits


def _random_targets(rows: int = 100, labels: int = 5, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((rows, labels)) < 0.3).astype(np.float32)


def _both_sides(targets: np.ndarray, train: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Boolean per label: True where the label has a row in train and a row in validation."""
    return (targets[train].sum(axis=0) > 0) & (targets[val].sum(axis=0) > 0)


def test_split_indices_same_seed_same_split():
    targets = _random_targets()
    first_train, first_val = split_indices(targets, 0.2, seed=7)
    second_train, second_val = split_indices(targets, 0.2, seed=7)
    assert first_train.tolist() == second_train.tolist()
    assert first_val.tolist() == second_val.tolist()


def test_split_indices_other_seed_differs():
    targets = _random_targets()
    _, first_val = split_indices(targets, 0.2, seed=7)
    _, second_val = split_indices(targets, 0.2, seed=8)
    assert first_val.tolist() != second_val.tolist()


def test_split_indices_disjoint_and_covering():
    targets = _random_targets(rows=57)
    train, val = split_indices(targets, 0.3, seed=1)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(57))
    assert train.tolist() == sorted(train.tolist())
    assert val.tolist() == sorted(val.tolist())


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_split_indices_validation_size(fraction):
    # Five labels force at most five rows into validation, fewer than the target, so the size is exact.
    targets = _random_targets(rows=200)
    _, val = split_indices(targets, fraction, seed=3)
    assert len(val) == round(200 * fraction)


def test_split_indices_real_file_labels(captions_csv):
    frame = read_table(captions_csv)
    labels = sorted({label for row_labels in frame["Labels"] for label in row_labels})
    targets = targets_from_labels(frame["Labels"], labels)
    train, val = split_indices(targets, 0.2, seed=0)
    assert len(val) == 6000
    assert len(train) == 24000
    assert _both_sides(targets, train, val).all()


@pytest.mark.parametrize("seed", range(10))
def test_split_indices_pair_labels_both_sides(seed):
    # Labels 0..3 each occur on exactly two rows, in disjoint pairs. Label 4 is common.
    targets = np.zeros((30, 5), dtype=np.float32)
    for label in range(4):
        targets[[2 * label, 2 * label + 1], label] = 1
    targets[8:, 4] = 1
    targets[::3, 4] = 1
    train, val = split_indices(targets, 0.2, seed=seed)
    assert _both_sides(targets, train, val).all()


def test_split_indices_overlapping_pair_labels():
    targets = np.zeros((8, 3), dtype=np.float32)
    targets[[0, 1], 0] = 1
    targets[[2, 3], 1] = 1
    targets[[0, 2], 2] = 1
    # Greedy placement alone strands label C for half of these seeds.
    for seed in range(20):
        train, val = split_indices(targets, 0.25, seed=seed)
        assert _both_sides(targets, train, val).all(), f"seed {seed}"


def test_split_indices_single_row_label():
    targets = _random_targets(rows=20, labels=3)
    single = np.zeros((20, 1), dtype=np.float32)
    single[5, 0] = 1
    targets = np.hstack([targets, single])
    train, val = split_indices(targets, 0.25, seed=0)
    assert sorted(train.tolist() + val.tolist()) == list(range(20))
    assert len(val) == 5


def test_split_indices_two_rows():
    train, val = split_indices(np.array([[1.0], [1.0]]), 0.5, seed=0)
    assert len(train) == 1
    assert len(val) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_indices_invalid_fraction(fraction):
    with pytest.raises(ValueError, match="invalid validation fraction"):
        split_indices(_random_targets(), fraction, seed=0)


def test_split_indices_one_row():
    with pytest.raises(DatasetError, match="cannot be split"):
        split_indices(np.ones((1, 2), dtype=np.float32), 0.2, seed=0)


# ----------------------------------------------------------------------------- image paths


def test_resolve_image_path_inside(tmp_path):
    image_dir = tmp_path / "data"
    image_dir.mkdir()
    assert resolve_image_path(image_dir, "1.jpg") == (image_dir / "1.jpg").resolve()
    assert resolve_image_path(image_dir, "sub/../2.jpg") == (image_dir / "2.jpg").resolve()


def test_resolve_image_path_parent_escape(tmp_path):
    image_dir = tmp_path / "data"
    image_dir.mkdir()
    with pytest.raises(DatasetError, match=r"ImageID '\.\./x\.jpg' points outside"):
        resolve_image_path(image_dir, "../x.jpg")


def test_resolve_image_path_absolute(tmp_path):
    image_dir = tmp_path / "data"
    image_dir.mkdir()
    with pytest.raises(DatasetError, match="points outside"):
        resolve_image_path(image_dir, str(tmp_path / "x.jpg"))
    # Absolute paths are rejected even when they lead into the folder.
    with pytest.raises(DatasetError, match="points outside"):
        resolve_image_path(image_dir, str(image_dir / "x.jpg"))


def test_resolve_image_path_folder_itself(tmp_path):
    image_dir = tmp_path / "data"
    image_dir.mkdir()
    with pytest.raises(DatasetError, match="points outside"):
        resolve_image_path(image_dir, ".")


def test_resolve_image_path_symlink_outside(tmp_path):
    image_dir = tmp_path / "data"
    image_dir.mkdir()
    outside = _solid_image(tmp_path / "secret.png", (1, 2, 3))
    (image_dir / "link.jpg").symlink_to(outside)
    with pytest.raises(DatasetError, match=r"ImageID 'link\.jpg' points outside"):
        resolve_image_path(image_dir, "link.jpg")


# ----------------------------------------------------------------------------- decoding images


def test_open_image_grayscale(tmp_path):
    path = _solid_image(tmp_path / "gray.png", 77, mode="L")
    image = open_image(path)
    assert image.mode == "RGB"
    assert image.size == (10, 6)
    assert np.asarray(image)[0, 0].tolist() == [77, 77, 77]


def test_open_image_cmyk_jpeg(tmp_path):
    # CMYK (0, 255, 255, 0) is pure red.
    path = _solid_image(tmp_path / "cmyk.jpg", (0, 255, 255, 0), size=(16, 16), mode="CMYK")
    assert Image.open(path).mode == "CMYK"
    image = open_image(path)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=int)[8, 8] - [255, 0, 0]).max() <= 8


def test_open_image_palette_transparency(tmp_path):
    path = tmp_path / "palette.png"
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (3 * 254))
    palette_image.putpixel((0, 0), 0)
    palette_image.putpixel((1, 0), 1)
    palette_image.save(path, transparency=0)
    image = open_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert np.asarray(image)[0, 1].tolist() == [255, 0, 0]


def test_open_image_rgba_on_white(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    rgba.save(path)
    pixels = np.asarray(open_image(path))
    assert open_image(path).mode == "RGB"
    assert pixels[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white
    assert pixels[0, 1].tolist() == [0, 0, 255]
    assert np.abs(pixels[0, 2].astype(int) - 127).max() <= 1  # half-transparent black on white


def test_open_image_16bit_grayscale(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    image = open_image(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels[0, 0].tolist() == [0, 0, 0]
    assert pixels[0, 1].tolist() == [255, 255, 255]
    assert pixels[1, 0].tolist() == [128, 128, 128]


def test_open_image_png_named_jpg(tmp_path):
    path = tmp_path / "really_png.jpg"
    Image.new("RGB", (5, 4), (10, 20, 30)).save(path, format="PNG")
    image = open_image(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, 0].tolist() == [10, 20, 30]


def test_open_image_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (16, 8), (200, 100, 50)).save(path, exif=exif)
    assert Image.open(path).size == (16, 8)
    assert Image.open(path).getexif()[0x0112] == 6
    image = open_image(path)
    assert image.mode == "RGB"
    assert image.size == (8, 16)


@pytest.mark.parametrize(
    "name, content, reason",
    [("empty.jpg", b"", "empty file (0 bytes)"),
     ("notes.jpg", b"this is not an image\n", "not an image file Pillow can read")],
    ids=["zero-byte", "text"],
)
def test_open_image_not_an_image(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {reason}")):
        open_image(path)
    assert check_image(path).startswith(reason)


def test_open_image_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        open_image(truncated)


def test_check_image_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    assert check_image(full) is None
    assert "truncated" in check_image(truncated)


@pytest.mark.parametrize("format", ["PNG", "WEBP"])
def test_open_image_other_format_behind_jpg_name(tmp_path, format):
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (6, 4), (0, 128, 255)).save(path, format=format, lossless=True)
    assert check_image(path) is None
    assert np.asarray(open_image(path))[0, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "size, reason",
    # Pillow itself refuses the larger one on opening; the smaller one only makes it warn.
    [((20_000, 20_000), "400,000,000 pixels is more than"), ((10_000, 10_000), "10000 x 10000 pixels is more than")],
    ids=["beyond-pillow-limit", "between-limits"],
)
def test_open_image_decompression_bomb_rejected(tmp_path, size, reason):
    # A 1-bit PNG of this size is a few kilobytes but would decode to gigabytes of RGB.
    path = tmp_path / "bomb.png"
    Image.new("1", size).save(path, optimize=True)
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError, match=re.escape(f"bomb.png: {reason} the 89,478,485 allowed")):
        open_image(path)
    assert check_image(path).startswith(reason)


def test_image_checks_cache_reused_and_invalidated(tmp_path):
    good = _solid_image(tmp_path / "a.png", (1, 2, 3))
    cache = tmp_path / "cache" / "checks.json"
    assert ImageChecks(cache).check([good]) == [None]
    assert cache.is_file()

    # A second instance reads the result from the file instead of decoding the image again.
    known = json.loads(cache.read_text())
    known[str(good)][-1] = "remembered"  # the entry ends with the check result
    cache.write_text(json.dumps(known))
    assert ImageChecks(cache).check([good]) == ["remembered"]

    # Changing the file (its size and time) invalidates the stored result.
    good.write_bytes(b"no longer an image, and a different size")
    assert ImageChecks(cache).check([good])[0].startswith("not an image file")


def test_image_checks_unreadable_cache_ignored(tmp_path, caplog):
    good = _solid_image(tmp_path / "a.png", (1, 2, 3))
    cache = tmp_path / "checks.json"
    cache.write_text("{not json")
    assert ImageChecks(cache).check([good]) == [None]
    assert "ignored the unreadable image check cache" in caplog.text


def test_unused_images_lists_files_without_rows(tmp_path):
    root = tmp_path / "set"
    for name in ("1.jpg", "2.jpg", "extra.jpg", "sub/3.jpg"):
        _solid_image(root / "data" / name, (1, 2, 3))
    (root / "data" / ".DS_Store").write_bytes(b"")
    _write(root / "train.csv", "ImageID,Labels,Caption\n1.jpg,1,a\nsub/3.jpg,1,b\n")
    _write(root / "test.csv", "ImageID,Caption\n2.jpg,c\n")
    assert load_dataset(root).unused_images() == ["extra.jpg"]


def test_open_image_real_photos(coco_mini):
    paths = sorted((coco_mini / "data").glob("*.jpg"))[:5]
    assert paths
    for path in paths:
        image = open_image(path)
        assert image.mode == "RGB", path
        assert min(image.size) > 0, path


# ----------------------------------------------------------------------------- statistics and transforms


def test_channel_stats_solid_colours(tmp_path):
    # Red and blue images of different sizes, so red and blue are 1 on half the pixels and 0 on the rest.
    red = _solid_image(tmp_path / "red.png", (255, 0, 0), size=(10, 6))
    blue = _solid_image(tmp_path / "blue.png", (0, 0, 255), size=(7, 13))
    mean, std = channel_stats([red, blue], image_size=4)
    assert mean == pytest.approx([0.5, 0.0, 0.5], abs=1e-6)
    assert std == pytest.approx([0.5, 0.0, 0.5], abs=1e-5)


def test_channel_stats_gray_levels(tmp_path):
    # Gray 51 and 153 are 0.2 and 0.6 on the [0, 1] scale, so the mean is 0.4 and the std 0.2.
    dark = _solid_image(tmp_path / "dark.png", (51, 51, 51))
    light = _solid_image(tmp_path / "light.png", (153, 153, 153))
    mean, std = channel_stats([dark, light], image_size=5)
    assert mean == pytest.approx([0.4, 0.4, 0.4], abs=1e-6)
    assert std == pytest.approx([0.2, 0.2, 0.2], abs=1e-6)


def test_channel_stats_sampling_max_images(tmp_path):
    paths = [_solid_image(tmp_path / f"{value}.png", (value, value, value)) for value in (0, 255)]
    mean, std = channel_stats(paths, image_size=3, max_images=1, seed=0)
    again, _ = channel_stats(paths, image_size=3, max_images=1, seed=0)
    assert mean == again
    assert mean[0] in (pytest.approx(0.0, abs=1e-9), pytest.approx(1.0, abs=1e-9))
    assert std == pytest.approx([0.0, 0.0, 0.0], abs=1e-5)


def test_channel_stats_no_paths():
    with pytest.raises(ValueError, match="no images"):
        channel_stats([], image_size=8)


def test_build_transform_normalises():
    image = torch.tensor([[[0, 255], [51, 102]]] * 3, dtype=torch.uint8)  # (3, 2, 2)
    transform = build_transform([0.2, 0.4, 0.6], [0.5, 0.25, 0.1])
    output = transform(image)
    scaled = image.to(torch.float64) / 255.0
    expected = torch.stack([(scaled[0] - 0.2) / 0.5, (scaled[1] - 0.4) / 0.25, (scaled[2] - 0.6) / 0.1])
    assert output.dtype == torch.float32
    assert output.shape == (3, 2, 2)
    torch.testing.assert_close(output.to(torch.float64), expected, rtol=1e-5, atol=1e-5)


def test_build_transform_deterministic():
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    transform = build_transform([0.5] * 3, [0.25] * 3)
    assert torch.equal(transform(image), transform(image))


def test_build_transform_unknown_augmentation():
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['rotate'\]; choose from hflip"):
        build_transform([0.5] * 3, [0.5] * 3, ["hflip", "rotate"])


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_build_transform_each_augmentation(name):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    output = build_transform([0.5] * 3, [0.25] * 3, [name])(image)
    assert output.shape == (3, 8, 8)
    assert output.dtype == torch.float32
    # Standardised values stay within what (0 - 0.5) / 0.25 and (1 - 0.5) / 0.25 allow.
    assert float(output.min()) >= -2.0 - 1e-5
    assert float(output.max()) <= 2.0 + 1e-5


def test_build_transform_all_augmentations():
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    output = build_transform([0.5] * 3, [0.25] * 3, AUGMENTATIONS)(image)
    assert output.shape == (3, 4, 4)


# ----------------------------------------------------------------------------- Dataset and collate


def test_captioned_images_with_images(tmp_path):
    paths = [
        _solid_image(tmp_path / "a.png", (255, 0, 0), size=(10, 6)),
        _solid_image(tmp_path / "b.png", (0, 255, 0), size=(5, 9)),
        _solid_image(tmp_path / "c.png", 128, size=(3, 3), mode="L"),
    ]
    targets = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    transform = build_transform([0.5] * 3, [0.5] * 3)
    dataset = CaptionedImages(paths, ["a red square", "", "gray"], targets, image_size=8, transform=transform)
    assert len(dataset) == 3
    images, captions, batch_targets = collate_rows([dataset[index] for index in range(3)])
    assert images.shape == (3, 3, 8, 8)
    assert images.dtype == torch.float32
    assert isinstance(captions, CaptionBatch)
    assert len(captions) == 3
    assert captions.to_dense().shape == (3, TRIGRAM_DIM)
    assert batch_targets.tolist() == targets.tolist()
    # The red image standardised with mean 0.5 and std 0.5 gives +1 in red and -1 elsewhere.
    assert images[0, :, 4, 4].tolist() == pytest.approx([1.0, -1.0, -1.0])


def test_captioned_images_without_transform(tmp_path):
    paths = [_solid_image(tmp_path / "a.png", (1, 2, 3)), _solid_image(tmp_path / "b.png", (4, 5, 6))]
    dataset = CaptionedImages(paths, ["x", "y"], np.zeros((2, 3)), image_size=6, transform=None)
    images, _, _ = collate_rows([dataset[0], dataset[1]])
    assert images.dtype == torch.uint8
    assert images.shape == (2, 3, 6, 6)
    assert images[1, :, 0, 0].tolist() == [4, 5, 6]


def test_captioned_images_captions_only():
    targets = np.array([[1, 0, 0], [0, 0, 1]], dtype=np.float32)
    dataset = CaptionedImages(None, ["a cat", "a dog"], targets, image_size=32, transform=None)
    image, encoded, target = dataset[1]
    assert image is None
    assert target.tolist() == [0.0, 0.0, 1.0]
    images, captions, batch_targets = collate_rows([dataset[0], dataset[1]])
    assert images is None
    assert captions.offsets.tolist() == [0, 2]
    assert batch_targets.shape == (2, 3)
    assert batch_targets.dtype == torch.float32


def test_captioned_images_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="1 image paths but 2 captions"):
        CaptionedImages([tmp_path / "a.png"], ["a", "b"], np.zeros((2, 1)), image_size=8, transform=None)
    with pytest.raises(ValueError, match="3 target rows but 2 captions"):
        CaptionedImages(None, ["a", "b"], np.zeros((3, 1)), image_size=8, transform=None)


def test_load_dataset_coco_mini(coco_mini):
    dataset = load_dataset(coco_mini)
    assert dataset.has_images
    assert len(dataset.train) == 78
    assert dataset.test is not None
    assert len(dataset.test) == 19
    assert set(dataset.labels) <= set(range(1, 20))
    assert dataset.image_problems(dataset.train, ImageChecks().check) == []
    assert dataset.unused_images() == []


def test_captioned_images_real_photos(coco_mini):
    dataset = load_dataset(coco_mini)
    frame = dataset.train.iloc[:4]
    targets = targets_from_labels(frame["Labels"], dataset.labels)
    paths = dataset.image_paths(frame)
    mean, std = channel_stats(paths, image_size=32)
    rows = CaptionedImages(paths, frame["Caption"].tolist(), targets, 32, build_transform(mean, std))
    images, captions, batch_targets = collate_rows([rows[index] for index in range(4)])
    assert images.shape == (4, 3, 32, 32)
    assert len(captions) == 4
    assert batch_targets.shape == (4, len(dataset.labels))
    assert all(0.0 < value < 1.0 for value in mean)
