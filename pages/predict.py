"""Predict page: label an uploaded image or a dataset sample with a finished run."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from core import datasets
from core.predict import Predictor, decode_upload, finished_runs
from core.workspace import dataset_version

SAMPLE_COUNT = 200  # dataset rows offered in the sample picker


@st.cache_resource(show_spinner="Loading the model...", max_entries=4)
def load_predictor(run_dir: str, checkpoint_mtime_ns: int) -> Predictor:
    # Keyed on the checkpoint's modification time, so a retrained run is loaded again.
    # The predictor is shared by all sessions and only read after loading.
    return Predictor(run_dir)


@st.cache_data(show_spinner=False)
def sample_rows(version: tuple[str, int, int]) -> tuple[list[int], list[dict]]:
    folder = datasets.load_dataset(Path(version[0]).parent, skipped=[])
    rows = folder.train.head(SAMPLE_COUNT)
    return folder.labels, [
        {"ImageID": image_id, "Caption": caption, "labels": [folder.label_names[label] for label in labels],
         "path": _image_path(folder, image_id)}
        for image_id, caption, labels in zip(rows["ImageID"], rows["Caption"], rows["Labels"])
    ]


def _image_path(folder: datasets.DatasetFolder, image_id: str) -> str | None:
    if folder.image_dir is None:
        return None
    try:
        return str(datasets.resolve_image_path(folder.image_dir, image_id))
    except datasets.DatasetError:
        return None


def probabilities_figure(scores) -> go.Figure:
    names = [score.name for score in scores]
    figure = go.Figure()
    figure.add_trace(go.Bar(
        x=names, y=[score.probability for score in scores], name="probability",
        marker_color=["#1f6feb" if score.predicted else "#9aa4b2" for score in scores],
    ))
    figure.add_trace(go.Scatter(
        x=names, y=[score.threshold for score in scores], mode="markers", name="threshold",
        marker=dict(symbol="line-ew", size=28, color="#d1242f", line=dict(width=3, color="#d1242f")),
    ))
    figure.update_layout(yaxis=dict(range=[0, 1], title="probability"), xaxis=dict(tickangle=-45, automargin=True),
                         height=420,
                         margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h"))
    return figure


def input_ui(predictor: Predictor):
    """Draw the image and caption inputs; return (image or None, caption, error message or None)."""
    options = ("Upload an image" if predictor.uses_images else "Type a caption", "Pick a dataset sample")
    source = st.radio("Input", options, horizontal=True, key="predict_source")
    image, caption, error = None, "", None
    if source == options[0]:
        upload = None
        if predictor.uses_images:
            upload = st.file_uploader("Image (JPEG, PNG or WebP)", type=["jpg", "jpeg", "png", "webp"],
                                      key="predict_upload")
        caption = st.text_input("Caption", key="predict_caption", disabled=not predictor.config["captions"],
                                placeholder="A man riding a horse on a beach")
        if upload is not None:
            try:
                image = decode_upload(upload.getvalue(), upload.name)
            except ValueError as decode_error:
                error = str(decode_error)
        return image, caption, error

    try:
        dataset_labels, samples = sample_rows(dataset_version(st.session_state["dataset_path"]))
    except (ValueError, FileNotFoundError) as load_error:
        return None, "", str(load_error)
    if set(dataset_labels) != set(predictor.labels):
        st.warning(f"This run was trained on other labels ({len(predictor.labels)}) than the dataset's "
                   f"({len(dataset_labels)}), so its predictions do not match the true labels shown.")
    labels = {index: f"{row['ImageID']}: {row['Caption'][:60]}" for index, row in enumerate(samples)}
    index = st.selectbox("Sample", list(labels), format_func=labels.get, key="predict_sample")
    row = samples[index]
    st.caption(f"True labels: {', '.join(row['labels'])}")
    caption = row["Caption"]
    if predictor.uses_images:
        if row["path"] is None or not Path(row["path"]).is_file():
            return None, caption, f"image {row['ImageID']} not found in the dataset's data/ folder"
        try:
            image = datasets.open_image(row["path"])
        except ValueError as decode_error:
            error = str(decode_error)
    return image, caption, error


def main() -> None:
    if "runs_dir" not in st.session_state:
        # NOTE: on a fresh server, Streamlit runs a deep-linked file under pages/ directly, without
        # app.py, until some session has run app.py's st.navigation. Go through app.py and come back.
        st.session_state["requested_page"] = "pages/predict.py"
        st.switch_page("app.py")
    st.title("Predict")
    runs = finished_runs(st.session_state["runs_dir"])
    if not runs:
        st.info("No finished run yet. Train one on the Train page first.")
        st.stop()
    status = {run.name: run.status for run in runs}
    names = [run.name for run in runs]
    chosen = st.selectbox("Run", names, key="predict_run", format_func=lambda name: f"{name} ({status[name]})")
    run_dir = runs[names.index(chosen)].path

    try:
        predictor = load_predictor(str(run_dir), (run_dir / "best.pt").stat().st_mtime_ns)
    except (ValueError, FileNotFoundError) as error:
        st.error(str(error))
        st.stop()
    st.caption(f"{predictor.config['model']}, captions {'on' if predictor.config['captions'] else 'off'}, "
               f"best epoch {predictor.epoch}; labels: {len(predictor.labels)}")

    image, caption, error = input_ui(predictor)
    if error:
        st.error(error)
        st.stop()
    if predictor.uses_images and image is None:
        st.info("Upload an image or pick a dataset sample to see the predicted labels.")
        st.stop()
    if not predictor.uses_images and not caption.strip():
        st.info("This run reads captions only. Type a caption to see the predicted labels.")
        st.stop()

    scores = predictor.predict(image, caption)
    output = st
    if image is not None:
        columns = st.columns([1, 2])
        preview = image.copy()
        preview.thumbnail((640, 640))
        columns[0].image(preview, caption=caption or None, width="stretch")
        output = columns[1]
    predicted = [score.name for score in scores if score.predicted]
    output.markdown("**Predicted labels:** " + ", ".join(predicted))
    output.plotly_chart(probabilities_figure(scores), key="predict_chart")
    st.caption("Bars are label probabilities and red marks the run's decision threshold for each label. "
               "The most probable label is always predicted.")


main()
