"""The MLflow tracker against a real sqlite store (no server): what it writes is read back with sqlite3 itself.

One database for the module (creating its tables takes a few seconds); each test uses its own experiment.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from distrib_face.tracking import create_tracker, plot_training_curves
from distrib_face.tracking.mlflow_tracker import MLflowTracker, TrackingError, fluent_mlflow_state
from distrib_face.tracking.params import REDACTED


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite store made through the default URI: cwd/mlruns.db, artifacts in cwd/mlartifacts."""
    root = tmp_path_factory.mktemp("mlflow_sqlite")
    old_cwd, old_uri = os.getcwd(), os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)
    try:
        tracker = create_tracker(enabled=True, tracking_uri=None, experiment="defaults")
        tracker.end()
    finally:
        os.chdir(old_cwd)
        if old_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return {"root": root, "uri": tracker.tracking_uri, "first": tracker}


def _query(store, sql, *args):
    with sqlite3.connect(store["root"] / "mlruns.db") as connection:
        return connection.execute(sql, args).fetchall()


def test_default_uri_and_artifact_location(store):
    root = store["root"].resolve()
    tracker = store["first"]
    assert tracker.tracking_uri == f"sqlite:///{root}/mlruns.db"  # four slashes: absolute path
    assert (root / "mlruns.db").is_file()
    (location,) = _query(store, "SELECT artifact_location FROM experiments WHERE name = 'defaults'")[0]
    assert Path(location) == root / "mlartifacts"
    assert _query(store, "SELECT status FROM runs WHERE run_uuid = ?", tracker.run_id) == [("FINISHED",)]


def test_params_metrics_tags(store, tmp_path):
    tracker = create_tracker(True, store["uri"], "params", run_name="p", artifact_location=str(tmp_path / "art"))
    config = {
        "optim": {"lr": 0.1, "milestones": [8, 16]},
        "tracking": {"uri": "https://u:pw123@host/", "token": "abc"},
        "notes": "n" * 7000,
        "many": {f"field_{i:03d}": i for i in range(250)},  # more than one log_batch of 100
    }
    tracker.log_params(config)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": torch.tensor(4.0 / step), "lr": np.float32(0.1), "img/s": 100 + step}, step=step)
    tracker.set_tags({"purpose": "test", "world_size": 2})
    tracker.end()

    params = dict(_query(store, "SELECT key, value FROM params WHERE run_uuid = ?", tracker.run_id))
    assert params["optim.lr"] == "0.1" and params["optim.milestones"] == "[8, 16]"
    assert params["tracking.token"] == REDACTED and params["tracking.uri"] == f"https://u:{REDACTED}@host/"
    assert len(params["notes"]) == 6000
    assert all(params[f"many.field_{i:03d}"] == str(i) for i in range(250))
    assert len(params) == 2 + 2 + 1 + 250

    loss = _query(store, "SELECT step, value FROM metrics WHERE run_uuid = ? AND key = 'loss' ORDER BY step",
                  tracker.run_id)
    assert loss == [(1, 4.0), (2, 2.0), (3, pytest.approx(4.0 / 3))]
    assert _query(store, "SELECT value FROM metrics WHERE run_uuid = ? AND key = 'img/s' AND step = 3",
                  tracker.run_id) == [(103.0,)]

    tags = dict(_query(store, "SELECT key, value FROM tags WHERE run_uuid = ?", tracker.run_id))
    assert tags["purpose"] == "test" and tags["world_size"] == "2" and tags["mlflow.runName"] == "p"
    assert tags["versions.torch"] == torch.__version__ and tags["host"]
    (location,) = _query(store, "SELECT artifact_location FROM experiments WHERE name = 'params'")[0]
    assert Path(location) == (tmp_path / "art").resolve()


