"""Streamlit dashboard entry point: page navigation and the home page.

Run with `streamlit run app.py`. Every page runs inside this router, which puts the
shared choices into `st.session_state` first:

- `dataset_path`: the dataset folder in use (the generated demo dataset when none is chosen);
- `runs_dir`: the folder with the run folders (`CORE_RUNS_DIR`, default `checkpoints`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from core import workspace
from core.demo import is_demo_dataset
from core.runs import list_runs

RUNS_DIR = os.environ.get("CORE_RUNS_DIR", "checkpoints")
DEMO_DIR = os.environ.get("CORE_DEMO_DIR", "demo-data")

PAGES = [
    ("pages/dataset.py", "Dataset", ":material/bar_chart:"),
    ("pages/train.py", "Train", ":material/model_training:"),
    ("pages/compare.py", "Compare", ":material/compare_arrows:"),
    ("pages/predict.py", "Predict", ":material/image_search:"),
]


def init_state() -> None:
    st.session_state.setdefault("runs_dir", RUNS_DIR)
    if "dataset_path" not in st.session_state:
        remembered = workspace.remembered_dataset(st.session_state["runs_dir"])
        if remembered and Path(remembered, "train.csv").is_file():
            st.session_state["dataset_path"] = remembered
        else:
            st.session_state["dataset_path"] = str(workspace.default_dataset(DEMO_DIR))


@st.cache_data(show_spinner="Reading the dataset...")
def dataset_summary(version: tuple[str, int, int]) -> workspace.DatasetSummary:
    # `version` (path, modification time, size) keys the cache, so an edited train.csv is read again.
    return workspace.summarize_dataset(Path(version[0]).parent)


def dataset_chooser_ui() -> None:
    current = st.session_state["dataset_path"]
    with st.form("dataset"):
        entered = st.text_input(
            "Dataset folder", value=current,
            help="A folder with train.csv (ImageID,Labels,Caption), optionally test.csv and data/ with the images.",
        )
        columns = st.columns([1, 1, 4])
        use = columns[0].form_submit_button("Use this folder", type="primary")
        demo = columns[1].form_submit_button("Use the demo data")
    if demo:
        choose_dataset(str(workspace.default_dataset(DEMO_DIR)), remember=None)
    elif use and entered.strip() and entered.strip() != current:
        folder = Path(entered.strip()).expanduser()
        if folder.is_file():
            st.error(f"{folder} is a file. Enter the folder that contains train.csv.")
        elif not (folder / "train.csv").is_file():
            st.error(f"{folder} has no train.csv. Choose a folder that contains train.csv.")
        else:
            try:
                dataset_summary(workspace.dataset_version(folder))
            except (ValueError, FileNotFoundError) as error:
                st.error(f"{folder} cannot be used:  \n" + show_lines(str(error)))
                return
            choose_dataset(str(folder.resolve()), remember=str(folder.resolve()))


def show_lines(text: str) -> str:
    # Markdown joins single line breaks; messages that list rows need each on its own line.
    return text.replace("\n", "  \n")


def choose_dataset(path: str, remember: str | None) -> None:
    st.session_state["dataset_path"] = path
    workspace.remember_dataset(remember, st.session_state["runs_dir"])
    st.rerun()


def home() -> None:
    st.title("Multi-label image classification with captions")
    st.write(
        "Explore a dataset of images with labels and captions, train CNNs with and without a caption "
        "branch, compare the runs and try them on new images."
    )
    dataset_chooser_ui()

    try:
        summary = dataset_summary(workspace.dataset_version(st.session_state["dataset_path"]))
    except (ValueError, FileNotFoundError) as error:
        st.error(show_lines(str(error)))
        st.stop()

    if summary.is_demo:
        st.info("Demo data: generated images of coloured shapes. Enter a dataset folder above to use your own.",
                icon=":material/science:")
    columns = st.columns(4)
    columns[0].metric("Labelled rows", f"{summary.rows:,}")
    columns[1].metric("Labels", len(summary.labels))
    columns[2].metric("Images found", f"{summary.images_found:,}" if summary.has_image_folder else "none")
    columns[3].metric("Test rows", f"{summary.test_rows:,}" if summary.test_rows is not None else "no test.csv")
    st.caption(f"Labels: {workspace.describe_labels(summary)}")
    if not summary.has_image_folder:
        st.warning("This dataset has no data/ folder, so only the caption_only model can train on it.")
    elif summary.images_found < summary.rows:
        st.warning(f"{summary.rows - summary.images_found:,} training rows have no image file in data/.")
    if summary.invalid_rows:
        shown = summary.invalid_rows[:10]
        more = f"  \n... and {len(summary.invalid_rows) - len(shown)} more" if len(summary.invalid_rows) > 10 else ""
        st.warning(
            f"{len(summary.invalid_rows):,} rows of train.csv are invalid and left out of the counts and charts. "
            "Training stops on them unless **Skip bad rows** is ticked on the Train page:  \n"
            + "  \n".join(shown) + more
        )

    st.subheader("Runs")
    problems: list[str] = []
    runs = list_runs(st.session_state["runs_dir"], problems=problems)
    if problems:
        st.warning("These run folders cannot be read and are left out:  \n" + "  \n".join(problems))
    if not runs:
        st.write("No runs yet. Start one on the Train page.")
    else:
        st.dataframe(pd.DataFrame(workspace.runs_summary_rows(runs)), hide_index=True, width="stretch")


def main() -> None:
    st.set_page_config(page_title="Caption classifier studio", page_icon=":material/label:", layout="wide")
    init_state()
    pages = [st.Page(home, title="Home", icon=":material/home:", default=True)]
    pages += [st.Page(path, title=title, icon=icon) for path, title, icon in PAGES]
    navigation = st.navigation(pages)
    requested = st.session_state.pop("requested_page", None)
    if requested:
        st.switch_page(requested)  # back to the deep-linked page that sent the session here first
    dataset = Path(st.session_state["dataset_path"])
    demo_note = " (generated demo data)" if is_demo_dataset(dataset) else ""
    st.sidebar.caption(f"Dataset: {dataset.name}{demo_note}")
    navigation.run()


main()
