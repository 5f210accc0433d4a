"""Shard pruning and co-location, planned against a hand-built catalog (pure: no database).

Why these tests: pruning decides which shards a statement runs on. Touching too many shards is
only slow, touching too few answers wrongly without any error, so each rule gets both sides: the
forms that must pin a distribution column (``=``, ``IN``, ``= ANY``, parameters, casts, AND,
join equalities) and the forms that must not (OR, NOT, outer-join ON, subqueries, lossy casts).
The plans' pins are then resolved to shard sets the way the executor does at Bind
(``executor.distributed.resolve_shards``), including binary parameters and arrays, and a
Hypothesis property checks the resolved set against ``rewriter.hashing.shard_slot`` directly.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parse_sql

from executor.distributed import resolve_shards
from rewriter.errors import PgError
from rewriter.hashing import parse_text_value, shard_slot
from rewriter.model import ClusterModel, Shard, TableInfo
from rewriter.planner import Plan, plan_statement
from rewriter.pruning import PinValue

NODES = (1, 2, 3)
AGGREGATES = frozenset({"count", "sum", "avg", "min", "max"})


def hash_table(name: str, colocation: int, column: str, type_name: str, shard_count: int) -> TableInfo:
    """A hash-distributed table whose shard ``i`` sits on node ``i % 3 + 1``."""
    base = colocation * 100
    shards = tuple(Shard(base + i, i, (NODES[i % len(NODES)],)) for i in range(shard_count))
    return TableInfo("public", name, "hash", column, type_name, colocation, shards, columns=(column, "v", "w"))


A = hash_table("a", 1, "k", "integer", 4)
B = hash_table("b", 1, "k", "integer", 4)  # co-located with a
C = hash_table("c", 2, "k", "integer", 4)  # same shape, other colocation group
BIG = hash_table("big", 3, "id", "bigint", 8)
NAMES = hash_table("names", 4, "name", "text", 4)
NUMS = hash_table("nums", 5, "x", "numeric(12,3)", 4)
REF = TableInfo("public", "r", "reference", None, None, 0, (Shard(900, 0, NODES),), columns=("id", "label"))
OTHER_SCHEMA = TableInfo("app", "a", "hash", "id", "integer", 6, A.shards, columns=("id",))  # app.a

MODEL = ClusterModel(
    1,
    {(t.schema, t.name): t for t in (A, B, C, BIG, NAMES, NUMS, REF, OTHER_SCHEMA)},
    NODES,
    AGGREGATES,
)


def plan(sql: str) -> Plan | None:
    return plan_statement(parse_sql(sql)[0].stmt, sql, MODEL, ("public",), AGGREGATES)


def planned(sql: str) -> Plan:
    p = plan(sql)
    assert p is not None, "no catalog table found"
    return p


def pins(sql: str) -> list[list[tuple[str, str | int | None]]] | None:
    """The plan's pins as comparable tuples: ("const", text) / ("param", n) / ("array", n)."""
    p = planned(sql)
    if p.pins is None:
        return None
    return [[_pin(v) for v in group] for group in p.pins]


def _pin(v: PinValue) -> tuple[str, str | int | None]:
    if v.kind == "const":
        return ("const", v.text)
    return ("param" if v.kind == "param" else "array", v.number)


def refused(sql: str) -> PgError:
    with pytest.raises(PgError) as info:
        plan(sql)
    assert info.value.sqlstate == "0A000", info.value
    return info.value


def slot(value: int, table: TableInfo = A) -> int:
    assert table.dist_type is not None
    return shard_slot(table.dist_type, parse_text_value(table.dist_type, str(value)), table.shard_count)


def value_in_other_slot(value: int, table: TableInfo = A) -> int:
    """Some integer whose shard differs from ``value``'s."""
    return next(v for v in range(value + 1, value + 1000) if slot(v, table) != slot(value, table))


