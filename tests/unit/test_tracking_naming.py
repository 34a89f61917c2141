"""Default run names that say what ran, the data set's name, and the tags of a Ray job's driver."""

from __future__ import annotations

import json
import shlex
from datetime import datetime

import pytest

from distrib_face.config import Config
from distrib_face.data.manifest import Manifest
from distrib_face.tracking.environment import RAY_JOB_CONFIG_ENV, ray_job_tags
from distrib_face.tracking.naming import dataset_name, default_run_name, run_name_for

WHEN = datetime(2026, 12, 1, 8, 18)


def _manifest(source: dict, location: str | None = None) -> Manifest:
    return Manifest(num_classes=1, num_samples=1, shards=["a.tar"], shard_counts=[1], class_counts=[1],
                    source=source, location=location)


@pytest.mark.parametrize("manifest, shards, expected", [
    (_manifest({"kind": "recordio", "path": "/data/ms1mv3/train.rec"}), "/data/shards/x", "ms1mv3"),
    (_manifest({"kind": "folder", "path": "/data/casia-webface/images/"}), None, "casia-webface"),
    (_manifest({"kind": "synthetic"}), "demo_out/data", "synthetic"),
    (_manifest({"name": "glint 360k"}), None, "glint_360k"),
    (_manifest({}, location="/srv/wds/webface42m/manifest.json"), None, "webface42m"),
    (None, "s3://bucket/shards/ms1m-retinaface/", "ms1m-retinaface"),
    (None, "/data/train/shards", "data"),  # nothing but generic names
])
def test_dataset_name(manifest, shards, expected):
    assert dataset_name(manifest, shards=shards) == expected


def test_default_run_name_from_the_config():
    cfg = Config.from_dict({"data": {"shards": "/data/ms1mv3"}, "train": {"total_steps": 10},
                            "model": {"backbone": "iresnet50"}, "loss": {"margin": "arcface"}})
    assert run_name_for(cfg, when=WHEN) == "iresnet50-arcface-ms1mv3-20261201-0818"
    assert default_run_name("vit_t", "cosface", "random", WHEN) == "vit_t-cosface-random-20261201-0818"
    named = cfg.replace(["tracking.run_name=mine"])
    assert run_name_for(named, when=WHEN) == "mine"


def test_ray_job_tags_from_the_drivers_environment():
    # The variable as Ray 2.60's JobSupervisor._get_driver_env_vars writes it for the entrypoint process.
    env = {RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"},
                                           "metadata": {"job_submission_id": "raysubmit_ab12", "job_name": "raysubmit_ab12"}})}
    argv = ["python", "launch/ray_job.py", "--config", "configs/tiny cpu.yaml"]
    tags = ray_job_tags(env, argv)
    assert tags == {"ray.job_submission_id": "raysubmit_ab12", "ray.entrypoint": shlex.join(argv)}
    assert shlex.split(tags["ray.entrypoint"]) == argv
    assert ray_job_tags({}, argv) == {}  # not a submitted job
