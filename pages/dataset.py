"""Dataset page: label balance, label co-occurrence, captions and sample images of the chosen dataset."""

from __future__ import annotations

import re
from pathlib import Path

import streamlit as st

from core import eda, workspace

SAMPLE_COUNT = 12
SAMPLE_COLUMNS = 4
TABLE_ROW_HEIGHT = 35  # px, passed to st.dataframe so that table_height can size tables to their rows
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]$<>~|])")
MATCH_LABELS = {"all": "All selected labels", "any": "Any selected label"}


@st.cache_data(show_spinner="Computing dataset statistics...", max_entries=8)
def load_statistics(version: tuple[str, int, int]) -> eda.DatasetStatistics:
    # `version` (train.csv path, modification time, size) keys the cache, so an edited train.csv is read again.
    return eda.dataset_statistics(Path(version[0]).parent)


def overview_ui(statistics: eda.DatasetStatistics) -> None:
    st.caption(str(statistics.root))
    top = statistics.label_counts.loc[statistics.label_counts["rows"].idxmax()]
    columns = st.columns(5)
    columns[0].metric("Labelled rows", f"{statistics.rows:,}")
    columns[1].metric("Labels", len(statistics.labels))
    columns[2].metric("Most frequent label", top["name"], f"{top['share']:.1%} of rows", delta_color="off",
                      delta_arrow="off", help=f"{top['rows']:,} of {statistics.rows:,} rows carry this label.")
    columns[3].metric("Labels per image (mean)", f"{statistics.labels_per_image_mean:.2f}")
    columns[4].metric("Words per caption (mean)", f"{statistics.caption_words_mean:.1f}")


def labels_ui(statistics: eda.DatasetStatistics) -> None:
    st.subheader("Label frequency")
    st.plotly_chart(eda.label_counts_figure(statistics), width="stretch")
    with st.expander("Label counts table"):
        st.dataframe(
            statistics.label_counts, hide_index=True, width="stretch",
            height=table_height(len(statistics.label_counts)), row_height=TABLE_ROW_HEIGHT,
            column_config={"share": st.column_config.NumberColumn(format="percent")},
        )

    st.subheader("Label dominance")
    st.caption("One bubble per label. Its area is proportional to the number of rows carrying the label.")
    st.plotly_chart(eda.label_dominance_figure(statistics), width="stretch")

    st.subheader("Label co-occurrence")
    normalise = st.toggle(
        "Normalise by row", key="eda_normalise",
        help="Show P(column label | row label): the share of the row label's images that also carry the column label.",
    )
    st.plotly_chart(eda.cooccurrence_figure(statistics, normalise=normalise), width="stretch")


def distributions_ui(statistics: eda.DatasetStatistics) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Labels per image")
        st.plotly_chart(eda.histogram_figure(statistics.labels_per_image, "labels per image"), width="stretch")
    with right:
        st.subheader("Caption length")
        st.plotly_chart(eda.histogram_figure(statistics.caption_lengths, "words per caption"), width="stretch")
        st.caption(f"Words per caption: mean {statistics.caption_words_mean:.1f}, "
                   f"median {statistics.caption_words_median:g}, maximum {statistics.caption_words_max}.")


def caption_words_ui(statistics: eda.DatasetStatistics) -> None:
    st.subheader("Frequent caption words per label")
    st.caption(f"The {eda.TOP_WORDS} words found in the most captions of each label's rows, English stop words "
               "excluded. The number in brackets is how many of those captions contain the word.")
    table = eda.top_words_table(statistics.top_words, statistics.names)
    st.dataframe(table, width="stretch", height=table_height(len(table)), row_height=TABLE_ROW_HEIGHT)


def shuffle_samples() -> None:
    st.session_state["eda_sample_seed"] += 1


@st.fragment
def samples_ui(statistics: eda.DatasetStatistics) -> None:
    st.subheader("Samples")
    label_by_name = {name: label for label, name in statistics.label_names.items()}
    # Drop names kept from another dataset, which the multiselect would reject.
    st.session_state["eda_sample_labels"] = [
        name for name in st.session_state["eda_sample_labels"] if name in label_by_name
    ]
    columns = st.columns([4, 2, 1, 1], vertical_alignment="bottom")
    selected = columns[0].multiselect("Filter by label", statistics.names, key="eda_sample_labels",
                                      placeholder="All labels")
    match = columns[1].radio("Rows carrying", list(MATCH_LABELS), format_func=MATCH_LABELS.get,
                             key="eda_sample_match", horizontal=True)
    columns[2].number_input("Seed", min_value=0, step=1, key="eda_sample_seed")
    columns[3].button("Shuffle", key="eda_shuffle", on_click=shuffle_samples, icon=":material/shuffle:")

    samples = eda.sample_rows(statistics, [label_by_name[name] for name in selected], count=SAMPLE_COUNT,
                              seed=int(st.session_state["eda_sample_seed"]), match=match)
    if not statistics.has_images:
        st.info("This dataset has no data/ folder, so there are no images to show. "
                "The samples list captions and label names only.", icon=":material/hide_image:")
    if samples.empty:
        st.info("No rows carry this combination of labels. Remove a label or choose \"Any selected label\".")
        return
    if not statistics.has_images:
        st.dataframe(samples[["ImageID", "labels", "Caption"]], hide_index=True, width="stretch",
                     height=table_height(len(samples)), row_height=TABLE_ROW_HEIGHT)
        return

    for start in range(0, len(samples), SAMPLE_COLUMNS):
        row = samples.iloc[start:start + SAMPLE_COLUMNS]
        for column, (_, sample) in zip(st.columns(SAMPLE_COLUMNS), row.iterrows()):
            with column:
                sample_ui(sample)


def sample_ui(sample) -> None:
    try:
        if sample["image_error"]:
            raise ValueError(sample["image_error"])
        st.image(eda.thumbnail_jpeg(sample["image"]), width="stretch", alt=sample["Caption"])
    except (ValueError, FileNotFoundError) as error:
        st.warning(f"train.csv line {sample['line']}: {error}")
    st.markdown(f"**{escape_markdown(sample['labels'])}**")
    st.caption(f"{escape_markdown(sample['ImageID'])}: {escape_markdown(sample['Caption'])}")


def table_height(rows: int) -> int:
    # Fit up to 20 rows and the header row without scrolling, plus 3 px for the borders.
    return min(TABLE_ROW_HEIGHT * (rows + 1) + 3, TABLE_ROW_HEIGHT * 21 + 3)


def escape_markdown(text: str) -> str:
    # Captions are plain text: a "*", "_" or "$" in them must not turn into emphasis or LaTeX.
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def main() -> None:
    if "runs_dir" not in st.session_state:
        # NOTE: on a fresh server, Streamlit runs a deep-linked file under pages/ directly, without
        # app.py, until some session has run app.py's st.navigation. Go through app.py and come back.
        st.session_state["requested_page"] = "pages/dataset.py"
        st.switch_page("app.py")
    st.title("Dataset")
    st.session_state.setdefault("eda_sample_seed", 0)
    st.session_state.setdefault("eda_sample_labels", [])
    try:
        statistics = load_statistics(workspace.dataset_version(st.session_state["dataset_path"]))
    except (ValueError, FileNotFoundError) as error:
        st.error(str(error))
        st.stop()

    overview_ui(statistics)
    labels_ui(statistics)
    distributions_ui(statistics)
    caption_words_ui(statistics)
    samples_ui(statistics)


main()