# ------------------------------------------------------------------------------ pins
@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM a WHERE k = 5", [[("const", "5")]]),
        ("SELECT * FROM a WHERE 5 = k", [[("const", "5")]]),
        ("SELECT * FROM a WHERE a.k = 5", [[("const", "5")]]),
        ("SELECT * FROM public.a WHERE public.a.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a AS x WHERE x.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a WHERE k = -7", [[("const", "-7")]]),
        ("SELECT * FROM a WHERE k IN (1, 2, 3)", [[("const", "1"), ("const", "2"), ("const", "3")]]),
        ("SELECT * FROM a WHERE k = ANY(ARRAY[4, 5])", [[("const", "4"), ("const", "5")]]),
        ("SELECT * FROM a WHERE k = ANY($1)", [[("array", 1)]]),
        ("SELECT * FROM a WHERE k = ANY($2::int[])", [[("array", 2)]]),
        ("SELECT * FROM a WHERE k = $1", [[("param", 1)]]),
        ("SELECT * FROM a WHERE $1 = k", [[("param", 1)]]),
        ("SELECT * FROM a WHERE k = $3::int", [[("param", 3)]]),
        ("SELECT * FROM a WHERE k = '5'::int", [[("const", "5")]]),
        ("SELECT * FROM a WHERE k = CAST('5' AS bigint)", [[("const", "5")]]),
        ("SELECT * FROM a WHERE k = int4 '5'", [[("const", "5")]]),
        ("SELECT * FROM a WHERE k = '5'", [[("const", "5")]]),
        ("SELECT * FROM names WHERE name = 'x'::varchar", [[("const", "x")]]),
        ("SELECT * FROM names WHERE name = 'x'::pg_catalog.text", [[("const", "x")]]),
        ("SELECT * FROM big WHERE id = 5::int", [[("const", "5")]]),
        ("SELECT * FROM nums WHERE x = '1.5'::numeric", [[("const", "1.5")]]),
        ("SELECT * FROM a WHERE k = NULL", [[("const", None)]]),
        # AND with anything else keeps the pin; two pins on one column are both kept (AND).
        ("SELECT * FROM a WHERE k = 5 AND v > 3 AND (w = 1 OR w = 2)", [[("const", "5")]]),
        ("SELECT * FROM a WHERE v > 3 AND k IN (5, 6) AND k = 5", [[("const", "5"), ("const", "6")], [("const", "5")]]),
        # Join equalities put tables in one class: a pin on either pins both.
        ("SELECT * FROM a JOIN b ON a.k = b.k WHERE b.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a, b WHERE a.k = b.k AND a.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a JOIN b ON a.k = b.k AND a.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a JOIN b ON b.k = a.k JOIN b AS b2 ON b2.k = b.k WHERE b2.k = $1", [[("param", 1)]]),
        # WHERE filters every row, also below an outer join (rows with a NULL key fail k = 5).
        ("SELECT * FROM a LEFT JOIN b ON a.k = b.k WHERE a.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a LEFT JOIN b ON a.k = b.k WHERE b.k = 5", [[("const", "5")]]),
        ("SELECT * FROM a FULL JOIN b ON a.k = b.k WHERE a.k = 5", [[("const", "5")]]),
        # Reference tables neither pin nor need pinning.
        ("SELECT * FROM a JOIN r ON r.id = a.v WHERE a.k = 5 AND r.id = 7", [[("const", "5")]]),
        ("UPDATE a SET v = 1 WHERE k = 5", [[("const", "5")]]),
        ("DELETE FROM a WHERE k IN (5, $1)", [[("const", "5"), ("param", 1)]]),
        ("DELETE FROM a USING b WHERE a.k = b.k AND b.k = 5", [[("const", "5")]]),
        ("SELECT count(*) FROM big WHERE id = 9223372036854775807", [[("const", "9223372036854775807")]]),
    ],
)
def test_pins(sql: str, expected: list[list[tuple[str, str | int | None]]]) -> None:
    assert pins(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a",
        "SELECT * FROM a WHERE k = 5 OR k = 6",
        "SELECT * FROM a WHERE k = 5 OR v = 1",
        "SELECT * FROM a WHERE NOT (k = 5)",
        "SELECT * FROM a WHERE NOT (k <> 5)",
        "SELECT * FROM a WHERE k <> 5",
        "SELECT * FROM a WHERE k < 5",
        "SELECT * FROM a WHERE k = v",
        "SELECT * FROM a WHERE k = 2 + 3",
        "SELECT * FROM a WHERE k + 0 = 5",
        "SELECT * FROM a WHERE k::text = '5'",
        "SELECT * FROM a WHERE k IN (1, v)",
        "SELECT * FROM a WHERE k IN (SELECT 5)",
        "SELECT * FROM a WHERE k = (SELECT 5)",
        "SELECT * FROM a WHERE EXISTS (SELECT 1 FROM r WHERE a.k = 5)",
        "SELECT * FROM a WHERE k = ANY(ARRAY[1, v])",
        "SELECT * FROM a WHERE k = ALL(ARRAY[5])",
        "SELECT * FROM a WHERE (k = 5) IS TRUE",
        "SELECT * FROM a WHERE CASE WHEN k = 5 THEN true END",
        # An outer join's ON does not remove rows of the preserved side.
        "SELECT * FROM a LEFT JOIN b ON a.k = b.k AND b.k = 5",
        "SELECT * FROM a LEFT JOIN b ON a.k = b.k AND a.k = 5",
        "SELECT * FROM a RIGHT JOIN b ON a.k = b.k AND a.k = 5",
        "SELECT * FROM a FULL JOIN b ON a.k = b.k AND a.k = 5",
        # Inner join nested under an outer join: its ON does not filter the outer result.
        "SELECT * FROM a LEFT JOIN (b JOIN b AS b2 ON b.k = b2.k AND b2.k = 5) ON a.k = b.k",
        # A pin inside a subquery of the select list says nothing about the outer rows.
        "SELECT (SELECT count(*) FROM r WHERE r.id = 5) FROM a",
    ],
)
def test_no_pins(sql: str) -> None:
    assert pins(sql) is None


