"""A queue of training jobs that run one at a time in background processes.

The dashboard never trains in its own process. It writes a job file per requested
run into `<runs_dir>/.jobs/` and makes sure one queue worker (`python -m core
queue`) is running. The worker starts `python -m core train ...` for the oldest
queued job, waits for it, and moves on until the queue is empty. Job files, the
worker and the training processes outlive the browser session, so a refresh or a
closed tab loses nothing.

A job file `<id>.json` records the CLI arguments, the run name and a state:
queued, running, finished, failed or cancelled. The training process writes its
stdout and stderr to `<id>.log`; errors that happen before the run folder exists
(invalid data, for example) are only there.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from core.runs import (
    DEFAULT_RUNS_DIR,
    check_run_name,
    final_event,
    process_alive,
    read_json,
    read_progress,
    summarize_run,
    write_json,
)
from core.trainer import TrainConfig

logger = logging.getLogger(__name__)

JOBS_DIR_NAME = ".jobs"
JOB_STATES = ("queued", "running", "finished", "failed", "cancelled")
WORKER_LOCK = "worker.lock"
WORKER_STARTING = "worker-starting.json"  # pid and start time of a worker that has not taken the lock yet
WORKER_START_SECONDS = 300.0  # a starting marker older than this is ignored
PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOG_LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} ")  # the start of a logged line
STORE_TRUE_FLAGS = ("freeze_backbone", "pos_weight", "skip_bad_rows")  # CLI flags without a --no- form


@dataclass
class Job:
    """One requested training run."""

    id: str
    run_name: str
    args: list[str]  # arguments after "python -m core train"
    state: str = "queued"  # one of JOB_STATES
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    pid: int | None = None  # of the training process while it runs
    returncode: int | None = None
    cancel_requested: bool = False


def jobs_dir(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> Path:
    return Path(runs_dir) / JOBS_DIR_NAME


def _job_path(runs_dir: str | os.PathLike, job_id: str) -> Path:
    return jobs_dir(runs_dir) / f"{job_id}.json"


def log_path(runs_dir: str | os.PathLike, job_id: str) -> Path:
    return jobs_dir(runs_dir) / f"{job_id}.log"


def _save(runs_dir: str | os.PathLike, job: Job) -> None:
    write_json(_job_path(runs_dir, job.id), asdict(job))


def _job_from_dict(values: Any, path: Path) -> Job:
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        job = Job(**values)
    except TypeError as error:
        raise ValueError(f"{path}: {error}") from error
    numbers_ok = all(isinstance(value, (int, float)) or value is None for value in (job.started, job.ended))
    if (not isinstance(job.id, str) or not isinstance(job.run_name, str) or job.state not in JOB_STATES
            or not isinstance(job.args, list) or not all(isinstance(arg, str) for arg in job.args)
            or not isinstance(job.created, (int, float)) or not numbers_ok):
        raise ValueError(f"{path}: a field has the wrong type or an unknown state")
    return job


def load_job(runs_dir: str | os.PathLike, job_id: str) -> Job:
    path = _job_path(runs_dir, job_id)
    return _job_from_dict(read_json(path), path)


def list_jobs(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> list[Job]:
    """Return every job, oldest first; unreadable job files are logged and skipped."""
    folder = jobs_dir(runs_dir)
    if not folder.is_dir():
        return []
    jobs = []
    for path in folder.glob("*.json"):
        try:
            jobs.append(_job_from_dict(read_json(path), path))
        except (OSError, ValueError) as error:
            logger.warning("skipped job file %s: %s", path, error)
    return sorted(jobs, key=lambda job: (job.created, job.id))


def new_run_name(model: str, suffix: str = "") -> str:
    """Return a run name such as cnn2-20240101-120000-123456 (microseconds keep queued names apart)."""
    name = f"{model}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    return check_run_name(f"{name}-{suffix}" if suffix else name)


def train_arguments(config: TrainConfig) -> list[str]:
    """Return the `python -m core train` options that reproduce `config`.

    run_name and runs_dir are left out because `enqueue` adds them. The config is
    validated first, so an invalid form value is reported before anything is queued.
    """
    config.validate()
    defaults = TrainConfig()
    arguments: list[str] = []
    for item in fields(TrainConfig):
        name = item.name
        value = getattr(config, name)
        if name in ("run_name", "runs_dir") or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name in STORE_TRUE_FLAGS:
            if value:
                arguments.append(flag)
        elif isinstance(value, bool):
            arguments.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list):
            arguments += [flag, ",".join(value) or "none"]
        elif value != getattr(defaults, name) or name in ("model", "data", "epochs"):
            arguments += [flag, str(value)]
    return arguments


def enqueue(args: list[str], run_name: str, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR,
            start_worker: bool = True) -> Job:
    """Queue `python -m core train ARGS --run-name RUN_NAME --runs-dir RUNS_DIR` and start the worker.

    Args:
        args: training options, without --run-name and --runs-dir (added here).
        run_name: the run folder name the job will create.
        runs_dir: the folder that contains run folders and the queue.
        start_worker: start a queue worker if none runs (tests pass False to drive it by hand).
    """
    check_run_name(run_name)
    if any(job.run_name == run_name for job in list_jobs(runs_dir)) or (Path(runs_dir) / run_name).exists():
        raise ValueError(f"run name {run_name!r} is already used; choose another")
    job = Job(id=run_name, run_name=run_name, args=[*args, "--run-name", run_name, "--runs-dir", str(runs_dir)])
    jobs_dir(runs_dir).mkdir(parents=True, exist_ok=True)
    _save(runs_dir, job)
    logger.info("queued job %s", job.id)
    if start_worker:
        ensure_worker(runs_dir)
    return job


def failure_reason(runs_dir: str | os.PathLike, job_id: str) -> str | None:
    """Return the last error that a failed job's training process logged, with the lines it lists, or None."""
    path = log_path(runs_dir, job_id)
    if not path.is_file():
        return None
    reason: list[str] = []
    in_error = False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if LOG_LINE.match(line):
            in_error = " ERROR " in line
            if in_error:
                reason = [line.split(": ", 1)[-1]]  # drop the "<time> ERROR core: " prefix
        elif in_error:
            reason.append(line)  # a multi-line message: the rows it lists and the fix
    return "\n".join(reason) if reason else None


