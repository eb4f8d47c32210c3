"""Streamlit AppTest checks of the home, Train and Predict pages, driven through app.py."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from core import jobs
from core.demo import make_demo
from core.trainer import TrainConfig, train
from tests.conftest import PROJECT_ROOT, interrupt_training_at


@pytest.fixture
def dashboard_env(tmp_path, monkeypatch):
    """A small demo dataset and an empty runs folder that the dashboard uses instead of the project's."""
    demo = make_demo(tmp_path / "demo", train_rows=60, test_rows=10, image_size=48)
    monkeypatch.setenv("CORE_DEMO_DIR", str(demo))
    monkeypatch.setenv("CORE_RUNS_DIR", str(tmp_path / "runs"))
    return {"demo": demo, "runs": tmp_path / "runs", "root": tmp_path}


def _app() -> AppTest:
    app = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=120)
    app.run()
    return app


def _open_page(path: str) -> AppTest:
    app = _app()
    app.switch_page(path)
    app.run()
    return app


def _train_page(model: str) -> AppTest:
    """Open the Train page with `model` chosen, so that the form shows its settings."""
    app = _open_page("pages/train.py")
    app.selectbox[0].set_value(model)
    app.run()
    return app


def _queue_run(app: AppTest, run_name: str) -> None:
    """Submit the Train page's form under `run_name`."""
    app.text_input[0].set_value(run_name)
    app.button(key="FormSubmitter:train_settings-Queue run").click()
    app.run()


def _texts(app: AppTest) -> str:
    parts = [element.value for element in (*app.markdown, *app.caption, *app.info, *app.success, *app.error,
                                             *app.warning)]
    return "\n".join(str(part) for part in parts)


def _wait_for_jobs(runs, timeout: float = 300.0) -> list[jobs.Job]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = jobs.list_jobs(runs)
        if current and all(job.state not in ("queued", "running") for job in current):
            return current
        time.sleep(0.5)
    raise TimeoutError(f"queued jobs did not finish within {timeout:.0f} s")


# ----------------------------------------------------------------------------- home


def test_home_demo_dataset_summary(dashboard_env):
    app = _app()
    assert not app.exception
    assert "Demo data" in _texts(app)
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Labelled rows"] == "60"
    assert metrics["Labels"] == "5"
    assert metrics["Images found"] == "60"
    assert metrics["Test rows"] == "10"
    assert "No runs yet" in _texts(app)


def test_home_choose_folder_remembered(dashboard_env, coco_mini):
    app = _app()
    app.text_input[0].set_value(str(coco_mini))
    app.button(key="FormSubmitter:dataset-Use this folder").click()
    app.run()
    assert not app.exception
    assert app.session_state["dataset_path"] == str(coco_mini.resolve())
    assert {metric.label: metric.value for metric in app.metric}["Labelled rows"] == "78"

    # A new visit (new session) starts from the remembered folder.
    again = _app()
    assert again.session_state["dataset_path"] == str(coco_mini.resolve())
    assert "Demo data" not in _texts(again)


def test_home_folder_without_train_csv(dashboard_env):
    app = _app()
    app.text_input[0].set_value(str(dashboard_env["root"]))
    app.button(key="FormSubmitter:dataset-Use this folder").click()
    app.run()
    assert not app.exception
    assert "has no train.csv" in _texts(app)
    assert app.session_state["dataset_path"] == str(dashboard_env["demo"])


def test_home_caption_only_dataset_warning(dashboard_env, captions_csv):
    app = _app()
    app.text_input[0].set_value(str(captions_csv.parent))
    app.button(key="FormSubmitter:dataset-Use this folder").click()
    app.run()
    assert not app.exception
    assert {metric.label: metric.value for metric in app.metric}["Labelled rows"] == "30,000"
    assert "only the caption_only model can train" in _texts(app)


def test_home_lists_invalid_rows_and_keeps_working(dashboard_env):
    train_csv = dashboard_env["demo"] / "train.csv"
    lines = train_csv.read_text().splitlines()
    lines[2] = lines[2].split(",")[0] + ",seven," + lines[2].split(",", 2)[2]
    lines.append(lines[1])  # a duplicate ImageID
    train_csv.write_text("\n".join(lines) + "\n")
    app = _app()
    assert not app.exception
    warning = "\n".join(str(element.value) for element in app.warning)
    assert "2 rows of train.csv are invalid" in warning
    assert "line 3 (1.jpg): label 'seven' is not an integer" in warning
    assert "duplicate ImageID (first on line 2)" in warning
    assert app.metric[0].value == "59"  # 61 rows, two of them invalid
    app.switch_page("pages/dataset.py")
    app.run()
    assert not app.exception


def test_home_lists_runs(dashboard_env):
    train(TrainConfig(data=str(dashboard_env["demo"]), model="caption_only", epochs=1,
                      runs_dir=str(dashboard_env["runs"]), run_name="listed"))
    app = _app()
    assert not app.exception
    assert "listed" in app.dataframe[0].value["run"].tolist()


