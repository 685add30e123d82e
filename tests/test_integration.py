"""
Integration tests with real processes: a master, a dispatcher and a chain of
three nodes, each a `twistd -n ckv-...` process on ephemeral loopback ports.
Clients run in their own processes too (tests.clientcheck, tests.workload).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys

import pytest

from ckv import wire
from ckv.portfile import wait_port_file
from tests.harness import (
    REPO,
    Cluster,
    Process,
    connect,
    env,
    parse_kv,
    recv_frame,
    replica_get,
    running,
    send_frame,
    wait_for,
)
from tests.harness import (
    twistd_command as harness_twistd,
)

pytestmark = pytest.mark.integration


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_workload(
    cluster: Cluster, out: str, count: int, concurrency: int = 16, prefix: str = "k"
):
    assert cluster.dispatcher is not None
    return subprocess.Popen(
        [
            sys.executable, "-m", "tests.workload",
            "--connect", cluster.dispatcher.endpoint,
            "--count", str(count),
            "--concurrency", str(concurrency),
            "--prefix", prefix,
            "--out", out,
        ],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def acked(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line) for line in f if line.strip() and not line.startswith("?")]
    except FileNotFoundError:
        return []


def verify(cluster: Cluster, acked_file: str, prefix: str = "k") -> dict:
    assert cluster.dispatcher is not None
    r = run_module(
        "tests.clientcheck", "verify",
        "--connect", cluster.dispatcher.endpoint,
        "--acked", acked_file,
        "--prefix", prefix,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def digests(cluster: Cluster) -> dict[str, dict[str, str]]:
    return {n.name: parse_kv(n.admin("digest")) for n in cluster.nodes}


def replicas_identical(cluster: Cluster) -> dict[str, dict[str, str]]:
    """Every replica holds the same data and has committed the same history."""

    def same():
        d = digests(cluster)
        return d if len({(v["sha256"], v["committed_seq"]) for v in d.values()}) == 1 else None

    return wait_for(same, what="identical replicas")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(Cluster(str(tmp_path_factory.mktemp("cluster")))) as c:
        yield c


def test_both_clients_roundtrip(cluster):
    r = run_module("tests.clientcheck", "roundtrip", "--connect", cluster.dispatcher.endpoint)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["blocking"] == {
        "put": None,
        "get": "hello",
        "cas_wrong": False,
        "cas_right": True,
        "get_after_cas": "hi",
        "cas_absent_on_present": False,
        "delete": True,
        "delete_again": False,
        "get_deleted": None,
        "cas_absent": True,
        "cas_delete": True,
        "get_final": None,
    }
    assert result["twisted"] == {
        "put": None,
        "get": "hello",
        "cas_wrong": False,
        "cas_right": True,
        "get_after_cas": "hi",
        "delete": True,
        "delete_again": False,
        "get_deleted": None,
        "pipelined_ok": True,
    }


def test_write_is_on_every_replica(cluster, tmp_path):
    out = str(tmp_path / "acked")
    w = start_workload(cluster, out, count=50, prefix="every:")
    assert w.wait(60) == 0, w.stdout.read()
    assert sorted(acked(out)) == list(range(50))
    for node in cluster.nodes:
        # The tail acknowledged, so every replica has committed it.
        assert replica_get(node, b"every:7") == "v7", node.name
        assert replica_get(node, b"every:49") == "v49", node.name
    replicas_identical(cluster)


def test_admin_consoles(cluster):
    for p in cluster.processes:
        help_text = p.admin("help")
        for command in ("help", "status", "stats", "quit"):
            assert command in help_text, (p.name, help_text)
        assert "error" not in p.admin("status")
        assert "error" not in p.admin("stats")
    st = parse_kv(cluster.nodes[0].admin("status"))
    assert st["role"] == "head" and st["successor"] == "n2"
    assert parse_kv(cluster.nodes[2].admin("status"))["role"] == "tail"
    chains = cluster.master.admin("chains")
    assert "n1 -> n2 -> n3" in chains and "serving" in chains and "0-1023" in chains
    nodes = cluster.master.admin("nodes")
    for n in ("n1", "n2", "n3"):
        assert n in nodes
    assert cluster.nodes[1].admin("get no-such-key").startswith("(not found)")


def _garbage_payloads() -> list[bytes]:
    rng = random.Random(7)
    return [
        bytes(rng.randrange(256) for _ in range(4096)),  # random bytes
        struct.pack(">I", 0xFFFFFFF0) + b"x" * 100,  # absurd length prefix
        struct.pack(">I", 10) + b"\x01\x01abc",  # truncated frame, then close
        struct.pack(">I", 2) + b"\x01\xee",  # unknown message type
        struct.pack(">I", 2) + b"\x09\x01",  # wrong protocol version
        struct.pack(">I", 5) + b"\x01\x01\x00\x00\x00",  # malformed REQUEST
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\xff\xfb\x01\xff\xfd\x03" + b"A" * 70000 + b"\n",  # telnet + huge line
        b"\x00" * 100 + b"\n" + b"help\n",
    ]


def _send_garbage(port: int, payload: bytes) -> bytes:
    """Send, then read what comes back until the server closes (it may close first)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, BrokenPipeError, OSError) as e:
            # The server may close while we still send (ENOTCONN, EPIPE):
            # that is a refusal, not a failure; timeouts are failures.
            if isinstance(e, TimeoutError):
                raise
    return data