def test_cte_pins_only_top_level() -> None:
    """A CTE over a reference table does not hide the top-level pin; its own WHERE pins nothing."""
    assert pins("WITH x AS (SELECT id FROM r WHERE id = 3) SELECT * FROM a, x WHERE a.k = 5") == [[("const", "5")]]


# ------------------------------------------------------------------------------ co-location
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a JOIN b ON a.k = b.k",
        "SELECT * FROM a JOIN b USING (k)",
        "SELECT * FROM a, b WHERE b.k = a.k",
        "SELECT * FROM a LEFT JOIN b ON a.k = b.k",
        "SELECT * FROM a FULL JOIN b USING (k)",
        "SELECT * FROM a JOIN b ON a.k = b.k JOIN r ON r.id = b.v",
        "SELECT count(*) FROM a JOIN b ON a.k = b.k JOIN b AS b2 ON b2.k = a.k",
    ],
)
def test_colocated_joins_run_multi_shard(sql: str) -> None:
    p = planned(sql)
    assert p.kind == "select" and p.pins is None and p.multi_error is None and p.split is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a JOIN c ON a.k = c.k",  # other colocation group
        "SELECT * FROM a JOIN c ON a.k = c.k WHERE a.k = 1 AND c.k = 1",  # pinned, still two groups
        "SELECT * FROM a JOIN b ON a.v = b.v",  # not on the distribution columns
        "SELECT * FROM a JOIN b ON a.k = b.v",
        "SELECT * FROM a, b",
        "SELECT * FROM a, b WHERE a.k = b.k OR a.v = b.v",
        "SELECT * FROM a, b WHERE a.k = 5",  # only one of the two tables pinned
        "SELECT * FROM a, b WHERE a.k = 5 OR b.k = 5",
    ],
)
def test_non_colocated_joins_refused(sql: str) -> None:
    refused(sql)


def test_non_colocated_join_allowed_when_every_table_is_pinned() -> None:
    """Same group, no join on the key, both pinned: a router query if both land on one shard."""
    p = planned("SELECT * FROM a, b WHERE a.k = 5 AND b.k = $1")
    assert p.multi_error is not None  # needing more than one shard must fail at execution
    assert resolve_shards(p, FakeCtx(params=[b"5"])) == [slot(5)]


