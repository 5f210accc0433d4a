"""DDL propagation to shards: the pure rewrite, then the statements run on real shards.

The pure tests pin the exact shard statement for each supported form and the 0A000 for each
refused one. The database test drives a distributed table through a sequence of DDL the way the
proxy would (check, run on the logical table, run each shard's statement on its node) and then
asks PostgreSQL's catalogs whether every shard still matches the logical table.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from pglast import parse_sql
from pglast.stream import RawStream
from test_tabledef import _admin, _describe, as_query, run

from executor.tabledef import qualified_name, read_index_names, read_table_definition
from rewriter.ddl import (
    check_ddl_supported,
    classify_ddl,
    ddl_targets,
    name_index,
    needs_index_name,
    shard_ddl_statement,
    split_by_table,
)
from rewriter.errors import PgError
from rewriter.model import Shard, TableInfo, shard_table_name

SHARD = Shard(102, 0, (1,))
T = TableInfo("s", "t", "hash", "k", "int8", 1, (SHARD, Shard(103, 1, (2,))))
REF = TableInfo("public", "r", "reference", None, None, 2, (Shard(200, 0, (1, 2)),))
MIXED = TableInfo("My S", "Mixed T", "hash", "Key", "int8", 3, (Shard(7, 0, (1,)),))


def resolve(schema: str | None, name: str) -> TableInfo | None:
    """Test resolver: search_path is (s, public)."""
    for table in (T, REF, MIXED):
        if name == table.name and schema in (None, table.schema):
            return table
    return None


def resolve_index(schema: str | None, name: str) -> TableInfo | None:
    """Indexes named ``t_*`` are on s.t, ``r_*`` on public.r; others on plain tables."""
    if name.startswith("t_"):
        return T
    if name.startswith("r_"):
        return REF
    return None


def shard_sql(sql: str, table: TableInfo = T, shard: Shard = SHARD) -> str:
    return shard_ddl_statement(parse_sql(sql)[0].stmt, table, shard)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("ALTER TABLE t ADD COLUMN x int", "alter_table"),
        ("ALTER TABLE t RENAME COLUMN a TO b", "alter_table"),
        ("ALTER TABLE t RENAME CONSTRAINT a TO b", "alter_table"),
        ("ALTER TABLE t SET SCHEMA x", "alter_table"),
        ("CREATE INDEX ON t (a)", "create_index"),
        ("DROP INDEX i", "drop_index"),
        ("ALTER INDEX i RENAME TO j", "rename_index"),
        ("TRUNCATE t", "truncate"),
        ("DROP TABLE t", "drop_table"),
        ("ALTER TABLE t RENAME TO u", "rename_table"),
        ("ALTER INDEX i SET (fillfactor = 50)", None),
        ("ALTER VIEW v RENAME COLUMN a TO b", None),
        ("ALTER VIEW v RENAME TO w", None),
        ("ALTER SEQUENCE q RESTART", None),
        ("DROP VIEW v", None),
        ("CREATE TABLE t (a int)", None),
        ("SELECT 1", None),
    ],
)
def test_classify(sql: str, kind: str | None) -> None:
    assert classify_ddl(parse_sql(sql)[0]) == kind  # a RawStmt is accepted too


@pytest.mark.parametrize(
    ("sql", "want"),
    [
        (
            "ALTER TABLE t ADD COLUMN x int DEFAULT 0",
            "ALTER TABLE s.t_102 ADD COLUMN x integer DEFAULT 0",
        ),
        (
            "ALTER TABLE IF EXISTS ONLY s.t DROP COLUMN IF EXISTS x CASCADE",
            "ALTER TABLE IF EXISTS ONLY s.t_102 DROP COLUMN IF EXISTS x CASCADE",
        ),
        ("ALTER TABLE t RENAME COLUMN a TO b", "ALTER TABLE s.t_102 RENAME COLUMN a TO b"),
        (
            "ALTER TABLE t ALTER COLUMN a SET DEFAULT now()",
            "ALTER TABLE s.t_102 ALTER COLUMN a SET DEFAULT now()",
        ),
        (
            "ALTER TABLE t ALTER COLUMN a DROP DEFAULT",
            "ALTER TABLE s.t_102 ALTER COLUMN a DROP DEFAULT",
        ),
        # A sequence-fed default stays on the logical table only: the proxy fills the column.
        (
            "ALTER TABLE t ALTER COLUMN a SET DEFAULT nextval('q')",
            "ALTER TABLE s.t_102 ALTER COLUMN a DROP DEFAULT",
        ),
        (
            "ALTER TABLE t ALTER COLUMN a ADD GENERATED ALWAYS AS IDENTITY",
            "ALTER TABLE s.t_102 ALTER COLUMN a SET NOT NULL",
        ),
        (
            "ALTER TABLE t ALTER COLUMN a DROP IDENTITY IF EXISTS",
            "ALTER TABLE s.t_102 ALTER COLUMN a SET NOT NULL",
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID",
            "ALTER TABLE s.t_102 ADD CONSTRAINT c_102 CHECK (a > 0) NOT VALID",
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT pk PRIMARY KEY (k, id) INCLUDE (z)",
            "ALTER TABLE s.t_102 ADD CONSTRAINT pk_102 PRIMARY KEY (k, id) INCLUDE (z)",
        ),
        (
            "ALTER TABLE t ADD CONSTRAINT ex EXCLUDE USING btree (k WITH =, b WITH =)",
            "ALTER TABLE s.t_102 ADD CONSTRAINT ex_102 EXCLUDE USING btree "
            "(k WITH OPERATOR(=), b WITH OPERATOR(=))",
        ),
        (
            "ALTER TABLE t ADD PRIMARY KEY USING INDEX t_k_idx",
            "ALTER TABLE s.t_102 ADD PRIMARY KEY USING INDEX t_k_idx_102",
        ),
        (
            "ALTER TABLE t ADD COLUMN x int CONSTRAINT x_pos CHECK (x > 0)",
            "ALTER TABLE s.t_102 ADD COLUMN x integer CONSTRAINT x_pos_102 CHECK (x > 0)",
        ),
        # The shards may lack a foreign key the logical table has: always IF EXISTS there.
        ("ALTER TABLE t DROP CONSTRAINT c", "ALTER TABLE s.t_102 DROP CONSTRAINT IF EXISTS c_102"),
        (
            "ALTER TABLE t DROP CONSTRAINT IF EXISTS c CASCADE",
            "ALTER TABLE s.t_102 DROP CONSTRAINT IF EXISTS c_102 CASCADE",
        ),
        ("ALTER TABLE t VALIDATE CONSTRAINT c", "ALTER TABLE s.t_102 VALIDATE CONSTRAINT c_102"),
        (
            "ALTER TABLE t RENAME CONSTRAINT a TO b",
            "ALTER TABLE s.t_102 RENAME CONSTRAINT a_102 TO b_102",
        ),
        (
            "ALTER TABLE t ALTER COLUMN a TYPE bigint USING (t.a + s.t.a)::bigint",
            "ALTER TABLE s.t_102 ALTER COLUMN a TYPE bigint USING CAST(t_102.a + s.t_102.a AS bigint)",
        ),
        (
            "ALTER TABLE t CLUSTER ON t_a_idx, REPLICA IDENTITY USING INDEX t_b_idx",
            "ALTER TABLE s.t_102 CLUSTER ON t_a_idx_102, REPLICA IDENTITY USING INDEX t_b_idx_102",
        ),
        (
            "ALTER TABLE t SET (fillfactor = 70), SET UNLOGGED, DISABLE TRIGGER ALL",
            "ALTER TABLE s.t_102 SET (fillfactor = 70), SET UNLOGGED, DISABLE TRIGGER ALL",
        ),
        (
            'CREATE INDEX CONCURRENTLY IF NOT EXISTS "My Idx" ON t USING gin (doc) WHERE t.a > 0',
            'CREATE INDEX CONCURRENTLY IF NOT EXISTS "My Idx_102" ON s.t_102 USING gin (doc)'
            " WHERE t_102.a > 0",
        ),
        (
            "CREATE UNIQUE INDEX ui ON ONLY s.t (k, lower(b)) INCLUDE (c)",
            "CREATE UNIQUE INDEX ui_102 ON ONLY s.t_102 (k, (lower(b))) INCLUDE (c)",
        ),
        (
            "DROP INDEX CONCURRENTLY IF EXISTS t_a_idx CASCADE",
            "DROP INDEX CONCURRENTLY IF EXISTS s.t_a_idx_102 CASCADE",
        ),
        ("DROP INDEX s.t_a, t_b", "DROP INDEX s.t_a_102, s.t_b_102"),
        (
            "ALTER INDEX IF EXISTS t_a RENAME TO t_b",
            "ALTER INDEX IF EXISTS s.t_a_102 RENAME TO t_b_102",
        ),
        (
            "TRUNCATE ONLY t RESTART IDENTITY CASCADE",
            "TRUNCATE TABLE ONLY s.t_102 RESTART IDENTITY CASCADE",
        ),
        ("DROP TABLE IF EXISTS s.t CASCADE", "DROP TABLE IF EXISTS s.t_102 CASCADE"),
        ("ALTER TABLE IF EXISTS t RENAME TO u", "ALTER TABLE IF EXISTS s.t_102 RENAME TO u_102"),
    ],
)
def test_shard_statement(sql: str, want: str) -> None:
    assert shard_sql(sql) == want


def test_quoting_and_long_names() -> None:
    shard = MIXED.shards[0]
    assert shard_sql(
        'ALTER TABLE "My S"."Mixed T" ADD CONSTRAINT "Big C" CHECK ("Key" > 0)', MIXED, shard
    ) == ('ALTER TABLE "My S"."Mixed T_7" ADD CONSTRAINT "Big C_7" CHECK ("Key" > 0)')
    assert shard_sql('CREATE INDEX "select" ON "My S"."Mixed T" ("Key")', MIXED, shard) == (
        'CREATE INDEX select_7 ON "My S"."Mixed T_7" ("Key")'  # no longer a keyword
    )
    assert shard_sql('DROP INDEX "My S"."Idx ""Q"""', MIXED, shard) == (
        'DROP INDEX "My S"."Idx ""Q""_7"'
    )
    long = "x" * 63
    got = shard_sql(f"DROP INDEX {long}", T, SHARD)
    assert got == f"DROP INDEX s.{shard_table_name(long, 102)}"
    assert len(shard_table_name(long, 102)) == 63
    got = shard_sql(f"ALTER TABLE t RENAME TO {long}")
    assert got == f"ALTER TABLE s.t_102 RENAME TO {shard_table_name(long, 102)}"


