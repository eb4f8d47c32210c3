"""Run comparison: side-by-side tables, per-epoch curves, per-label F1 and ablation deltas.

Every function takes run folders (paths, or `RunRecord`s from `load_runs` so that one
page render reads each folder once) and returns a pandas DataFrame with the names
used in `progress.jsonl` and `config.json` (`samples_f1_score`, `val_loss`, ...).
Figures of a run come from its best epoch, the `epoch_end` event with the highest
`samples_f1_score` (the earliest one on a tie, as in `core.runs.summarize_run`).
A run that is still training, failed or was interrupted contributes the epochs it
finished. A run with no finished epoch gets missing values, never an error.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from core.models import get_model_spec
from core.runs import RunSummary, read_json, read_progress, summarize_run
from core.trainer import ABLATION_VARIANTS

logger = logging.getLogger(__name__)

SCORE_METRICS = ("samples_f1_score", "micro_f1_score", "macro_f1_score")
CURVE_METRICS = ("train_loss", "val_loss", *SCORE_METRICS)
ABLATION_METRICS = (*SCORE_METRICS, "val_loss")
SWITCHES = (
    "captions", "pretrained", "dropout", "batch_norm", "conv_layers", "fc_layers", "image_size",
    "loss", "sampler", "pos_weight",
)
COMPARE_COLUMNS = (
    "run", "model", "status", "epochs_done", "epochs_planned", "best_epoch",
    "train_loss", "val_loss", *SCORE_METRICS,
    *SWITCHES,
    "parameters", "trainable_parameters", "training_seconds", "train_images_per_second",
    "ablation_group", "ablation_variant", "error",
)
INTEGER_COLUMNS = ("epochs_done", "epochs_planned", "best_epoch", "conv_layers", "fc_layers", "image_size",
                   "parameters", "trainable_parameters", "epoch", "label", "support")
FLOAT_COLUMNS = ("train_loss", "val_loss", *SCORE_METRICS, "dropout", "training_seconds", "train_images_per_second",
                 "value", "f1_score", "precision_score", "recall_score",
                 *(f"{metric}_delta" for metric in ABLATION_METRICS))
CURVE_COLUMNS = ("run", "epoch", "metric", "value")
PER_LABEL_COLUMNS = ("run", "label", "name", "f1_score", "precision_score", "recall_score", "support", "source")
ABLATION_COLUMNS = (
    "ablation_group", "ablation_variant", "run", "status", "best_epoch",
    *(column for metric in ABLATION_METRICS for column in (metric, f"{metric}_delta")),
    "base_run",
)


@dataclass
class RunRecord:
    """The contents of one run folder, read once: settings, status, finished epochs and final metrics."""

    path: Path
    config: dict[str, Any]
    summary: RunSummary  # status and error, as `python -m core runs` reports them
    epochs: list[dict[str, Any]]  # `epoch_end` events in file order
    started_time: float | None  # `time` of the first `run_started` event
    final_metrics: dict[str, Any] | None  # metrics.json of a finished run, else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def best_epoch(self) -> dict[str, Any] | None:
        """The `epoch_end` event with the highest samples F1, or None before the first epoch ends."""
        if not self.epochs:
            return None
        return max(self.epochs, key=lambda event: _number(event.get("samples_f1_score"), float("-inf")))


def load_run(run_dir: str | os.PathLike) -> RunRecord:
    """Read a run folder's config.json, progress.jsonl and metrics.json.

    Raises:
        FileNotFoundError: the folder has no config.json.
        ValueError: config.json is not valid JSON or not a JSON object.
    """
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"run folder {path} has no config.json; choose a folder written by 'python -m core train'"
        )
    summary = summarize_run(path)
    config = read_json(path / "config.json")
    events = read_progress(path / "progress.jsonl")
    epochs = [event for event in events if event["event"] == "epoch_end"]
    started = next((event for event in events if event["event"] == "run_started"), None)
    return RunRecord(
        path=path,
        config=config,
        summary=summary,
        epochs=epochs,
        started_time=_number(started.get("time"), None) if started else None,
        final_metrics=_read_final_metrics(path / "metrics.json"),
    )


def load_runs(run_dirs: Sequence[str | os.PathLike | RunRecord]) -> list[RunRecord]:
    """Read every run folder in order; `RunRecord`s pass through unchanged."""
    return [run if isinstance(run, RunRecord) else load_run(run) for run in run_dirs]


def _read_final_metrics(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        metrics = read_json(path)
    except (OSError, ValueError) as error:
        # The epoch events contain the same figures, so the comparison goes on without this file.
        logger.warning("ignored unreadable %s: %s", path, error)
        return None
    return metrics if isinstance(metrics, dict) else None


def _number(value: Any, default: float | None = math.nan) -> float | None:
    """Return `value` as a float, or `default` when it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


