"""Run comparison tests: side-by-side table, curves, per-label F1, ablation deltas and CSV export."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from core.compare import (
    ABLATION_COLUMNS,
    COMPARE_COLUMNS,
    ablation_table,
    compare_table,
    epoch_curves,
    load_run,
    per_label_f1,
    to_csv,
)
from core.demo import make_demo
from core.runs import write_json
from core.trainer import TrainConfig, train

LABEL_NAMES = {1: "circle", 2: "square"}


def epoch_event(epoch: int, samples: float, val_loss: float, train_loss: float = 0.5, *, micro: float | None = None,
                macro: float | None = None, f1_per_label: tuple[float, float] = (0.5, 0.5), train_seconds: float = 10.0,
                val_seconds: float = 2.0, images_per_second: float = 100.0, time: float | None = None) -> dict:
    """Return an `epoch_end` event as core.trainer writes it, with the given figures."""
    return {
        "time": 1000.0 + 100 * epoch if time is None else time,
        "event": "epoch_end",
        "epoch": epoch,
        "train_loss": train_loss,
        "train_seconds": train_seconds,
        "train_images_per_second": images_per_second,
        "val_loss": val_loss,
        "samples_f1_score": samples,
        "micro_f1_score": samples + 0.05 if micro is None else micro,
        "macro_f1_score": samples - 0.1 if macro is None else macro,
        "per_label": [
            {"label": label, "name": name, "precision_score": 0.6, "recall_score": 0.4, "f1_score": f1, "support": 10}
            for (label, name), f1 in zip(LABEL_NAMES.items(), f1_per_label)
        ],
        "val_seconds": val_seconds,
        "lr": 0.001,
    }


def write_run(runs_dir: Path, name: str, epoch_events: list[dict], *, finished: bool = True, started: float = 1000.0,
              partial_line: str | None = None, metrics: dict | None = None, **config) -> Path:
    """Write a run folder by hand: config.json, progress.jsonl and optionally metrics.json."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    settings = {
        "model": "cnn2", "captions": True, "pretrained": False, "dropout": 0.5, "batch_norm": False,
        "conv_layers": 4, "fc_layers": None, "image_size": 32, "loss": "bce", "sampler": "none",
        "pos_weight": False, "epochs": 3, "ablation_group": None, "ablation_variant": None,
        "labels": list(LABEL_NAMES), "label_names": {str(label): text for label, text in LABEL_NAMES.items()},
        "parameters": 1234, "trainable_parameters": 1200, "train_rows": 32,
    }
    settings.update(config)
    write_json(run_dir / "config.json", settings)
    # pid 0 is never alive, so a run without a final event reads as interrupted.
    events = [{"time": started, "event": "run_started", "pid": 0, "config": settings}, *epoch_events]
    if finished:
        events.append({"time": started + 1000, "event": "run_finished", "best_metric": 0.0})
    text = "".join(json.dumps(event) + "\n" for event in events)
    (run_dir / "progress.jsonl").write_text(text + (partial_line or ""), encoding="utf-8")
    if metrics is not None:
        write_json(run_dir / "metrics.json", metrics)
    return run_dir


@pytest.fixture
def base_run(tmp_path) -> Path:
    # Epoch 2 has the best samples F1 although epoch 3 has the lowest train loss.
    return write_run(tmp_path, "base", [
        epoch_event(1, samples=0.40, val_loss=0.50, train_loss=0.60, train_seconds=10, val_seconds=2,
                    images_per_second=100, f1_per_label=(0.5, 0.1)),
        epoch_event(2, samples=0.70, val_loss=0.35, train_loss=0.40, micro=0.72, macro=0.55, train_seconds=11,
                    val_seconds=2, images_per_second=120, f1_per_label=(0.9, 0.4)),
        epoch_event(3, samples=0.65, val_loss=0.38, train_loss=0.30, train_seconds=9, val_seconds=1,
                    images_per_second=140, f1_per_label=(0.8, 0.3)),
    ], ablation_group="g", ablation_variant="base")


@pytest.fixture
def no_captions_run(tmp_path) -> Path:
    return write_run(tmp_path, "nocap", [
        epoch_event(1, samples=0.50, val_loss=0.45),
        epoch_event(2, samples=0.688, val_loss=0.40, micro=0.70, macro=0.60),
    ], captions=False, epochs=2, ablation_group="g", ablation_variant="no_captions")


