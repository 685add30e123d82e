"""The twistd command lines of every role: Options and makeService."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from twisted.python import usage

from ckv.chain import tap as node_tap
from ckv.dispatcher import tap as dispatcher_tap
from ckv.master import tap as master_tap


class FakeService:
    """Records its keyword arguments, like the real service classes take them."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_services(monkeypatch: pytest.MonkeyPatch) -> dict[str, type]:
    """Replace the three service modules, whether or not the real ones exist yet."""
    classes = {}
    for module, cls in [
        ("ckv.chain.service", "NodeService"),
        ("ckv.master.service", "MasterService"),
        ("ckv.dispatcher.service", "DispatcherService"),
    ]:
        fake = types.ModuleType(module)
        klass = type(cls, (FakeService,), {})
        setattr(fake, cls, klass)
        monkeypatch.setitem(sys.modules, module, fake)
        classes[cls] = klass
    return classes


def parse(tap: Any, args: list[str]) -> Any:
    options = tap.Options()
    options.parseOptions(args)
    return options


NODE = ["--name", "n1", "--listen", "tcp:7011:interface=127.0.0.1", "--data-dir", "/tmp/n1"]


# -- master ----------------------------------------------------------------------


def test_master_defaults() -> None:
    o = parse(master_tap, [])
    assert o["listen"] == "tcp:7000:interface=127.0.0.1"
    assert o["data-dir"] == "./ckv-data/master"
    assert o["admin"] is None
    assert (o["chains"], o["chain-length"]) == (1, 3)
    assert (o["heartbeat-interval"], o["failure-timeout"]) == (1.0, 5.0)
    assert o["port-file"] is None


def test_master_service(fake_services: dict[str, type]) -> None:
    o = parse(master_tap, [
        "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", "d", "--admin", "7001",
        "--chains", "2", "--chain-length", "4", "--heartbeat-interval", "0.5",
        "--failure-timeout", "2", "--port-file", "m.port",
    ])
    svc = master_tap.makeService(o)
    assert isinstance(svc, fake_services["MasterService"])
    assert svc.kwargs == {
        "listen": "tcp:0:interface=127.0.0.1",
        "data_dir": "d",
        "admin": "tcp:7001:interface=127.0.0.1",
        "chains": 2,
        "chain_length": 4,
        "heartbeat_interval": 0.5,
        "failure_timeout": 2.0,
        "port_file": "m.port",
    }


