"""Dataset statistics, sample picking and figures of `core.eda`, checked on hand-countable data."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import eda

# Four rows with COCO ids 1 (person), 2 (bicycle) and 3 (car). Hand counts:
#   rows per label 2, 2, 1; labels per image 1, 2, 1, 1; words per caption 6, 6, 4, 3;
#   co-occurrence [[2, 1, 0], [1, 2, 0], [0, 0, 1]].
ROWS = [
    ("1.jpg", "1", "A red car on the road"),
    ("2.jpg", "1 2", "The red bus and the car"),
    ("3.jpg", "2", "A bus stops here"),
    ("4.jpg", "3", "Dogs and dogs"),
]


def write_dataset(root: Path, rows=ROWS, images: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "train.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "Labels", "Caption"])
        writer.writerows(rows)
    if images:
        (root / "data").mkdir(exist_ok=True)
        for image_id, _, _ in rows:
            Image.new("RGB", (64, 40), (200, 30, 30)).save(root / "data" / image_id)
    return root


@pytest.fixture
def statistics(tmp_path):
    return eda.dataset_statistics(write_dataset(tmp_path / "tiny"))


def test_dataset_statistics_label_counts(statistics):
    counts = statistics.label_counts
    assert counts["label"].tolist() == [1, 2, 3]
    assert counts["name"].tolist() == ["person", "bicycle", "car"]
    assert counts["rows"].tolist() == [2, 2, 1]
    assert counts["share"].tolist() == pytest.approx([0.5, 0.5, 0.25])


def test_dataset_statistics_cooccurrence(statistics):
    assert statistics.cooccurrence.tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]


def test_dataset_statistics_labels_per_image(statistics):
    assert statistics.labels_per_image["labels"].tolist() == [1, 2]
    assert statistics.labels_per_image["rows"].tolist() == [3, 1]
    assert statistics.labels_per_image_mean == pytest.approx(5 / 4)


def test_dataset_statistics_caption_lengths(statistics):
    assert statistics.caption_lengths["words"].tolist() == [3, 4, 5, 6]
    assert statistics.caption_lengths["rows"].tolist() == [1, 1, 0, 2]
    assert statistics.caption_words_mean == pytest.approx(19 / 4)
    assert statistics.caption_words_median == pytest.approx(5.0)
    assert statistics.caption_words_max == 6


def test_top_words_exclude_stop_words(statistics):
    words = statistics.top_words
    # person: "red car road" and "red bus car"; ties are alphabetical.
    person = words[words["label"] == 1]
    assert person["word"].tolist() == ["car", "red", "bus", "road"]
    assert person["captions"].tolist() == [2, 2, 1, 1]
    assert person["rank"].tolist() == [1, 2, 3, 4]
    assert person["share"].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])
    # bicycle: "red bus car" and "bus stops"; "here" is an English stop word.
    assert words[words["label"] == 2]["word"].tolist() == ["bus", "car", "red", "stops"]
    # car: "dogs" counts once per caption.
    car = words[words["label"] == 3]
    assert car["word"].tolist() == ["dogs"]
    assert car["captions"].tolist() == [1]
    assert not set(words["word"]) & {"a", "the", "and", "on", "here"}


def test_value_histogram_empty():
    histogram = eda.value_histogram(np.array([], dtype=np.int64), "words")
    assert histogram.columns.tolist() == ["words", "rows"]
    assert histogram.empty


def test_top_caption_words_limit(statistics):
    captions = statistics.records["Caption"].tolist()
    words = eda.top_caption_words(captions, statistics.targets, statistics.labels, statistics.label_names, top=2)
    assert words[words["label"] == 1]["word"].tolist() == ["car", "red"]


def test_top_caption_words_only_stop_words():
    targets = np.array([[True], [True]])
    words = eda.top_caption_words(["the and a", ""], targets, [1], {1: "person"})
    assert words.empty


def test_top_words_table_layout(statistics):
    table = eda.top_words_table(statistics.top_words, statistics.names)
    assert table.index.tolist() == ["person", "bicycle", "car"]
    assert table.loc["person", "1"] == "car (2)"
    assert table.loc["car", "1"] == "dogs (1)"
    assert table.loc["car", "2"] == ""


def test_dataset_statistics_caption_only(statistics):
    assert not statistics.has_images
    assert statistics.rows == 4


def test_dataset_statistics_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        eda.dataset_statistics(tmp_path / "absent")


def test_dataset_statistics_invalid_labels(tmp_path):
    root = write_dataset(tmp_path / "bad", rows=[("1.jpg", "dog", "A dog")])
    with pytest.raises(ValueError, match="label 'dog' is not an integer"):
        eda.dataset_statistics(root)


def test_display_names_shared_name():
    names = eda.display_names([1, 2, 3], {1: "cat", 2: "cat", 3: "dog"})
    assert names == {1: "cat (1)", 2: "cat (2)", 3: "dog"}


def test_conditional_cooccurrence_rows():
    counts = np.array([[4, 1, 0], [1, 2, 0], [0, 0, 0]])
    conditional = eda.conditional_cooccurrence(counts)
    assert conditional[0].tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert conditional[1].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert conditional[2].tolist() == [0.0, 0.0, 0.0]


def test_sample_rows_filter_all(statistics):
    samples = eda.sample_rows(statistics, [1], count=10)
    assert sorted(samples["ImageID"]) == ["1.jpg", "2.jpg"]
    both = eda.sample_rows(statistics, [1, 2], count=10)
    assert both["ImageID"].tolist() == ["2.jpg"]
    assert both["labels"].tolist() == ["person, bicycle"]


def test_sample_rows_filter_any(statistics):
    samples = eda.sample_rows(statistics, [1, 3], count=10, match="any")
    assert sorted(samples["ImageID"]) == ["1.jpg", "2.jpg", "4.jpg"]
    assert eda.sample_rows(statistics, [1, 3], count=10, match="all").empty


def test_sample_rows_seeded(statistics):
    first = eda.sample_rows(statistics, count=3, seed=7)["ImageID"].tolist()
    again = eda.sample_rows(statistics, count=3, seed=7)["ImageID"].tolist()
    assert first == again
    assert len(first) == 3
    assert len(set(first)) == 3
    everything = {tuple(eda.sample_rows(statistics, count=4, seed=seed)["ImageID"]) for seed in range(10)}
    assert len(everything) > 1


def test_sample_rows_invalid_arguments(statistics):
    with pytest.raises(ValueError, match=r"unknown label\(s\) \[7\]: the labels of .* are \[1, 2, 3\]"):
        eda.sample_rows(statistics, [7])
    with pytest.raises(ValueError, match="invalid sample count 0"):
        eda.sample_rows(statistics, count=0)
    with pytest.raises(ValueError, match="invalid match mode 'some'"):
        eda.sample_rows(statistics, [1], match="some")


def test_sample_rows_image_paths(tmp_path):
    statistics = eda.dataset_statistics(write_dataset(tmp_path / "images", images=True))
    samples = eda.sample_rows(statistics, [3])
    assert statistics.has_images
    assert samples["image"].tolist() == [(tmp_path / "images" / "data" / "4.jpg").resolve()]


def test_sample_rows_image_outside_folder(tmp_path):
    # An ImageID that points outside data/ gets no path and a message, and the other rows still sample.
    root = tmp_path / "escape"
    (root / "data").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "data" / "1.jpg")
    (root / "train.csv").write_text("ImageID,Labels,Caption\n1.jpg,1,a cat\n/etc/hostname,1,a dog\n")
    samples = eda.sample_rows(eda.dataset_statistics(root), count=2).set_index("ImageID")
    assert samples.loc["/etc/hostname", "image"] is None
    assert "points outside" in samples.loc["/etc/hostname", "image_error"]
    assert samples.loc["1.jpg", "image_error"] is None


def test_sample_rows_caption_only_has_no_paths(statistics):
    assert eda.sample_rows(statistics)["image"].isna().all()


def test_thumbnail_jpeg_size(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGBA", (640, 320), (10, 20, 30, 128)).save(path)
    thumbnail = Image.open(io.BytesIO(eda.thumbnail_jpeg(path, max_side=100)))
    assert thumbnail.format == "JPEG"
    assert thumbnail.size == (100, 50)


def test_thumbnail_jpeg_errors(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg: not an image file Pillow can read"):
        eda.thumbnail_jpeg(broken)
    with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
        eda.thumbnail_jpeg(tmp_path / "missing.jpg")


def test_bubble_layout_no_overlap():
    radii = np.sqrt([22797, 4365, 1164, 605, 252, 1020, 1934, 30, 1])
    centres = eda.bubble_layout(radii, gap=1.0)
    for first in range(len(radii)):
        for second in range(first + 1, len(radii)):
            distance = np.linalg.norm(centres[first] - centres[second])
            assert distance >= radii[first] + radii[second] + 1.0 - 1e-6, (first, second)


def test_bubble_layout_single_and_empty():
    assert eda.bubble_layout([3.0]).tolist() == [[0.0, 0.0]]
    assert eda.bubble_layout([]).shape == (0, 2)


def test_label_dominance_figure_hover(statistics):
    figure = eda.label_dominance_figure(statistics)
    circles = [trace for trace in figure.data if trace.fill == "toself"]
    assert [trace.name for trace in circles] == [
        "person: 2 rows (50.0%)", "bicycle: 2 rows (50.0%)", "car: 1 rows (25.0%)",
    ]
    centres = figure.data[-1]
    assert centres.customdata[:, 0].tolist() == ["person", "bicycle", "car"]
    assert "%{customdata[2]:.1%}" in centres.hovertemplate


def test_label_dominance_figure_area(statistics):
    # A circle's area is proportional to its row count: radius ratio sqrt(2) between person and car.
    figure = eda.label_dominance_figure(statistics)
    person, _, car = (np.ptp(np.asarray(trace.x)) / 2 for trace in figure.data[:3])
    assert person / car == pytest.approx(np.sqrt(2), rel=1e-3)


def test_label_counts_figure_order(statistics):
    figure = eda.label_counts_figure(statistics)
    assert list(figure.data[0].x) == ["person", "bicycle", "car"]
    assert list(figure.data[0].y) == [2, 2, 1]


def test_cooccurrence_figure_values(statistics):
    counts = eda.cooccurrence_figure(statistics)
    assert np.asarray(counts.data[0].z).tolist() == [[2, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert list(counts.data[0].x) == ["person", "bicycle", "car"]
    normalised = eda.cooccurrence_figure(statistics, normalise=True)
    assert np.asarray(normalised.data[0].z)[0].tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_dataset_statistics_real_captions(captions_csv):
    statistics = eda.dataset_statistics(captions_csv.parent)
    counts = statistics.label_counts.set_index("label")["rows"]
    assert statistics.rows == 30000
    assert counts[1] == 22797
    assert statistics.label_names[1] == "person"
    assert 12 not in statistics.labels
    assert len(statistics.labels) == 18
    assert np.diag(statistics.cooccurrence).tolist() == counts.tolist()
    assert (statistics.cooccurrence == statistics.cooccurrence.T).all()
    assert statistics.labels_per_image["rows"].sum() == 30000
    assert statistics.caption_lengths["rows"].sum() == 30000
    assert not statistics.has_images
