"""Exploratory statistics of a dataset folder and the plotly figures that show them.

`dataset_statistics` reads `train.csv` once and computes everything the Dataset
page shows: label counts, label co-occurrence, labels per image, caption lengths
and the most frequent caption words per label. The other public functions are the
steps it is built from, the sample picker for the image grid, and figure builders.
Labels are shown by name, and `display_names` makes the names unique so that they
can serve as chart axes.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from PIL import Image
from sklearn.feature_extraction.text import CountVectorizer

from core import datasets

logger = logging.getLogger(__name__)

TOP_WORDS = 10  # caption words listed per label
MATCH_MODES = ("all", "any")  # a sample row carries all selected labels, or at least one of them
BUBBLE_ANGLES = 96  # candidate positions tried around each placed bubble
BUBBLE_GAP = 0.03  # gap between bubbles, as a fraction of the largest radius
HEATMAP_TEXT_MAX_LABELS = 20  # above this many labels the heatmap cells carry no numbers


@dataclass
class DatasetStatistics:
    """Statistics of a dataset's train.csv, with labels in sorted id order throughout."""

    root: Path
    image_dir: Path | None  # None for a caption-only dataset
    labels: list[int]
    label_names: dict[int, str]  # label id -> unique display name
    records: pd.DataFrame  # ImageID, Caption, line: one row per train.csv row
    targets: np.ndarray  # (rows, labels) bool
    label_counts: pd.DataFrame  # label, name, rows, share
    cooccurrence: np.ndarray  # (labels, labels) int64 counts of rows carrying both labels, label_counts on the diagonal
    labels_per_image: pd.DataFrame  # labels, rows: how many rows carry that many labels
    labels_per_image_mean: float
    caption_lengths: pd.DataFrame  # words, rows: how many captions have that many words
    caption_words_mean: float
    caption_words_median: float
    caption_words_max: int
    top_words: pd.DataFrame  # label, name, rank, word, captions, share

    @property
    def rows(self) -> int:
        return len(self.records)

    @property
    def has_images(self) -> bool:
        return self.image_dir is not None

    @property
    def names(self) -> list[str]:
        """Display names in label order."""
        return [self.label_names[label] for label in self.labels]


# ----------------------------------------------------------------------------- statistics


def display_names(labels: Sequence[int], label_names: dict[int, str]) -> dict[int, str]:
    """Map each label to its name, adding the id to names that several labels share."""
    names = [label_names.get(label, f"label {label}") for label in labels]
    shared = {name for name in names if names.count(name) > 1}
    return {label: f"{name} ({label})" if name in shared else name for label, name in zip(labels, names)}


def label_counts(targets: np.ndarray, labels: Sequence[int], label_names: dict[int, str]) -> pd.DataFrame:
    """Count the rows carrying each label.

    Returns:
        A DataFrame in label order with columns label, name, rows and share (rows
        divided by all rows, so shares sum to more than 1 when rows carry several labels).
    """
    counts = targets.sum(axis=0).astype(np.int64)
    share = counts / len(targets) if len(targets) else np.zeros(len(labels))
    return pd.DataFrame({
        "label": list(labels),
        "name": [label_names[label] for label in labels],
        "rows": counts,
        "share": share,
    })


def cooccurrence_counts(targets: np.ndarray) -> np.ndarray:
    """Count the rows carrying each pair of labels, with each label's own row count on the diagonal.

    Returns:
        A symmetric (labels, labels) int64 matrix.
    """
    targets = np.asarray(targets, dtype=bool)
    counts = np.zeros((targets.shape[1], targets.shape[1]), dtype=np.int64)
    # NOTE: A loop over labels replaces `targets.T @ targets`. The float product goes through BLAS, whose threads
    # took up to a second on a busy 2-core machine, and the integer product is slower than this loop.
    for index in range(targets.shape[1]):
        counts[index] = targets[targets[:, index]].sum(axis=0)
    return counts


def conditional_cooccurrence(counts: np.ndarray) -> np.ndarray:
    """Normalise co-occurrence counts by row: entry (i, j) is P(label j | label i).

    A label carried by no row gets a row of zeros.
    """
    diagonal = np.diag(counts).astype(np.float64)[:, None]  # (labels, 1)
    return np.divide(counts, diagonal, out=np.zeros(counts.shape, dtype=np.float64), where=diagonal > 0)


