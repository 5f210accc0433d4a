"""Read a table's definition from the PostgreSQL catalogs and write the DDL of its shards.

``create_distributed_table('s.t', 'col')`` turns an ordinary table on the metadata node into
shards ``s.t_<shardid>`` on the nodes. Every shard must look like the logical table to the
statements the rewriter sends it (same columns, types, NOT NULL, defaults, CHECK / PRIMARY KEY /
UNIQUE / EXCLUDE constraints, indexes), or pushed-down queries and constraint checks would
behave differently from one big PostgreSQL. So the definition is read from the catalogs with
PostgreSQL's own deparsers (``format_type``, ``pg_get_expr``, ``pg_get_constraintdef``,
``pg_get_indexdef``), the way ``pg_dump`` does, and not reconstructed by hand.

What shards deliberately do *not* get:

* **Sequences.** A ``serial`` / ``nextval(...)`` default or an identity column on a shard would
  number rows per shard, so two shards would hand out the same ids. The proxy fills such
  columns from the logical table's sequence instead (``ColumnDef.uses_sequence``); the shard
  column is a plain ``NOT NULL`` column without a default.
* **Foreign keys.** A shard cannot reference rows that live on other nodes; they are omitted
  (the rewriter refuses ``ADD FOREIGN KEY`` on distributed tables for the same reason).
* Triggers, rules, row-level-security policies, grants, comments, statistics objects,
  tablespaces and per-column storage settings: not copied (see :func:`read_table_definition`).

Shard-local object names get the shard id as suffix (``t_pkey`` -> ``t_pkey_102``) because
index names are unique per schema and several shards of one table may share a node (and the
metadata node's schema, next to the logical table). Names that would pass 63 bytes are shortened
with the same stable hash as :func:`rewriter.model.shard_table_name`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pglast import ast, parse_sql
from pglast.stream import RawStream

from rewriter.errors import PgError
from rewriter.model import shard_table_name
from rewriter.quoting import qualified_name, quote_ident, quote_literal  # noqa: F401  (re-exported)

Query = Callable[[str], Awaitable[list[list[str | None]]]]
"""Runs one SQL text and returns its rows as text values (``None`` for NULL).

