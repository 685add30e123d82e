"""The ckv command: parsing, outputs, exit codes; bench statistics; port files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ckv import bench, cli, local, portfile
from ckv.config import Chain, ClusterConfig, Member
from ckv.errors import CkvError, RequestError, Unavailable

# -- a fake BlockingClient --------------------------------------------------------


class FakeClient:
    """Stands in for ckv.client.BlockingClient; records calls."""

    instances: list[FakeClient] = []
    store: dict[bytes, bytes] = {}
    fail: BaseException | None = None

    def __init__(self, endpoint: str, timeout: float | None = None, direct: bool = False) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.direct = direct
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False
        FakeClient.instances.append(self)

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if FakeClient.fail is not None:
            raise FakeClient.fail

    def get(self, key: bytes) -> bytes | None:
        self._call("get", key)
        return self.store.get(key)

    def put(self, key: bytes, value: bytes) -> None:
        self._call("put", key, value)
        self.store[key] = value

    def delete(self, key: bytes) -> bool:
        self._call("delete", key)
        return self.store.pop(key, None) is not None

    def cas(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        self._call("cas", key, expected, new)
        if self.store.get(key) != expected:
            return False
        if new is None:
            self.store.pop(key, None)
        else:
            self.store[key] = new
        return True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    import ckv.client

    FakeClient.instances = []
    FakeClient.store = {}
    FakeClient.fail = None
    monkeypatch.setattr(ckv.client, "BlockingClient", FakeClient, raising=False)
    monkeypatch.delenv("CKV_CONNECT", raising=False)
    monkeypatch.delenv("CKV_MASTER", raising=False)
    return FakeClient


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


# -- parsing -------------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CKV_CONNECT", raising=False)
    monkeypatch.delenv("CKV_MASTER", raising=False)
    p = cli.build_parser()
    a = p.parse_args(["get", "k"])
    assert (a.connect, a.timeout, a.hex) == ("tcp:127.0.0.1:7200", 5.0, False)
    a = p.parse_args(["status"])
    assert (a.master, a.json) == ("tcp:127.0.0.1:7000", False)
    a = p.parse_args(["local"])
    assert (a.data_dir, a.nodes, a.chains, a.base_port, a.sync) == (
        "./ckv-data", None, None, 7000, "durable")
    a = p.parse_args(["bench"])
    assert (a.workload, a.concurrency, a.keys, a.value_size, a.duration, a.read_ratio) == (
        "write", 32, 10000, 100, 10.0, 0.5)


def test_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKV_CONNECT", "tcp:10.0.0.1:7200")
    monkeypatch.setenv("CKV_MASTER", "tcp:10.0.0.1:7000")
    p = cli.build_parser()
    assert p.parse_args(["put", "k", "v"]).connect == "tcp:10.0.0.1:7200"
    assert p.parse_args(["status"]).master == "tcp:10.0.0.1:7000"
    assert p.parse_args(["get", "k", "--connect", "tcp:h:1"]).connect == "tcp:h:1"


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["get"],
    ["put"],
    ["get", "k", "--timeout", "0"],
    ["get", "k", "--timeout", "soon"],
    ["bench", "--workload", "scan"],
    ["bench", "--concurrency", "0"],
    ["bench", "--read-ratio", "1.5"],
    ["local", "--sync", "maybe"],
    ["delete", "k", "extra"],
])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "usage:" in err or "error" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["cas", "k", "old", "new"], (b"k", b"old", b"new")),
    (["cas", "k", "--if-absent", "new"], (b"k", None, b"new")),
    (["cas", "--if-absent", "k", "new"], (b"k", None, b"new")),
    (["cas", "k", "old", "--delete"], (b"k", b"old", None)),
    (["cas", "k", "--delete", "old"], (b"k", b"old", None)),
    (["cas", "k", "", "new"], (b"k", b"", b"new")),
    (["cas", "--hex", "00ff", "--if-absent", "0a"], (b"\x00\xff", None, b"\n")),
])
def test_cas_operands(argv: list[str], expected: tuple[Any, ...]) -> None:
    args = cli.parse(cli.build_parser(), argv)
    assert cli.cas_operands(args) == expected


@pytest.mark.parametrize("argv", [
    ["cas", "k", "old"],
    ["cas", "k", "a", "b", "c"],
    ["cas", "k", "--if-absent", "--delete"],
    ["cas", "k", "--if-absent", "a", "b"],
])
def test_cas_wrong_count(argv: list[str], capsys: pytest.CaptureFixture[str],
                         client: type[FakeClient]) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert "cas" in err
    assert client.instances == []


def test_cas_help_documents_absent() -> None:
    text = cli.build_parser()._subparsers._group_actions[0].choices["cas"].format_help()
    assert "--if-absent" in text and "--delete" in text and "''" in text


# -- commands with a fake client ------------------------------------------------------


def test_put_get_delete(client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["put", "greeting", "hello"], capsys) == (0, "OK\n", "")
    assert client.instances[-1].calls == [("put", b"greeting", b"hello")]
    assert client.instances[-1].endpoint == "tcp:127.0.0.1:7200"
    assert client.instances[-1].closed
    assert run(["get", "greeting"], capsys) == (0, "hello\n", "")
    assert run(["get", "greeting", "-n"], capsys) == (0, "hello", "")
    assert run(["delete", "greeting"], capsys) == (0, "deleted\n", "")
    assert run(["delete", "greeting"], capsys) == (1, "not found\n", "")
    assert run(["get", "greeting"], capsys) == (1, "", "(not found)\n")


class Stdin:
    """Stands in for sys.stdin: bytes on .buffer."""

    def __init__(self, data: bytes) -> None:
        import io

        self.buffer = io.BytesIO(data)


def test_put_reads_the_value_from_stdin(client: type[FakeClient], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """put --stdin sends standard input byte for byte (not hex even with --hex)."""
    data = b"\x00\xffbinary\r\n\n"
    monkeypatch.setattr(sys, "stdin", Stdin(data))
    assert run(["put", "k", "--stdin"], capsys) == (0, "OK\n", "")
    assert client.instances[-1].calls == [("put", b"k", data)]
    monkeypatch.setattr(sys, "stdin", Stdin(b"00ff"))
    assert run(["put", "--hex", "6b32", "--stdin"], capsys) == (0, "OK\n", "")
    assert client.instances[-1].calls == [("put", b"k2", b"00ff")]
    # An empty input is the empty value (asked for with --stdin).
    monkeypatch.setattr(sys, "stdin", Stdin(b""))
    assert run(["put", "k3", "--stdin"], capsys) == (0, "OK\n", "")
    assert client.instances[-1].calls == [("put", b"k3", b"")]


@pytest.mark.parametrize("argv, stdin, message", [
    (["put", "k"], Stdin(b"piped"), "VALUE is missing (or --stdin"),
    (["put", "k", "v", "--stdin"], Stdin(b"piped"), "give VALUE or --stdin, not both"),
    (["put", "k", "--stdin"], None, "standard input is closed"),
])
def test_put_stdin_usage_errors(argv: list[str], stdin: Stdin | None, message: str,
                                client: type[FakeClient], monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """
    Without --stdin a missing VALUE is an error, and stdin is left alone
    (under cron or in a `while read` loop it holds something else); with it,
    a closed stdin is an error, not a traceback.
    """
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(argv, capsys)
    assert (code, out) == (2, "")
    assert message in err and "Traceback" not in err
    assert client.instances == []
    if stdin is not None:
        assert stdin.buffer.tell() == 0


def test_put_refuses_an_oversized_stdin_without_reading_it_all(
    client: type[FakeClient], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ckv.wire import MAX_VALUE

    stdin = Stdin(b"v" * (MAX_VALUE + 100))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, err = run(["put", "k", "--stdin"], capsys)
    assert (code, out) == (2, "")
    assert f"exceeds the limit of {MAX_VALUE} bytes" in err
    assert stdin.buffer.tell() == MAX_VALUE + 1
    assert client.instances == []
    # Exactly the limit is accepted.
    monkeypatch.setattr(sys, "stdin", Stdin(b"v" * MAX_VALUE))
    assert run(["put", "k", "--stdin"], capsys) == (0, "OK\n", "")
    assert len(client.instances[-1].calls[0][2]) == MAX_VALUE


def test_connect_and_timeout_passed(client: type[FakeClient],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run(["get", "k", "--connect", "tcp:10.1.1.1:9", "--timeout", "2.5"], capsys)
    assert (client.instances[-1].endpoint, client.instances[-1].timeout) == (
        "tcp:10.1.1.1:9", 2.5)


def test_direct_flag(client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    """--direct on every client command (and bench) reaches the client; off by default."""
    run(["put", "k", "v"], capsys)
    assert client.instances[-1].direct is False
    for argv in (["get", "k"], ["put", "k", "v"], ["delete", "k"], ["cas", "k", "v", "w"]):
        run([*argv, "--direct", "--connect", "tcp:127.0.0.1:7000"], capsys)
        assert (client.instances[-1].endpoint, client.instances[-1].direct) == (
            "tcp:127.0.0.1:7000", True), argv
    p = cli.build_parser()
    assert p.parse_args(["bench", "--direct"]).direct is True
    assert p.parse_args(["bench"]).direct is False
    for command in ("get", "put", "delete", "cas", "bench"):
        text = p._subparsers._group_actions[0].choices[command].format_help()
        assert "--direct" in text and "head" in text, command


def test_hex(client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["put", "--hex", "00", "ff00"], capsys)[0] == 0
    assert client.store == {b"\x00": b"\xff\x00"}
    assert run(["get", "--hex", "00"], capsys) == (0, "ff00\n", "")
    code, _, err = run(["get", "--hex", "zz"], capsys)
    assert code == 2 and "not valid hex" in err and "Traceback" not in err


def test_cas(client: type[FakeClient], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["cas", "k", "--if-absent", "v1"], capsys) == (0, "OK\n", "")
    assert run(["cas", "k", "--if-absent", "v2"], capsys) == (
        1, "cas failed: current value differs\n", "")
    assert run(["cas", "k", "v1", "v2"], capsys) == (0, "OK\n", "")
    assert run(["cas", "k", "v1", "v3"], capsys)[0] == 1
    assert run(["cas", "k", "v2", "--delete"], capsys) == (0, "OK\n", "")
    assert client.store == {}


@pytest.mark.parametrize("error, code, text", [
    (Unavailable("timed out"), 3, "no answer from tcp:127.0.0.1:7200 within 5s"),
    (RequestError(3, "key too large"), 2, "key too large"),
    (CkvError("confused"), 2, "confused"),
    (ConnectionRefusedError(111, "Connection refused"), 3, "cannot connect to tcp:127.0.0.1:7200"),
])
def test_errors(client: type[FakeClient], capsys: pytest.CaptureFixture[str],
                error: BaseException, code: int, text: str) -> None:
    client.fail = error
    for argv in (["get", "k"], ["put", "k", "v"], ["delete", "k"], ["cas", "k", "a", "b"]):
        got, out, err = run(argv, capsys)
        assert got == code, argv
        assert text in err
        assert out == ""
        assert "Traceback" not in err
        if code == 3 and "no answer" in text:
            # Only an update's outcome can be unknown; a get simply failed.
            assert ("outcome is unknown" in err) == (argv[0] != "get")


def test_twisted_connect_error(client: type[FakeClient],
                               capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.internet.error import ConnectionRefusedError as TxRefused

    client.fail = TxRefused("nobody home")
    code, _, err = run(["get", "k"], capsys)
    assert code == 3 and "cannot connect" in err


# -- status -----------------------------------------------------------------------------


def make_config() -> ClusterConfig:
    members = tuple(Member(f"n{i}", "127.0.0.1", 7010 + i) for i in (1, 2, 3))
    return ClusterConfig(
        version=4,
        slots=tuple([0] * 512 + [1] * 512),
        chains=(Chain(0, 7, members), Chain(1, 2, (Member("n4", "127.0.0.1", 7014),))),
        spares=(Member("n5", "127.0.0.1", 7015),),
    )


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    calls: list[tuple[str, float]] = []

    def fake(endpoint: str, timeout: float) -> ClusterConfig:
        calls.append((endpoint, timeout))
        return make_config()

    monkeypatch.setattr(cli, "fetch_config_blocking", fake)
    monkeypatch.delenv("CKV_MASTER", raising=False)
    return calls


def test_status_json(config: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["status", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert [c["id"] for c in data["chains"]] == [0, 1]
    assert data["chains"][0]["epoch"] == 7
    assert data["chains"][0]["nodes"] == ["n1", "n2", "n3"]
    assert data["chains"][1]["nodes"] == ["n4"]
    assert config == [("tcp:127.0.0.1:7000", 5.0)]


def test_status_human(config: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["status", "--master", "tcp:h:1", "-t", "1"], capsys)
    assert code == 0
    assert config == [("tcp:h:1", 1.0)]
    lines = out.splitlines()
    assert "chain 0  epoch 7  slots 0-511" in lines
    assert "chain 1  epoch 2  slots 512-1023" in lines
    roles = [line.split()[:3] for line in lines if line.startswith("  ")]
    assert roles == [
        ["head", "n1", "127.0.0.1:7011"],
        ["middle", "n2", "127.0.0.1:7012"],
        ["tail", "n3", "127.0.0.1:7013"],
        ["head+tail", "n4", "127.0.0.1:7014"],
    ]
    assert "spares: n5 (127.0.0.1:7015)" in lines


def test_status_unavailable(monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.internet.defer import TimeoutError as DeferTimeout

    def fake(endpoint: str, timeout: float) -> None:
        raise DeferTimeout()

    monkeypatch.setattr(cli, "fetch_config_blocking", fake)
    code, _, err = run(["status", "--master", "tcp:127.0.0.1:1", "-t", "2"], capsys)
    assert code == 3
    assert "no answer from tcp:127.0.0.1:1 within 2s" in err


# -- bench statistics ----------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 99.9) == 100.0
    assert bench.percentile(values, 100) == 100.0
    assert bench.percentile(values, 1) == 1.0
    assert bench.percentile(values, 0) == 1.0
    assert bench.percentile([], 50) == 0.0
    assert bench.percentile([7.0], 99.9) == 7.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 51) == 3.0
    with pytest.raises(ValueError):
        bench.percentile(values, 101)


def test_rate() -> None:
    assert bench.rate(1000, 2.0) == 500.0
    assert bench.rate(10, 0.0) == 0.0


def test_summarize() -> None:
    rec = bench.Recorder()
    for ms in range(1, 1001):  # 1..1000 ms
        rec.success(ms / 1000)
    rec.failure(unavailable=True)
    rec.failure(unavailable=False)
    rec.failure(unavailable=False)
    result = bench.summarize(rec, 2.0, workload="write", concurrency=8, value_size=100)
    assert result["ops"] == 1000
    assert result["ops_per_s"] == 500.0
    assert result["p50_ms"] == 500.0
    assert result["p99_ms"] == 990.0
    assert result["p999_ms"] == 999.0
    assert result["max_ms"] == 1000.0
    assert (result["errors"], result["unavailable"]) == (2, 1)
    assert result["duration_s"] == 2.0
    assert (result["workload"], result["concurrency"], result["value_size"]) == (
        "write", 8, 100)
    json.dumps(result)
    text = bench.format_result(result, "write")
    assert "500.0 ops/s" in text and "p99 990.00 ms" in text


def test_bench_keys() -> None:
    assert bench.make_key(7) == b"bench-00000007"


# -- ckv local: layout (the real-process test lives with the services) ----------------------


def local_layout(argv: list[str]) -> local.Layout:
    return local.validate(cli.build_parser().parse_args(["local", *argv]))


def test_local_layout_default_ports(tmp_path: Path) -> None:
    layout = local_layout(["--data-dir", str(tmp_path)])
    m = layout.master()
    assert m.args[:3] == ["--logfile", str(tmp_path / "logs" / "master.log"), "ckv-master"]
    assert "tcp:7000:interface=127.0.0.1" in m.args
    assert "tcp:7001:interface=127.0.0.1" in m.args
    assert m.args[m.args.index("--chain-length") + 1] == "3"
    n2 = layout.node(2, "tcp:127.0.0.1:7000")
    assert n2.args[2] == "ckv-node"
    for flag, value in [("--name", "n2"), ("--listen", "tcp:7012:interface=127.0.0.1"),
                        ("--admin", "tcp:7022:interface=127.0.0.1"),
                        ("--master", "tcp:127.0.0.1:7000"),
                        ("--data-dir", str(tmp_path / "n2")), ("--sync", "durable"),
                        ("--port-file", str(tmp_path / "run" / "n2.port"))]:
        assert n2.args[n2.args.index(flag) + 1] == value
    d = layout.dispatcher("tcp:127.0.0.1:7000")
    assert "tcp:7200:interface=127.0.0.1" in d.args and "tcp:7201:interface=127.0.0.1" in d.args
    assert (layout.chains, layout.nodes, layout.chain_length) == (2, 6, 3)
    assert m.args[m.args.index("--chains") + 1] == "2"
    assert sorted(layout.fixed_ports()) == [7000, 7001, 7011, 7012, 7013, 7014, 7015, 7016,
                                            7021, 7022, 7023, 7024, 7025, 7026, 7200, 7201]
    layout = local_layout(["--data-dir", str(tmp_path), "--chains", "1", "--nodes", "3"])
    assert (layout.chains, layout.nodes, layout.chain_length) == (1, 3, 3)
    assert sorted(layout.fixed_ports()) == [7000, 7001, 7011, 7012, 7013, 7021, 7022, 7023,
                                            7200, 7201]


@pytest.mark.parametrize("argv, shape", [
    ([], (2, 6)),
    (["--nodes", "3"], (1, 3)),
    (["--nodes", "1"], (1, 1)),
    (["--nodes", "9"], (3, 9)),
    (["--chains", "1"], (1, 3)),
    (["--chains", "3"], (3, 9)),
    (["--chains", "2", "--nodes", "4"], (2, 4)),
])
def test_local_shape(tmp_path: Path, argv: list[str], shape: tuple[int, int]) -> None:
    layout = local_layout(["--data-dir", str(tmp_path), *argv])
    assert (layout.chains, layout.nodes) == shape


def test_local_keeps_the_shape_of_its_data(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A data directory keeps its number of chains: recorded, or one for an old one."""
    (tmp_path / local.SHAPE_FILE).write_text('{"chains": 1, "nodes": 3}')
    assert (local_layout(["--data-dir", str(tmp_path)]).chains, 1) == (1, 1)
    assert local_layout(["--data-dir", str(tmp_path), "--nodes", "4"]).chains == 1
    code, _, err = run(["local", "--data-dir", str(tmp_path), "--chains", "2"], capsys)
    assert code == 2 and "holds a cluster of 1 chain(s)" in err
    old = tmp_path / "old"
    for d in ("master", "n1", "n2", "n3", "n4"):
        (old / d).mkdir(parents=True)
    layout = local_layout(["--data-dir", str(old)])
    assert (layout.chains, layout.nodes) == (1, 4)