def test_compare_table_best_epoch_by_samples_f1(base_run):
    row = compare_table([base_run]).iloc[0]
    assert row["best_epoch"] == 2
    assert row["train_loss"] == pytest.approx(0.40)
    assert row["val_loss"] == pytest.approx(0.35)
    assert row["samples_f1_score"] == pytest.approx(0.70)
    assert row["micro_f1_score"] == pytest.approx(0.72)
    assert row["macro_f1_score"] == pytest.approx(0.55)


def test_compare_table_time_and_throughput(base_run):
    row = compare_table([base_run]).iloc[0]
    # (10 + 2) + (11 + 2) + (9 + 1) seconds; images per second (100 + 120 + 140) / 3.
    assert row["training_seconds"] == pytest.approx(35.0)
    assert row["train_images_per_second"] == pytest.approx(120.0)


def test_compare_table_settings_and_status(base_run, no_captions_run):
    table = compare_table([no_captions_run, base_run])
    assert list(table.columns) == list(COMPARE_COLUMNS)
    assert list(table["run"]) == ["nocap", "base"]
    base = table.iloc[1]
    assert base["status"] == "finished"
    assert base["model"] == "cnn2"
    assert base["epochs_done"] == 3
    assert base["epochs_planned"] == 3
    assert base["parameters"] == 1234
    assert base["fc_layers"] == 2  # None in config.json: cnn2's default
    assert base["conv_layers"] == 4
    assert base["ablation_variant"] == "base"
    assert bool(table.iloc[0]["captions"]) is False
    assert bool(base["captions"]) is True


def test_compare_table_conv_layers_only_for_cnn2(tmp_path):
    run = write_run(tmp_path, "basic", [epoch_event(1, 0.5, 0.4)], model="basic_cnn", image_size=None)
    row = compare_table([run]).iloc[0]
    assert pd.isna(row["conv_layers"])
    assert row["image_size"] == 128  # basic_cnn's native size fills a missing image_size


def test_compare_table_run_without_epochs(tmp_path):
    run = write_run(tmp_path, "empty", [], finished=False)
    row = compare_table([run]).iloc[0]
    assert row["status"] == "interrupted"
    assert row["epochs_done"] == 0
    assert pd.isna(row["best_epoch"])
    assert math.isnan(row["val_loss"])
    assert math.isnan(row["samples_f1_score"])
    assert math.isnan(row["training_seconds"])
    assert math.isnan(row["train_images_per_second"])


def test_compare_table_partial_last_line(tmp_path):
    run = write_run(tmp_path, "partial", [epoch_event(1, samples=0.3, val_loss=0.6)], finished=False,
                    partial_line='{"time": 1200.0, "event": "epoch_end", "epoch": 2, "samples_f1')
    row = compare_table([run]).iloc[0]
    assert row["epochs_done"] == 1
    assert row["best_epoch"] == 1
    assert row["samples_f1_score"] == pytest.approx(0.3)
    assert row["status"] == "interrupted"


def test_compare_table_failed_run_keeps_epochs(tmp_path):
    run = write_run(tmp_path, "failed", [epoch_event(1, samples=0.3, val_loss=0.6)], finished=False)
    with (run / "progress.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": 1300.0, "event": "run_failed", "error_type": "FloatingPointError",
                                 "message": "training loss became nan"}) + "\n")
    row = compare_table([run]).iloc[0]
    assert row["status"] == "failed"
    assert row["error"] == "FloatingPointError: training loss became nan"
    assert row["samples_f1_score"] == pytest.approx(0.3)


def test_compare_table_time_without_epoch_seconds(tmp_path):
    # Older events carry no train_seconds: the time runs from run_started to the last epoch_end.
    events = [epoch_event(1, 0.4, 0.5, time=1030.0), epoch_event(2, 0.5, 0.4, time=1075.0)]
    for event in events:
        del event["train_seconds"], event["val_seconds"]
    run = write_run(tmp_path, "untimed", events, started=1000.0)
    assert compare_table([run]).iloc[0]["training_seconds"] == pytest.approx(75.0)


def test_compare_table_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        compare_table([tmp_path / "nothing"])


def test_compare_table_empty_selection():
    table = compare_table([])
    assert table.empty
    assert list(table.columns) == list(COMPARE_COLUMNS)


