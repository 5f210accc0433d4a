"""Transaction pooling: what a client session needs reproduced on whichever node connection serves it.

With ``[server] pool_mode = "transaction"`` a session holds a metadata-node connection only
while it is inside a transaction (or an unfinished extended-protocol batch); between
transactions the connection serves other clients. Two kinds of session state must follow the
client from connection to connection:

* **settings** — start-up parameters, ``SET``/``RESET`` sent as simple queries, and parameters the
  node reports (``ParameterStatus``: DateStyle, TimeZone, application_name, ...). Each node
  connection remembers what was applied to it (``applied_settings``, shared with
  ``executor.distributed.apply_settings``); attaching applies only the difference.
* **prepared statements** — a client's named statement is prepared on a connection under a name
  derived from its text and parameter types (``backend_name``), so two clients preparing the same
  text share it and a client's ``S1`` never meets another client's ``S1``. A connection that lacks
  it gets a Parse injected before the client's Bind/Describe, whose answer the client never sees.

State the proxy cannot follow pins the session to its connection for good (session pooling for
that client): LISTEN, SQL-level PREPARE, DECLARE ... WITH HOLD, temporary tables, session
advisory locks, ``set_config()`` calls, and SET sent through the extended protocol. This is the
same line PgBouncer draws, except that those sessions keep working instead of misbehaving.
"""

from __future__ import annotations

import hashlib
import re

from pglast import ast, parse_sql
from pglast.enums import VariableSetKind

from rewriter.quoting import quote_ident, quote_literal

# Parameters the node reports with ParameterStatus that a client may change.
REPORTED_SETTINGS = frozenset(
    {"application_name", "datestyle", "timezone", "intervalstyle", "client_encoding", "standard_conforming_strings"}
)

# Statements whose effect outlives the transaction in ways the proxy does not reproduce.
PINNING = re.compile(
    rb"(?i)\b(?:listen|prepare|hold|temp|temporary|pg_advisory_lock|pg_advisory_lock_shared|set_config|load)\b"
)
DROPS_STATEMENTS = re.compile(rb"(?i)\b(?:deallocate|discard)\b")
SET_WORDS = re.compile(rb"(?i)\s*(?:set|reset)\b")  # used with .match(data, pos)


def backend_name(sql: bytes, rest: bytes) -> str:
    """The connection-side name of a prepared statement: the same for the same text and types."""
    return "orochi_s" + hashlib.blake2b(sql + b"\x00" + rest, digest_size=10).hexdigest()


def parse_set(sql: str) -> list[tuple[str, str | None]] | None:
    """``SET name = value`` / ``RESET name`` / ``RESET ALL`` as (name, value or None for reset).

    ``("*", None)`` is RESET ALL. None: not a plain session SET (LOCAL, an expression, several
    statements mixed with others ...): the caller pins the session instead of guessing.
    """
    try:
        stmts = parse_sql(sql)
    except Exception:  # noqa: BLE001 - the node reports the syntax error
        return None
    out: list[tuple[str, str | None]] = []
    for raw in stmts:
        st = raw.stmt
        if not isinstance(st, ast.VariableSetStmt) or st.is_local:
            return None
        kind = st.kind
        if kind == VariableSetKind.VAR_RESET_ALL:
            out.append(("*", None))
            continue
        name = (st.name or "").lower()
        if kind in (VariableSetKind.VAR_RESET, VariableSetKind.VAR_SET_DEFAULT):
            out.append((name, None))
            continue
        if kind != VariableSetKind.VAR_SET_VALUE or not name or name.startswith("transaction") or name == "session_authorization":
            return None
        values = []
        for arg in st.args or ():
            if not isinstance(arg, ast.A_Const) or arg.isnull:
                return None
            v = arg.val
            if isinstance(v, ast.String):
                values.append(quote_ident(v.sval) if name == "search_path" else v.sval)
            elif isinstance(v, ast.Integer):
                values.append(str(v.ival))
            elif isinstance(v, ast.Float):
                values.append(v.fval)
            elif isinstance(v, ast.Boolean):
                values.append("on" if v.boolval else "off")
            else:
                return None
        if name == "timezone" and len(values) != 1:
            return None
        out.append((name, ", ".join(values)))
    return out


def settings_sql(applied: dict[str, str], wanted: dict[str, str]) -> tuple[str, dict[str, str]]:
    """SQL that turns a connection's ``applied`` settings into ``wanted``; the new applied map."""
    parts: list[str] = []
    applied_lower = {k.lower(): k for k in applied}
    for low, original in applied_lower.items():
        if low not in wanted:
            parts.append(f"RESET {quote_ident(original)}")
    for name, value in wanted.items():
        if applied.get(name) != value or applied_lower.get(name, name) != name:
            parts.append(f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)")
    return "; ".join(parts), dict(wanted)
