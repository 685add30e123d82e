"""
ckv local: a whole ckv cluster on this machine, one process per role.

ckv local starts a master, N nodes and a dispatcher as separate
twistd -n --pidfile= ckv-<role> ... processes, waits until the cluster
answers, prints where everything is, and supervises: Ctrl-C or SIGTERM stops
every process (dispatcher, then the nodes, then the master); a process that
dies on its own stops everything with a non-zero exit and its log tail.

By default it runs 2 chains of 3 nodes (n1..n6; the keys' 1024 slots are
shared between the chains).  --chains 1 --nodes 3 runs a single chain; with
only --nodes N it runs N/3 chains (at least one), with only --chains N it
runs 3 nodes per chain.  The shape is recorded in DATA/local.json: a later
ckv local on the same data directory keeps it.

Ports with the default --base-port 7000 (B below), all on 127.0.0.1:

    master      B        admin B+1
    node i      B+10+i   admin B+20+i     (i = 1..9)
    dispatcher  B+200    admin B+201

With --base-port 0 every listener takes a free port and the real ports are
read from each process's port file.  Data lives in DATA/master and DATA/n1...;
logs in DATA/logs.  Running ckv local again on the same data directory
restarts the same cluster: the nodes rejoin with their data.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckv.portfile import (
    PortFileError,
    log_tail,
    remove_port_file,
    wait_port_file,
)

DESCRIPTION = __doc__.strip().split("\n", 2)[2] if __doc__ else ""

HOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
MAX_FIXED_NODES = 9
DEFAULT_CHAINS = 2
DEFAULT_CHAIN_LENGTH = 3
#: The cluster's shape, kept in the data directory.
SHAPE_FILE = "local.json"


class LocalError(Exception):
    """Starting or running the local cluster failed; the message says why."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", "-d", default="./ckv-data", metavar="DIR",
                   help="where data and logs go (default: %(default)s)")
    p.add_argument("--nodes", "-n", type=int, default=None, metavar="N",
                   help=f"number of nodes (default: {DEFAULT_CHAIN_LENGTH} per chain, "
                   f"{DEFAULT_CHAINS * DEFAULT_CHAIN_LENGTH} for the default "
                   f"{DEFAULT_CHAINS} chains)")
    p.add_argument("--chains", type=int, default=None, metavar="N",
                   help=f"number of chains; each gets NODES/CHAINS members (default: "
                   f"{DEFAULT_CHAINS}, or NODES/{DEFAULT_CHAIN_LENGTH} when only --nodes is "
                   "given; a data directory keeps the shape it was created with)")
    p.add_argument("--base-port", "-p", type=int, default=7000, metavar="PORT",
                   help="first port of the layout above; 0 picks free ports (default: %(default)s)")
    p.add_argument("--sync", choices=["durable", "replicated"], default="durable",
                   help="node durability mode (default: %(default)s)")
    p.add_argument("--heartbeat-interval", type=float, default=None, metavar="S",
                   help="passed to the master (default: the master's)")
    p.add_argument("--failure-timeout", type=float, default=None, metavar="S",
                   help="passed to the master (default: the master's)")
    p.add_argument("--start-timeout", type=float, default=60.0, metavar="S",
                   help="give up if the cluster does not answer within S seconds "
                   "(default: %(default)s)")
    p.add_argument("--ready-file", metavar="PATH", default=None,
                   help="once the cluster answers, write its ports and pids here as JSON")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print only the summary and errors")


@dataclass
class Child:
    """One process of the cluster."""

    name: str  # "master", "dispatcher", "n1"...
    role: str  # "master", "dispatcher", "node"
    args: list[str]
    log: Path
    out: Path
    port_file: Path
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, Any] = field(default_factory=dict)

    @property
    def logs(self) -> list[str]:
        return [str(self.out), str(self.log)]