# ----------------------------------------------------------------------------- side-by-side table


def _switches(config: dict[str, Any]) -> dict[str, Any]:
    """Return the run's switches, filling values left to the model's default (None) from its spec."""
    model = config.get("model")
    try:
        spec = get_model_spec(model)
    except ValueError:
        spec = None  # a run of a model this version no longer registers keeps its raw settings
    switches = {name: config.get(name) for name in SWITCHES}
    if spec is not None:
        if switches["pretrained"] is None:
            switches["pretrained"] = spec.supports_pretrained
        if switches["fc_layers"] is None:
            switches["fc_layers"] = spec.fc_layers
        if switches["image_size"] is None and spec.uses_images:
            switches["image_size"] = spec.input_size
    if model != "cnn2":
        switches["conv_layers"] = None  # only cnn2 reads this setting
    return switches


def _training_seconds(run: RunRecord) -> float:
    """Seconds spent in finished epochs: training plus validation, else first start to last epoch end."""
    timed = [event for event in run.epochs if "train_seconds" in event]
    if timed:
        return sum(_number(event.get("train_seconds"), 0.0) + _number(event.get("val_seconds"), 0.0)
                   for event in timed)
    if run.epochs and run.started_time is not None:
        return _number(run.epochs[-1].get("time")) - run.started_time
    return math.nan


def _mean_images_per_second(run: RunRecord) -> float:
    values = [_number(event.get("train_images_per_second")) for event in run.epochs]
    values = [value for value in values if not math.isnan(value)]
    return sum(values) / len(values) if values else math.nan


def _compare_row(run: RunRecord) -> dict[str, Any]:
    best = run.best_epoch or {}
    config = run.config
    return {
        "run": run.name,
        "model": config.get("model"),
        "status": run.summary.status,
        "epochs_done": len(run.epochs),
        "epochs_planned": config.get("epochs"),
        "best_epoch": best.get("epoch"),
        "train_loss": _number(best.get("train_loss")),
        "val_loss": _number(best.get("val_loss")),
        **{metric: _number(best.get(metric)) for metric in SCORE_METRICS},
        **_switches(config),
        "parameters": config.get("parameters"),
        "trainable_parameters": config.get("trainable_parameters"),
        "training_seconds": _training_seconds(run),
        "train_images_per_second": _mean_images_per_second(run),
        "ablation_group": config.get("ablation_group"),
        "ablation_variant": config.get("ablation_variant"),
        "error": run.summary.error,
    }


def compare_table(run_dirs: Sequence[str | os.PathLike | RunRecord]) -> pd.DataFrame:
    """Return one row per run, in the given order, with columns `COMPARE_COLUMNS`.

    Losses and F1 scores are those of the best epoch. `training_seconds` sums
    `train_seconds` and `val_seconds` over finished epochs. For events without them,
    it is the time from `run_started` to the last `epoch_end`. `train_images_per_second`
    is the mean over finished epochs. Missing values are NaN, or <NA> in integer columns.

    Raises:
        FileNotFoundError, ValueError: a folder is not a readable run folder.
    """
    rows = [_compare_row(run) for run in load_runs(run_dirs)]
    return _typed(pd.DataFrame(rows, columns=list(COMPARE_COLUMNS)))


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """Give number columns a number type even when the table is empty or a value is missing."""
    for column in table.columns:
        if column in INTEGER_COLUMNS:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
        elif column in FLOAT_COLUMNS:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    return table


def to_csv(table: pd.DataFrame) -> bytes:
    """Return `table` as UTF-8 CSV bytes without the index, for a download."""
    return table.to_csv(index=False).encode("utf-8")


# ----------------------------------------------------------------------------- curves and per-label scores


