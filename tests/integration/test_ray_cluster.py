"""Ray Train on a two-node cluster on this machine (``ray.cluster_utils.Cluster``, 1 CPU per node).

- Workers land on both nodes and train exactly as two gloo ranks on one node without Ray do.
- Fault tolerance: rank 1 dies mid-run (``os._exit(1)``); Ray restarts the worker group, which resumes from
  the last reported checkpoint, finishes with the same losses as the uninterrupted run, and keeps logging
  into the same MLflow run.

The cluster (``tests/ray_head.py:local_cluster``) lives in a short temp dir of its own, Ray's address file
included (nothing under /tmp/ray), listens on loopback only, and is shut down by its own handle (never
``ray stop``). The first test also checks the redaction of what Ray records (the Train run state, the
worker logs) and that no socket of the cluster, its workers or this driver listens beyond loopback but
the one docs/ray.md names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.test_ray_job import tiny_config
from tests.ray_head import SocketWatch, describe, local_cluster, tcpstore_listeners
from tests.spawn import run_world

pytestmark = pytest.mark.slow

TOTAL_STEPS = 6


def _config(tmp_path: Path, name: str, **sections) -> dict:
    # A constant learning rate and lr 0.02 keep float32 rounding differences (thread counts, reduction order)
    # at ~1e-7 relative over these steps.
    cfg = tiny_config(tmp_path / name, optim={"lr": 0.02}, schedule={"kind": "steps", "milestones": [100000]},
                      train={"total_steps": TOTAL_STEPS, "checkpoint_every": 2})
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def _plain_gloo_worker(rank: int, world_size: int, cfg_dict: dict) -> dict:
    from distrib_face.config import Config
    from distrib_face.parallel import init_distributed
    from distrib_face.train import run_training

    return run_training(Config.from_dict(cfg_dict), init_distributed(device="cpu"))


def _loss_history(checkpoint_dir: Path) -> list[list[float]]:
    return json.loads((Path(checkpoint_dir) / "trainer.json").read_text())["loss_history"]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[list[float]]:
    """[step, loss] of the same job as two gloo ranks on one node, without Ray."""
    from distrib_face.train.checkpoint import resolve_checkpoint

    tmp = tmp_path_factory.mktemp("reference")
    cfg = _config(tmp, "plain")
    run_world(_plain_gloo_worker, 2, tmp, (cfg,))
    return _loss_history(resolve_checkpoint(Path(cfg["train"]["output_dir"]) / "checkpoints"))


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a second node, 1 CPU each, with the driver (this process) connected."""
    with local_cluster(num_nodes=2, cpus_per_node=1) as cluster:
        yield cluster


SECRET = "Planted-api-key-6650"
URI_SECRET = "Planted-uri-pw-3318"


def test_two_nodes_place_workers_on_both_and_match_one_node(tmp_path, two_node_cluster, reference_losses,
                                                           monkeypatch):
    import os

    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    from distrib_face.config import Config
    from distrib_face.train.ray_backend import launch_ray_training

    node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(node_ids) == 2

    # Ray Train records each run (its train_loop_config included) for the dashboard when state tracking is on.
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    # Secrets the workers get: a DeepSpeed monitor's key (the monitor is off, nothing is sent) and a password
    # in the tracking URI (tracking is off: never contacted). Ray's state keeps three levels of
    # train_loop_config, so the URI's is the one it would show.
    cfg = _config(tmp_path, "two_nodes", deepspeed={"extra": {"comet": {"enabled": False, "api_key": SECRET}}},
                  tracking={"tracking_uri": f"http://alice:{URI_SECRET}@127.0.0.1:1"})
    with SocketWatch([os.getpid()]) as sockets:  # this driver, its raylets, agents and the Train workers
        result = launch_ray_training(Config.from_dict(cfg))

    summary = result.return_value
    workers = sorted(summary["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert {w["node_id"] for w in workers} == node_ids  # one worker on each node
    assert summary["steps"] == TOTAL_STEPS and summary["ray_resumed_from"] is None
    losses = _loss_history(result.checkpoint.path)
    assert [step for step, _ in losses] == list(range(1, TOTAL_STEPS + 1))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)

    # What Ray records: the Train run state holds the config redacted; no log, checkpoint or result file
    # of the cluster, the storage or the output folder holds the secret.
    runs = ray.get(get_state_actor().get_train_runs.remote())
    recorded = "".join(run.model_dump_json() for run in runs.values())
    assert "http://alice:[REDACTED]@127.0.0.1:1" in recorded and "iresnet_tiny" in recorded
    assert SECRET not in recorded and URI_SECRET not in recorded
    roots = [Path(two_node_cluster.head_node.get_temp_dir_path()), Path(cfg["train"]["output_dir"])]
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.name.startswith("worker-") for p in files)  # the workers' captured output is among them
    leaks = [str(p) for p in files for secret in (SECRET, URI_SECRET) if secret.encode() in p.read_bytes()]
    assert not leaks, leaks

    # Every socket of the cluster, its workers and this driver is on loopback, but the TCPStore of rank 0.
    names = {listener.process for listener in sockets.seen}
    assert {"gcs_server", "raylet"} <= names, describe(sockets.seen)
    store = tcpstore_listeners(sockets, summary["workers"])
    assert len(store) == 1 and {w["master_addr"] for w in workers} == {"127.0.0.1"}, describe(sockets.seen)
    assert sockets.exposed() == store, "listening beyond loopback:\n" + describe(sockets.exposed() - store)


def test_killed_worker_resumes_from_checkpoint_in_the_same_mlflow_run(tmp_path, two_node_cluster, reference_losses):
    from mlflow.tracking import MlflowClient

    from distrib_face.config import Config
    from distrib_face.train.ray_backend import FaultInjection, launch_ray_training

    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = _config(tmp_path, "fault", ray={"max_failures": 1},
                  tracking={"enabled": True, "tracking_uri": tracking_uri, "experiment": "ray_fault"})
    marker = tmp_path / "fault_marker.json"
    result = launch_ray_training(Config.from_dict(cfg), fault=FaultInjection(rank=1, step=4, marker=str(marker)))

    # The fault happened: rank 1 left at step 4, right after reporting the step-4 checkpoint.
    died = json.loads(marker.read_text())
    assert died["rank"] == 1 and died["step"] == 4
    summary = result.return_value
    # ... and the new worker group started from a reported checkpoint (step 2, or step 4 when the controller
    # had already registered it), not from scratch, and finished.
    assert summary["ray_resumed_from"] is not None
    resumed_step = json.loads((Path(summary["ray_resumed_from"]) / "trainer.json").read_text())["step"]
    assert resumed_step in (2, 4)
    assert summary["steps"] == TOTAL_STEPS and summary["steps_this_run"] == TOTAL_STEPS - resumed_step
    assert died["pid"] not in {w["pid"] for w in summary["workers"]}
    # Resuming is exact: the losses are those of the uninterrupted run.
    losses = _loss_history(result.checkpoint.path)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), rtol=1e-5, atol=0)

    # One MLflow run from start to end: the driver's run id, continued by rank 0 after the restart.
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ray_fault")
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    history = client.get_metric_history(summary["mlflow_run_id"], "loss")
    assert {m.step for m in history} == set(range(1, TOTAL_STEPS + 1))
    by_step: dict[int, list[float]] = {}
    for metric in history:
        by_step.setdefault(metric.step, []).append(metric.value)
    # Steps redone after the restart were logged twice, with the same values.
    for step, values in by_step.items():
        assert max(values) - min(values) <= 1e-5 * abs(values[0]), (step, values)