@dataclass
class Layout:
    data_dir: Path
    nodes: int
    chains: int
    base_port: int
    sync: str
    heartbeat_interval: float | None = None
    failure_timeout: float | None = None

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    def port(self, offset: int) -> int:
        return 0 if self.base_port == 0 else self.base_port + offset

    def server(self, offset: int) -> str:
        return f"tcp:{self.port(offset)}:interface={HOST}"

    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def chain_length(self) -> int:
        return self.nodes // self.chains

    def fixed_ports(self) -> list[int]:
        if self.base_port == 0:
            return []
        offsets = [0, 1, 200, 201]
        for i in range(1, self.nodes + 1):
            offsets += [10 + i, 20 + i]
        return [self.base_port + o for o in offsets]

    def child(self, name: str, role: str, role_args: list[str]) -> Child:
        log = self.logs_dir / f"{name}.log"
        port_file = self.run_dir / f"{name}.port"
        args = ["--logfile", str(log), role_command(role)] + role_args
        args += ["--port-file", str(port_file)]
        return Child(name, role, args, log, self.logs_dir / f"{name}.out", port_file)

    def master(self) -> Child:
        args = [
            "--listen", self.server(0),
            "--admin", self.server(1),
            "--data-dir", str(self.data_dir / "master"),
            "--chains", str(self.chains),
            "--chain-length", str(self.chain_length),
        ]
        if self.heartbeat_interval is not None:
            args += ["--heartbeat-interval", str(self.heartbeat_interval)]
        if self.failure_timeout is not None:
            args += ["--failure-timeout", str(self.failure_timeout)]
        return self.child("master", "master", args)

    def node(self, i: int, master: str) -> Child:
        name = f"n{i}"
        return self.child(name, "node", [
            "--name", name,
            "--listen", self.server(10 + i),
            "--admin", self.server(20 + i),
            "--master", master,
            "--data-dir", str(self.data_dir / name),
            "--sync", self.sync,
        ])

    def dispatcher(self, master: str) -> Child:
        return self.child("dispatcher", "dispatcher", [
            "--listen", self.server(200),
            "--admin", self.server(201),
            "--master", master,
        ])


def role_command(role: str) -> str:
    return f"ckv-{role}"


