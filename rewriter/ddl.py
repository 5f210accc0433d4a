"""Propagate DDL on distributed and reference tables to their shards (pure: no I/O).

A distributed table is a logical table on the metadata node plus shard tables
``<schema>.<table>_<shardid>`` on the nodes, created to match it (``executor.tabledef``). DDL the
client runs against the logical table must reach every shard, or the shards drift apart from
the table the planner believes in. This module decides which statements concern shards, whether
they can be applied shard by shard, and writes the statement for one shard.

How a caller uses it (the order matters)::

    kind = classify_ddl(stmt)                       # None: not ours, run it as usual
    targets = ddl_targets(stmt, resolve, resolve_index)
    for table in targets:
        check_ddl_supported(stmt, table)            # 0A000 before anything has run
    run the original statement on the metadata node (it validates, and it is the logical table)
    if kind == "create_index" and needs_index_name(stmt):
        stmt = name_index(stmt, <name PostgreSQL chose>)     # see below
    for table, part in split_by_table(stmt, resolve, resolve_index):
        if table is None: continue                  # only non-distributed objects: done above
        for shard in table.shards:
            sql = shard_ddl_statement(part, table, shard)    # run on each of shard.node_ids

Run everything in one (two-phase) transaction where PostgreSQL allows it; ``CREATE/DROP INDEX
CONCURRENTLY`` cannot run in a transaction block, so the caller runs those per shard outside one.

Naming rules (shared with ``executor.tabledef``, which creates the shards):

* A shard table is ``table.shard_name(shard)`` in the logical table's schema; every shard
  statement names it schema-qualified, because the nodes' ``search_path`` may differ.
* A shard's index or constraint is ``<name>_<shardid>``, shortened with a stable hash past 63
  bytes (:func:`rewriter.model.shard_table_name`): index names must be unique per schema, and
  several shards of a table (and the logical table itself) may share a node.
* Unnamed objects: PostgreSQL names an index or constraint after the table it is created on, so
  letting each shard choose would give ``t_102_a_idx`` instead of ``t_a_idx_102``, and a later
  ``DROP INDEX t_a_idx`` could not find the shard's copy. Predicting PostgreSQL's choice needs its
  catalog (the chosen name skips names already taken), so this module does not guess:
  - unnamed ``CREATE INDEX`` is supported: the caller runs it on the logical table first, reads
    the one new index name (``executor.tabledef.read_index_names`` before and after) and passes
    it in with :func:`name_index`; :func:`shard_ddl_statement` refuses an unnamed index.
  - unnamed constraints in ``ALTER TABLE`` (``ADD PRIMARY KEY (...)``, ``ADD COLUMN x int
    UNIQUE``) are refused with 0A000 and a hint to name them: one statement may add several, and
    the before/after difference could not tell them apart. ``ADD ... USING INDEX idx`` is fine:
    the constraint takes the (suffixed) index's name.

What shards deliberately lack (see ``executor.tabledef``): sequence defaults and identity (the
proxy fills those columns), foreign keys. The shard statements keep that true:
``SET DEFAULT nextval(...)`` becomes ``DROP DEFAULT``; identity changes become the no-op
``SET NOT NULL`` (an identity column is always NOT NULL); ``DROP CONSTRAINT`` always carries
``IF EXISTS`` on shards, since the constraint may be a foreign key the shards never had (the
logical table already checked that it exists).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from pglast import ast
from pglast.enums import AlterTableType, ConstrType, ObjectType
from pglast.stream import RawStream

from rewriter.errors import PgError
from rewriter.model import Shard, TableInfo, shard_table_name

Resolve = Callable[[str | None, str], TableInfo | None]
"""``resolve(schema, name)``: the distributed/reference table a name means, else None.

