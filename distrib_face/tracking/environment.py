"""Where and with what a run ran: git commit, package versions, host - as MLflow tags."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

#: Distributions whose versions are tagged ``versions.<name>``; "nvidia-dali" matches any DALI wheel
#: (nvidia-dali-cuda130, nvidia-dali-cuda120, ...).
TRACKED_PACKAGES: tuple[str, ...] = (
    "torch", "deepspeed", "ray", "nvidia-dali", "webdataset", "mlflow", "onnx", "onnxruntime", "distrib_face",
)

#: Set by a launcher whose workers run outside the checkout (Ray copies the working dir without .git).
GIT_COMMIT_ENV = "DISTRIB_FACE_GIT_COMMIT"


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip()


def git_commit(cwd: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """The checkout's HEAD commit and whether tracked files are modified, or ``(None, None)``.

    ``DISTRIB_FACE_GIT_COMMIT`` in the environment wins (dirty is then unknown). Not being in a git
    checkout, or git not being installed, is not an error.
    """
    from_env = os.environ.get(GIT_COMMIT_ENV)
    if from_env:
        return from_env.strip(), None
    folder = Path(cwd) if cwd is not None else Path.cwd()
    commit = _git(["rev-parse", "HEAD"], folder)
    if not commit:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no"], folder)
    return commit, (bool(status) if status is not None else None)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (a name ending a prefix match, e.g. "nvidia-dali"); absent ones skipped."""
    installed: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        dist_name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if dist_name:
            installed.setdefault(dist_name, dist.version)
    versions: dict[str, str] = {}
    for name in names:
        wanted = name.lower().replace("_", "-")
        if wanted in installed:
            versions[name] = installed[wanted]
            continue
        prefixed = sorted(dist for dist in installed if dist.startswith(wanted + "-"))
        if prefixed:
            versions[name] = installed[prefixed[0]]
    return versions


def environment_tags(cwd: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """The tags every run gets: ``mlflow.source.git.commit``, ``git.dirty``, ``versions.*``, ``host``, ``python``."""
    tags: dict[str, str] = {"host": socket.gethostname(), "python": platform.python_version()}
    commit, dirty = git_commit(cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
        if dirty is not None:
            tags["git.dirty"] = str(dirty).lower()
    else:
        logger.debug("no git commit found from %s; the run gets no commit tag", cwd or Path.cwd())
    tags.update({f"versions.{name}": version for name, version in package_versions().items()})
    return tags


#: Set by Ray's job supervisor for the driver of a ``ray job submit`` job: JSON with ``metadata`` holding
#: ``job_submission_id`` and ``job_name`` (ray/dashboard/modules/job/job_supervisor.py, Ray 2.60).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_job_tags(
    environ: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> dict[str, str]:
    """Tags naming the Ray job this driver runs in: ``ray.job_submission_id`` (``raysubmit_...`` or the
    ``--submission-id``), ``ray.job_name`` when it differs, and ``ray.entrypoint`` (this process's command
    line, i.e. what followed ``--`` in ``ray job submit``). Empty outside a submitted job.

    Args:
        environ: the environment (default ``os.environ``).
        argv: the command line (default ``sys.orig_argv``).
    """
    import json
    import shlex
    import sys

    environ = os.environ if environ is None else environ
    raw = environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        metadata = dict(json.loads(raw).get("metadata") or {})
    except (ValueError, AttributeError, TypeError):
        logger.warning("%s is not the JSON Ray writes; no Ray job tags", RAY_JOB_CONFIG_ENV)
        return {}
    tags: dict[str, str] = {}
    submission_id = metadata.get("job_submission_id")
    if submission_id:
        tags["ray.job_submission_id"] = str(submission_id)
    name = metadata.get("job_name")
    if name and name != submission_id:
        tags["ray.job_name"] = str(name)
    command = list(argv if argv is not None else getattr(sys, "orig_argv", sys.argv))
    if command:
        tags["ray.entrypoint"] = shlex.join(command)
    return tags
