"""rewriter.hashing against a real PostgreSQL 15: raw hash functions and hash-partition routing.

Why against a server: the module's whole promise is "the slot PostgreSQL would choose". Known
vectors pin a few values; the property tests let Hypothesis generate values per type and ask the
server, in one batched query per example, (a) the type's own ``*extended`` hash function under
random seeds, (b) which of 7 real hash partitions an INSERT lands in, and (c) for modulus 32 which
remainder ``satisfies_hash_partition`` accepts. A text-parsing test feeds the same generated
literals to ``parse_text_value`` and to the server's input functions.
"""

from __future__ import annotations

import os
import time as _time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewriter.errors import PgError
from rewriter.hashing import (
    HASH_PARTITION_SEED,
    SUPPORTED_TYPES,
    PgInternal,
    UnsupportedLiteral,
    base_type,
    canonical_type,
    hash_bytes_extended,
    hash_combine64,
    hash_uint32_extended,
    hash_value,
    parse_text_value,
    partition_hash,
    shard_slot,
    shard_slot_null,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
TS_MIN, TS_END = -211813488000000000, 9223371331200000000  # timestamp range, end exclusive
DATE_MIN, DATE_END = -2451545, 2147483494 - 2451545  # days since 2000-01-01, end exclusive
USECS_PER_DAY = 86_400_000_000
MODULI = (7, 32)

# HASHING_EXAMPLES=300 for a deep run; the default keeps the file well under 20 s.
SETTINGS = settings(
    max_examples=int(os.environ.get("HASHING_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def signed(x: int) -> int:
    """uint64 -> int64, the way SQL reports the hash functions' results."""
    return x - 2**64 if x >= 2**63 else x


# --------------------------------------------------------------------------- no server needed

# Values obtained from PostgreSQL 15.18 (Debian 12) with SELECT <fn>(<value>, <seed>).
KNOWN_VECTORS = [
    ("bigint", 42, 0, 8010225493015854792),  # hashint8extended(42, 0)
    ("bigint", 42, HASH_PARTITION_SEED, 7363975540656877951),
    ("integer", 42, 0, 8010225493015854792),  # int4 and int8 agree on int32 values
    ("bigint", -1, 0, -1888257769727981238),
    ("integer", -1, 0, -1888257769727981238),
    ("text", "abc", 0, -6747756470228489321),  # hashtextextended('abc', 0)
    ("text", "abc", HASH_PARTITION_SEED, 3628778498291917250),
    ("text", "", 0, -6939563903564495251),
    ("uuid", uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), 0, 7543054272012930821),
    ("numeric", Decimal(0), 0, -1),  # hash_numeric_extended: zero -> seed - 1
    ("numeric", Decimal("NaN"), 0, 0),  # special -> seed
    ("numeric", Decimal("1.5"), 0, -8828336294488843818),
]


@pytest.mark.parametrize(("type_name", "value", "seed", "expected"), KNOWN_VECTORS)
def test_known_vectors(type_name: str, value: object, seed: int, expected: int) -> None:
    assert signed(hash_value(type_name, value, seed)) == expected


def test_building_blocks_agree() -> None:
    """hash_uint32_extended is hash_bytes_extended of the 4 little-endian bytes; combining
    from 0 is an addition."""
    for v in (0, 1, 42, 2**31, 2**32 - 1):
        for seed in (0, HASH_PARTITION_SEED, 2**64 - 1):
            assert hash_uint32_extended(v, seed) == hash_bytes_extended(
                v.to_bytes(4, "little"), seed
            )
    h = hash_value("bigint", 42)
    assert partition_hash("bigint", 42) == hash_combine64(0, h)
    assert shard_slot("bigint", 42, 32) == hash_combine64(0, h) % 32


def test_null_routes_to_slot_zero() -> None:
    """compute_partition_hash_value skips NULL columns: row hash 0, remainder 0."""
    assert partition_hash("text", None) == 0
    for n in (1, 7, 32):
        assert shard_slot("text", None, n) == 0 == shard_slot_null(n)
    with pytest.raises(TypeError):
        hash_value("bigint", None)


def test_integers_of_all_widths_hash_alike() -> None:
    """hashint2/4extended widen to int32; hashint8extended folds int32-range values to the same
    32 bits, so equal values hash equally across widths (PostgreSQL's integer_ops family)."""
    for v in (0, 1, -1, 32767, -32768, 12345):
        hashes = {hash_value(t, v) for t in ("smallint", "integer", "bigint")}
        assert len(hashes) == 1


def test_type_names() -> None:
    assert canonical_type("int8") == "bigint"
    assert canonical_type("pg_catalog.INT4") == "integer"
    assert canonical_type("timestamptz") == "timestamp with time zone"
    assert canonical_type("TIMESTAMP(3) WITH TIME ZONE") == "timestamp(3) with time zone"
    assert canonical_type("numeric(5)") == "numeric(5,0)"
    assert canonical_type("varchar(7)") == "character varying(7)"
    assert canonical_type("char") == "character(1)"
    assert canonical_type("bpchar") == "bpchar"
    assert canonical_type('"char"') == '"char"'
    assert canonical_type("float(10)") == "real"
    assert base_type("numeric(10,2)") == "numeric"
    assert base_type("bpchar") == base_type("character(3)") == "character"
    assert {"int2", "int4", "int8", "timestamptz", "text", "uuid", "bigint"} <= SUPPORTED_TYPES
    for name in SUPPORTED_TYPES:
        assert canonical_type(canonical_type(name)) == canonical_type(name)
    for bad in ("jsonb", "int8[]", "timetz", "interval", "inet", "time with time zone"):
        with pytest.raises(PgError) as info:
            canonical_type(bad)
        assert info.value.sqlstate == "0A000"
        assert "cannot distribute by type" in info.value.message
        assert info.value.hint


def test_rejects_values_postgres_cannot_store() -> None:
    for type_name, value, sqlstate in [
        ("smallint", 32768, "22003"),
        ("integer", -(2**31) - 1, "22003"),
        ("bigint", 2**63, "22003"),
        ("text", "a\x00b", "22021"),
        ("numeric(5,2)", Decimal("1000"), "22003"),
        ("character varying(3)", "abcd", "22001"),
    ]:
        with pytest.raises(PgError) as info:
            hash_value(type_name, value)
        assert info.value.sqlstate == sqlstate, (type_name, value)
    # Excess trailing spaces are cut, not an error, and then hash like the short value.
    assert hash_value("character varying(3)", "ab   ") == hash_value("text", "ab ")
    with pytest.raises(UnsupportedLiteral):
        hash_value("timestamptz", datetime(2024, 1, 1))  # naive: depends on TimeZone
    with pytest.raises(UnsupportedLiteral):
        parse_text_value("timestamptz", "2024-01-01 00:00:00")
    with pytest.raises(UnsupportedLiteral):
        parse_text_value("date", "01/02/2024")  # DateStyle decides MDY or DMY


def test_timing(record_property: Callable[[str, object], None]) -> None:
    """Cost per value of shard_slot (runs per inserted row); reported, loosely bounded."""
    results = {}
    for type_name, value in [("bigint", 1234567890123), ("text", "customer-000123")]:
        n = 20000
        best = min(_timed(lambda t=type_name, v=value: shard_slot(t, v, 32), n) for _ in range(5))
        results[type_name] = round(best / n * 1e6, 2)
        record_property(f"us_per_value_{type_name}", results[type_name])
    print(f"\nshard_slot µs/value: {results}")
    assert results["bigint"] < 50 and results["text"] < 100  # generous: shared CI machines


def _timed(fn: Callable[[], object], n: int) -> float:
    t0 = _time.perf_counter()
    for _ in range(n):
        fn()
    return _time.perf_counter() - t0


# --------------------------------------------------------------------------- server fixtures


@dataclass(frozen=True)
class Case:
    """One column type under test.

    ``sql_type`` is the column type; ``expr`` turns the text parameter ``v`` into the value on
    the server (a cast, or arithmetic for date/time values outside Python's range);
    ``values`` generates (python value for shard_slot, text for the server) pairs; ``raw`` is
    an SQL expression of the raw extended hash with ``{x}`` for the value and ``{s}`` for the
    seed (None when the type's function is not callable from SQL).
    """

    sql_type: str
    expr: str
    values: st.SearchStrategy[tuple[Any, str]]
    raw: str | None = None


def _ints(lo: int, hi: int) -> st.SearchStrategy[tuple[Any, str]]:
    edges = [lo, lo + 1, hi - 1, hi, 0, 1, -1, INT32_MIN, INT32_MAX, INT32_MIN - 1, INT32_MAX + 1]
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi)).map(
        lambda v: (v, str(v))
    )


_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_text = st.text(_TEXT, max_size=40)


def _decimals(max_coef: int, exp_lo: int, exp_hi: int) -> st.SearchStrategy[Decimal]:
    return st.builds(
        lambda sign, coef, exp: Decimal((sign, tuple(int(c) for c in str(coef)), exp)),
        st.sampled_from([0, 1]),
        st.integers(0, max_coef),
        st.integers(exp_lo, exp_hi),
    )


def _short_with_spaces(n: int) -> st.SearchStrategy[tuple[Any, str]]:
    """Strings of at most n characters plus trailing spaces (which fit any length)."""
    return st.builds(
        lambda s, pad: s + " " * pad, st.text(_TEXT, max_size=n), st.integers(0, 3)
    ).map(lambda s: (s, s))


def _days() -> st.SearchStrategy[tuple[Any, str]]:
    def to_value(n: int, as_date: bool) -> tuple[Any, str]:
        ordinal = n + date(2000, 1, 1).toordinal()
        if as_date and 1 <= ordinal <= date.max.toordinal():
            return date.fromordinal(ordinal), str(n)
        return PgInternal(n), str(n)

    days = st.one_of(
        st.sampled_from([DATE_MIN, DATE_END - 1, -1, 0, 1]),
        st.integers(-800_000, 3_000_000),  # roughly 190 AD .. 10213 AD
        st.integers(DATE_MIN, DATE_END - 1),
    )
    special = st.sampled_from(
        [(PgInternal(INT32_MAX), "infinity"), (PgInternal(INT32_MIN), "-infinity")]
    )
    return st.one_of(st.builds(to_value, days, st.booleans()), special)


def _usecs(with_tz: bool) -> st.SearchStrategy[tuple[Any, str]]:
    """Microseconds since 2000-01-01 as PgInternal, or as datetime when Python can hold it
    (aware in a random fixed offset for timestamptz)."""
    epoch = datetime(2000, 1, 1, tzinfo=UTC if with_tz else None)

    def to_value(n: int, as_dt: bool, offset_min: int) -> tuple[Any, str]:
        if as_dt:
            try:
                dt = epoch + timedelta(microseconds=n)
            except OverflowError:
                return PgInternal(n), str(n)
            if with_tz:
                dt = dt.astimezone(timezone(timedelta(minutes=offset_min)))
            return dt, str(n)
        return PgInternal(n), str(n)

    usecs = st.one_of(
        st.sampled_from([TS_MIN, TS_END - 1, -1, 0, 1, 499, 500, 1500, -500, -1500]),
        st.integers(-63_000_000_000_000_000, 250_000_000_000_000_000),  # ~0004 .. 9922 AD
        st.integers(TS_MIN, TS_END - 1),
        st.integers(-(10**12), 10**12),  # near the epoch: sub-second digits matter for typmods
    )
    special = st.sampled_from(
        [(PgInternal(INT64_MAX), "infinity"), (PgInternal(INT64_MIN), "-infinity")]
    )
    return st.one_of(
        st.builds(to_value, usecs, st.booleans(), st.integers(-15 * 60, 15 * 60)), special
    )


def _times() -> st.SearchStrategy[tuple[Any, str]]:
    def to_value(n: int, as_time: bool) -> tuple[Any, str]:
        if as_time:
            secs, micro = divmod(n, 1_000_000)
            return time(secs // 3600, secs // 60 % 60, secs % 60, micro), str(n)
        return PgInternal(n), str(n)

    return st.one_of(
        st.builds(to_value, st.integers(0, USECS_PER_DAY - 1), st.booleans()),
        st.just((PgInternal(USECS_PER_DAY), "24:00:00")),
        st.sampled_from([USECS_PER_DAY - 1, USECS_PER_DAY - 5000, 4999, 5000]).map(
            lambda n: (PgInternal(n), str(n))
        ),
    )


def _roundable(pair: tuple[Any, str]) -> bool:
    """Not in the last second of the timestamp range, which rounds up out of range."""
    v = pair[0]
    return not (isinstance(v, PgInternal) and TS_END - 10**6 <= v.value < TS_END)


_DATE_EXPR = "CASE WHEN v ~ 'inf' THEN v::date ELSE '2000-01-01'::date + v::int END"


def _ts_expr(sql_base: str, epoch: str) -> str:
    # Day and microsecond parts separately: interval * bigint goes through float8, which is
    # exact for each part but not for the whole microsecond count.
    return (
        f"CASE WHEN v ~ 'inf' THEN v::{sql_base} ELSE '{epoch}'::{sql_base}"
        " + (v::int8 / 86400000000) * interval '1 day'"
        " + mod(v::int8, 86400000000) * interval '1 microsecond' END"
    )


_TIME_EXPR = (
    "CASE WHEN v ~ ':' THEN v::time ELSE '00:00'::time + v::int8 * interval '1 microsecond' END"
)

CASES: dict[str, Case] = {
    "int2": Case("smallint", "v::int2", _ints(-(2**15), 2**15 - 1), "hashint2extended({x}, {s})"),
    "int4": Case("integer", "v::int4", _ints(INT32_MIN, INT32_MAX), "hashint4extended({x}, {s})"),
    "int8": Case("bigint", "v::int8", _ints(INT64_MIN, INT64_MAX), "hashint8extended({x}, {s})"),
    "oid": Case("oid", "v::oid", _ints(0, 2**32 - 1), "hashoidextended({x}, {s})"),
    "num": Case(
        "numeric",
        "v::numeric",
        st.one_of(
            _decimals(10**40, -45, 45),
            _decimals(10**4, -10, 10),
            st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")]),
        ).map(lambda d: (d, str(d))),
        "hash_numeric_extended({x}, {s})",
    ),
    "num12_3": Case(
        "numeric(12,3)",
        "v::numeric",
        st.one_of(_decimals(10**11 - 1, -10, -3), st.just(Decimal("NaN"))).map(
            lambda d: (d, str(d))
        ),
    ),
    "f4": Case(
        "real",
        "v::real",
        st.floats(width=32).map(lambda x: (x, repr(x))),
        "hashfloat4extended({x}, {s})",
    ),
    "f8": Case(
        "double precision",
        "v::float8",
        st.floats().map(lambda x: (x, repr(x))),
        "hashfloat8extended({x}, {s})",
    ),
    "bool": Case("boolean", "v::boolean", st.booleans().map(lambda b: (b, str(b).lower()))),
    "chr": Case(
        '"char"',
        'v::"char"',
        st.integers(0, 255).map(lambda b: (b, f"\\{b:03o}")),
        "hashcharextended({x}, {s})",
    ),
    "text": Case("text", "v::text", _text.map(lambda s: (s, s)), "hashtextextended({x}, {s})"),
    "vc5": Case("varchar(5)", "v::text", _short_with_spaces(5)),
    "bpc5": Case("character(5)", "v::text", _short_with_spaces(5), "hashbpcharextended({x}, {s})"),
    "name": Case(
        "name",
        "v::name",
        st.text(_TEXT, max_size=80).map(lambda s: (s, s)),
        "hashnameextended({x}, {s})",
    ),
    "bytea": Case(
        "bytea",
        "v::bytea",
        st.binary(max_size=40).map(lambda b: (b, "\\x" + b.hex())),
    ),  # hashvarlenaextended takes "internal": not callable from SQL; routing covers bytea
    "uuid": Case(
        "uuid", "v::uuid", st.uuids().map(lambda u: (u, str(u))), "uuid_hash_extended({x}, {s})"
    ),
    "date": Case("date", _DATE_EXPR, _days(), "hashint4extended(date_days({x}), {s})"),
    "time": Case("time", _TIME_EXPR, _times(), "time_hash_extended({x}, {s})"),
    "time2": Case("time(2)", _TIME_EXPR, _times()),
    "ts": Case(
        "timestamp",
        _ts_expr("timestamp", "2000-01-01"),
        _usecs(False),
        "timestamp_hash_extended({x}, {s})",
    ),
    "ts3": Case(
        "timestamp(3)", _ts_expr("timestamp", "2000-01-01"), _usecs(False).filter(_roundable)
    ),
    "tstz": Case(
        "timestamptz",
        _ts_expr("timestamptz", "2000-01-01 00:00:00+00"),
        _usecs(True),
        # With TimeZone UTC the timestamp has the same internal value as the timestamptz.
        "timestamp_hash_extended({x}::timestamp, {s})",
    ),
    "tstz0": Case(
        "timestamptz(0)",
        _ts_expr("timestamptz", "2000-01-01 00:00:00+00"),
        _usecs(True).filter(_roundable),
    ),
}


@pytest.fixture(scope="module")
def pg(cluster: Any) -> Iterator[psycopg.Connection[Any]]:
    """A scratch database on node 0 with one hash-partitioned table (7 partitions) per type."""
    node = cluster.nodes[0]
    dbname = f"orochi_hashing_{os.getpid()}"
    with psycopg.connect(node.dsn(), autocommit=True, connect_timeout=10) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {dbname}")
        admin.execute(f"CREATE DATABASE {dbname}")
    conn = psycopg.connect(node.dsn(dbname), autocommit=True, connect_timeout=10)
    try:
        conn.execute("SET TimeZone = 'UTC'")
        conn.execute("SET DateStyle = 'ISO, YMD'")
        ddl = []
        for tag, case in CASES.items():
            ddl.append(f"CREATE TABLE h_{tag} (k {case.sql_type}, o int) PARTITION BY HASH (k)")
            for r in range(7):
                ddl.append(
                    f"CREATE TABLE h_{tag}_{r} PARTITION OF h_{tag}"
                    f" FOR VALUES WITH (MODULUS 7, REMAINDER {r})"
                )
        conn.execute(";".join(ddl))
        # The date's internal int32 (infinities are INT32_MAX/MIN, DATEVAL_NOEND/NOBEGIN).
        conn.execute(
            """
            CREATE FUNCTION date_days(d date) RETURNS int LANGUAGE sql IMMUTABLE AS $$
                SELECT CASE WHEN d = 'infinity' THEN 2147483647
                            WHEN d = '-infinity' THEN -2147483648
                            ELSE d - '2000-01-01'::date END $$"""
        )
        # Hash of a text literal cast by the server, or the SQLSTATE when it does not parse.
        conn.execute(
            """
            CREATE FUNCTION try_hash(expr text, v text, seed int8) RETURNS text
            LANGUAGE plpgsql AS $$
            DECLARE h int8;
            BEGIN
                EXECUTE 'SELECT ' || expr INTO h USING v, seed;
                RETURN h::text;
            EXCEPTION WHEN others THEN
                RETURN 'ERROR ' || SQLSTATE;
            END $$"""
        )
        yield conn
    finally:
        conn.close()
        with psycopg.connect(node.dsn(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def server_insert_slots(
    conn: psycopg.Connection[Any], tag: str, texts: list[str | None]
) -> list[int]:
    """Remainder of the partition each value lands in when INSERTed (get_partition_for_tuple)."""
    case = CASES[tag]
    with conn.transaction(force_rollback=True):
        rows = conn.execute(
            f"INSERT INTO h_{tag} (k, o) SELECT {case.expr}, o::int"
            " FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, o)"
            " RETURNING o, tableoid::regclass::text",
            [texts],
        ).fetchall()
    by_ord = {o: int(part.rsplit("_", 1)[1]) for o, part in rows}
    return [by_ord[i + 1] for i in range(len(texts))]


def server_check_slots(
    conn: psycopg.Connection[Any], tag: str, texts: list[str | None], modulus: int
) -> list[int | None]:
    """The remainder satisfies_hash_partition accepts for each value."""
    case = CASES[tag]
    rows = conn.execute(
        f"SELECT (SELECT r FROM generate_series(0, {modulus - 1}) r"
        f" WHERE satisfies_hash_partition('h_{tag}'::regclass, {modulus}, r,"
        f" ({case.expr})::{case.sql_type}))"
        " FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, o) ORDER BY o",
        [texts],
    ).fetchall()
    return [r[0] for r in rows]


def _mismatches(values: list[Any], texts: list[Any], got: list[Any], want: list[Any]) -> list[Any]:
    return [(v, t, g, w) for v, t, g, w in zip(values, texts, got, want, strict=True) if g != w]


# --------------------------------------------------------------------------- server properties


@pytest.mark.parametrize("tag", list(CASES))
def test_partition_routing_matches_postgres(pg: psycopg.Connection[Any], tag: str) -> None:
    """shard_slot == the partition PostgreSQL routes the row to (modulus 7, real INSERT) and
    the remainder satisfies_hash_partition accepts (modulus 7 and 32)."""
    case = CASES[tag]

    @SETTINGS
    @given(st.lists(case.values, min_size=1, max_size=60))
    def check(pairs: list[tuple[Any, str]]) -> None:
        values = [v for v, _ in pairs]
        texts: list[str | None] = [t for _, t in pairs]
        ours = {m: [shard_slot(case.sql_type, v, m) for v in values] for m in MODULI}
        assert _mismatches(values, texts, server_insert_slots(pg, tag, texts), ours[7]) == []
        for m in MODULI:
            got = server_check_slots(pg, tag, texts, m)
            assert _mismatches(values, texts, got, ours[m]) == []

    check()


@pytest.mark.parametrize("tag", list(CASES))
def test_null_key_routes_like_postgres(pg: psycopg.Connection[Any], tag: str) -> None:
    assert server_insert_slots(pg, tag, [None]) == [shard_slot(CASES[tag].sql_type, None, 7)]
    for m in MODULI:
        assert server_check_slots(pg, tag, [None], m) == [shard_slot_null(m)]


_SEEDS = st.one_of(st.sampled_from([0, HASH_PARTITION_SEED, -1]), st.integers(INT64_MIN, INT64_MAX))


@pytest.mark.parametrize("tag", [t for t, c in CASES.items() if c.raw])
def test_raw_hash_functions_match_postgres(pg: psycopg.Connection[Any], tag: str) -> None:
    """hash_value(type, v, seed) == the type's SQL-callable extended hash, for random seeds."""
    case = CASES[tag]
    assert case.raw is not None
    # Hash the value with the column's base type (typmods are covered by the routing tests).
    raw_type = {"character(5)": "bpchar"}.get(case.sql_type, case.sql_type)
    sql = case.raw.format(x=f"({case.expr})::{raw_type}", s="%s::int8")

    @SETTINGS
    @given(st.lists(case.values, min_size=1, max_size=60), _SEEDS)
    def check(pairs: list[tuple[Any, str]], seed: int) -> None:
        values = [v for v, _ in pairs]
        texts = [t for _, t in pairs]
        rows = pg.execute(
            f"SELECT {sql} FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, o) ORDER BY o",
            [seed, texts],
        ).fetchall()
        ours = [signed(hash_value(raw_type, v, seed)) for v in values]
        assert _mismatches(values, texts, [r[0] for r in rows], ours) == []

    check()


# --------------------------------------------------------------------------- text input


def _compare_parsing(
    conn: psycopg.Connection[Any],
    type_name: str,
    raw_sql: str,
    texts: list[str],
    tz: str | None = None,
    python_hash: Callable[[object, int], int] | None = None,
) -> int:
    """parse_text_value + hash_value vs the server's input function + hash, per literal.

    Both must agree on the hash, or both reject the literal. UnsupportedLiteral (the proxy
    declines a form it does not read) is skipped; the count of literals the proxy did decide
    on is returned so tests can check the generator is not all-declined. ``python_hash``
    replaces ``hash_value(type_name, ...)`` where the SQL side hashes a stand-in.
    """
    seed = 0x1234_5678_9ABC_DEF0
    server = [
        r[0]
        for r in conn.execute(
            "SELECT try_hash(%s, v, %s) FROM unnest(%s::text[]) WITH ORDINALITY AS u(v, o)"
            " ORDER BY o",
            [raw_sql, seed, texts],
        ).fetchall()
    ]
    understood = 0
    bad = []
    for text, theirs in zip(texts, server, strict=True):
        try:
            value = parse_text_value(type_name, text, timezone=tz)
            if python_hash is not None:
                ours = str(signed(python_hash(value, seed)))
            else:
                ours = str(signed(hash_value(type_name, value, seed)))
        except UnsupportedLiteral:
            continue
        except PgError as exc:
            ours = f"ERROR {exc.sqlstate}"
        understood += 1
        if ours.startswith("ERROR") and theirs.startswith("ERROR"):
            continue  # both reject (SQLSTATEs may differ in detail, e.g. 22007 vs 22008)
        if ours != theirs:
            bad.append((text, ours, theirs))
    assert bad == []
    return understood


def _ws() -> st.SearchStrategy[str]:
    return st.sampled_from(["", " ", "  ", "\t"])


@SETTINGS
@given(st.data())
def test_parse_integers_like_postgres(pg: psycopg.Connection[Any], data: st.DataObject) -> None:
    lit = st.builds(
        lambda a, sign, n, b: f"{a}{sign}{n}{b}",
        _ws(),
        st.sampled_from(["", "+", "-"]),
        st.one_of(st.integers(0, 2**64), st.sampled_from([2**15, 2**31, 2**32, 2**63])),
        _ws(),
    )
    junk = st.text(alphabet=" +-0123456789xe_.", max_size=6)
    texts = data.draw(st.lists(st.one_of(lit, junk), min_size=1, max_size=60))
    for type_name, fn in [
        ("smallint", "hashint2extended($1::int2, $2)"),
        ("integer", "hashint4extended($1::int4, $2)"),
        ("bigint", "hashint8extended($1::int8, $2)"),
        ("oid", "hashoidextended($1::oid, $2)"),
    ]:
        _compare_parsing(pg, type_name, fn, texts)


@SETTINGS
@given(st.data())
def test_parse_numeric_and_floats_like_postgres(
    pg: psycopg.Connection[Any], data: st.DataObject
) -> None:
    def literal(sign: str, ip: str, fp: str | None, exp: int | None) -> str:
        s = sign + ip + ("." + fp if fp is not None else "")
        return s + (f"e{exp}" if exp is not None else "")

    digits = st.text(alphabet="0123456789", min_size=0, max_size=22)
    lit = st.builds(
        literal,
        st.sampled_from(["", "-", "+"]),
        digits,
        st.none() | digits,
        st.none() | st.integers(-340, 320) | st.integers(-50, 45),
    )
    special = st.sampled_from(
        [
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "inf",
            "-inf",
            " 1.5 ",
            # Just above the float32 midpoint 1 + 2**-24: float8 rounding lands on the midpoint
            # and float32 rounding then goes down, but strtof rounds up. Also denormals and
            # overflow/underflow edges.
            "1.0000000596046447753906251",
            "-1.0000000596046447753906251",
            "1e-45",
            "1e-46",
            "3.4028235e38",
            "3.4028236e38",
            "4.9e-324",
            "2e-324",
            "1.7976931348623157e308",
            "1.8e308",
        ]
    )
    texts = data.draw(st.lists(st.one_of(lit, special), min_size=1, max_size=60))
    assert _compare_parsing(pg, "numeric", "hash_numeric_extended($1::numeric, $2)", texts) > 0
    _compare_parsing(pg, "real", "hashfloat4extended($1::real, $2)", texts)
    _compare_parsing(pg, "double precision", "hashfloat8extended($1::float8, $2)", texts)


@SETTINGS
@given(st.data())
def test_parse_misc_types_like_postgres(pg: psycopg.Connection[Any], data: st.DataObject) -> None:
    bools = st.one_of(
        st.sampled_from(["t", "TRUE", " yes ", "on", "of", "o", "1", "0", "n", "fal", "y", "x"]),
        st.text(alphabet="tfyesnoa01 ", max_size=5),
    )
    _compare_parsing(
        pg,
        "boolean",
        "hashint4extended($1::boolean::int, $2)",
        data.draw(st.lists(bools, min_size=1)),
    )

    def uuid_text(u: uuid.UUID, hyphens: list[bool], upper: bool, braces: bool) -> str:
        h = u.hex.upper() if upper else u.hex
        s = "".join(
            h[i : i + 4] + ("-" if hyphens[i // 4] and i < 28 else "") for i in range(0, 32, 4)
        )
        return "{" + s + "}" if braces else s

    uuids = st.one_of(
        st.builds(
            uuid_text,
            st.uuids(),
            st.lists(st.booleans(), min_size=8, max_size=8),
            st.booleans(),
            st.booleans(),
        ),
        st.uuids().map(str),
        st.text(alphabet="0123456789abcdef-{}", max_size=38),
    )
    _compare_parsing(
        pg, "uuid", "uuid_hash_extended($1::uuid, $2)", data.draw(st.lists(uuids, min_size=1))
    )

    byteas = st.one_of(
        st.binary(max_size=20).map(
            lambda b: "\\x" + " ".join(b.hex()[i : i + 2] for i in range(0, 2 * len(b), 2))
        ),
        st.text(alphabet="ab\\0123478x é", max_size=12),
    )
    _compare_parsing(  # hashvarlenaextended is not SQL-callable: compare the bytes via hex
        pg,
        "bytea",
        "hashtextextended(encode($1::bytea, 'hex'), $2)",
        data.draw(st.lists(byteas, min_size=1)),
        python_hash=lambda b, seed: hash_value("text", bytes(b).hex(), seed),  # type: ignore[arg-type]
    )

    chars = st.one_of(st.text(_TEXT, max_size=3), st.integers(0, 511).map(lambda b: f"\\{b:03o}"))
    _compare_parsing(
        pg, '"char"', 'hashcharextended($1::"char", $2)', data.draw(st.lists(chars, min_size=1))
    )

    names = st.text(_TEXT, max_size=70)
    _compare_parsing(
        pg, "name", "hashnameextended($1::name, $2)", data.draw(st.lists(names, min_size=1))
    )
    _compare_parsing(
        pg, "bpchar", "hashbpcharextended($1::bpchar, $2)", data.draw(st.lists(names, min_size=1))
    )


_ZONES = ["America/New_York", "Europe/Paris", "Australia/Lord_Howe", "Asia/Kolkata"]


def _datetime_literals() -> st.SearchStrategy[str]:
    def lit(
        y: int, mo: int, d: int, t: tuple[int, int, int, str] | None, sep: str, zone: str, bc: bool
    ) -> str:
        s = f"{y:04d}-{mo:02d}-{d:02d}"
        if t is not None:
            h, mi, sec, frac = t
            s += f"{sep}{h:02d}:{mi:02d}:{sec:02d}{frac}"
        return s + zone + (" BC" if bc else "")

    times = st.none() | st.tuples(
        st.integers(0, 25),
        st.integers(0, 60),
        st.integers(0, 61),
        st.sampled_from(["", ".5", ".123456", ".1234565", ".0000005", ".9999999", ".25"]),
    )
    zones = st.sampled_from(
        ["", "Z", "+00", "+05:30", "-08", "+0530", "-03:30:15", " UTC", "+15:59", "+16"]
        + [" " + z for z in _ZONES]
    )
    years = st.one_of(
        st.integers(1, 9999), st.integers(1, 300000), st.sampled_from([1900, 2024, 2038])
    )
    return st.one_of(
        st.builds(
            lit,
            years,
            st.integers(0, 13),
            st.integers(0, 32),
            times,
            st.sampled_from([" ", "T"]),
            zones,
            st.booleans(),
        ),
        # Around DST changes of the zones above (gaps and folds).
        st.builds(
            lit,
            st.sampled_from([1960, 1999, 2024, 2037]),
            st.sampled_from([3, 4, 10, 11]),
            st.integers(1, 31),
            st.tuples(
                st.integers(0, 4), st.sampled_from([0, 15, 30, 45, 59]), st.just(0), st.just("")
            ),
            st.just(" "),
            st.sampled_from([""] + [" " + z for z in _ZONES]),
            st.just(False),
        ),
        st.sampled_from(
            [
                "infinity",
                "-infinity",
                "epoch",
                "  2024-01-02  ",
                "2024-01-02 24:00:00",
                "2024-13-01",
            ]
        ),
    )


@SETTINGS
@given(st.lists(_datetime_literals(), min_size=1, max_size=60), st.sampled_from(_ZONES + ["UTC"]))
def test_parse_dates_and_timestamps_like_postgres(
    pg: psycopg.Connection[Any], texts: list[str], zone: str
) -> None:
    """ISO literals with offsets, named zones, BC, 24:00, leap seconds, rounding of 7th digit;
    the session TimeZone (for literals without an offset) is passed as ``timezone=``."""
    pg.execute("SELECT set_config('TimeZone', %s, false)", [zone])
    try:
        _compare_parsing(pg, "date", "hashint4extended(date_days($1::date), $2)", texts)
        _compare_parsing(pg, "timestamp", "timestamp_hash_extended($1::timestamp, $2)", texts)
        _compare_parsing(
            pg,
            "timestamptz",
            "timestamp_hash_extended($1::timestamptz AT TIME ZONE 'UTC', $2)",
            texts,
            tz=zone,
        )
    finally:
        pg.execute("SET TimeZone = 'UTC'")


@SETTINGS
@given(
    st.lists(
        st.builds(
            lambda h, m, s, f: f"{h}:{m:02d}:{s:02d}{f}",
            st.integers(0, 25),
            st.integers(0, 60),
            st.integers(0, 61),
            st.sampled_from(["", ".5", ".999999", ".9999995", ".1234565"]),
        )
        | st.sampled_from(["24:00", "allballs", "12:00", "2024-01-02 12:34:56", "12:34:56+05"]),
        min_size=1,
        max_size=40,
    )
)
def test_parse_time_like_postgres(pg: psycopg.Connection[Any], texts: list[str]) -> None:
    assert _compare_parsing(pg, "time", "time_hash_extended($1::time, $2)", texts) > 0
    _compare_parsing(pg, "time(2)", "time_hash_extended($1::time(2), $2)", texts)


def test_parse_dst_edge_cases(pg: psycopg.Connection[Any]) -> None:
    """Spring-forward gaps take the offset before the change, fall-back folds the one after."""
    cases = [
        ("America/New_York", "2024-03-10 02:30:00"),
        ("America/New_York", "2024-11-03 01:30:00"),
        ("Europe/Paris", "2024-03-31 02:30:00"),
        ("Europe/Paris", "2024-10-27 02:30:00"),
        ("Australia/Lord_Howe", "2024-04-07 01:45:00"),
        ("Australia/Lord_Howe", "2024-10-06 02:15:00"),
        ("Europe/Paris", "1900-01-01 00:00:00"),  # local mean time, second-level offset
        ("Asia/Kolkata", "1941-10-01 00:00:00"),
    ]
    for zone, text in cases:
        pg.execute("SELECT set_config('TimeZone', %s, false)", [zone])
        try:
            assert (
                _compare_parsing(
                    pg,
                    "timestamptz",
                    "timestamp_hash_extended($1::timestamptz AT TIME ZONE 'UTC', $2)",
                    [text, f"{text} {zone}"],
                    tz=zone,
                )
                == 2
            )
        finally:
            pg.execute("SET TimeZone = 'UTC'")