def value_histogram(values: np.ndarray, name: str) -> pd.DataFrame:
    """Count how many rows have each value, listing every value from the minimum to the maximum.

    Returns:
        A DataFrame with columns `name` and rows. Values between the minimum and the
        maximum that no row has get 0 rows, and no values give an empty DataFrame.
    """
    values = np.asarray(values, dtype=np.int64)
    if not len(values):
        return pd.DataFrame({name: np.zeros(0, dtype=np.int64), "rows": np.zeros(0, dtype=np.int64)})
    low = int(values.min())
    counts = np.bincount(values - low)
    return pd.DataFrame({name: np.arange(low, low + len(counts)), "rows": counts})


def caption_word_counts(captions: Sequence[str]) -> np.ndarray:
    """Return the number of whitespace-separated words in each caption."""
    return np.fromiter((len(caption.split()) for caption in captions), dtype=np.int64, count=len(captions))


def top_caption_words(
    captions: Sequence[str],
    targets: np.ndarray,
    labels: Sequence[int],
    label_names: dict[int, str],
    top: int = TOP_WORDS,
) -> pd.DataFrame:
    """List the words found in the most captions of each label, English stop words excluded.

    Words are the tokens of scikit-learn's `CountVectorizer` with its defaults:
    lower-cased runs of two or more word characters (letters, digits, underscore),
    minus its built-in English stop word list. Each word counts once per caption.
    Ties are broken alphabetically.

    Returns:
        A long DataFrame with columns label, name, rank (1 = most frequent), word,
        captions (captions of the label's rows containing the word) and share
        (captions divided by the label's row count). A label whose captions have
        no words has no rows.
    """
    columns = ["label", "name", "rank", "word", "captions", "share"]
    vectorizer = CountVectorizer(stop_words="english", binary=True)
    try:
        presence = vectorizer.fit_transform(captions)  # (rows, vocabulary) sparse 0/1
    except ValueError:
        # CountVectorizer raises on an empty vocabulary: every caption is empty or only stop words.
        return pd.DataFrame(columns=columns)
    words = vectorizer.get_feature_names_out()  # sorted alphabetically
    per_label = np.asarray(presence.T @ targets.astype(np.float64)).T  # (labels, vocabulary)
    label_rows = targets.sum(axis=0)

    records = []
    for index, label in enumerate(labels):
        counts = per_label[index]
        # A stable sort keeps alphabetical order among equal counts.
        order = np.argsort(-counts, kind="stable")[:top]
        for rank, column in enumerate(order, start=1):
            if counts[column] <= 0:
                break
            records.append((label, label_names[label], rank, str(words[column]), int(counts[column]),
                            counts[column] / label_rows[index]))
    return pd.DataFrame(records, columns=columns)


