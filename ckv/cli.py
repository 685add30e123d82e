"""
The C{ckv} command.

    ckv local                      start a whole cluster on this machine
    ckv get KEY                    print KEY's value
    ckv put KEY VALUE              set KEY to VALUE (--stdin < FILE: the file's bytes)
    ckv delete KEY                 remove KEY
    ckv cas KEY EXPECTED NEW       set KEY to NEW only if its value is EXPECTED
    ckv status [--json]            chains, members (head first), epochs
    ckv bench                      measure throughput and latency

Exit status: 0 success; 1 a negative answer (not found, cas mismatch);
2 an error (bad arguments, a request the store refused); 3 no answer in time
(the outcome of an update is then unknown).
"""

from __future__ import annotations

import argparse
import binascii
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from ckv import __version__
from ckv.argtypes import positive

DEFAULT_CONNECT = "tcp:127.0.0.1:7200"
DEFAULT_MASTER = "tcp:127.0.0.1:7000"
DEFAULT_TIMEOUT = 5.0

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_ERROR = 2
EXIT_UNAVAILABLE = 3

CAS_HELP = """\
Compare-and-swap: set KEY to NEW only if its current value is EXPECTED, as one
atomic step.  Prints OK (exit 0) or "cas failed: current value differs" (exit 1).

"Absent" is spelled with flags, never with an empty string ('' is the empty
value, which is a real value):
  ckv cas KEY OLD NEW              replace OLD by NEW
  ckv cas KEY --if-absent NEW      create KEY only if it does not exist
  ckv cas KEY OLD --delete         delete KEY only if its value is OLD
"""


class UsageError(Exception):
    """Bad arguments found after argparse (exit status 2)."""


# -- running Twisted code from blocking code ----------------------------------


class ReactorThread:
    """
    Twisted calls from blocking code (this command, C{ckv local}'s supervisor
    loop), through the reactor thread that L{ckv.client.blocking} runs and
    shares with every L{ckv.client.BlockingClient} of the process.
    """

    @staticmethod
    def call(f: Callable[..., Any], *args: Any, wait: float = 60.0, **kwargs: Any) -> Any:
        """Call C{f} in the reactor thread and wait (at most C{wait}s) for its result."""
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        from ckv.client.blocking import call_blocking, ensure_running

        def run() -> Any:
            result = f(*args, **kwargs)
            if hasattr(result, "__await__") and not isinstance(result, Deferred):
                return Deferred.fromCoroutine(result)
            return result

        ensure_running(reactor)
        return call_blocking(reactor, wait, run)

    @staticmethod
    def stop(timeout: float = 2.0) -> None:
        """Stop the reactor thread, if one was started."""
        blocking = sys.modules.get("ckv.client.blocking")
        if blocking is None:
            return
        from twisted.internet import reactor

        thread = blocking.reactor_thread(reactor)
        if thread is not None and thread.is_alive():
            reactor.callFromThread(reactor.stop)
            thread.join(timeout)


def fetch_config_blocking(endpoint: str, timeout: float) -> Any:
    """L{ckv.client.fetch_config}, called from blocking code."""
    from twisted.internet import reactor

    from ckv.client import fetch_config

    return ReactorThread.call(fetch_config, reactor, endpoint, timeout, wait=timeout + 5.0)


# -- argument helpers ----------------------------------------------------------


def to_bytes(text: str, hexmode: bool, what: str) -> bytes:
    """A command-line argument as bytes: hex-decoded with --hex, else as given."""
    if hexmode:
        try:
            return binascii.unhexlify(text.strip())
        except (binascii.Error, ValueError) as e:
            raise UsageError(f"{what} {text!r} is not valid hex ({e})") from None
    # fsencode undoes the surrogateescape decoding of argv: any bytes round-trip.
    return os.fsencode(text)


def show_bytes(value: bytes, hexmode: bool) -> bytes:
    return value.hex().encode() if hexmode else value


