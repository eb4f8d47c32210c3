"""Compare page: runs side by side, per-epoch curves, per-label F1 and ablation deltas."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from core import compare
from core.runs import list_runs

MISSING = "–"  # shown for values a run does not have yet
CURVES = (("train_loss", "Train loss"), ("val_loss", "Validation loss"), ("samples_f1_score", "Samples F1"))

# Human-readable headers. The data and the CSV keep the names used in config.json and progress.jsonl.
TITLES = {
    "run": "run", "model": "model", "status": "status", "epochs_done": "epochs done",
    "epochs_planned": "epochs planned", "best_epoch": "best epoch", "train_loss": "train loss",
    "val_loss": "validation loss", "samples_f1_score": "samples F1", "micro_f1_score": "micro F1",
    "macro_f1_score": "macro F1", "captions": "captions", "pretrained": "pretrained", "dropout": "dropout",
    "batch_norm": "batch norm", "conv_layers": "conv layers", "fc_layers": "FC layers",
    "image_size": "image size (px)", "loss": "loss", "sampler": "sampler", "pos_weight": "pos_weight",
    "parameters": "parameters", "trainable_parameters": "trainable parameters",
    "training_seconds": "training time (s)", "train_images_per_second": "images/s",
    "ablation_group": "ablation group", "ablation_variant": "variant", "error": "error",
    "samples_f1_score_delta": "Δ samples F1", "micro_f1_score_delta": "Δ micro F1",
    "macro_f1_score_delta": "Δ macro F1", "val_loss_delta": "Δ validation loss", "base_run": "base run",
}
HELP = {
    "best_epoch": "The epoch with the highest samples F1; the losses and scores in this row are from it.",
    "batch_norm": "The batch norm switch of basic_cnn and cnn2; the pretrained backbones have batch norm built in.",
    "training_seconds": "Training plus validation time summed over finished epochs.",
    "train_images_per_second": "Training images per second, averaged over finished epochs.",
    "samples_f1_score_delta": "This run minus the group's base run.",
    "val_loss_delta": "This run minus the group's base run; negative is better.",
}
FORMATS = {
    "train_loss": "{:.4f}", "val_loss": "{:.4f}", "samples_f1_score": "{:.3f}", "micro_f1_score": "{:.3f}",
    "macro_f1_score": "{:.3f}", "dropout": "{:.2f}", "parameters": "{:,}", "trainable_parameters": "{:,}",
    "training_seconds": "{:.1f}", "train_images_per_second": "{:.0f}",
    "samples_f1_score_delta": "{:+.3f}", "micro_f1_score_delta": "{:+.3f}", "macro_f1_score_delta": "{:+.3f}",
    "val_loss_delta": "{:+.4f}",
}


def show_table(table: pd.DataFrame) -> None:
    """Draw `table` with readable headers, rounded numbers and a dash for missing values."""
    styled = table.style.format(na_rep=MISSING).format(
        {column: fmt for column, fmt in FORMATS.items() if column in table.columns}, na_rep=MISSING
    )
    column_config = {column: st.column_config.Column(TITLES.get(column, column), help=HELP.get(column))
                     for column in table.columns}
    # The grid draws missing cells with `placeholder` whatever the Styler's display text is.
    st.dataframe(styled, hide_index=True, width="stretch", column_config=column_config, placeholder=MISSING)


def run_picker_ui(runs_dir: str) -> list[Path]:
    """Draw the run multiselect and return the chosen run folders; with no runs, stop the page with a note."""
    runs = list_runs(runs_dir)
    if not runs:
        st.info(f"No runs in {runs_dir} yet. Start one on the Train page, then come back to compare.",
                icon=":material/model_training:")
        st.page_link("pages/train.py", label="Go to the Train page", icon=":material/arrow_forward:")
        st.stop()

    by_name = {run.name: run for run in runs}  # newest first, as list_runs returns them
    finished = [run.name for run in runs if run.status == "finished"]
    st.session_state.setdefault("compare_runs", finished or list(by_name))
    # Drop runs that were deleted since the last visit, so the widget never contains an unknown option.
    st.session_state["compare_runs"] = [name for name in st.session_state["compare_runs"] if name in by_name]
    chosen = st.multiselect(
        "Runs", list(by_name), key="compare_runs",
        format_func=lambda name: f"{name} ({by_name[name].model}, {by_name[name].status})",
        help="Runs in the runs folder, newest first. At first the finished runs are selected, "
             "or every run when none has finished.",
    )
    if any(by_name[name].status == "running" for name in chosen):
        columns = st.columns([4, 1])
        columns[0].caption("Some selected runs are still training; they show the epochs finished so far.")
        columns[1].button("Refresh", icon=":material/refresh:")
    return [by_name[name].path for name in chosen]


def curves_ui(curves: pd.DataFrame) -> None:
    st.subheader("Curves")
    if curves.empty:
        st.write("No selected run has finished an epoch yet.")
        return
    for column, (metric, title) in zip(st.columns(len(CURVES)), CURVES):
        points = curves[curves["metric"] == metric]
        figure = px.line(points, x="epoch", y="value", color="run", markers=True, title=title,
                         labels={"value": title, "epoch": "epoch"})
        figure.update_layout(legend={"orientation": "h", "y": -0.25}, margin={"t": 40})
        figure.update_xaxes(dtick=1)
        column.plotly_chart(figure, width="stretch")


def per_label_ui(per_label: pd.DataFrame) -> None:
    st.subheader("Per-label F1")
    if per_label.empty:
        st.write("No selected run has per-label scores yet.")
        return
    figure = px.bar(
        per_label, x="name", y="f1_score", color="run", barmode="group",
        hover_data=["label", "precision_score", "recall_score", "support", "source"],
        labels={"name": "label", "f1_score": "F1"},
    )
    figure.update_yaxes(range=[0, 1])
    st.plotly_chart(figure, width="stretch")
    st.caption("Scores at the best epoch: from metrics.json for finished runs, else from the best epoch's event.")


def ablation_ui(selected: list[Path], runs_dir: str) -> None:
    st.subheader("Ablations")
    scope = st.radio("Runs in the ablation table", ("Selected runs", "All runs in the folder"),
                     key="compare_ablation_scope", horizontal=True)
    paths = selected if scope == "Selected runs" else [run.path for run in list_runs(runs_dir)]
    try:
        table = compare.ablation_table(paths)
    except (ValueError, FileNotFoundError) as error:
        st.error(str(error))
        st.stop()
    if table.empty:
        st.write("None of these runs belongs to an ablation group. Queue an ablation set on the Train page.")
        return
    show_table(table)
    groups_without_base = sorted(table.loc[table["base_run"].isna(), "ablation_group"].unique())
    if groups_without_base:
        st.caption(f"No base run for {', '.join(groups_without_base)} among these runs, so the changes are "
                   "missing; select its base run or show all runs in the folder.")


def main() -> None:
    if "runs_dir" not in st.session_state:
        # NOTE: on a fresh server, Streamlit runs a deep-linked file under pages/ directly, without
        # app.py, until some session has run app.py's st.navigation. Go through app.py and come back.
        st.session_state["requested_page"] = "pages/compare.py"
        st.switch_page("app.py")
    st.session_state.setdefault("compare_ablation_scope", "Selected runs")
    st.title("Compare runs")
    runs_dir = st.session_state["runs_dir"]
    selected = run_picker_ui(runs_dir)
    if not selected:
        st.info("Select one or more runs above to compare them.")
        st.stop()

    try:
        records = compare.load_runs(selected)
        table = compare.compare_table(records)
        curves = compare.epoch_curves(records)
        per_label = compare.per_label_f1(records)
    except (ValueError, FileNotFoundError) as error:
        st.error(str(error))
        st.stop()

    st.subheader("Side by side")
    show_table(table)
    st.download_button("Download CSV", compare.to_csv(table), file_name="runs-comparison.csv", mime="text/csv",
                       icon=":material/download:", on_click="ignore")
    curves_ui(curves)
    per_label_ui(per_label)
    ablation_ui(selected, runs_dir)


main()
