"""PostgreSQL v3 wire protocol: framing, message builders and the few parsers the proxy needs.

The data path relays bytes; it decodes only what routing needs (message type, statement names,
the query text, bound parameters of a routed statement). Builders return ``bytes`` so callers can
coalesce several messages into one ``transport.write``.
Reference: https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Special request codes sent in place of a protocol version in the first packet.
PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

MAX_STARTUP_PACKET = 10_000  # same limit as PostgreSQL's MAX_STARTUP_PACKET_LENGTH

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!ci")

# Transaction status bytes carried by ReadyForQuery.
TX_IDLE, TX_BLOCK, TX_FAILED = b"I", b"T", b"E"

# Frontend message types that the proxy understands after start-up.
FRONTEND_TYPES = frozenset(b"QPBDEHSCXdcfF")


from rewriter.errors import PgError, parse_error_fields  # noqa: E402,F401  (re-exported)


class ProtocolViolation(Exception):
    """A client sent something that is not valid protocol; SQLSTATE 08P01 and close."""

    sqlstate = "08P01"


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def message(mtype: bytes, payload: bytes = b"") -> bytes:
    return _HDR.pack(mtype, len(payload) + 4) + payload


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


def error_response_fields(fields: dict[str, str], mtype: bytes = b"E") -> bytes:
    body = b"".join(k.encode() + cstr(v) for k, v in fields.items()) + b"\x00"
    return message(mtype, body)


def error_response(
    sqlstate: str,
    msg: str,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    mtype: bytes = b"E",
) -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": msg}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return error_response_fields(fields, mtype)


def notice_response(msg: str, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    return error_response(sqlstate, msg, severity, mtype=b"N")


def ready_for_query(status: bytes = TX_IDLE) -> bytes:
    return b"Z\x00\x00\x00\x05" + status


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return message(b"K", struct.pack("!ii", pid, secret))


def auth_ok() -> bytes:
    return message(b"R", _I32.pack(0))


def auth_sasl(mechanisms: tuple[str, ...]) -> bytes:
    return message(b"R", _I32.pack(10) + b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _I32.pack(11) + data)


def auth_sasl_final(data: bytes) -> bytes:
    return message(b"R", _I32.pack(12) + data)


PARSE_COMPLETE = b"1\x00\x00\x00\x04"
BIND_COMPLETE = b"2\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
NO_DATA = b"n\x00\x00\x00\x04"
EMPTY_QUERY_RESPONSE = b"I\x00\x00\x00\x04"
PORTAL_SUSPENDED = b"s\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


def parameter_description(oids: list[int]) -> bytes:
    return message(b"t", _I16.pack(len(oids)) + b"".join(_I32.pack(o) for o in oids))


@dataclass(slots=True, frozen=True)
class Field:
    """A RowDescription column. Defaults describe a text column not taken from a table."""

    name: str
    type_oid: int = 25
    type_size: int = -1
    type_mod: int = -1
    format: int = 0
    table_oid: int = 0
    column: int = 0


def row_description(fields: list[Field]) -> bytes:
    parts = [_I16.pack(len(fields))]
    for f in fields:
        parts.append(cstr(f.name))
        parts.append(
            struct.pack("!ihihih", f.table_oid, f.column, f.type_oid, f.type_size, f.type_mod, f.format)
        )
    return message(b"T", b"".join(parts))


def data_row(values: list[bytes | None]) -> bytes:
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(v)))
            parts.append(v)
    return message(b"D", b"".join(parts))


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST, pid, secret)


def parse_message(name: str, sql: str, param_oids: list[int] | tuple[int, ...] = ()) -> bytes:
    return message(
        b"P",
        cstr(name) + cstr(sql) + _I16.pack(len(param_oids)) + b"".join(_I32.pack(o) for o in param_oids),
    )


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def read_cstr(buf: bytes | memoryview, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string at ``pos``; return it and the position after the NUL."""
    if isinstance(buf, memoryview):
        buf = buf.tobytes()
    end = buf.find(b"\x00", pos)
    if end < 0:
        raise ProtocolViolation("invalid string in message: missing terminator")
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid byte sequence for encoding \"UTF8\" in message") from None