def test_statement_not_modified_and_unnamed_index() -> None:
    stmt = parse_sql("CREATE INDEX ON t (lower(a))")[0].stmt
    before = RawStream()(stmt)
    assert needs_index_name(stmt)
    with pytest.raises(ValueError, match="name_index"):
        shard_ddl_statement(stmt, T, SHARD)
    named = name_index(stmt, "t_lower_idx")
    assert not needs_index_name(named) and RawStream()(stmt) == before
    assert shard_ddl_statement(named, T, SHARD) == (
        "CREATE INDEX t_lower_idx_102 ON s.t_102 ((lower(a)))"
    )
    assert RawStream()(named) == "CREATE INDEX t_lower_idx ON t ((lower(a)))"


def test_targets_and_split() -> None:
    stmt = parse_sql("TRUNCATE t, plain, r, s.t CASCADE")[0].stmt
    assert ddl_targets(stmt, resolve) == [T, REF]
    parts = split_by_table(stmt, resolve)
    assert [(tab, RawStream()(p)) for tab, p in parts] == [
        (T, "TRUNCATE TABLE t CASCADE"),
        (REF, "TRUNCATE TABLE r CASCADE"),
        (None, "TRUNCATE TABLE plain CASCADE"),
    ]
    assert shard_ddl_statement(parts[1][1], REF, REF.shards[0]) == (
        "TRUNCATE TABLE public.r_200 CASCADE"
    )
    with pytest.raises(ValueError, match="split_by_table"):
        shard_ddl_statement(stmt, T, SHARD)

    stmt = parse_sql("DROP TABLE IF EXISTS plain, r")[0].stmt
    assert [(tab, RawStream()(p)) for tab, p in split_by_table(stmt, resolve)] == [
        (REF, "DROP TABLE IF EXISTS r"),
        (None, "DROP TABLE IF EXISTS plain"),
    ]
    stmt = parse_sql("DROP INDEX t_a, other_idx, r_b, t_c")[0].stmt
    with pytest.raises(ValueError, match="resolve_index"):
        ddl_targets(stmt, resolve)
    assert ddl_targets(stmt, resolve, resolve_index) == [T, REF]
    parts = split_by_table(stmt, resolve, resolve_index)
    assert [(tab, RawStream()(p)) for tab, p in parts] == [
        (T, "DROP INDEX t_a, t_c"),
        (REF, "DROP INDEX r_b"),
        (None, "DROP INDEX other_idx"),
    ]
    assert shard_ddl_statement(parts[0][1], T, SHARD) == "DROP INDEX s.t_a_102, s.t_c_102"

    assert ddl_targets(parse_sql("ALTER TABLE plain ADD x int")[0].stmt, resolve) == []
    stmt = parse_sql("ALTER TABLE s.t ADD x int")[0].stmt
    assert split_by_table(stmt, resolve) == [(T, stmt)]
    assert ddl_targets(
        parse_sql("ALTER INDEX r_x RENAME TO r_y")[0].stmt, resolve, resolve_index
    ) == [REF]


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("ALTER TABLE t ALTER COLUMN k TYPE text", "type of the distribution column"),
        ("ALTER TABLE t DROP COLUMN k", "drop the distribution column"),
        ("ALTER TABLE t RENAME COLUMN k TO kk", "rename the distribution column"),
        ("ALTER TABLE t ADD FOREIGN KEY (a) REFERENCES r", "foreign key"),
        ("ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES r", "foreign key"),
        ("ALTER TABLE t ADD COLUMN z int REFERENCES r", "foreign key"),
        ("ALTER TABLE t SET SCHEMA x", "another schema"),
        ("ALTER TABLE t ATTACH PARTITION p FOR VALUES IN (1)", "ATTACH PARTITION"),
        ("ALTER TABLE t DETACH PARTITION p", "DETACH PARTITION"),
        ("ALTER TABLE t ADD PRIMARY KEY (k)", "unnamed constraint"),
        ("ALTER TABLE t ADD CHECK (a > 0)", "unnamed constraint"),
        ("ALTER TABLE t ADD COLUMN z int UNIQUE", "unnamed constraint"),
        ("ALTER TABLE t ADD CONSTRAINT u UNIQUE (a)", "does not include the distribution column"),
        ("ALTER TABLE t ADD COLUMN z int CONSTRAINT zu UNIQUE", "does not include"),
        ("ALTER TABLE t ADD CONSTRAINT ex EXCLUDE USING gist (k WITH &&)", "does not include"),
        ("CREATE UNIQUE INDEX ON t (a)", "unique index"),
        ("CREATE UNIQUE INDEX ON t ((k + 1))", "unique index"),
        ("ALTER TABLE t ADD COLUMN z serial", "serial"),
        ("ALTER TABLE t ADD COLUMN z int GENERATED ALWAYS AS IDENTITY", "sequence"),
        ("ALTER TABLE t ADD COLUMN z int DEFAULT nextval('q')", "sequence"),
        ("ALTER TABLE t OWNER TO bob", "OWNER TO"),
        ("ALTER TABLE t SET TABLESPACE x", "SET TABLESPACE"),
        ("ALTER TABLE t ENABLE TRIGGER x", "TRIGGER"),
        ("ALTER TABLE t ENABLE ROW LEVEL SECURITY", "ROW LEVEL SECURITY"),
        ("ALTER TABLE t INHERIT p", "INHERIT"),
        ("ALTER TABLE t ALTER CONSTRAINT f DEFERRABLE", "ALTER CONSTRAINT"),
    ],
)
def test_unsupported(sql: str, words: str) -> None:
    stmt = parse_sql(sql)[0].stmt
    with pytest.raises(PgError) as exc:
        check_ddl_supported(stmt, T)
    assert exc.value.sqlstate == "0A000" and words in exc.value.message
    with pytest.raises(PgError):  # shard_ddl_statement re-checks
        shard_ddl_statement(name_index(stmt, "n") if needs_index_name(stmt) else stmt, T, SHARD)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE r ADD CONSTRAINT u UNIQUE (a)",  # a reference table has no distribution rule
        "CREATE UNIQUE INDEX ON r (a)",
        "ALTER TABLE r ALTER COLUMN a TYPE bigint",
    ],
)
def test_reference_table_uniqueness_allowed(sql: str) -> None:
    check_ddl_supported(parse_sql(sql)[0].stmt, REF)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE t ADD CONSTRAINT u UNIQUE (a, k)",
        "ALTER TABLE t ADD CONSTRAINT ex EXCLUDE USING btree (k WITH =, a WITH <>)",
        "CREATE UNIQUE INDEX ON t (a, k) WHERE a > 0",
        "ALTER TABLE t ALTER COLUMN a TYPE bigint",
        "ALTER TABLE t RENAME COLUMN a TO b",
        "ALTER TABLE t ADD COLUMN z int DEFAULT 5 NOT NULL",
        "DROP TABLE t",
    ],
)
def test_supported(sql: str) -> None:
    check_ddl_supported(parse_sql(sql)[0].stmt, T)


