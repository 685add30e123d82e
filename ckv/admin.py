"""
The telnet-like admin console shared by every role (node, master, dispatcher).

Each role serves a line protocol on its admin endpoint (loopback by default).
Connect with C{telnet 127.0.0.1 PORT} or C{nc} and type commands::

    $ printf 'status\\nquit\\n' | nc 127.0.0.1 7021
    ckv node n1 admin console; type help
    name:   n1
    ...
    bye

The protocol:

  - One command per line; C{\\n} or C{\\r\\n} line endings.  The first word is
    the command (case-insensitive), the following words its arguments
    (decoded as UTF-8 with replacement characters for invalid bytes).
  - No prompt.  On connect the server sends a one-line banner; every command
    gets a response of at least one line, each line terminated by C{\\n}.
    An empty line gets no response.
  - Errors are a single line starting with C{error: }; the connection stays
    open.  Over-long lines, binary garbage and telnet negotiation bytes (IAC
    sequences, which are dropped) never close the connection or escape as
    exceptions.
  - Commands run one at a time per connection: a command whose handler
    returns a Deferred or a coroutine holds back the following lines until
    it completes, so responses come out in the order of the commands.

Built-in commands on every role: C{help [COMMAND]} and C{quit} (alias
C{exit}).  Roles add theirs with L{AdminCommand} and serve the console with
L{admin_factory}.  L{format_table}, L{format_kv}, L{parse_key} and
L{format_key} help roles write handlers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from ckv import wire

__all__ = [
    "MAX_LINE",
    "AdminCommand",
    "AdminError",
    "AdminFactory",
    "AdminProtocol",
    "HandlerResult",
    "KEY_HELP",
    "admin_factory",
    "format_key",
    "format_kv",
    "format_table",
    "parse_key",
]

log = Logger(namespace="ckv.admin")

#: Longest accepted command line, in bytes (without its line ending).
MAX_LINE = 4096

#: What a command handler may return: the response text (C{None} means
#: C{ok}), or a Deferred or coroutine producing it.
HandlerResult = Union[
    str,
    None,
    "Deferred[str | None]",
    Coroutine[Any, Any, "str | None"],
]

# Telnet IAC sequences: subnegotiation (IAC SB ... IAC SE), option
# negotiation (IAC WILL/WONT/DO/DONT option), and any other two-byte command
# (including IAC IAC, an escaped 0xff data byte, which is never valid UTF-8
# anyway).  A truncated sequence at the end of a line is dropped too.
_IAC_RE = re.compile(rb"\xff\xfa.*?(?:\xff\xf0|\Z)|\xff[\xfb-\xfe].?|\xff.?", re.DOTALL)

_MAX_ECHO = 40


class AdminError(Exception):
    """
    A user error in an admin command (bad arguments, unknown key...).

    A handler raising it gets C{error: <message>} written back without a
    logged traceback; any other exception is also reported as an error line,
    but logged as a failure, since it is a bug.
    """


@dataclass(frozen=True)
class AdminCommand:
    """
    One admin console command.

    @ivar name: the command word; matched case-insensitively.
    @ivar usage: the synopsis shown by C{help}, e.g. C{"get KEY"}.
    @ivar help: one line describing the command.
    @ivar handler: called with the words after the command; returns the
        response text (a multi-line string is fine; C{None} or C{""} means
        C{ok}), or a Deferred or coroutine of it.  Raising, or failing
        asynchronously, gets C{error: <message>} written back.
    @ivar min_args: fewer arguments than this gets C{error: usage: ...}
        without calling the handler.
    @ivar max_args: more arguments than this (C{None}: no limit) gets
        C{error: usage: ...} without calling the handler.
    """

    name: str
    usage: str
    help: str
    handler: Callable[[list[str]], HandlerResult]
    min_args: int = 0
    max_args: int | None = None


def _echo(text: str) -> str:
    """C{text} made safe to echo on one line: control characters escaped, shortened."""
    if len(text) > _MAX_ECHO:
        text = text[:_MAX_ECHO] + "..."
    return "".join("?" if c == "\ufffd" else c if c.isprintable() else repr(c)[1:-1] for c in text)


def _one_line(text: str) -> str:
    """C{text} with its line breaks folded, for an error line."""
    return " ".join(text.split("\n")).replace("\r", " ").strip()


def _invoke(handler: Callable[[list[str]], HandlerResult], args: list[str]) -> Deferred[Any]:
    """Call C{handler}; whatever it returns or raises, a Deferred of its result."""
    try:
        result = handler(args)
    except Exception:
        return fail()
    if isinstance(result, Deferred):
        return result
    if inspect.iscoroutine(result):
        return Deferred.fromCoroutine(result)
    return succeed(result)


class AdminProtocol(LineReceiver):
    """
    One admin console connection.  Built by L{AdminFactory}; see the module
    docstring for the protocol.
    """

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    factory: AdminFactory

    def __init__(self) -> None:
        # After an over-long line without its newline: drop input up to the
        # next newline.
        self._discarding = False
        # Data that followed an over-long line in the same buffer, to parse
        # once LineReceiver.dataReceived has returned.
        self._after_overflow: bytes | None = None
        self._connected = False
        self._close_after_response = False
        self._peer = "?"

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        peer: IAddress | None = self.transport.getPeer() if self.transport else None
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self._peer = f"{host}:{port}" if host is not None else str(peer)
        log.info("admin connection from {peer}", role=self.factory.role, peer=self._peer)
        self._write(self.factory.banner)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        log.info("admin connection from {peer} closed", role=self.factory.role, peer=self._peer)

    def _write(self, text: str) -> None:
        """Write C{text} as UTF-8 lines, ending with exactly one newline."""
        if not self._connected or self.transport is None:
            return
        text = text.rstrip("\n").replace("\r\n", "\n")
        self.transport.write(text.encode("utf-8", "replace") + b"\n")

    def _error(self, message: str) -> None:
        self._write("error: " + _one_line(message))

    # -- input -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Hand C{data} to LineReceiver, after dropping the rest of an over-long
        line, and parse again what followed an over-long line.
        """
        if self._discarding:
            end = data.find(self.delimiter)
            if end < 0:
                return
            data = data[end + len(self.delimiter) :]
            self._discarding = False
        super().dataReceived(data)
        while self._after_overflow is not None and not self._discarding:
            rest, self._after_overflow = self._after_overflow, None
            super().dataReceived(rest)

    def lineLengthExceeded(self, line: bytes) -> None:
        """
        Report an over-long line and skip it, keeping the connection.

        C{line} is the rest of the buffer, starting with the over-long line;
        if it holds the line's end, what follows is parsed as usual,
        otherwise input is dropped up to the next newline.
        """
        log.warn("admin line too long from {peer}", role=self.factory.role, peer=self._peer)
        self._error(f"line too long (max {self.MAX_LENGTH} bytes)")
        end = line.find(self.delimiter)
        if end < 0:
            self._discarding = True
        else:
            self._after_overflow = line[end + len(self.delimiter) :]

    def lineReceived(self, line: bytes) -> None:
        """Parse and run one command line.  Never raises."""
        try:
            self._line(line)
        except Exception:
            log.failure("admin console internal error", role=self.factory.role, peer=self._peer)
            self._error("internal error")

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\xff" in line:
            line = _IAC_RE.sub(b"", line)
        words = line.decode("utf-8", "replace").split()
        if not words:
            return
        name, args = words[0].lower(), words[1:]
        command = self.factory.commands.get(name)
        if command is None:
            self._error(f"unknown command '{_echo(words[0])}' (type help)")
            return
        if len(args) < command.min_args or (
            command.max_args is not None and len(args) > command.max_args
        ):
            self._error(f"usage: {command.usage}")
            return
        log.debug(
            "admin command {command} from {peer}",
            role=self.factory.role,
            peer=self._peer,
            command=name,
            args=args,
        )
        self._run(command, args)

    def _run(self, command: AdminCommand, args: list[str]) -> None:
        """
        Run C{command}; write its response or error.  While it is pending,
        further lines wait in the buffer (and the transport is paused).
        """
        done = False

        def respond(result: object) -> None:
            self._write("ok" if result is None or result == "" else str(result))
            if self._close_after_response and self.transport is not None:
                self.transport.loseConnection()

        def report(failure: Failure) -> None:
            message = failure.getErrorMessage() or getattr(failure.type, "__name__", "failed")
            if failure.check(AdminError):
                self._error(message)
                return
            log.failure(
                "admin command {command} failed",
                failure,
                role=self.factory.role,
                peer=self._peer,
                command=command.name,
                args=args,
            )
            self._error(message)

        def finish(_: object) -> None:
            nonlocal done
            done = True
            if self.paused and self._connected:
                self.resumeProducing()

        handler = command.handler
        if handler is _builtin:
            handler = getattr(self, "command_" + command.name)
        d = _invoke(handler, args)
        d.addCallbacks(respond, report)
        d.addErrback(
            lambda f: log.failure(
                "admin response failed", f, role=self.factory.role, command=command.name
            )
        )
        d.addBoth(finish)
        if not done:
            self.pauseProducing()

    # -- built-in commands ----------------------------------------------

    def command_help(self, args: list[str]) -> str:
        """The C{help [COMMAND]} built-in."""
        commands = self.factory.commands
        if args:
            command = commands.get(args[0].lower())
            if command is None:
                raise AdminError(f"unknown command '{_echo(args[0])}' (type help)")
            return f"{command.usage}\n  {command.help}"
        listed = [c for n, c in commands.items() if n == c.name]
        width = max(len(c.usage) for c in listed)
        return "\n".join(f"{c.usage.ljust(width)}  {c.help}" for c in listed)

    def command_quit(self, args: list[str]) -> str:
        """The C{quit} built-in: say bye, then close once it is written."""
        self._close_after_response = True
        return "bye"


