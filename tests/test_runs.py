"""Tests for core.runs: atomic JSON and checkpoint files, progress events and run folder summaries."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from core.runs import (
    CHECKPOINT_KEYS,
    ProgressWriter,
    check_run_name,
    describe_error,
    list_runs,
    run_progress,
    load_checkpoint,
    read_json,
    read_progress,
    resolve_run,
    save_checkpoint,
    summarize_run,
    write_json,
)


class CustomState:
    """A class defined only in this test: a weights-only load must reject a pickled instance."""

    def __init__(self) -> None:
        self.step = 3


def _checkpoint() -> dict:
    return {
        "model": {"fc.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "fc.bias": torch.zeros(2)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]},
        "scheduler": None,
        "scaler": {},
        "epoch": 4,
        "best_metric": 0.625,
        "history": [{"time": 1700000000.0, "event": "epoch_end", "epoch": 1, "samples_f1_score": 0.5}],
        "config": {"model": "cnn2", "captions": True, "epochs": 10},
        "labels": ["1", "2", "19"],
        "format_version": 2,
    }


def _make_run(runs_dir: Path, name: str, config: dict | None = None, events: list[dict] | None = None) -> Path:
    """Write a run folder by hand: config.json and, if `events` is given, progress.jsonl."""
    path = runs_dir / name
    path.mkdir(parents=True)
    write_json(path / "config.json", config if config is not None else {"model": "cnn2", "captions": True, "epochs": 3})
    if events is not None:
        lines = [json.dumps({"time": 1700000000.0 + index, **event}) + "\n" for index, event in enumerate(events)]
        (path / "progress.jsonl").write_text("".join(lines), encoding="utf-8")
    return path


def _dead_pid() -> int:
    """Return the pid of a child process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------- JSON files


def test_write_json_round_trip(tmp_path):
    path = tmp_path / "nested" / "metrics.json"
    data = {"samples_f1_score": 0.75, "labels": ["1", "19"], "caption": "café \"quoted\"", "per_label": [{"f1": 0.5}]}

    write_json(path, data)

    assert read_json(path) == data
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert sorted(entry.name for entry in path.parent.iterdir()) == ["metrics.json"]


def test_write_json_replaces_existing(tmp_path):
    path = tmp_path / "config.json"
    write_json(path, {"epochs": 1})
    write_json(path, {"epochs": 2})

    assert read_json(path) == {"epochs": 2}
    assert [entry.name for entry in tmp_path.iterdir()] == ["config.json"]


def test_write_json_nan_rejected(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(path, {"loss": float("nan")})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- checkpoints


def test_save_checkpoint_round_trip(tmp_path):
    path = tmp_path / "best.pt"
    checkpoint = _checkpoint()

    save_checkpoint(path, checkpoint)
    loaded = load_checkpoint(path)

    assert set(loaded) == set(CHECKPOINT_KEYS)
    assert torch.equal(loaded["model"]["fc.weight"], checkpoint["model"]["fc.weight"])
    assert loaded["config"] == checkpoint["config"]
    assert loaded["labels"] == ["1", "2", "19"]
    assert loaded["epoch"] == 4
    assert loaded["best_metric"] == 0.625
    assert [entry.name for entry in tmp_path.iterdir()] == ["best.pt"]
    # The file itself loads with torch's weights-only unpickler.
    assert torch.load(path, weights_only=True)["format_version"] == 2
    assert loaded["history"] == checkpoint["history"]


def test_save_checkpoint_missing_key(tmp_path):
    checkpoint = _checkpoint()
    del checkpoint["scheduler"]
    with pytest.raises(ValueError, match=r"checkpoint keys \[.*\] differ from"):
        save_checkpoint(tmp_path / "last.pt", checkpoint)
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_extra_key(tmp_path):
    checkpoint = {**_checkpoint(), "args": {"lr": 0.1}}
    with pytest.raises(ValueError, match="'args'"):
        save_checkpoint(tmp_path / "last.pt", checkpoint)
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_pickled_custom_class(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**_checkpoint(), "config": CustomState()}, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be loaded as a weights-only checkpoint")):
        load_checkpoint(path)


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / "best.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {path} not found")):
        load_checkpoint(path)