def _add_connect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect",
        "-c",
        metavar="ENDPOINT",
        default=os.environ.get("CKV_CONNECT") or DEFAULT_CONNECT,
        help=f"client endpoint of a dispatcher, or with --direct of a dispatcher or the "
        f"master (default: $CKV_CONNECT, else {DEFAULT_CONNECT})",
    )
    p.add_argument(
        "--direct",
        action="store_true",
        help="take only the configuration (the slot map) from --connect and send each "
        "request straight to its key's chain: updates to the head, reads to the tail",
    )
    p.add_argument(
        "--timeout",
        "-t",
        metavar="SECONDS",
        type=positive(float),
        default=DEFAULT_TIMEOUT,
        help="give up after this long (default: %(default)s)",
    )


def _add_hex(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--hex",
        action="store_true",
        help="keys and values on the command line and in the output are hex-encoded bytes",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckv",
        description="ckv: a strongly consistent key-value store built on chain replication.",
        epilog="Start a cluster with `ckv local`, then try `ckv put greeting hello` and "
        "`ckv get greeting`. Exit status: 0 ok, 1 not found / cas failed, 2 error, "
        "3 no answer in time (outcome unknown).",
    )
    parser.add_argument("--version", action="version", version=f"ckv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("get", help="print a key's value", description="Print KEY's value "
                       "(exit 0), or '(not found)' on stderr (exit 1).")
    p.add_argument("key", metavar="KEY")
    _add_connect(p)
    _add_hex(p)
    p.add_argument("-n", "--no-newline", action="store_true",
                   help="do not add a newline after the value (for binary values)")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("put", help="set a key", description="Set KEY to VALUE; prints OK. "
                       "With --stdin instead of VALUE the value is standard input, byte for "
                       "byte (binary values, or values too long for a command line): "
                       "ckv put KEY --stdin < FILE.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", metavar="VALUE", nargs="?")
    p.add_argument("--stdin", action="store_true",
                   help="read the value from standard input to its end, as raw bytes (even "
                   "with --hex), instead of VALUE")
    _add_connect(p)
    _add_hex(p)
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("delete", help="remove a key", description="Remove KEY; prints "
                       "'deleted' (exit 0) or 'not found' (exit 1).")
    p.add_argument("key", metavar="KEY")
    _add_connect(p)
    _add_hex(p)
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("cas", help="compare-and-swap", description=CAS_HELP,
                       usage="ckv cas [options] KEY {EXPECTED | --if-absent} {NEW | --delete}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", metavar="KEY")
    p.add_argument("values", metavar="EXPECTED NEW", nargs="*",
                   help="the expected current value and the new value")
    p.add_argument("--if-absent", action="store_true",
                   help="expect KEY to be absent (EXPECTED is then omitted)")
    p.add_argument("--delete", action="store_true",
                   help="delete KEY on a match (NEW is then omitted)")
    _add_connect(p)
    _add_hex(p)
    p.set_defaults(func=cmd_cas)

    p = sub.add_parser("status", help="show chains, members and epochs",
                       description="Ask the master for the cluster configuration: every "
                       "chain with its epoch and members from head to tail.")
    p.add_argument("--master", "-m", metavar="ENDPOINT",
                   default=os.environ.get("CKV_MASTER") or DEFAULT_MASTER,
                   help=f"client endpoint of the master (default: $CKV_MASTER, "
                   f"else {DEFAULT_MASTER})")
    p.add_argument("--json", action="store_true", help="print the configuration as JSON")
    p.add_argument("--timeout", "-t", metavar="SECONDS", type=positive(float),
                   default=DEFAULT_TIMEOUT, help="give up after this long (default: %(default)s)")
    p.set_defaults(func=cmd_status)

    from ckv import bench, local

    p = sub.add_parser("local", help="run a whole cluster on this machine",
                       description=local.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    local.add_arguments(p)
    p.set_defaults(func=local.run)

    p = sub.add_parser("bench", help="measure throughput and latency",
                       description=bench.DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    _add_connect(p)
    p.set_defaults(func=bench.run)
    return parser


# -- commands -------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from ckv.client import BlockingClient

    if getattr(args, "direct", False):
        return BlockingClient(args.connect, timeout=args.timeout, direct=True)
    return BlockingClient(args.connect, timeout=args.timeout)


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            pass


def _out(data: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def cmd_get(args: argparse.Namespace) -> int:
    key = to_bytes(args.key, args.hex, "KEY")
    client = _client(args)
    try:
        value = client.get(key)
    finally:
        _close(client)
    if value is None:
        print("(not found)", file=sys.stderr)
        return EXIT_NEGATIVE
    _out(show_bytes(value, args.hex) + (b"" if args.no_newline else b"\n"))
    return EXIT_OK


def value_from_stdin(stdin: BinaryIO) -> bytes:
    """
    The value of `ckv put KEY --stdin`: standard input to its end, byte for
    byte.  At most one byte past the limit is read, so that a huge input is
    refused without being held in memory.
    """
    from ckv.wire import MAX_VALUE

    value = stdin.read(MAX_VALUE + 1)
    if len(value) > MAX_VALUE:
        raise UsageError(
            f"put: the value on standard input exceeds the limit of {MAX_VALUE} bytes"
        )
    return value


def cmd_put(args: argparse.Namespace) -> int:
    key = to_bytes(args.key, args.hex, "KEY")
    # An explicit flag, not a missing VALUE: under cron or in a `while read`
    # loop a forgotten VALUE would otherwise store whatever stdin holds.
    if args.stdin:
        if args.value is not None:
            raise UsageError("put: give VALUE or --stdin, not both")
        if sys.stdin is None:  # file descriptor 0 was closed
            raise UsageError("put --stdin: standard input is closed")
        value = value_from_stdin(sys.stdin.buffer)
    elif args.value is None:
        raise UsageError("put: VALUE is missing (or --stdin to read it from standard input)")
    else:
        value = to_bytes(args.value, args.hex, "VALUE")
    client = _client(args)
    try:
        client.put(key, value)
    finally:
        _close(client)
    print("OK")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    key = to_bytes(args.key, args.hex, "KEY")
    client = _client(args)
    try:
        deleted = client.delete(key)
    finally:
        _close(client)
    if deleted:
        print("deleted")
        return EXIT_OK
    print("not found")
    return EXIT_NEGATIVE


def cas_operands(args: argparse.Namespace) -> tuple[bytes, bytes | None, bytes | None]:
    """(key, expected, new) from the cas arguments; None means absent / delete."""
    if args.if_absent and args.delete:
        raise UsageError("cas: --if-absent and --delete together would change nothing")
    wanted = 2 - int(args.if_absent) - int(args.delete)
    if len(args.values) != wanted:
        names = (["EXPECTED"] if not args.if_absent else []) + (["NEW"] if not args.delete else [])
        got = len(args.values)
        raise UsageError(
            f"cas: expected {wanted} value(s) after KEY ({' '.join(names)}), got {got}"
            " (see ckv cas --help)"
        )
    values = [to_bytes(v, args.hex, "value") for v in args.values]
    expected = None if args.if_absent else values.pop(0)
    new = None if args.delete else values.pop(0)
    return to_bytes(args.key, args.hex, "KEY"), expected, new


def cmd_cas(args: argparse.Namespace) -> int:
    key, expected, new = cas_operands(args)
    client = _client(args)
    try:
        ok = client.cas(key, expected, new)
    finally:
        _close(client)
    if ok:
        print("OK")
        return EXIT_OK
    print("cas failed: current value differs")
    return EXIT_NEGATIVE


def format_status(config: Any) -> str:
    """The human form of C{ckv status}: one block per chain, head first."""
    lines: list[str] = []
    chains = list(config.chains)
    lines.append(
        f"config version {config.version}, {len(config.slots)} slots, {len(chains)} chain(s)"
    )
    for chain in chains:
        slots = _slot_ranges(config, chain.chain_id)
        lines.append(f"chain {chain.chain_id}  epoch {chain.epoch}  slots {slots}")
        members = list(chain.members)
        if not members:
            lines.append("  (no members: unavailable)")
        width = max((len(m.name) for m in members), default=0)
        for i, m in enumerate(members):
            if len(members) == 1:
                role = "head+tail"
            elif i == 0:
                role = "head"
            elif i == len(members) - 1:
                role = "tail"
            else:
                role = "middle"
            lines.append(f"  {role:<9}  {m.name:<{width}}  {m.address}")
    spares = list(getattr(config, "spares", ()))
    if spares:
        lines.append("spares: " + ", ".join(f"{m.name} ({m.address})" for m in spares))
    return "\n".join(lines)


def _slot_ranges(config: Any, chain_id: int) -> str:
    slots = config.slots_of(chain_id)
    if not slots:
        return "none"
    ranges: list[list[int]] = []
    for s in slots:
        if ranges and ranges[-1][1] == s - 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
    if len(ranges) > 8:
        # An interleaved map (slot s -> chain s mod N) does not fit on a line.
        step = slots[1] - slots[0] if len(slots) > 1 else 1
        if all(b - a == step for a, b in zip(slots, slots[1:], strict=False)):
            return f"{len(slots)} slots ({slots[0]}, {slots[0] + step}, ... {slots[-1]})"
        return f"{len(slots)} slots ({text[:40]}...)"
    return text


def cmd_status(args: argparse.Namespace) -> int:
    args.connect = args.master  # for the error messages
    config = fetch_config_blocking(args.master, args.timeout)
    if args.json:
        print(json.dumps(config.to_json(), indent=2, sort_keys=True))
    else:
        print(format_status(config))
    return EXIT_OK


# -- main -------------------------------------------------------------------------


def _is_connect_error(e: BaseException) -> bool:
    from twisted.internet.error import ConnectError

    return isinstance(e, ConnectError | ConnectionError)


def _is_timeout(e: BaseException) -> bool:
    from twisted.internet.defer import TimeoutError as DeferTimeout

    return isinstance(e, DeferTimeout | TimeoutError)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """
    Parse C{argv}.  argparse cannot put a positional after a flag into an
    earlier C{nargs="*"} positional (C{ckv cas KEY --if-absent NEW}), so the
    cas values that come after its flags are collected here.
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command == "cas" and not any(e.startswith("-") and e != "-" for e in extras):
            args.values = [*args.values, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _unavailable(where: str, timeout: float | None, update: bool = True) -> int:
    within = f" within {timeout:g}s" if timeout else ""
    # Only an update has an outcome that may or may not have happened.
    tail = "; the outcome is unknown" if update else ""
    print(f"ckv: no answer from {where}{within}{tail}", file=sys.stderr)
    return EXIT_UNAVAILABLE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    from ckv.errors import CkvError, RequestError, Unavailable

    where = getattr(args, "connect", None) or getattr(args, "master", None) or "the server"
    timeout = getattr(args, "timeout", None)
    update = args.command in ("put", "delete", "cas")
    try:
        return int(args.func(args))
    except UsageError as e:
        parser.exit(EXIT_ERROR, f"ckv: {e}\n")
    except Unavailable:
        return _unavailable(where, timeout, update)
    except RequestError as e:
        print(f"ckv: refused: {e.message}", file=sys.stderr)
        return EXIT_ERROR
    except CkvError as e:
        print(f"ckv: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("ckv: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _is_timeout(e):
            return _unavailable(where, timeout, update)
        if _is_connect_error(e):
            print(f"ckv: cannot connect to {where}: {e}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        raise
    finally:
        ReactorThread.stop()
    return EXIT_ERROR  # pragma: no cover (parser.exit raises)


if __name__ == "__main__":
    sys.exit(main())
