"""Run folders: the files a training run writes, and reading them back.

A run folder under `checkpoints/` contains:

- `config.json`: every setting of the run, the label set, preprocessing and library versions.
- `progress.jsonl`: one JSON object per line, each with `time` (Unix seconds) and
  `event`, one of `PROGRESS_EVENTS`. The run ends with `run_finished` or `run_failed`.
- `split.json`: the ImageIDs of the train and validation parts.
- `last.pt` (every epoch) and `best.pt` (best validation samples F1): checkpoints
  with keys `CHECKPOINT_KEYS`, loadable with `torch.load(..., weights_only=True)`.
  `last.pt` also holds the optimizer state and the epoch history, so that
  `python -m core train --resume` can continue after the last complete epoch.
- `metrics.json`: final metrics of the best epoch, per-label scores included.
- `thresholds.json`: per-label decision thresholds tuned on the validation part.
- `train.log`: the log of the training process.
- `skipped_rows.csv`: rows left out with --skip-bad-rows, with the reason for each.
- `.lock`: held (flock) by the process that trains the run, so no second process writes to it.

JSON files and checkpoints are written to a temporary file and renamed into place,
so a reader never sees half of one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT_VERSION = 2  # 2 added history and scaler, which resuming needs
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "history", "config", "labels",
                   "format_version")
PROGRESS_EVENTS = ("run_started", "step", "epoch_end", "checkpoint_saved", "run_finished", "run_failed")
DEFAULT_RUNS_DIR = os.environ.get("CORE_RUNS_DIR", "checkpoints")  # the dashboard reads the same variable
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
LOCK_FILE = ".lock"
TEMPORARY_SUFFIX = ".tmp"


class RunInUseError(ValueError):
    """Another process is writing the run folder."""


# ----------------------------------------------------------------------------- atomic writes


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()  # what open() would give a new file; mkstemp alone gives 0600


def atomic_write(path: Path, write) -> None:
    """Call `write(handle)` on a temporary file next to `path`, flush it to disk, then rename it to `path`.

    Raises:
        OSError: the file cannot be written, such as on a full disk; the message names the file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    try:
        os.fchmod(descriptor, FILE_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, RecursionError):
            # torch.save reports a full disk as a RuntimeError from its zip writer.
            free = shutil.disk_usage(path.parent).free
            raise OSError(f"could not write {path} ({describe_error(error).splitlines()[0]}; "
                          f"{free / 1e6:.0f} MB free on that disk); free some space and try again") from error
        raise


def remove_temporary_files(folder: Path) -> int:
    """Delete temporary files that a killed process left next to its outputs; return how many."""
    leftovers = list(Path(folder).glob(f".*{TEMPORARY_SUFFIX}"))
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)
    return len(leftovers)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def read_json(path: Path) -> Any:
    """Read a JSON file, raising ValueError that names the file when it is not valid JSON."""
    with Path(path).open(encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); restore or delete the file") from error


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write a checkpoint atomically after checking it has exactly the documented keys."""
    if set(checkpoint) != set(CHECKPOINT_KEYS):
        raise ValueError(f"checkpoint keys {sorted(checkpoint)} differ from {sorted(CHECKPOINT_KEYS)}")
    atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`, so no pickled code can run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; the run may not have finished an epoch yet")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or zip errors here
        # torch's message recommends unsafe loading; keep only the part that names the rejected content.
        rejected = re.search(r"WeightsUnpickler error: ([^\n]*)", str(error))
        cause = rejected.group(1).strip() if rejected else "not a weights-only checkpoint file"
        raise ValueError(
            f"{path}: cannot be loaded as a weights-only checkpoint ({type(error).__name__}: {cause}). "
            "It may be damaged or contain pickled objects; retrain or use a checkpoint written by this program."
        ) from error
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint written by this program (no 'model' entry)")
    return checkpoint


def check_checkpoint_matches(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Raise ValueError when a checkpoint was written for another model or label set than config.json describes."""
    saved = state.get("config") or {}
    if saved.get("model") != config.get("model"):
        raise ValueError(
            f"{path}: checkpoint is for model {saved.get('model')!r} but config.json says {config.get('model')!r}; "
            "the run folder mixes files from different runs"
        )
    if [int(label) for label in state.get("labels", [])] != [int(label) for label in config["labels"]]:
        raise ValueError(
            f"{path}: checkpoint label set {state.get('labels')} differs from config.json {config['labels']}; "
            "the run folder mixes files from different runs"
        )


