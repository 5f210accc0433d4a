"""Split a multi-shard SELECT into a *worker* query (per shard) and a *combine* query.

The worker and combine trees share subtrees with the original statement instead of copying
them (pglast's deepcopy was the largest single cost of planning); shared nodes are only ever
deparsed, and every node that gets modified is a fresh or shallow-copied one.

Why a combine query run by PostgreSQL (the idea of Citus' "master query"): the final step —
adding partial sums, dividing for ``avg``, HAVING, ORDER BY in the database's collation, LIMIT,
DISTINCT, expressions over aggregates such as ``sum(a)/count(*)`` — is then evaluated by
PostgreSQL itself with its exact type rules, numeric precision and NULL semantics. The proxy
never re-implements SQL expression evaluation; it only ships rows. The partial rows travel as
typed array parameters: ``SELECT ... FROM unnest($1::int8[], $2::numeric[]) AS w(w0, w1) ...``.

Modes:

* ``concat`` — no aggregates, GROUP BY, DISTINCT or ORDER BY: worker rows are streamed to the
  client as they arrive (LIMIT/OFFSET applied by counting; the worker gets ``LIMIT limit+offset``).
* ``combine`` — everything else this module accepts. Aggregates become partial aggregates in the
  worker and final aggregates over the partial columns in the combine query:
  count→sum, sum→sum, min/max→min/max, avg→sum/count, bool_and/bool_or/every→same,
  stddev/variance (samp, pop)→count/sum/sum of squares with PostgreSQL's numeric formulas,
  ``agg(DISTINCT x)`` → ``x`` joins the worker's GROUP BY and the combine query applies
  ``agg(DISTINCT w)`` itself.

What cannot be split exactly raises ``0A000`` naming the construct.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from pglast import ast
from pglast.enums import LimitOption, SetOperation
from pglast.stream import RawStream

from rewriter.errors import PgError

SUPPORTED_AGGREGATES = frozenset(
    {
        "count", "sum", "min", "max", "avg", "bool_and", "bool_or", "every",
        "stddev", "stddev_samp", "stddev_pop", "variance", "var_samp", "var_pop",
    }
)
_VARIANCE = {"stddev", "stddev_samp", "stddev_pop", "variance", "var_samp", "var_pop"}
_FLOAT_TYPES = {"real", "double precision", "float4", "float8"}


def unsupported(what: str, hint: str | None = None) -> PgError:
    return PgError(
        "0A000",
        f"{what} is not supported on distributed tables across shards",
        hint=hint or "Filter on the distribution column so the query runs on one shard, or rewrite it.",
    )


def col(name: str) -> ast.ColumnRef:
    return ast.ColumnRef(fields=(ast.String(sval=name),))


def func(name: str, *args: ast.Node, distinct: bool = False, star: bool = False) -> ast.FuncCall:
    return ast.FuncCall(
        funcname=(ast.String(sval=name),),
        args=tuple(args) if args else None,
        agg_distinct=distinct,
        agg_star=star,
        funcformat=0,
    )


def cast(node: ast.Node, type_name: str) -> ast.TypeCast:
    return ast.TypeCast(arg=node, typeName=ast.TypeName(names=(ast.String(sval=type_name),)))


def deparse(node: ast.Node) -> str:
    return RawStream()(node)


def _fname(fc: ast.FuncCall) -> str:
    return fc.funcname[-1].sval


def transform(node, fn):
    """A copy of ``node`` where ``fn(sub)`` (if not None) replaces each subtree, top-down."""
    rep = fn(node)
    if rep is not None:
        return rep
    if isinstance(node, ast.Node):
        kwargs = {}
        for name in node:
            kwargs[name] = transform(getattr(node, name), fn)
        return type(node)(**kwargs)
    if isinstance(node, tuple | list):
        return tuple(transform(x, fn) for x in node)
    return node


def contains(node, pred) -> bool:
    if pred(node):
        return True
    if isinstance(node, ast.Node):
        return any(contains(getattr(node, n), pred) for n in node)
    if isinstance(node, tuple | list):
        return any(contains(x, pred) for x in node)
    return False


@dataclass
class AggSlot:
    """One aggregate call of the original query and its partial columns in the worker."""

    call: ast.FuncCall
    name: str
    distinct_col: int | None = None  # worker column holding the DISTINCT argument
    partial_cols: list[int] = field(default_factory=list)
    index: int = 0  # position in SelectSplit.aggs (names the combine query's helper columns)


@dataclass
class SelectSplit:
    mode: str  # "concat" | "combine"
    worker: ast.SelectStmt
    n_outputs: int | None = None  # output columns, when known without describing (no *)
    limit: ast.Node | None = None  # concat mode: applied by the proxy
    offset: ast.Node | None = None
    # combine mode:
    worker_columns: int = 0  # visible worker columns (None-star case resolved at describe)
    combine_targets: list[ast.Node] = field(default_factory=list)
    combine_group: list[ast.Node] = field(default_factory=list)
    combine_having: ast.Node | None = None
    combine_sort: list[ast.SortBy] = field(default_factory=list)
    combine_distinct: tuple | None = None  # None, () for DISTINCT, exprs for DISTINCT ON
    combine_limit: ast.Node | None = None
    combine_offset: ast.Node | None = None
    aggs: list[AggSlot] = field(default_factory=list)
    star_outputs: bool = False  # targets contain *: output count comes from the described worker
    n_extra: int = 0  # worker columns after the outputs (sort keys) in star mode
    with_ties: bool = False  # FETCH FIRST n ROWS WITH TIES: the combine query keeps the ties

    def combine_sql(self, partial_types: list[str], n_worker_cols: int, n_params: int) -> str:
        """The combine query text once the worker's column types are known.

        ``partial_types[i]`` is the SQL type name of worker column ``w<i>``; parameters of the
        original statement are renumbered after the ``n_worker_cols`` array parameters.
        """
        shift = n_worker_cols

        def renumber(n):
            if isinstance(n, ast.ParamRef):
                return ast.ParamRef(number=n.number + shift)
            return None

        def text(n: ast.Node) -> str:
            return _replace_markers(deparse(transform(n, renumber)), self, partial_types)

        if self.star_outputs:
            n_out = n_worker_cols - self.n_extra
            targets = [f"w{i}" for i in range(n_out)]
        else:
            targets = [text(t) for t in self.combine_targets]
        cols = ", ".join(f"w{i}" for i in range(n_worker_cols))
        arrays = ", ".join(f"${i + 1}" for i in range(n_worker_cols))
        parts = ["SELECT"]
        if self.combine_distinct is not None:
            if self.combine_distinct:
                parts.append("DISTINCT ON (" + ", ".join(text(e) for e in self.combine_distinct) + ")")
            else:
                parts.append("DISTINCT")
        parts.append(", ".join(targets))
        source = f"unnest({arrays}) AS w({cols})"
        windows = []
        partition = ", ".join(deparse(g) for g in self.combine_group)
        over = f"OVER (PARTITION BY {partition})" if partition else "OVER ()"
        for slot in self.aggs:
            if slot.name in _VARIANCE and slot.distinct_col is None and partial_types[slot.partial_cols[1]] == "double precision":
                cnt, mean = (f"w{slot.partial_cols[0]}", f"w{slot.partial_cols[3]}")
                windows.append(
                    f"sum({cnt} * {mean}) {over} / NULLIF(sum(CASE WHEN {mean} IS NOT NULL THEN {cnt} END) {over}, 0)"
                    f" AS __orochi_mean_{slot.index}"
                )
        if windows:
            source = f"(SELECT w.*, {', '.join(windows)} FROM {source}) AS w"
        parts.append(f"FROM {source}")
        if self.combine_group:
            parts.append("GROUP BY " + ", ".join(text(g) for g in self.combine_group))
        if self.combine_having is not None:
            parts.append("HAVING " + text(self.combine_having))
        if self.combine_sort:
            parts.append("ORDER BY " + ", ".join(_sortby_text(s, text) for s in self.combine_sort))
        if self.with_ties and self.combine_limit is not None:
            # A plain LIMIT here dropped the rows tied with the last one (the workers kept them).
            if self.combine_offset is not None:
                parts.append("OFFSET (" + text(self.combine_offset) + ") ROWS")
            parts.append("FETCH FIRST (" + text(self.combine_limit) + ") ROWS WITH TIES")
            return " ".join(parts)
        if self.combine_limit is not None:
            parts.append("LIMIT " + text(self.combine_limit))
        if self.combine_offset is not None:
            parts.append("OFFSET " + text(self.combine_offset))
        return " ".join(parts)


_MARKER = re.compile(r"\b__orochi_agg_(\d+)\b")


def _sortby_text(s: ast.SortBy, text) -> str:
    from pglast.enums import SortByDir, SortByNulls

    out = text(s.node)
    if s.sortby_dir == SortByDir.SORTBY_DESC:
        out += " DESC"
    elif s.sortby_dir == SortByDir.SORTBY_ASC:
        out += " ASC"
    elif s.sortby_dir == SortByDir.SORTBY_USING:
        op = s.useOp[-1].sval
        out += f" USING {op}"
    if s.sortby_nulls == SortByNulls.SORTBY_NULLS_FIRST:
        out += " NULLS FIRST"
    elif s.sortby_nulls == SortByNulls.SORTBY_NULLS_LAST:
        out += " NULLS LAST"
    return out


def _replace_markers(sql: str, split: SelectSplit, types: list[str]) -> str:
    return _MARKER.sub(lambda m: "(" + _final_expr(split.aggs[int(m.group(1))], types) + ")", sql)


def _final_expr(slot: AggSlot, types: list[str]) -> str:
    """The combine-side expression for one aggregate, over its partial columns."""
    name = slot.name
    if slot.distinct_col is not None:
        call = copy.copy(slot.call)
        call.args = (col(f"w{slot.distinct_col}"),)
        call.agg_filter = None  # the worker already applied FILTER by grouping only matching rows
        return deparse(call)
    p = [f"w{i}" for i in slot.partial_cols]
    t = [types[i] for i in slot.partial_cols]
    if name == "count":
        # No partial rows at all (a worker GROUP BY, e.g. for another aggregate's DISTINCT,
        # over no input) must still count 0, not NULL.
        return f"coalesce(sum({p[0]}), 0)::bigint"
    if name == "sum":
        return f"sum({p[0]})::{t[0]}"
    if name in ("min", "max", "bool_and", "bool_or"):
        return f"{name}({p[0]})"
    if name == "every":
        return f"bool_and({p[0]})"
    if name == "avg":
        if t[0] in ("real", "double precision"):
            return f"sum({p[0]})::double precision / NULLIF(sum({p[1]}), 0)::double precision"
        if t[0] == "interval":
            return f"sum({p[0]}) / NULLIF(sum({p[1]}), 0)::double precision"
        return f"sum({p[0]})::numeric / NULLIF(sum({p[1]}), 0)::numeric"
    if name in _VARIANCE:
        n, s, s2 = (f"sum({x})" for x in p[:3])
        is_float = t[1] == "double precision"
        samp = name in ("stddev", "stddev_samp", "variance", "var_samp")
        if is_float:
            # Chan et al.'s merge of per-shard (n, mean, M2): M2 = sum(M2_i) + sum(n_i (mean_i - g)^2)
            # with g the group's overall mean (a window column of the combine query).
            cnt, mean, m2 = p[0], p[3], p[4]
            g = f"__orochi_mean_{slot.index}"
            total_m2 = f"(COALESCE(sum({m2}), 0) + COALESCE(sum({cnt} * ({mean} - {g}) * ({mean} - {g})), 0))"
            var = f"{total_m2} / ({n}::float8 - 1)" if samp else f"{total_m2} / {n}::float8"
            guard = f"{n} > 1" if samp else f"{n} > 0"
            val = f"sqrt({var})" if name.startswith("stddev") else var
            return f"CASE WHEN {guard} THEN {val} END"
        num = f"({n}::numeric * {s2} - {s} * {s})"
        den = f"({n}::numeric * ({n}::numeric - 1))" if samp else f"({n}::numeric * {n}::numeric)"
        var = f"CASE WHEN {num} <= 0 THEN 0::numeric ELSE {num} / {den} END"
        guard = f"{n} > 1" if samp else f"{n} > 0"
        if name.startswith("stddev"):
            # PostgreSQL rounds the square root to the division's scale. sqrt() picks its own
            # scale (often one more digit), and rounding that again is double rounding
            # (...14887 -> ...15 -> ...2): take 20 extra digits (a zero of scale s+20 widens the
            # argument's scale), then round once.
            val = f"round(sqrt({var} + round(0::numeric, scale({var}) + 20)), scale({var}))"
        else:
            val = var
        return f"CASE WHEN {guard} THEN {val} END"
    raise unsupported(f"aggregate {name}()")


class _Splitter:
    def __init__(self, stmt: ast.SelectStmt, aggregate_names: frozenset[str], arg_types: dict[int, str] | None):
        self.stmt = stmt
        self.aggregate_names = aggregate_names
        self.arg_types = arg_types or {}
        self.worker_targets: list[ast.ResTarget] = []
        self.worker_group: list[ast.Node] = []
        self.aggs: list[AggSlot] = []
        self.group_exprs: list[tuple[ast.Node, int]] = []  # (expr, worker column)
        self.input_columns: frozenset[str] | None = None
        self.distinct_args: list[tuple[ast.Node, int]] = []

    def is_agg(self, n) -> bool:
        return isinstance(n, ast.FuncCall) and n.over is None and _fname(n) in self.aggregate_names

    def add_worker(self, expr: ast.Node) -> int:
        i = len(self.worker_targets)
        self.worker_targets.append(ast.ResTarget(name=f"w{i}", val=expr))
        return i

    # -------------------------------------------------------------------- aggregate queries
    def agg_marker(self, fc: ast.FuncCall) -> ast.ColumnRef:
        name = _fname(fc)
        if name not in SUPPORTED_AGGREGATES:
            raise unsupported(f"aggregate {name}()", "Supported across shards: " + ", ".join(sorted(SUPPORTED_AGGREGATES)) + ".")
        if fc.agg_order and name not in ("count", "sum", "min", "max", "avg", "bool_and", "bool_or", "every"):
            raise unsupported(f"ORDER BY inside {name}()")
        if fc.func_variadic:
            raise unsupported(f"VARIADIC {name}()")
        for a in fc.args or ():
            if contains(a, self.is_agg):
                raise PgError("42803", "aggregate function calls cannot be nested")
        # The same call again (ORDER BY/HAVING repeating a select-list aggregate) reuses its
        # slot: identical combine text is what lets SELECT DISTINCT ... ORDER BY agg(...)
        # match the ORDER BY item to the select list, and no partials are computed twice.
        for j, other in enumerate(self.aggs):
            if other.call == fc:
                return col(f"__orochi_agg_{j}")
        slot = AggSlot(fc, name)
        idx = len(self.aggs)
        slot.index = idx
        self.aggs.append(slot)
        if fc.agg_distinct:
            if not fc.args or len(fc.args) != 1:
                raise unsupported(f"{name}(DISTINCT ...) with several arguments")
            arg = fc.args[0]
            if fc.agg_filter is not None:
                raise unsupported(f"{name}(DISTINCT ...) FILTER (...)")
            for e, c in self.distinct_args:
                if e == arg:
                    slot.distinct_col = c
                    break
            else:
                c = self.add_worker(arg)
                self.distinct_args.append((arg, c))
                self.worker_group.append(col(f"w{c}"))
                slot.distinct_col = c
            return col(f"__orochi_agg_{idx}")
        args = fc.args or ()
        filt = fc.agg_filter

        def partial(fname: str, *pargs: ast.Node, star: bool = False) -> int:
            call = func(fname, *pargs, star=star)
            call.agg_filter = filt
            return self.add_worker(call)

        if name == "count":
            slot.partial_cols.append(partial("count", *args, star=fc.agg_star))
        elif name in ("sum", "min", "max", "bool_and", "bool_or"):
            slot.partial_cols.append(partial(name, *args))
        elif name == "every":
            slot.partial_cols.append(partial("bool_and", *args))
        elif name == "avg":
            x = args[0]
            slot.partial_cols.append(partial("sum", x))
            slot.partial_cols.append(partial("count", x))
        elif name in _VARIANCE:
            x = args[0]
            is_float = self.arg_types.get(id(fc)) in _FLOAT_TYPES
            # One-word names: cast() makes a one-part TypeName, which deparses quoted
            # ("double precision" would name a type that does not exist).
            if is_float:
                xx = cast(x, "float8")
            else:
                # The planner does not know column types (it passes "numeric" for every call), and
                # x::numeric would turn stddev(float8) into a numeric answer under the float8
                # column the client was described: garbage in binary mode. ``x + 0::numeric``
                # resolves like PostgreSQL's own stddev: numeric for integer and numeric
                # arguments, float8 for real and double precision; the combine query then picks
                # the float or numeric formula from the partial column's actual type.
                xx = ast.A_Expr(
                    kind=0, name=(ast.String(sval="+"),), lexpr=x,
                    rexpr=cast(ast.A_Const(val=ast.Integer(ival=0)), "numeric"),
                )
            slot.partial_cols.append(partial("count", x))
            slot.partial_cols.append(partial("sum", xx))
            # Squares in numeric: exact for integer/numeric arguments (the numeric formula), and
            # no float underflow error for tiny floats (whose answer comes from mean/M2 below).
            xn = cast(x, "numeric")
            sq = ast.A_Expr(kind=0, name=(ast.String(sval="*"),), lexpr=xn, rexpr=xn)
            slot.partial_cols.append(partial("sum", sq))
            # For float arguments the sums above cancel catastrophically (large mean, small
            # spread): also ship each shard's mean and M2 (sum of squared deviations, from
            # PostgreSQL's own stable var_pop), merged exactly in the combine query.
            xf = cast(x, "float8")
            slot.partial_cols.append(partial("avg", xf))
            vp, cnt = func("var_pop", xf), func("count", x)
            vp.agg_filter = filt
            cnt.agg_filter = filt
            slot.partial_cols.append(
                self.add_worker(ast.A_Expr(kind=0, name=(ast.String(sval="*"),), lexpr=vp, rexpr=cnt))
            )
        return col(f"__orochi_agg_{idx}")

    def to_combine(self, expr: ast.Node, *, where: str) -> ast.Node:
        """Rewrite an output/HAVING/ORDER BY expression over worker columns and agg markers."""

        def fn(n):
            for g, c in self.group_exprs:
                if n == g:
                    return col(f"w{c}")
            if self.is_agg(n):
                return self.agg_marker(n)
            if isinstance(n, ast.FuncCall) and n.over is not None:
                raise unsupported(f"window function {_fname(n)}() in {where}", "Window functions run across shards only when PARTITION BY includes the distribution column (not supported yet).")
            if isinstance(n, ast.SubLink):
                raise unsupported(f"a subquery in {where} of an aggregate query")
            if isinstance(n, ast.ColumnRef):
                raise unsupported(
                    f"column {deparse(n)} in {where} without GROUP BY on it",
                    "Add the column to GROUP BY.",
                )
            return None

        return transform(expr, fn)

    def resolve_group_item(self, g: ast.Node) -> ast.Node:
        """GROUP BY 1 / GROUP BY alias → the target expression, as PostgreSQL resolves them."""
        targets = self.stmt.targetList or ()
        if isinstance(g, ast.A_Const) and isinstance(g.val, ast.Integer):
            k = g.val.ival
            if 1 <= k <= len(targets) and not _has_star(targets):
                return targets[k - 1].val
            raise unsupported("GROUP BY position with * in the select list")
        if isinstance(g, ast.ColumnRef) and len(g.fields) == 1 and isinstance(g.fields[0], ast.String):
            nm = g.fields[0].sval
            named = [t for t in targets if t.name == nm]
            if named and not self._is_input_column(nm):
                return named[0].val
        return g

    def _is_input_column(self, name: str) -> bool:
        # PostgreSQL prefers an input column over an output alias in GROUP BY. With the tables'
        # columns known, that is exact; otherwise an alias that is also a column name keeps the
        # column meaning only when some target spells it as a plain column.
        if self.input_columns is not None:
            return name in self.input_columns
        return any(
            isinstance(t.val, ast.ColumnRef) and t.val.fields[-1].sval == name
            for t in self.stmt.targetList or ()
            if isinstance(t.val, ast.ColumnRef) and isinstance(t.val.fields[-1], ast.String)
        )

    def split_aggregate(self) -> SelectSplit:
        s = self.stmt
        if _has_star(s.targetList or ()):
            raise unsupported("SELECT * with GROUP BY or aggregates")
        for g in s.groupClause or ():
            if isinstance(g, ast.GroupingSet):
                raise unsupported("GROUPING SETS, ROLLUP and CUBE")
            expr = self.resolve_group_item(g)
            if contains(expr, self.is_agg):
                raise PgError("42803", "aggregate functions are not allowed in GROUP BY")
            c = self.add_worker(expr)
            self.group_exprs.append((expr, c))
            self.worker_group.append(expr)
        targets = [self.to_combine(t.val, where="the select list") for t in s.targetList]
        having = self.to_combine(s.havingClause, where="HAVING") if s.havingClause is not None else None
        sort = [self._combine_sortby(sb) for sb in s.sortClause or ()]
        distinct = None
        if s.distinctClause is not None:
            if len(s.distinctClause) == 1 and s.distinctClause[0] is None:
                distinct = ()
            else:
                distinct = tuple(self._distinct_on_expr(e, targets) for e in s.distinctClause)
        worker = ast.SelectStmt(
            targetList=tuple(self.worker_targets),
            fromClause=s.fromClause,
            whereClause=s.whereClause,
            groupClause=tuple(self.worker_group) if self.worker_group else None,
            withClause=s.withClause,
            limitOption=0,
            op=SetOperation.SETOP_NONE,
        )
        return SelectSplit(
            mode="combine",
            worker=worker,
            n_outputs=len(targets),
            worker_columns=len(self.worker_targets),
            combine_targets=targets,
            combine_group=[col(f"w{c}") for _, c in self.group_exprs],
            combine_having=having,
            combine_sort=sort,
            combine_distinct=distinct,
            combine_limit=s.limitCount,
            combine_offset=s.limitOffset,
            aggs=self.aggs,
            with_ties=s.limitOption == LimitOption.LIMIT_OPTION_WITH_TIES,
        )

    def _combine_sortby(self, sb: ast.SortBy) -> ast.SortBy:
        targets = self.stmt.targetList or ()
        node = sb.node
        if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
            k = node.val.ival
            if not 1 <= k <= len(targets):
                raise PgError("42P10", f"ORDER BY position {k} is not in select list")
            # The combine query has the same outputs in the same order, so the position means
            # the same there. Substituting the output's expression broke on constants: ORDER BY
            # 'x' is an error (42601) and ORDER BY 5 names another position.
            return sb
        out = copy.copy(sb)
        if isinstance(node, ast.ColumnRef) and len(node.fields) == 1 and isinstance(node.fields[0], ast.String):
            named = [j for j, t in enumerate(targets) if t.name == node.fields[0].sval]
            if len(named) == 1:
                out.node = ast.A_Const(val=ast.Integer(ival=named[0] + 1))  # output alias → position
                return out
        out.node = self.to_combine(node, where="ORDER BY")
        return out

    def _distinct_on_expr(self, e: ast.Node, combine_targets: list[ast.Node]) -> ast.Node:
        targets = self.stmt.targetList or ()
        if isinstance(e, ast.A_Const) and isinstance(e.val, ast.Integer):
            return e  # same outputs in the same order: the position means the same (see ORDER BY)
        for j, t in enumerate(targets):
            if t.val == e or (isinstance(e, ast.ColumnRef) and len(e.fields) == 1 and t.name == getattr(e.fields[0], "sval", None)):
                return ast.A_Const(val=ast.Integer(ival=j + 1))
        return self.to_combine(e, where="DISTINCT ON")

    # -------------------------------------------------------------------- plain queries
    def split_plain(self) -> SelectSplit:
        s = self.stmt
        targets = list(s.targetList or ())
        star = _has_star(targets)
        if s.distinctClause is None and not s.sortClause:
            worker = copy.copy(s)
            worker.limitOffset = None
            worker.limitCount = _limit_plus_offset(s.limitCount, s.limitOffset)
            return SelectSplit(
                mode="concat",
                worker=worker,
                n_outputs=None if star else len(targets),
                limit=s.limitCount,
                offset=s.limitOffset,
            )
        # ORDER BY and/or DISTINCT: outputs first, then sort keys that are not outputs.
        worker_targets = [t for t in targets]
        n_out = len(targets)
        extra: list[ast.Node] = []
        combine_sort: list[ast.SortBy] = []
        for sb in s.sortClause or ():
            ref = self._output_ref(sb.node, targets, star)
            if ref is None:
                if s.distinctClause is not None and s.distinctClause != (None,) and not _is_distinct_on(s):
                    raise PgError("42P10", "for SELECT DISTINCT, ORDER BY expressions must appear in select list")
                extra.append(sb.node)
                ref = ("extra", len(extra) - 1)
            out = copy.copy(sb)
            out.node = ast.ColumnRef(fields=(ast.String(sval=f"__orochi_ref_{ref[0]}_{ref[1]}"),))
            combine_sort.append(out)
        distinct = None
        if s.distinctClause is not None:
            if _is_distinct_on(s):
                dons = []
                for e in s.distinctClause:
                    ref = self._output_ref(e, targets, star)
                    if ref is None and e in extra:
                        # Also a sort key: the same worker column, or DISTINCT ON (w3) would not
                        # match ORDER BY w1 (42P10) in the combine query.
                        ref = ("extra", extra.index(e))
                    if ref is None:
                        extra.append(e)
                        ref = ("extra", len(extra) - 1)
                    dons.append(ast.ColumnRef(fields=(ast.String(sval=f"__orochi_ref_{ref[0]}_{ref[1]}"),)))
                distinct = tuple(dons)
            else:
                distinct = ()
        for e in extra:
            worker_targets.append(ast.ResTarget(val=e))
        worker = copy.copy(s)
        worker.targetList = tuple(worker_targets)
        worker.limitOffset = None
        worker.limitCount = _limit_plus_offset(s.limitCount, s.limitOffset)
        split = SelectSplit(
            mode="combine",
            worker=worker,
            n_outputs=None if star else n_out,
            worker_columns=len(worker_targets),
            combine_sort=combine_sort,
            combine_distinct=distinct,
            combine_limit=s.limitCount,
            combine_offset=s.limitOffset,
            star_outputs=True,
            n_extra=len(extra),
            with_ties=s.limitOption == LimitOption.LIMIT_OPTION_WITH_TIES,
        )
        return split

    def _output_ref(self, node: ast.Node, targets: list[ast.ResTarget], star: bool) -> tuple[str, int] | None:
        if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
            k = node.val.ival
            if k < 1:
                raise PgError("42P10", f"ORDER BY position {k} is not in select list")
            return ("out", k - 1)
        if star:
            return None
        if isinstance(node, ast.ColumnRef) and len(node.fields) == 1 and isinstance(node.fields[0], ast.String):
            for i, t in enumerate(targets):
                if t.name == node.fields[0].sval:
                    return ("out", i)
        for i, t in enumerate(targets):
            if t.val == node:
                return ("out", i)
        return None


def _is_distinct_on(s: ast.SelectStmt) -> bool:
    return s.distinctClause is not None and not (len(s.distinctClause) == 1 and s.distinctClause[0] is None)


def _has_star(targets) -> bool:
    return any(isinstance(t.val, ast.ColumnRef) and isinstance(t.val.fields[-1], ast.A_Star) for t in targets)


def _limit_plus_offset(limit: ast.Node | None, offset: ast.Node | None) -> ast.Node | None:
    if limit is None:
        return None
    if offset is None:
        return limit
    if (
        isinstance(limit, ast.A_Const) and isinstance(limit.val, ast.Integer)
        and isinstance(offset, ast.A_Const) and isinstance(offset.val, ast.Integer)
    ):
        return ast.A_Const(val=ast.Integer(ival=limit.val.ival + offset.val.ival))
    return ast.A_Expr(kind=0, name=(ast.String(sval="+"),), lexpr=limit, rexpr=offset)


def needs_arg_types(stmt: ast.SelectStmt, aggregate_names: frozenset[str]) -> list[ast.FuncCall]:
    """Aggregate calls whose partials depend on the argument's type (variance family)."""
    out: list[ast.FuncCall] = []

    def visit(n):
        if isinstance(n, ast.FuncCall) and n.over is None and _fname(n) in _VARIANCE and n.args:
            out.append(n)
        if isinstance(n, ast.SelectStmt) and n is not stmt:
            return
        if isinstance(n, ast.Node):
            for name in n:
                visit(getattr(n, name))
        elif isinstance(n, tuple | list):
            for x in n:
                visit(x)

    for part in (stmt.targetList, stmt.havingClause, stmt.sortClause):
        visit(part)
    return out