def _builtin(args: list[str]) -> str:
    """Placeholder handler: L{AdminProtocol} runs built-ins as its own methods."""
    raise AssertionError("built-in admin commands run on the protocol")


_BUILTINS = (
    AdminCommand(
        "help", "help [COMMAND]", "list the commands, or describe one", _builtin, max_args=1
    ),
    AdminCommand("quit", "quit", "close this connection (also: exit)", _builtin, max_args=0),
)


class AdminFactory(ServerFactory):
    """
    Builds L{AdminProtocol}s for one role.

    @ivar role: the role name, for logs.
    @ivar banner: the line sent on connect.
    @ivar commands: lower-case command names (and aliases) to commands, the
        built-ins first.
    """

    protocol = AdminProtocol

    def __init__(self, role: str, commands: Sequence[AdminCommand], banner: str) -> None:
        self.role = role
        self.banner = banner
        self.commands: dict[str, AdminCommand] = {}
        for command in [*_BUILTINS, *commands]:
            self._add(command.name, replace(command, name=command.name.lower()))
        self._add("exit", self.commands["quit"])

    def _add(self, name: str, command: AdminCommand) -> None:
        key = name.lower()
        if not key or any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError(f"bad admin command name {name!r}")
        if key in self.commands:
            raise ValueError(f"duplicate admin command {name!r}")
        self.commands[key] = command


