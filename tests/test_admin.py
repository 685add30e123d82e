"""Tests for L{ckv.admin}: the admin console line protocol and its helpers."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from ckv.admin import (
    MAX_LINE,
    AdminCommand,
    AdminError,
    AdminProtocol,
    admin_factory,
    format_key,
    format_kv,
    format_table,
    parse_key,
)

BANNER = b"ckv node n1 admin console; type help\n"


class Console:
    """One admin connection over a StringTransport."""

    def __init__(self, commands: list[AdminCommand], banner: str | None = None) -> None:
        self.factory = admin_factory("node", commands, banner)
        proto = self.factory.buildProtocol(None)
        assert isinstance(proto, AdminProtocol)
        self.proto = proto
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def output(self) -> bytes:
        """Everything written since the last call."""
        out = self.transport.value()
        self.transport.clear()
        return out

    def ask(self, line: bytes) -> bytes:
        self.output()
        self.send(line + b"\n")
        return self.output()


def _status(args: list[str]) -> str:
    return "status: fine"


def _boom(args: list[str]) -> str:
    raise ZeroDivisionError("division by zero")


def _echo(args: list[str]) -> str:
    return "args: " + ",".join(args)


def _usage(args: list[str]) -> str:
    raise AdminError("no such key")


def _multi(args: list[str]) -> str:
    return "line one\nline two\n"


def _none(args: list[str]) -> None:
    return None


def basic_commands() -> list[AdminCommand]:
    return [
        AdminCommand("status", "status", "show the status", _status),
        AdminCommand("boom", "boom", "always fails", _boom),
        AdminCommand("echo", "echo [WORD...]", "echo the arguments", _echo),
        AdminCommand("get", "get KEY", "read a key", _echo, min_args=1, max_args=1),
        AdminCommand("missing", "missing", "user error", _usage),
        AdminCommand("multi", "multi", "two lines", _multi),
        AdminCommand("none", "none", "returns nothing", _none),
    ]


class ProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.c = Console(basic_commands(), banner="ckv node n1 admin console; type help")

    def assertStillWorks(self) -> None:
        self.assertEqual(self.c.ask(b"status"), b"status: fine\n")
        self.assertFalse(self.c.transport.disconnecting)

    def test_banner(self) -> None:
        self.assertEqual(self.c.output(), BANNER)

    def test_default_banner(self) -> None:
        c = Console([])
        self.assertEqual(c.output(), b"ckv node admin console; type help\n")

    def test_help_lists_every_command(self) -> None:
        out = self.c.ask(b"help").decode()
        lines = out.splitlines()
        self.assertTrue(out.endswith("\n"))
        usages = [line.split("  ")[0].strip() for line in lines]
        self.assertEqual(
            usages,
            [
                "help [COMMAND]",
                "quit",
                "status",
                "boom",
                "echo [WORD...]",
                "get KEY",
                "missing",
                "multi",
                "none",
            ],
        )
        self.assertIn("show the status", out)
        self.assertIn("read a key", out)
        # Help texts start in one aligned column.
        columns = {line.index(h) for line, h in zip(lines[2:4], ["show", "always"], strict=True)}
        self.assertEqual(len(columns), 1)

    def test_help_one_command(self) -> None:
        self.assertEqual(self.c.ask(b"help get"), b"get KEY\n  read a key\n")
        self.assertEqual(self.c.ask(b"HELP Status"), b"status\n  show the status\n")

    def test_help_unknown_command(self) -> None:
        self.assertEqual(self.c.ask(b"help xyz"), b"error: unknown command 'xyz' (type help)\n")
        self.assertStillWorks()

    def test_unknown_command(self) -> None:
        self.assertEqual(self.c.ask(b"xyz"), b"error: unknown command 'xyz' (type help)\n")
        self.assertStillWorks()

    def test_case_insensitive(self) -> None:
        self.assertEqual(self.c.ask(b"STATUS"), b"status: fine\n")
        self.assertEqual(self.c.ask(b"Status"), b"status: fine\n")
        # Arguments keep their case.
        self.assertEqual(self.c.ask(b"ECHO AbC d"), b"args: AbC,d\n")

    def test_crlf(self) -> None:
        self.c.output()
        self.c.send(b"status\r\necho a b\r\n")
        self.assertEqual(self.c.output(), b"status: fine\nargs: a,b\n")

    def test_several_lines_in_one_chunk_and_split_lines(self) -> None:
        self.c.output()
        self.c.send(b"sta")
        self.assertEqual(self.c.output(), b"")
        self.c.send(b"tus\necho x\nec")
        self.assertEqual(self.c.output(), b"status: fine\nargs: x\n")
        self.c.send(b"ho y\n")
        self.assertEqual(self.c.output(), b"args: y\n")

    def test_empty_line(self) -> None:
        self.assertEqual(self.c.ask(b""), b"")
        self.assertEqual(self.c.ask(b"   \t "), b"")
        self.assertEqual(self.c.ask(b"\r"), b"")
        self.assertStillWorks()

    def test_multiline_response(self) -> None:
        self.assertEqual(self.c.ask(b"multi"), b"line one\nline two\n")

    def test_none_response_is_ok(self) -> None:
        self.assertEqual(self.c.ask(b"none"), b"ok\n")

    def test_arg_count_checked(self) -> None:
        self.assertEqual(self.c.ask(b"get"), b"error: usage: get KEY\n")
        self.assertEqual(self.c.ask(b"get a b"), b"error: usage: get KEY\n")
        self.assertEqual(self.c.ask(b"get a"), b"args: a\n")
        self.assertEqual(self.c.ask(b"quit now"), b"error: usage: quit\n")
        self.assertFalse(self.c.transport.disconnecting)

    def test_handler_raising(self) -> None:
        self.assertEqual(self.c.ask(b"boom"), b"error: division by zero\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertStillWorks()

    def test_handler_raising_message_less(self) -> None:
        def bare(args: list[str]) -> str:
            raise KeyError()

        c = Console([AdminCommand("bare", "bare", "fails", bare)])
        self.assertEqual(c.ask(b"bare"), b"error: KeyError\n")
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_admin_error_not_logged(self) -> None:
        self.assertEqual(self.c.ask(b"missing"), b"error: no such key\n")
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertStillWorks()

    def test_quit(self) -> None:
        self.assertEqual(self.c.ask(b"quit"), b"bye\n")
        self.assertTrue(self.c.transport.disconnecting)

    def test_exit_alias_and_lines_after_quit_ignored(self) -> None:
        self.c.output()
        self.c.send(b"EXIT\r\nstatus\n")
        self.assertEqual(self.c.output(), b"bye\n")
        self.assertTrue(self.c.transport.disconnecting)

    def test_too_long_line(self) -> None:
        self.c.output()
        self.c.send(b"x" * (MAX_LINE + 10) + b"\nstatus\n")
        self.assertEqual(
            self.c.output(),
            f"error: line too long (max {MAX_LINE} bytes)\n".encode() + b"status: fine\n",
        )
        self.assertFalse(self.c.transport.disconnecting)
        self.assertStillWorks()

    def test_too_long_line_in_pieces(self) -> None:
        self.c.output()
        self.c.send(b"x" * 3000)
        self.c.send(b"x" * 3000)
        self.assertEqual(self.c.output(), f"error: line too long (max {MAX_LINE} bytes)\n".encode())
        # The rest of the line is dropped, with one error only.
        self.c.send(b"y" * 10000)
        self.c.send(b"zzz\nech")
        self.c.send(b"o after\n")
        self.assertEqual(self.c.output(), b"args: after\n")
        self.assertFalse(self.c.transport.disconnecting)

    def test_line_at_max_length(self) -> None:
        line = b"echo " + b"a" * (MAX_LINE - 5)
        self.assertEqual(len(line), MAX_LINE)
        self.assertEqual(self.c.ask(line), b"args: " + b"a" * (MAX_LINE - 5) + b"\n")

    def test_binary_garbage(self) -> None:
        out = self.c.ask(b"\xff\xfe\x00garbage")
        self.assertTrue(out.startswith(b"error: "), out)
        self.assertEqual(out.count(b"\n"), 1)
        out = self.c.ask(b"\x80\x81\x00\x01 \xc3")
        self.assertTrue(out.startswith(b"error: unknown command"), out)
        self.assertEqual(out.count(b"\n"), 1)
        self.assertNotIn(b"\x00", out)
        self.assertNotIn(b"\x01", out)
        self.assertIn(b"help", self.c.ask(b"help"))
        self.assertStillWorks()

    def test_non_utf8_arguments_replaced(self) -> None:
        self.assertEqual(self.c.ask(b"echo a\x80b"), "args: a\ufffdb\n".encode())

    def test_telnet_iac_sequences_dropped(self) -> None:
        # IAC DO ECHO, IAC WILL SUPPRESS-GO-AHEAD, IAC SB NAWS ... IAC SE, IAC NOP
        iac = b"\xff\xfd\x01\xff\xfb\x03\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0\xff\xf1"
        self.assertEqual(self.c.ask(iac + b"status"), b"status: fine\n")
        self.assertEqual(self.c.ask(b"sta" + iac + b"tus"), b"status: fine\n")
        # A line of negotiation only is an empty line; a truncated one too.
        self.assertEqual(self.c.ask(iac), b"")
        self.assertEqual(self.c.ask(b"\xff\xfa\x1f\x00"), b"")
        self.assertEqual(self.c.ask(b"\xff"), b"")
        self.assertIn(b"help", self.c.ask(b"help"))

    def test_other_connections_unaffected(self) -> None:
        other = self.c.factory.buildProtocol(None)
        assert other is not None
        t = StringTransport()
        other.makeConnection(t)
        self.c.send(b"\x00" * 9000 + b"\nboom\n")
        self.flushLoggedErrors(ZeroDivisionError)
        other.dataReceived(b"status\n")
        self.assertEqual(t.value(), BANNER + b"status: fine\n")

    def test_unknown_command_echo_is_shortened(self) -> None:
        out = self.c.ask(b"q" * 1000)
        self.assertLess(len(out), 100)
        self.assertTrue(out.startswith(b"error: unknown command 'qqq"))


class AsyncHandlerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pending: list[Deferred[str]] = []

        def deferred(args: list[str]) -> Deferred[str]:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            return d

        async def coroutine(args: list[str]) -> str:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            value = await d
            return "coro: " + value

        async def coroutine_fails(args: list[str]) -> str:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            await d
            raise ValueError("bad thing")

        self.c = Console(
            [
                AdminCommand("status", "status", "status", _status),
                AdminCommand("slow", "slow", "deferred", deferred),
                AdminCommand("coro", "coro", "coroutine", coroutine),
                AdminCommand("corofail", "corofail", "failing coroutine", coroutine_fails),
            ]
        )
        self.c.output()

    def test_deferred(self) -> None:
        self.c.send(b"slow\n")
        self.assertEqual(self.c.output(), b"")
        self.pending.pop().callback("done\n")
        self.assertEqual(self.c.output(), b"done\n")

    def test_already_fired_deferred(self) -> None:
        from twisted.internet.defer import succeed

        c = Console([AdminCommand("now", "now", "fired", lambda args: succeed("now!"))])
        self.assertEqual(c.ask(b"now"), b"now!\n")

    def test_coroutine(self) -> None:
        self.c.send(b"coro\n")
        self.assertEqual(self.c.output(), b"")
        self.pending.pop().callback("yes")
        self.assertEqual(self.c.output(), b"coro: yes\n")

    def test_failing_deferred(self) -> None:
        self.c.send(b"slow\n")
        self.pending.pop().errback(RuntimeError("backend down"))
        self.assertEqual(self.c.output(), b"error: backend down\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.c.ask(b"status"), b"status: fine\n")

    def test_failing_coroutine(self) -> None:
        self.c.send(b"corofail\n")
        self.pending.pop().callback("x")
        self.assertEqual(self.c.output(), b"error: bad thing\n")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.c.ask(b"status"), b"status: fine\n")

    def test_responses_in_command_order(self) -> None:
        """Lines after a pending command wait for it (the nc script case)."""
        self.c.send(b"slow\nstatus\nquit\n")
        self.assertEqual(self.c.output(), b"")
        self.assertFalse(self.c.transport.disconnecting)
        self.assertEqual(self.c.transport.producerState, "paused")
        self.pending.pop().callback("slow result")
        self.assertEqual(self.c.output(), b"slow result\nstatus: fine\nbye\n")
        self.assertTrue(self.c.transport.disconnecting)

    def test_input_while_pending(self) -> None:
        self.c.send(b"coro\n")
        self.c.send(b"status\n")
        self.assertEqual(self.c.output(), b"")
        self.pending.pop().callback("a")
        self.assertEqual(self.c.output(), b"coro: a\nstatus: fine\n")
        self.assertEqual(self.c.transport.producerState, "producing")

    def test_result_after_disconnect(self) -> None:
        self.c.send(b"slow\n")
        self.c.proto.connectionLost(None)
        self.pending.pop().callback("late")
        self.assertEqual(self.c.output(), b"")


class FactoryTests(SynchronousTestCase):
    def test_duplicate_command(self) -> None:
        cmd = AdminCommand("status", "status", "x", _status)
        self.assertRaises(ValueError, admin_factory, "node", [cmd, cmd])
        upper = AdminCommand("STATUS", "status", "x", _status)
        self.assertRaises(ValueError, admin_factory, "node", [cmd, upper])

    def test_builtin_clash(self) -> None:
        for name in ["help", "quit", "exit", "Help"]:
            cmd = AdminCommand(name, name, "x", _status)
            self.assertRaises(ValueError, admin_factory, "node", [cmd])

    def test_bad_name(self) -> None:
        for name in ["", "two words"]:
            cmd = AdminCommand(name, name, "x", _status)
            self.assertRaises(ValueError, admin_factory, "node", [cmd])

    def test_uppercase_command_name(self) -> None:
        c = Console([AdminCommand("Chains", "chains", "the chains", lambda args: "c")])
        self.assertEqual(c.ask(b"chains"), b"c\n")
        self.assertIn(b"the chains", c.ask(b"help"))


class HelperTests(SynchronousTestCase):
    def test_format_table(self) -> None:
        out = format_table(
            [["1", "7", "n1 n2 n3"], ["12", "3", "n4"]], ["chain", "epoch", "nodes"]
        )
        self.assertEqual(
            out,
            "chain  epoch  nodes\n"
            "1      7      n1 n2 n3\n"
            "12     3      n4",
        )

    def test_format_table_empty_short_rows_and_types(self) -> None:
        self.assertEqual(format_table([], ["a", "bb"]), "a  bb")
        self.assertEqual(
            format_table([["x"], [1, 2.5, b"\x00k"]], ["a", "b"]),
            "a  b\nx\n1  2.500  0x006b",
        )

    def test_format_kv(self) -> None:
        out = format_kv([("name", "n1"), ("role", "tail"), ("applied_seq", 42)])
        self.assertEqual(out, "name:        n1\nrole:        tail\napplied_seq: 42")

    def test_format_kv_multiline_and_empty(self) -> None:
        self.assertEqual(format_kv([]), "")
        self.assertEqual(format_kv([("a", "x\ny"), ("bb", "")]), "a:  x\n    y\nbb:")

    def test_parse_key(self) -> None:
        self.assertEqual(parse_key("user:1"), b"user:1")
        self.assertEqual(parse_key("caf\u00e9"), "caf\u00e9".encode())
        self.assertEqual(parse_key("0x00ff41"), b"\x00\xffA")
        self.assertEqual(parse_key("0XAbCd"), b"\xab\xcd")
        for bad in ["", "0x", "0xabc", "0xzz", "a\ufffdb"]:
            self.assertRaises(AdminError, parse_key, bad)
        # The longest key there can be, and one byte more (text or hex).
        self.assertEqual(parse_key("k" * 511), b"k" * 511)
        for too_long in ["k" * 512, "0x" + "6b" * 512, "\u00e9" * 256]:
            with self.assertRaises(AdminError) as e:
                parse_key(too_long)
            self.assertEqual(str(e.exception), "key of 512 bytes exceeds the limit of 511")

    def test_format_key_round_trip(self) -> None:
        for key in [b"user:1", b"\x00\xff", b"0xab", b"with space", "caf\u00e9".encode(), b""]:
            text = format_key(key)
            if key:
                self.assertEqual(parse_key(text), key)
        self.assertEqual(format_key(b"abc"), "abc")
        self.assertEqual(format_key(b"a b"), "0x612062")
        self.assertEqual(format_key(b"0xab"), "0x30786162")

    def test_get_with_parse_key_through_console(self) -> None:
        store = {b"\x00k": b"v"}

        def get(args: list[str]) -> str:
            key = parse_key(args[0])
            if key not in store:
                raise AdminError(f"no key {format_key(key)}")
            return format_kv([("key", key), ("value", store[key])])

        c = Console([AdminCommand("get", "get KEY", "read a key", get, min_args=1, max_args=1)])
        self.assertEqual(c.ask(b"get 0x006b"), b"key:   0x006b\nvalue: v\n")
        self.assertEqual(c.ask(b"get nope"), b"error: no key nope\n")
        self.assertEqual(c.ask(b"get 0xq"), b"error: bad hex key '0xq'\n")