def epoch_curves(run_dirs: Sequence[str | os.PathLike | RunRecord]) -> pd.DataFrame:
    """Return every finished epoch's losses and F1 scores in long format: run, epoch, metric, value.

    A run with no finished epoch contributes no rows.
    """
    rows = []
    for run in load_runs(run_dirs):
        for index, event in enumerate(run.epochs, start=1):
            epoch = event.get("epoch", index)
            for metric in CURVE_METRICS:
                value = _number(event.get(metric))
                if not math.isnan(value):
                    rows.append({"run": run.name, "epoch": epoch, "metric": metric, "value": value})
    return _typed(pd.DataFrame(rows, columns=list(CURVE_COLUMNS)))


def per_label_f1(run_dirs: Sequence[str | os.PathLike | RunRecord]) -> pd.DataFrame:
    """Return each run's per-label precision, recall and F1, sorted by label, then by run order.

    The scores come from metrics.json when the run wrote it (`source` "metrics.json"),
    else from the best epoch's `per_label` list (`source` "epoch N").
    """
    rows = []
    for order, run in enumerate(load_runs(run_dirs)):
        per_label, source = None, None
        if run.final_metrics and isinstance(run.final_metrics.get("per_label"), list):
            per_label, source = run.final_metrics["per_label"], "metrics.json"
        elif run.best_epoch and isinstance(run.best_epoch.get("per_label"), list):
            per_label, source = run.best_epoch["per_label"], f"epoch {run.best_epoch.get('epoch')}"
        for entry in per_label or []:
            if not isinstance(entry, dict) or "label" not in entry:
                continue
            rows.append({
                "run": run.name,
                "label": entry["label"],
                "name": str(entry.get("name", entry["label"])),
                "f1_score": _number(entry.get("f1_score")),
                "precision_score": _number(entry.get("precision_score")),
                "recall_score": _number(entry.get("recall_score")),
                "support": entry.get("support"),
                "source": source,
                "_order": order,
            })
    table = pd.DataFrame(rows, columns=[*PER_LABEL_COLUMNS, "_order"])
    table = table.sort_values(["label", "_order"], kind="stable").drop(columns="_order")
    return _typed(table.reset_index(drop=True))


# ----------------------------------------------------------------------------- ablations


def _variant_rank(variant: Any) -> int:
    return ABLATION_VARIANTS.index(variant) if variant in ABLATION_VARIANTS else len(ABLATION_VARIANTS)


def _base_preference(run: RunRecord) -> tuple[bool, bool, float]:
    """Sort key for choosing among base runs: finished first, then with an epoch, then the latest started."""
    started = run.started_time if run.started_time is not None else (run.path / "config.json").stat().st_mtime
    return run.summary.status == "finished", bool(run.epochs), started


def ablation_table(run_dirs: Sequence[str | os.PathLike | RunRecord]) -> pd.DataFrame:
    """Return each ablation run's best-epoch scores and their change against its group's base run.

    Runs without `ablation_group` are left out. Rows are ordered by group, then by
    variant (base, no_dropout, no_captions, batch_norm), then by run name. For each
    metric in `ABLATION_METRICS`, `<metric>_delta` is the run's value minus the base
    run's value, so a negative `samples_f1_score_delta` means the change cost F1 and
    a negative `val_loss_delta` means it lowered the loss. When a group has several
    base runs, the reference (`base_run`) is a finished one over one still training
    or stopped, then one with a finished epoch, then the most recently started.
    Deltas are NaN when the group has no base run or either run has no finished epoch.
    """
    groups: dict[str, list[RunRecord]] = {}
    for run in load_runs(run_dirs):
        group = run.config.get("ablation_group")
        if group:
            groups.setdefault(str(group), []).append(run)

    rows = []
    for group in sorted(groups):
        runs = sorted(groups[group], key=lambda run: (_variant_rank(run.config.get("ablation_variant")), run.name))
        bases = [run for run in runs if run.config.get("ablation_variant") == "base"]
        base = max(bases, key=_base_preference) if bases else None
        base_best = (base.best_epoch if base else None) or {}
        for run in runs:
            best = run.best_epoch or {}
            row = {
                "ablation_group": group,
                "ablation_variant": run.config.get("ablation_variant"),
                "run": run.name,
                "status": run.summary.status,
                "best_epoch": best.get("epoch"),
            }
            for metric in ABLATION_METRICS:
                row[metric] = _number(best.get(metric))
                row[f"{metric}_delta"] = row[metric] - _number(base_best.get(metric))
            row["base_run"] = base.name if base else None
            rows.append(row)
    return _typed(pd.DataFrame(rows, columns=list(ABLATION_COLUMNS)))
