"""Shared fixtures: paths to the real development data, and small generated datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
CAPTIONS_CSV = SHARED_DATA / "comp5329-captions" / "train.csv"
COCO_MINI = SHARED_DATA / "coco-mini-comp5329"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real development data not found at {path}; these tests run only where ../shared/data exists")
    return path


@pytest.fixture
def captions_csv() -> Path:
    """The real 30,000-row COMP5329 train.csv (captions and labels, no images)."""
    return _require(CAPTIONS_CSV)


@pytest.fixture
def coco_mini() -> Path:
    """97 real COCO photos in the COMP5329 layout (78 train rows, 19 test rows)."""
    return _require(COCO_MINI)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """A small generated demo dataset, shared by the tests of one session (treat it as read-only)."""
    from core.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), train_rows=120, test_rows=20, image_size=48, seed=1)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)


def interrupt_training_at(monkeypatch, epoch: int):
    """Make training raise KeyboardInterrupt when `epoch` starts, as Ctrl-C would; return a function that undoes it."""
    import core.trainer as trainer

    original = trainer.train_one_epoch

    def interrupt(*args, **kwargs):
        if args[7] == epoch:  # the epoch argument of train_one_epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    return lambda: monkeypatch.setattr(trainer, "train_one_epoch", original)