def split_select(
    stmt: ast.SelectStmt,
    aggregate_names: frozenset[str],
    arg_types: dict[int, str] | None = None,
    input_columns: frozenset[str] | None = None,
) -> SelectSplit:
    """Split a top-level SELECT (already checked to be co-located) for multi-shard execution.

    ``arg_types`` maps ``id(FuncCall)`` of the calls returned by :func:`needs_arg_types` to their
    argument's SQL type name. ``input_columns`` are the column names of the tables in FROM (when
    known): ``GROUP BY name`` means such a column even if an output column has that name.
    """
    if stmt.op != SetOperation.SETOP_NONE:
        raise unsupported("UNION/INTERSECT/EXCEPT over distributed tables")
    if stmt.intoClause is not None:
        raise unsupported("SELECT INTO a new table from distributed tables", "Use CREATE TABLE ... then INSERT ... SELECT.")
    if stmt.lockingClause:
        raise unsupported("FOR UPDATE/FOR SHARE across shards")
    if stmt.valuesLists:
        raise unsupported("VALUES")
    sp = _Splitter(stmt, aggregate_names, arg_types)
    sp.input_columns = input_columns
    has_window = any(
        contains(t, lambda n: isinstance(n, ast.FuncCall) and n.over is not None) for t in stmt.targetList or ()
    ) or bool(stmt.windowClause)
    if has_window:
        raise unsupported(
            "a window function",
            "Window functions run across shards only when PARTITION BY includes the distribution column (not supported yet); filter on the distribution column to run on one shard.",
        )
    aggregated = bool(stmt.groupClause) or any(
        contains(part, sp.is_agg) for part in (stmt.targetList, stmt.havingClause, stmt.sortClause)
    )
    if aggregated:
        return sp.split_aggregate()
    if stmt.havingClause is not None:
        return sp.split_aggregate()
    return sp.split_plain()


def resolve_refs(split: SelectSplit, n_outputs: int) -> None:
    """Turn the ``__orochi_ref_*`` placeholders of plain combine queries into worker columns."""

    def fn(n):
        if isinstance(n, ast.ColumnRef) and len(n.fields) == 1 and isinstance(n.fields[0], ast.String):
            m = re.fullmatch(r"__orochi_ref_(out|extra)_(\d+)", n.fields[0].sval)
            if m:
                k = int(m.group(2))
                if m.group(1) == "out":
                    if k >= n_outputs:
                        raise PgError("42P10", f"ORDER BY position {k + 1} is not in select list")
                    return col(f"w{k}")
                return col(f"w{n_outputs + k}")
        return None

    for sb in split.combine_sort:
        sb.node = transform(sb.node, fn)
    if split.combine_distinct:
        split.combine_distinct = tuple(transform(e, fn) for e in split.combine_distinct)
