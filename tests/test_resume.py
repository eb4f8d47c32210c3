"""Crash-safe runs: SIGKILL and --resume, NaN losses, and the run folder lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.__main__ import main
from core.demo import make_demo
from core.predict import Predictor
from core.runs import RunInUseError, load_checkpoint, read_progress, run_lock, run_locked, summarize_run
from tests.conftest import interrupt_training_at
from core.trainer import CannotResumeError, TrainConfig, build_loss, create_run, resume, train

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("resume"), train_rows=160, test_rows=4, image_size=32, seed=2)


def _config(data: Path, runs_dir: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), runs_dir=str(runs_dir), model="cnn2", image_size=32, epochs=3,
                    batch_size=16, workers=0, run_name="r")
    settings.update(overrides)
    return TrainConfig(**settings)


def _epochs(run_dir: Path) -> list[int]:
    return [event["epoch"] for event in read_progress(run_dir / "progress.jsonl") if event["event"] == "epoch_end"]


def _wait_for(predicate, seconds: float, description: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {description}")


def test_sigkill_mid_epoch_then_resume(tmp_path, capsys):
    # 600 rows at 48 pixels make each epoch last a few seconds, so the kill lands inside epoch 2.
    data = make_demo(tmp_path / "set", train_rows=600, test_rows=4, image_size=48, seed=3)
    runs = tmp_path / "runs"
    command = [sys.executable, "-m", "core", "train", "--data", str(data), "--image-size", "48", "--epochs", "4",
               "--workers", "0", "--runs-dir", str(runs), "--run-name", "killed"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = runs / "killed"
    try:
        _wait_for(lambda: any(event["event"] == "step" and event.get("epoch") == 2
                              for event in read_progress(run_dir / "progress.jsonl")), 240, "a step of epoch 2")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    summary = summarize_run(run_dir)
    assert summary.status == "interrupted"
    assert _epochs(run_dir) == [1]
    assert not run_locked(run_dir)
    assert not (run_dir / "metrics.json").exists()

    code = main(["train", "--resume", "killed", "--runs-dir", str(runs)])
    assert code == 0
    assert "best epoch" in capsys.readouterr().out

    assert _epochs(run_dir) == [1, 2, 3, 4]
    events = read_progress(run_dir / "progress.jsonl")
    starts = [event for event in events if event["event"] == "run_started"]
    assert len(starts) == 2
    assert starts[1]["resumed_after_epoch"] == 1
    assert events[-1]["event"] == "run_finished"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 1 <= metrics["best_epoch"] <= 4
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 4
    assert [entry["epoch"] for entry in load_checkpoint(run_dir / "last.pt")["history"]] == [1, 2, 3, 4]
    assert summarize_run(run_dir).status == "finished"


def test_resume_after_stop_between_checkpoint_and_event(dataset, tmp_path, monkeypatch):
    # A process killed after saving last.pt but before writing epoch_end leaves the epoch only in the checkpoint.
    runs = tmp_path / "runs"
    config = _config(dataset, runs)
    restore = interrupt_training_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    restore()
    run_dir = runs / "r"
    assert summarize_run(run_dir).status == "interrupted"

    lines = (run_dir / "progress.jsonl").read_text().splitlines(keepends=True)
    lines = [line for line in lines if not ('"epoch_end"' in line and '"epoch": 2,' in line)]
    (run_dir / "progress.jsonl").write_text("".join(lines))
    assert _epochs(run_dir) == [1]

    resume(run_dir)
    assert _epochs(run_dir) == [1, 2, 3]
    assert summarize_run(run_dir).status == "finished"


def test_resume_finished_run_refused(dataset, tmp_path):
    run_dir = train(_config(dataset, tmp_path / "runs", epochs=1))
    with pytest.raises(ValueError, match="already finished its 1 epoch"):
        resume(run_dir)


def test_resume_before_first_epoch_refused(dataset, tmp_path, capsys, caplog):
    config = _config(dataset, tmp_path / "runs")
    run_dir, _ = create_run(config)
    code = main(["train", "--resume", str(run_dir)])
    assert code == 1
    assert "cannot resume run r: run r stopped before its data was prepared" in caplog.text
    assert "continue with" not in caplog.text


def test_resume_refuses_other_options(dataset, tmp_path, caplog):
    code = main(["train", "--resume", "r", "--epochs", "9", "--lr", "0.1", "--runs-dir", str(tmp_path)])
    assert code == 1
    assert "--resume continues a run with its own settings; drop --epochs, --lr" in caplog.text


def test_resume_refuses_options_with_default_values(tmp_path, caplog):
    # --epochs 5 is the default value, yet it is given: it would be silently ignored.
    code = main(["train", "--resume", "r", "--epochs", "5", "--no-amp", "--runs-dir", str(tmp_path)])
    assert code == 1
    assert "drop --epochs, --no-amp" in caplog.text


def test_resume_refuses_abbreviated_option(tmp_path, capsys):
    # argparse would read --epo as --epochs, which the option check above would not see.
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--resume", "r", "--epo", "9", "--runs-dir", str(tmp_path)])
    assert stopped.value.code == 2
    assert "unrecognized arguments: --epo 9" in capsys.readouterr().err


def test_resume_after_dataset_changed_refused(tmp_path, monkeypatch):
    data = make_demo(tmp_path / "set", train_rows=40, test_rows=2, image_size=32, seed=4)
    runs = tmp_path / "runs"
    restore = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, runs))
    restore()

    lines = (data / "train.csv").read_text().splitlines(keepends=True)
    (data / "train.csv").write_text("".join(lines[:-3]))
    with pytest.raises(ValueError, match=r"3 row\(s\) of run r are no longer valid rows of .*train\.csv"):
        resume(runs / "r")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path, monkeypatch, caplog):
    import core.trainer as trainer

    calls = {"count": 0}

    class NanAfterFirstEpoch(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, logits, targets):
            calls["count"] += 1
            value = self.loss(logits, targets)
            return value * float("nan") if calls["count"] > steps_per_epoch else value

    steps_per_epoch = 8  # 128 training rows in batches of 16
    built = []

    def training_loss_turns_nan(name, weights):
        # The trainer builds the training loss first, then the validation loss, which stays finite.
        built.append(name)
        loss = build_loss(name, weights)
        return NanAfterFirstEpoch(loss) if len(built) == 1 else loss

    monkeypatch.setattr(trainer, "build_loss", training_loss_turns_nan)
    runs = tmp_path / "runs"
    code = main(["train", "--data", str(dataset), "--image-size", "32", "--epochs", "3", "--batch-size", "16",
                 "--workers", "0", "--runs-dir", str(runs), "--run-name", "nan"])
    assert code == 1
    assert "training loss became nan at epoch 2, step 1" in caplog.text
    assert "last.pt and best.pt keep the weights of the last good epoch" in caplog.text

    run_dir = runs / "nan"
    summary = summarize_run(run_dir)
    assert summary.status == "failed"
    assert "FloatingPointError" in summary.error
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in load_checkpoint(run_dir / "last.pt")["model"].values()
               if value.is_floating_point())
    # The kept checkpoint still predicts.
    scores = Predictor(run_dir).predict(next((dataset / "data").glob("*.jpg")), "a red circle")
    assert all(0.0 <= score.probability <= 1.0 for score in scores)


def test_second_process_cannot_write_locked_run(dataset, tmp_path, caplog):
    runs = tmp_path / "runs"
    run_dir = train(_config(dataset, runs, epochs=2))
    # Without metrics.json the run is unfinished again, so a resume would have work to do.
    (run_dir / "metrics.json").unlink()

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from core.runs import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(run_dir)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_locked(run_dir)
        assert summarize_run(run_dir).status == "running"
        with pytest.raises(RunInUseError, match=rf"run r is being written by another process \(pid {holder.pid}\)"):
            resume(run_dir)
        code = main(["train", "--resume", str(run_dir)])
        assert code == 1
        assert "is being written by another process" in caplog.text
        with pytest.raises(RunInUseError):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert not run_locked(run_dir)


def test_lock_released_after_run(dataset, tmp_path):
    run_dir = train(_config(dataset, tmp_path / "runs", epochs=1))
    assert (run_dir / ".lock").is_file()
    assert not run_locked(run_dir)
    with run_lock(run_dir):
        assert run_locked(run_dir)
    assert int((run_dir / ".lock").read_text()) == os.getpid()


def test_nan_validation_loss_saves_no_weights(dataset, tmp_path, monkeypatch):
    import core.trainer as trainer

    built = []

    def validation_loss_is_nan(name, weights):
        built.append(name)
        loss = build_loss(name, weights)
        return loss if len(built) == 1 else (lambda logits, targets: loss(logits, targets) * float("nan"))

    monkeypatch.setattr(trainer, "build_loss", validation_loss_is_nan)
    with pytest.raises(FloatingPointError, match="validation loss became nan after epoch 1, so its weights are not saved"):
        train(_config(dataset, tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / "last.pt").exists()
    assert not (run_dir / "best.pt").exists()
    assert summarize_run(run_dir).status == "failed"


def test_resume_with_checkpoint_of_other_run_refused(dataset, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    restore = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(dataset, runs))
    restore()
    other = train(_config(dataset, runs, model="caption_only", epochs=1, run_name="other"))
    (runs / "r" / "last.pt").write_bytes((other / "last.pt").read_bytes())

    with pytest.raises(ValueError, match=r"checkpoint is for model 'caption_only' but config\.json says 'cnn2'"):
        resume(runs / "r")


def test_resume_run_stopped_in_first_epoch(dataset, tmp_path, monkeypatch):
    restore = interrupt_training_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(_config(dataset, tmp_path / "runs", epochs=2))
    restore()
    run_dir = tmp_path / "runs" / "r"
    assert not (run_dir / "last.pt").exists()
    resume(run_dir)
    assert _epochs(run_dir) == [1, 2]
    assert summarize_run(run_dir).status == "finished"


def test_resume_refuses_changed_labels(dataset, tmp_path, monkeypatch):
    data = make_demo(tmp_path / "set", train_rows=40, test_rows=2, image_size=32, seed=6)
    restore = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data, tmp_path / "runs"))
    restore()
    lines = (data / "train.csv").read_text().splitlines()
    image_id, _, caption = lines[1].split(",", 2)
    lines[1] = f"{image_id},1 2 3,{caption}"
    (data / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CannotResumeError, match=r"the labels or captions of run r's (train|val) rows .* changed"):
        resume(tmp_path / "runs" / "r")


def test_resume_removes_temporary_files_and_repairs_best(dataset, tmp_path, monkeypatch, caplog):
    restore = interrupt_training_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(_config(dataset, tmp_path / "runs"))
    restore()
    run_dir = tmp_path / "runs" / "r"
    (run_dir / ".best.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    # A stop between saving last.pt and best.pt leaves best.pt behind the best epoch of the history.
    last = load_checkpoint(run_dir / "last.pt")
    best_epoch = max(last["history"], key=lambda event: event["samples_f1_score"])["epoch"]
    if best_epoch == last["epoch"]:
        older = {**last, "epoch": 1}
        from core.runs import save_checkpoint

        save_checkpoint(run_dir / "best.pt", older)
    resume(run_dir)
    assert not list(run_dir.glob(".*.tmp"))
    assert "removed 1 temporary file(s)" in caplog.text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = load_checkpoint(run_dir / "last.pt")["history"]
    assert metrics["best_epoch"] == max(history, key=lambda event: event["samples_f1_score"])["epoch"]