# ----------------------------------------------------------------------------- train


def test_train_page_renders_form(dashboard_env):
    app = _open_page("pages/train.py")
    assert not app.exception
    labels = [selectbox.label for selectbox in app.selectbox]
    for label in ("Architecture", "Loss", "Sampler", "Optimizer", "Device"):
        assert label in labels
    assert "No runs queued" in _texts(app)


def test_train_page_queues_and_shows_run(dashboard_env):
    app = _train_page("caption_only")
    epochs = next(widget for widget in app.number_input if widget.label == "Epochs")
    epochs.set_value(1)
    _queue_run(app, "page-run")
    assert not app.exception
    assert "Queued run page-run" in _texts(app)

    finished = _wait_for_jobs(dashboard_env["runs"])
    assert [job.state for job in finished] == ["finished"]
    app.run()
    assert not app.exception
    assert app.dataframe[0].value["state"].tolist() == ["finished"]
    progress_texts = [element.proto.text for element in app.get("progress")]
    assert any("Finished: Epoch 1/1" in text for text in progress_texts)


def test_train_page_ablation_set(dashboard_env):
    app = _train_page("caption_only")
    next(widget for widget in app.number_input if widget.label == "Epochs").set_value(1)
    app.text_input[0].set_value("study")
    app.button(key="FormSubmitter:train_settings-Queue ablation set").click()
    app.run()
    assert not app.exception
    assert "Queued ablation set study" in _texts(app)
    finished = _wait_for_jobs(dashboard_env["runs"])
    assert sorted(job.state for job in finished) == ["finished", "finished"]
    assert any(job.run_name.endswith("no-dropout") for job in finished)


def test_train_page_invalid_setting_message(dashboard_env):
    app = _train_page("caption_only")
    _queue_run(app, "bad/name")
    assert not app.exception
    assert "invalid run name" in _texts(app)
    assert jobs.list_jobs(dashboard_env["runs"]) == []


def test_train_page_resumes_cancelled_run(dashboard_env, monkeypatch):
    runs = dashboard_env["runs"]
    restore = interrupt_training_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(data=str(dashboard_env["demo"]), model="caption_only", epochs=2,
                          runs_dir=str(runs), run_name="cut"))
    restore()
    # Record the run as a cancelled dashboard job, as Cancel leaves it.
    job = jobs.enqueue(["--model", "caption_only"], "cut-job", runs, start_worker=False)
    job.run_name, job.state = "cut", "cancelled"
    jobs._save(runs, job)

    app = _open_page("pages/train.py")
    assert not app.exception
    app.button(key="resume-cut-job").click()
    app.run()
    assert not app.exception
    finished = _wait_for_jobs(runs)
    assert {job.id: job.state for job in finished} == {"cut-job": "cancelled", "cut-resume-1": "finished"}
    app.run()
    assert app.selectbox(key="train_follow").value == "cut-resume-1"
    progress_texts = [element.proto.text for element in app.get("progress")]
    assert any("Finished: Epoch 2/2" in text for text in progress_texts)


def test_train_page_shows_why_a_job_failed(dashboard_env):
    (dashboard_env["demo"] / "data" / "3.jpg").write_bytes(b"")
    app = _train_page("cnn2")
    _queue_run(app, "refused")
    assert [job.state for job in _wait_for_jobs(dashboard_env["runs"])] == ["failed"]
    app.run()
    assert not app.exception
    errors = "\n".join(str(element.value) for element in app.error)
    assert "1 unusable row(s)" in errors
    assert "(3.jpg): empty file (0 bytes)" in errors


def test_train_page_skip_bad_rows_option(dashboard_env):
    (dashboard_env["demo"] / "data" / "3.jpg").write_bytes(b"")
    app = _train_page("cnn2")
    next(widget for widget in app.number_input if widget.label == "Epochs").set_value(1)
    next(widget for widget in app.checkbox if widget.label == "Skip bad rows").check()
    _queue_run(app, "skipping")
    assert not app.exception
    assert [job.state for job in _wait_for_jobs(dashboard_env["runs"])] == ["finished"]
    skipped = (dashboard_env["runs"] / "skipping" / "skipped_rows.csv").read_text()
    assert "3.jpg,empty file (0 bytes)" in skipped


# ----------------------------------------------------------------------------- predict


@pytest.fixture
def trained_run(dashboard_env):
    train(TrainConfig(data=str(dashboard_env["demo"]), model="cnn2", image_size=32, epochs=1, workers=0,
                      runs_dir=str(dashboard_env["runs"]), run_name="predictor"))
    return dashboard_env