def top_words_table(top_words: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Arrange `top_caption_words` output as one row per label name and one column per rank.

    Cells read "word (captions)". A label with fewer words than ranks has empty cells.
    """
    if top_words.empty:
        return pd.DataFrame(index=pd.Index(list(names), name="label"))
    cells = top_words.assign(cell=top_words["word"] + " (" + top_words["captions"].map("{:,}".format) + ")")
    table = cells.pivot(index="name", columns="rank", values="cell").reindex(list(names)).fillna("")
    table.index.name = "label"
    table.columns = [str(rank) for rank in table.columns]
    return table


def dataset_statistics(root: str | os.PathLike) -> DatasetStatistics:
    """Read a dataset folder's train.csv and compute every statistic the Dataset page shows.

    Raises:
        FileNotFoundError: the folder or its train.csv is missing.
        ValueError: train.csv cannot be read at all. Invalid rows are left out
            (the home page lists them).
    """
    folder = datasets.load_dataset(root, skipped=[])
    labels = folder.labels
    names = display_names(labels, folder.label_names)
    targets = datasets.targets_from_labels(folder.train["Labels"], labels).astype(bool)  # (rows, labels)
    labels_per_row = targets.sum(axis=1)
    captions = folder.train["Caption"].tolist()
    words = caption_word_counts(captions)

    statistics = DatasetStatistics(
        root=folder.root,
        image_dir=folder.image_dir,
        labels=labels,
        label_names=names,
        records=folder.train[["ImageID", "Caption", "line"]].reset_index(drop=True),
        targets=targets,
        label_counts=label_counts(targets, labels, names),
        cooccurrence=cooccurrence_counts(targets),
        labels_per_image=value_histogram(labels_per_row, "labels"),
        labels_per_image_mean=float(labels_per_row.mean()),
        caption_lengths=value_histogram(words, "words"),
        caption_words_mean=float(words.mean()),
        caption_words_median=float(np.median(words)),
        caption_words_max=int(words.max()),
        top_words=top_caption_words(captions, targets, labels, names),
    )
    logger.info("computed statistics of %s: %d rows, %d labels", folder.root, statistics.rows, len(labels))
    return statistics


# ----------------------------------------------------------------------------- samples


def sample_rows(
    statistics: DatasetStatistics,
    labels: Sequence[int] = (),
    count: int = 12,
    seed: int = 0,
    match: str = "all",
) -> pd.DataFrame:
    """Pick up to `count` random rows, optionally only rows carrying the given labels.

    Args:
        statistics: the dataset's statistics.
        labels: label ids to filter on, or empty for no filter.
        count: the maximum number of rows returned.
        seed: random seed. The same seed and filter give the same rows.
        match: "all" keeps rows carrying every label in `labels`, "any" rows carrying at least one.

    Returns:
        A DataFrame with columns ImageID, Caption, line, labels (the row's label
        names joined by ", "), image (the image path, or None for a caption-only
        dataset or an ImageID outside the image folder) and image_error (why
        image is None for such an ImageID, else None), in random order. It has fewer than `count` rows
        when fewer rows match.

    Raises:
        ValueError: an unknown label, a count below 1 or an unknown match mode.
    """
    if count < 1:
        raise ValueError(f"invalid sample count {count}, expected 1 or more")
    if match not in MATCH_MODES:
        raise ValueError(f"invalid match mode {match!r}, expected one of {', '.join(MATCH_MODES)}")
    column = {label: index for index, label in enumerate(statistics.labels)}
    unknown = [label for label in labels if label not in column]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown}: the labels of {statistics.root} are {statistics.labels}")

    selected = statistics.targets[:, [column[label] for label in labels]]  # (rows, selected labels)
    if not len(labels):
        matching = np.arange(statistics.rows)
    elif match == "all":
        matching = np.flatnonzero(selected.all(axis=1))
    else:
        matching = np.flatnonzero(selected.any(axis=1))
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(matching)[:count]

    samples = statistics.records.iloc[chosen].reset_index(drop=True)
    names = statistics.names
    samples["labels"] = [
        ", ".join(names[index] for index in np.flatnonzero(statistics.targets[row])) for row in chosen
    ]
    paths, errors = [], []
    for image_id in samples["ImageID"]:
        path, error = None, None
        if statistics.image_dir is not None:
            try:
                path = datasets.resolve_image_path(statistics.image_dir, image_id)
            except datasets.DatasetError as invalid:
                error = str(invalid)
        paths.append(path)
        errors.append(error)
    samples["image"] = pd.Series(paths, dtype=object)
    # object dtype keeps None: pandas would store missing strings as NaN, which is truthy.
    samples["image_error"] = pd.Series(errors, dtype=object)
    return samples


def thumbnail_jpeg(path: str | os.PathLike, max_side: int = 320) -> bytes:
    """Decode an image of any mode and return it as JPEG bytes, scaled down to at most `max_side` pixels.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a decodable image; the message names the file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} not found")
    image = datasets.open_image(path)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- figures


def label_counts_figure(statistics: DatasetStatistics) -> go.Figure:
    """Bar chart of the rows carrying each label, most frequent first."""
    counts = statistics.label_counts.sort_values("rows", ascending=False, kind="stable")
    figure = px.bar(counts, x="name", y="rows", custom_data=["share", "label"],
                    labels={"name": "label", "rows": "rows carrying the label"})
    figure.update_traces(hovertemplate="<b>%{x}</b> (id %{customdata[1]})<br>%{y:,} rows<br>"
                                       "%{customdata[0]:.1%} of rows<extra></extra>")
    figure.update_layout(xaxis_tickangle=-45, margin={"t": 30})
    return figure


def bubble_layout(radii: Sequence[float], gap: float = 0.0) -> np.ndarray:
    """Place circles of the given radii close together without overlap.

    Circles are placed largest first. Each is put at the position nearest the
    centre of the placed circles, among positions touching a placed circle (tried
    at `BUBBLE_ANGLES` angles) that keep at least `gap` from every placed circle.

    Returns:
        A (len(radii), 2) array of circle centres, in the order of `radii`.
    """
    radii = np.asarray(radii, dtype=np.float64)
    centres = np.zeros((len(radii), 2))
    order = np.argsort(-radii, kind="stable")
    angles = np.linspace(0.0, 2.0 * np.pi, BUBBLE_ANGLES, endpoint=False)
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (angles, 2)

    for placed, index in enumerate(order):
        if placed == 0:
            continue
        done = order[:placed]
        distance = radii[done] + radii[index] + gap  # (placed,)
        # Candidates: touching each placed circle at every angle.
        candidates = (centres[done][:, None, :] + distance[:, None, None] * directions).reshape(-1, 2)
        apart = np.linalg.norm(candidates[:, None, :] - centres[done][None, :, :], axis=2)  # (candidates, placed)
        valid = candidates[(apart >= distance[None, :] * (1 - 1e-9)).all(axis=1)]
        weights = radii[done] ** 2
        middle = (centres[done] * weights[:, None]).sum(axis=0) / weights.sum()
        centres[index] = valid[np.argmin(np.linalg.norm(valid - middle, axis=1))]
    return centres