def test_load_checkpoint_garbage_file(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot be loaded as a weights-only checkpoint")):
        load_checkpoint(path)


def test_load_checkpoint_without_model_entry(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a checkpoint written by this program"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- progress events


def test_progress_writer_round_trip(tmp_path):
    path = tmp_path / "progress.jsonl"
    writer = ProgressWriter(path)
    writer.emit("run_started", pid=1234, config={"model": "cnn2"})
    writer.emit("epoch_end", epoch=1, train_loss=0.5, samples_f1_score=0.25)
    writer.emit("run_finished", best_metric=0.25)
    writer.close()

    events = read_progress(path)

    assert [event["event"] for event in events] == ["run_started", "epoch_end", "run_finished"]
    assert all(isinstance(event["time"], float) for event in events)
    assert events[0]["pid"] == 1234
    assert events[0]["config"] == {"model": "cnn2"}
    assert events[1]["samples_f1_score"] == 0.25
    assert path.read_text(encoding="utf-8").count("\n") == 3


def test_progress_writer_flushes_each_event(tmp_path):
    path = tmp_path / "progress.jsonl"
    writer = ProgressWriter(path)
    writer.emit("step", epoch=1, step=10, loss=0.7)
    # Each event is flushed, so a reader gets it while the writer is still open.
    assert [event["step"] for event in read_progress(path)] == [10]
    writer.close()


def test_progress_writer_unknown_event(tmp_path):
    writer = ProgressWriter(tmp_path / "progress.jsonl")
    with pytest.raises(ValueError, match="unknown progress event 'epoch_done'; expected one of"):
        writer.emit("epoch_done", epoch=1)
    writer.close()
    assert read_progress(tmp_path / "progress.jsonl") == []


def test_read_progress_trailing_partial_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"time": 1.0, "event": "run_started", "pid": 1}\n{"time": 2.0, "event": "st', encoding="utf-8")
    assert [event["event"] for event in read_progress(path)] == ["run_started"]


def test_read_progress_complete_line_without_newline(tmp_path):
    # A writer that has not yet written the newline may still append to the line, so it is not read yet.
    path = tmp_path / "progress.jsonl"
    path.write_text('{"time": 1.0, "event": "run_started"}\n{"time": 2.0, "event": "run_finished"}', encoding="utf-8")
    assert [event["event"] for event in read_progress(path)] == ["run_started"]


def test_read_progress_corrupt_middle_line(tmp_path):
    path = tmp_path / "progress.jsonl"
    lines = [
        '{"time": 1.0, "event": "run_started"}',
        '{"time": 2.0, "event": "ste',
        "[1, 2, 3]",
        '{"time": 3.0, "no_event": true}',
        '{"time": 4.0, "event": "run_finished"}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    assert [event["time"] for event in read_progress(path)] == [1.0, 4.0]


def test_read_progress_keeps_unknown_keys(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"time": 1.0, "event": "step", "gpu_memory_mb": 812, "future_field": [1]}\n', encoding="utf-8")
    (event,) = read_progress(path)
    assert event["gpu_memory_mb"] == 812
    assert event["future_field"] == [1]


def test_read_progress_missing_file(tmp_path):
    assert read_progress(tmp_path / "progress.jsonl") == []


# ----------------------------------------------------------------------------- run names and lookup


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "-leading-dash", "a b", "x" * 101])
def test_check_run_name_invalid(name):
    with pytest.raises(ValueError, match="invalid run name"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["cnn2-20240101-120000", "resnet18_frozen.v2", "x" * 100])
def test_check_run_name_valid(name):
    assert check_run_name(name) == name


def test_check_run_name_trailing_newline():
    with pytest.raises(ValueError, match="invalid run name"):
        check_run_name("run\n")


def test_resolve_run_by_path(tmp_path):
    run = _make_run(tmp_path / "elsewhere", "cnn2-20240101-120000")
    assert resolve_run(run, runs_dir=tmp_path / "checkpoints") == run
    assert resolve_run(str(run), runs_dir=tmp_path / "checkpoints") == run


def test_resolve_run_by_name(tmp_path):
    runs_dir = tmp_path / "checkpoints"
    run = _make_run(runs_dir, "cnn2-20240101-120000")
    assert resolve_run("cnn2-20240101-120000", runs_dir=runs_dir) == run


def test_resolve_run_not_found(tmp_path):
    runs_dir = tmp_path / "checkpoints"
    (runs_dir / "no-config").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run 'no-config' not found: no config.json"):
        resolve_run("no-config", runs_dir=runs_dir)


# ----------------------------------------------------------------------------- run summaries


def test_summarize_run_finished(tmp_path):
    events = [
        {"event": "run_started", "pid": _dead_pid()},
        {"event": "epoch_end", "epoch": 1, "samples_f1_score": 0.4, "val_loss": 0.6},
        {"event": "epoch_end", "epoch": 2, "samples_f1_score": 0.7, "val_loss": 0.5, "per_label": [{"f1": 0.7}]},
        {"event": "epoch_end", "epoch": 3, "samples_f1_score": 0.6, "val_loss": 0.4},
        {"event": "run_finished", "best_metric": 0.7},
    ]
    run = _make_run(tmp_path, "finished", {"model": "resnet18", "captions": False, "epochs": 3}, events)

    summary = summarize_run(run)

    assert summary.status == "finished"
    assert summary.name == "finished"
    assert summary.model == "resnet18"
    assert summary.captions is False
    assert summary.epochs_done == 3
    assert summary.epochs_planned == 3
    assert summary.error is None
    # The best epoch is the one with the highest samples F1, not the last or the lowest loss.
    assert summary.best_metrics == {"epoch": 2, "samples_f1_score": 0.7, "val_loss": 0.5}


def test_summarize_run_failed(tmp_path):
    events = [
        {"event": "run_started", "pid": os.getpid()},
        {"event": "run_failed", "error_type": "ValueError", "message": "train.csv row 42: unknown label '99'"},
    ]
    summary = summarize_run(_make_run(tmp_path, "failed", events=events))

    assert summary.status == "failed"
    assert summary.error == "ValueError: train.csv row 42: unknown label '99'"
    assert summary.epochs_done == 0
    assert summary.best_metrics == {}


def test_summarize_run_interrupted(tmp_path):
    events = [
        {"event": "run_started", "pid": _dead_pid()},
        {"event": "epoch_end", "epoch": 1, "samples_f1_score": 0.3},
    ]
    summary = summarize_run(_make_run(tmp_path, "interrupted", events=events))

    assert summary.status == "interrupted"
    assert summary.error is None
    assert summary.epochs_done == 1


def test_summarize_run_running(tmp_path):
    events = [{"event": "run_started", "pid": os.getpid()}, {"event": "step", "epoch": 1, "step": 5}]
    summary = summarize_run(_make_run(tmp_path, "running", events=events))

    assert summary.status == "running"
    assert summary.epochs_done == 0


def test_summarize_run_without_progress(tmp_path):
    summary = summarize_run(_make_run(tmp_path, "new"))
    assert summary.status == "interrupted"
    assert summary.epochs_done == 0
    assert summary.epochs_planned == 3


def test_summarize_run_started_without_pid(tmp_path, monkeypatch):
    def fake_kill(pid: int, signal: int) -> None:
        # Like the kernel for signal 0: pid 0 (own process group) and -1 (every process) always match a process.
        if pid > 0:
            raise ProcessLookupError(pid)

    monkeypatch.setattr(os, "kill", fake_kill)
    summary = summarize_run(_make_run(tmp_path, "no-pid", events=[{"event": "run_started"}]))
    assert summary.status == "interrupted"


def test_list_runs_newest_first(tmp_path):
    runs_dir = tmp_path / "checkpoints"
    older = _make_run(runs_dir, "older", events=[{"event": "run_finished"}])
    newer = _make_run(runs_dir, "newer", events=[{"event": "run_started", "pid": os.getpid()}])
    os.utime(older / "config.json", (1_700_000_000, 1_700_000_000))
    os.utime(newer / "config.json", (1_700_000_100, 1_700_000_100))

    summaries = list_runs(runs_dir)

    assert [summary.name for summary in summaries] == ["newer", "older"]
    assert [summary.status for summary in summaries] == ["running", "finished"]


def test_list_runs_ignores_folders_without_config(tmp_path):
    runs_dir = tmp_path / "checkpoints"
    _make_run(runs_dir, "real")
    (runs_dir / "empty").mkdir()
    (runs_dir / "stray.txt").write_text("not a run", encoding="utf-8")
    (runs_dir / "only-progress").mkdir()
    (runs_dir / "only-progress" / "progress.jsonl").write_text('{"time": 1.0, "event": "run_finished"}\n')

    assert [summary.name for summary in list_runs(runs_dir)] == ["real"]


def test_list_runs_skips_invalid_config(tmp_path, caplog):
    runs_dir = tmp_path / "checkpoints"
    _make_run(runs_dir, "real")
    broken = runs_dir / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model": "cnn2", ', encoding="utf-8")

    assert [summary.name for summary in list_runs(runs_dir)] == ["real"]
    assert "skipped run folder" in caplog.text
    assert str(broken) in caplog.text


def test_list_runs_skips_non_object_config(tmp_path):
    runs_dir = tmp_path / "checkpoints"
    _make_run(runs_dir, "real")
    _make_run(runs_dir, "list-config", config=["cnn2"])

    assert [summary.name for summary in list_runs(runs_dir)] == ["real"]


def test_list_runs_missing_folder(tmp_path):
    assert list_runs(tmp_path / "checkpoints") == []


def test_describe_error_strips_worker_traceback():
    # The shape of a ValueError re-raised by a DataLoader worker in the main process.
    wrapped = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nValueError: /data/1.jpg: cannot decode image; replace or remove the file\n'
    )
    assert describe_error(wrapped) == "/data/1.jpg: cannot decode image; replace or remove the file"