def test_local_ephemeral_ports(tmp_path: Path) -> None:
    layout = local_layout(["--data-dir", str(tmp_path), "--base-port", "0", "--nodes", "12"])
    assert layout.fixed_ports() == []
    assert "tcp:0:interface=127.0.0.1" in layout.node(12, "tcp:127.0.0.1:1").args


@pytest.mark.parametrize("argv", [
    ["--nodes", "0"], ["--nodes", "10"], ["--chains", "4"], ["--nodes", "3", "--chains", "4"],
    ["--chains", "0"], ["--base-port", "65500"],
    ["--failure-timeout", "0"], ["--start-timeout", "-1"],
])
def test_local_bad(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["local", *argv], capsys)
    assert code == 2 and "local:" in err


def test_local_refuses_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        if port > 65000:
            pytest.skip("ephemeral port too high for a base port")
        code, _, err = run(["local", "--data-dir", str(tmp_path), "--base-port", str(port)],
                           capsys)
    assert code == 2
    assert "already in use" in err


def test_twistd_command_runs() -> None:
    out = subprocess.run([*local.twistd_command(), "--version"], capture_output=True,
                         text=True, timeout=60, env=local.child_env())
    assert out.returncode == 0
    assert "twistd" in out.stdout.lower() or "twisted" in out.stdout.lower()


