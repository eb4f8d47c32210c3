"""End-to-end tests of `python -m core`: each subcommand as a separate process, as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.__main__ import main
from tests.conftest import PROJECT_ROOT

SUBCOMMANDS = ("train", "evaluate", "predict", "submit", "runs", "queue", "make-demo")


def run_cli(*args: str, cwd: Path = PROJECT_ROOT, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"python -m core {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in this process, as `python -m core ARGS` does, and return (exit code, stdout)."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().out


def _read_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _help_text(command: str, capsys) -> str:
    # In-process: the parser is the same object the CLI process builds, without a torch import per call.
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_cli_help_for_every_command(command, capsys):
    text = _help_text(command, capsys)
    assert "usage: python -m core" in text
    assert "--help" in text


def test_cli_help_as_process():
    result = run_cli("--help")
    for command in SUBCOMMANDS:
        assert command in result.stdout


def test_cli_every_train_option_has_help(capsys):
    lines = _help_text("train", capsys).splitlines()
    options = [line.strip() for line in lines if line.strip().startswith("--")]
    assert len(options) > 25
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("--") and stripped != "--help":
            # Either the help text follows on the same line or it is on the next line.
            has_text = len(stripped.split("  ", 1)) == 2 or lines[index + 1].startswith(" " * 10)
            assert has_text, f"no help text for {stripped}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_cli_help_shows_defaults_except_none(command, capsys):
    text = " ".join(_help_text(command, capsys).split())  # help lines are wrapped
    assert "(default: None)" not in text
    if command == "train":
        assert "--epochs EPOCHS passes over the training part (default: 5)" in text


def test_cli_demo_train_evaluate_predict_submit(tmp_path, capsys):
    data = tmp_path / "demo"
    runs = tmp_path / "runs"
    code, out = cli(capsys, "make-demo", str(data), "--train-rows", "60", "--test-rows", "12", "--image-size", "40")
    assert code == 0
    assert "60 training rows" in out

    code, out = cli(capsys, "train", "--data", str(data), "--model", "cnn2", "--captions", "--epochs", "2",
                    "--image-size", "32", "--batch-size", "16", "--workers", "0", "--runs-dir", str(runs),
                    "--run-name", "demo-run")
    assert code == 0
    assert "validation samples F1" in out
    run_dir = runs / "demo-run"
    assert (run_dir / "train.log").read_text().count("epoch 2/2") == 1
    assert json.loads((run_dir / "metrics.json").read_text())["best_epoch"] in (1, 2)

    code, out = cli(capsys, "runs", "--runs-dir", str(runs))
    assert "demo-run" in out
    assert "finished" in out
    assert "2/2" in out

    code, out = cli(capsys, "evaluate", "demo-run", "--runs-dir", str(runs))
    assert code == 0
    assert "samples F1" in out
    assert "circle" in out
    code, out = cli(capsys, "evaluate", str(run_dir), "--csv", str(data / "train.csv"), "--json")
    evaluated = json.loads(out)
    assert evaluated["rows"] == 60
    assert 0.0 <= evaluated["samples_f1_score"] <= 1.0

    code, out = cli(capsys, "predict", "demo-run", "--runs-dir", str(runs), "--image", str(data / "data" / "0.jpg"),
                    "--caption", "A red circle on a grey background.")
    assert code == 0
    assert "predicted:" in out
    for name in ("circle", "square", "triangle", "cross", "star"):
        assert name in out
    code, out = cli(capsys, "predict", "demo-run", "--runs-dir", str(runs), "--image", str(data / "data" / "0.jpg"),
                    "--json", "--top", "2")
    scores = json.loads(out)
    assert len(scores) == 2
    assert scores[0]["probability"] >= scores[1]["probability"]

    submission = tmp_path / "submission.csv"
    code, out = cli(capsys, "submit", "demo-run", "--runs-dir", str(runs), "--data", str(data), "--out",
                    str(submission))
    assert code == 0
    submitted = _read_rows(submission)
    expected = _read_rows(data / "test.csv")
    assert [row["ImageID"] for row in submitted] == [row["ImageID"] for row in expected]
    for row in submitted:
        assert row["Labels"].strip(), f"empty labels for {row['ImageID']}"
        assert set(row["Labels"].split()) <= {"1", "2", "3", "4", "5"}


def test_cli_caption_only_without_image(tmp_path, capsys):
    data = tmp_path / "captions"
    data.mkdir()
    rows = ["ImageID,Labels,Caption"] + [
        f"{index}.jpg,{1 + index % 2},\"a {'dog' if index % 2 == 0 else 'cat'}, sitting\"" for index in range(40)
    ]
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    (data / "test.csv").write_text("ImageID,Caption\n100.jpg,a dog\n101.jpg,a cat\n")
    runs = tmp_path / "runs"
    code, _ = cli(capsys, "train", "--data", str(data), "--model", "caption_only", "--epochs", "10", "--lr", "0.01",
                  "--runs-dir", str(runs), "--run-name", "captions")
    assert code == 0
    # Ids 1 and 2 are COCO ids, so they are shown as person and bicycle; "dog" captions carry label 1.
    code, out = cli(capsys, "predict", "captions", "--runs-dir", str(runs), "--caption", "a dog on a sofa", "--json")
    scores = json.loads(out)
    assert scores[0]["label"] == 1
    assert scores[0]["name"] == "person"
    assert scores[0]["predicted"] is True
    submission = tmp_path / "submission.csv"
    code, _ = cli(capsys, "submit", "captions", "--runs-dir", str(runs), "--data", str(data), "--out", str(submission))
    assert code == 0
    assert [row["ImageID"] for row in _read_rows(submission)] == ["100.jpg", "101.jpg"]


def test_cli_coco_mini_train_submit_predict(coco_mini, tmp_path):
    runs = tmp_path / "runs"
    result = run_cli("train", "--data", str(coco_mini), "--model", "cnn2", "--captions", "--epochs", "1",
                     "--image-size", "64", "--runs-dir", str(runs), "--run-name", "coco")
    assert "validation samples F1" in result.stdout

    out = tmp_path / "submission.csv"
    run_cli("submit", "coco", "--runs-dir", str(runs), "--data", str(coco_mini), "--out", str(out))
    submitted = _read_rows(out)
    expected = _read_rows(coco_mini / "test.csv")
    assert len(submitted) == 19
    assert [row["ImageID"] for row in submitted] == [row["ImageID"] for row in expected]
    assert all(row["Labels"].strip() for row in submitted)

    photo = coco_mini / "data" / expected[0]["ImageID"]
    result = run_cli("predict", "coco", "--runs-dir", str(runs), "--image", str(photo), "--caption",
                     expected[0]["Caption"])
    assert "person" in result.stdout
    assert "probability" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--data", "no-such-folder"), "dataset folder no-such-folder not found"),
        (("evaluate", "no-such-run"), "run 'no-such-run' not found"),
        (("predict", "no-such-run", "--caption", "x"), "run 'no-such-run' not found"),
        (("train", "--lr", "-1"), "invalid lr"),
        (("train", "--run-name", "../outside"), "invalid run name"),
        (("make-demo", "x", "--train-rows", "1"), "invalid demo size"),
    ],
)
def test_cli_bad_input_clear_error(args, message, tmp_path):
    result = run_cli(*args, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path, check=False) \
        if args[0] != "make-demo" else run_cli(*args, cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_predict_needs_image(tmp_path, demo_dataset, capsys, caplog):
    runs = tmp_path / "runs"
    code, _ = cli(capsys, "train", "--data", str(demo_dataset), "--epochs", "1", "--image-size", "32", "--workers",
                  "0", "--runs-dir", str(runs), "--run-name", "r")
    assert code == 0
    code, _ = cli(capsys, "predict", "r", "--runs-dir", str(runs), "--caption", "a circle")
    assert code == 1
    assert "needs an image; pass --image PATH" in caplog.text
    code, _ = cli(capsys, "predict", "r", "--runs-dir", str(runs), "--image", str(tmp_path / "missing.jpg"))
    assert code == 1
    assert "missing.jpg not found" in caplog.text


def test_cli_runs_empty_folder(tmp_path, capsys):
    code, out = cli(capsys, "runs", "--runs-dir", str(tmp_path / "none"))
    assert code == 0
    assert "no runs in" in out


def test_cli_corrupt_image_listed_before_training(tmp_path, capsys, caplog):
    data = tmp_path / "demo"
    cli(capsys, "make-demo", str(data), "--train-rows", "20", "--test-rows", "2", "--image-size", "32")
    (data / "data" / "5.jpg").write_text("not an image")
    code, _ = cli(capsys, "train", "--data", str(data), "--image-size", "32", "--epochs", "1", "--workers", "1",
                  "--normalization", "none", "--runs-dir", str(tmp_path / "runs"), "--run-name", "bad")
    assert code == 1
    assert "(5.jpg): not an image file Pillow can read" in caplog.text
    assert "--skip-bad-rows" in caplog.text
    assert "Traceback" not in caplog.text
    assert not (tmp_path / "runs" / "bad").exists()


def test_cli_predict_top_must_be_positive(tmp_path, demo_dataset, capsys, caplog):
    runs = tmp_path / "runs"
    cli(capsys, "train", "--data", str(demo_dataset), "--model", "caption_only", "--epochs", "1", "--runs-dir",
        str(runs), "--run-name", "c")
    code, _ = cli(capsys, "predict", "c", "--runs-dir", str(runs), "--caption", "a star", "--top", "0")
    assert code == 1
    assert "invalid --top 0" in caplog.text
    code, _ = cli(capsys, "submit", "c", "--runs-dir", str(runs), "--data", str(demo_dataset), "--out", str(tmp_path))
    assert code == 1
    assert "Is a directory" in caplog.text


def test_cli_predict_run_without_model(tmp_path, capsys, caplog):
    # A run folder whose config.json has only the settings: it stopped before training.
    run_dir = tmp_path / "runs" / "early"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": "cnn2", "captions": True, "epochs": 3}))
    code, _ = cli(capsys, "predict", str(run_dir), "--caption", "x")
    assert code == 1
    assert "stopped before training started" in caplog.text
