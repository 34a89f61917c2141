"""The tracker against a real ``mlflow server`` on 127.0.0.1; everything is read back through its REST API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from distrib_face.tracking import create_tracker, plot_loss_curve
from distrib_face.tracking.mlflow_tracker import fluent_mlflow_state
from distrib_face.tracking.params import REDACTED
from tests.integration.test_mlflow_sqlite import export_tiny_onnx

pytestmark = pytest.mark.slow  # server start (~7 s idle, more on a busy machine) plus a full run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` with a sqlite backend and proxied artifacts; stopped (its process group) at the end."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{root}/m.db",
         "--artifacts-destination", str(root / "art"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def stop():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        log.close()

    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{(root / 'server.log').read_text()}")
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 120 s:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield {"url": url, "root": root}
    finally:
        stop()


def _get(server, endpoint, **query):
    response = requests.get(f"{server['url']}/api/2.0/mlflow/{endpoint}", params=query, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _run(server, run_id):
    run = _get(server, "runs/get", run_id=run_id)["run"]
    data = run["data"]
    return (
        run["info"],
        {p["key"]: p["value"] for p in data.get("params", [])},
        {m["key"]: (m["step"], m["value"]) for m in data.get("metrics", [])},
        {t["key"]: t["value"] for t in data.get("tags", [])},
    )


def test_run_logged_resumed_and_read_over_rest(server, tmp_path, caplog):
    url = server["url"]
    tracker = create_tracker(True, url, "server-exp", run_name="ray-job", artifact_location=str(tmp_path / "local"))
    assert "ignoring local artifact_location" in caplog.text  # the server decides where artifacts go
    assert tracker.artifact_uri.startswith("mlflow-artifacts:/")
    tracker.log_params({"optim": {"lr": 0.05, "milestones": [4, 8]}, "tracking": {"password": "pw"}})
    for step in (1, 2):
        tracker.log_metrics({"loss": 10.0 / step, "img/s": 50.0 * step}, step=step)
    tracker.set_tags({"purpose": "server-test"})
    curve = plot_loss_curve({"loss": [(1, 10.0), (2, 5.0)]}, tmp_path / "loss_curve.png")
    tracker.log_artifact(curve, subdir="plots")
    tracker.log_dict({"train_micro_batch_size_per_gpu": 8}, "deepspeed_config.json")
    run_id = tracker.run_id  # a Ray restart: the worker dies without ending the run

    resumed = create_tracker(True, url, "server-exp", run_id=run_id)
    assert resumed.run_id == run_id
    info, _, _, _ = _run(server, run_id)
    assert info["status"] == "RUNNING"
    resumed.log_params({"optim": {"lr": 0.05, "milestones": [4, 8]}})
    resumed.log_metrics({"loss": 2.0}, step=3)
    model = export_tiny_onnx(tmp_path / "model.onnx")
    model_uri = resumed.log_onnx_model(tmp_path / "model.onnx", "model", register_as="server-face")
    resumed.end()

    info, params, metrics, tags = _run(server, run_id)
    assert info["status"] == "FINISHED" and info["run_name"] == "ray-job"
    assert params == {"optim.lr": "0.05", "optim.milestones": "[4, 8]", "tracking.password": REDACTED}
    assert metrics["loss"] == (3, 2.0) and metrics["img/s"] == (2, 100.0)
    assert tags["purpose"] == "server-test" and tags["versions.mlflow"] and "resumed_at" in tags
    history = _get(server, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(1, 10.0), (2, 5.0), (3, 2.0)]

    experiment = _get(server, "experiments/get-by-name", experiment_name="server-exp")["experiment"]
    found = requests.post(
        f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment["experiment_id"]]}, timeout=30
    ).json()
    assert [r["info"]["run_id"] for r in found["runs"]] == [run_id]  # one run, continued

    listed = _get(server, "artifacts/list", run_id=run_id, path="plots")
    assert [f["path"] for f in listed["files"]] == ["plots/loss_curve.png"]
    relative = info["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
    png = requests.get(f"{url}/api/2.0/mlflow-artifacts/artifacts/{relative}/plots/loss_curve.png", timeout=30)
    assert png.status_code == 200 and png.content == curve.read_bytes()
    config = requests.get(f"{url}/api/2.0/mlflow-artifacts/artifacts/{relative}/deepspeed_config.json", timeout=30)
    assert config.json() == {"train_micro_batch_size_per_gpu": 8}

    registered = _get(server, "registered-models/get", name="server-face")["registered_model"]
    assert [(v["version"], v["run_id"]) for v in registered["latest_versions"]] == [("1", run_id)]
    import mlflow

    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(images).numpy()
    with fluent_mlflow_state(url):
        for uri in (model_uri, "models:/server-face/1"):
            predicted = mlflow.pyfunc.load_model(uri).predict(images.numpy())["embedding"]
            np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-5)


def test_model_downloaded_from_the_server_is_one_file_with_the_final_metrics(server, tmp_path):
    import mlflow
    import onnxruntime as ort
    from mlflow import MlflowClient

    url = server["url"]
    tracker = create_tracker(True, url, "server-model")
    for step, accuracy in ((0, 0.55), (40, 0.97)):
        tracker.log_metrics({"verify/holdout/accuracy": accuracy}, step=step)
    model = export_tiny_onnx(tmp_path / "model.onnx")
    model_uri = tracker.log_onnx_model(tmp_path / "model.onnx", "model", step=40)
    tracker.end()

    client = MlflowClient(url)
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    assert [(m.key, m.step, m.value) for m in logged.metrics] == [("verify/holdout/accuracy", 40, 0.97)]
    assert logged.artifact_location.startswith("mlflow-artifacts:/")  # served through the server's proxy
    names = sorted(a.path for a in client.list_logged_model_artifacts(logged.model_id))
    assert "model.onnx" in names and not [n for n in names if n.endswith(".data")], names
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{logged.artifact_location}/model.onnx",
                                                    dst_path=str(tmp_path / "download"), tracking_uri=url))
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = model(images).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
