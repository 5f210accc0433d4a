"""Normalize literal SQL so one plan serves every statement that differs only in its constants.

psql and many applications send ``SELECT ... WHERE id = 42`` as simple-protocol text; a plan cache
keyed by the exact text misses on every new key and pays the full pglast parse + plan + deparse
(hundreds of µs to ms). Here the C scanner (``pglast.parser.scan``, ~20 µs) finds the constants;
the *shape* of the statement (its text with each constant replaced by ``$n``) keys the cache, and
the planner plans the shape once, with parameters where the constants were.

Nothing executed ever contains those parameters: the original literal texts are substituted back
into the SQL sent to the nodes (:func:`substitute`), so PostgreSQL sees exactly the client's
constants with their own typing. The shape key records each constant's kind (integer that fits
int4, bigger integer, decimal, string), because a constant in the select list types its column.
Statements whose constants sit where a parameter would change the meaning (``GROUP BY 1``,
``ORDER BY 2``, ``DISTINCT ON (1)``) are not normalized (:func:`shape_is_safe`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pglast import ast
from pglast.parser import scan

_CONST_TOKENS = {"ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST"}
# Tokens after which a '-' is binary subtraction, not the sign of the next number.
_VALUE_END = {"IDENT", "ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST", "ASCII_41", "ASCII_93", "PARAM", "NULL_P", "TRUE_P", "FALSE_P"}


@dataclass(frozen=True, slots=True)
class Literal:
    text: str  # as written (quotes, sign and escapes kept)
    value: str | None  # its value as text, when simple to know (None: unknown)


@dataclass(frozen=True, slots=True)
class Normalized:
    shape: str  # the SQL with constants replaced by $1..$n (parseable)
    key: str  # shape plus constant kinds: the plan-cache key
    literals: tuple[Literal, ...]


def _kind(name: str, text: str) -> str:
    if name == "ICONST":
        digits = text.lstrip("-")
        try:
            return "i4" if -(2**31) <= int(text) < 2**31 else "i8"
        except ValueError:
            return "i" + str(len(digits))
    if name == "FCONST":
        return "n"
    return "s" + name[0]


def _string_value(text: str) -> str | None:
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'":
        return text[1:-1].replace("''", "'")
    return None  # E'..', $$..$$, U&'..', B'..', X'..': leave to the nodes


def normalize(sql: str) -> Normalized | None:
    """Shape and literals of ``sql``; None when it already has parameters or cannot be scanned."""
    try:
        tokens = scan(sql)
    except Exception:  # noqa: BLE001 - the scanner's errors: let the normal path report them
        return None
    out: list[str] = []
    kinds: list[str] = []
    literals: list[Literal] = []
    seen: dict[str, int] = {}

    def number(text: str, value: str | None, kind: str) -> int:
        # The same literal text gets the same $n: the planner matches expressions structurally
        # (GROUP BY/DISTINCT ON/ORDER BY items against the select list), and ``user_id % 7``
        # written twice must stay one expression in the shape. Equal texts in one statement are
        # equal in every statement of that shape, so the match holds for all of them.
        k = seen.get(text)
        if k is None:
            literals.append(Literal(text, value))
            kinds.append(kind)
            k = seen[text] = len(literals)
        return k

    pos = 0
    prev_name = ""
    i = 0
    n = len(tokens)
    while i < n:
        tok = tokens[i]
        if tok.name == "PARAM":
            return None
        start = tok.start
        name = tok.name
        if (
            name == "ASCII_45"
            and i + 1 < n
            and tokens[i + 1].name in ("ICONST", "FCONST")
            and tokens[i + 1].start == tok.end + 1
            and prev_name not in _VALUE_END
        ):
            num = tokens[i + 1]
            text = sql[start : num.end + 1]
            out.append(sql[pos:start])
            out.append(f"${number(text, text, _kind(num.name, text))}")
            pos = num.end + 1
            prev_name = num.name
            i += 2
            continue
        if name in _CONST_TOKENS:
            text = sql[start : tok.end + 1]
            out.append(sql[pos:start])
            value = text if name in ("ICONST", "FCONST") else (_string_value(text) if name == "SCONST" else None)
            out.append(f"${number(text, value, _kind(name, text))}")
            pos = tok.end + 1
        prev_name = name
        i += 1
    if not literals:
        return None
    out.append(sql[pos:])
    shape = "".join(out)
    return Normalized(shape, shape + "\x00" + ",".join(kinds), tuple(literals))


_PARAM_RE = re.compile(r"(?<![A-Za-z0-9_$\"])\$(\d+)(?![0-9])")


def substitute(sql: str, literals: tuple[Literal, ...], shift: int = 0) -> str:
    """Put the literal texts back where the plan has ``$n`` (``$(n + shift)`` after renumbering)."""

    def rep(m: re.Match[str]) -> str:
        k = int(m.group(1)) - shift
        if 1 <= k <= len(literals):
            return literals[k - 1].text
        return m.group(0)

    return _PARAM_RE.sub(rep, sql)


def shape_is_safe(stmt: ast.Node) -> bool:
    """False when a parameter stands where a constant means a position or changes grouping."""

    def positional(items) -> bool:
        for it in items or ():
            node = it.node if isinstance(it, ast.SortBy) else it
            if isinstance(node, ast.ParamRef):
                return True
        return False

    stack: list[object] = [stmt]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.SelectStmt):
            if positional(n.groupClause) or positional(n.sortClause):
                return False
            if n.distinctClause and positional([d for d in n.distinctClause if d is not None]):
                return False
        if isinstance(n, ast.Node):
            for name in n:
                stack.append(getattr(n, name))
        elif isinstance(n, tuple | list):
            stack.extend(n)
    return True
