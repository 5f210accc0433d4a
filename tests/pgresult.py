"""One statement's answer as the differential tests compare it (``Result``, ``run_text``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass
class Result:
    """One statement's answer: column type OIDs, rows (text or Python values), command tag."""

    oids: list[int]
    rows: list[tuple[Any, ...]]
    tag: str


def run_text(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None = None) -> Result:
    """Run with text results and keep every value exactly as PostgreSQL printed it."""
    with conn.cursor() as cur:
        cur.execute(sql, params)  # type: ignore[arg-type]
        res = cur.pgresult
        assert res is not None
        oids = [res.ftype(j) for j in range(res.nfields)]
        rows = []
        for i in range(res.ntuples):
            row = []
            for j in range(res.nfields):
                v = res.get_value(i, j)
                row.append(None if v is None else v.decode())
            rows.append(tuple(row))
        return Result(oids, rows, cur.statusmessage or "")
