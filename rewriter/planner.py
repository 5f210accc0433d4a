"""Plan one statement over distributed and reference tables (pure: no I/O).

The plan keeps SQL *templates*: the statement deparsed once with each catalog table replaced by
a placeholder token (``__orochi_rel_<n>__``, aliased to the name the statement used so column
references still resolve). Producing the SQL for shard ``i`` is then a string replacement, not a
pglast deparse (100–500 µs) per shard.

Strategies, cheapest first (DESIGN.md):

* ``router`` — every distributed table is pinned to one shard by its distribution column (known
  at plan time from literals, or at Bind from parameters): the original statement runs on one
  node and its answer is relayed unchanged.
* ``multi`` — the statement (SELECT: the worker query of :mod:`rewriter.combine`) runs on every
  shard it can touch; answers are concatenated or combined. Distributed tables must be joined on
  their distribution columns (co-located) and must not sit in subqueries or CTEs.
* reference tables only — reads run on one node holding a copy, writes on every copy.

Anything else raises ``0A000`` with the construct named.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from pglast import ast, parse_sql
from pglast.enums import SetOperation

from rewriter import combine
from rewriter.errors import PgError
from rewriter.model import ClusterModel, TableInfo
from rewriter.pruning import PinValue, analyze_scope
from rewriter.quoting import quote_ident
from rewriter.relations import Occurrence, RelationScan, scan_relations, walk

_CONNAME = "__orochi_conname__"


def token(i: int) -> str:
    return f"__orochi_rel_{i}__"


@dataclass
class InsertRow:
    """One VALUES row of an INSERT into a distributed table: its SQL text and shard key."""

    values_sql: str
    key: PinValue | None  # None: the distribution column is missing/DEFAULT (NULL key)
    params: tuple[int, ...] = ()  # $n used by this row (1-based, ascending)
    # Hypertables: the time column's value; kind "expr" is an expression (text = its SQL) that
    # the proxy evaluates and writes in place of ``__orochi_time__`` in ``values_sql``.
    time_key: PinValue | None = None


@dataclass
class Plan:
    kind: str  # "select" | "modify" | "insert" | "ref_select" | "ref_modify"
    sql: str  # the original statement text
    tables: list[TableInfo]  # catalog tables touched, in placeholder order
    template: str  # the statement with placeholders (router / reference execution)
    shard_count: int = 1
    pins: list[list[PinValue]] | None = None  # AND of OR-sets restricting the shard set
    dist_type: str | None = None
    split: combine.SelectSplit | None = None  # multi-shard SELECT
    worker_template: str | None = None
    returning: bool = False
    command: str = "SELECT"  # command tag verb
    # INSERT into a distributed table:
    insert_prefix: str = ""  # "INSERT INTO <tok> AS t (cols) VALUES "
    insert_suffix: str = ""  # " ON CONFLICT ... RETURNING ..."
    insert_rows: list[InsertRow] = field(default_factory=list)
    multi_error: PgError | None = None  # raised if execution needs more than one shard
    insert_fill: list[str] = field(default_factory=list)  # SQL for __orochi_fill_<i>__ values
    # ON CONFLICT ON CONSTRAINT <name>: each shard's copy of the constraint is <name>_<shardid>.
    conflict_constraint: str | None = None
    # INSERT ... SELECT run through the proxy: the SELECT, and the target columns it feeds.
    select_sql: str | None = None
    insert_columns: tuple[str, ...] = ()
    has_params: bool = False
    # Hypertables: (WHERE clause, names of the hypertable in it) for chunk exclusion at execution.
    time_filter: tuple[ast.Node, frozenset[str]] | None = None
    # Set on a per-execution copy when compressed chunks are read: shard index -> the SELECT
    # that replaces table ``warm_table``'s shard (heap UNION ALL decoded segments).
    warm_table: int = -1
    warm_sql: dict[int, str] | None = None

    @property
    def first_distributed(self) -> int:
        """Index in ``tables`` of the first distributed (not reference) table; it decides shards."""
        return next((i for i, t in enumerate(self.tables) if not t.is_reference), 0)

    def sql_for_shard(self, template: str, shard_index: int) -> str:
        out = template
        if self.warm_sql is not None and shard_index in self.warm_sql:
            t = self.tables[self.warm_table]
            out = out.replace(f"{quote_ident(t.schema)}.{token(self.warm_table)}", f"({self.warm_sql[shard_index]})")
        for i, t in enumerate(self.tables):
            idx = 0 if t.is_reference else shard_index
            shard = t.shards[idx]
            out = out.replace(token(i), quote_ident(t.shard_name(shard)))
        if self.conflict_constraint is not None:
            from rewriter.ddl import shard_object_name

            target = self.tables[0]
            shard = target.shards[0 if target.is_reference else shard_index]
            out = out.replace(_CONNAME, quote_ident(shard_object_name(self.conflict_constraint, shard)))
        return out




def _fresh_copy(stmt: ast.Node, sql: str) -> ast.Node:
    try:
        fresh = parse_sql(sql)
    except Exception:  # noqa: BLE001 - fall back to copying the given tree
        return copy.deepcopy(stmt)
    if len(fresh) == 1 and type(fresh[0].stmt) is type(stmt):
        return fresh[0].stmt
    return copy.deepcopy(stmt)


def parse_one(sql: str) -> ast.Node:
    stmts = parse_sql(sql)
    if len(stmts) != 1:
        raise PgError("42601", "cannot insert multiple commands into a prepared statement")
    return stmts[0].stmt


def _check_cte_shadowing(stmt: ast.Node, model: ClusterModel, search_path: tuple[str, ...]) -> None:
    """Refuse CTEs whose name shadows a catalog table where statement-wide resolution is wrong.

    Relation scanning treats a CTE name as hiding the table everywhere in the statement. That
    is right for a CTE of the statement's own WITH that does not read the name itself; a CTE of
    a nested WITH (visible only inside it) or one whose body reads the table it shadows would
    hide the real table from the planner, and the statement would read the empty shell.
    """
    top_ctes = set()
    with_clause = getattr(stmt, "withClause", None)
    if with_clause is not None:
        top_ctes = {id(c) for c in with_clause.ctes}
    for node in combine_walk(stmt):
        if not isinstance(node, ast.CommonTableExpr):
            continue
        if model.lookup(None, node.ctename, search_path) is None:
            continue
        reads_itself = any(
            isinstance(n, ast.RangeVar) and n.schemaname is None and n.relname == node.ctename
            for n in combine_walk(node.ctequery)
        )
        if id(node) not in top_ctes or reads_itself:
            raise combine.unsupported(
                f'a CTE named like the distributed table "{node.ctename}" in a nested WITH or reading that table',
                "Rename the CTE.",
            )


def _apply_tokens(scan: RelationScan) -> list[TableInfo]:
    """Rename every catalog-table mention to a placeholder (keeping its alias); tables by token."""
    tables: list[TableInfo] = []
    index_of: dict[tuple[str, str], int] = {}
    for occ in scan.occurrences:
        key = (occ.table.schema, occ.table.name)
        if key not in index_of:
            index_of[key] = len(tables)
            tables.append(occ.table)
        rv = occ.node
        if rv.alias is None:
            rv.alias = ast.Alias(aliasname=rv.relname)
        rv.relname = token(index_of[key])
        rv.schemaname = occ.table.schema
    return tables


def _deparse(node: ast.Node) -> str:
    return combine.deparse(node)


def plan_statement(
    stmt: ast.Node, sql: str, model: ClusterModel, search_path: tuple[str, ...], aggregate_names: frozenset[str]
) -> Plan | None:
    """Plan ``stmt`` (parsed from ``sql``); None if it touches no catalog table."""
    if isinstance(stmt, ast.ExplainStmt):
        raise combine.unsupported("EXPLAIN of a statement on distributed tables", "EXPLAIN support is coming; run the statement itself.")
    if not isinstance(stmt, ast.SelectStmt | ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
        return None
    # A private tree (placeholders are written into it): parsing the text again in C is far
    # cheaper than pglast's Python deepcopy of the tree.
    stmt = _fresh_copy(stmt, sql)
    _check_cte_shadowing(stmt, model, search_path)
    scan = scan_relations(stmt, model, search_path)
    if not scan.occurrences:
        return None
    dist = scan.distributed
    if isinstance(stmt, ast.InsertStmt):
        # The target is written, not joined: INSERT planning checks its sources itself.
        return _plan_insert(stmt, sql, scan, model, search_path, aggregate_names)
    if dist and scan.other_relations:
        other = scan.other_relations[0]
        name = f"{other.schemaname}.{other.relname}" if other.schemaname else other.relname
        raise combine.unsupported(
            f"joining distributed table {dist[0].table.name} with local table {name}",
            f"Make {name} a reference table (SELECT create_reference_table('{name}')) or distribute it on the same key.",
        )
    if dist:
        colocations = {o.table.colocation_id for o in dist}
        if len(colocations) > 1:
            names = sorted({o.table.name for o in dist})
            raise combine.unsupported(
                f"joining tables that are not co-located ({', '.join(names)})",
                "Distribute them on columns of the same type with colocate_with, and join on the distribution columns.",
            )
    if isinstance(stmt, ast.InsertStmt):
        return _plan_insert(stmt, sql, scan, model, search_path, aggregate_names)
    if isinstance(stmt, ast.SelectStmt):
        return _plan_select(stmt, sql, scan, aggregate_names)
    return _plan_modify(stmt, sql, scan)


# ------------------------------------------------------------------------------------ SELECT
def _from_and_where(stmt: ast.Node) -> tuple[list[ast.Node], ast.Node | None]:
    if isinstance(stmt, ast.SelectStmt):
        return list(stmt.fromClause or ()), stmt.whereClause
    if isinstance(stmt, ast.UpdateStmt):
        return [stmt.relation, *(stmt.fromClause or ())], stmt.whereClause
    if isinstance(stmt, ast.DeleteStmt):
        return [stmt.relation, *(stmt.usingClause or ())], stmt.whereClause
    return [], None


def _routing(stmt: ast.Node, scan: RelationScan) -> tuple[list[list[PinValue]] | None, PgError | None]:
    """Pins for the distributed tables, and the error to raise if the statement must run multi-shard."""
    dist = scan.distributed
    nested = [o for o in dist if not o.top_level]
    top = [o for o in dist if o.top_level]
    from_items, where = _from_and_where(stmt)
    pinning = analyze_scope(scan.occurrences, from_items, where)
    multi_error: PgError | None = None
    if pinning.multi_shard_problem is not None:
        multi_error = combine.unsupported(
            pinning.multi_shard_problem,
            "Put a distributed table on the preserved side (e.g. users LEFT JOIN countries), or "
            "filter the distributed table on its distribution column so the query runs on one shard.",
        )
    if nested:
        if isinstance(stmt, ast.SelectStmt) and stmt.op != SetOperation.SETOP_NONE:
            what = "UNION/INTERSECT/EXCEPT over distributed tables"
        else:
            what = f"a subquery or CTE over distributed table {nested[0].table.name}"
        err = combine.unsupported(what, "Run it in parts (select the subquery's result first), or filter every distributed table on its distribution column.")
        # Pins found at the top level say nothing about a subquery's own rows: each nested
        # distributed table must be pinned within its own query level. All pins are then united
        # (as for non-co-located joins): one shard in total runs as a router query, more raise
        # ``err`` at execution.
        values: list[PinValue] = []
        scopes: dict[int, ast.Node] = {}
        for o in nested:
            scopes.setdefault(id(o.scope), o.scope)  # type: ignore[arg-type]
        for scope in scopes.values():
            s_from, s_where = _from_and_where(scope)
            s_pinning = analyze_scope(scan.occurrences, s_from, s_where, scope)
            for o in nested:
                if o.scope is scope:
                    groups = s_pinning.value_sets([o])
                    if groups is None:
                        raise err
                    for g in groups:
                        values.extend(g)
        if not top:
            return [values], err
        for o in top:
            groups = pinning.value_sets([o])
            if groups is None:
                raise err
            for g in groups:
                values.extend(g)
        return [values], err
    if len(top) > 1 and not pinning.connected(top):
        err = combine.unsupported(
            "a join of distributed tables that is not on their distribution columns",
            "Join co-located tables with equality on their distribution columns.",
        )
        if multi_error is None:
            multi_error = err
        pins = _pins_all_pinned(pinning, top)
        if pins is None:
            raise err
        return pins, multi_error
    pins = pinning.value_sets(top) if top else None
    if nested and pins is None:
        raise multi_error  # type: ignore[misc]
    return pins, multi_error


def _pins_all_pinned(pinning, occurrences: list[Occurrence]) -> list[list[PinValue]] | None:
    """For a non-co-located join: usable only if every table is pinned (router to one shard).

    The tables' pins are *united* into one OR-set, not intersected: ``a.k = 5 AND b.k = 7``
    needs shard(5) of ``a`` and shard(7) of ``b``. Intersecting gave no shard (the router then
    ran shard 0) or only one table's shard; the union gives both, and more than one shard
    raises the plan's ``multi_error`` at execution. (Uniting a table's own AND-ed sets too can
    only add shards, never lose one.)
    """
    values: list[PinValue] = []
    for o in occurrences:
        g = pinning.value_sets([o])
        if g is None:
            return None
        for group in g:
            values.extend(group)
    return [values]


def _plan_select(stmt: ast.SelectStmt, sql: str, scan: RelationScan, aggregate_names) -> Plan:
    dist = scan.distributed
    if not dist:
        tables = _apply_tokens(scan)
        return Plan("ref_select", sql, tables, _deparse(stmt))
    pins, multi_error = _routing(stmt, scan)
    time_filter = _time_filter(stmt, scan)
    tables = _apply_tokens(scan)
    template = _deparse(stmt)
    first = dist[0].table
    plan = Plan(
        "select", sql, tables, template,
        shard_count=first.shard_count, pins=pins, dist_type=first.dist_type, multi_error=multi_error,
        time_filter=time_filter,
    )
    if multi_error is None:
        try:
            arg_calls = combine.needs_arg_types(stmt, aggregate_names)
            input_columns = frozenset(c for o in scan.occurrences for c in o.table.columns)
            plan.split = combine.split_select(
                stmt, aggregate_names, {id(c): "numeric" for c in arg_calls} if arg_calls else None, input_columns
            )
            plan.worker_template = _deparse(plan.split.worker)
        except PgError as exc:
            if exc.sqlstate != "0A000":
                raise
            plan.multi_error = exc
    return plan


# ------------------------------------------------------------------------------------ UPDATE/DELETE
def _plan_modify(stmt: ast.UpdateStmt | ast.DeleteStmt, sql: str, scan: RelationScan) -> Plan:
    target = stmt.relation
    target_occ = next(o for o in scan.occurrences if o.node is target) if any(o.node is target for o in scan.occurrences) else None
    verb = "UPDATE" if isinstance(stmt, ast.UpdateStmt) else "DELETE"
    returning = bool(stmt.returningClause)
    if target_occ is None:
        # Writing a local table while reading catalog tables: the catalog tables' data is not
        # on the metadata node.
        raise combine.unsupported(f"{verb} of a local table that reads distributed or reference tables")
    if target_occ.is_reference:
        if scan.distributed:
            raise combine.unsupported(f"{verb} of reference table {target_occ.table.name} that reads distributed tables")
        tables = _apply_tokens(scan)
        return Plan("ref_modify", sql, tables, _deparse(stmt), command=verb, returning=returning)
    if isinstance(stmt, ast.UpdateStmt):
        dist_col = target_occ.table.dist_column
        if target_occ.table.hypertable is not None and target_occ.table.shard_count == 1:
            dist_col = None  # the time column of a one-shard hypertable: rows move between chunks
        for t in stmt.targetList or ():
            if t.name == dist_col:
                raise PgError(
                    "0A000",
                    f"modifying the distribution column {dist_col} of {target_occ.table.name} is not supported",
                    hint="Delete the row and insert it with the new value.",
                )
    pins, multi_error = _routing(stmt, scan)
    time_filter = _time_filter(stmt, scan)
    tables = _apply_tokens(scan)
    first = target_occ.table
    return Plan(
        "modify", sql, tables, _deparse(stmt), shard_count=first.shard_count, pins=pins,
        dist_type=first.dist_type, multi_error=multi_error, command=verb, returning=returning,
        time_filter=time_filter,
    )


def _time_filter(stmt: ast.Node, scan: RelationScan) -> tuple[ast.Node, frozenset[str]] | None:
    """The WHERE clause and the names of the one hypertable it can prune chunks of.

    Only for a hypertable read once at the top level (a self-join or a subquery over it is not
    pruned); must run before ``_apply_tokens`` renames the relations.
    """
    hyper = [o for o in scan.distributed if o.table.hypertable is not None]
    if len(hyper) != 1 or not hyper[0].top_level:
        return None
    _, where = _from_and_where(stmt)
    if where is None:
        return None
    return where, frozenset({hyper[0].alias})


# ------------------------------------------------------------------------------------ INSERT
def _plan_insert(stmt: ast.InsertStmt, sql: str, scan: RelationScan, model, search_path, aggregate_names) -> Plan:
    target = stmt.relation
    target_occ = next((o for o in scan.occurrences if o.node is target), None)
    returning = bool(stmt.returningClause)
    if target_occ is None:
        raise combine.unsupported("INSERT into a local table from distributed or reference tables")
    table = target_occ.table
    if stmt.onConflictClause is not None and stmt.onConflictClause.targetList and not table.is_reference:
        for t in stmt.onConflictClause.targetList:
            if t.name == table.dist_column:
                raise PgError("0A000", f"modifying the distribution column {table.dist_column} of {table.name} is not supported")
    conflict_constraint = None
    infer = stmt.onConflictClause.infer if stmt.onConflictClause is not None else None
    if infer is not None and infer.conname:
        conflict_constraint = infer.conname
        infer.conname = _CONNAME
    if table.is_reference:
        if scan.distributed:
            raise combine.unsupported(f"INSERT into reference table {table.name} from distributed tables")
        tables = _apply_tokens(scan)
        plan = Plan("ref_modify", sql, tables, _deparse(stmt), command="INSERT", returning=returning)
        plan.conflict_constraint = conflict_constraint
        return plan
    select = stmt.selectStmt
    if select is None or not isinstance(select, ast.SelectStmt) or not select.valuesLists:
        try:
            plan = _plan_insert_select(stmt, sql, scan, table, model, search_path)
            plan.conflict_constraint = conflict_constraint
            return plan
        except PgError as exc:
            if exc.sqlstate != "0A000" or stmt.onConflictClause is not None or stmt.returningClause:
                raise
            return _plan_insert_select_via_proxy(stmt, sql, table, exc)
    if len(scan.occurrences) > 1:
        raise combine.unsupported("INSERT ... VALUES with subqueries over catalog tables")
    if stmt.withClause is not None:
        raise combine.unsupported("WITH ... INSERT into a distributed table")
    # Column list as PostgreSQL sees it; sequence-fed columns the statement leaves out (or sets
    # to DEFAULT) are filled by the proxy from the metadata node's sequences.
    width = len(select.valuesLists[0])
    names = [c.name for c in stmt.cols] if stmt.cols else list(table.columns[:width])
    fill_exprs: list[str] = []
    missing = [c for c in table.fill if c not in names]
    if missing:
        if not stmt.cols:
            stmt.cols = tuple(ast.ResTarget(name=n) for n in names)
        stmt.cols = tuple(stmt.cols) + tuple(ast.ResTarget(name=n) for n in missing)
        names = names + missing
    fill_slot: dict[str, int] = {}
    for c in names:
        if c in table.fill:
            fill_slot[c] = len(fill_exprs)
            fill_exprs.append(table.fill[c])
    pos = names.index(table.dist_column) if table.dist_column in names else -1
    ht = table.hypertable
    tpos = -1
    if ht is not None:
        if ht.time_column not in names:
            raise combine.unsupported(
                f'an INSERT into hypertable {table.name} without a value for its time column "{ht.time_column}"',
                "Give the time column a value (a literal, a parameter or an expression such as now()).",
            )
        tpos = names.index(ht.time_column)
    rows: list[InsertRow] = []
    new_values = []
    for values in select.valuesLists:
        values = list(values) + [None] * len(missing)
        for i, c in enumerate(names):
            if c in fill_slot and (values[i] is None or isinstance(values[i], ast.SetToDefault)):
                values[i] = ast.ColumnRef(fields=(ast.String(sval=f"__orochi_fill_{fill_slot[c]}__"),))
        time_key = _time_value(values, tpos, ht) if ht is not None else None
        key: PinValue | None = None
        if pos >= 0 and pos == tpos:
            key = time_key
        elif pos >= 0:
            if pos >= len(values):
                raise PgError("42601", "INSERT has more target columns than expressions")
            v = values[pos]
            if isinstance(v, ast.SetToDefault):
                key = None
            elif isinstance(v, ast.ColumnRef) and names[pos] in fill_slot:
                key = PinValue("fill", number=fill_slot[names[pos]])
            else:
                from rewriter.pruning import _const_value

                key = _const_value(v, table.dist_type)
                if key is None:
                    raise combine.unsupported(
                        f"an expression as the value of distribution column {table.dist_column}",
                        "Use a literal or a parameter for the distribution column.",
                    )
        params = sorted({n.number for n in combine_walk(values) if isinstance(n, ast.ParamRef)})
        row_sql = "(" + ", ".join(_deparse(v) for v in values) + ")"
        rows.append(InsertRow(row_sql, key, tuple(params), time_key))
        new_values.append(tuple(values))
    tables = _apply_tokens(scan)
    head = copy.copy(stmt)
    head.selectStmt = ast.SelectStmt(
        valuesLists=((ast.A_Const(val=ast.Integer(ival=0)),),), limitOption=0, op=SetOperation.SETOP_NONE
    )
    text = _deparse(head)
    marker = "VALUES (0)"
    i = text.index(marker)
    plan = Plan(
        "insert", sql, tables, _deparse(stmt), shard_count=table.shard_count,
        dist_type=table.dist_type, command="INSERT", returning=returning,
    )
    plan.insert_prefix = text[:i] + "VALUES "
    plan.insert_suffix = text[i + len(marker):]
    plan.insert_rows = rows
    plan.conflict_constraint = conflict_constraint
    plan.insert_fill = fill_exprs
    return plan


combine_walk = walk  # every node below a node (rewriter.relations.walk)

TIME_PLACEHOLDER = "__orochi_time__"


def _time_value(values: list, tpos: int, ht) -> PinValue:
    """The time column's value of one VALUES row of a hypertable INSERT.

    A literal or ``$n`` is read directly. An expression (``now()``, ``'2024-01-01'::date +
    1``) is replaced by a placeholder: the proxy evaluates it once, routes the row by the
    result and sends that value, so the node stores exactly the time the chunk was chosen for.
    """
    from rewriter.pruning import _const_value

    if tpos >= len(values):
        raise PgError("42601", "INSERT has more target columns than expressions")
    v = values[tpos]
    if v is None or isinstance(v, ast.SetToDefault):
        raise combine.unsupported(
            f'DEFAULT for the time column "{ht.time_column}" of a hypertable',
            "Give the time column a value (a literal, a parameter or an expression such as now()).",
        )
    key = _const_value(v, ht.time_type)
    if key is not None:
        return key
    if any(isinstance(n, ast.ParamRef | ast.SubLink | ast.ColumnRef) for n in combine_walk(v)):
        raise combine.unsupported(
            f'this expression as the value of time column "{ht.time_column}"',
            "Use a literal, a parameter, or an expression without parameters or subqueries such as now().",
        )
    expr = _deparse(v)
    values[tpos] = ast.ColumnRef(fields=(ast.String(sval=TIME_PLACEHOLDER),))
    return PinValue("expr", expr)


def _plan_insert_select(stmt: ast.InsertStmt, sql: str, scan: RelationScan, table: TableInfo, model, search_path) -> Plan:
    """INSERT INTO dist SELECT ... FROM co-located dist tables: pushed down shard by shard.

    Valid when every row the SELECT produces from shard ``i`` of the sources belongs to shard
    ``i`` of the target: the target's distribution column must receive a co-located source's
    distribution column unchanged, and the SELECT must not merge rows across shards.
    """
    def refuse(why: str) -> PgError:
        return combine.unsupported(
            f"INSERT ... SELECT into distributed table {table.name} ({why})",
            "Push-down needs the target's distribution column to come straight from a co-located table's "
            "distribution column; otherwise select the rows and insert them with VALUES or COPY.",
        )

    select = stmt.selectStmt
    if not isinstance(select, ast.SelectStmt) or select.op != SetOperation.SETOP_NONE:
        raise refuse("set operations")
    if stmt.withClause is not None or select.withClause is not None:
        raise refuse("WITH")
    sub = scan_relations(select, model, search_path)
    if sub.other_relations:
        raise refuse("local tables in the SELECT")
    dist = sub.distributed
    if not dist:
        raise refuse("no distributed table in the SELECT")
    if any(not o.top_level for o in dist):
        raise refuse("subqueries over distributed tables")
    if any(o.table.colocation_id != table.colocation_id for o in dist):
        raise refuse("the tables are not co-located")
    if (
        select.groupClause or select.havingClause or select.distinctClause is not None or select.limitCount
        or select.limitOffset or select.sortClause or select.windowClause or select.lockingClause
    ):
        raise refuse("GROUP BY, DISTINCT, ORDER BY, LIMIT or window clauses")
    if any(combine.contains(t, lambda n: isinstance(n, ast.FuncCall) and (n.over is not None or n.funcname[-1].sval in model.aggregate_names)) for t in select.targetList or ()):
        raise refuse("aggregates or window functions")
    pinning = analyze_scope(sub.occurrences, list(select.fromClause or ()), select.whereClause)
    if len(dist) > 1 and not pinning.connected(dist):
        raise refuse("the SELECT joins distributed tables on other columns")
    names = [c.name for c in stmt.cols] if stmt.cols else list(table.columns)
    if table.dist_column not in names:
        raise refuse("the distribution column gets no value")
    pos = names.index(table.dist_column)
    from rewriter.pruning import ScopeAnalyzer

    analyzer = ScopeAnalyzer(sub.occurrences)
    targets = list(select.targetList or ())
    source = None
    if len(targets) == 1 and isinstance(targets[0].val, ast.ColumnRef) and isinstance(targets[0].val.fields[-1], ast.A_Star):
        if len(dist) == 1 and pos < len(dist[0].table.columns) and dist[0].table.columns[pos] == dist[0].table.dist_column:
            source = dist[0]
    elif pos < len(targets):
        source = analyzer.column_occurrence(targets[pos].val)
    if source is None:
        raise refuse("the distribution column is not fed by a co-located distribution column")
    if table.fill and any(c not in names for c in table.fill):
        raise refuse("sequence-fed columns left to their defaults")
    pins = pinning.value_sets(dist)
    tables = _apply_tokens(scan)
    return Plan(
        "modify", sql, tables, _deparse(stmt), shard_count=table.shard_count, pins=pins,
        dist_type=table.dist_type, command="INSERT", returning=bool(stmt.returningClause),
    )


def _plan_insert_select_via_proxy(stmt: ast.InsertStmt, sql: str, table: TableInfo, why: PgError) -> Plan:
    """INSERT ... SELECT that cannot run shard by shard: the proxy runs the SELECT and routes rows.

    The SELECT may be anything the proxy can answer (a multi-shard merge, a reference table, local
    tables); its rows are routed by the distribution column like COPY. RETURNING and ON CONFLICT
    are not offered on this path (the caller raises ``why`` for them).
    """
    select = stmt.selectStmt
    names = [c.name for c in stmt.cols] if stmt.cols else None
    if names is None:
        names = list(table.columns)
    if not table.is_reference and table.dist_column not in names and table.dist_column not in table.fill:
        raise why
    select_sql = _deparse(select)
    if stmt.withClause is not None:
        prefix = "WITH RECURSIVE " if stmt.withClause.recursive else "WITH "
        select_sql = prefix + _deparse(stmt.withClause) + " " + select_sql
    return Plan(
        "insert_select", sql, [table], "", shard_count=table.shard_count, dist_type=table.dist_type,
        command="INSERT", select_sql=select_sql, insert_columns=tuple(names),
    )
