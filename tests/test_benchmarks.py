"""Tests for the GPU benchmark script, which must work the first time a GPU machine is lent.

Its device is a parameter, so these tests run it on the CPU at a tiny size.
"""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from benchmarks import gpu_epoch


def test_generated_dataset_photos_and_rows(tmp_path):
    root = gpu_epoch.generated_dataset(tmp_path / "generated", items=5)

    lines = (root / "train.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ImageID,Labels,Caption"
    assert len(lines) == 6
    for index in range(5):
        with Image.open(root / "data" / f"{index}.jpg") as photo:
            assert photo.format == "JPEG"
            assert photo.size == gpu_epoch.PHOTO_SIZE


def test_gpu_epoch_runs_on_cpu(capsys):
    gpu_epoch.main(["--device", "cpu", "--items", "6", "--models", "cnn2", "resnet18", "--image-size", "32",
                    "--batch-size", "4", "--repeats", "1"])

    output = capsys.readouterr().out
    assert output.startswith("machine: ")
    for model in ("cnn2", "resnet18"):
        assert f"{model} at 32 px, batch 4, 6 images:" in output
    assert len(re.findall(r"report-style loop .*: \d+ images/s", output)) == 2
    assert len(re.findall(r"default pipeline .*: \d+ images/s", output)) == 2
    assert len(re.findall(r"speed-up: \d+\.\d\dx", output)) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_epoch_without_gpu_exits():
    with pytest.raises(SystemExit, match="no CUDA GPU is visible to torch; .* or pass --device cpu"):
        gpu_epoch.main(["--items", "2"])


@pytest.mark.parametrize(("arguments", "message"), [
    (["--models", "cnn2", "resnt18"], "unknown model 'resnt18'; choose from"),
    (["--models", "caption_only"], "caption_only reads captions only"),
    (["--repeats", "0"], "argument --repeats: invalid value 0; expected a positive integer"),
    (["--device", "mps"], "invalid device 'mps'; expected cuda, cuda:N or cpu"),
])
def test_gpu_epoch_rejects_arguments_before_work(arguments, message, capsys, monkeypatch):
    monkeypatch.setattr(gpu_epoch, "generated_dataset", lambda *args: pytest.fail("photos written"))
    with pytest.raises(SystemExit) as stopped:
        gpu_epoch.main(["--device", "cpu", *arguments])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
