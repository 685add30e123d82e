"""
Real-process test harness: a master, a dispatcher and nodes started as
C{twistd -n} processes on ephemeral loopback ports (port files tell which),
plus blocking helpers that speak the wire protocol over plain sockets, so
tests can poke every process without a reactor.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ckv import wire
from ckv.config import ClusterConfig
from ckv.portfile import log_tail, remove_port_file, wait_port_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "tcp:0:interface=127.0.0.1"

#: How long a test waits for a cluster to settle before failing.
SETTLE = 30.0


def twistd_command() -> list[str]:
    """Run twistd with the interpreter running the tests."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    # The source tree first, so a developer's edits are what runs; CI also
    # checks the installed package separately (test_packaging).
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def wait_for(predicate: Callable[[], Any], timeout: float = SETTLE, what: str = "condition") -> Any:
    """Poll C{predicate} until it returns something true, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # a process may be between states
            last_error = e
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


class Process:
    """One twistd process of the cluster."""

    def __init__(self, name: str, role: str, args: list[str], workdir: str) -> None:
        self.name = name
        self.role = role
        self.args = args
        self.workdir = workdir
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.port_file = os.path.join(workdir, f"{name}.ports")
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port: int | None = None

    def start(self, timeout: float = SETTLE) -> None:
        remove_port_file(self.port_file)
        cmd = twistd_command() + [
            "-n",
            "--pidfile=",
            f"--logfile={self.log_path}",
            f"ckv-{self.role}",
            *self.args,
            "--port-file",
            self.port_file,
        ]
        self.popen = subprocess.Popen(
            cmd, cwd=self.workdir, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        ports = wait_port_file(self.port_file, timeout, self.popen, log_paths=[self.log_path])
        self.port = ports["listen"]
        self.admin_port = ports["admin"]

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.alive:
            self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed.  Returns the exit status."""
        if self.popen is None:
            return None
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def admin(self, command: str, timeout: float = 5.0) -> str:
        """Run one admin console command and return its output."""
        assert self.admin_port is not None, f"{self.name} has no admin console"
        return admin_command(self.admin_port, command, timeout)

    def log(self, lines: int = 40) -> str:
        return log_tail([self.log_path], lines)


class Cluster:
    """A master, N nodes and a dispatcher as real processes."""

    def __init__(
        self,
        workdir: str,
        nodes: int = 3,
        sync: str = "durable",
        chain_length: int | None = None,
        chains: int = 1,
        master_args: list[str] | None = None,
        node_args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.node_args = list(node_args or [])
        os.makedirs(workdir, exist_ok=True)
        self.sync = sync
        self.chains = chains
        self.chain_length = chain_length or nodes // chains
        self.master = Process(
            "master",
            "master",
            [
                "--listen",
                LOOPBACK,
                "--admin",
                LOOPBACK,
                "--data-dir",
                os.path.join(workdir, "master"),
                "--chains",
                str(chains),
                "--chain-length",
                str(self.chain_length),
                *(master_args or []),
            ],
            workdir,
        )
        self.nodes = [self._node(f"n{i + 1}") for i in range(nodes)]
        self.dispatcher: Process | None = None

    def _node(self, name: str) -> Process:
        return Process(name, "node", [], self.workdir)

    def _node_args(self, name: str) -> list[str]:
        return [
            "--name",
            name,
            "--listen",
            LOOPBACK,
            "--admin",
            LOOPBACK,
            "--master",
            self.master.endpoint,
            "--data-dir",
            os.path.join(self.workdir, name),
            "--sync",
            self.sync,
            *self.node_args,
        ]

    def start_node(self, node: Process) -> None:
        node.args = self._node_args(node.name)
        node.start()

    def restart_master(self) -> None:
        """Start the master again on the same ports (the others know its address)."""
        args = self.master.args
        args[args.index("--listen") + 1] = f"tcp:{self.master.port}:interface=127.0.0.1"
        args[args.index("--admin") + 1] = f"tcp:{self.master.admin_port}:interface=127.0.0.1"
        self.master.start()

    def start_dispatcher(self) -> None:
        if self.dispatcher is None:
            self.dispatcher = Process("dispatcher", "dispatcher", [], self.workdir)
        # The master may have come back on another port: build the args anew.
        self.dispatcher.args = [
            "--listen", LOOPBACK, "--admin", LOOPBACK, "--master", self.master.endpoint,
        ]  # fmt: skip
        self.dispatcher.start()

    def start(self) -> None:
        self.master.start()
        for n in self.nodes:
            self.start_node(n)
        self.start_dispatcher()
        self.wait_serving()

    @property
    def processes(self) -> list[Process]:
        return [p for p in [self.dispatcher, *self.nodes, self.master] if p is not None]

    def stop(self) -> None:
        for p in self.processes:
            p.stop()

    def kill_all(self) -> None:
        for p in self.processes:
            p.kill()

    def config(self) -> ClusterConfig:
        return fetch_config(self.master.port)

    def wait_serving(self, timeout: float = SETTLE) -> ClusterConfig:
        """Until every chain has its members and every node knows its role."""

        def ready() -> ClusterConfig | None:
            cfg = self.config()
            if len(cfg.chains) != self.chains:
                return None
            if any(len(c.members) != self.chain_length for c in cfg.chains):
                return None
            for c in cfg.chains:
                for m in c.members:
                    node = self.node(m.name)
                    st = node_status(node)
                    if st.get("epoch") != str(c.epoch) or st.get("master") != "connected":
                        return None
                    if m is not c.tail and st.get("successor_link") != "up":
                        return None
            if self.dispatcher is not None:
                d = parse_kv(self.dispatcher.admin("status"))
                if d.get("config_version") != str(cfg.version) or "down" in d.get("links", ""):
                    return None
            return cfg

        return wait_for(ready, timeout, "the cluster to serve")

    def node(self, name: str) -> Process:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.processes)


@contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """Start C{cluster}; on any failure print every process's log; always stop it."""
    try:
        cluster.start()
        yield cluster
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop()


# -- blocking wire helpers -------------------------------------------------------


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_frame(s: socket.socket, body: bytes) -> None:
    s.sendall(struct.pack(">I", len(body)) + body)


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_frame(s: socket.socket) -> tuple[int, Any]:
    (length,) = struct.unpack(">I", recv_exact(s, 4))
    return wire.decode(recv_exact(s, length))


def fetch_config(port: int, timeout: float = 5.0) -> ClusterConfig:
    """WATCH on a master or dispatcher, return the first CONFIG."""
    with connect(port, timeout) as s:
        send_frame(s, wire.encode(wire.MessageType.WATCH, name=b"test"))
        mtype, body = recv_frame(s)
        assert mtype == wire.MessageType.CONFIG, mtype
        return ClusterConfig.from_wire(body)


def admin_command(port: int, command: str, timeout: float = 5.0) -> str:
    """Send one command then quit; return everything but the banner and 'bye'."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command.encode() + b"\nquit\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
    # First line: banner; last line: bye.
    return "\n".join(lines[1:-1])


def parse_kv(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def node_status(node: Process) -> dict[str, str]:
    return parse_kv(node.admin("status"))


def replica_get(node: Process, key: bytes) -> str:
    """A node's own copy of C{key}, as its admin console prints it."""
    return node.admin(f"get 0x{key.hex()}")


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