def test_to_csv_round_trip(base_run, tmp_path):
    empty = write_run(tmp_path, "empty", [], finished=False)
    table = compare_table([base_run, empty])
    read_back = pd.read_csv(io.BytesIO(to_csv(table)))
    assert list(read_back.columns) == list(COMPARE_COLUMNS)
    assert list(read_back["run"]) == ["base", "empty"]
    assert read_back.loc[0, "samples_f1_score"] == pytest.approx(0.70)
    assert read_back.loc[0, "training_seconds"] == pytest.approx(35.0)
    assert read_back.loc[0, "best_epoch"] == 2
    assert pd.isna(read_back.loc[1, "best_epoch"])
    assert pd.isna(read_back.loc[1, "val_loss"])


def test_epoch_curves_long_format(base_run, tmp_path):
    empty = write_run(tmp_path, "empty", [], finished=False)
    curves = epoch_curves([base_run, empty])
    assert list(curves.columns) == ["run", "epoch", "metric", "value"]
    assert set(curves["run"]) == {"base"}
    val_loss = curves[curves["metric"] == "val_loss"].sort_values("epoch")
    assert list(val_loss["epoch"]) == [1, 2, 3]
    assert list(val_loss["value"]) == pytest.approx([0.50, 0.35, 0.38])
    assert len(curves) == 3 * 5  # three epochs, five metrics each


def test_per_label_f1_from_best_epoch(base_run):
    per_label = per_label_f1([base_run])
    assert list(per_label["name"]) == ["circle", "square"]
    assert list(per_label["f1_score"]) == pytest.approx([0.9, 0.4])
    assert set(per_label["source"]) == {"epoch 2"}


def test_per_label_f1_prefers_metrics_json(tmp_path):
    final = {"best_epoch": 1, "per_label": [
        {"label": 1, "name": "circle", "precision_score": 1.0, "recall_score": 0.5, "f1_score": 0.667, "support": 4},
    ]}
    run = write_run(tmp_path, "final", [epoch_event(1, 0.5, 0.4)], metrics=final)
    per_label = per_label_f1([run])
    assert list(per_label["f1_score"]) == pytest.approx([0.667])
    assert list(per_label["source"]) == ["metrics.json"]


def test_per_label_f1_grouped_by_label(base_run, no_captions_run, tmp_path):
    empty = write_run(tmp_path, "empty", [], finished=False)
    per_label = per_label_f1([no_captions_run, base_run, empty])
    assert list(per_label["label"]) == [1, 1, 2, 2]
    assert list(per_label["run"]) == ["nocap", "base", "nocap", "base"]


def test_ablation_table_deltas_against_base(base_run, no_captions_run):
    table = ablation_table([no_captions_run, base_run])
    assert list(table.columns) == list(ABLATION_COLUMNS)
    assert list(table["ablation_variant"]) == ["base", "no_captions"]
    base, variant = table.iloc[0], table.iloc[1]
    assert base["samples_f1_score_delta"] == pytest.approx(0.0)
    # Best epochs: base epoch 2 (0.70, loss 0.35), no_captions epoch 2 (0.688, loss 0.40).
    assert variant["samples_f1_score"] == pytest.approx(0.688)
    assert variant["samples_f1_score_delta"] == pytest.approx(-0.012)
    assert variant["micro_f1_score_delta"] == pytest.approx(0.70 - 0.72)
    assert variant["macro_f1_score_delta"] == pytest.approx(0.60 - 0.55)
    assert variant["val_loss_delta"] == pytest.approx(0.05)
    assert variant["base_run"] == "base"


def test_ablation_table_without_base(no_captions_run):
    row = ablation_table([no_captions_run]).iloc[0]
    assert row["samples_f1_score"] == pytest.approx(0.688)
    assert math.isnan(row["samples_f1_score_delta"])
    assert row["base_run"] is None


def test_ablation_table_base_without_epochs(no_captions_run, tmp_path):
    base = write_run(tmp_path, "base-empty", [], finished=False, ablation_group="g", ablation_variant="base")
    table = ablation_table([base, no_captions_run])
    assert list(table["base_run"]) == ["base-empty", "base-empty"]
    assert table["samples_f1_score_delta"].isna().all()