@pytest.mark.parametrize("args, message", [
    (["--listen", "tcp:banana"], "--listen"),
    (["--listen", "nonsense:1"], "server endpoint"),
    (["--admin", "tcp:99999"], "out of range"),
    (["--chains", "0"], "--chains"),
    (["--chain-length", "-1"], "--chain-length"),
    (["--chains", "x"], "type enforcement"),
    (["--heartbeat-interval", "0"], "--heartbeat-interval"),
    (["--failure-timeout", "1", "--heartbeat-interval", "1"], "longer than"),
    (["--data-dir", ""], "--data-dir"),
    (["--bogus"], "bogus"),
])
def test_master_bad(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(master_tap, args)


# -- node ------------------------------------------------------------------------


def test_node_defaults() -> None:
    o = parse(node_tap, NODE)
    assert o["master"] == "tcp:127.0.0.1:7000"
    assert o["sync"] == "durable"
    assert o["admin"] is None and o["advertise"] is None and o["port-file"] is None


def test_node_service(fake_services: dict[str, type]) -> None:
    o = parse(node_tap, NODE + [
        "--master", "tcp:10.0.0.1:7000", "--admin", "tcp:7021:interface=127.0.0.1",
        "--sync", "replicated", "--advertise", "10.0.0.5:7011", "--port-file", "n1.port",
        "--session-ttl", "3600",
    ])
    svc = node_tap.makeService(o)
    assert isinstance(svc, fake_services["NodeService"])
    assert svc.kwargs == {
        "name": "n1",
        "listen": "tcp:7011:interface=127.0.0.1",
        "master": "tcp:10.0.0.1:7000",
        "data_dir": "/tmp/n1",
        "sync": "replicated",
        "admin": "tcp:7021:interface=127.0.0.1",
        "advertise": "10.0.0.5:7011",
        "port_file": "n1.port",
        "session_ttl": 3600.0,
    }


def test_node_session_ttl_default_and_checks() -> None:
    assert parse(node_tap, NODE)["session-ttl"] == node_tap.DEFAULT_SESSION_TTL == 86400.0
    assert parse(node_tap, NODE + ["--session-ttl", "0"])["session-ttl"] == 0.0
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(usage.UsageError):
            parse(node_tap, NODE + ["--session-ttl", bad])


def test_node_bare_port_means_loopback() -> None:
    o = parse(node_tap, ["--name", "a", "--listen", "7011", "--data-dir", "d"])
    assert o["listen"] == "tcp:7011:interface=127.0.0.1"


def test_node_ipv6_advertise() -> None:
    o = parse(node_tap, NODE + ["--advertise", "[::1]:7011"])
    assert o["advertise"] == "[::1]:7011"


@pytest.mark.parametrize("args, message", [
    (["--listen", "tcp:7011", "--data-dir", "d"], "--name is required"),
    (["--name", "n1", "--data-dir", "d"], "--listen is required"),
    (["--name", "n1", "--listen", "tcp:7011"], "--data-dir is required"),
    (["--name", "", "--listen", "tcp:7011", "--data-dir", "d"], "must not be empty"),
    (["--name", "x" * 65, "--listen", "tcp:7011", "--data-dir", "d"], "64 bytes"),
    (["--name", "é" * 33, "--listen", "tcp:7011", "--data-dir", "d"], "64 bytes"),
    (["--name", "a b", "--listen", "tcp:7011", "--data-dir", "d"], "whitespace"),
    (NODE + ["--sync", "sometimes"], "--sync"),
    (NODE + ["--master", "tcp:127.0.0.1"], "--master"),
    (NODE + ["--master", "tcp:7000:interface=127.0.0.1"], "--master"),
    (NODE + ["--master", "tcp:127.0.0.1:0"], "out of range"),
    (NODE + ["--advertise", "10.0.0.5"], "--advertise"),
    (NODE + ["--advertise", "10.0.0.5:http"], "--advertise"),
    (NODE + ["--advertise", ":7011"], "--advertise"),
    (NODE + ["--admin", "tcp:admin"], "--admin"),
])
def test_node_bad(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(node_tap, args)


def test_node_name_of_64_bytes_is_fine() -> None:
    parse(node_tap, ["--name", "x" * 64, "--listen", "tcp:0", "--data-dir", "d"])


# -- dispatcher ----------------------------------------------------------------------


def test_dispatcher_defaults(fake_services: dict[str, type]) -> None:
    svc = dispatcher_tap.makeService(parse(dispatcher_tap, []))
    assert isinstance(svc, fake_services["DispatcherService"])
    assert svc.kwargs == {
        "listen": "tcp:7200:interface=127.0.0.1",
        "master": "tcp:127.0.0.1:7000",
        "admin": None,
        "port_file": None,
    }


@pytest.mark.parametrize("args, message", [
    (["--listen", "tcp"], "--listen"),
    (["--master", "127.0.0.1:7000"], "--master"),
    (["--admin", "unix"], "--admin"),
])
def test_dispatcher_bad(args: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(dispatcher_tap, args)


def test_make_service_opens_nothing(fake_services: dict[str, type]) -> None:
    """makeService only builds: twistd may fork after it (see the twisted notes)."""
    import socket

    before = socket.socket
    calls: list[Any] = []

    class Spy(socket.socket):
        def __init__(self, *a: Any, **k: Any) -> None:
            calls.append(a)
            super().__init__(*a, **k)

    socket.socket = Spy  # type: ignore[misc]
    try:
        master_tap.makeService(parse(master_tap, []))
        node_tap.makeService(parse(node_tap, NODE))
        dispatcher_tap.makeService(parse(dispatcher_tap, []))
    finally:
        socket.socket = before  # type: ignore[misc]
    assert calls == []


def test_real_service_classes_if_present() -> None:
    """Once the services exist, makeService builds them without opening anything."""
    for tap, module, cls, args in [
        (master_tap, "ckv.master.service", "MasterService", ["--data-dir", "unused"]),
        (node_tap, "ckv.chain.service", "NodeService", NODE),
        (dispatcher_tap, "ckv.dispatcher.service", "DispatcherService", []),
    ]:
        try:
            real = getattr(__import__(module, fromlist=[cls]), cls)
        except ImportError:
            continue
        svc = tap.makeService(parse(tap, args))
        assert isinstance(svc, real)
        assert not svc.running
