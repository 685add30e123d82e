"""
Fast codecs generated from construct declarations, for the frames on every
request's path.

L{ckv.wire} declares every frame once, with construct.  A compiled construct
parser still builds a C{Container} field by field over a C{BytesIO}, which
costs about 7-12 microseconds per frame; a request crosses five processes
and is encoded or decoded about ten times, so the hot frames (REQUEST,
REPLY, ACK, the UPDATES entries) would spend a large share of the CPU of a
request in construct alone.

This module reads a construct C{Struct} made of fixed-size integers,
fixed-size byte strings and length-prefixed byte strings, and generates
(like construct's own compiler, and like C{collections.namedtuple}) a decoder
and an encoder that do the same with one C{struct} call per run of fixed
fields.  Nothing is declared twice: the layout comes from the construct
object, and the tests check both directions byte for byte against construct
for every hot message.

Decoders return a named tuple of the fields (attribute access, like a
C{Container}) and raise L{Truncated} or L{Trailing} on a frame of the wrong
length, with the same messages as L{ckv.wire.decode}'s construct path.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from collections.abc import Callable
from typing import Any

from construct import Bytes, FormatField, GreedyBytes, Prefixed, Renamed, Struct


class Truncated(ValueError):
    """A field runs past the end of the frame."""


class Trailing(ValueError):
    """Bytes are left over after the last field."""


class Unsupported(TypeError):
    """The construct declaration uses something this module cannot generate."""


def struct_format(field: FormatField) -> str:
    if field.fmtstr[0] != ">":
        raise Unsupported(f"only big-endian integers are supported, not {field.fmtstr!r}")
    return field.fmtstr[1:]


def array_count_field(array: Any) -> FormatField:
    """The count field of a construct C{PrefixedArray} (a C{FocusedSeq} of a
    rebuilt count and the items)."""
    count = array.subcons[0]
    field = count.subcon.subcon if isinstance(count, Renamed) else None
    if count.name != "count" or not isinstance(field, FormatField):
        raise Unsupported(f"{array!r} is not a PrefixedArray with an integer count")
    return field


def fields_of(declaration: Struct) -> list[tuple[str, str, str]]:
    """
    The layout of C{declaration}: (name, kind, struct format) per field,
    where kind is C{"fixed"} (the format reads the value) or C{"prefixed"}
    (the format reads the length of the bytes that follow).

    @raise Unsupported: a field is not an integer, fixed bytes or
        length-prefixed bytes.
    """
    out = []
    for sub in declaration.subcons:
        if not isinstance(sub, Renamed) or not sub.name:
            raise Unsupported(f"unnamed field {sub!r}")
        if sub.name.startswith("_") or not sub.name.isidentifier():
            # The generated code keeps its own names to those with a "_".
            raise Unsupported(f"field name {sub.name!r} cannot be a Python local name")
        c = sub.subcon
        if isinstance(c, FormatField):
            out.append((sub.name, "fixed", struct_format(c)))
        elif isinstance(c, Bytes) and isinstance(c.length, int):
            out.append((sub.name, "fixed", f"{c.length}s"))
        elif (
            isinstance(c, Prefixed)
            and c.subcon is GreedyBytes
            and isinstance(c.lengthfield, FormatField)
        ):
            out.append((sub.name, "prefixed", struct_format(c.lengthfield)))
        else:
            raise Unsupported(f"field {sub.name!r} ({type(c).__name__}) is not supported")
    return out


def _segments(layout: list[tuple[str, str, str]]) -> list[tuple[str, list[str], str | None]]:
    """
    Group a layout into segments: a struct format reading a run of fixed
    fields plus the length of the prefixed field that ends the run (if any),
    the names of those fixed fields, and the name of that prefixed field.
    """
    segments = []
    fmt, names = "", []
    for name, kind, f in layout:
        fmt += f
        if kind == "fixed":
            names.append(name)
        else:
            segments.append((fmt, names, name))
            fmt, names = "", []
    if fmt:
        segments.append((fmt, names, None))
    return segments


class Codec:
    """
    A generated decoder and encoder for one C{Struct}.

    @ivar record: the named tuple type the decoder returns.
    @ivar read: C{read(data, offset) -> (record, end)}: decode one value
        starting at C{offset}; C{end} may pass C{len(data)} only if the
        data was short (the caller checks, see L{decode}).
    @ivar decode: C{decode(data, offset=0) -> record}: decode a value that
        must end exactly at the end of C{data}.
    @ivar encode: C{encode(*fields) -> bytes}, fields in declaration order.
    @ivar fixed_size: bytes of the value without its prefixed fields' data.
    """

    def __init__(self, name: str, declaration: Struct, prefix: list[tuple[str, int]] = ()) -> None:
        """
        @param prefix: constant leading fields that are checked by the
            caller, not returned (name, value), each an unsigned byte: the
            frame header (version, type) for whole frames.
        """
        layout = [(n, "fixed", "B") for n, _ in prefix] + fields_of(declaration)
        if not layout:
            raise Unsupported("a declaration without fields")
        self.names = [n for n, _, _ in layout[len(prefix) :]]
        self.record = namedtuple(name, self.names)  # type: ignore[misc]  # noqa: PYI024
        self.fixed_size = struct.calcsize(">" + "".join(f for _, _, f in layout))
        segments = _segments(layout)
        skip = {n for n, _ in prefix}
        ns: dict[str, Any] = {
            "_new": tuple.__new__,
            "_R": self.record,
            "Truncated": Truncated,
            "Trailing": Trailing,
            "_error": struct.error,
            "_len": len,
        }
        read_lines = ["def read(_data, _o):", "    try:"]
        enc_lines = [f"def encode({', '.join(self.names)}):", "    return b''.join(("]
        for i, (fmt, names, prefixed) in enumerate(segments):
            s = struct.Struct(">" + fmt)
            ns[f"_S{i}"] = s
            targets = [("_" if n in skip else n) for n in names]
            if prefixed is not None:
                targets.append(f"_n{i}")
            lhs = ", ".join(targets) + ("," if len(targets) == 1 else "")
            read_lines.append(f"        {lhs} = _S{i}.unpack_from(_data, _o)")
            read_lines.append(f"        _o += {s.size}")
            values = [str(dict(prefix)[n]) if n in skip else n for n in names]
            if prefixed is not None:
                read_lines.append(f"        {prefixed} = _data[_o:_o + _n{i}]")
                read_lines.append(f"        _o += _n{i}")
                values.append(f"_len({prefixed})")
                enc_lines.append(f"        _S{i}.pack({', '.join(values)}), {prefixed},")
            else:
                enc_lines.append(f"        _S{i}.pack({', '.join(values)}),")
        fields = ", ".join(self.names) + ("," if len(self.names) == 1 else "")
        read_lines += [
            "    except _error:",
            "        raise Truncated('truncated frame: a field runs past the end of the frame')",
            f"    return _new(_R, ({fields})), _o",
        ]
        enc_lines.append("    ))")
        decode_lines = [
            "def decode(_data, _o=0):",
            "    _v, _end = read(_data, _o)",
            "    _n = _len(_data)",
            "    if _end > _n:",
            "        raise Truncated('truncated frame: a field runs past the end of the frame')",
            "    if _end < _n:",
            "        raise Trailing(f'{_n - _end} unexpected bytes after the payload')",
            "    return _v",
        ]
        source = "\n".join(read_lines + enc_lines + decode_lines) + "\n"
        exec(compile(source, f"<ckv.fastcodec {name}>", "exec"), ns)
        self.source = source
        self.read: Callable[[bytes, int], tuple[Any, int]] = ns["read"]
        self.decode: Callable[..., Any] = ns["decode"]
        self.encode: Callable[..., bytes] = ns["encode"]