@pytest.mark.parametrize("shape", ["different", "in-list"])
def test_pinned_non_colocated_join_on_different_shards(shape: str) -> None:
    """Pins of tables that are not joined on the key are united, not intersected.

    ``a.k = 5 AND b.k = X`` needs shard(5) of a and shard(X) of b; an intersection gave no shard
    (the router then ran shard 0) or only one table's shard (rows of the other lost).
    """
    other = value_in_other_slot(5)
    if shape == "different":
        p = planned(f"SELECT * FROM a, b WHERE a.k = 5 AND b.k = {other}")
    else:
        p = planned(f"SELECT * FROM a, b WHERE a.k IN (5, {other}) AND b.k = {other}")
    # Needs shard slot(5) of a and slot(other) of b: more than one shard, so execute() raises.
    assert resolve_shards(p, FakeCtx()) == sorted({slot(5), slot(other)})


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a JOIN local_t ON local_t.id = a.k",
        "SELECT * FROM a, local_t WHERE a.k = 5",
        "SELECT * FROM a WHERE k IN (SELECT id FROM local_t)",
        "SELECT * FROM local_t WHERE id IN (SELECT k FROM a)",
        "UPDATE a SET v = 1 FROM local_t WHERE local_t.id = a.k",
        "SELECT * FROM a JOIN public.a2 ON a2.k = a.k",
    ],
)
def test_local_tables_with_distributed_refused(sql: str) -> None:
    assert "local table" in refused(sql).message


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a WHERE k IN (SELECT k FROM b)",
        "SELECT * FROM (SELECT * FROM a) s",
        "WITH x AS (SELECT * FROM a) SELECT * FROM x",
        "SELECT k FROM a UNION SELECT k FROM b",
    ],
)
def test_subqueries_over_distributed_tables_refused(sql: str) -> None:
    refused(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a WHERE a.k = 5 AND a.v IN (SELECT v FROM b)",
        "WITH x AS (SELECT v FROM b) SELECT * FROM a JOIN x ON x.v = a.v WHERE a.k = 5",
    ],
)
def test_unpinned_subquery_under_pinned_query_refused(sql: str) -> None:
    refused(sql)


def test_subquery_over_distributed_table_routes_when_pinned() -> None:
    p = planned("SELECT * FROM a WHERE a.k = 5 AND EXISTS (SELECT 1 FROM b WHERE b.k = 5 AND b.v = a.v)")
    assert p.multi_error is not None
    assert resolve_shards(p, FakeCtx()) == [slot(5)]


# ------------------------------------------------------------------------------ writes
@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE a SET k = 1",
        "UPDATE a SET k = k + 0 WHERE k = 5",
        "UPDATE a SET v = 2, k = 1 WHERE k = 1",
        "UPDATE a SET (v, k) = (2, 1)",
        "UPDATE a AS x SET k = 3 WHERE x.k = 5",
        "INSERT INTO a (k, v) VALUES (1, 2) ON CONFLICT (k) DO UPDATE SET k = 3",
    ],
)
def test_update_of_distribution_column_refused(sql: str) -> None:
    assert "distribution column" in refused(sql).message


def test_update_of_other_columns_allowed() -> None:
    p = planned("UPDATE a SET v = v + 1, w = 2 WHERE k = $1")
    assert p.kind == "modify" and p.command == "UPDATE"
    assert resolve_shards(p, FakeCtx(params=[b"7"])) == [slot(7)]


@pytest.mark.parametrize(
    ("sql", "keys"),
    [
        ("INSERT INTO a VALUES (1, 2, 3), (4, 5, 6)", [("const", "1"), ("const", "4")]),
        ("INSERT INTO a (v, k) VALUES (1, 2), (3, -4)", [("const", "2"), ("const", "-4")]),
        ("INSERT INTO a (v, k) VALUES ($1, $2), ($3, $4)", [("param", 2), ("param", 4)]),
        ("INSERT INTO a (k) VALUES ('7'::int)", [("const", "7")]),
        ("INSERT INTO a (k, v) VALUES (DEFAULT, 1)", [None]),
        ("INSERT INTO a (v) VALUES (1)", [None]),
        ("INSERT INTO a (k) VALUES (NULL)", [("const", None)]),
        ("INSERT INTO names (name, v) VALUES ('x', 1) RETURNING name", [("const", "x")]),
    ],
)
def test_insert_row_keys(sql: str, keys: list[tuple[str, Any] | None]) -> None:
    p = planned(sql)
    assert p.kind == "insert"
    assert [None if r.key is None else _pin(r.key) for r in p.insert_rows] == keys