def admin_factory(
    role: str, commands: Sequence[AdminCommand], banner: str | None = None
) -> ServerFactory:
    """
    A factory serving the admin console of C{role} with C{commands} plus the
    built-ins C{help} and C{quit}.

    @param role: C{"node"}, C{"master"} or C{"dispatcher"}; used in the
        default banner and in logs.
    @param commands: the role's commands; names must be unique
        (case-insensitively) and not C{help}, C{quit} or C{exit}.
    @param banner: the line sent on connect; by default
        C{"ckv ROLE admin console; type help"}.
    @raise ValueError: on a duplicate or malformed command name.
    """
    if banner is None:
        banner = f"ckv {role} admin console; type help"
    return AdminFactory(role, commands, banner)


# -- helpers for handlers --------------------------------------------------

#: Help text for commands taking a key, for roles to put in their help line.
KEY_HELP = "KEY is text (UTF-8), or 0x followed by hex digits for any bytes"


def parse_key(arg: str) -> bytes:
    """
    A key typed on the console: plain text (encoded as UTF-8), or C{0x}
    followed by an even number of hex digits for a binary key (or a key with
    spaces).  A text key that itself starts with C{0x} must be given in hex.

    @raise AdminError: empty key, bad hex, text that was not valid UTF-8
        on the wire, or a key longer than any key can be (L{wire.MAX_KEY}).
    """
    if arg[:2] in ("0x", "0X"):
        digits = arg[2:]
        try:
            key = bytes.fromhex(digits)
        except ValueError:
            raise AdminError(f"bad hex key '{_echo(arg)}'") from None
    else:
        if "\ufffd" in arg:
            raise AdminError("key is not valid UTF-8; give binary keys as 0x... hex")
        key = arg.encode("utf-8")
    if not key:
        raise AdminError("empty key")
    if len(key) > wire.MAX_KEY:
        # "(not found)" would be true but says less: no such key can exist.
        raise AdminError(f"key of {len(key)} bytes exceeds the limit of {wire.MAX_KEY}")
    return key


def format_key(key: bytes) -> str:
    """
    C{key} as L{parse_key} accepts it back: as text if it is printable UTF-8
    without spaces and does not start with C{0x}, otherwise as C{0x} hex.
    """
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + key.hex()
    if (
        not text
        or text[:2] in ("0x", "0X")
        or not all(c.isprintable() and not c.isspace() for c in text)
    ):
        return "0x" + key.hex()
    return text


def _cell(value: object) -> str:
    if isinstance(value, bytes):
        return format_key(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """
    C{rows} under C{header} as left-aligned columns separated by two spaces,
    without trailing spaces or a final newline.  Cells are converted with
    C{str} (bytes with L{format_key}, floats with three decimals); short rows
    are padded with empty cells.
    """
    table = [[_cell(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    ncols = max(len(r) for r in table)
    for r in table:
        r.extend([""] * (ncols - len(r)))
    widths = [max(len(r[i]) for r in table) for i in range(ncols)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def format_kv(pairs: Sequence[tuple[str, object]]) -> str:
    """
    C{pairs} as C{key: value} lines with the values aligned, without a final
    newline.  Values are converted as in L{format_table}; the lines of a
    multi-line value after the first are indented to the value column.
    """
    if not pairs:
        return ""
    width = max(len(k) for k, _ in pairs) + 1
    lines = []
    for k, v in pairs:
        first, *more = _cell(v).split("\n") or [""]
        lines.append(f"{(k + ':').ljust(width)} {first}".rstrip())
        lines.extend(" " * (width + 1) + m for m in more)
    return "\n".join(lines)