# -- port files -----------------------------------------------------------------------------


def test_port_file_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "x.port")
    portfile.write_port_file(path, 7011, None)
    assert json.loads(Path(path).read_text()) == {"listen": 7011, "admin": None,
                                                  "pid": os.getpid()}
    assert portfile.wait_port_file(path, 1) == {"listen": 7011, "admin": None,
                                                "pid": os.getpid()}
    portfile.write_port_file(path, 1, 2)
    assert portfile.read_port_file(path) == {"listen": 1, "admin": 2, "pid": os.getpid()}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.port"]


def test_wait_port_file_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(portfile.PortFileTimeout, match="after 0.2s"):
        portfile.wait_port_file(str(tmp_path / "none"), 0.2)
    assert time.monotonic() - start < 2


def test_wait_port_file_from_a_process(tmp_path: Path) -> None:
    path = tmp_path / "p.port"
    code = ("import time, sys; time.sleep(0.3); from ckv.portfile import write_port_file; "
            f"write_port_file({str(path)!r}, 4242, 4243); time.sleep(30)")
    # A stale file from an earlier run (another pid) must be ignored.
    path.write_text(json.dumps({"listen": 1, "admin": None, "pid": 1}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        data = portfile.wait_port_file(str(path), 30, proc)
        assert data == {"listen": 4242, "admin": 4243, "pid": proc.pid}
    finally:
        proc.kill()
        proc.wait()


def test_wait_port_file_process_died(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    log.write_text("starting\nTraceback: something broke\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    start = time.monotonic()
    with pytest.raises(portfile.ProcessExited) as info:
        portfile.wait_port_file(str(tmp_path / "p.port"), 30, proc, log_paths=[str(log)])
    assert time.monotonic() - start < 10
    assert info.value.returncode == 3
    assert "exited with status 3" in str(info.value)
    assert "something broke" in str(info.value)


# -- bench run loop with a fake Twisted client (no real reactor) ----------------------------


class FakeTxClient:
    """A Twisted-style client whose Deferreds fire at once (or fail)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, bytes]] = []

    def _result(self, value: Any) -> Any:
        from twisted.internet import defer

        return defer.fail(self.fail) if self.fail is not None else defer.succeed(value)

    def get(self, key: bytes, timeout: float | None = None) -> Any:
        self.calls.append(("get", key))
        return self._result(b"v")

    def put(self, key: bytes, value: bytes, timeout: float | None = None) -> Any:
        self.calls.append(("put", key))
        return self._result(None)


def bench_args(**overrides: Any) -> Any:
    args = cli.build_parser().parse_args(["bench", "--quiet", "--seed", "1"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_bench_preload_writes_every_key_once() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    client = FakeTxClient()
    run = bench._Run(Clock(), client, bench_args(keys=50, concurrency=4))
    d = Deferred.fromCoroutine(run.preload())
    result = d.result
    assert result["ops"] == 50 and result["errors"] == 0
    assert sorted(k for _, k in client.calls) == [bench.make_key(i) for i in range(50)]


def test_bench_mixed_ratio() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    client = FakeTxClient()
    run = bench._Run(Clock(), client, bench_args(workload="mixed", read_ratio=0.8,
                                                 duration=0.05, concurrency=2))
    result = Deferred.fromCoroutine(run.measure()).result
    gets = sum(1 for op, _ in client.calls if op == "get")
    assert result["ops"] == len(client.calls) > 100
    assert 0.7 < gets / len(client.calls) < 0.9
    assert result["workload"] == "mixed" and result["read_ratio"] == 0.8


def test_bench_counts_failures() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    clock = Clock()
    for fail, field in [(Unavailable("slow"), "unavailable"), (CkvError("bad"), "errors")]:
        run = bench._Run(clock, FakeTxClient(fail), bench_args(duration=0.05, concurrency=2))
        d = Deferred.fromCoroutine(run.measure())
        deadline = time.monotonic() + 5
        while not d.called and time.monotonic() < deadline:
            clock.advance(0.01)  # the back-off after each failure
            time.sleep(0.001)
        result = d.result
        assert result["ops"] == 0
        assert result[field] > 0


def test_bench_counts_an_operation_that_raises_and_finishes() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    class Raising(FakeTxClient):
        def put(self, key: bytes, value: bytes, timeout: float | None = None) -> Any:
            raise RuntimeError("a bug in the client")

    clock = Clock()
    run = bench._Run(clock, Raising(), bench_args(duration=0.05, concurrency=2))
    d = Deferred.fromCoroutine(run.measure())
    deadline = time.monotonic() + 5
    while not d.called and time.monotonic() < deadline:
        clock.advance(0.01)
        time.sleep(0.001)
    result = d.result
    assert result["ops"] == 0 and result["errors"] > 0


def test_child_env_finds_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = local.child_env()
    root = str(Path(local.__file__).resolve().parent.parent)
    if (Path(root) / "twisted" / "plugins" / "ckv_plugins.py").exists() and not root.endswith(
        "-packages"
    ):
        assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_bench_counts_per_chain_with_one_chain() -> None:
    """One chain owns every key: all completed operations count for it."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    client = FakeTxClient()
    client.config = ClusterConfig(1, (7,) * 16, (Chain(7, 1, (Member("a", "h", 1),)),))  # type: ignore[attr-defined]
    run = bench._Run(Clock(), client, bench_args(duration=0.05, concurrency=2, keys=1000))
    result = Deferred.fromCoroutine(run.measure()).result
    assert set(result["per_chain"]) == {"7"}
    assert abs(result["per_chain"]["7"] - result["ops_per_s"]) < 1.0


def test_bench_counts_per_chain() -> None:
    """Completed operations are counted by the chain owning each key (text and JSON)."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from ckv.config import slot_of

    client = FakeTxClient()
    client.config = ClusterConfig(  # type: ignore[attr-defined]
        1, (0, 1) * 8, (Chain(0, 1, (Member("a", "h", 1),)), Chain(1, 1, (Member("b", "h", 2),)))
    )
    run = bench._Run(Clock(), client, bench_args(duration=0.05, concurrency=2, keys=1000))
    result = Deferred.fromCoroutine(run.measure()).result
    per_chain = result["per_chain"]
    assert set(per_chain) == {"0", "1"}
    assert abs(sum(per_chain.values()) - result["ops_per_s"]) < 1.0
    on_1 = sum(1 for _, k in client.calls if slot_of(k, 16) % 2 == 1)
    share = per_chain["1"] / sum(per_chain.values())
    assert abs(share - on_1 / len(client.calls)) < 0.001
    json.dumps(result)
    text = bench.format_result(result, "write")
    assert "per chain: chain 0 " in text and "chain 1 " in text and "%)" in text
    # No configuration (an old client): no per-chain figures.
    plain = bench.summarize(bench.Recorder(latencies=[0.001]), 1.0)
    assert "per_chain" not in plain and "per chain" not in bench.format_result(plain)