def test_ablation_table_newest_base(tmp_path):
    old = write_run(tmp_path, "old-base", [epoch_event(1, 0.5, 0.4)], started=1000.0,
                    ablation_group="g", ablation_variant="base")
    new = write_run(tmp_path, "new-base", [epoch_event(1, 0.6, 0.3)], started=2000.0,
                    ablation_group="g", ablation_variant="base")
    variant = write_run(tmp_path, "drop", [epoch_event(1, 0.55, 0.35)], ablation_group="g",
                        ablation_variant="no_dropout")
    table = ablation_table([old, variant, new])
    assert list(table["run"]) == ["new-base", "old-base", "drop"]
    assert set(table["base_run"]) == {"new-base"}
    assert table.iloc[2]["samples_f1_score_delta"] == pytest.approx(-0.05)


def test_ablation_table_prefers_finished_base(tmp_path):
    finished = write_run(tmp_path, "finished-base", [epoch_event(1, 0.5, 0.4), epoch_event(2, 0.6, 0.3)],
                         started=1000.0, ablation_group="g", ablation_variant="base")
    stopped = write_run(tmp_path, "stopped-base", [epoch_event(1, 0.2, 0.7)], finished=False, started=2000.0,
                        ablation_group="g", ablation_variant="base")
    variant = write_run(tmp_path, "drop", [epoch_event(1, 0.55, 0.35)], ablation_group="g",
                        ablation_variant="no_dropout")
    table = ablation_table([stopped, variant, finished])
    assert set(table["base_run"]) == {"finished-base"}
    assert table.set_index("run").loc["drop", "samples_f1_score_delta"] == pytest.approx(-0.05)


def test_ablation_table_groups_and_plain_runs(base_run, tmp_path):
    plain = write_run(tmp_path, "plain", [epoch_event(1, 0.5, 0.4)])
    other = write_run(tmp_path, "other", [epoch_event(1, 0.5, 0.4)], ablation_group="a", ablation_variant="base")
    table = ablation_table([plain, base_run, other])
    assert list(table["ablation_group"]) == ["a", "g"]
    assert "plain" not in set(table["run"])


def test_ablation_table_no_groups(tmp_path):
    plain = write_run(tmp_path, "plain", [epoch_event(1, 0.5, 0.4)])
    table = ablation_table([plain])
    assert table.empty
    assert list(table.columns) == list(ABLATION_COLUMNS)


def test_load_run_corrupt_metrics_json_ignored(tmp_path):
    run = write_run(tmp_path, "broken", [epoch_event(1, 0.5, 0.4)])
    (run / "metrics.json").write_text("{not json", encoding="utf-8")
    assert load_run(run).final_metrics is None
    assert list(per_label_f1([run])["source"]) == ["epoch 1", "epoch 1"]


def test_compare_real_training_runs(tmp_path):
    data = make_demo(tmp_path / "demo", train_rows=40, test_rows=0, image_size=32)
    runs_dir = tmp_path / "runs"
    run_dirs = [
        train(TrainConfig(data=str(data), model="cnn2", image_size=32, epochs=1, workers=0, runs_dir=str(runs_dir),
                          ablation_group="g", ablation_variant=variant, captions=captions, run_name=variant))
        for variant, captions in (("base", True), ("no_captions", False))
    ]

    table = compare_table(run_dirs)
    assert list(table["status"]) == ["finished", "finished"]
    assert list(table["epochs_done"]) == [1, 1]
    assert list(table["best_epoch"]) == [1, 1]
    assert list(table["captions"]) == [True, False]
    assert table["samples_f1_score"].between(0, 1).all()
    assert (table["training_seconds"] > 0).all()
    assert (table["train_images_per_second"] > 0).all()
    config = json.loads((run_dirs[0] / "config.json").read_text())
    assert table.iloc[0]["parameters"] == config["parameters"]
    assert table.iloc[0]["parameters"] > table.iloc[1]["parameters"]  # the caption branch adds weights

    ablation = ablation_table(run_dirs)
    assert list(ablation["ablation_variant"]) == ["base", "no_captions"]
    expected = table.iloc[1]["samples_f1_score"] - table.iloc[0]["samples_f1_score"]
    assert ablation.iloc[1]["samples_f1_score_delta"] == pytest.approx(expected)
    assert ablation.iloc[0]["val_loss_delta"] == pytest.approx(0.0)

    per_label = per_label_f1(run_dirs)
    assert set(per_label["source"]) == {"metrics.json"}
    assert set(per_label["name"]) <= {"circle", "square", "triangle", "cross", "star"}