def resumable(run_name: str, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> bool:
    """Return True when a run stopped early with a last.pt and no job is queued or running for it."""
    run_dir = Path(runs_dir) / run_name
    if not (run_dir / "last.pt").is_file() or (run_dir / "metrics.json").is_file():
        return False
    if any(job.run_name == run_name and job.state in ("queued", "running") for job in list_jobs(runs_dir)):
        return False
    try:
        return summarize_run(run_dir).status in ("interrupted", "failed")
    except (OSError, ValueError, TypeError):
        return False


def enqueue_resume(run_name: str, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR, start_worker: bool = True) -> Job:
    """Queue `python -m core train --resume RUN_NAME`, which continues the run in its own folder.

    The job id is RUN_NAME-resume-N, so the job that first trained the run keeps its record.
    """
    check_run_name(run_name)
    if not resumable(run_name, runs_dir):
        raise ValueError(f"run {run_name} cannot be resumed: it finished, has no last.pt, or is queued or running")
    taken = {job.id for job in list_jobs(runs_dir)}
    job_id = next(f"{run_name}-resume-{number}" for number in range(1, len(taken) + 2)
                  if f"{run_name}-resume-{number}" not in taken)
    job = Job(id=job_id, run_name=run_name, args=["--resume", run_name, "--runs-dir", str(runs_dir)])
    _save(runs_dir, job)
    logger.info("queued job %s", job.id)
    if start_worker:
        ensure_worker(runs_dir)
    return job


def cancel(job_id: str, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> Job:
    """Cancel a queued job, or interrupt a running one (SIGINT to its process group).

    An interrupted run records `run_failed` with KeyboardInterrupt and keeps its last
    completed epoch; the worker then marks the job cancelled.
    """
    job = load_job(runs_dir, job_id)
    if job.state == "queued":
        job.state, job.ended = "cancelled", time.time()
        _save(runs_dir, job)
    elif job.state == "running" and job.pid:
        job.cancel_requested = True
        _save(runs_dir, job)
        try:
            os.killpg(job.pid, signal.SIGINT)
        except ProcessLookupError:
            logger.info("job %s had already ended", job_id)
    return job


# ----------------------------------------------------------------------------- worker


def worker_running(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> bool:
    """Return True when a queue worker holds the worker lock."""
    lock_path = jobs_dir(runs_dir) / WORKER_LOCK
    if not lock_path.exists():
        return False
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def _worker_starting(runs_dir: str | os.PathLike) -> bool:
    # A worker needs many seconds to import torch before it takes the lock. The marker
    # written when it was started keeps callers from starting more workers meanwhile.
    try:
        marker = read_json(jobs_dir(runs_dir) / WORKER_STARTING)
        return time.time() - float(marker["time"]) < WORKER_START_SECONDS and process_alive(int(marker["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_worker(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> None:
    """Start a detached queue worker unless one is running or starting; it exits when the queue is empty."""
    if worker_running(runs_dir) or _worker_starting(runs_dir):
        return
    folder = jobs_dir(runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "worker.log").open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", "queue", "--runs-dir", str(runs_dir)],
            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )
    write_json(folder / WORKER_STARTING, {"pid": process.pid, "time": time.time()})
    logger.info("started a queue worker for %s (pid %d)", runs_dir, process.pid)


def _next_queued(runs_dir: str | os.PathLike) -> Job | None:
    return next((job for job in list_jobs(runs_dir) if job.state == "queued"), None)


def _outcome_from_run(runs_dir: str | os.PathLike, job: Job) -> str:
    """Return the final job state that the run folder records for a job whose process ended."""
    events = read_progress(Path(runs_dir) / job.run_name / "progress.jsonl")
    final = final_event(events)
    if final is not None and final["event"] == "run_finished":
        return "finished"
    if job.cancel_requested or (final is not None and final.get("error_type") == "KeyboardInterrupt"):
        return "cancelled"
    return "failed"


def refresh_job_states(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> list[Job]:
    """Settle jobs marked running whose training process has ended without a worker recording it.

    That happens when the queue worker was killed: the training process, in its own
    session, goes on and ends on its own. Returns the jobs whose process still runs.
    """
    still_running = []
    for job in list_jobs(runs_dir):
        if job.state != "running":
            continue
        if job.pid and process_alive(job.pid):
            still_running.append(job)
            continue
        job.state, job.ended = _outcome_from_run(runs_dir, job), job.ended or time.time()
        _save(runs_dir, job)
        logger.warning("job %s ended without its worker; state %s taken from its run folder", job.id, job.state)
    return still_running


def _wait_for_orphans(runs_dir: str | os.PathLike) -> None:
    # A run left by a killed worker still trains; waiting for it keeps runs one at a time.
    while orphans := refresh_job_states(runs_dir):
        logger.info("waiting for job %s, started by an earlier worker", orphans[0].id)
        time.sleep(2.0)


def run_job(job: Job, runs_dir: str | os.PathLike) -> Job:
    """Run one job's training process to the end and record the outcome."""
    with log_path(runs_dir, job.id).open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", "train", *job.args],
            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )
        job.state, job.started, job.pid = "running", time.time(), process.pid
        _save(runs_dir, job)
        logger.info("job %s started (pid %d)", job.id, process.pid)
        returncode = process.wait()

    job = load_job(runs_dir, job.id)  # picks up a cancel request made meanwhile
    job.returncode, job.ended = returncode, time.time()
    if job.cancel_requested:
        job.state = "cancelled"
    else:
        job.state = "finished" if returncode == 0 else "failed"
    _save(runs_dir, job)
    logger.info("job %s %s (exit code %d)", job.id, job.state, returncode)
    return job


def work_queue(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> int:
    """Run queued jobs one at a time until none is left; return how many ran.

    Only one worker per runs folder runs at a time: a second one returns 0 at once.
    """
    folder = jobs_dir(runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    while True:
        with (folder / WORKER_LOCK).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("another queue worker is running for %s", runs_dir)
                if _worker_starting(runs_dir) and read_json(folder / WORKER_STARTING).get("pid") == os.getpid():
                    (folder / WORKER_STARTING).unlink(missing_ok=True)
                return count
            (folder / WORKER_STARTING).unlink(missing_ok=True)
            _wait_for_orphans(runs_dir)
            while (job := _next_queued(runs_dir)) is not None:
                run_job(job, runs_dir)
                count += 1
        # A job queued after the last check but before the lock was released found the
        # lock held and started no worker, so look once more with the lock released.
        if _next_queued(runs_dir) is None:
            return count