# --- against real shards ----------------------------------------------------------------------

SCHEMA = "Ddl S"
SETUP = """
CREATE SCHEMA "Ddl S";
CREATE SEQUENCE "Ddl S".ev_seq;
"""
LOGICAL = """
CREATE TABLE "Ddl S"."Events" (
    "Tenant" bigint NOT NULL,
    id bigint NOT NULL,
    v int,
    extra text,
    CONSTRAINT "Events_pkey" PRIMARY KEY ("Tenant", id)
);
CREATE TABLE public.plain (a int);
INSERT INTO public.plain VALUES (1);
"""


@pytest.fixture(scope="module")
def dbs(cluster: Any) -> Iterator[list[dict[str, Any]]]:
    """asyncpg kwargs of one scratch database per node (same name) with the schema."""
    name = f"ddl_{secrets.token_hex(4)}"
    nodes = cluster.nodes[:2]
    for node in nodes:
        run(_admin(node.connect_kwargs("postgres"), f"CREATE DATABASE {name}"))
    kws = [node.connect_kwargs(name) for node in nodes]
    try:
        for kw in kws:
            run(_admin(kw, SETUP))
        yield kws
    finally:
        for node in nodes:
            kw = node.connect_kwargs("postgres")
            run(_admin(kw, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


# Each step: the SQL a client sends for the logical table. Between them every shard is compared
# with the logical table through the catalogs.
STEPS = [
    'ALTER TABLE "Ddl S"."Events" ADD COLUMN note text DEFAULT \'n\''
    " CONSTRAINT note_len CHECK (char_length(note) < 50)",
    'ALTER TABLE "Ddl S"."Events" ALTER COLUMN note SET DEFAULT \'m\', ALTER COLUMN v SET NOT NULL',
    'ALTER TABLE "Ddl S"."Events" ADD CONSTRAINT v_pos CHECK (v > 0) NOT VALID',
    'ALTER TABLE "Ddl S"."Events" VALIDATE CONSTRAINT v_pos',
    'ALTER TABLE "Ddl S"."Events" ADD CONSTRAINT "Events uniq" UNIQUE ("Tenant", v)',
    'CREATE INDEX "Events v idx" ON "Ddl S"."Events" (v) WHERE v > 10',
    'CREATE INDEX ON "Ddl S"."Events" (lower(note))',
    'CREATE INDEX CONCURRENTLY ev_conc ON "Ddl S"."Events" (note)',
    'ALTER INDEX "Ddl S"."Events v idx" RENAME TO events_v_idx2',
    'DROP INDEX "Ddl S".events_v_idx2, "Ddl S".ev_conc',
    'ALTER TABLE "Ddl S"."Events" RENAME COLUMN note TO remark',
    'ALTER TABLE "Ddl S"."Events" RENAME CONSTRAINT note_len TO remark_len',
    'ALTER TABLE "Ddl S"."Events" ALTER COLUMN v TYPE bigint USING ("Events".v::bigint)',
    'ALTER TABLE "Ddl S"."Events" DROP CONSTRAINT "Events uniq"',
    'ALTER TABLE "Ddl S"."Events" ALTER COLUMN id SET DEFAULT nextval(\'"Ddl S".ev_seq\'),'
    " ALTER COLUMN v ADD GENERATED BY DEFAULT AS IDENTITY",
    'ALTER TABLE "Ddl S"."Events" DROP COLUMN extra',
    'ALTER TABLE "Ddl S"."Events" ADD CONSTRAINT ev_excl EXCLUDE USING btree ("Tenant" WITH =, v WITH =)',
    'TRUNCATE "Ddl S"."Events", public.plain',
    'ALTER TABLE "Ddl S"."Events" RENAME TO "Events2"',
    'DROP TABLE "Ddl S"."Events2", public.plain',
]


class Driver:
    """What the proxy does with DDL, reduced to the calls of ``rewriter.ddl`` (see its docstring)."""

    def __init__(self, conns: list[asyncpg.Connection], table: TableInfo) -> None:
        self.conns = conns  # index = node id; node 0 is also the metadata node
        self.table = table

    def resolve(self, schema: str | None, name: str) -> TableInfo | None:
        t = self.table
        return t if (schema in (None, t.schema) and name == t.name) else None

    async def apply(self, sql: str) -> None:
        stmt = parse_sql(sql)[0].stmt
        meta = self.conns[0]
        index_owner = {
            (r["nspname"], r["relname"]): r["tab"]
            for r in await meta.fetch(
                "SELECT n.nspname, ic.relname, c.relname AS tab FROM pg_index i"
                " JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class c ON c.oid = i.indrelid"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
            )
        }

        def resolve_index(schema: str | None, name: str) -> TableInfo | None:
            owner = index_owner.get((schema or "public", name))
            return self.resolve(schema, owner) if owner else None

        assert classify_ddl(stmt) is not None
        targets = ddl_targets(stmt, self.resolve, resolve_index)
        assert targets == [self.table]
        for table in targets:
            check_ddl_supported(stmt, table)
        if needs_index_name(stmt):
            before = await read_index_names(as_query(meta), self.table.schema, self.table.name)
        await meta.execute(sql)
        if needs_index_name(stmt):
            after = await read_index_names(as_query(meta), self.table.schema, self.table.name)
            (chosen,) = after - before
            stmt = name_index(stmt, chosen)
        for table, part in split_by_table(stmt, self.resolve, resolve_index):
            if table is None:
                continue
            for shard in table.shards:
                await self.conns[shard.node_ids[0]].execute(shard_ddl_statement(part, table, shard))
        if classify_ddl(stmt) == "rename_table":
            t = self.table
            self.table = TableInfo(
                t.schema,
                stmt.newname,
                t.kind,
                t.dist_column,
                t.dist_type,
                t.colocation_id,
                t.shards,
            )


async def _compare(dbs: list[dict[str, Any]], table: TableInfo, step: str) -> None:
    logical = await _describe(dbs[0], table.schema, table.name, None)
    for shard in table.shards:
        name = table.shard_name(shard)
        got = await _describe(dbs[shard.node_ids[0]], table.schema, name, shard.shard_id)
        want = dict(logical)
        want["columns"] = [
            (n, t, nn, None if dflt and "nextval" in dflt else dflt, coll, gen, "")
            for n, t, nn, dflt, coll, gen, _ident in logical["columns"]
        ]
        assert got == want, (step, shard)


def test_ddl_on_real_shards(dbs: list[dict[str, Any]]) -> None:
    shards = (Shard(301, 0, (1,)), Shard(302, 1, (1,)), Shard(303, 2, (0,)), Shard(304, 3, (0,)))
    table = TableInfo(SCHEMA, "Events", "hash", "Tenant", "int8", 9, shards)

    async def go() -> None:
        conns = [await asyncpg.connect(**kw) for kw in dbs]
        try:
            await conns[0].execute(LOGICAL)
            definition = await read_table_definition(as_query(conns[0]), SCHEMA, "Events")
            definition.check_distributable("Tenant")
            for shard in shards:
                for sql in definition.shard_ddl(table.shard_name(shard), shard.shard_id):
                    await conns[shard.node_ids[0]].execute(sql)
            driver = Driver(conns, table)
            await _compare(dbs, driver.table, "created")
            for step in STEPS:
                if step.startswith("TRUNCATE"):
                    for shard in shards:
                        name = qualified_name(SCHEMA, driver.table.shard_name(shard))
                        await conns[shard.node_ids[0]].execute(
                            f'INSERT INTO {name} ("Tenant", id, v) VALUES (1, 1, 20)'
                        )
                await driver.apply(step)
                if step.startswith("DROP TABLE"):
                    continue
                await _compare(dbs, driver.table, step)
                if step.startswith("TRUNCATE"):
                    for shard in shards:
                        name = qualified_name(SCHEMA, driver.table.shard_name(shard))
                        assert (
                            await conns[shard.node_ids[0]].fetchval(f"SELECT count(*) FROM {name}")
                            == 0
                        )
                    assert await conns[0].fetchval("SELECT count(*) FROM public.plain") == 0
            for conn in conns:  # every shard, the logical table and the plain table are gone
                left = await conn.fetchval(
                    "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    f" WHERE n.nspname = '{SCHEMA}' AND c.relkind = 'r'"
                )
                assert left == 0
            assert await conns[0].fetchval("SELECT to_regclass('public.plain')") is None
        finally:
            for conn in conns:
                await conn.close()

    run(go())