def test_describe_error_plain_and_interrupt():
    assert describe_error(ValueError("bad value")) == "bad value"
    assert describe_error(KeyboardInterrupt()) == "interrupted by the user"


def test_summarize_run_keyboard_interrupt(tmp_path):
    events = [{"event": "run_started", "pid": os.getpid()},
              {"event": "run_failed", "error_type": "KeyboardInterrupt", "message": "interrupted by the user"}]
    summary = summarize_run(_make_run(tmp_path, "stopped", events=events))
    assert summary.status == "interrupted"
    assert summary.error == "interrupted by the user"


def test_read_json_invalid_names_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{broken")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        read_json(path)


def test_run_progress_history_and_fraction(tmp_path):
    events = [{"event": "run_started", "pid": 1},
              {"event": "step", "epoch": 1, "step": 4, "steps": 4},
              {"event": "epoch_end", "epoch": 1, "train_loss": 0.5, "per_label": []},
              {"event": "epoch_end", "train_loss": 0.4},  # no epoch number: ignored
              {"event": "step", "epoch": 2, "step": 1, "steps": 4}]
    progress = run_progress(_make_run(tmp_path, "half", events=events))
    assert progress.epoch == 2
    assert progress.step == 1
    assert progress.steps == 4
    assert progress.history == [{"epoch": 1, "train_loss": 0.5}]
    # 1 of 3 planned epochs done plus a quarter of the second.
    assert progress.fraction == pytest.approx(1.25 / 3)


def test_list_runs_collects_problems(tmp_path):
    _make_run(tmp_path, "good", events=[{"event": "run_finished"}])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (tmp_path / "badepochs").mkdir()
    (tmp_path / "badepochs" / "config.json").write_text(json.dumps({"model": "cnn2", "epochs": "abc"}))
    problems: list[str] = []
    assert [run.name for run in list_runs(tmp_path, problems=problems)] == ["good"]
    assert len(problems) == 2
    assert any(problem.startswith("broken: ") and "not valid JSON" in problem for problem in problems)