def test_bad_bytes_on_every_port_leave_every_process_serving(cluster):
    ports = []
    for p in cluster.processes:
        ports.append(("listen", p, p.port))
        ports.append(("admin", p, p.admin_port))
    for kind, p, port in ports:
        for payload in _garbage_payloads():
            answer = _send_garbage(port, payload)
            if kind == "admin" and payload.startswith(b"\x00"):
                assert b"error" in answer or b"help" in answer
        assert p.alive, f"{p.name} died on garbage on its {kind} port:\n{p.log()}"
    # A frame port answers a malformed frame with an ERROR frame.
    with connect(cluster.master.port) as s:
        send_frame(s, b"\x01\xee")
        mtype, body = recv_frame(s)
        assert mtype == wire.MessageType.ERROR
        assert body.code == wire.ErrorCode.UNKNOWN_TYPE
        assert b"unknown message type 238" in body.message
    # A huge key gets a clear error reply, not a dropped connection.
    tail = cluster.node(cluster.config().chains[0].tail.name)
    cid = os.urandom(16)
    with connect(tail.port) as t, connect(cluster.dispatcher.port) as d:
        send_frame(t, wire.encode(wire.MessageType.CLIENT_HELLO, client_id=cid))
        assert recv_frame(t)[0] == wire.MessageType.WELCOME
        send_frame(d, wire.request(cid, 1, 1, wire.Op.PUT, b"k" * (wire.MAX_KEY + 1), b"v"))
        mtype, body = recv_frame(d)
        assert mtype == wire.MessageType.REPLY and body.status == wire.Status.TOO_LARGE
        assert b"exceeds the limit" in body.value
    # And everyone still serves.
    r = run_module("tests.clientcheck", "roundtrip", "--connect", cluster.dispatcher.endpoint)
    assert r.returncode == 0, r.stdout + r.stderr
    for p in cluster.processes:
        assert p.alive, p.name


def test_successor_link_cut_and_restored_loses_and_duplicates_nothing(tmp_path):
    """n1 reaches n2 through a proxy that cuts every connection, repeatedly."""
    work = str(tmp_path)
    c = Cluster(work)
    proxy_ports = os.path.join(work, "proxy.ports")
    target = os.path.join(work, "proxy.target")
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tests.proxy", "--port-file", proxy_ports, "--target-file", target],
        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        proxy_port = wait_port_file(proxy_ports, 30, proxy)["listen"]
        c.master.start()
        n1, n2, n3 = c.nodes
        c.start_node(n1)
        n2.args = c._node_args("n2") + ["--advertise", f"127.0.0.1:{proxy_port}"]
        n2.start()
        with open(target, "w") as f:
            f.write(str(n2.port))
        c.start_node(n3)
        c.start_dispatcher()
        c.wait_serving()

        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=4000, concurrency=16)
        cuts = 0
        for threshold in (300, 1200, 2400):
            wait_for(lambda t=threshold: len(acked(out)) >= t or w.poll() is not None)
            proxy.send_signal(signal.SIGUSR1)
            cuts += 1
        assert w.wait(120) == 0, w.stdout.read()
        assert cuts == 3
        assert sorted(acked(out)) == list(range(4000))
        result = verify(c, out)
        assert result == {"checked": 4000, "missing": [], "wrong": []}
        d = replicas_identical(c)
        assert d["n1"]["keys"] == "4000"
        # The link really was cut: n2 saw its predecessor link again and again.
        with open(n2.log_path) as f:
            assert f.read().count("predecessor n1 linked") >= 2
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()
        proxy.kill()
        proxy.wait()


