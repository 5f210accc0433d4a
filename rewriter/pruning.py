"""Which shards a statement can touch, and whether its distributed tables are joined co-located.

Only facts that hold for *every* result row are used:

* conjuncts (top-level ``AND`` terms) of the statement's WHERE and of INNER JOIN ON clauses pin a
  distribution column to values: ``col = v``, ``v = col``, ``col IN (v, ...)``, ``col = ANY($n)``,
  ``col = ANY(ARRAY[...])``, where ``v`` is a literal, a cast literal or a parameter;
* equalities ``a.col = b.col`` between distribution columns (in WHERE, any JOIN ON, or
  ``JOIN ... USING (col)``) put the two tables in one equivalence class: shard ``i`` of one only
  joins shard ``i`` of the other, so the statement can run shard by shard.

Anything under OR/NOT, in an outer join's ON (for pinning), or in a subquery is ignored: ignoring
a fact can only make the proxy touch more shards, never return a wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, JoinType

from rewriter.errors import PgError
from rewriter.hashing import base_type
from rewriter.relations import Occurrence


@dataclass(frozen=True, slots=True)
class PinValue:
    """A value a distribution column must equal: a literal's text, ``$n``, or ``$n`` as an array."""

    kind: str  # "const" | "param" | "param_array"
    text: str | None = None  # for "const" (None = SQL NULL: matches nothing)
    number: int = 0  # for params


@dataclass
class Pinning:
    """Result of the analysis for the top-level scope of one statement."""

    classes: dict[int, int] = field(default_factory=dict)  # occurrence index -> class root
    pins: dict[int, list[list[PinValue]]] = field(default_factory=dict)  # class root -> AND of OR-sets
    #: Why the statement cannot run shard by shard although its tables are co-located (an outer
    #: join that preserves rows holding no distributed table), or None.
    multi_shard_problem: str | None = None

    def connected(self, occurrences: list[Occurrence]) -> bool:
        """All given distributed occurrences are joined on their distribution columns."""
        roots = {self.classes.get(o.index, -1 - o.index) for o in occurrences}
        return len(roots) <= 1

    def value_sets(self, occurrences: list[Occurrence]) -> list[list[PinValue]] | None:
        """The AND-of-OR value sets that restrict these (connected) occurrences, or None."""
        groups: list[list[PinValue]] = []
        seen: set[int] = set()
        for o in occurrences:
            root = self.classes.get(o.index, -1 - o.index)
            if root in seen:
                continue
            seen.add(root)
            groups.extend(self.pins.get(root, []))
        return groups or None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def conjuncts(expr: ast.Node | None) -> list[ast.Node]:
    if expr is None:
        return []
    if isinstance(expr, ast.BoolExpr) and expr.boolop == BoolExprType.AND_EXPR:
        out: list[ast.Node] = []
        for a in expr.args:
            out.extend(conjuncts(a))
        return out
    return [expr]


def _op_name(e: ast.A_Expr) -> str | None:
    if e.name and len(e.name) == 1 and isinstance(e.name[0], ast.String):
        return e.name[0].sval
    if e.name and len(e.name) == 2 and e.name[0].sval == "pg_catalog":
        return e.name[1].sval
    return None


# Casts between these keep the value (or fail), so the literal's text is the compared value.
_SAME_VALUE_TYPES = ({"smallint", "integer", "bigint"}, {"text", "character varying"})


def _cast_keeps_value(type_name: ast.TypeName, dist_type: str) -> bool:
    """Whether comparing the distribution column with ``literal::type_name`` compares with the
    literal's own value.

    Why: a cast can change the value. Typmods round or pad (``'1.2345'::numeric(10,2)`` is 1.23,
    ``'abc  '::char(5)`` compares as text 'abc') and another type family compares in that type
    (``bigint_col = 9007199254740993::float8`` also matches 9007199254740992). Routing by the
    literal's text would then skip the shard holding the matching rows. Only casts to the
    column's own base type (its typmod is applied by the hashing) or between integer widths or
    text/varchar keep the value.
    """
    if type_name.typmods or type_name.arrayBounds or type_name.setof or type_name.pct_type:
        return False
    names = [n.sval for n in type_name.names if isinstance(n, ast.String)]
    if len(names) == 2 and names[0] == "pg_catalog":
        names = names[1:]
    if len(names) != 1 or len(type_name.names) > 2:
        return False
    try:
        cast_type, column_type = base_type(names[0]), base_type(dist_type)
    except PgError:
        return False
    return cast_type == column_type or any(cast_type in f and column_type in f for f in _SAME_VALUE_TYPES)