def test_insert_statement_parts() -> None:
    p = planned("INSERT INTO a AS t (k, v) VALUES ($1, $2), (3, now()) ON CONFLICT (k) DO NOTHING RETURNING v")
    assert p.returning and p.shard_count == 4 and p.dist_type == "integer"
    assert [r.params for r in p.insert_rows] == [(1, 2), ()]
    assert [r.values_sql for r in p.insert_rows] == ["($1, $2)", "(3, now())"]
    assert p.insert_prefix.startswith("INSERT INTO public.__orochi_rel_0__ AS t (k, v) VALUES ")
    assert p.insert_suffix == " ON CONFLICT (k) DO NOTHING RETURNING v"


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO a (k) VALUES (1 + 1)",
        "WITH x AS (SELECT 1) INSERT INTO a (k) VALUES (1)",
    ],
)
def test_insert_forms_refused(sql: str) -> None:
    refused(sql)


# ------------------------------------------------------------------------------ CTE names
def test_cte_shadows_table() -> None:
    assert plan("WITH a AS (SELECT 1 AS k) SELECT * FROM a WHERE k = 5") is None


def test_schema_qualified_name_is_the_table_not_the_cte() -> None:
    p = planned("WITH a AS (SELECT 1 AS k) SELECT * FROM public.a WHERE public.a.k = 5")
    assert [t.name for t in p.tables] == ["a"]
    assert pins("WITH a AS (SELECT 1 AS k) SELECT * FROM public.a WHERE k = 5") == [[("const", "5")]]


def test_cte_name_of_other_table_and_search_path() -> None:
    """Another schema's table of the same name is found only by qualifying it."""
    p = planned("SELECT * FROM app.a WHERE id = 5")
    assert p.tables == [OTHER_SCHEMA]
    p = planned("SELECT * FROM a WHERE k = 5")
    assert p.tables == [A]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM a WHERE k IN (WITH a AS (SELECT 1 AS k) SELECT k FROM a)",
        "WITH a AS (SELECT * FROM a WHERE k = 5) SELECT * FROM a",
    ],
)
def test_cte_scope(sql: str) -> None:
    try:
        p = plan(sql)
    except PgError:
        return  # refusing is fine; running on the shell is not
    assert p is not None


# ------------------------------------------------------------------------------ lossy casts
@pytest.mark.parametrize(
    "sql",
    [
        # 'abc  '::char(5) compares as text 'abc'; hashing 'abc  ' picks another shard.
        "SELECT * FROM names WHERE name = 'abc  '::char(5)",
        # 2^53 + 1 as float8 equals 2^53 as bigint, which lives on another shard.
        "SELECT * FROM big WHERE id = 9007199254740993::float8",
        "SELECT * FROM big WHERE id = $1::float8",
        # numeric(10,2) rounds to 1.23, the stored 1.230; hashing 1.2345 as numeric(12,3) gives 1.235.
        "SELECT * FROM nums WHERE x = '1.2345'::numeric(10,2)",
        "SELECT * FROM nums WHERE x IN ('1.2345'::numeric(10,2), 2)",
        "SELECT * FROM nums WHERE x = ANY(ARRAY[2, '1.2345'::numeric(10,2)])",
        # Another type family compares in that type; not pinned even where it would be safe.
        "SELECT * FROM a WHERE k = '5'::float8",
    ],
)
def test_lossy_cast_does_not_pin(sql: str) -> None:
    assert pins(sql) is None


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO names (name) VALUES ('abc  '::char(5))",
        "INSERT INTO big (id) VALUES (9007199254740993::float8)",
        "INSERT INTO nums (x) VALUES ('1.2345'::numeric(10,2))",
    ],
)
def test_lossy_cast_insert_key_refused(sql: str) -> None:
    """The stored value differs from the literal: routing by the literal would misplace the row."""
    refused(sql)