def test_resume_continues_the_same_run(store, caplog):
    first = create_tracker(True, store["uri"], "resume", run_name="r")
    first.log_params({"optim": {"lr": 0.1}, "world_size": 2})
    first.log_metrics({"loss": 3.0}, step=10)
    run_id = first.run_id  # the process "dies" here: the run is never ended

    again = create_tracker(True, store["uri"], "resume", run_id=run_id)
    assert again.run_id == run_id
    assert _query(store, "SELECT status FROM runs WHERE run_uuid = ?", run_id) == [("RUNNING",)]
    again.log_params({"optim": {"lr": 0.1}, "world_size": 4})  # same value: skipped; changed: kept + tagged
    again.log_metrics({"loss": 2.0}, step=20)
    again.end()

    assert _query(store, "SELECT status FROM runs WHERE run_uuid = ?", run_id) == [("FINISHED",)]
    assert _query(store, "SELECT step, value FROM metrics WHERE run_uuid = ? ORDER BY step", run_id) == [
        (10, 3.0), (20, 2.0)]
    assert dict(_query(store, "SELECT key, value FROM params WHERE run_uuid = ?", run_id)) == {
        "optim.lr": "0.1", "world_size": "2"}
    tags = dict(_query(store, "SELECT key, value FROM tags WHERE run_uuid = ?", run_id))
    assert tags["param_changed.world_size"] == "2 -> 4" and "resumed_at" in tags
    experiment_runs = _query(
        store, "SELECT COUNT(*) FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = 'resume'"
    )
    assert experiment_runs == [(1,)]

    finished = create_tracker(True, store["uri"], "resume", run_id=run_id)  # a finished run can be continued too
    assert _query(store, "SELECT status FROM runs WHERE run_uuid = ?", run_id) == [("RUNNING",)]
    with finished:
        pass
    assert _query(store, "SELECT status FROM runs WHERE run_uuid = ?", run_id) == [("FINISHED",)]

    with pytest.raises(TrackingError, match="0123456789abcdef"):
        create_tracker(True, store["uri"], "resume", run_id="0123456789abcdef")


def test_metrics_kept_while_the_store_refuses(store, caplog):
    from mlflow import MlflowClient

    tracker = create_tracker(True, store["uri"], "outage")
    tracker.metric_retry_interval_s = 3600.0
    tracker.log_metrics({"loss": 1.0}, step=1)
    MlflowClient(store["uri"]).delete_run(tracker.run_id)  # a real refusal: the store rejects a deleted run
    tracker.log_metrics({"loss": 2.0}, step=2)  # no exception: training would go on
    assert "could not log metrics" in caplog.text
    MlflowClient(store["uri"]).restore_run(tracker.run_id)
    tracker.log_metrics({"loss": 3.0}, step=3)  # within the retry interval: kept, not sent
    query = "SELECT step, value FROM metrics WHERE run_uuid = ? ORDER BY step"
    assert _query(store, query, tracker.run_id) == [(1, 1.0)]
    tracker.end()  # sends what was waiting
    assert _query(store, query, tracker.run_id) == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_failed_block_marks_run_failed(store):
    with pytest.raises(ZeroDivisionError):
        with create_tracker(True, store["uri"], "failing") as tracker:
            1 / 0
    assert _query(store, "SELECT status FROM runs WHERE run_uuid = ?", tracker.run_id) == [("FAILED",)]


