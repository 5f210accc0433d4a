"""Which statements the proxy must look at, and what to do with them (pure; no I/O).

Most statements go to the metadata node untouched, so the first question must be nearly free:
``Interceptor.may_intercept`` runs one compiled regular expression over the raw message bytes,
looking for any name the proxy cares about (admin functions, admin views; later distributed
tables). No match means no parse at all. A match only means "parse and look": the pglast
analysis then decides per statement:

* ``AdminCall``  — ``SELECT fn(args)`` / ``SELECT * FROM fn(args)`` of an admin function with
  constant or ``$n`` arguments (positional or named): the proxy runs it.
* ``Passthrough`` — anything else; references to admin views (``citus_nodes``) that are not
  schema-qualified are qualified with the catalog schema, and the statement is re-deparsed.
* An admin function used any other way (inside an expression, a WHERE, a CTE) gets ``0A000``.

Text that pglast cannot parse passes through unchanged so the node reports the syntax error
exactly as PostgreSQL words it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor

from rewriter.errors import PgError


@dataclass(frozen=True, slots=True)
class Passthrough:
    sql: str


@dataclass(frozen=True, slots=True)
class Distributed:
    """A statement that mentions a distributed or reference table: planned by the proxy."""

    stmt: object  # the pglast statement node
    sql: str


@dataclass(frozen=True, slots=True)
class TxControl:
    """A transaction-control statement, which the proxy must also apply to a distributed
    transaction's node connections (``orochi_proxy.txcoordinator``)."""

    kind: str  # begin | commit | rollback | savepoint | release | rollback_to | prepare | set_local
    sql: str
    savepoint: str | None = None
    chain: bool = False  # COMMIT/ROLLBACK AND CHAIN


_TX_KINDS = {0: "begin", 1: "begin", 2: "commit", 3: "rollback", 4: "savepoint", 5: "release", 6: "rollback_to", 7: "prepare"}

# Cheap pre-check on raw bytes: only texts with one of these words can be transaction control.
TX_WORDS = re.compile(rb"(?i)\b(?:begin|start|commit|end|rollback|abort|savepoint|release|prepare|local)\b")


def tx_control_of(stmt: ast.Node, text: str) -> TxControl | None:
    if isinstance(stmt, ast.TransactionStmt):
        kind = _TX_KINDS.get(int(stmt.kind))
        if kind is None:
            return None  # COMMIT/ROLLBACK PREPARED: ordinary statements for the node
        return TxControl(kind, text, stmt.savepoint_name, bool(stmt.chain))
    if isinstance(stmt, ast.VariableSetStmt) and stmt.is_local:
        return TxControl("set_local", text)
    return None


def classify_tx_control(sql: str) -> TxControl | None:
    """The transaction control of a one-statement text (a Parse), or None."""
    try:
        stmts = parse_sql(sql)
    except ParseError:
        return None
    if len(stmts) != 1:
        return None
    return tx_control_of(stmts[0].stmt, sql)


@dataclass(frozen=True, slots=True)
class Const:
    """A literal argument, as PostgreSQL's text representation (None for NULL)."""

    value: str | None


@dataclass(frozen=True, slots=True)
class Param:
    number: int  # 1-based, as in $1


@dataclass(frozen=True, slots=True)
class DimensionArg:
    """TimescaleDB's ``by_range(column [, interval])`` / ``by_hash(column, partitions)`` argument.

    ``by_range``: ``setting`` is the partition interval's text (None: the default);
    ``by_hash``: the number of partitions.
    """

    kind: str  # "range" | "hash"
    column: str
    setting: str | None


Arg = Const | Param | DimensionArg
_DIMENSION_BUILDERS = {"by_range": "range", "by_hash": "hash"}


@dataclass(frozen=True, slots=True)
class AdminCall:
    function: str
    args: tuple[Arg, ...]
    named: tuple[tuple[str, Arg], ...]
    column: str  # output column name (alias or the function's name)
    expand: bool  # SELECT * FROM fn(...): columns of the result type instead of one column

    @property
    def max_param(self) -> int:
        nums = [a.number for a in self.args if isinstance(a, Param)]
        nums += [a.number for _, a in self.named if isinstance(a, Param)]
        return max(nums, default=0)