# ------------------------------------------------------------------------------ resolve_shards
@dataclass
class FakeCtx:
    """The part of ``ExecContext`` that ``resolve_shards`` reads."""

    params: list[bytes | None] = field(default_factory=list)
    param_formats: list[int] = field(default_factory=list)
    param_oids: list[int] = field(default_factory=list)
    literals: tuple[Any, ...] | None = None  # shape-planned simple queries only


def resolved(sql: str, **ctx: Any) -> list[int]:
    return resolve_shards(planned(sql), FakeCtx(**ctx))  # type: ignore[arg-type]


def binary_array(elem_oid: int, values: list[bytes | None]) -> bytes:
    """The binary array format: ndim, has-nulls, element type, (dim, lbound), then elements."""
    out = struct.pack("!iiiii", 1, int(any(v is None for v in values)), elem_oid, len(values), 1)
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out


ALL4 = [0, 1, 2, 3]


def test_resolve_constants() -> None:
    assert resolved("SELECT * FROM a") == ALL4
    assert resolved("SELECT * FROM a WHERE k = 5") == [slot(5)]
    assert resolved("SELECT * FROM a WHERE k IN (2, 3, 4)") == sorted({slot(2), slot(3), slot(4)})
    assert resolved("SELECT * FROM a WHERE k = ANY(ARRAY[2, 3])") == sorted({slot(2), slot(3)})
    # Several conjuncts: the intersection (k IN (2, 3) AND k = 3 → only 3's shard).
    assert resolved("SELECT * FROM a WHERE k IN (2, 3) AND k = 3") == [slot(3)]
    # NULL matches nothing: no shard is needed (IN keeps the others).
    assert resolved("SELECT * FROM a WHERE k = NULL") == []
    assert resolved("SELECT * FROM a WHERE k IN (NULL, 5)") == [slot(5)]
    # A value the column type cannot hold is not routed (all shards; the node raises the error).
    assert resolved("SELECT * FROM a WHERE k = 'x'") == ALL4
    assert resolved("SELECT * FROM a WHERE k = 99999999999") == ALL4
    assert resolved("SELECT * FROM a JOIN b ON a.k = b.k WHERE b.k = 9") == [slot(9)]


def test_resolve_text_parameters() -> None:
    sql = "SELECT * FROM a WHERE k = $1"
    assert resolved(sql, params=[b"5"]) == [slot(5)]
    assert resolved(sql, params=[b" -12 "]) == [slot(-12)]
    assert resolved(sql, params=[None]) == []
    assert resolved("SELECT * FROM a WHERE k IN ($1, $2)", params=[b"2", b"11"]) == sorted({slot(2), slot(11)})
    assert resolved("SELECT * FROM names WHERE name = $1", params=["é x".encode()]) == [
        shard_slot("text", "é x", 4)
    ]


def test_resolve_binary_parameters() -> None:
    sql_a, sql_big, sql_names = (
        "SELECT * FROM a WHERE k = $1",
        "SELECT * FROM big WHERE id = $1",
        "SELECT * FROM names WHERE name = $1",
    )
    assert resolved(sql_a, params=[struct.pack("!i", -5)], param_formats=[1], param_oids=[23]) == [slot(-5)]
    # int8 values for an int4 column hash like int4 (hashint8 folds in-range values).
    assert resolved(sql_a, params=[struct.pack("!q", 6)], param_formats=[1], param_oids=[20]) == [slot(6)]
    assert resolved(sql_a, params=[struct.pack("!h", 7)], param_formats=[1], param_oids=[21]) == [slot(7)]
    big = 2**62 + 3
    assert resolved(sql_big, params=[struct.pack("!q", big)], param_formats=[1], param_oids=[20]) == [
        shard_slot("bigint", big, 8)
    ]
    assert resolved(sql_names, params=[b"abc"], param_formats=[1], param_oids=[25]) == [shard_slot("text", "abc", 4)]
    # Per-parameter formats: $1 text, $2 binary.
    assert resolved(
        "SELECT * FROM a WHERE k IN ($1, $2)",
        params=[b"2", struct.pack("!i", 11)], param_formats=[0, 1], param_oids=[0, 23],
    ) == sorted({slot(2), slot(11)})
    # A binary type the router cannot read is an error, not a guess.
    with pytest.raises(PgError) as info:
        resolved(sql_a, params=[b"\x00" * 16], param_formats=[1], param_oids=[600])  # point
    assert info.value.sqlstate == "0A000"