Every call of one :func:`read_table_definition` must run on the same session: the reader sets
``search_path`` for the duration (and restores it), see there.
"""

_CONSTRAINT_ORDER = {"p": 0, "u": 1, "x": 2, "c": 3, "f": 4}
_RELKIND_NAMES = {
    "p": "a partitioned table",
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "i": "an index",
    "I": "a partitioned index",
    "S": "a sequence",
    "c": "a composite type",
    "t": "a TOAST table",
}


@dataclass
class ColumnDef:
    """One column of a table, as SQL fragments ready for ``CREATE TABLE``.

    ``type_sql`` comes from ``format_type`` (so ``numeric(10,2)``, ``character varying(20)``,
    ``integer[]``, schema-qualified user types). ``collation`` is SQL (``pg_catalog."C"``) and is
    set only when it differs from the type's default, as ``pg_dump`` does. ``identity`` is
    ``pg_attribute.attidentity``: ``'a'`` (ALWAYS), ``'d'`` (BY DEFAULT) or ``''``.
    ``uses_sequence`` marks a column the proxy must fill from ``sequence`` (identity, serial, or
    any default calling ``nextval``): shards get neither the default nor the identity.
    ``default_sql`` is the logical table's default even then, so the proxy can evaluate it.
    """

    name: str
    type_sql: str
    not_null: bool
    default_sql: str | None
    collation: str | None
    uses_sequence: bool
    identity: str
    generated_sql: str | None
    sequence: str | None = None  # qualified name of the owned sequence (serial / identity)

    def shard_sql(self) -> str:
        """This column's definition inside a shard's ``CREATE TABLE``."""
        parts = [quote_ident(self.name), self.type_sql]
        if self.collation:
            parts.append(f"COLLATE {self.collation}")
        if self.generated_sql is not None:
            parts.append(f"GENERATED ALWAYS AS ({self.generated_sql}) STORED")
        elif self.default_sql is not None and not self.uses_sequence:
            parts.append(f"DEFAULT {self.default_sql}")
        if self.not_null:
            parts.append("NOT NULL")
        return " ".join(parts)


@dataclass
class ConstraintDef:
    """A table constraint: ``kind`` is ``pg_constraint.contype`` (``p u c x f``).

    ``definition`` is ``pg_get_constraintdef`` (e.g. ``PRIMARY KEY (tenant, id)``); ``columns``
    are the key columns by name (for ``p``/``u`` without INCLUDE columns; for ``x`` the plain
    column elements; for ``c`` the columns the check reads). A NOT VALID constraint
    (``validated`` false; its definition ends in ``NOT VALID``) is added to a shard by a separate
    ``ALTER TABLE``, because inside ``CREATE TABLE`` PostgreSQL would mark it valid, and the
    shard would then disagree with the logical table about ``VALIDATE CONSTRAINT``.
    """

    name: str
    kind: str
    definition: str
    columns: list[str]
    validated: bool = True  # False for NOT VALID (existing rows were never checked)


@dataclass
class TableDefinition:
    """What a shard of ``schema.name`` must look like; see the module docstring for what is left out.

    ``index_defs`` holds ``pg_get_indexdef`` of the indexes that do not back a constraint (those
    come with their constraint). ``unlogged`` tables get unlogged shards; ``access_method`` is
    emitted only when not ``heap``; ``options`` are the table's storage parameters
    (``fillfactor`` ...), copied because they change how the shards behave under updates.
    """

    schema: str
    name: str
    columns: list[ColumnDef]
    constraints: list[ConstraintDef]
    index_defs: list[str]
    unlogged: bool = False
    access_method: str = "heap"
    options: list[tuple[str, str]] = field(default_factory=list)

    def column(self, name: str) -> ColumnDef:
        """The column called ``name`` (exact, case-sensitive), else 42703 like PostgreSQL."""
        for col in self.columns:
            if col.name == name:
                return col
        raise PgError(
            "42703",
            f'column "{name}" of relation "{self.name}" does not exist',
        )

    def shard_ddl(self, shard_name: str, shard_id: int, partition_by: str | None = None) -> list[str]:
        """The statements that create one shard ``<schema>.<shard_name>`` (run in this order).

        The first is the ``CREATE TABLE`` with columns and constraints (constraint names get
        ``_<shard_id>``, foreign keys are left out); then an ``ALTER TABLE ... ADD CONSTRAINT``
        per NOT VALID constraint; then one ``CREATE INDEX`` per extra index, renamed the same
        way. Run them in one transaction so a failure leaves no half shard.
        """
        table = qualified_name(self.schema, shard_name)
        items = [col.shard_sql() for col in self.columns]
        not_valid = []
        for con in self.constraints:
            if con.kind == "f":
                continue
            name = quote_ident(shard_object_name(con.name, shard_id))
            if con.validated:
                items.append(f"CONSTRAINT {name} {con.definition}")
            else:
                not_valid.append(f"ALTER TABLE {table} ADD CONSTRAINT {name} {con.definition}")
        unlogged = "UNLOGGED " if self.unlogged else ""
        sql = f"CREATE {unlogged}TABLE {table} (\n    "
        sql += ",\n    ".join(items) + "\n)"
        if partition_by is not None:
            # A hypertable's shard: partitioned by time, its chunks are the partitions (they
            # carry the storage options; a partitioned table has no storage of its own).
            return [sql + f" PARTITION BY {partition_by}", *not_valid, *(
                shard_index_ddl(index_def, self.schema, shard_name, shard_id) for index_def in self.index_defs
            )]
        if self.access_method and self.access_method != "heap":
            sql += f" USING {quote_ident(self.access_method)}"
        if self.options:
            opts = ", ".join(f"{quote_ident(k)} = {quote_literal(v)}" for k, v in self.options)
            sql += f" WITH ({opts})"
        statements = [sql, *not_valid]
        for index_def in self.index_defs:
            statements.append(shard_index_ddl(index_def, self.schema, shard_name, shard_id))
        return statements

    def check_distributable(self, dist_column: str) -> None:
        """Refuse (0A000) uniqueness that the shards could not enforce when distributed by it.

        Each shard enforces its PRIMARY KEY / UNIQUE / EXCLUDE constraints and unique indexes
        only over its own rows. That equals table-wide enforcement exactly when two rows that
        could conflict always land in the same shard, i.e. when the distribution column is one
        of the key columns (compared with ``=`` for EXCLUDE), as Citus requires. Also refused: a
        generated distribution column, whose value the proxy cannot compute to route a row.
        """
        col = self.column(dist_column)
        if col.generated_sql is not None:
            raise PgError(
                "0A000",
                f'cannot distribute relation "{self.name}" by generated column "{dist_column}"',
                hint="Distribute by a column whose value the INSERT supplies.",
            )
        hint = (
            f'Include the distribution column "{dist_column}" in the key (e.g. PRIMARY KEY '
            f"({quote_ident(dist_column)}, ...)), or create a reference table instead."
        )
        for con in self.constraints:
            if con.kind in ("p", "u") and dist_column not in con.columns:
                what = "PRIMARY KEY" if con.kind == "p" else "UNIQUE"
                raise PgError(
                    "0A000",
                    f'cannot distribute relation "{self.name}": {what} constraint '
                    f'"{con.name}" does not include the distribution column "{dist_column}"',
                    hint=hint,
                )
            if con.kind == "x" and not _exclusion_has_equality(con.definition, dist_column):
                raise PgError(
                    "0A000",
                    f'cannot distribute relation "{self.name}": EXCLUDE constraint '
                    f'"{con.name}" does not compare the distribution column "{dist_column}" '
                    "with =",
                    hint=f'Add "{quote_ident(dist_column)} WITH =" to the constraint.',
                )
        for index_def in self.index_defs:
            idx = _parse_index(index_def)
            if idx.unique and dist_column not in index_key_columns(idx):
                raise PgError(
                    "0A000",
                    f'cannot distribute relation "{self.name}": unique index '
                    f'"{idx.idxname}" does not include the distribution column "{dist_column}"',
                    hint=hint,
                )


def shard_object_name(name: str, shard_id: int) -> str:
    """A shard's copy of an index or constraint: ``<name>_<shardid>``, shortened like tables."""
    return shard_table_name(name, shard_id)