def _const_value(node: ast.Node, dist_type: str | None = None) -> PinValue | None:
    """A literal, a cast literal or ``$n`` (cast or not).

    With ``dist_type`` (the column compared with or stored into), a cast that may change the
    value (see :func:`_cast_keeps_value`) gives None: no pin.
    """
    if isinstance(node, ast.TypeCast):
        if dist_type is not None and not _cast_keeps_value(node.typeName, dist_type):
            return None
        node = node.arg
    if isinstance(node, ast.ParamRef):
        return PinValue("param", number=node.number)
    if isinstance(node, ast.A_Const):
        if node.isnull:
            return PinValue("const", None)
        v = node.val
        if isinstance(v, ast.Integer):
            return PinValue("const", str(v.ival))
        if isinstance(v, ast.Float):
            return PinValue("const", v.fval)
        if isinstance(v, ast.String):
            return PinValue("const", v.sval)
        if isinstance(v, ast.Boolean):
            return PinValue("const", "true" if v.boolval else "false")
    return None


class ScopeAnalyzer:
    """Analyse the top-level scope given its FROM items and WHERE clause."""

    def __init__(self, occurrences: list[Occurrence], scope: ast.Node | None = None) -> None:
        if scope is None:
            self.occ = [o for o in occurrences if o.top_level and not o.is_reference]
        else:
            self.occ = [o for o in occurrences if o.scope is scope and not o.is_reference]
        self.by_alias: dict[str, list[Occurrence]] = {}
        for o in self.occ:
            self.by_alias.setdefault(o.alias, []).append(o)
        self.uf = _UnionFind()
        for o in self.occ:
            self.uf.find(o.index)
        self.raw_pins: list[tuple[int, list[PinValue]]] = []
        self.multi_shard_problem: str | None = None

    def column_occurrence(self, node: ast.Node) -> Occurrence | None:
        """The occurrence whose distribution column ``node`` (a ColumnRef) names, if any."""
        if isinstance(node, ast.TypeCast):
            # k::text = '5' changes the comparison; only same-type casts are harmless, so skip.
            return None
        if not isinstance(node, ast.ColumnRef):
            return None
        fields = node.fields
        if not all(isinstance(f, ast.String) for f in fields):
            return None
        names = [f.sval for f in fields]
        col = names[-1]
        if len(names) >= 2:
            cands = [o for o in self.by_alias.get(names[-2], []) if o.table.dist_column == col]
            if len(names) == 3:
                cands = [o for o in cands if o.table.schema == names[0]]
        else:
            cands = [o for o in self.occ if o.table.dist_column == col]
        return cands[0] if len(cands) == 1 else None

    def add_conjunct(self, expr: ast.Node, *, may_pin: bool) -> None:
        if not isinstance(expr, ast.A_Expr) or _op_name(expr) != "=":
            return
        kind = expr.kind
        if kind == A_Expr_Kind.AEXPR_OP:
            left, right = self.column_occurrence(expr.lexpr), self.column_occurrence(expr.rexpr)
            if left is not None and right is not None:
                if left.table.colocation_id == right.table.colocation_id:
                    self.uf.union(left.index, right.index)
                return
            if not may_pin:
                return
            for col, other in ((left, expr.rexpr), (right, expr.lexpr)):
                if col is not None:
                    v = _const_value(other, col.table.dist_type)
                    if v is not None:
                        self.raw_pins.append((col.index, [v]))
        elif kind == A_Expr_Kind.AEXPR_IN and may_pin:
            col = self.column_occurrence(expr.lexpr)
            if col is None or not isinstance(expr.rexpr, tuple | list):
                return
            values = [_const_value(x, col.table.dist_type) for x in expr.rexpr]
            if all(v is not None for v in values):
                self.raw_pins.append((col.index, values))  # type: ignore[arg-type]
        elif kind == A_Expr_Kind.AEXPR_OP_ANY and may_pin:
            col = self.column_occurrence(expr.lexpr)
            if col is None:
                return
            r = expr.rexpr
            if isinstance(r, ast.TypeCast):
                r = r.arg
            if isinstance(r, ast.ParamRef):
                self.raw_pins.append((col.index, [PinValue("param_array", number=r.number)]))
            elif isinstance(r, ast.A_ArrayExpr):
                values = [_const_value(x, col.table.dist_type) for x in (r.elements or ())]
                if values and all(v is not None for v in values):
                    self.raw_pins.append((col.index, values))  # type: ignore[arg-type]

    def add_join_tree(self, node: ast.Node, *, inner: bool = True) -> None:
        """Walk FROM items: JOIN ON equalities always link tables; pins only from inner joins."""
        if isinstance(node, ast.JoinExpr):
            is_inner = node.jointype == JoinType.JOIN_INNER
            self._check_outer_join(node)
            self.add_join_tree(node.larg, inner=inner and is_inner)
            self.add_join_tree(node.rarg, inner=inner and is_inner)
            for c in conjuncts(node.quals):
                self.add_conjunct(c, may_pin=inner and is_inner)
            if node.usingClause:
                left = self._occurrences_under(node.larg)
                right = self._occurrences_under(node.rarg)
                for name in node.usingClause:
                    col = name.sval
                    lc = [o for o in left if o.table.dist_column == col]
                    rc = [o for o in right if o.table.dist_column == col]
                    if len(lc) == 1 and len(rc) == 1 and lc[0].table.colocation_id == rc[0].table.colocation_id:
                        self.uf.union(lc[0].index, rc[0].index)

    def _check_outer_join(self, node: ast.JoinExpr) -> None:
        """An outer join whose preserved side holds no distributed table cannot run per shard.

        ``countries c LEFT JOIN users u ON ...`` on each shard emits every country that has no
        user *in that shard*: a country without users comes back once per shard, and one with
        users on some shards gets NULL-extended rows from the others. The same holds for VALUES,
        functions and subqueries on the preserved side. When the preserved side has a
        distributed table, each preserved row lives in exactly one shard, which is exact.
        """
        preserved = {
            JoinType.JOIN_LEFT: (node.larg,),
            JoinType.JOIN_RIGHT: (node.rarg,),
            JoinType.JOIN_FULL: (node.larg, node.rarg),
        }.get(node.jointype, ())
        if not preserved or not self._occurrences_under(node):
            return
        for side in preserved:
            if not self._occurrences_under(side) and self.multi_shard_problem is None:
                kind = {JoinType.JOIN_LEFT: "LEFT", JoinType.JOIN_RIGHT: "RIGHT"}.get(node.jointype, "FULL")
                self.multi_shard_problem = (
                    f"a {kind} JOIN that keeps unmatched rows of a reference table, subquery or "
                    "function while the other side reads a distributed table"
                )

    def _occurrences_under(self, node: ast.Node) -> list[Occurrence]:
        if isinstance(node, ast.RangeVar):
            return [o for o in self.occ if o.node is node]
        if isinstance(node, ast.JoinExpr):
            return self._occurrences_under(node.larg) + self._occurrences_under(node.rarg)
        return []

    def result(self) -> Pinning:
        p = Pinning()
        for o in self.occ:
            p.classes[o.index] = self.uf.find(o.index)
        for idx, values in self.raw_pins:
            p.pins.setdefault(self.uf.find(idx), []).append(values)
        p.multi_shard_problem = self.multi_shard_problem
        return p


def analyze_scope(
    occurrences: list[Occurrence], from_items: list[ast.Node], where: ast.Node | None, scope: ast.Node | None = None
) -> Pinning:
    """Pins and co-location of the occurrences of one query level (the top level by default)."""
    a = ScopeAnalyzer(occurrences, scope)
    for item in from_items:
        a.add_join_tree(item)
    for c in conjuncts(where):
        a.add_conjunct(c, may_pin=True)
    return a.result()
