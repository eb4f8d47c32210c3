"""Dataset page smoke tests: the page runs inside the app router on generated and real datasets."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from core.demo import SHAPES, make_demo
from tests.conftest import PROJECT_ROOT

CAPTION_ONLY_NOTE = "no data/ folder"


def open_dataset_page(tmp_path, monkeypatch, dataset_path=None) -> AppTest:
    # A small demo dataset generated in advance keeps the router from writing a full-size one.
    make_demo(tmp_path / "demo", train_rows=60, test_rows=10, image_size=48)
    monkeypatch.setenv("CORE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CORE_DEMO_DIR", str(tmp_path / "demo"))
    app = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=120)
    if dataset_path is not None:
        app.session_state["dataset_path"] = str(dataset_path)
    app.run()
    app.switch_page("pages/dataset.py")
    app.run()
    return app


def sample_labels(app: AppTest) -> list[str]:
    """Return the label line under each sample image (the bold markdown in the sample grid)."""
    return [element.value.strip("*") for element in app.markdown if element.value.startswith("**")]


def chart_specs(app: AppTest) -> list[dict]:
    return [json.loads(element.proto.spec) for element in app.get("plotly_chart")]


def test_dataset_page_demo_charts(tmp_path, monkeypatch):
    app = open_dataset_page(tmp_path, monkeypatch)
    assert not app.exception
    assert app.title[0].value == "Dataset"
    specs = chart_specs(app)
    # Label frequency, label dominance, co-occurrence, labels per image, caption length.
    assert len(specs) == 5
    assert set(specs[0]["data"][0]["x"]) == set(SHAPES.values())
    dominance = [trace["name"] for trace in specs[1]["data"] if trace.get("fill") == "toself"]
    assert dominance[0].startswith("circle: ")
    assert dominance[0].endswith("%)")
    assert specs[2]["data"][0]["x"] == list(SHAPES.values())


def test_dataset_page_normalise_toggle(tmp_path, monkeypatch):
    app = open_dataset_page(tmp_path, monkeypatch)
    app.toggle(key="eda_normalise").set_value(True).run()
    assert not app.exception
    heatmap = chart_specs(app)[2]
    assert heatmap["data"][0]["hovertemplate"].startswith("P(")
    assert heatmap["layout"]["coloraxis"]["colorbar"]["title"]["text"] == "P(column | row)"


def test_dataset_page_demo_names_and_samples(tmp_path, monkeypatch):
    app = open_dataset_page(tmp_path, monkeypatch)
    assert app.metric[2].value == "circle"
    assert app.metric[2].delta.endswith("% of rows")
    words = app.dataframe[-1].value
    assert words.index.tolist() == list(SHAPES.values())
    assert len(app.get("image")) == 12
    assert len(sample_labels(app)) == 12
    assert not [element for element in app.info if CAPTION_ONLY_NOTE in element.value]


def test_dataset_page_label_filter(tmp_path, monkeypatch):
    app = open_dataset_page(tmp_path, monkeypatch)
    app.multiselect(key="eda_sample_labels").select("star").run()
    assert not app.exception
    labels = sample_labels(app)
    assert labels
    assert all("star" in line.split(", ") for line in labels)

    app.multiselect(key="eda_sample_labels").select("circle").run()
    both = sample_labels(app)
    assert all({"star", "circle"} <= set(line.split(", ")) for line in both)

    app.radio(key="eda_sample_match").set_value("any").run()
    either = sample_labels(app)
    assert len(either) == 12
    assert all({"star", "circle"} & set(line.split(", ")) for line in either)


def test_dataset_page_shuffle(tmp_path, monkeypatch):
    app = open_dataset_page(tmp_path, monkeypatch)
    before = [element.value for element in app.caption if ".jpg:" in element.value]
    app.button(key="eda_shuffle").click().run()
    assert not app.exception
    assert app.number_input(key="eda_sample_seed").value == 1
    after = [element.value for element in app.caption if ".jpg:" in element.value]
    assert len(after) == 12
    assert after != before


def test_dataset_page_missing_dataset(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    app = open_dataset_page(tmp_path, monkeypatch)
    app.session_state["dataset_path"] = str(tmp_path / "empty")
    app.run()
    assert not app.exception
    assert "train.csv" in app.error[0].value
    assert not app.get("plotly_chart")


def test_dataset_page_real_captions(tmp_path, monkeypatch, captions_csv):
    app = open_dataset_page(tmp_path, monkeypatch, dataset_path=captions_csv.parent)
    assert not app.exception
    assert len(app.get("plotly_chart")) == 5
    assert app.metric[0].value == "30,000"
    assert app.metric[2].value == "person"
    assert app.metric[2].delta == "76.0% of rows"
    assert [element for element in app.info if CAPTION_ONLY_NOTE in element.value]
    assert not app.get("image")
    samples = app.dataframe[-1].value
    assert samples.columns.tolist() == ["ImageID", "labels", "Caption"]
    assert len(samples) == 12


def test_dataset_page_coco_mini(tmp_path, monkeypatch, coco_mini):
    app = open_dataset_page(tmp_path, monkeypatch, dataset_path=coco_mini)
    assert not app.exception
    assert len(app.get("plotly_chart")) == 5
    assert len(app.get("image")) == 12
    assert not app.warning
    assert not [element for element in app.info if CAPTION_ONLY_NOTE in element.value]
    assert any("person" in line.split(", ") for line in sample_labels(app))