class _Finder(Visitor):
    """Collects admin function calls and unqualified admin-view references in one walk."""

    def __init__(self, functions: frozenset[str], views: frozenset[str]) -> None:
        super().__init__()
        self.functions = functions
        self.views = views
        self.calls: list[ast.FuncCall] = []
        self.view_refs: list[ast.RangeVar] = []
        self.cte_names: set[str] = set()

    def visit_FuncCall(self, ancestors, node: ast.FuncCall) -> None:  # noqa: N802 - pglast API
        name = node.funcname[-1].sval
        if name in self.functions and (len(node.funcname) == 1 or node.funcname[0].sval == "pg_catalog"):
            self.calls.append(node)

    def visit_RangeVar(self, ancestors, node: ast.RangeVar) -> None:  # noqa: N802
        if node.schemaname is None and node.relname in self.views:
            self.view_refs.append(node)

    def visit_CommonTableExpr(self, ancestors, node: ast.CommonTableExpr) -> None:  # noqa: N802
        self.cte_names.add(node.ctename)


class Interceptor:
    def __init__(
        self,
        functions: Iterable[str],
        views: Iterable[str],
        view_schema: str,
        tables: Iterable[str] = (),
        is_catalog_table=None,
    ) -> None:
        self.functions = frozenset(f.lower() for f in functions)
        self.views = frozenset(v.lower() for v in views)
        self.view_schema = view_schema
        self.tables = frozenset(tables)
        # Decides whether a parsed statement mentions a catalog table (set by the server).
        self.is_catalog_table = is_catalog_table
        # Shapes (``rewriter.literals.Normalized.key``) of Query texts that ``analyze`` found to
        # be one distributed statement. Every text of such a shape is one too: the verdict
        # depends on names and structure, never on constants. Kept by the caller (the session's
        # simple-Query path), which then skips the parse; this object is rebuilt on each
        # catalog change, and the set with it.
        self.distributed_shapes: set[str] = set()
        names = sorted(self.functions | self.views | {t.lower() for t in self.tables}, key=len, reverse=True)
        # One pass over the bytes. A Unicode-escaped identifier (U&"...") could spell a name
        # the word match cannot see, so it always counts as a match.
        self._pattern = re.compile(
            rb"(?<![A-Za-z0-9_$])(?:"
            + b"|".join(re.escape(n.encode()) for n in names)
            + rb")(?![A-Za-z0-9_$])|U&\""
            # DROP INDEX / ALTER INDEX name only the index: the proxy must look at them too.
            + rb"|\b(?:drop|alter)\s+index\b",
            re.IGNORECASE,
        ) if names else None

    def may_intercept(self, data: bytes) -> bool:
        """Cheap and conservative: False means no statement in ``data`` can need the proxy."""
        if self._pattern is None:
            return False
        return self._pattern.search(data) is not None

    def analyze(self, sql: str, *, tx_control: bool = False) -> list[Passthrough | AdminCall | Distributed | TxControl]:
        """Per statement what to do; with ``tx_control``, transaction control is reported too."""
        try:
            raw_stmts = parse_sql(sql)
        except ParseError:
            return [Passthrough(sql)]
        out: list[Passthrough | AdminCall | Distributed | TxControl] = []
        for raw in raw_stmts:
            start = raw.stmt_location or 0
            text = sql[start : start + raw.stmt_len] if raw.stmt_len else sql[start:]
            tc = tx_control_of(raw.stmt, text) if tx_control else None
            out.append(tc if tc is not None else self._analyze_one(raw, text))
        return out

    def contains_tx_control(self, sql: str) -> bool:
        try:
            return any(tx_control_of(r.stmt, "") is not None for r in parse_sql(sql))
        except ParseError:
            return False

    def _analyze_one(self, raw: ast.RawStmt, text: str) -> Passthrough | AdminCall | Distributed:
        finder = _Finder(self.functions, self.views)
        finder(raw)
        if finder.calls:
            return _admin_call(raw.stmt, finder.calls)
        if self.tables and self.is_catalog_table is not None and _mentions(raw.stmt, self.is_catalog_table):
            return Distributed(raw.stmt, text)
        refs = [r for r in finder.view_refs if r.relname not in finder.cte_names]
        if refs:
            for ref in refs:
                ref.schemaname = self.view_schema
            return Passthrough(RawStream()(raw.stmt))
        return Passthrough(text)


def _unsupported(fn: str) -> PgError:
    return PgError(
        "0A000",
        f"{fn}() can only be called on its own, as SELECT {fn}(...) with constant or $n arguments",
        hint=f"Run SELECT {fn}(...) as a separate statement and use its result in the next one.",
    )