``schema`` is None for an unqualified name; the caller applies the session's search_path. For
``resolve_index`` the name is an index's and the answer is the table the index is on (the caller
looks it up on the metadata node, e.g. ``SELECT indrelid::regclass FROM pg_index ...``).
"""

KINDS = (
    "alter_table",
    "create_index",
    "drop_index",
    "truncate",
    "drop_table",
    "rename_table",
    "rename_index",
)

_SERIAL_TYPES = frozenset({"serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"})

# ALTER TABLE subcommands that mean the same thing applied to each shard. Everything else is
# refused (0A000) rather than passed through, so no unknown subcommand can silently diverge.
_SHARDABLE_AT = frozenset(
    {
        AlterTableType.AT_AddColumn,
        AlterTableType.AT_ColumnDefault,
        AlterTableType.AT_DropNotNull,
        AlterTableType.AT_SetNotNull,
        AlterTableType.AT_DropExpression,
        AlterTableType.AT_SetStatistics,
        AlterTableType.AT_SetOptions,
        AlterTableType.AT_ResetOptions,
        AlterTableType.AT_SetStorage,
        AlterTableType.AT_SetCompression,
        AlterTableType.AT_DropColumn,
        AlterTableType.AT_AddConstraint,
        AlterTableType.AT_ValidateConstraint,
        AlterTableType.AT_DropConstraint,
        AlterTableType.AT_AlterColumnType,
        AlterTableType.AT_ClusterOn,
        AlterTableType.AT_DropCluster,
        AlterTableType.AT_SetLogged,
        AlterTableType.AT_SetUnLogged,
        AlterTableType.AT_SetAccessMethod,
        AlterTableType.AT_SetRelOptions,
        AlterTableType.AT_ResetRelOptions,
        AlterTableType.AT_ReplaceRelOptions,
        AlterTableType.AT_ReplicaIdentity,
        AlterTableType.AT_AddIdentity,
        AlterTableType.AT_SetIdentity,
        AlterTableType.AT_DropIdentity,
        # ALL / USER triggers: shards have no triggers of their own, so these mean the same
        # per shard (pg_dump --disable-triggers emits them around data loads).
        AlterTableType.AT_EnableTrigAll,
        AlterTableType.AT_DisableTrigAll,
        AlterTableType.AT_EnableTrigUser,
        AlterTableType.AT_DisableTrigUser,
    }
)

_AT_WORDS = {
    AlterTableType.AT_AttachPartition: "ATTACH PARTITION",
    AlterTableType.AT_DetachPartition: "DETACH PARTITION",
    AlterTableType.AT_DetachPartitionFinalize: "DETACH PARTITION FINALIZE",
    AlterTableType.AT_AlterConstraint: "ALTER CONSTRAINT (it applies to foreign keys, which "
    "shards do not have)",
    AlterTableType.AT_ChangeOwner: "OWNER TO",
    AlterTableType.AT_SetTableSpace: "SET TABLESPACE",
    AlterTableType.AT_AddInherit: "INHERIT",
    AlterTableType.AT_DropInherit: "NO INHERIT",
    AlterTableType.AT_AddOf: "OF",
    AlterTableType.AT_DropOf: "NOT OF",
    AlterTableType.AT_EnableRowSecurity: "ENABLE ROW LEVEL SECURITY",
    AlterTableType.AT_DisableRowSecurity: "DISABLE ROW LEVEL SECURITY",
    AlterTableType.AT_ForceRowSecurity: "FORCE ROW LEVEL SECURITY",
    AlterTableType.AT_NoForceRowSecurity: "NO FORCE ROW LEVEL SECURITY",
    AlterTableType.AT_GenericOptions: "OPTIONS",
    AlterTableType.AT_SetExpression: "SET EXPRESSION",
}
_TRIGGER_RULE_AT = frozenset(
    {
        AlterTableType.AT_EnableTrig,
        AlterTableType.AT_EnableAlwaysTrig,
        AlterTableType.AT_EnableReplicaTrig,
        AlterTableType.AT_DisableTrig,
        AlterTableType.AT_EnableRule,
        AlterTableType.AT_EnableAlwaysRule,
        AlterTableType.AT_EnableReplicaRule,
        AlterTableType.AT_DisableRule,
    }
)


def _unwrap(stmt: Any) -> Any:
    return stmt.stmt if isinstance(stmt, ast.RawStmt) else stmt


def classify_ddl(stmt: Any) -> str | None:
    """Which propagated DDL a statement (or RawStmt) is, one of :data:`KINDS`; else None.

    ``alter_table`` covers ``ALTER TABLE`` subcommands, ``RENAME COLUMN``, ``RENAME
    CONSTRAINT`` and ``SET SCHEMA`` (the last only so :func:`check_ddl_supported` can refuse it).
    ``rename_index`` is ``ALTER INDEX ... RENAME TO``: the shards' copies must follow, or a later
    ``DROP INDEX`` of the new name would miss them. Other ``ALTER INDEX`` forms (storage
    parameters) are not propagated. None means: not DDL on a table's shards (it may still be
    DDL, e.g. CREATE TABLE, which ``create_distributed_table`` handles).
    """
    s = _unwrap(stmt)
    if isinstance(s, ast.AlterTableStmt):
        return "alter_table" if s.objtype == ObjectType.OBJECT_TABLE else None
    if isinstance(s, ast.IndexStmt):
        return "create_index"
    if isinstance(s, ast.DropStmt):
        if s.removeType == ObjectType.OBJECT_TABLE:
            return "drop_table"
        if s.removeType == ObjectType.OBJECT_INDEX:
            return "drop_index"
        return None
    if isinstance(s, ast.TruncateStmt):
        return "truncate"
    if isinstance(s, ast.RenameStmt):
        if s.renameType == ObjectType.OBJECT_TABLE:
            return "rename_table"
        if s.renameType == ObjectType.OBJECT_INDEX:
            return "rename_index"
        if s.renameType == ObjectType.OBJECT_TABCONSTRAINT:
            return "alter_table"
        if s.renameType == ObjectType.OBJECT_COLUMN and s.relationType == ObjectType.OBJECT_TABLE:
            return "alter_table"
        return None
    if isinstance(s, ast.AlterObjectSchemaStmt):
        return "alter_table" if s.objectType == ObjectType.OBJECT_TABLE else None
    return None


def _name_parts(names: Any) -> tuple[str | None, str]:
    """(schema, name) of a DROP object name list (``[name]``, ``[schema, name]``, 3 parts)."""
    parts = [n.sval for n in names]
    return (parts[-2] if len(parts) >= 2 else None), parts[-1]


def _rv_parts(rv: ast.RangeVar) -> tuple[str | None, str]:
    return rv.schemaname, rv.relname


def _need_resolve_index(resolve_index: Resolve | None) -> Resolve:
    if resolve_index is None:
        raise ValueError("DROP INDEX / ALTER INDEX name the index only: pass resolve_index")
    return resolve_index


def _objects(
    stmt: Any, resolve: Resolve, resolve_index: Resolve | None
) -> list[tuple[Any, TableInfo | None]]:
    """Each object the statement names, with the distributed/reference table it concerns.

    Returns ``[(item, table_or_None)]`` where item is the RangeVar or DROP name list.
    """
    s = _unwrap(stmt)
    kind = classify_ddl(s)
    if kind is None:
        return []
    if kind == "truncate":
        return [(rv, resolve(*_rv_parts(rv))) for rv in s.relations]
    if kind == "drop_table":
        return [(names, resolve(*_name_parts(names))) for names in s.objects]
    if kind == "drop_index":
        by_index = _need_resolve_index(resolve_index)
        return [(names, by_index(*_name_parts(names))) for names in s.objects]
    if kind == "rename_index":
        return [(s.relation, _need_resolve_index(resolve_index)(*_rv_parts(s.relation)))]
    return [(s.relation, resolve(*_rv_parts(s.relation)))]


def ddl_targets(
    stmt: Any, resolve: Resolve, resolve_index: Resolve | None = None
) -> list[TableInfo]:
    """The distributed/reference tables a DDL statement touches, each once, in statement order.

    ``resolve_index`` (index name -> its table) is needed for ``DROP INDEX`` and ``ALTER INDEX
    ... RENAME``, which name only the index; without it those raise ValueError.
    """
    seen: dict[tuple[str, str], TableInfo] = {}
    for _item, table in _objects(stmt, resolve, resolve_index):
        if table is not None and (table.schema, table.name) not in seen:
            seen[(table.schema, table.name)] = table
    return list(seen.values())


def split_by_table(
    stmt: Any, resolve: Resolve, resolve_index: Resolve | None = None
) -> list[tuple[TableInfo | None, Any]]:
    """One statement per distributed/reference table, for :func:`shard_ddl_statement`.

    ``TRUNCATE a, b, c``, ``DROP TABLE a, b`` and ``DROP INDEX i, j`` may name several tables
    (or indexes of several tables), and a shard statement names one shard. Each returned
    statement is a copy of ``stmt`` keeping only the objects of one table; the objects that
    belong to no distributed/reference table come last, under ``None`` (they need nothing but
    the metadata node, where the caller runs the original statement as a whole). Options
    (``CASCADE``, ``IF EXISTS``, ``RESTART IDENTITY``, ``CONCURRENTLY``) are kept in each.
    Single-object statements come back as ``[(table_or_None, stmt)]``.
    """
    s = _unwrap(stmt)
    kind = classify_ddl(s)
    if kind not in ("truncate", "drop_table", "drop_index"):
        tables = ddl_targets(s, resolve, resolve_index) if kind else []
        return [(tables[0] if tables else None, s)]
    groups: dict[tuple[str, str] | None, tuple[TableInfo | None, list]] = {}
    for item, table in _objects(s, resolve, resolve_index):
        key = None if table is None else (table.schema, table.name)
        groups.setdefault(key, (table, []))[1].append(item)
    out: list[tuple[TableInfo | None, Any]] = []
    for key, (table, items) in sorted(groups.items(), key=lambda kv: kv[0] is None):
        if key is not None and kind != "drop_index":
            items = items[:1]  # ``TRUNCATE t, s.t``: the same shard once
        part = copy.deepcopy(s)
        if kind == "truncate":
            part.relations = tuple(copy.deepcopy(items))
        else:
            part.objects = tuple(copy.deepcopy(items))
        out.append((table, part))
    return out


# --- checks ---------------------------------------------------------------------------------


def _unsupported(message: str, hint: str | None = None) -> PgError:
    return PgError("0A000", message, hint=hint)


def _calls_nextval(node: Any) -> bool:
    """Whether an expression tree calls ``nextval`` (a sequence-fed default)."""
    for n in _walk(node):
        if isinstance(n, ast.FuncCall) and n.funcname and n.funcname[-1].sval == "nextval":
            return True
    return False


def _walk(node: Any) -> Iterator[Any]:
    """Every pglast node below (and including) ``node``."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Node):
            yield n
            stack.extend(getattr(n, attr) for attr in n)
        elif isinstance(n, (list, tuple)):
            stack.extend(n)


