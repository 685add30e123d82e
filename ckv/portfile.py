"""
Port files: how a ckv process started on an ephemeral port (C{tcp:0}) tells
whoever started it which ports it got.

Every role takes C{--port-file PATH}.  Once its listeners are up, the service
calls L{write_port_file}, which atomically writes::

    {"listen": 7011, "admin": 7021, "pid": 12345}

(C{admin} is null when the role runs no admin console).  Tests and
C{ckv local} start a process with port 0 and call L{wait_port_file}.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from typing import Any


class PortFileError(Exception):
    """The port file did not appear."""


class PortFileTimeout(PortFileError):
    """The deadline passed before the port file appeared."""


class ProcessExited(PortFileError):
    """The process that should write the port file exited first."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


def write_port_file(path: str, listen_port: int, admin_port: int | None) -> None:
    """
    Write C{path} atomically: a temporary file in the same directory, flushed
    and fsynced, then renamed over C{path}.  A reader never sees a partial
    file.
    """
    data = {
        "listen": int(listen_port),
        "admin": None if admin_port is None else int(admin_port),
        "pid": os.getpid(),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".portfile-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_port_file(path: str) -> dict[str, Any] | None:
    """The contents of C{path}, or None if it does not exist (yet) or is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("listen"), int):
        return None
    return data


def remove_port_file(path: str) -> None:
    """Remove a stale port file, if any."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def log_tail(paths: Iterable[str], lines: int = 30) -> str:
    """The last C{lines} lines of each existing file in C{paths}, labelled."""
    out: list[str] = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        tail = text.splitlines()[-lines:]
        if tail:
            out.append(f"--- last {len(tail)} lines of {p} ---")
            out.extend(tail)
    return "\n".join(out)


def wait_port_file(
    path: str,
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    *,
    log_paths: Iterable[str] = (),
    interval: float = 0.05,
) -> dict[str, Any]:
    """
    Poll until C{path} holds a port file, and return its contents.

    @param timeout: seconds before giving up with L{PortFileTimeout}.
    @param proc: the process expected to write the file.  If it exits first,
        raise L{ProcessExited} at once.  A file whose C{pid} is not
        C{proc.pid} is stale (left by an earlier run) and is ignored.
    @param log_paths: log files of that process, whose tails are included in
        the error message.
    """
    log_paths = list(log_paths)
    deadline = time.monotonic() + timeout
    while True:
        data = read_port_file(path)
        if data is not None and (proc is None or data.get("pid") == proc.pid):
            return data
        if proc is not None and proc.poll() is not None:
            # One last look: it may have written the file and then exited.
            data = read_port_file(path)
            if data is not None and data.get("pid") == proc.pid:
                return data
            raise ProcessExited(
                _message(
                    f"process {proc.pid} exited with status {proc.returncode} "
                    f"before writing {path}",
                    log_paths,
                ),
                proc.returncode,
            )
        if time.monotonic() >= deadline:
            raise PortFileTimeout(_message(f"no port file at {path} after {timeout:g}s", log_paths))
        time.sleep(interval)


def _message(head: str, log_paths: list[str]) -> str:
    tail = log_tail(log_paths)
    return f"{head}\n{tail}" if tail else head


# -- Option checks shared by every role's tap.py ------------------------------
#
# These live here, next to the port-file contract, because every role's
# command line shares them; nothing below opens a socket or imports the
# reactor.


def check_role_endpoints(options: Any, client: tuple[str, ...] = ()) -> None:
    """
    The checks every role's C{postOptions} shares: normalize and check the
    server endpoints C{--listen} and C{--admin}, check the client endpoints
    named in C{client}, and turn an empty C{--port-file} into None.

    @raise twisted.python.usage.UsageError: with the first problem found.
    """
    from twisted.python.usage import UsageError

    for option in ("listen", "admin"):
        if options[option] is not None:
            options[option] = normalize_server_endpoint(options[option])
            error = check_server_endpoint(option, options[option])
            if error:
                raise UsageError(error)
    for option in client:
        error = check_client_endpoint(option, options[option])
        if error:
            raise UsageError(error)
    if options["port-file"] == "":
        options["port-file"] = None


def normalize_server_endpoint(description: str) -> str:
    """
    A bare port number C{N} means C{tcp:N:interface=127.0.0.1} (ckv binds to
    loopback unless told otherwise); anything else is returned unchanged.
    """
    description = description.strip()
    if description.isdigit():
        return f"tcp:{int(description)}:interface=127.0.0.1"
    return description


def check_server_endpoint(option: str, description: str) -> str | None:
    """An error message if C{description} is not a server endpoint string, else None."""
    from twisted.internet.endpoints import serverFromString

    try:
        # The reactor is only stored by the endpoint, never used, at parse time.
        endpoint = serverFromString(None, description)
    except Exception as e:
        return (
            f"--{option}: {description!r} is not a server endpoint string ({e}); "
            f"expected something like tcp:7000:interface=127.0.0.1"
        )
    return _check_port(option, description, endpoint, allow_zero=True)


def check_client_endpoint(option: str, description: str) -> str | None:
    """An error message if C{description} is not a client endpoint string, else None."""
    from twisted.internet.endpoints import clientFromString

    try:
        endpoint = clientFromString(None, description)
    except Exception as e:
        return (
            f"--{option}: {description!r} is not a client endpoint string ({e}); "
            f"expected something like tcp:127.0.0.1:7000"
        )
    return _check_port(option, description, endpoint, allow_zero=False)


def _check_port(option: str, description: str, endpoint: Any, allow_zero: bool) -> str | None:
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int):
        low = 0 if allow_zero else 1
        if not low <= port <= 65535:
            return f"--{option}: port {port} in {description!r} is out of range ({low}-65535)"
    return None


def check_name(option: str, name: str, limit: int = 64) -> str | None:
    """An error message if C{name} is not a usable node name, else None."""
    if not name:
        return f"--{option} must not be empty"
    if len(name.encode("utf-8", "surrogateescape")) > limit:
        return f"--{option}: {name!r} is longer than {limit} bytes"
    if any(c.isspace() or not c.isprintable() for c in name):
        return f"--{option}: {name!r} contains whitespace or control characters"
    return None


def check_host_port(option: str, value: str) -> str | None:
    """An error message if C{value} is not HOST:PORT (IPv6 as [addr]:port), else None."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--{option}: {value!r} is not HOST:PORT (e.g. 10.0.0.5:7011)"
    return None


def split_host_port(value: str) -> tuple[str, int]:
    """Split a HOST:PORT checked by L{check_host_port}."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