def _admin_call(stmt: ast.Node, calls: list[ast.FuncCall]) -> AdminCall:
    fn = calls[0].funcname[-1].sval
    if len(calls) != 1 or not isinstance(stmt, ast.SelectStmt):
        raise _unsupported(fn)
    call = calls[0]
    s = stmt
    if (
        s.whereClause
        or s.groupClause
        or s.havingClause
        or s.sortClause
        or s.limitCount
        or s.limitOffset
        or s.withClause
        or s.distinctClause
        or s.valuesLists
        or s.op not in (None, 0)
        or not s.targetList
        or len(s.targetList) != 1
    ):
        raise _unsupported(fn)
    target = s.targetList[0]
    expand = False
    column = fn
    if s.fromClause:
        # SELECT * FROM fn(...) [AS alias]
        if len(s.fromClause) != 1 or not isinstance(s.fromClause[0], ast.RangeFunction):
            raise _unsupported(fn)
        rf = s.fromClause[0]
        if len(rf.functions) != 1 or rf.functions[0][0] is not call or rf.lateral or rf.ordinality:
            raise _unsupported(fn)
        if not (isinstance(target.val, ast.ColumnRef) and isinstance(target.val.fields[-1], ast.A_Star)):
            raise _unsupported(fn)
        expand = True
        if rf.alias is not None:
            column = rf.alias.aliasname
    else:
        if target.val is not call:
            raise _unsupported(fn)
        if target.name:
            column = target.name
    if call.agg_star or call.agg_distinct or call.over or call.agg_filter or call.agg_order:
        raise _unsupported(fn)
    args: list[Arg] = []
    named: list[tuple[str, Arg]] = []
    for a in call.args or ():
        if isinstance(a, ast.NamedArgExpr):
            named.append((a.name, _arg_value(a.arg, fn)))
        else:
            if named:
                raise PgError("42601", "positional argument cannot follow named argument")
            args.append(_arg_value(a, fn))
    return AdminCall(fn, tuple(args), tuple(named), column, expand)


def _arg_value(node: ast.Node, fn: str) -> Arg:
    if isinstance(node, ast.FuncCall) and node.funcname[-1].sval in _DIMENSION_BUILDERS and node.args:
        values = [_arg_value(a.arg if isinstance(a, ast.NamedArgExpr) else a, fn) for a in node.args]
        if len(values) > 2 or not all(isinstance(v, Const) for v in values) or values[0].value is None:  # type: ignore[union-attr]
            raise _unsupported(fn)
        setting = values[1].value if len(values) == 2 else None  # type: ignore[union-attr]
        return DimensionArg(_DIMENSION_BUILDERS[node.funcname[-1].sval], values[0].value, setting)  # type: ignore[union-attr, arg-type]
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.ParamRef):
        return Param(node.number)
    if isinstance(node, ast.A_Const):
        if node.isnull:
            return Const(None)
        v = node.val
        if isinstance(v, ast.Integer):
            return Const(str(v.ival))
        if isinstance(v, ast.Float):
            return Const(v.fval)
        if isinstance(v, ast.Boolean):
            return Const("true" if v.boolval else "false")
        if isinstance(v, ast.String):
            return Const(v.sval)
        if isinstance(v, ast.BitString):
            return Const(v.bsval)
    raise _unsupported(fn)


def _mentions(stmt: ast.Node, is_catalog_table) -> bool:
    """Whether ``stmt`` may concern a catalog table (CTE names excluded).

    Besides RangeVars: ``DROP TABLE`` names tables as plain name lists, and ``DROP INDEX`` /
    ``ALTER INDEX`` name only an index (its table is looked up later, on the metadata node).
    """
    from pglast.enums import ObjectType

    if isinstance(stmt, ast.DropStmt):
        if stmt.removeType == ObjectType.OBJECT_INDEX:
            return True
        if stmt.removeType == ObjectType.OBJECT_MATVIEW:
            return any(
                is_catalog_table(names[-2] if len(names) >= 2 else None, names[-1], True)
                for names in ([x.sval for x in obj] for obj in stmt.objects or ())
            )
        if stmt.removeType == ObjectType.OBJECT_TABLE:
            for obj in stmt.objects or ():
                names = [x.sval for x in obj]
                if is_catalog_table(names[-2] if len(names) >= 2 else None, names[-1]):
                    return True
            return False
    if isinstance(stmt, ast.RenameStmt) and stmt.renameType == ObjectType.OBJECT_INDEX:
        return True
    ctes: set[str] = set()
    found: list[ast.RangeVar] = []
    stack: list[object] = [stmt]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Node):
            if isinstance(n, ast.CommonTableExpr):
                ctes.add(n.ctename)
            if isinstance(n, ast.RangeVar):
                found.append(n)
            else:
                for name in n:
                    stack.append(getattr(n, name))
        elif isinstance(n, tuple | list):
            stack.extend(n)
    if any(is_catalog_table(None, name) for name in ctes):
        return True  # a CTE shadowing a catalog table: the planner decides (and refuses)
    return any(
        is_catalog_table(rv.schemaname, rv.relname) for rv in found if not (rv.schemaname is None and rv.relname in ctes)
    )