def _uniqueness_error(table: TableInfo, what: str, name: str | None) -> PgError:
    label = f' "{name}"' if name else ""
    return _unsupported(
        f'cannot create {what}{label} on distributed table "{table.name}": it does not include '
        f'the distribution column "{table.dist_column}"',
        hint="Uniqueness can be enforced only within a shard: include the distribution column "
        "in the key (with = for EXCLUDE), or use a reference table.",
    )


def _check_constraint(con: ast.Constraint, table: TableInfo, column: str | None) -> None:
    """A constraint added by ALTER TABLE (``column`` set when it is inline in ADD COLUMN)."""
    ct = con.contype
    if ct == ConstrType.CONSTR_FOREIGN:
        raise _unsupported(
            f'cannot add a foreign key to distributed table "{table.name}"',
            hint="Shards cannot reference rows on other nodes; foreign keys are not propagated.",
        )
    if ct == ConstrType.CONSTR_IDENTITY or (
        ct == ConstrType.CONSTR_DEFAULT and _calls_nextval(con.raw_expr)
    ):
        raise _unsupported(
            f'cannot add a column filled from a sequence to distributed table "{table.name}"',
            hint="Add the column without the default, fill it, then ALTER COLUMN ... SET DEFAULT.",
        )
    named = (
        ConstrType.CONSTR_CHECK,
        ConstrType.CONSTR_PRIMARY,
        ConstrType.CONSTR_UNIQUE,
        ConstrType.CONSTR_EXCLUSION,
    )
    if ct in named and not con.conname and not con.indexname:
        raise _unsupported(
            f'cannot add an unnamed constraint to distributed table "{table.name}"',
            hint="Name it (ADD CONSTRAINT name ...), so its copies on the shards can be named "
            "after it.",
        )
    dist = table.dist_column
    if table.is_reference or dist is None or con.indexname:
        return  # USING INDEX: the unique index was checked when it was created
    if ct in (ConstrType.CONSTR_PRIMARY, ConstrType.CONSTR_UNIQUE):
        keys = [k.sval for k in con.keys] if con.keys else ([column] if column else [])
        if dist not in keys:
            what = "PRIMARY KEY" if ct == ConstrType.CONSTR_PRIMARY else "UNIQUE constraint"
            raise _uniqueness_error(table, what, con.conname)
    elif ct == ConstrType.CONSTR_EXCLUSION:
        ok = any(
            isinstance(elem, ast.IndexElem) and elem.name == dist and ops and ops[-1].sval == "="
            for elem, ops in con.exclusions or ()
        )
        if not ok:
            raise _uniqueness_error(table, "EXCLUDE constraint", con.conname)


