"""COPY between the proxy and nodes, and the text COPY format's field rules.

Used to move rows into shards (create_distributed_table of a table that has rows), back out of
them (undistribute_table), and to split ``COPY t FROM STDIN`` by shard. Text format rows are
split on tab and newline, which never occur raw inside a field (they are escaped as ``\\t`` and
``\\n``), so routing a row needs no full parse: only the distribution column's field is
unescaped.
"""

from __future__ import annotations

import re

from executor import protocol as pg
from executor.backend import BackendConnection
from executor.protocol import PgError
from executor.tasks import run_on

_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)")


def unescape_text_field(field: str) -> str | None:
    """The value of one field of COPY's text format (``\\N`` is NULL)."""
    if field == "\\N":
        return None
    if "\\" not in field:
        return field

    def rep(m: re.Match[str]) -> str:
        s = m.group(1)
        if s[0] == "x" and len(s) > 1:
            return chr(int(s[1:], 16))
        if s[0] in "01234567":
            return chr(int(s, 8))
        return _ESCAPES.get(s, s)

    return _ESCAPE_RE.sub(rep, field)


def text_field(line: bytes, index: int) -> str | None:
    """Field ``index`` of one text-format row (without its newline)."""
    parts = line.split(b"\t")
    if index >= len(parts):
        raise PgError("22P04", f"missing data for column {index + 1}")
    return unescape_text_field(parts[index].decode())


async def copy_out(conn: BackendConnection, sql: str) -> list[bytes]:
    """Run ``COPY ... TO STDOUT`` and return the CopyData payloads (one row each in text format)."""
    msgs = await conn.exchange(pg.query(sql))
    rows: list[bytes] = []
    for t, p in msgs:
        if t == ord("d"):
            rows.append(p)
        elif t == ord("E"):
            raise PgError.from_payload(p)
    return rows


async def copy_in(conn: BackendConnection, sql: str, rows: list[bytes], *, batch_bytes: int = 1 << 20) -> int:
    """Run ``COPY ... FROM STDIN`` feeding ``rows`` (each a complete text-format line)."""
    msgs = await conn.exchange(pg.query(sql), until=(ord("G"), ord("E")))
    for t, p in msgs:
        if t == ord("E"):
            # ReadyForQuery may follow in the same batch, past what ``exchange`` returned:
            # the conversation state is unknown, so this connection is not reused.
            conn.broken = True
            raise PgError.from_payload(p)
    chunk: list[bytes] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += len(row)
        if size >= batch_bytes:
            conn.write(pg.message(b"d", b"".join(chunk)))
            chunk, size = [], 0
    if chunk:
        conn.write(pg.message(b"d", b"".join(chunk)))
    res = await run_on(conn, pg.message(b"c"))
    if res.error is not None:
        raise res.error
    tag = res.tags[-1] if res.tags else "COPY 0"
    return int(tag.split()[-1])
