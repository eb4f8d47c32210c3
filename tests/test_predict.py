"""Prediction helpers: upload validation and loading a run's model."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from core.predict import Predictor, decode_upload
from core.trainer import TrainConfig, train


def _encoded(size=(32, 16), mode="RGB", format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
def test_decode_upload_accepted_formats(format):
    image = decode_upload(_encoded(format=format), f"photo.{format.lower()}")
    assert image.mode == "RGB"
    assert image.size == (32, 16)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"hello", "is not in a known image format"),
        (_encoded(format="GIF"), "is a GIF image"),
        (_encoded(size=(20_001, 1), mode="L"), "more than 20,000 on a side"),
        (_encoded(size=(8000, 7000), mode="1"), "more than the 50,000,000 allowed"),
        (_encoded(size=(300, 300), format="JPEG")[:300], "cannot be decoded"),
    ],
)
def test_decode_upload_rejects(content, message):
    with pytest.raises(ValueError, match=message):
        decode_upload(content, "upload.png")


def test_decode_upload_transparent_png_on_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(buffer, format="PNG")
    assert decode_upload(buffer.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_predictor_config_missing_keys(demo_dataset, tmp_path):
    run_dir = train(TrainConfig(data=str(demo_dataset), model="caption_only", epochs=1, runs_dir=str(tmp_path),
                                run_name="edited"))
    config = json.loads((run_dir / "config.json").read_text())
    del config["label_names"]
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks label_names; the file was edited or damaged"):
        Predictor(run_dir)