def _check_alter_cmd(cmd: ast.AlterTableCmd, table: TableInfo) -> None:
    st = cmd.subtype
    dist = table.dist_column
    if st not in _SHARDABLE_AT:
        if st in _TRIGGER_RULE_AT:
            words = "ENABLE/DISABLE TRIGGER <name> or RULE (triggers and rules are not propagated)"
        else:
            words = _AT_WORDS.get(st, st.name)
        raise _unsupported(
            f'ALTER TABLE ... {words} is not supported on distributed table "{table.name}"'
        )
    if st == AlterTableType.AT_DropColumn and dist is not None and cmd.name == dist:
        raise _unsupported(f'cannot drop the distribution column "{dist}" of table "{table.name}"')
    if st == AlterTableType.AT_AlterColumnType and dist is not None and cmd.name == dist:
        raise _unsupported(
            f'cannot change the type of the distribution column "{dist}" of table "{table.name}"',
            hint="Rows are placed by the hash of this column's type; changing it would move them.",
        )
    if st == AlterTableType.AT_AddConstraint:
        _check_constraint(cmd.def_, table, None)
    elif st == AlterTableType.AT_AddColumn:
        col: ast.ColumnDef = cmd.def_
        names = [n.sval for n in col.typeName.names] if col.typeName else []
        if len(names) == 1 and names[0] in _SERIAL_TYPES:
            raise _unsupported(
                f'cannot add a {names[0]} column to distributed table "{table.name}"',
                hint="Add the column without the default, fill it, then ALTER COLUMN ... SET "
                "DEFAULT.",
            )
        for con in col.constraints or ():
            _check_constraint(con, table, col.colname)