# ----------------------------------------------------------------------------- progress events


class ProgressWriter:
    """Append progress events to `progress.jsonl`, one flushed JSON object per line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle = self.path.open("a", encoding="utf-8")

    def emit(self, event: str, **fields: Any) -> None:
        if event not in PROGRESS_EVENTS:
            raise ValueError(f"unknown progress event {event!r}; expected one of {PROGRESS_EVENTS}")
        record = {"time": round(time.time(), 3), "event": event, **fields}
        self._handle.write(json.dumps(record, allow_nan=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def read_progress(path: Path) -> list[dict[str, Any]]:
    """Read progress events, skipping a trailing partial line and lines that are not JSON objects."""
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break  # the writer is still in the middle of this line
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s: skipped a line that is not valid JSON", path)
                continue
            if isinstance(record, dict) and "event" in record:
                events.append(record)
    return events


def restart_progress(path: Path, epoch: int, history: list[dict[str, Any]]) -> None:
    """Rewrite a resumed run's progress.jsonl so that it ends with epoch `epoch`.

    Events of later epochs, written before the process stopped, are dropped. The
    epoch_end events come from `history` (from the checkpoint), so every epoch up to
    `epoch` appears exactly once even if the process stopped between saving the
    checkpoint and writing the event.
    """
    earlier = [
        event for event in read_progress(path)
        if event["event"] != "epoch_end" and not (isinstance(event.get("epoch"), int) and event["epoch"] > epoch)
    ]
    merged = sorted(earlier + list(history), key=lambda event: float(event.get("time", 0.0)))
    text = "".join(json.dumps(event, allow_nan=False) + "\n" for event in merged)
    atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def describe_error(error: BaseException) -> str:
    """Return the one-line cause of an error for users, without a traceback.

    Errors raised inside DataLoader worker processes reach the main process with the
    worker's traceback inside their message; only its last line is the cause.
    """
    if isinstance(error, KeyboardInterrupt):
        return "interrupted by the user"
    message = str(error) or type(error).__name__
    if "Original Traceback" in message:
        lines = [line for line in message.splitlines() if line.strip()]
        message = lines[-1].split(": ", 1)[-1] if lines else message
    return message


# ----------------------------------------------------------------------------- run folders


def check_run_name(name: str) -> str:
    """Return `name` if it is a valid run folder name, else raise ValueError."""
    if not RUN_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid run name {name!r}; use letters, digits, '.', '_' and '-' only "
            "(at most 100 characters, starting with a letter or digit)"
        )
    return name


def resolve_run(run: str | os.PathLike, runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR) -> Path:
    """Find a run folder given its path or its name under `runs_dir`."""
    candidate = Path(run)
    for path in (candidate, Path(runs_dir) / candidate):
        if (path / "config.json").is_file():
            return path
    raise FileNotFoundError(
        f"run {str(run)!r} not found: no config.json in {candidate} or {Path(runs_dir) / candidate}; "
        "list runs with 'python -m core runs'"
    )


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the duration of the block.

    Raises:
        RunInUseError: another process has the lock; the message gives that process's id.
    """
    path = Path(run_dir) / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(descriptor, 32).decode("ascii", errors="replace").strip()
        os.close(descriptor)
        raise RunInUseError(
            f"run {Path(run_dir).name} is being written by another process{f' (pid {owner})' if owner else ''}; "
            "wait for it to end or stop it, then try again"
        ) from None
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode("ascii"))
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def run_locked(run_dir: Path) -> bool:
    """Return True while a process holds the run folder's lock (a run that is training)."""
    try:
        descriptor = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False  # 0 and negative ids would address process groups, not one process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def final_event(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the run_finished or run_failed event of the latest start, or None while none is written.

    A resumed run writes run_started again, so an earlier failure no longer counts.
    """
    started_at = max((index for index, event in enumerate(events) if event["event"] == "run_started"), default=0)
    return next(
        (event for event in reversed(events[started_at:]) if event["event"] in ("run_finished", "run_failed")), None
    )


@dataclass
class RunSummary:
    """The headline facts of one run folder."""

    path: Path
    name: str
    model: str
    captions: bool
    status: str  # running, finished, failed, or interrupted (stopped by Ctrl-C or killed)
    epochs_done: int
    epochs_planned: int
    best_metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def summarize_run(path: Path) -> RunSummary:
    """Summarise a run folder from its config and progress events."""
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise ValueError(f"{path / 'config.json'}: expected a JSON object, found {type(config).__name__}")
    events = read_progress(path / "progress.jsonl")
    epochs = [event for event in events if event["event"] == "epoch_end"]
    final = final_event(events)
    started = next((event for event in reversed(events) if event["event"] == "run_started"), None)

    error = None
    if run_locked(path):
        status = "running"  # a process has the lock, such as a resumed run before its first event
    elif final is not None and final["event"] == "run_finished":
        status = "finished"
    elif final is not None and final.get("error_type") == "KeyboardInterrupt":
        status, error = "interrupted", final.get("message")
    elif final is not None:
        status, error = "failed", f"{final.get('error_type')}: {final.get('message')}"
    elif not (path / LOCK_FILE).exists() and started is not None and process_alive(started.get("pid")):
        status = "running"  # a run folder from before run locks: its process id is the only sign
    else:
        status = "interrupted"

    best = {}
    if epochs:
        best_event = max(epochs, key=lambda event: event.get("samples_f1_score", float("-inf")))
        best = {key: value for key, value in best_event.items() if key not in ("time", "event", "per_label")}
    return RunSummary(
        path=path,
        name=path.name,
        model=config.get("model", "?"),
        captions=bool(config.get("captions")),
        status=status,
        epochs_done=len(epochs),
        epochs_planned=int(config.get("epochs", 0)),
        best_metrics=best,
        error=error,
    )


def list_runs(runs_dir: str | os.PathLike = DEFAULT_RUNS_DIR, problems: list[str] | None = None) -> list[RunSummary]:
    """Summarise every run folder under `runs_dir`, newest first.

    Unreadable folders are logged and skipped; pass a list as `problems` to collect
    a message for each of them as well.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    summaries = []
    for path in runs_dir.iterdir():
        if not (path / "config.json").is_file():
            continue
        try:
            summaries.append(summarize_run(path))
        except (OSError, ValueError, TypeError) as error:
            logger.warning("skipped run folder %s: %s", path, error)
            if problems is not None:
                problems.append(f"{path.name}: {error}")
    return sorted(summaries, key=lambda summary: (summary.path / "config.json").stat().st_mtime, reverse=True)


