"""Training queue tests: CLI arguments from a config, ablation sets, and real queued runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest

from core import jobs
from core.__main__ import build_parser
from core.runs import read_progress, summarize_run
from core.trainer import TrainConfig, ablation_configs
from tests.conftest import interrupt_training_at


def _caption_dataset(root: Path, rows: int = 40) -> Path:
    root.mkdir(parents=True)
    lines = ["ImageID,Labels,Caption"] + [
        f"{index}.jpg,{1 + index % 2},a {'dog' if index % 2 == 0 else 'cat'} on a sofa" for index in range(rows)
    ]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def _config_from_arguments(arguments: list[str]) -> TrainConfig:
    namespace = build_parser().parse_args(["train", *arguments])
    names = {item.name for item in fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in vars(namespace).items() if key in names})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model": "resnet18", "pretrained": False, "freeze_backbone": True, "image_size": 64},
        {"captions": False, "dropout": 0.0, "batch_norm": True, "conv_layers": 5, "fc_layers": 3},
        {"augment": [], "pos_weight": True, "sampler": "weighted", "optimizer": "sgd", "lr": 0.01},
        {"model": "caption_only", "amp": False, "tune_thresholds": False, "limit": 100, "seed": 7, "skip_bad_rows": True},
        {"channels_last": False, "image_cache": False, "feature_cache": False, "freeze_backbone": True},
        {"ablation_group": "g", "ablation_variant": "no_dropout", "normalization": "imagenet", "device": "cpu"},
    ],
)
def test_train_arguments_round_trip(overrides):
    config = TrainConfig(data="/data/set", epochs=3, **overrides)
    assert _config_from_arguments(jobs.train_arguments(config)) == config


def test_train_arguments_validates_first():
    with pytest.raises(ValueError, match="invalid lr"):
        jobs.train_arguments(TrainConfig(lr=-1.0))


def test_ablation_configs_cnn2_variants():
    base = TrainConfig(model="cnn2", dropout=0.5, captions=True)
    configs = ablation_configs(base, "study")
    variants = {config.ablation_variant: config for config in configs}
    assert list(variants) == ["base", "no_dropout", "no_captions", "batch_norm"]
    assert variants["base"].dropout == 0.5
    assert variants["no_dropout"].dropout == 0.0
    assert variants["no_captions"].captions is False
    assert variants["batch_norm"].batch_norm is True
    assert {config.ablation_group for config in configs} == {"study"}


def test_ablation_configs_skip_inapplicable():
    variants = [config.ablation_variant for config in ablation_configs(TrainConfig(model="caption_only"), "g")]
    assert variants == ["base", "no_dropout"]
    variants = [config.ablation_variant for config in ablation_configs(TrainConfig(model="resnet18", dropout=0.0), "g")]
    assert variants == ["base", "no_captions"]


def test_enqueue_and_work_queue_runs_jobs(tmp_path):
    data = _caption_dataset(tmp_path / "captions")
    runs = tmp_path / "runs"
    arguments = jobs.train_arguments(TrainConfig(data=str(data), model="caption_only", epochs=1))
    first = jobs.enqueue(arguments, "first", runs, start_worker=False)
    second = jobs.enqueue(arguments, "second", runs, start_worker=False)
    assert [job.state for job in jobs.list_jobs(runs)] == ["queued", "queued"]

    assert jobs.work_queue(runs) == 2
    finished = {job.id: job for job in jobs.list_jobs(runs)}
    assert finished[first.id].state == "finished"
    assert finished[second.id].state == "finished"
    assert finished[first.id].returncode == 0
    assert finished[first.id].ended >= finished[first.id].started
    # One at a time: the second job started after the first ended.
    assert finished[second.id].started >= finished[first.id].ended
    assert summarize_run(runs / "first").status == "finished"
    assert "run folder" in jobs.log_path(runs, first.id).read_text()


def test_enqueue_rejects_used_name(tmp_path):
    runs = tmp_path / "runs"
    jobs.enqueue(["--epochs", "1"], "taken", runs, start_worker=False)
    with pytest.raises(ValueError, match="already used"):
        jobs.enqueue(["--epochs", "1"], "taken", runs, start_worker=False)
    with pytest.raises(ValueError, match="invalid run name"):
        jobs.enqueue(["--epochs", "1"], "../escape", runs, start_worker=False)


def test_cancel_queued_job_never_runs(tmp_path):
    data = _caption_dataset(tmp_path / "captions")
    runs = tmp_path / "runs"
    job = jobs.enqueue(jobs.train_arguments(TrainConfig(data=str(data), model="caption_only", epochs=1)), "skip",
                       runs, start_worker=False)
    assert jobs.cancel(job.id, runs).state == "cancelled"
    assert jobs.work_queue(runs) == 0
    assert not (runs / "skip").exists()


def test_failed_job_keeps_error_in_log(tmp_path):
    runs = tmp_path / "runs"
    job = jobs.enqueue(["--data", str(tmp_path / "missing"), "--model", "caption_only"], "broken", runs,
                       start_worker=False)
    jobs.work_queue(runs)
    job = jobs.load_job(runs, job.id)
    assert job.state == "failed"
    assert job.returncode == 1
    assert "dataset folder" in jobs.log_path(runs, job.id).read_text()


def test_cancel_running_job_interrupts_run(tmp_path):
    data = _caption_dataset(tmp_path / "captions", rows=400)
    runs = tmp_path / "runs"
    job = jobs.enqueue(jobs.train_arguments(TrainConfig(data=str(data), model="caption_only", epochs=200,
                                                        batch_size=2)), "long", runs, start_worker=False)
    worker = threading.Thread(target=jobs.work_queue, args=(runs,))
    worker.start()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            events = read_progress(runs / "long" / "progress.jsonl")
            if any(event["event"] == "epoch_end" for event in events):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the queued run did not finish an epoch within 120 s")
        jobs.cancel(job.id, runs)
    finally:
        worker.join(timeout=120)
    assert jobs.load_job(runs, job.id).state == "cancelled"
    summary = summarize_run(runs / "long")
    assert summary.status == "interrupted"
    assert (runs / "long" / "last.pt").is_file()


def test_second_worker_exits_while_first_holds_lock(tmp_path):
    runs = tmp_path / "runs"
    data = _caption_dataset(tmp_path / "captions", rows=400)
    jobs.enqueue(jobs.train_arguments(TrainConfig(data=str(data), model="caption_only", epochs=200, batch_size=2)),
                 "busy", runs, start_worker=False)
    worker = threading.Thread(target=jobs.work_queue, args=(runs,))
    worker.start()
    try:
        deadline = time.time() + 60
        while not jobs.worker_running(runs) and time.time() < deadline:
            time.sleep(0.1)
        assert jobs.worker_running(runs)
        assert jobs.work_queue(runs) == 0
    finally:
        while jobs.load_job(runs, "busy").state == "queued":
            time.sleep(0.1)
        jobs.cancel("busy", runs)
        worker.join(timeout=120)
    assert not jobs.worker_running(runs)


def test_ensure_worker_runs_queue_detached(tmp_path):
    data = _caption_dataset(tmp_path / "captions")
    runs = tmp_path / "runs"
    job = jobs.enqueue(jobs.train_arguments(TrainConfig(data=str(data), model="caption_only", epochs=1)), "detached",
                       runs)
    deadline = time.time() + 180
    while jobs.load_job(runs, job.id).state in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.load_job(runs, job.id).state == "finished"
    assert (runs / "detached" / "best.pt").is_file()


def _write_job(runs: Path, **values) -> jobs.Job:
    job = jobs.Job(**{"id": "j", "run_name": "j", "args": [], **values})
    jobs.jobs_dir(runs).mkdir(parents=True, exist_ok=True)
    jobs._save(runs, job)
    return job


def _write_progress(run_dir: Path, events: list[dict]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "progress.jsonl").write_text("".join(json.dumps({"time": 1.0, **event}) + "\n" for event in events))


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([{"event": "run_started"}, {"event": "run_finished"}], "finished"),
        ([{"event": "run_started"}, {"event": "run_failed", "error_type": "KeyboardInterrupt"}], "cancelled"),
        ([{"event": "run_started"}], "failed"),
        (None, "failed"),
    ],
)
def test_refresh_job_states_after_worker_death(tmp_path, events, expected):
    # A job left "running" by a killed worker whose training process has ended since.
    runs = tmp_path / "runs"
    _write_job(runs, state="running", pid=_dead_pid(), started=1.0)
    if events is not None:
        _write_progress(runs / "j", events)
    assert jobs.refresh_job_states(runs) == []
    assert jobs.load_job(runs, "j").state == expected


def test_refresh_job_states_keeps_live_process(tmp_path):
    runs = tmp_path / "runs"
    _write_job(runs, state="running", pid=os.getpid(), started=1.0)
    assert [job.id for job in jobs.refresh_job_states(runs)] == ["j"]
    assert jobs.load_job(runs, "j").state == "running"


def test_list_jobs_skips_invalid_files(tmp_path, caplog):
    runs = tmp_path / "runs"
    _write_job(runs)
    folder = jobs.jobs_dir(runs)
    (folder / "bad-type.json").write_text(json.dumps({"id": "x", "run_name": "x", "args": [], "created": "yesterday"}))
    (folder / "bad-state.json").write_text(json.dumps({"id": "y", "run_name": "y", "args": [], "state": "paused"}))
    (folder / "list.json").write_text("[]")
    (folder / "broken.json").write_text("{")
    assert [job.id for job in jobs.list_jobs(runs)] == ["j"]
    assert caplog.text.count("skipped job file") == 4


def test_ensure_worker_starts_one_process(tmp_path):
    # Repeated calls while the first worker is still importing torch must not start more workers.
    data = _caption_dataset(tmp_path / "captions")
    runs = tmp_path / "runs"
    job = jobs.enqueue(jobs.train_arguments(TrainConfig(data=str(data), model="caption_only", epochs=1)), "once",
                       runs)
    for _ in range(5):
        jobs.ensure_worker(runs)
        time.sleep(0.2)
    listing = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    workers = [line for line in listing.splitlines() if "core queue" in line and str(runs) in line]
    assert len(workers) == 1, workers
    deadline = time.time() + 180
    while jobs.load_job(runs, job.id).state in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.load_job(runs, job.id).state == "finished"


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_resume_job_continues_interrupted_run(tmp_path, monkeypatch):
    from core.trainer import train

    data = _caption_dataset(tmp_path / "captions")
    runs = tmp_path / "runs"
    restore = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(data), model="caption_only", epochs=3, runs_dir=str(runs), run_name="cut"))
    restore()
    assert jobs.resumable("cut", runs)

    job = jobs.enqueue_resume("cut", runs, start_worker=False)
    assert job.id == "cut-resume-1"
    assert job.run_name == "cut"
    assert not jobs.resumable("cut", runs)  # queued already
    with pytest.raises(ValueError, match="cannot be resumed"):
        jobs.enqueue_resume("cut", runs, start_worker=False)

    assert jobs.work_queue(runs) == 1
    assert jobs.load_job(runs, job.id).state == "finished"
    epochs = [event["epoch"] for event in read_progress(runs / "cut" / "progress.jsonl") if event["event"] == "epoch_end"]
    assert epochs == [1, 2, 3]
    assert summarize_run(runs / "cut").status == "finished"
    assert not jobs.resumable("cut", runs)


def test_failure_reason_from_job_log(tmp_path):
    runs = tmp_path / "runs"
    jobs.jobs_dir(runs).mkdir(parents=True)
    jobs.log_path(runs, "j").write_text(
        "2026-01-01 10:00:00,000 INFO core.datasets: read 3 rows\n"
        "2026-01-01 10:00:01,000 ERROR core: /d/train.csv: 2 unusable row(s):\n"
        "  line 2 (a.jpg): empty file (0 bytes)\n"
        "  line 3 (b.jpg): image not found in /d/data\n"
        "Fix or remove these rows, or pass --skip-bad-rows to train on the other 1 row(s).\n"
    )
    reason = jobs.failure_reason(runs, "j")
    assert reason.splitlines()[0] == "/d/train.csv: 2 unusable row(s):"
    assert "  line 3 (b.jpg): image not found in /d/data" in reason
    assert reason.splitlines()[-1].startswith("Fix or remove these rows")
    assert jobs.failure_reason(runs, "missing") is None


def test_cli_uses_core_runs_dir(tmp_path):
    environment = {**os.environ, "CORE_RUNS_DIR": str(tmp_path / "elsewhere")}
    output = subprocess.run([sys.executable, "-m", "core", "runs"], cwd=jobs.PROJECT_ROOT, env=environment,
                            capture_output=True, text=True, check=True).stdout
    assert f"no runs in {tmp_path / 'elsewhere'}" in output
