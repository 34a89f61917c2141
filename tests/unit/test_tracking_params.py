"""Params for MLflow: flattening, stringifying, truncation, secret redaction; URI resolution; environment tags."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import subprocess
from pathlib import Path

import pytest

from distrib_face.tracking import create_tracker, flatten_params, is_secret_key, redact
from distrib_face.tracking.base import NoOpTracker
from distrib_face.tracking.environment import environment_tags, git_commit, package_versions
from distrib_face.tracking.params import MAX_PARAM_VALUE_LENGTH, REDACTED


def test_flatten_nested_sections_and_stringify():
    config = {
        "optim": {"name": "sgd", "lr": 0.1, "betas": [0.9, 0.999], "nesterov": False},
        "model": {"backbone": {"name": "iresnet50", "embedding_size": 512}},
        "data": {"image_size": (112, 112), "root": None},
        "augment": {},
        "seed": 7,
    }
    assert flatten_params(config) == {
        "optim.name": "sgd",
        "optim.lr": "0.1",
        "optim.betas": "[0.9, 0.999]",
        "optim.nesterov": "False",
        "model.backbone.name": "iresnet50",
        "model.backbone.embedding_size": "512",
        "data.image_size": "[112, 112]",
        "data.root": "None",
        "augment": "{}",
        "seed": "7",
    }


def test_flatten_prefix_and_dataclass():
    @dataclasses.dataclass
    class Optim:
        lr: float = 0.05
        milestones: list[int] = dataclasses.field(default_factory=lambda: [8, 16])

    assert flatten_params(Optim(), prefix="optim") == {"optim.lr": "0.05", "optim.milestones": "[8, 16]"}


def test_values_truncated_at_mlflow_limit():
    long_value = "a" * 5000 + "b" * 5000
    flat = flatten_params({"notes": long_value, "short": "x" * MAX_PARAM_VALUE_LENGTH})
    assert len(flat["notes"]) == 6000
    assert flat["notes"].startswith("a" * 5000) and flat["notes"].endswith("...")
    assert flat["short"] == "x" * 6000  # exactly at the limit: kept whole


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="list"):
        flatten_params([1, 2])
    with pytest.raises(ValueError, match="250"):
        flatten_params({"k" * 300: 1})


@pytest.mark.parametrize(
    "key",
    ["password", "db.pass", "db_password", "PASSWD", "api_key", "apiKey", "aws.secret_access_key", "token", "hf-token",
     "credentials", "private_key", "secret", "AuthToken", "authorization"],
)
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["num_tokens", "keep_last", "monkey", "optim.lr", "keyframe", "passes", "author"])
def test_ordinary_keys(key):
    assert not is_secret_key(key)


def test_redact_nested_without_touching_input():
    config = {
        "tracking": {"uri": "https://alice:s3cr3t@mlflow.example.com/", "api_key": "AKIA123"},
        "storage": {"credentials": {"user": "bob", "pass": "pw"}},
        "optim": {"lr": 0.1},
        "hosts": ["postgresql://u:hunter2@db:5432/x", "plain"],
    }
    before = repr(config)
    out = redact(config)
    assert repr(config) == before
    assert out == {
        "tracking": {"uri": f"https://alice:{REDACTED}@mlflow.example.com/", "api_key": REDACTED},
        "storage": {"credentials": REDACTED},
        "optim": {"lr": 0.1},
        "hosts": [f"postgresql://u:{REDACTED}@db:5432/x", "plain"],
    }
    flat = flatten_params(config)
    assert "s3cr3t" not in repr(flat) and "AKIA123" not in repr(flat) and "hunter2" not in repr(flat)
    assert flat["storage.credentials"] == REDACTED


def test_noop_tracker_records_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = create_tracker(enabled=False, tracking_uri=None, experiment="x")
    assert isinstance(tracker, NoOpTracker) and tracker.run_id is None
    with tracker:
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.set_tags({"t": 1})
        tracker.log_dict({"a": 1}, "a.json")
        assert tracker.log_onnx_model(tmp_path / "missing.onnx", "model", register_as="m") is None
    assert list(tmp_path.iterdir()) == []


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    from distrib_face.tracking.mlflow_tracker import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns.db"
    assert resolve_tracking_uri("sqlite:///sub/dir/r.db") == f"sqlite:///{tmp_path.resolve()}/sub/dir/r.db"
    assert (tmp_path / "sub" / "dir").is_dir()
    assert resolve_tracking_uri("sqlite:////abs/x.db").startswith("sqlite:////abs/x.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("http://other:1") == "http://other:1"


def _git(args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_in_and_out_of_a_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("DISTRIB_FACE_GIT_COMMIT", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(["init", "-q", "-b", "main"], repo)
    (repo / "f.txt").write_text("one\n")
    _git(["add", "f.txt"], repo)
    _git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c"], repo)
    # Reference: the ref file git wrote, not git rev-parse.
    expected = (repo / ".git" / "refs" / "heads" / "main").read_text().strip()
    assert git_commit(repo) == (expected, False)
    (repo / "f.txt").write_text("two\n")
    assert git_commit(repo) == (expected, True)
    assert environment_tags(repo)["mlflow.source.git.commit"] == expected

    outside = tmp_path / "plain"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert git_commit(outside) == (None, None)
    assert "mlflow.source.git.commit" not in environment_tags(outside)
    monkeypatch.setenv("DISTRIB_FACE_GIT_COMMIT", "abc123")
    assert git_commit(outside) == ("abc123", None)


def test_package_version_tags():
    versions = package_versions()
    for name in ("torch", "mlflow", "webdataset", "deepspeed", "ray"):
        assert versions[name] == importlib.metadata.version(name)
    dali = [d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"].startswith("nvidia-dali")]
    assert versions["nvidia-dali"] == importlib.metadata.version(dali[0])
    tags = environment_tags(Path.cwd())
    assert tags["versions.torch"] == importlib.metadata.version("torch") and tags["host"]