def test_sigkill_of_every_process_then_restart_keeps_every_acknowledged_write(tmp_path):
    """DESIGN.md "Whole-chain restart": kill -9 everything mid-stream, restart, check."""
    c = Cluster(str(tmp_path))
    try:
        c.start()
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=100000, concurrency=32)
        wait_for(lambda: len(acked(out)) >= 1500, what="writes to flow")
        for p in [*c.nodes, c.master, c.dispatcher]:
            p.signal(signal.SIGKILL)
        for p in c.processes:
            p.popen.wait(10)
        w.kill()
        w.wait(10)
        before = acked(out)
        assert len(before) >= 1500

        # Restart in another order than the chain's: the master reforms it
        # as it was (head n1 -> n2 -> tail n3) -- except that a member whose
        # successor committed updates it had forwarded but not committed
        # itself (pipelined durability) leaves and rejoins after the tail.
        c.master.start()
        for name in ("n3", "n1", "n2"):
            c.start_node(c.node(name))
        c.start_dispatcher()
        cfg = c.wait_serving()
        left = []
        for name in ("n1", "n2", "n3"):
            with open(c.node(name).log_path) as f:
                if "leaves chain" in f.read():
                    left.append(name)
        stayed = [n for n in ("n1", "n2", "n3") if n not in left]
        members = [m.name for m in cfg.chains[0].members]
        assert members[: len(stayed)] == stayed and sorted(members[len(stayed) :]) == left

        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        assert result["checked"] == len(before)
        replicas_identical(c)
        # And it takes new writes.
        out2 = str(tmp_path / "acked2")
        w2 = start_workload(c, out2, count=200, prefix="after:")
        assert w2.wait(60) == 0, w2.stdout.read()
        assert len(acked(out2)) == 200
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def test_nodes_reach_the_master_late(tmp_path):
    """Nodes started before their master keep retrying and form the chain once it is up."""
    c = Cluster(str(tmp_path), nodes=1)
    # Reserve a port for the master, start the node against it first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c.master.args[c.master.args.index("--listen") + 1] = f"tcp:{port}:interface=127.0.0.1"
    node: Process = c.nodes[0]
    node.args = c._node_args("n1")
    node.args[node.args.index("--master") + 1] = f"tcp:127.0.0.1:{port}"
    try:
        node.start()
        c.master.start()
        c.start_dispatcher()
        c.wait_serving()
        r = run_module("tests.clientcheck", "roundtrip", "--connect", c.dispatcher.endpoint)
        assert r.returncode == 0, r.stdout + r.stderr
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def test_idle_sessions_expire_on_every_replica(tmp_path):
    """twistd ckv-node --session-ttl: each replica deletes sessions idle for longer."""
    c = Cluster(str(tmp_path), nodes=3, sync="replicated", node_args=["--session-ttl", "2"])
    with running(c):
        r = run_module("tests.clientcheck", "roundtrip", "--connect", c.dispatcher.endpoint)
        assert r.returncode == 0, r.stdout + r.stderr
        # The roundtrip's client recorded sessions on every replica...
        assert all(int(parse_kv(n.admin("stats"))["sessions"]) > 0 for n in c.nodes)

        def all_expired() -> bool:
            stats = [parse_kv(n.admin("stats")) for n in c.nodes]
            return all(s["sessions"] == "0" and int(s["sessions_expired"]) > 0 for s in stats)

        # ...and nobody uses them again: gone within the TTL plus a sweep (1 s).
        wait_for(all_expired, timeout=20, what="sessions expired on every replica")
        # The store keeps serving new clients.
        r = run_module("tests.clientcheck", "roundtrip", "--connect", c.dispatcher.endpoint)
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_node_refuses_a_data_directory_another_process_holds(tmp_path):
    """Two nodes given one --data-dir: the second exits at once and says why."""
    from ckv.portfile import ProcessExited
    from ckv.storage import Store

    data_dir = str(tmp_path / "shared")
    holder = Store(data_dir)  # this test process stands for the first node
    holder.open()
    try:
        node = Process(
            "n2", "node",
            ["--name", "n2", "--listen", "tcp:0:interface=127.0.0.1",
             "--master", "tcp:127.0.0.1:1", "--data-dir", data_dir],
            str(tmp_path),
        )  # fmt: skip
        with pytest.raises(ProcessExited) as exc:
            node.start(timeout=60)
        assert exc.value.returncode != 0
        assert f"is in use by another process (pid {os.getpid()})" in str(exc.value)
    finally:
        holder.close()


def test_tac_files_run_each_role(tmp_path):
    """tac/master.tac, tac/node.tac and tac/dispatcher.tac, configured by environment."""
    work = str(tmp_path)

    def run_tac(name: str, tac: str, extra: dict[str, str]) -> tuple[subprocess.Popen, dict]:
        port_file = os.path.join(work, f"{name}.ports")
        e = env()
        e.update(extra)
        e.update({"CKV_LISTEN": "tcp:0:interface=127.0.0.1", "CKV_PORT_FILE": port_file})
        proc = subprocess.Popen(
            [
                *harness_twistd(), "-n", "--pidfile=",
                f"--logfile={os.path.join(work, name + '.log')}",
                "-y", os.path.join(REPO, "tac", tac),
            ],
            cwd=work, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return proc, wait_port_file(port_file, 30, proc)

    procs = []
    try:
        master, mports = run_tac(
            "master", "master.tac",
            {"CKV_DATA_DIR": os.path.join(work, "master"), "CKV_CHAIN_LENGTH": "1"},
        )  # fmt: skip
        procs.append(master)
        master_ep = f"tcp:127.0.0.1:{mports['listen']}"
        node, _ = run_tac(
            "n1", "node.tac",
            {"CKV_NAME": "n1", "CKV_MASTER": master_ep, "CKV_DATA_DIR": os.path.join(work, "n1")},
        )  # fmt: skip
        procs.append(node)
        disp, dports = run_tac("dispatcher", "dispatcher.tac", {"CKV_MASTER": master_ep})
        procs.append(disp)
        endpoint = f"tcp:127.0.0.1:{dports['listen']}"

        def roundtrip():
            r = run_module("tests.clientcheck", "roundtrip", "--connect", endpoint)
            return r.returncode == 0

        wait_for(roundtrip, what="the tac-file cluster to answer")
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)
