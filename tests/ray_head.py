"""The one way tests start Ray: loopback-only heads and clusters of their own, and the socket check.

- :func:`ray_head`: ``ray start --head`` exactly as launch/demo.sh starts it (``launch/local_ray.py``: its own
  temp dir, token file, free ports, loopback addresses, its own process group, stopped at the end).
- :func:`local_cluster`: a ``ray.cluster_utils.Cluster`` of several nodes in this process with the same
  loopback settings, Ray's address file inside the cluster's own temp dir (``RAY_TMPDIR``: the
  ``Cluster`` writes ``$RAY_TMPDIR/ray/ray_current_cluster``, else under /tmp/ray, which a fresh machine
  does not have), and this process connected as the driver.
- :class:`SocketWatch`: every listening socket (TCP, and unconnected UDP) owned by a process tree, sampled
  with ``ss`` while a job runs.

Nothing here uses Ray's default temp folder, a fixed port or ``ray stop``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]


def _load_local_ray():
    spec = importlib.util.spec_from_file_location("distrib_face_launch_local_ray", ROOT / "launch" / "local_ray.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


local_ray = _load_local_ray()
LOOPBACK = local_ray.LOOPBACK
free_port = local_ray.free_port
loopback_env = local_ray.loopback_env
RayHead = local_ray.RayHead


@contextlib.contextmanager
def short_temp_dir() -> Iterator[Path]:
    """A fresh folder under /tmp with a short name: Ray's unix socket paths must stay under 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dfray_", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def ray_head(temp_dir: Path, num_cpus: int = 2) -> Iterator["RayHead"]:
    """A loopback-only ``ray start --head`` (launch/local_ray.py), stopped with its process group at the end."""
    head = local_ray.start_head(temp_dir, num_cpus=num_cpus)
    try:
        yield head
    finally:
        head.stop()


def ray_cli(*args: str, env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the ``ray`` CLI of this venv in the repository root."""
    return subprocess.run([str(Path(sys.executable).with_name("ray")), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _restore(undo) -> Iterator[None]:
    try:
        yield
    finally:
        undo()


@contextlib.contextmanager
def local_cluster(num_nodes: int = 2, cpus_per_node: int = 1, object_store_memory: int = 200 * 1024**2):
    """A ``ray.cluster_utils.Cluster`` of ``num_nodes`` loopback-only nodes, this process its driver.

    The Ray processes inherit the environment of :func:`launch.local_ray.loopback_env` (free metrics
    ports, gloo on ``lo``) while the cluster starts; every node gets ``node_ip_address=127.0.0.1``
    explicitly, and the flag Ray derived from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it was imported into
    this process is switched off for the cluster's lifetime;
    ``RAY_TMPDIR`` points Ray's address file into the cluster's own temp dir. Yields the cluster.
    """
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    with short_temp_dir() as temp_dir:
        (temp_dir / "ray").mkdir()  # the Cluster writes $RAY_TMPDIR/ray/ray_current_cluster
        env = {key: value for key, value in loopback_env(base={}).items() if key != "PATH"}
        env["RAY_TMPDIR"] = str(temp_dir)
        # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported into this process: set what it made
        # of it, or ray.init() turns the address 127.0.0.1 into the routable IP, where the GCS does not listen.
        enable_cluster = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        with _environ(env), _restore(lambda: setattr(ray_constants, "ENABLE_RAY_CLUSTER", enable_cluster)):
            node_args = {"num_cpus": cpus_per_node, "node_ip_address": LOOPBACK,
                         "object_store_memory": object_store_memory}
            cluster = Cluster(initialize_head=True, head_node_args={
                **node_args, "temp_dir": str(temp_dir), "include_dashboard": False,
                "dashboard_agent_listen_port": free_port()})
            try:
                for _ in range(num_nodes - 1):
                    cluster.add_node(**node_args, dashboard_agent_listen_port=free_port())
                ray.init(address=cluster.address, _node_ip_address=LOOPBACK)
                yield cluster
            finally:
                ray.shutdown()
                cluster.shutdown()


@dataclass(frozen=True)
class Listener:
    """One listening socket and the process that owns it."""

    protocol: str  # "tcp" / "udp"
    host: str
    port: int
    pid: int
    # Not part of the identity: a Ray worker renames its process while it runs ("ray::IDLE", then the task),
    # and one socket seen under two names is still one socket.
    process: str = field(compare=False)

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach it (127.0.0.0/8, ::1, or an IPv4-mapped loopback)."""
        host = self.host.strip("[]").split("%")[0]
        if host in ("*", ""):
            return False
        address = ipaddress.ip_address(host)
        mapped = getattr(address, "ipv4_mapped", None)
        return address.is_loopback or bool(mapped and mapped.is_loopback)


def process_tree(roots: Iterable[int]) -> set[int]:
    """``roots`` and every process descended from them (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry))
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


_SS_PROCESS = re.compile(r'\("(?P<name>[^"]*)",pid=(?P<pid>\d+),')


def listening_sockets(pids: set[int]) -> set[Listener]:
    """Every listening TCP socket and unconnected UDP socket owned by one of ``pids`` (``ss -Hltunp``)."""
    out = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True, check=True, timeout=30).stdout
    found: set[Listener] = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        host, _, port = fields[4].rpartition(":")
        for match in _SS_PROCESS.finditer(line):
            pid = int(match.group("pid"))
            if pid in pids:
                found.add(Listener(fields[0], host, int(port), pid, match.group("name")))
    return found


class SocketWatch:
    """Samples the listening sockets of a process tree every ``interval_s`` in a thread, until stopped.

    Use as a context manager around what starts and runs the Ray processes; ``seen`` then holds the union
    of all samples (a socket that lives for less than ``interval_s`` may be missed).
    """

    def __init__(self, roots: Iterable[int], interval_s: float = 0.5) -> None:
        if shutil.which("ss") is None:
            raise RuntimeError("the socket check needs `ss` (iproute2)")
        self.roots = set(roots)
        self.interval_s = interval_s
        self.seen: set[Listener] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="socket-watch", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        self.seen |= listening_sockets(process_tree(self.roots))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "SocketWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def exposed(self) -> set[Listener]:
        """The sockets seen on something else than loopback."""
        return {listener for listener in self.seen if not listener.loopback}


def tcpstore_listeners(watch: SocketWatch, workers: list[dict]) -> set[Listener]:
    """The sockets of ``watch`` that are a Ray Train job's TCPStore: rank 0's process, on its ``master_port``.

    ``workers`` is ``summary["workers"]`` (rank, pid, master_port of each worker of the last attempt).
    """
    rank0 = [w for w in workers if w["rank"] == 0]
    return {listener for listener in watch.seen
            if any(listener.pid == w["pid"] and listener.port == w["master_port"] for w in rank0)}


def describe(listeners: Iterable[Listener]) -> str:
    """Listeners as lines for an assertion message."""
    return "\n".join(f"  {l.protocol} {l.host}:{l.port} pid {l.pid} {l.process}" for l in sorted(
        listeners, key=lambda l: (l.process, l.port)))