def label_dominance_figure(statistics: DatasetStatistics) -> go.Figure:
    """Packed bubble chart with one circle per label, its area proportional to the rows carrying the label."""
    counts = statistics.label_counts.sort_values("rows", ascending=False, kind="stable").reset_index(drop=True)
    radii = np.sqrt(counts["rows"].to_numpy(dtype=np.float64))
    gap = BUBBLE_GAP * radii.max() if len(radii) else 0.0
    centres = bubble_layout(radii, gap)
    palette = px.colors.qualitative.Plotly
    circle = np.linspace(0.0, 2.0 * np.pi, 73)

    figure = go.Figure()
    for index, row in counts.iterrows():
        hover = f"{row['name']}: {row['rows']:,} rows ({row['share']:.1%})"
        figure.add_trace(go.Scatter(
            x=centres[index, 0] + radii[index] * np.cos(circle),
            y=centres[index, 1] + radii[index] * np.sin(circle),
            mode="lines", fill="toself", hoveron="fills", name=hover, hoverinfo="name",
            line={"color": "white", "width": 1}, fillcolor=palette[index % len(palette)], opacity=0.8,
        ))
    # Names on the bubbles wide enough to hold them; every centre carries the full hover text.
    large = radii >= 0.2 * radii.max() if len(radii) else np.zeros(0, dtype=bool)
    figure.add_trace(go.Scatter(
        x=centres[:, 0], y=centres[:, 1], mode="text",
        text=[f"{name}<br>{share:.0%}" if show else "" for name, share, show in
              zip(counts["name"], counts["share"], large)],
        customdata=np.stack([counts["name"], counts["rows"], counts["share"]], axis=1) if len(counts) else None,
        hovertemplate="<b>%{customdata[0]}</b><br>%{customdata[1]:,} rows<br>%{customdata[2]:.1%} of rows"
                      "<extra></extra>",
        textfont={"size": 13, "color": "black"},
    ))
    figure.update_layout(
        showlegend=False, height=520, margin={"t": 10, "b": 10, "l": 10, "r": 10},
        xaxis={"visible": False}, yaxis={"visible": False, "scaleanchor": "x", "scaleratio": 1},
    )
    return figure


def cooccurrence_figure(statistics: DatasetStatistics, normalise: bool = False) -> go.Figure:
    """Heatmap of label co-occurrence counts, or of P(column label | row label) when `normalise` is set.

    The colour scale of the counts ends at the largest off-diagonal count, so the
    diagonal (each label's own row count, often far larger) does not wash out the pairs.
    """
    names = statistics.names
    counts = statistics.cooccurrence
    show_text = len(names) <= HEATMAP_TEXT_MAX_LABELS
    if normalise:
        values, text_format, colour_title = conditional_cooccurrence(counts), ".2f", "P(column | row)"
        hover = "P(%{x} | %{y}) = %{z:.3f}<extra></extra>"
        colour_max = 1.0
    else:
        values, text_format, colour_title = counts, ",d", "rows"
        hover = "%{y} and %{x}: %{z:,} rows<extra></extra>"
        off_diagonal = counts[~np.eye(len(names), dtype=bool)]
        colour_max = float(off_diagonal.max()) if len(off_diagonal) and off_diagonal.max() > 0 else None
    figure = px.imshow(
        values, x=names, y=names, color_continuous_scale="Blues", aspect="auto", zmin=0, zmax=colour_max,
        text_auto=text_format if show_text else False,
        labels={"x": "co-occurring label", "y": "label", "color": colour_title},
    )
    figure.update_traces(hovertemplate=hover)
    figure.update_layout(height=max(420, 24 * len(names) + 160), margin={"t": 30}, xaxis_tickangle=-45)
    return figure


def histogram_figure(histogram: pd.DataFrame, x_title: str) -> go.Figure:
    """Bar chart of a `value_histogram` table (its first column against rows)."""
    column = histogram.columns[0]
    figure = px.bar(histogram, x=column, y="rows", labels={column: x_title})
    figure.update_traces(hovertemplate=f"{x_title}: %{{x}}<br>%{{y:,}} rows<extra></extra>")
    figure.update_layout(bargap=0.05, margin={"t": 30})
    return figure