def check_ddl_supported(stmt: Any, table: TableInfo) -> None:
    """Raise 0A000 for DDL on ``table`` that cannot be applied shard by shard.

    Refused: dropping, retyping or renaming the distribution column (rows are placed by it);
    foreign keys; uniqueness that does not include the distribution column (each shard can only
    enforce it over its own rows); columns filled from a sequence added by ADD COLUMN (existing
    rows would be numbered per shard); unnamed constraints (see the module docstring);
    ``SET SCHEMA`` (shards and catalog would have to move together); ATTACH/DETACH PARTITION;
    and every ALTER TABLE subcommand not known to mean the same per shard (owner, tablespace,
    triggers, rules, row security, inheritance, typed tables). TRUNCATE and DROP TABLE naming
    distributed and other tables together are fine (:func:`split_by_table`).
    """
    s = _unwrap(stmt)
    if isinstance(s, ast.AlterObjectSchemaStmt) and s.objectType == ObjectType.OBJECT_TABLE:
        raise _unsupported(
            f'cannot move distributed table "{table.name}" to another schema',
            hint="Create the table in the new schema and copy the rows.",
        )
    if isinstance(s, ast.AlterTableStmt) and s.objtype == ObjectType.OBJECT_TABLE:
        for cmd in s.cmds or ():
            _check_alter_cmd(cmd, table)
    elif isinstance(s, ast.RenameStmt) and classify_ddl(s) == "alter_table":
        dist = table.dist_column
        if s.renameType == ObjectType.OBJECT_COLUMN and dist is not None and s.subname == dist:
            raise _unsupported(
                f'cannot rename the distribution column "{dist}" of table "{table.name}"'
            )
    elif isinstance(s, ast.IndexStmt):
        dist = table.dist_column
        if s.unique and not table.is_reference and dist is not None:
            keys = [e.name for e in s.indexParams or () if isinstance(e, ast.IndexElem)]
            if dist not in keys:
                raise _uniqueness_error(table, "unique index", s.idxname)