def index_key_columns(idx: ast.IndexStmt) -> list[str]:
    """Key columns of an index that are plain column references (not INCLUDE, not expressions)."""
    return [el.name for el in idx.indexParams or () if isinstance(el, ast.IndexElem) and el.name]


def _parse_index(index_def: str) -> ast.IndexStmt:
    stmt = parse_sql(index_def)[0].stmt
    if not isinstance(stmt, ast.IndexStmt):  # pragma: no cover - pg_get_indexdef gives one
        raise ValueError(f"not a CREATE INDEX: {index_def!r}")
    return stmt


def shard_index_ddl(index_def: str, schema: str, shard_name: str, shard_id: int) -> str:
    """``pg_get_indexdef`` text re-aimed at a shard: relation and index name replaced.

    Parsed with pglast rather than edited as text, because the table name may also appear inside
    expressions, string literals or the predicate.
    """
    idx = _parse_index(index_def)
    idx.relation.schemaname = schema
    idx.relation.relname = shard_name
    idx.idxname = shard_object_name(idx.idxname, shard_id)
    return RawStream()(idx)


def _exclusion_has_equality(definition: str, column: str) -> bool:
    """Whether an ``EXCLUDE`` definition compares plain ``column`` with the ``=`` operator."""
    stmt = parse_sql(f"ALTER TABLE x ADD {definition}")[0].stmt
    con = stmt.cmds[0].def_
    for elem, opname in con.exclusions or ():
        op = opname[-1].sval if opname else None
        if isinstance(elem, ast.IndexElem) and elem.name == column and op == "=":
            return True
    return False