@dataclass
class RunProgress:
    """How far a run has come, read from its progress events."""

    epoch: int  # the epoch in progress, or the last one finished
    epochs_planned: int
    step: int  # steps done in `epoch`
    steps: int  # steps per epoch, 0 until the first step event
    fraction: float  # share of all planned steps done, in [0, 1]
    history: list[dict[str, Any]]  # one entry per finished epoch: losses, scores, timing (no per-label lists)


def run_progress(path: Path) -> RunProgress:
    """Read a run's progress events and summarise where training stands."""
    config = read_json(Path(path) / "config.json")
    planned = int(config.get("epochs", 0)) if isinstance(config, dict) else 0
    events = read_progress(Path(path) / "progress.jsonl")
    history = [
        {key: value for key, value in event.items() if key not in ("time", "event", "per_label")}
        for event in events if event["event"] == "epoch_end" and isinstance(event.get("epoch"), int)
    ]
    steps_events = [event for event in events if event["event"] == "step"]
    epoch = history[-1]["epoch"] if history else 0
    step, steps = 0, 0
    if steps_events:
        last = steps_events[-1]
        steps = int(last.get("steps", 0) or 0)
        if isinstance(last.get("epoch"), int) and last["epoch"] > epoch:
            epoch, step = last["epoch"], int(last.get("step", 0) or 0)
    finished = any(event["event"] == "run_finished" for event in events)
    if finished or planned == 0:
        fraction = 1.0 if finished else 0.0
    else:
        done_epochs = len(history)
        within = step / steps if steps and epoch > done_epochs else 0.0
        fraction = min(1.0, (done_epochs + within) / planned)
    return RunProgress(epoch=epoch, epochs_planned=planned, step=step, steps=steps, fraction=fraction, history=history)


def tail_text(path: Path, lines: int = 30) -> str:
    """Return the last `lines` lines of a text file, or "" when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