# --- unnamed indexes ------------------------------------------------------------------------


def needs_index_name(stmt: Any) -> bool:
    """Whether ``stmt`` is a ``CREATE INDEX`` without a name (see :func:`name_index`)."""
    s = _unwrap(stmt)
    return isinstance(s, ast.IndexStmt) and not s.idxname


def name_index(stmt: Any, name: str) -> ast.IndexStmt:
    """A copy of an unnamed ``CREATE INDEX`` naming the index ``name``.

    ``name`` is what PostgreSQL chose for the logical table's index, so the shards' copies are
    ``<name>_<shardid>`` like every other shard index.
    """
    s = copy.deepcopy(_unwrap(stmt))
    if not isinstance(s, ast.IndexStmt):
        raise TypeError("name_index needs a CREATE INDEX statement")
    s.idxname = name
    return s


# --- rewriting for one shard ----------------------------------------------------------------


def shard_object_name(name: str, shard: Shard) -> str:
    """The shard's copy of an index or constraint: ``<name>_<shardid>`` (shortened if needed)."""
    return shard_table_name(name, shard.shard_id)


def _shard_rangevar(rv: ast.RangeVar, table: TableInfo, shard: Shard) -> None:
    rv.catalogname = None
    rv.schemaname = table.schema
    rv.relname = table.shard_name(shard)


def _requalify_columns(node: Any, table: TableInfo, shard: Shard) -> None:
    """Point ``t.col`` / ``s.t.col`` references in expressions at the shard's name.

    CHECK constraints, index expressions and predicates, ``USING`` and generated expressions
    may qualify a column with the table's name; on the shard that name does not exist.
    """
    shard_name = table.shard_name(shard)
    for n in _walk(node):
        if not isinstance(n, ast.ColumnRef) or not n.fields or len(n.fields) < 2:
            continue
        fields = list(n.fields)
        names = [f.sval if isinstance(f, ast.String) else None for f in fields]
        if len(fields) >= 3 and names[-3] is not None and names[-3] != table.schema:
            continue
        if names[-2] != table.name:
            continue
        fields[-2] = ast.String(sval=shard_name)
        n.fields = tuple(fields)


def _single(items: Any, what: str) -> Any:
    if not items or len(items) != 1:
        raise ValueError(f"{what} naming several objects: use split_by_table() first")
    return items[0]


def _alter_cmd_for_shard(cmd: ast.AlterTableCmd, shard: Shard) -> ast.AlterTableCmd:
    st = cmd.subtype
    if st in (
        AlterTableType.AT_AddIdentity,
        AlterTableType.AT_SetIdentity,
        AlterTableType.AT_DropIdentity,
    ):
        # Shards have no identity; the column is NOT NULL either way, so this is a no-op that
        # keeps the statement's shape (and still fails, like the original, on a missing column).
        return ast.AlterTableCmd(
            subtype=AlterTableType.AT_SetNotNull, name=cmd.name, behavior=cmd.behavior
        )
    if st == AlterTableType.AT_ColumnDefault and cmd.def_ is not None and _calls_nextval(cmd.def_):
        cmd.def_ = None  # the proxy fills sequence-fed columns: DROP DEFAULT on shards
    elif st == AlterTableType.AT_AddConstraint:
        _constraint_for_shard(cmd.def_, shard)
    elif st == AlterTableType.AT_AddColumn:
        for con in cmd.def_.constraints or ():
            _constraint_for_shard(con, shard)
    elif st == AlterTableType.AT_DropConstraint:
        cmd.name = shard_object_name(cmd.name, shard)
        cmd.missing_ok = True
    elif st in (AlterTableType.AT_ValidateConstraint, AlterTableType.AT_ClusterOn):
        cmd.name = shard_object_name(cmd.name, shard)
    elif st == AlterTableType.AT_ReplicaIdentity and cmd.def_.name:
        cmd.def_.name = shard_object_name(cmd.def_.name, shard)
    return cmd