def test_artifacts_dict_figure_and_plots(store, tmp_path):
    tracker = create_tracker(True, store["uri"], "artifacts", artifact_location=str(tmp_path / "art"))
    assert isinstance(tracker, MLflowTracker)
    tracker.log_dict({"zero_optimization": {"stage": 1}, "auth": {"password": "x"}}, "deepspeed_config.json")
    curves = plot_training_curves([(1, 2.0), (2, 1.0)], tmp_path / "training.png")
    tracker.log_artifacts([curves], subdir="plots")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    tracker.log_artifact(folder, subdir="extra")

    from matplotlib.figure import Figure

    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    tracker.log_figure(figure, "plots/figure.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tracker.log_artifact(tmp_path / "nope.png")
    tracker.end()

    artifacts = Path(tracker.artifact_uri)
    assert artifacts == (tmp_path / "art" / tracker.run_id / "artifacts").resolve()
    assert json.loads((artifacts / "deepspeed_config.json").read_text()) == {
        "zero_optimization": {"stage": 1}, "auth": {"password": REDACTED},
    }
    assert (artifacts / "plots" / "training.png").read_bytes() == curves.read_bytes()
    assert (artifacts / "plots" / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (artifacts / "extra" / "ckpt" / "a.txt").read_text() == "a"


class _TinyEmbedder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = torch.nn.Linear(8, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def export_tiny_onnx(path: Path) -> torch.nn.Module:
    """A small float32 [-1, 3, 112, 112] -> [-1, 512] network exported with torch's ONNX exporter."""
    torch.manual_seed(0)
    model = _TinyEmbedder().eval()
    torch.onnx.export(
        model, (torch.randn(2, 3, 112, 112),), str(path), dynamo=False, input_names=["input"],
        output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
    )
    return model


def test_onnx_model_logged_loadable_and_registered(store, tmp_path):
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient

    model = export_tiny_onnx(tmp_path / "model.onnx")
    tracker = create_tracker(True, store["uri"], "models")
    env_before, uri_before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    uri = tracker.log_onnx_model(tmp_path / "model.onnx", "model", register_as="tiny-face")
    tracker.end()
    # MLflow's process-wide state is left as it was.
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == (env_before, uri_before)

    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        expected = model(images).numpy()
    with fluent_mlflow_state(store["uri"]):  # "models:/" URIs resolve through the process-wide URI
        loaded = mlflow.pyfunc.load_model(uri)
        onnx_model = mlflow.onnx.load_model("models:/tiny-face/1")
    signature = loaded.metadata.signature
    assert [(s.name, s.type, s.shape) for s in signature.inputs.inputs] == [
        ("input", np.dtype("float32"), (-1, 3, 112, 112))]
    assert [(s.name, s.shape) for s in signature.outputs.inputs] == [("embedding", (-1, 512))]
    predicted = loaded.predict(images.numpy())
    np.testing.assert_allclose(predicted["embedding"], expected, rtol=1e-4, atol=1e-5)

    client = MlflowClient(store["uri"])
    versions = client.search_model_versions("name = 'tiny-face'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", tracker.run_id)]
    assert [i.name for i in onnx_model.graph.input] == ["input"]


def _download_one_file(store, model_uri: str, dst: Path) -> Path:
    """model.onnx alone, through the MLflow API, into an empty folder (as a download from the UI gives it)."""
    import mlflow

    model_id = model_uri.removeprefix("models:/")
    location = MlflowClient(store["uri"]).get_logged_model(model_id).artifact_location
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/model.onnx", dst_path=str(dst),
                                                    tracking_uri=store["uri"]))


def _onnx_embeddings(path: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images.numpy()})[0]


from mlflow import MlflowClient  # noqa: E402 - used by the helpers above and the tests below


def test_logged_onnx_is_one_file_and_carries_the_final_metrics(store, tmp_path):
    model = export_tiny_onnx(tmp_path / "model.onnx")
    tracker = create_tracker(True, store["uri"], "model-link", artifact_location=str(tmp_path / "art"))
    for step, accuracy in ((0, 0.6), (50, 0.8), (100, 0.95)):  # untrained, during, final
        tracker.log_metrics({"verify/lfw/accuracy": accuracy, "loss": 10.0 / (step + 1)}, step=step)
    uri = tracker.log_onnx_model(tmp_path / "model.onnx", "model", step=100)
    tracker.log_metrics({"images_per_sec": 5.0}, step=100)  # logged after the model: not linked
    tracker.end()

    client = MlflowClient(store["uri"])
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert sorted((m.key, m.step, m.value) for m in logged.metrics) == [("loss", 100, 10.0 / 101),
                                                                       ("verify/lfw/accuracy", 100, 0.95)]
    assert client.get_run(tracker.run_id).data.tags["model.model.step"] == "100"

    folder = Path(logged.artifact_location)
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".data")], names  # no external-data file beside it
    downloaded = _download_one_file(store, uri, tmp_path / "download")
    assert sorted(p.name for p in downloaded.parent.iterdir()) == ["model.onnx"]
    import stat

    assert stat.S_IMODE(downloaded.stat().st_mode) & 0o044 == 0o044  # readable by group and others
    images = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(_onnx_embeddings(downloaded, images), expected, rtol=1e-4, atol=1e-5)


