"""A private Ray head on this machine that listens on loopback only: for launch/demo.sh and the tests.

    eval "$(python launch/local_ray.py start --temp-dir DIR --log DIR/head.log)"   # sets RAY_HEAD_* and auth
    ray job submit --address "$RAY_HEAD_ADDRESS" ...
    python launch/local_ray.py stop "$RAY_HEAD_PGID"

The head (``ray start --head --block``) runs in a session of its own with its own temp dir, token file and
free ports, so it and everything it starts form one process group that :func:`stop_head` ends: other Ray
processes on the machine are never touched (no ``ray stop``).

What keeps every socket on 127.0.0.1 (Ray 2.60; docs/ray.md "What listens where"):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. ``ray start --node-ip-address=127.0.0.1`` alone does not work:
  ``scripts.py`` replaces a loopback address by the machine's routable IP (``resolve_ip_for_localhost``),
  and the GCS, raylet, object manager, workers, agents and client server then bind that IP or 0.0.0.0.
  With this switch off, Ray treats the machine as a single-node "local" cluster (the mode of Windows and
  macOS): the node IP is 127.0.0.1, and the C++ servers (GCS, raylet, object manager, core workers) and the
  Python ones (dashboard agent, runtime-env agent, client server, the metrics exporters of the dashboard,
  the agent and the autoscaler monitor) bind 127.0.0.1. No other node can join such a head: this is for
  one machine only.
- ``--dashboard-host=127.0.0.1`` (the job API ``ray job submit`` needs).
- ``GLOO_SOCKET_IFNAME=lo``: the workers' gloo process group binds the loopback interface instead of
  whatever the host name resolves to.
- Free ports for everything that has a fixed default (GCS 6379, dashboard 8265, client server 10001,
  dashboard metrics 44227 and autoscaler metrics 44217 via ``DASHBOARD_METRIC_PORT`` /
  ``AUTOSCALER_METRIC_PORT``, agent ports), so several heads (several engineers' tests) coexist.

Not switched off, because ``ray start`` cannot: the Ray client server (``scripts.py`` gives it port 10001
whenever ``ray[client]`` is installed and refuses port 0) and the metrics exporters; they are on 127.0.0.1
and free ports. The one socket no setting moves is the TCPStore that Ray Train's torch backend opens on rank
0's worker for the process group (torch binds it to all interfaces, ``*:MASTER_PORT``, while a job trains).

A leaf: standard library only, so the demo can use it before anything is installed into the venv.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"

#: Environment for every Ray process of a loopback-only head (see the module docstring for why each).
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# Unix socket paths under the temp dir must stay below 107 bytes: Ray adds ~60 characters of its own.
MAX_TEMP_DIR_LENGTH = 40


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_env(token_path: str | os.PathLike | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a loopback-only head and the ``ray`` CLI calls to it.

    ``base`` (default ``os.environ``) plus :data:`LOOPBACK_ENV`, free ports for the dashboard's and the
    autoscaler's metrics exporters, this interpreter's folder first on PATH (so the head, the job driver and
    the workers run this venv's Python), and token authentication with ``token_path`` when given. A
    ``RAY_ADDRESS`` or ``RAY_AUTH_TOKEN`` of the caller is dropped (they would point the CLI elsewhere).

    Token auth is explicit: a ``ray start`` head requires a token once one exists (any local ``ray.init()``
    writes ``~/.ray/auth_token``), but the ``ray job`` CLI only sends it with ``RAY_AUTH_MODE=token``.
    """
    env = dict(os.environ if base is None else base)
    env.update(LOOPBACK_ENV)
    env["DASHBOARD_METRIC_PORT"] = str(free_port())
    env["AUTOSCALER_METRIC_PORT"] = str(free_port())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    if token_path is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env


def head_command(temp_dir: str | os.PathLike, gcs_port: int, dashboard_port: int, num_cpus: int = 2,
                 object_store_memory: int = 1_000_000_000) -> list[str]:
    """``ray start --head --block`` with loopback addresses and free ports for every listener it names."""
    ray = str(Path(sys.executable).with_name("ray"))
    return [
        ray, "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={gcs_port}",
        f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
        f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_memory}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]


