"""Run one statement on one node connection and stream its answer to a sink.

A ``TaskRun`` is the consumer of a backend connection while the statement runs: it frames the
node's answer, hands DataRow messages to the sink as raw bytes (relay) or decoded text (collect,
for the combine step), remembers the CommandComplete tag and the first error, and resolves when
ReadyForQuery arrives. Flow control: when the client cannot take more, the sink pauses the node
connection's reading, so a large scan never piles up in the proxy's memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from executor import protocol as pg
from executor.backend import BackendConnection, node_unavailable
from executor.protocol import PgError

_D, _C, _E, _Z, _T, _S, _N, _A = (ord(c) for c in "DCEZTSNA")
_COPY_OUT, _COPY_DATA, _COPY_DONE = ord("H"), ord("d"), ord("c")


@dataclass
class TaskResult:
    tags: list[str] = field(default_factory=list)  # CommandComplete tags, in order
    error: PgError | None = None
    row_description: bytes | None = None  # the raw 'T' message, when one came
    rows: list[list[bytes | None]] | None = None  # collect mode
    tx_status: bytes = b"I"
    notices: list[bytes] = field(default_factory=list)


RowSink = Callable[[bytes, list[tuple[int, int, int]]], None]


class TaskRun:
    """Consumer for one request/response cycle (up to ReadyForQuery) on a backend connection."""

    def __init__(
        self, conn: BackendConnection, *, sink: RowSink | None, collect: bool, sink_types: tuple[int, ...] = (_D,)
    ) -> None:
        self.conn = conn
        self.sink = sink
        self.collect = collect
        self.sink_types = frozenset(sink_types)
        self.after_sink: Callable[[BackendConnection], None] | None = None
        self.result = TaskResult(rows=[] if collect else None)
        self.done: asyncio.Future[TaskResult] = asyncio.get_running_loop().create_future()

    def on_backend_messages(self, conn: BackendConnection, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        rows: list[tuple[int, int, int]] | None = None
        res = self.result
        for frame in frames:
            t, s, e = frame
            if t in self.sink_types:
                if self.collect:
                    res.rows.append(pg.decode_data_row(buf[s + 5 : e]))  # type: ignore[union-attr]
                elif self.sink is not None:
                    if rows is None:
                        rows = []
                    rows.append(frame)
            elif t == _C:
                res.tags.append(pg.read_cstr(buf[s + 5 : e], 0)[0])
            elif t == _E:
                if res.error is None:
                    res.error = PgError.from_payload(buf[s + 5 : e])
            elif t == _T:
                res.row_description = buf[s:e]
            elif t == _N:
                res.notices.append(buf[s:e])
            elif t == _Z:
                res.tx_status = buf[s + 5 : s + 6]
                conn.tx_status = res.tx_status
                if rows:
                    self.sink(buf, rows)  # type: ignore[misc]
                    rows = None
                conn.consumer = None
                if not self.done.done():
                    self.done.set_result(res)
                return
        if rows:
            self.sink(buf, rows)  # type: ignore[misc]
            if self.after_sink is not None:
                self.after_sink(conn)

    def on_backend_lost(self, conn: BackendConnection, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(node_unavailable(conn.node_name, "connection lost while running a statement"))


async def run_on(
    conn: BackendConnection,
    messages: bytes,
    *,
    sink: RowSink | None = None,
    collect: bool = False,
    sink_types: tuple[int, ...] = (_D,),
    throttle: Callable[[BackendConnection], None] | None = None,
) -> TaskResult:
    """Send ``messages`` (ending in Sync or a simple Query) and consume the answer up to ReadyForQuery.

    Messages of ``sink_types`` (DataRow by default; CopyData for COPY TO) go to ``sink``.
    """
    run = TaskRun(conn, sink=sink, collect=collect, sink_types=sink_types)
    run.after_sink = throttle
    conn.consumer = run
    try:
        conn.write(messages)
        return await run.done
    except asyncio.CancelledError:
        # The statement may still run on the node: cancel it there, and never reuse the
        # connection (its protocol state is unknown).
        conn.broken = True
        asyncio.get_running_loop().create_task(conn.cancel())
        raise
    finally:
        if conn.consumer is run:
            conn.consumer = None


def extended_query(
    sql: str,
    params: list[bytes | None] | tuple = (),
    *,
    param_oids: list[int] | tuple = (),
    param_formats: list[int] | tuple = (),
    result_formats: list[int] | tuple = (),
    describe: bool = False,
    sync: bool = True,
) -> bytes:
    """Parse/Bind/[Describe]/Execute(/Sync) of an unnamed statement as one byte string."""
    bind = pg.BindMsg("", "", list(param_formats), list(params), list(result_formats))
    parts = [pg.parse_message("", sql, list(param_oids)), pg.encode_bind(bind)]
    if describe:
        parts.append(pg.message(b"D", b"P\x00"))
    parts.append(pg.message(b"E", b"\x00" + b"\x00\x00\x00\x00"))
    if sync:
        parts.append(pg.SYNC)
    return b"".join(parts)
