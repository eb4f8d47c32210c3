"""Compare page smoke tests with Streamlit's AppTest, on hand-built run folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.demo import make_demo
from tests.conftest import PROJECT_ROOT
from tests.test_compare import epoch_event, write_run


@pytest.fixture
def runs_dir(tmp_path, monkeypatch) -> Path:
    """An empty runs folder and a small demo dataset, both set through the environment app.py reads."""
    demo = make_demo(tmp_path / "demo", train_rows=60, test_rows=10, image_size=48)
    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("CORE_DEMO_DIR", str(demo))
    monkeypatch.setenv("CORE_RUNS_DIR", str(runs))
    return runs


@pytest.fixture
def ablation_runs(runs_dir) -> Path:
    """Two finished runs of ablation group g and an interrupted run without epochs; newest first: empty, nocap, base."""
    runs = [
        write_run(runs_dir, "base", [epoch_event(1, samples=0.50, val_loss=0.45),
                                     epoch_event(2, samples=0.70, val_loss=0.35)],
                  epochs=2, ablation_group="g", ablation_variant="base"),
        write_run(runs_dir, "nocap", [epoch_event(1, samples=0.688, val_loss=0.40)],
                  epochs=1, captions=False, ablation_group="g", ablation_variant="no_captions"),
        write_run(runs_dir, "empty", [], finished=False),
    ]
    for age, run in enumerate(reversed(runs)):
        stamp = 1_700_000_000 - 100 * age
        os.utime(run / "config.json", (stamp, stamp))
    return runs_dir


def open_compare_page() -> AppTest:
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/compare.py")
    at.run()
    assert not at.exception, [item.value for item in at.exception]
    return at


def test_compare_page_defaults_to_finished_runs(ablation_runs):
    at = open_compare_page()
    assert at.title[0].value == "Compare runs"
    assert at.multiselect(key="compare_runs").value == ["nocap", "base"]
    table = at.dataframe[0].value
    assert list(table["run"]) == ["nocap", "base"]
    assert list(table["best_epoch"]) == [1, 2]
    assert list(table["samples_f1_score"]) == pytest.approx([0.688, 0.70])
    assert list(table["val_loss"]) == pytest.approx([0.40, 0.35])
    assert len(at.get("download_button")) == 1


def test_compare_page_ablation_deltas(ablation_runs):
    at = open_compare_page()
    ablation = at.dataframe[1].value
    assert list(ablation["run"]) == ["base", "nocap"]
    assert list(ablation["samples_f1_score_delta"]) == pytest.approx([0.0, -0.012])
    assert list(ablation["val_loss_delta"]) == pytest.approx([0.0, 0.05])


def test_compare_page_selection_changes_table(ablation_runs):
    at = open_compare_page()
    at.multiselect(key="compare_runs").set_value(["empty", "base"]).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["run"]) == ["empty", "base"]
    assert table["samples_f1_score"].isna().tolist() == [True, False]
    assert table["status"].tolist() == ["interrupted", "finished"]


def test_compare_page_run_without_epochs(ablation_runs):
    at = open_compare_page()
    at.multiselect(key="compare_runs").set_value(["empty"]).run()
    assert not at.exception
    table = at.dataframe[0]
    assert table.value["epochs_done"].tolist() == [0]
    assert table.value["samples_f1_score"].isna().all()
    assert table.proto.placeholder == "–"  # what the grid draws in missing cells
    texts = [item.value for item in at.markdown]
    assert "No selected run has finished an epoch yet." in texts
    assert "None of these runs belongs to an ablation group. Queue an ablation set on the Train page." in texts


def test_compare_page_ablation_scope_all_runs(ablation_runs):
    at = open_compare_page()
    at.multiselect(key="compare_runs").set_value(["nocap"]).run()
    ablation = at.dataframe[1].value
    assert ablation["samples_f1_score_delta"].isna().all()
    assert "No base run for g" in at.caption[-1].value

    at.radio(key="compare_ablation_scope").set_value("All runs in the folder").run()
    assert not at.exception
    ablation = at.dataframe[1].value
    assert list(ablation["run"]) == ["base", "nocap"]
    assert ablation.iloc[1]["samples_f1_score_delta"] == pytest.approx(-0.012)


def test_compare_page_nothing_selected(ablation_runs):
    at = open_compare_page()
    at.multiselect(key="compare_runs").set_value([]).run()
    assert not at.exception
    assert at.info[0].value == "Select one or more runs above to compare them."
    assert len(at.dataframe) == 0


def test_compare_page_empty_runs_folder(runs_dir):
    at = open_compare_page()
    assert len(at.info) == 1
    assert "Train page" in at.info[0].value
    assert len(at.dataframe) == 0
    assert len(at.multiselect) == 0