def _png_bytes(colour=(200, 30, 30), size=(64, 64), format="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=format)
    return buffer.getvalue()


def test_predict_page_without_runs(dashboard_env):
    app = _open_page("pages/predict.py")
    assert not app.exception
    assert "No finished run yet" in _texts(app)


def test_predict_page_upload(trained_run):
    app = _open_page("pages/predict.py")
    assert not app.exception
    assert "Upload an image" in _texts(app)
    app.file_uploader[0].upload("red.png", _png_bytes(), "image/png")
    app.text_input(key="predict_caption").set_value("A red circle on a grey background.")
    app.run()
    assert not app.exception
    predicted = [text for text in _texts(app).splitlines() if text.startswith("**Predicted labels:**")]
    assert predicted
    assert any(name in predicted[0] for name in ("circle", "square", "triangle", "cross", "star"))
    assert app.get("plotly_chart")


def test_predict_page_dataset_sample(trained_run):
    app = _open_page("pages/predict.py")
    app.radio(key="predict_source").set_value("Pick a dataset sample")
    app.run()
    assert not app.exception
    assert "True labels:" in _texts(app)
    assert "**Predicted labels:**" in _texts(app)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "is empty"),
        ("text.jpg", b"just some text", "is not in a known image format"),
        # The uploader accepts only .jpg, .jpeg, .png and .webp names, so other formats arrive renamed.
        ("renamed.png", "gif", "is a GIF image"),
        ("truncated.jpg", "truncated", "cannot be decoded"),
        ("huge.png", "huge", "more than the 50,000,000 allowed"),
    ],
)
def test_predict_page_bad_upload(trained_run, name, content, message):
    if content == "gif":
        content = _png_bytes(format="GIF")
    elif content == "truncated":
        content = _png_bytes(size=(256, 256), format="JPEG")[:400]
    elif content == "huge":
        buffer = io.BytesIO()
        Image.new("L", (10_000, 6_000), 0).save(buffer, format="PNG")
        content = buffer.getvalue()
    app = _open_page("pages/predict.py")
    app.file_uploader[0].upload(name, content, "application/octet-stream")
    app.run()
    assert not app.exception
    assert message in _texts(app)

    # The page keeps working: a valid upload afterwards is predicted.
    app.file_uploader[0].upload("good.png", _png_bytes(), "image/png")
    app.run()
    assert not app.exception
    assert "**Predicted labels:**" in _texts(app)


@pytest.mark.parametrize("page", ["pages/train.py", "pages/predict.py", "pages/dataset.py", "pages/compare.py"])
def test_pages_render_on_real_datasets(trained_run, captions_csv, coco_mini, page):
    # Every page with each real dataset chosen on the home page, and a finished demo run in the runs folder.
    for folder in (captions_csv.parent, coco_mini):
        app = _app()
        app.text_input[0].set_value(str(folder))
        app.button(key="FormSubmitter:dataset-Use this folder").click()
        app.run()
        app.switch_page(page)
        app.run()
        assert not app.exception, f"{page} with {folder.name}: {app.exception}"
        if page == "pages/predict.py":
            app.radio(key="predict_source").set_value("Pick a dataset sample")
            app.run()
            assert not app.exception, f"{page} sample with {folder.name}: {app.exception}"


def test_home_file_path_and_bad_dataset_not_remembered(dashboard_env):
    app = _app()
    app.text_input[0].set_value(str(dashboard_env["demo"] / "train.csv"))
    app.button(key="FormSubmitter:dataset-Use this folder").click()
    app.run()
    assert "is a file. Enter the folder that contains train.csv." in _texts(app)

    bad = dashboard_env["root"] / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("ImageID,Labels,Caption\n1.jpg,x,a\n2.jpg,1 y,b\n")
    app.text_input[0].set_value(str(bad))
    app.button(key="FormSubmitter:dataset-Use this folder").click()
    app.run()
    assert not app.exception
    assert "cannot be used" in _texts(app)
    assert "integer ids  \n  line 3 (2.jpg)" in _texts(app)
    assert app.session_state["dataset_path"] == str(dashboard_env["demo"])
    assert _app().session_state["dataset_path"] == str(dashboard_env["demo"])


def test_home_warns_about_unreadable_runs(dashboard_env):
    broken = dashboard_env["runs"] / "broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{")
    app = _app()
    assert not app.exception
    assert "cannot be read and are left out" in _texts(app)
    assert "broken:" in _texts(app)


def test_train_page_follows_new_run(dashboard_env):
    app = _train_page("caption_only")
    for name in ("first-run", "second-run"):
        _queue_run(app, name)
        assert not app.exception
        assert app.selectbox(key="train_follow").value == name
    for job in jobs.list_jobs(dashboard_env["runs"]):
        jobs.cancel(job.id, dashboard_env["runs"])
    _wait_for_jobs(dashboard_env["runs"])


def test_predict_page_caption_only_needs_caption(dashboard_env):
    train(TrainConfig(data=str(dashboard_env["demo"]), model="caption_only", epochs=1,
                      runs_dir=str(dashboard_env["runs"]), run_name="captions"))
    app = _open_page("pages/predict.py")
    assert not app.exception
    assert "Type a caption to see the predicted labels" in _texts(app)
    app.text_input(key="predict_caption").set_value("a red circle")
    app.run()
    assert "**Predicted labels:**" in _texts(app)