def _constraint_for_shard(con: ast.Constraint, shard: Shard) -> None:
    if con.conname:
        con.conname = shard_object_name(con.conname, shard)
    elif (
        con.contype
        in (
            ConstrType.CONSTR_CHECK,
            ConstrType.CONSTR_PRIMARY,
            ConstrType.CONSTR_UNIQUE,
            ConstrType.CONSTR_EXCLUSION,
        )
        and not con.indexname
    ):
        raise ValueError("unnamed constraint: check_ddl_supported() refuses it")
    if con.indexname:
        con.indexname = shard_object_name(con.indexname, shard)


def shard_ddl_statement(stmt: Any, table: TableInfo, shard: Shard) -> str:
    """The text of ``stmt`` for one shard of ``table`` (``stmt`` itself is not modified).

    Relation names become the shard's, schema-qualified; index and constraint names get
    ``_<shardid>`` (CREATE INDEX, DROP INDEX, ALTER INDEX RENAME, ADD/DROP/VALIDATE/RENAME
    CONSTRAINT, USING INDEX, CLUSTER ON, REPLICA IDENTITY USING INDEX); ``RENAME TO new`` of a
    table gives the shard ``shard_table_name(new, shardid)``, which the caller records in the
    catalog. Everything else (CONCURRENTLY, IF EXISTS, IF NOT EXISTS, ONLY, CASCADE, USING, WHERE)
    is kept. Multi-table TRUNCATE / DROP TABLE / DROP INDEX must come from
    :func:`split_by_table` (a DROP INDEX is trusted to name only ``table``'s indexes; the others
    raise ValueError when they name several objects). Raises the 0A000 of :func:`check_ddl_supported` too, so an unchecked statement
    cannot slip through.
    """
    kind = classify_ddl(stmt)
    if kind is None:
        raise ValueError("not a DDL statement propagated to shards")
    check_ddl_supported(stmt, table)
    s = copy.deepcopy(_unwrap(stmt))
    if kind == "create_index":
        if not s.idxname:
            raise ValueError("unnamed CREATE INDEX: name it with name_index() first")
        _shard_rangevar(s.relation, table, shard)
        s.idxname = shard_object_name(s.idxname, shard)
    elif kind == "drop_index":
        # After split_by_table every index named here is on ``table``; an index lives in its
        # table's schema, so the shard's copy is qualified with that.
        s.objects = tuple(
            (ast.String(sval=table.schema), ast.String(sval=shard_object_name(name, shard)))
            for _schema, name in map(_name_parts, s.objects)
        )
    elif kind == "drop_table":
        _single(s.objects, "DROP TABLE")
        s.objects = ((ast.String(sval=table.schema), ast.String(sval=table.shard_name(shard))),)
    elif kind == "truncate":
        _shard_rangevar(_single(s.relations, "TRUNCATE"), table, shard)
    elif kind == "rename_table":
        _shard_rangevar(s.relation, table, shard)
        s.newname = shard_table_name(s.newname, shard.shard_id)
    elif kind == "rename_index":
        s.relation.catalogname = None
        s.relation.schemaname = table.schema
        s.relation.relname = shard_object_name(s.relation.relname, shard)
        s.newname = shard_object_name(s.newname, shard)
    elif isinstance(s, ast.RenameStmt):  # RENAME COLUMN / RENAME CONSTRAINT
        _shard_rangevar(s.relation, table, shard)
        if s.renameType == ObjectType.OBJECT_TABCONSTRAINT:
            s.subname = shard_object_name(s.subname, shard)
            s.newname = shard_object_name(s.newname, shard)
    else:  # ALTER TABLE
        _shard_rangevar(s.relation, table, shard)
        s.cmds = tuple(_alter_cmd_for_shard(cmd, shard) for cmd in s.cmds)
    _requalify_columns(s, table, shard)
    return RawStream()(s).strip()