@dataclass
class RayHead:
    """A running private head: its process group, addresses and the environment for CLI calls to it."""

    pid: int
    """The ``ray start`` process, leader of the head's process group (and session)."""
    address: str
    """The dashboard / job API URL, ``http://127.0.0.1:PORT`` (``ray job submit --address``)."""
    gcs_address: str
    """``127.0.0.1:PORT`` (``ray.init(address=...)``)."""
    temp_dir: Path
    env: dict[str, str]
    log_path: Path

    def stop(self, grace_s: float = 5.0) -> None:
        """End the head and everything it started (:func:`stop_head`)."""
        stop_head(self.pid, grace_s)


def start_head(temp_dir: str | os.PathLike, num_cpus: int = 2, object_store_memory: int = 1_000_000_000,
               log_path: str | os.PathLike | None = None, timeout_s: float = 120.0) -> RayHead:
    """Start a loopback-only head in a new session and wait until its job API answers.

    Args:
        temp_dir: Ray's temp dir for this head (keep it short: :data:`MAX_TEMP_DIR_LENGTH`); its token file
            ``auth_token`` is written there.
        num_cpus, object_store_memory: the head's resources.
        log_path: where the head's output goes (default ``<temp_dir>/head.log``).
        timeout_s: how long to wait for the job API.

    Raises:
        RuntimeError: the head exited or did not answer in ``timeout_s`` (the log's tail is in the message).
    """
    temp_dir = Path(temp_dir)
    if len(str(temp_dir)) > MAX_TEMP_DIR_LENGTH:
        raise ValueError(f"Ray temp dir {temp_dir} is longer than {MAX_TEMP_DIR_LENGTH} characters: Ray's unix "
                         "socket paths under it would exceed 107 bytes (use a folder under /tmp)")
    temp_dir.mkdir(parents=True, exist_ok=True)
    token_path = temp_dir / "auth_token"
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    env = loopback_env(token_path)
    gcs_port, dashboard_port = free_port(), free_port()
    log_path = Path(log_path) if log_path is not None else temp_dir / "head.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(head_command(temp_dir, gcs_port, dashboard_port, num_cpus, object_store_memory),
                                   env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    head = RayHead(pid=process.pid, address=f"http://{LOOPBACK}:{dashboard_port}",
                   gcs_address=f"{LOOPBACK}:{gcs_port}", temp_dir=temp_dir, env=env, log_path=log_path)
    try:
        _wait_for_job_api(head, process, timeout_s)
    except BaseException:
        head.stop()
        raise
    return head


def _wait_for_job_api(head: RayHead, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    ray = str(Path(sys.executable).with_name("ray"))
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{_tail(head.log_path)}")
        probe = subprocess.run([ray, "job", "list", "--address", head.address], env=head.env, capture_output=True,
                               text=True, timeout=60)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray job API at {head.address} did not answer in {timeout_s:.0f} s:\n"
                               f"{probe.stderr[-2000:]}\n{_tail(head.log_path)}")
        time.sleep(1.0)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""


def stop_head(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the process group ``pgid`` (a head and everything it started), then SIGKILL after ``grace_s``.

    On SIGTERM the raylet drains for ~15 s and ``ray start --block`` does not exit at all; a private head is
    thrown away, so a short grace period, then SIGKILL. The leader is reaped when it is our child.
    """
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(pgid)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(40):
        _reap(pgid)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main(argv: list[str] | None = None) -> int:
    """``start``: start a head and print shell assignments for it; ``stop PGID``: stop one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a loopback-only head; prints `export ...` lines for eval")
    start.add_argument("--temp-dir", required=True, help=f"Ray's temp dir (at most {MAX_TEMP_DIR_LENGTH} characters)")
    start.add_argument("--num-cpus", type=int, default=2)
    start.add_argument("--object-store-memory", type=int, default=1_000_000_000)
    start.add_argument("--log", default=None, help="the head's log file (default TEMP_DIR/head.log)")
    stop = sub.add_parser("stop", help="stop the head whose process group is PGID")
    stop.add_argument("pgid", type=int)
    args = parser.parse_args(argv)
    if args.command == "stop":
        stop_head(args.pgid)
        return 0
    try:
        head = start_head(args.temp_dir, args.num_cpus, args.object_store_memory, args.log)
    except (RuntimeError, ValueError) as err:
        print(f"local_ray.py: error: {err}", file=sys.stderr)
        return 1
    exports = {key: head.env[key] for key in (*LOOPBACK_ENV, "DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT",
                                              "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    exports.update(RAY_HEAD_PGID=str(head.pid), RAY_HEAD_ADDRESS=head.address, RAY_HEAD_GCS=head.gcs_address)
    print("unset RAY_ADDRESS RAY_AUTH_TOKEN")
    print("export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in exports.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