def test_resolve_array_parameters() -> None:
    sql = "SELECT * FROM a WHERE k = ANY($1)"
    assert resolved(sql, params=[b"{2,3,NULL}"]) == sorted({slot(2), slot(3)})
    assert resolved(sql, params=[b"{}"]) == []
    assert resolved(sql, params=[None]) == ALL4  # NULL array: not routed
    assert resolved(sql, params=[b"{{1,2},{3,4}}"]) == ALL4  # two dimensions: not routed
    ints = [struct.pack("!i", v) for v in (2, 3)]
    assert resolved(sql, params=[binary_array(23, [*ints, None])], param_formats=[1], param_oids=[1007]) == sorted(
        {slot(2), slot(3)}
    )
    longs = [struct.pack("!q", v) for v in (4, 5)]
    assert resolved(sql, params=[binary_array(20, longs)], param_formats=[1], param_oids=[1016]) == sorted(
        {slot(4), slot(5)}
    )
    assert resolved(sql, params=[struct.pack("!iii", 0, 0, 23)], param_formats=[1], param_oids=[1007]) == []
    names_sql = "SELECT * FROM names WHERE name = ANY($1)"
    texts = ['a b', 'c"d', "e\\f", "NULL", "{x}", ","]
    literal = "{" + ",".join('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in texts) + "}"
    expected = sorted({shard_slot("text", t, 4) for t in texts})
    assert resolved(names_sql, params=[literal.encode()]) == expected
    binary = binary_array(25, [t.encode() for t in texts])
    assert resolved(names_sql, params=[binary], param_formats=[1], param_oids=[1009]) == expected


# ------------------------------------------------------------------------------ property
@settings(max_examples=150, deadline=None)
@given(
    table=st.sampled_from([A, BIG]),
    key=st.integers(-(2**31), 2**31 - 1),
    values=st.lists(st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-3, 3)), min_size=1, max_size=8),
    form=st.sampled_from(["in", "any", "params", "text_array", "binary_array"]),
)
def test_resolved_shards_are_the_values_slots(table: TableInfo, key: int, values: list[int], form: str) -> None:
    col, type_name, n = table.dist_column, table.dist_type, table.shard_count
    assert col is not None and type_name is not None

    def slots(vs: list[int]) -> list[int]:
        return sorted({shard_slot(type_name, v, n) for v in vs})

    assert resolved(f"SELECT * FROM {table.name} WHERE {col} = {key}") == slots([key])
    ctx: dict[str, Any] = {}
    if form == "in":
        sql = f"SELECT * FROM {table.name} WHERE {col} IN ({', '.join(map(str, values))})"
    elif form == "any":
        sql = f"SELECT * FROM {table.name} WHERE {col} = ANY(ARRAY[{', '.join(map(str, values))}])"
    elif form == "params":
        sql = f"SELECT * FROM {table.name} WHERE {col} IN ({', '.join(f'${i + 1}' for i in range(len(values)))})"
        oid, fmt = (20, "!q") if table is BIG else (23, "!i")
        ctx = {"params": [struct.pack(fmt, v) for v in values], "param_formats": [1], "param_oids": [oid] * len(values)}
    elif form == "text_array":
        sql = f"SELECT * FROM {table.name} WHERE {col} = ANY($1)"
        ctx = {"params": [("{" + ",".join(map(str, values)) + "}").encode()]}
    else:
        sql = f"SELECT * FROM {table.name} WHERE {col} = ANY($1)"
        ctx = {
            "params": [binary_array(20, [struct.pack("!q", v) for v in values])],
            "param_formats": [1],
            "param_oids": [1016],
        }
    assert resolved(sql, **ctx) == slots(values)
    # With the key ANDed in: the intersection.
    both = resolved(f"{sql} AND {col} = {key}", **ctx)
    assert both == sorted(set(slots(values)) & set(slots([key])))