def parse_startup_params(payload: bytes) -> dict[str, str]:
    """Parse the key/value pairs of a StartupMessage body (after the protocol version)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0:
            if pos != len(payload) - 1:
                raise ProtocolViolation("invalid startup packet layout: data after final terminator")
            return params
        key, pos = read_cstr(payload, pos)
        value, pos = read_cstr(payload, pos)
        params[key] = value
    raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")


@dataclass(slots=True)
class ParseMsg:
    name: str
    sql: str
    param_oids: list[int]


def decode_parse(payload: bytes | memoryview) -> ParseMsg:
    data = bytes(payload)
    name, pos = read_cstr(data, 0)
    sql, pos = read_cstr(data, pos)
    if pos + 2 > len(data):
        raise ProtocolViolation("invalid Parse message: missing parameter count")
    (n,) = _I16.unpack_from(data, pos)
    pos += 2
    if n < 0 or pos + 4 * n != len(data):
        raise ProtocolViolation("invalid Parse message: bad parameter type list")
    oids = list(struct.unpack_from(f"!{n}I", data, pos)) if n else []
    return ParseMsg(name, sql, oids)


@dataclass(slots=True)
class BindMsg:
    portal: str
    statement: str
    param_formats: list[int]
    params: list[bytes | None]
    result_formats: list[int]

    def param_format(self, i: int) -> int:
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[i]

    def result_format(self, i: int) -> int:
        if not self.result_formats:
            return 0
        if len(self.result_formats) == 1:
            return self.result_formats[0]
        return self.result_formats[i] if i < len(self.result_formats) else 0


def decode_bind(payload: bytes | memoryview) -> BindMsg:
    data = bytes(payload)
    try:
        portal, pos = read_cstr(data, 0)
        stmt, pos = read_cstr(data, pos)
        (nf,) = _I16.unpack_from(data, pos)
        pos += 2
        pf = list(struct.unpack_from(f"!{nf}h", data, pos)) if nf > 0 else []
        pos += 2 * max(nf, 0)
        (np_,) = _I16.unpack_from(data, pos)
        pos += 2
        params: list[bytes | None] = []
        for _ in range(max(np_, 0)):
            (ln,) = _I32.unpack_from(data, pos)
            pos += 4
            if ln == -1:
                params.append(None)
            else:
                if ln < 0 or pos + ln > len(data):
                    raise ProtocolViolation("invalid Bind message: bad parameter length")
                params.append(data[pos : pos + ln])
                pos += ln
        (nr,) = _I16.unpack_from(data, pos)
        pos += 2
        rf = list(struct.unpack_from(f"!{nr}h", data, pos)) if nr > 0 else []
        pos += 2 * max(nr, 0)
    except struct.error:
        raise ProtocolViolation("invalid Bind message: truncated") from None
    if nf < 0 or np_ < 0 or nr < 0 or pos != len(data):
        raise ProtocolViolation("invalid Bind message: bad counts or trailing data")
    if nf > 1 and nf != np_:
        raise ProtocolViolation(f"bind message has {nf} parameter formats but {np_} parameters")
    return BindMsg(portal, stmt, pf, params, rf)


def encode_bind(b: BindMsg) -> bytes:
    parts = [cstr(b.portal), cstr(b.statement), _I16.pack(len(b.param_formats))]
    parts += [_I16.pack(f) for f in b.param_formats]
    parts.append(_I16.pack(len(b.params)))
    for p in b.params:
        if p is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(p)))
            parts.append(p)
    parts.append(_I16.pack(len(b.result_formats)))
    parts += [_I16.pack(f) for f in b.result_formats]
    return message(b"B", b"".join(parts))


def decode_target(payload: bytes | memoryview, what: str) -> tuple[str, str]:
    """Describe/Close: a kind byte ('S' statement or 'P' portal) and a name."""
    data = bytes(payload)
    if not data or data[0] not in (ord("S"), ord("P")):
        raise ProtocolViolation(f"invalid {what} message subtype")
    name, pos = read_cstr(data, 1)
    if pos != len(data):
        raise ProtocolViolation(f"invalid {what} message: trailing data")
    return chr(data[0]), name


def decode_execute(payload: bytes | memoryview) -> tuple[str, int]:
    data = bytes(payload)
    portal, pos = read_cstr(data, 0)
    if pos + 4 != len(data):
        raise ProtocolViolation("invalid Execute message: bad length")
    (max_rows,) = _I32.unpack_from(data, pos)
    return portal, max_rows


def decode_query(payload: bytes | memoryview) -> str:
    data = bytes(payload)
    sql, pos = read_cstr(data, 0)
    if pos != len(data):
        raise ProtocolViolation("invalid Query message: trailing data")
    return sql


def decode_row_description(payload: bytes | memoryview) -> list[Field]:
    data = bytes(payload)
    (n,) = _I16.unpack_from(data, 0)
    pos = 2
    out = []
    for _ in range(n):
        name, pos = read_cstr(data, pos)
        table_oid, column, type_oid, size, mod, fmt = struct.unpack_from("!ihihih", data, pos)
        pos += 18
        out.append(Field(name, type_oid, size, mod, fmt, table_oid, column))
    return out


def decode_data_row(payload: bytes | memoryview) -> list[bytes | None]:
    data = bytes(payload)
    (n,) = _I16.unpack_from(data, 0)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        (ln,) = _I32.unpack_from(data, pos)
        pos += 4
        if ln == -1:
            out.append(None)
        else:
            out.append(data[pos : pos + ln])
            pos += ln
    return out


class FrameReader:
    """Incremental splitter of typed messages (1-byte type + int32 length including itself).

    ``feed`` returns ``(buffer, frames)`` where ``buffer`` holds only complete messages and
    ``frames`` lists ``(type, start, end)`` offsets of each whole message in it — so a caller can
    relay ``buffer`` unchanged with one write when nothing needs rewriting. A partial trailing
    message stays inside for the next call. Oversized or negative lengths raise
    ProtocolViolation before any byte of the message is buffered beyond its header.
    """

    __slots__ = ("_pending", "max_size")

    def __init__(self, max_size: int = 64 * 1024 * 1024) -> None:
        self._pending = b""
        self.max_size = max_size

    def feed(self, data: bytes) -> tuple[bytes, list[tuple[int, int, int]]]:
        if not self._pending and len(data) >= 5:
            # Fast path: exactly one whole message (a point query, a Sync-terminated batch reply
            # rarely, but a client's Query almost always).
            (ln,) = _I32.unpack_from(data, 1)
            if ln + 1 == len(data) and 4 <= ln <= self.max_size:
                return data, [(data[0], 0, len(data))]
        buf = self._pending + data if self._pending else data
        frames: list[tuple[int, int, int]] = []
        pos = 0
        n = len(buf)
        unpack = _I32.unpack_from
        while n - pos >= 5:
            (ln,) = unpack(buf, pos + 1)
            if ln < 4 or ln > self.max_size:
                raise ProtocolViolation(f"invalid message length {ln} for message type {buf[pos]!r}")
            end = pos + 1 + ln
            if end > n:
                break
            frames.append((buf[pos], pos, end))
            pos = end
        if pos == n:
            self._pending = b""
            return buf, frames
        self._pending = buf[pos:]
        return buf[:pos], frames

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)


def iter_messages(data: bytes):
    """(type, payload) of each whole message in ``data`` (output the proxy produced itself)."""
    pos = 0
    n = len(data)
    while pos + 5 <= n:
        (ln,) = _I32.unpack_from(data, pos + 1)
        yield data[pos], data[pos + 5 : pos + 1 + ln]
        pos += 1 + ln