def _calls_nextval(expr_sql: str) -> bool:
    """Whether a default expression calls ``nextval`` anywhere (parsed, so literals don't count)."""
    from pglast.visitors import Visitor

    found = False

    class _Find(Visitor):
        def visit_FuncCall(self, ancestors: object, node: ast.FuncCall) -> None:
            nonlocal found
            if node.funcname and node.funcname[-1].sval == "nextval":
                found = True

    _Find()(parse_sql(f"SELECT {expr_sql}"))
    return found


def _bool(value: str | None) -> bool:
    return value in ("true", "t")


async def read_table_definition(query: Query, schema: str, name: str) -> TableDefinition:
    """Read ``schema.name`` from the catalogs of the node ``query`` talks to.

    Errors: 42P01 when there is no such relation; 0A000 for what cannot be sharded by copying
    its definition: views, materialized views, foreign tables, partitioned tables and partitions
    (their data lives in other relations), tables in an inheritance tree (the shards would not
    inherit), temporary tables (visible to one session of one node only), and other relation
    kinds. Unlogged tables are accepted and produce unlogged shards (Citus does the same).

    Why ``search_path`` is set to empty while reading: the deparsing functions qualify a type,
    function, operator class or collation with its schema only when it is not visible on the
    current search path, and the shards are created on other nodes whose sessions may have a
    different path. With an empty path everything outside ``pg_catalog`` comes out qualified
    (``pg_dump`` does the same). The previous value is restored before returning.
    """
    prev_rows = await query("SELECT pg_catalog.current_setting('search_path')")
    previous = prev_rows[0][0] or ""
    await query("SELECT pg_catalog.set_config('search_path', '', false)")
    try:
        return await _read(query, schema, name)
    finally:
        await query(
            f"SELECT pg_catalog.set_config('search_path', {quote_literal(previous)}, false)"
        )


async def _read(query: Query, schema: str, name: str) -> TableDefinition:
    rows = await query(
        "SELECT c.oid::text, c.relkind::text, c.relpersistence::text, c.relispartition::text,"
        " EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i"
        "         WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)::text,"
        " COALESCE(am.amname::text, ''),"
        " COALESCE((SELECT pg_catalog.json_agg(pg_catalog.json_build_array(o.option_name,"
        "           o.option_value)) FROM pg_catalog.pg_options_to_table(c.reloptions) o)::text,"
        "          '[]')"
        " FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam"
        f" WHERE n.nspname = {quote_literal(schema)} AND c.relname = {quote_literal(name)}"
    )
    label = qualified_name(schema, name)
    if not rows:
        raise PgError("42P01", f"relation {label} does not exist")
    oid, relkind, persistence, is_partition, in_inheritance, amname, options_json = rows[0]
    if relkind != "r":
        what = _RELKIND_NAMES.get(relkind or "", f"a relation of kind {relkind!r}")
        raise PgError(
            "0A000",
            f"cannot distribute {label}: it is {what}",
            hint="Only ordinary tables can be distributed or made reference tables.",
        )
    if _bool(is_partition):
        raise PgError("0A000", f"cannot distribute {label}: it is a partition")
    if _bool(in_inheritance):
        raise PgError(
            "0A000",
            f"cannot distribute {label}: it is part of an inheritance hierarchy",
            hint="Shards are plain tables and would not inherit; remove the inheritance first.",
        )
    if persistence == "t":
        raise PgError(
            "0A000",
            f"cannot distribute {label}: it is a temporary table",
            hint="A temporary table exists only in one session of one node.",
        )

    columns = await _read_columns(query, oid or "0")
    constraints = await _read_constraints(query, oid or "0")
    index_rows = await query(
        "SELECT pg_catalog.pg_get_indexdef(i.indexrelid)"
        " FROM pg_catalog.pg_index i"
        " JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid"
        f" WHERE i.indrelid = {oid}"
        "   AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k"
        "                   WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid"
        "                     AND k.contype IN ('p', 'u', 'x'))"
        " ORDER BY ic.relname"
    )
    options = [(str(k), str(v)) for k, v in json.loads(options_json or "[]")]
    return TableDefinition(
        schema=schema,
        name=name,
        columns=columns,
        constraints=constraints,
        index_defs=[r[0] for r in index_rows if r[0]],
        unlogged=persistence == "u",
        access_method=amname or "heap",
        options=options,
    )


