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

from distrib_face.tracking import create_tracker, plot_training_curves
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
                log = (root / "server.log").read_text()
                raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log}")
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
    curve = plot_training_curves([(1, 10.0), (2, 5.0)], tmp_path / "training.png")
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
    assert [f["path"] for f in listed["files"]] == ["plots/training.png"]
    relative = info["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
    png = requests.get(f"{url}/api/2.0/mlflow-artifacts/artifacts/{relative}/plots/training.png", timeout=30)
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


def test_planted_secrets_reach_no_file_param_tag_or_line(server, tmp_path):
    """A password in the tracking URI and keys named ``api_key`` / ``*_token`` in ``deepspeed.extra``:
    ``distrib-face train`` against the server; the secrets are in no file of the output folder, no artifact
    and nothing in the server's database, no param or tag, and no line of stdout or stderr."""
    import json
    import subprocess

    import yaml

    secrets = {"url": "Url-pw-7781", "api_key": "Comet-key-5512", "token": "Upload-tok-9031"}
    port = server["url"].rsplit(":", 1)[1]
    uri = f"http://alice:{secrets['url']}@127.0.0.1:{port}"
    cfg = {
        "data": {"source": "random", "random_num_classes": 10, "random_num_samples": 64, "batch_size": 8,
                 "image_size": 32, "num_workers": 0},
        "model": {"backbone": "iresnet_tiny", "embedding_size": 16},
        "deepspeed": {"extra": {"comet": {"enabled": False, "api_key": secrets["api_key"]},
                                "upload_token": secrets["token"]}},
        "train": {"total_steps": 2, "log_every": 1, "checkpoint_every": 2, "export_onnx": False,
                  "output_dir": str(tmp_path / "out"), "resume": "never"},
        "tracking": {"enabled": True, "tracking_uri": uri, "experiment": "secrets"},
    }
    config = tmp_path / "secret.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-m", "distrib_face", "train", "--config", str(config)],
                          capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    experiment = _get(server, "experiments/get-by-name", experiment_name="secrets")["experiment"]
    runs = requests.post(f"{server['url']}/api/2.0/mlflow/runs/search",
                         json={"experiment_ids": [experiment["experiment_id"]]}, timeout=30).json()["runs"]
    assert len(runs) == 1
    run_id = runs[0]["info"]["run_id"]
    info, params, _, tags = _run(server, run_id)
    # The plants reached MLflow, masked.
    assert params["deepspeed.extra.comet.api_key"] == REDACTED and params["deepspeed.extra.upload_token"] == REDACTED
    assert params["tracking.tracking_uri"] == f"http://alice:{REDACTED}@127.0.0.1:{port}"
    relative = info["artifact_uri"].removeprefix("mlflow-artifacts:/").strip("/")
    ds = requests.get(f"{server['url']}/api/2.0/mlflow-artifacts/artifacts/{relative}/deepspeed_config.json",
                      timeout=30).json()
    assert ds["comet"]["api_key"] == REDACTED and ds["upload_token"] == REDACTED
    # ... and the run's end was announced without the password (MLflow's own "View run" line is kept off stdout).
    assert f"MLflow: view run {info['run_name']} at http://alice:{REDACTED}@127.0.0.1:{port}/#/" in proc.stderr
    assert "View run" not in proc.stdout

    texts = {"stdout": proc.stdout, "stderr": proc.stderr, "params": json.dumps(params), "tags": json.dumps(tags)}
    files = [p for root in (tmp_path / "out", server["root"]) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "deepspeed_config.json" for p in files) and any(p.suffix == ".db" for p in files)
    assert any(p.name == "module.pt" and p.parent.name == "engine" for p in files)  # the engine state
    for name, secret in secrets.items():
        assert not [where for where, text in texts.items() if secret in text], name
        assert not [str(p) for p in files if secret.encode() in p.read_bytes()], name