def test_a_model_over_the_limit_keeps_its_weights_in_one_named_file(store, tmp_path, monkeypatch):
    import mlflow

    from distrib_face.tracking import mlflow_tracker

    monkeypatch.setattr(mlflow_tracker, "ONNX_SELF_CONTAINED_LIMIT_BYTES", 1000)  # stands in for 2 GiB
    model = export_tiny_onnx(tmp_path / "model.onnx")
    tracker = create_tracker(True, store["uri"], "model-external", artifact_location=str(tmp_path / "art"))
    uri = tracker.log_onnx_model(tmp_path / "model.onnx", "model")
    tracker.end()
    location = MlflowClient(store["uri"]).get_logged_model(uri.removeprefix("models:/")).artifact_location
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp_path / "dl"),
                                                      tracking_uri=store["uri"]))
    assert {"model.onnx", "model.onnx.data"} <= {p.name for p in folder.iterdir()}
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(_onnx_embeddings(folder / "model.onnx", images), expected, rtol=1e-4, atol=1e-5)


def test_resume_records_changes_and_an_opened_run_is_not_resumed(store, tmp_path, caplog):
    import logging

    import yaml

    client = MlflowClient(store["uri"])
    driver = create_tracker(True, store["uri"], "resume-story", run_name="iresnet50-arcface-ms1mv3-x")
    driver.set_tags({"launcher": "ray"})  # the Ray driver opens the run; workers log into it
    with caplog.at_level(logging.INFO, logger="distrib_face.tracking.mlflow_tracker"):
        worker = create_tracker(True, store["uri"], "resume-story", run_id=driver.run_id)
    assert not worker.resumed and "continuing" not in caplog.text and "opened for this job" in caplog.text
    assert "resumed_at" not in client.get_run(driver.run_id).data.tags
    worker.log_params({"optim": {"lr": 0.1}, "ray": {"num_workers": 2}})
    worker.log_metrics({"loss": 3.0}, step=10)
    worker.end("SCHEDULED")  # stopped by train.max_steps_this_run
    run = client.get_run(driver.run_id)
    assert run.info.status == "SCHEDULED" and run.data.tags["stopped_at_step"] == "10"

    again = create_tracker(True, store["uri"], "resume-story", run_id=driver.run_id)  # holds params: a resume
    assert again.resumed and client.get_run(driver.run_id).info.status == "RUNNING"
    changes = again.record_resume({"optim": {"lr": 0.05}, "ray": {"num_workers": 2}}, step=10, world_size=4,
                                  checkpoint="/ckpt/step_10")
    again.end()
    assert changes == {"optim.lr": ("0.1", "0.05")}
    run = client.get_run(driver.run_id)
    assert run.data.params["optim.lr"] == "0.1"  # MLflow keeps the first value
    assert run.data.tags["param_changed.optim.lr"] == "0.1 -> 0.05"
    assert run.data.tags["resumed_at_step_10"] == "world_size=4" and "resumed_at" in run.data.tags
    assert "param_changed.ray.num_workers" not in run.data.tags
    record = yaml.safe_load((Path(run.info.artifact_uri) / "resumes" / "step_000000010.yaml").read_text())
    assert record["changed"] == {"optim.lr": {"logged": "0.1", "now": "0.05"}}
    assert record["world_size"] == 4 and record["checkpoint"] == "/ckpt/step_10"
    assert record["config"]["optim"]["lr"] == 0.05


def test_training_data_is_a_dataset_input(store, tmp_path):
    import json

    from distrib_face.data import read_manifest
    from distrib_face.data.testing import write_indexed_shards

    written = write_indexed_shards(tmp_path / "ms1mv3" / "shards", [3, 2])
    manifest = read_manifest(tmp_path / "ms1mv3" / "shards")
    tracker = create_tracker(True, store["uri"], "dataset", artifact_location=str(tmp_path / "art"))
    digest = tracker.log_training_data(manifest)
    tracker.end()

    run = MlflowClient(store["uri"]).get_run(tracker.run_id)
    (entry,) = run.inputs.dataset_inputs
    dataset = entry.dataset
    assert dataset.name == "ms1mv3" and digest == dataset.digest == written.content_hash[:36]
    assert str((tmp_path / "ms1mv3" / "shards" / "manifest.json").resolve()) in dataset.source
    profile = json.loads(dataset.profile)
    assert (profile["num_classes"], profile["num_samples"], profile["num_shards"]) == (5, 5, 2)
    assert profile["content_hash"] == written.content_hash
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]
    assert run.data.tags["data.content_hash"] == written.content_hash
