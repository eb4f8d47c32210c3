"""Train page: queue training runs and ablation sets, and follow them live."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import jobs
from core.datasets import AUGMENTATIONS
from core.models import get_model_spec, list_models
from core.runs import final_event, read_progress, run_progress, tail_text
from core.trainer import (
    LOSSES,
    NORMALIZATIONS,
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULERS,
    TrainConfig,
    ablation_configs,
    available_devices,
)

DEFAULTS = TrainConfig()
REFRESH_SECONDS = 2.0


def settings_form_ui(model: str) -> tuple[TrainConfig | None, str | None, str]:
    """Draw the settings form for `model`; return (config, run name, action) once submitted."""
    spec = get_model_spec(model)
    # Enter in a number field would otherwise queue a run before the form is complete.
    with st.form("train_settings", enter_to_submit=False):
        st.markdown("**Model**")
        columns = st.columns(4)
        captions = columns[0].checkbox("Caption branch", value=True, disabled=model == "caption_only",
                                       help="Fuse the caption trigram counts into the first fully connected layer.")
        pretrained = columns[1].checkbox("Pretrained (ImageNet)", value=spec.supports_pretrained,
                                         disabled=not spec.supports_pretrained)
        freeze = columns[2].checkbox("Freeze backbone", value=False, disabled=not spec.uses_images,
                                     help="Train only the head and the caption branch.")
        batch_norm = columns[3].checkbox("Batch norm", value=False, disabled=model not in ("basic_cnn", "cnn2"),
                                         help="Batch normalisation after each convolution.")
        columns = st.columns(4)
        conv_layers = columns[0].selectbox("Conv layers", (4, 5), disabled=model != "cnn2")
        fc_choice = columns[1].selectbox("FC layers", ("model default", 1, 2, 3))
        dropout = columns[2].slider("Dropout", 0.0, 0.9, DEFAULTS.dropout, 0.05, help="0 disables dropout.")
        image_size = columns[3].number_input(
            "Image size (px)", min_value=max(32, spec.min_input_size), max_value=1024,
            value=max(spec.input_size, 32), step=16, disabled=not spec.uses_images,
        )

        st.markdown("**Loss and optimisation**")
        columns = st.columns(4)
        loss = columns[0].selectbox("Loss", LOSSES, help="bce: BCE with logits; soft_margin: multi-label soft margin.")
        pos_weight = columns[1].checkbox("Per-label pos_weight (bce)", value=False)
        sampler = columns[2].selectbox("Sampler", SAMPLERS, help="weighted: draw rows with rare labels more often.")
        optimizer = columns[3].selectbox("Optimizer", OPTIMIZERS)
        columns = st.columns(4)
        lr = columns[0].number_input("Learning rate", min_value=1e-6, max_value=1.0, value=DEFAULTS.lr, format="%.5f")
        epochs = columns[1].number_input("Epochs", min_value=1, max_value=500, value=DEFAULTS.epochs)
        batch_size = columns[2].number_input("Batch size", min_value=2, max_value=1024, value=DEFAULTS.batch_size)
        scheduler = columns[3].selectbox("LR schedule", SCHEDULERS)

        st.markdown("**Data and system**")
        columns = st.columns(4)
        augment = columns[0].multiselect("Augmentations", AUGMENTATIONS, default=DEFAULTS.augment,
                                         disabled=not spec.uses_images)
        normalization = columns[1].selectbox("Normalisation", NORMALIZATIONS,
                                             help="auto: the pretrained weights' statistics, else the images' own.")
        device = columns[2].selectbox("Device", available_devices(), help="auto picks CUDA, then Apple MPS, then CPU.")
        run_name = columns[3].text_input("Run name (optional)", help="Letters, digits, '.', '_' and '-'.")
        columns = st.columns(5)
        skip_bad_rows = columns[0].checkbox(
            "Skip bad rows", value=False,
            help="Leave out rows that are invalid or whose image is missing or unreadable, and list them in the "
                 "run folder's skipped_rows.csv. Without it, such rows stop the run before training.")
        amp = columns[1].checkbox("Mixed precision", value=DEFAULTS.amp,
                                  help="float16 or bfloat16 on CUDA; bfloat16 on CPUs that support it natively.")
        channels_last = columns[2].checkbox("Channels-last", value=DEFAULTS.channels_last,
                                            disabled=not spec.uses_images, help="Memory format for image models.")
        image_cache = columns[3].checkbox(
            "Image cache", value=DEFAULTS.image_cache, disabled=not spec.uses_images,
            help="Decode and resize each image once and keep it in the runs folder's .cache/images; "
                 "without it, images are decoded again in every epoch.")
        feature_cache = columns[4].checkbox(
            "Feature cache", value=DEFAULTS.feature_cache, disabled=not spec.uses_images,
            help="With a frozen backbone, compute its features once and train the head on them "
                 "(augmentations are then not applied).")

        columns = st.columns([1, 2, 3])
        queue_one = columns[0].form_submit_button("Queue run", type="primary")
        queue_ablation = columns[1].form_submit_button(
            "Queue ablation set", help="The base run plus one run each without dropout, without captions "
                                       "and with batch norm (where the model has the switch).")

    if not (queue_one or queue_ablation):
        return None, None, ""
    config = TrainConfig(
        data=st.session_state["dataset_path"], model=model, captions=captions or model == "caption_only",
        pretrained=pretrained if spec.supports_pretrained else None, freeze_backbone=freeze, dropout=dropout,
        batch_norm=batch_norm, conv_layers=conv_layers, fc_layers=None if fc_choice == "model default" else fc_choice,
        image_size=int(image_size) if spec.uses_images else None, normalization=normalization, augment=list(augment),
        loss=loss, pos_weight=pos_weight, sampler=sampler, optimizer=optimizer, lr=float(lr), epochs=int(epochs),
        batch_size=int(batch_size), scheduler=scheduler, device=device, skip_bad_rows=skip_bad_rows, amp=amp,
        channels_last=channels_last, image_cache=image_cache, feature_cache=feature_cache,
    )
    return config, run_name.strip() or None, "ablation" if queue_ablation else "run"


def follow(job_id: str) -> None:
    # Runs before the "Follow run" selectbox of this script run exists, so its state may be set.
    st.session_state["train_selected_job"] = job_id
    st.session_state["train_follow"] = job_id


def queue_ui(config: TrainConfig, run_name: str | None, action: str) -> None:
    runs_dir = st.session_state["runs_dir"]
    try:
        if action == "ablation":
            group = run_name or f"ablation-{datetime.now():%Y%m%d-%H%M%S}"
            for variant in ablation_configs(config, group):
                name = jobs.new_run_name(config.model, variant.ablation_variant.replace("_", "-"))
                jobs.enqueue(jobs.train_arguments(variant), name, runs_dir)
                if variant.ablation_variant == "base":
                    follow(name)
            st.success(f"Queued ablation set {group}.")
        else:
            name = run_name or jobs.new_run_name(config.model)
            jobs.enqueue(jobs.train_arguments(config), name, runs_dir)
            follow(name)
            st.success(f"Queued run {name}.")
    except (ValueError, FileNotFoundError) as error:
        st.error(str(error))


def curves_figure(history: list[dict], keys: list[tuple[str, str]], title: str) -> go.Figure:
    figure = go.Figure()
    epochs = [entry["epoch"] for entry in history]
    for key, label in keys:
        figure.add_trace(go.Scatter(x=epochs, y=[entry.get(key) for entry in history], mode="lines+markers", name=label))
    figure.update_layout(title=title, xaxis_title="epoch", height=300, margin=dict(l=10, r=10, t=40, b=10))
    return figure


def job_detail_ui(job: jobs.Job) -> None:
    runs_dir = Path(st.session_state["runs_dir"])
    run_dir = runs_dir / job.run_name
    has_run = (run_dir / "config.json").is_file()
    progress = run_progress(run_dir) if has_run else None

    if job.state == "queued":
        st.progress(0.0, text="Queued: waits for the runs before it.")
    elif progress is None:
        st.progress(0.0, text=f"{job.state.capitalize()}: preparing the data.")
    else:
        text = f"Epoch {progress.epoch}/{progress.epochs_planned}"
        if progress.steps and job.state == "running":
            text += f", step {progress.step}/{progress.steps}"
        st.progress(progress.fraction, text=f"{job.state.capitalize()}: {text}")

    if job.state in ("queued", "running"):
        if st.button("Cancel", key=f"cancel-{job.id}", help="A running job stops after its current step."):
            jobs.cancel(job.id, runs_dir)
            st.rerun()

    if progress is not None and progress.history:
        columns = st.columns(2)
        columns[0].plotly_chart(curves_figure(progress.history, [("train_loss", "train loss"), ("val_loss", "validation loss")],
                                              "Loss"), key=f"loss-{job.id}")
        columns[1].plotly_chart(curves_figure(progress.history, [("samples_f1_score", "samples F1"),
                                                                 ("micro_f1_score", "micro F1"),
                                                                 ("macro_f1_score", "macro F1")], "Validation F1"),
                                key=f"f1-{job.id}")
    final = final_event(read_progress(run_dir / "progress.jsonl")) if has_run else None
    if job.state == "cancelled":
        st.info("Cancelled. A run that had started keeps its last completed epoch in last.pt.")
    elif final is not None and final["event"] == "run_failed":
        st.error(f"{final.get('error_type')}: {final.get('message')}")
    elif job.state == "failed":
        # The run stopped before its folder existed (invalid data, for example): the job log has the reason.
        reason = jobs.failure_reason(runs_dir, job.id) or "The training process ended with an error; see the log."
        st.error(reason.replace("\n", "  \n"))  # Markdown needs two spaces to keep a line break
    if job.state in ("cancelled", "failed") and jobs.resumable(job.run_name, runs_dir):
        done = len(progress.history) if progress is not None else 0
        if st.button(f"Resume after epoch {done}", key=f"resume-{job.id}",
                     help="Queue a job that continues this run in its folder, with its own settings."):
            try:
                resumed = jobs.enqueue_resume(job.run_name, runs_dir)
            except ValueError as error:
                st.error(str(error))
            else:
                st.session_state["train_pending_follow"] = resumed.id
                st.rerun()
    log = tail_text(run_dir / "train.log") if has_run else ""
    log = log or tail_text(jobs.log_path(runs_dir, job.id))
    with st.expander("Log", expanded=job.state == "failed"):
        st.code(log or "(no output yet)", language=None)


@st.fragment(run_every=REFRESH_SECONDS)
def jobs_ui() -> None:
    runs_dir = st.session_state["runs_dir"]
    all_jobs = jobs.list_jobs(runs_dir)
    if not all_jobs:
        st.write("No runs queued from the dashboard yet.")
        return
    if not jobs.worker_running(runs_dir):
        jobs.refresh_job_states(runs_dir)
        all_jobs = jobs.list_jobs(runs_dir)
        if any(job.state == "queued" for job in all_jobs):
            jobs.ensure_worker(runs_dir)

    table = pd.DataFrame([
        {"run": job.id, "state": job.state,
         "queued at": datetime.fromtimestamp(job.created).strftime("%H:%M:%S"),
         "minutes": round(((job.ended or datetime.now().timestamp()) - job.started) / 60, 1) if job.started else None}
        for job in reversed(all_jobs)
    ])
    st.dataframe(table, hide_index=True, width="stretch", placeholder="-")

    names = [job.id for job in reversed(all_jobs)]
    running = next((job.id for job in all_jobs if job.state == "running"), None)
    if "train_pending_follow" in st.session_state:
        follow(st.session_state.pop("train_pending_follow"))
    selected = st.session_state.get("train_selected_job")
    if selected not in names:
        selected = running or names[0]
    choice = st.selectbox("Follow run", names, index=names.index(selected), key="train_follow")
    st.session_state["train_selected_job"] = choice
    job_detail_ui(next(job for job in all_jobs if job.id == choice))


def main() -> None:
    if "runs_dir" not in st.session_state:
        # NOTE: on a fresh server, Streamlit runs a deep-linked file under pages/ directly, without
        # app.py, until some session has run app.py's st.navigation. Go through app.py and come back.
        st.session_state["requested_page"] = "pages/train.py"
        st.switch_page("app.py")
    st.title("Train")
    st.caption(f"Dataset: {st.session_state['dataset_path']}. Runs train one at a time in background "
               "processes and keep going if you close this page.")
    models = list_models()
    model = st.selectbox("Architecture", models, index=models.index(DEFAULTS.model),
                         format_func=lambda name: f"{name}: {get_model_spec(name).description}")
    if get_model_spec(model).uses_images and not (Path(st.session_state["dataset_path"]) / "data").is_dir():
        st.warning("This dataset has no data/ folder, so only caption_only can train on it.")
    if get_model_spec(model).pretrained_weights not in (None, "efficientnet-lite0"):
        st.caption("Pretrained torchvision weights are downloaded on first use. Offline, untick Pretrained, "
                   "or copy the weights file into the torch cache (~/.cache/torch/hub/checkpoints).")
    config, run_name, action = settings_form_ui(model)
    if config is not None:
        queue_ui(config, run_name, action)
    st.subheader("Queue and progress")
    jobs_ui()


main()
