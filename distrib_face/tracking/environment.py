"""Where and with what a run ran: git commit, package versions, host - as MLflow tags."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
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