async def _read_columns(query: Query, oid: str) -> list[ColumnDef]:
    rows = await query(
        "SELECT a.attname::text,"
        " pg_catalog.format_type(a.atttypid, a.atttypmod),"
        " a.attnotnull::text,"
        " pg_catalog.pg_get_expr(d.adbin, d.adrelid),"
        " CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation"
        "      THEN pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname)"
        " END,"
        " a.attidentity::text,"
        " a.attgenerated::text,"
        " (SELECT s.oid::pg_catalog.regclass::text FROM pg_catalog.pg_depend dep"
        "   JOIN pg_catalog.pg_class s ON s.oid = dep.objid"
        "  WHERE dep.classid = 'pg_catalog.pg_class'::pg_catalog.regclass"
        "    AND dep.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass"
        "    AND dep.refobjid = a.attrelid AND dep.refobjsubid = a.attnum"
        "    AND dep.deptype IN ('a', 'i') AND s.relkind = 'S' LIMIT 1)"
        " FROM pg_catalog.pg_attribute a"
        " JOIN pg_catalog.pg_type t ON t.oid = a.atttypid"
        " LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation"
        " LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace"
        f" WHERE a.attrelid = {oid} AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum"
    )
    columns = []
    for attname, type_sql, notnull, expr, collation, identity, generated, sequence in rows:
        identity = identity or ""
        generated_sql = expr if generated == "s" else None
        default_sql = expr if generated != "s" else None
        uses_sequence = bool(identity) or (default_sql is not None and _calls_nextval(default_sql))
        columns.append(
            ColumnDef(
                name=attname or "",
                type_sql=type_sql or "",
                not_null=_bool(notnull),
                default_sql=default_sql,
                collation=collation,
                uses_sequence=uses_sequence,
                identity=identity,
                generated_sql=generated_sql,
                sequence=sequence,
            )
        )
    return columns


async def _read_constraints(query: Query, oid: str) -> list[ConstraintDef]:
    # conkey holds the key columns only (INCLUDE columns are not in it); an expression element
    # of an EXCLUDE constraint has attnum 0 and drops out of the join.
    rows = await query(
        "SELECT k.conname::text, k.contype::text, pg_catalog.pg_get_constraintdef(k.oid),"
        " COALESCE(pg_catalog.array_to_json(ARRAY("
        "   SELECT a.attname FROM pg_catalog.unnest(k.conkey) WITH ORDINALITY u(attnum, ord)"
        "   JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.attnum"
        "   ORDER BY u.ord))::text, '[]'),"
        " k.convalidated::text"
        " FROM pg_catalog.pg_constraint k"
        f" WHERE k.conrelid = {oid} AND k.contype IN ('p', 'u', 'c', 'x', 'f')"
        " ORDER BY k.conname"
    )
    constraints = [
        ConstraintDef(
            name=conname or "",
            kind=contype or "",
            definition=definition or "",
            columns=list(json.loads(cols or "[]")),
            validated=_bool(validated),
        )
        for conname, contype, definition, cols, validated in rows
    ]
    constraints.sort(key=lambda c: (_CONSTRAINT_ORDER.get(c.kind, 9), c.name))
    return constraints


async def read_index_names(query: Query, schema: str, name: str) -> set[str]:
    """Names of all indexes on ``schema.name`` (constraint-backing ones included).

    For naming an unnamed ``CREATE INDEX`` on shards: read the set before and after running
    the statement on the logical table; the one new name is what PostgreSQL chose
    (``rewriter.ddl.name_index`` then puts it into the statement for the shards).
    """
    rows = await query(
        "SELECT ic.relname::text FROM pg_catalog.pg_index i"
        " JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid"
        " JOIN pg_catalog.pg_class c ON c.oid = i.indrelid"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        f" WHERE n.nspname = {quote_literal(schema)} AND c.relname = {quote_literal(name)}"
    )
    return {r[0] for r in rows if r[0]}