def twistd_command() -> list[str]:
    """How to run twistd with this interpreter."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def child_env() -> dict[str, str]:
    """
    The children's environment.  If ckv is being run from a source tree (or
    an editable install) whose twisted/plugins dropin twistd would not find
    on sys.path, put that tree first on PYTHONPATH.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = Path(__file__).resolve().parent.parent
    installed = root.name in ("site-packages", "dist-packages")
    if not installed and (root / "twisted" / "plugins" / "ckv_plugins.py").exists():
        paths = [str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _preexec() -> None:  # pragma: no cover - runs in the child
    # The parent blocks the stop signals while it forks (see Cluster.start);
    # the child must not inherit that mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    # Linux: have the kernel SIGTERM the child if ckv local itself dies
    # (kill -9), so no orphan keeps the ports.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


class Cluster:
    """Starts, watches and stops the processes of a local cluster."""

    def __init__(self, layout: Layout, quiet: bool = False) -> None:
        self.layout = layout
        self.quiet = quiet
        self.children: list[Child] = []
        self.env = child_env()
        self.twistd = twistd_command()

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def start(self, child: Child) -> None:
        remove_port_file(str(child.port_file))
        out = open(child.out, "ab")
        # Hold Ctrl-C / SIGTERM while forking, so that a stop request can never
        # fall between the fork and the bookkeeping and leave an orphan.
        linux = sys.platform.startswith("linux")
        if linux:
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            child.proc = subprocess.Popen(
                [*self.twistd, "-n", "--pidfile=", *child.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Own session: the terminal's Ctrl-C reaches only ckv local,
                # which stops the children in order.
                start_new_session=True,
                preexec_fn=_preexec if linux else None,
            )
            self.children.append(child)
        finally:
            out.close()
            if linux:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def wait_ports(self, child: Child, timeout: float) -> dict[str, Any]:
        assert child.proc is not None
        try:
            child.ports = wait_port_file(
                str(child.port_file), timeout, child.proc, log_paths=child.logs
            )
        except PortFileError as e:
            raise LocalError(f"{child.name} did not start: {e}") from None
        return child.ports

    def dead(self) -> Child | None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                return child
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the dispatcher, then the nodes, then the master; SIGKILL stragglers."""
        groups = [
            [c for c in self.children if c.role == "dispatcher"],
            [c for c in self.children if c.role == "node"],
            [c for c in self.children if c.role == "master"],
        ]
        for group in groups:
            running = [c for c in group if c.proc is not None and c.proc.poll() is None]
            for c in running:
                try:
                    c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            for c in running:
                assert c.proc is not None
                try:
                    c.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{c.name} (pid {c.proc.pid}) did not stop in "
                             f"{timeout:g}s; killing it")
                    c.proc.kill()
                    c.proc.wait()
        for c in self.children:
            remove_port_file(str(c.port_file))


def _endpoint(port: int) -> str:
    return f"tcp:{HOST}:{port}"


def wait_until_serving(cluster: Cluster, master: str, dispatcher: str, timeout: float) -> None:
    """
    Poll until the master's configuration has every chain filled and the
    dispatcher answers a read.  Raises L{LocalError} on timeout or if a
    process dies meanwhile.
    """
    from ckv.cli import ReactorThread, fetch_config_blocking

    layout = cluster.layout
    deadline = time.monotonic() + timeout
    last = "no answer from the master yet"
    while True:
        child = cluster.dead()
        if child is not None:
            raise LocalError(_died(child))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LocalError(
                f"the cluster did not become ready within {timeout:g}s ({last}); "
                f"see the logs in {layout.logs_dir}"
            )
        try:
            config = fetch_config_blocking(master, min(2.0, max(0.1, remaining)))
        except Exception as e:
            last = f"master: {e or type(e).__name__}"
            time.sleep(0.2)
            continue
        if config.chains and len(config.chains) != layout.chains:
            raise LocalError(
                f"the master's data in {layout.data_dir} is a cluster of "
                f"{len(config.chains)} chain(s), not {layout.chains}; use "
                f"--chains {len(config.chains)} or another --data-dir"
            )
        full = [c for c in config.chains if len(c.members) >= layout.chain_length]
        if len(full) < layout.chains:
            sizes = ", ".join(f"chain {c.chain_id}: {len(c.members)}" for c in config.chains)
            last = f"chains not yet formed ({sizes or 'none'})"
            time.sleep(0.2)
            continue
        try:
            wait = min(2.0, max(0.1, remaining))
            ReactorThread.call(_probe, dispatcher, wait, wait=wait + 5.0)
        except Exception as e:
            last = f"dispatcher: {e or type(e).__name__}"
            time.sleep(0.2)
            continue
        return


async def _probe(endpoint: str, timeout: float) -> None:
    """One read through the dispatcher."""
    from twisted.internet import reactor

    from ckv.client import connect

    client = await connect(reactor, endpoint, timeout)
    try:
        await client.get(b"ckv-local-ready-probe", timeout=timeout)
    finally:
        await client.close()


def _died(child: Child) -> str:
    assert child.proc is not None
    tail = log_tail(child.logs)
    code = child.proc.returncode
    if code is not None and code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with status {code}"
    message = f"{child.name} (pid {child.proc.pid}) {how}"
    return f"{message}\n{tail}" if tail else message


def summary(cluster: Cluster, master_ep: str, dispatcher_ep: str) -> str:
    layout = cluster.layout
    lines = ["", "ckv local cluster is up:", ""]
    lines.append(f"  {'process':<11} {'pid':>7}  {'port':>5}  {'admin':>5}  log")
    for c in cluster.children:
        pid = c.proc.pid if c.proc else "-"
        admin = c.ports.get("admin") or "-"
        lines.append(f"  {c.name:<11} {pid:>7}  {c.ports.get('listen', '-'):>5}  "
                     f"{admin:>5}  {c.log}")
    admin_port = next((c.ports.get("admin") for c in cluster.children if c.role == "master"), None)
    env_needed = dispatcher_ep != _endpoint(7200) or master_ep != _endpoint(7000)
    shape = (f"{layout.chains} chains of {layout.chain_length} nodes"
             if layout.chains > 1 else f"1 chain of {layout.chain_length} node(s)")
    spare = layout.nodes - layout.chains * layout.chain_length
    if spare:
        shape += f", {spare} spare node(s)"
    lines += [
        "",
        f"  {shape}",
        f"  data: {layout.data_dir}   logs: {layout.logs_dir}",
        "",
        "Try:",
    ]
    if env_needed:
        lines.append(f"  export CKV_CONNECT={dispatcher_ep} CKV_MASTER={master_ep}")
    lines += [
        "  ckv put greeting hello",
        "  ckv get greeting",
        "  ckv status",
    ]
    if admin_port:
        lines.append(f"  telnet {HOST} {admin_port}        # the master's admin console")
    lines += ["", "Press Ctrl-C to stop the cluster.", ""]
    return "\n".join(lines)


def ready_info(cluster: Cluster, master_ep: str, dispatcher_ep: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "connect": dispatcher_ep,
        "master_endpoint": master_ep,
        "data_dir": str(cluster.layout.data_dir),
        "logs_dir": str(cluster.layout.logs_dir),
        "pid": os.getpid(),
        "nodes": {},
    }
    for c in cluster.children:
        entry = {"listen": c.ports.get("listen"), "admin": c.ports.get("admin"),
                 "pid": c.proc.pid if c.proc else None, "log": str(c.log)}
        if c.role == "node":
            info["nodes"][c.name] = entry
        else:
            info[c.name] = entry
    return info


def write_json_atomically(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def recorded_shape(data_dir: Path) -> tuple[int, int] | None:
    """
    (chains, nodes) of the cluster already in C{data_dir}: from its
    L{SHAPE_FILE}, else (a data directory from before that file) one chain of
    its n1, n2... directories; None for a new data directory.
    """
    try:
        with open(data_dir / SHAPE_FILE, encoding="utf-8") as f:
            shape = json.load(f)
        return int(shape["chains"]), int(shape["nodes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not (data_dir / "master").is_dir():
        return None
    nodes = 0
    while (data_dir / f"n{nodes + 1}").is_dir():
        nodes += 1
    return 1, nodes or DEFAULT_CHAIN_LENGTH


def choose_shape(
    chains: int | None, nodes: int | None, recorded: tuple[int, int] | None
) -> tuple[int, int]:
    """(chains, nodes) from the flags given, the recorded shape and the defaults."""
    if chains is None and nodes is None:
        return recorded or (DEFAULT_CHAINS, DEFAULT_CHAINS * DEFAULT_CHAIN_LENGTH)
    if chains is None:
        assert nodes is not None
        if recorded is not None and recorded[1] == nodes:
            return recorded
        return max(1, nodes // DEFAULT_CHAIN_LENGTH), nodes
    if nodes is None:
        if recorded is not None and recorded[0] == chains:
            return recorded
        return chains, chains * DEFAULT_CHAIN_LENGTH
    return chains, nodes


def validate(args: argparse.Namespace) -> Layout:
    from ckv.cli import UsageError

    data_dir = Path(args.data_dir).resolve()
    recorded = recorded_shape(data_dir)
    args.chains, args.nodes = choose_shape(args.chains, args.nodes, recorded)
    if recorded is not None and recorded[0] != args.chains:
        raise UsageError(
            f"local: {data_dir} holds a cluster of {recorded[0]} chain(s) and "
            f"{recorded[1]} node(s); the number of chains is fixed when a cluster is "
            f"created (run ckv local --chains {recorded[0]} --nodes {recorded[1]}, or "
            "use another --data-dir)"
        )
    if args.nodes < 1:
        raise UsageError("local: --nodes must be at least 1")
    if args.chains < 1 or args.chains > args.nodes:
        raise UsageError("local: --chains must be between 1 and --nodes")
    if args.base_port != 0:
        if args.nodes > MAX_FIXED_NODES:
            raise UsageError(
                f"local: at most {MAX_FIXED_NODES} nodes with fixed ports; "
                "use --base-port 0 for more"
            )
        if not 1 <= args.base_port <= 65535 - 201:
            raise UsageError("local: --base-port must be 0 or between 1 and 65334")
    for option in ("heartbeat_interval", "failure_timeout"):
        value = getattr(args, option)
        if value is not None and not value > 0:
            raise UsageError(f"local: --{option.replace('_', '-')} must be positive")
    if args.start_timeout <= 0:
        raise UsageError("local: --start-timeout must be positive")
    return Layout(
        data_dir=data_dir,
        nodes=args.nodes,
        chains=args.chains,
        base_port=args.base_port,
        sync=args.sync,
        heartbeat_interval=args.heartbeat_interval,
        failure_timeout=args.failure_timeout,
    )


def run(args: argparse.Namespace) -> int:
    layout = validate(args)
    busy = sorted(p for p in layout.fixed_ports() if port_in_use(p))
    if busy:
        print(
            f"ckv local: port(s) {', '.join(map(str, busy))} on {HOST} are already in use "
            "(is another ckv local running?). Stop it, or choose --base-port "
            "(0 picks free ports).",
            file=sys.stderr,
        )
        return 2
    for d in (layout.data_dir, layout.logs_dir, layout.run_dir):
        d.mkdir(parents=True, exist_ok=True)
    write_json_atomically(
        str(layout.data_dir / SHAPE_FILE), {"chains": layout.chains, "nodes": layout.nodes}
    )

    cluster = Cluster(layout, quiet=args.quiet)
    previous = {
        s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)
    }
    status = 0
    try:
        try:
            deadline = time.monotonic() + args.start_timeout

            def left() -> float:
                return max(0.1, deadline - time.monotonic())

            cluster.say(f"starting the master (logs in {layout.logs_dir})")
            master = layout.master()
            cluster.start(master)
            master_ep = _endpoint(cluster.wait_ports(master, left())["listen"])

            cluster.say(f"starting {layout.nodes} node(s)")
            nodes = [layout.node(i, master_ep) for i in range(1, layout.nodes + 1)]
            for n in nodes:
                cluster.start(n)
            for n in nodes:
                cluster.wait_ports(n, left())

            cluster.say("starting the dispatcher")
            dispatcher = layout.dispatcher(master_ep)
            cluster.start(dispatcher)
            dispatcher_ep = _endpoint(cluster.wait_ports(dispatcher, left())["listen"])

            cluster.say("waiting for the chains to form")
            wait_until_serving(cluster, master_ep, dispatcher_ep, left())
        except LocalError as e:
            print(f"ckv local: {e}", file=sys.stderr)
            status = 1
            return status

        print(summary(cluster, master_ep, dispatcher_ep), flush=True)
        if args.ready_file:
            write_json_atomically(args.ready_file,
                                  ready_info(cluster, master_ep, dispatcher_ep))

        while True:
            child = cluster.dead()
            if child is not None:
                print(f"ckv local: {_died(child)}", file=sys.stderr)
                print("ckv local: stopping the cluster", file=sys.stderr)
                status = 1
                return status
            time.sleep(0.2)
    except _Stop as stop:
        cluster.say(f"\nckv local: {signal.Signals(stop.signum).name}: stopping the cluster")
        status = 0
        return status
    finally:
        # A second Ctrl-C must not interrupt the orderly stop.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        try:
            cluster.stop()
            from ckv.cli import ReactorThread

            ReactorThread.stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if args.ready_file:
            try:
                os.unlink(args.ready_file)
            except OSError:
                pass
        if cluster.children:
            cluster.say("ckv local: stopped" + ("" if status == 0 else " (after an error)"))
