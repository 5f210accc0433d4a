"""``time_bucket`` with TimescaleDB's semantics, as plain SQL functions for stock PostgreSQL 15.

:func:`install_statements` returns the statements that (re)define, in one schema, every
``time_bucket`` signature TimescaleDB 2.x has for ``timestamp``, ``timestamptz``, ``date`` and
the integer types (its ``uuid`` forms are not provided):

* ``time_bucket(bucket_width interval, ts timestamp|timestamptz|date)``
* ``time_bucket(bucket_width interval, ts T, origin T)`` for the same three types ``T``
* ``time_bucket(bucket_width interval, ts T, "offset" interval)``
* ``time_bucket(bucket_width interval, ts timestamptz, timezone text,
  origin timestamptz DEFAULT NULL, "offset" interval DEFAULT NULL)``
* ``time_bucket(bucket_width smallint|integer|bigint, ts same [, "offset" same])``

The arithmetic is TimescaleDB's (``src/time_bucket.c``):

* A width without months is a fixed number of microseconds (a day is 24 hours, whatever the
  clock does) and buckets are ``origin + k * width`` for the floor ``k`` (before the origin too).
  The default origin is Monday 2000-01-03 00:00: local for ``timestamp``/``date``, UTC for
  ``timestamptz``. PostgreSQL's ``date_bin`` computes exactly this, so it does the work (the
  first statement checks that the server's ``date_bin`` floors values before the origin,
  boundaries included, and refuses to install otherwise).
* A width of months counts calendar months from the origin's month (default January 2000; the
  origin's day and time are ignored) and a bucket starts on the 1st at 00:00 (for
  ``timestamptz`` without a time zone: 00:00 UTC of the UTC calendar date).
* ``date`` widths must be whole days; months cannot be combined with days or time; a width
  <= 0 raises ``period must be greater than 0`` (22023). Infinite inputs come back unchanged.
* ``offset``: ``time_bucket(w, ts - offset) + offset``, with PostgreSQL's own ``-``/``+`` (for
  ``timestamptz`` these use the session TimeZone for the offset's days and months, as in
  TimescaleDB). The time zone form buckets the local time of ``timezone`` (origin converted to
  that zone; default origin 2000-01-03 local) and converts the bucket start back.
* Integers: ``floor((ts - offset) / width) * width + offset`` with ``offset`` reduced modulo the
  width first.

Differences from TimescaleDB, all at the edges:

* The ``interval`` forms are not declared STRICT (TimescaleDB's are, except the time zone form)
  although a NULL argument still gives NULL: a STRICT SQL function whose body has a CASE is
  never inlined, and inlining is what makes these as fast as ``date_bin`` itself (a non-inlined
  SQL or PL/pgSQL function costs 4-11 times more per row). The integer forms are STRICT.
* A constant invalid width is rejected when the statement is planned, even if no row reaches
  the function; TimescaleDB raises only when a row is bucketed.
* Results outside the type's range raise PostgreSQL's ``smallint/integer/bigint out of range``
  or ``timestamp out of range`` (SQLSTATE 22003/22008) instead of TimescaleDB's
  ``timestamp out of range``; an infinite ``origin`` raises instead of giving an arbitrary value.
* Month buckets that start before year 1 use the proleptic calendar (TimescaleDB's C code
  produces invalid months there).

The schema gets ``orochi_timebucket_version()``, created last, returning :data:`VERSION`; an
installer runs :func:`version_query` first and skips the statements when it returns
:data:`VERSION`. Run the statements in one transaction.
"""

from __future__ import annotations

from rewriter.quoting import quote_ident, quote_literal

#: Bump whenever a statement below changes; installed schemas older than this are redefined.
VERSION = 1

VERSION_FUNCTION = "orochi_timebucket_version"

_USECS_PER_DAY = 86_400_000_000

# Each statement is a template: {s} is the quoted schema. Built-in functions are qualified with
# pg_catalog because a SQL function's body is parsed with the caller's search_path.
_TEMPLATES: tuple[str, ...] = (
    # Everything below relies on date_bin flooring values before the origin, boundaries included.
    """DO $check$
BEGIN
  IF pg_catalog.date_bin('1 hour', TIMESTAMP '2000-01-01 00:00', TIMESTAMP '2000-01-02 00:00')
       <> TIMESTAMP '2000-01-01 00:00'
     OR pg_catalog.date_bin('1 hour', TIMESTAMP '2000-01-01 00:30', TIMESTAMP '2000-01-02 00:00')
       <> TIMESTAMP '2000-01-01 00:00' THEN
    RAISE EXCEPTION 'date_bin() of this PostgreSQL server does not floor timestamps before '
      'the origin as time_bucket needs; upgrade PostgreSQL';
  END IF;
END
$check$""",
    # ---- validation helpers (PL/pgSQL: they raise; IMMUTABLE, so a constant width is checked
    # once when the statement is planned) ----
    """CREATE OR REPLACE FUNCTION {s}._orochi_tb_time_usecs(w interval) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$SELECT (pg_catalog.date_part('hour', $1)::bigint * 3600000000
        + pg_catalog.date_part('minute', $1)::bigint * 60000000
        + pg_catalog.date_part('microseconds', $1)::bigint)$$""",
    """CREATE OR REPLACE FUNCTION {s}._orochi_tb_months(w interval) RETURNS integer
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS
$$
DECLARE
  m integer := pg_catalog.date_part('year', w)::integer * 12
             + pg_catalog.date_part('month', w)::integer;
BEGIN
  IF m = 0 THEN
    RETURN 0;
  END IF;
  IF pg_catalog.date_part('day', w) <> 0 OR {s}._orochi_tb_time_usecs(w) <> 0 THEN
    RAISE EXCEPTION USING ERRCODE = '0A000',
      MESSAGE = 'month intervals cannot have day or time component';
  END IF;
  IF m < 0 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'period must be greater than 0';
  END IF;
  RETURN m;
END
$$""",
    """CREATE OR REPLACE FUNCTION {s}._orochi_tb_fixed(w interval, whole_days boolean)
RETURNS interval LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS
$$
DECLARE
  p numeric := pg_catalog.date_part('day', w)::numeric * {day}
             + {s}._orochi_tb_time_usecs(w);
BEGIN
  IF whole_days THEN
    IF p < {day} THEN
      RAISE EXCEPTION USING ERRCODE = '0A000',
        MESSAGE = 'interval must not have sub-day precision';
    END IF;
    IF p % {day} <> 0 THEN
      RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = 'interval must be a multiple of a day';
    END IF;
  ELSIF p <= 0 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'period must be greater than 0';
  END IF;
  RETURN w;
END
$$""",
    *(
        f"""CREATE OR REPLACE FUNCTION {{s}}._orochi_tb_period(w {t}) RETURNS {t}
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS
$$
BEGIN
  IF w <= 0 THEN
    RAISE EXCEPTION USING ERRCODE = '22023', MESSAGE = 'period must be greater than 0';
  END IF;
  RETURN w;
END
$$"""
        for t in ("smallint", "integer", "bigint")
    ),
    # ---- month arithmetic (inlinable SQL) ----
    # Months since year 0 (astronomical years: date_part gives -1 for 1 BC).
    """CREATE OR REPLACE FUNCTION {s}._orochi_tb_month_index(d date) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$SELECT ((pg_catalog.date_part('year', $1) + (pg_catalog.date_part('year', $1) < 0)::integer) * 12
         + pg_catalog.date_part('month', $1) - 1)::integer$$""",
    # First day of the n-month bucket holding d, counting from origin's month. The quotient is
    # exact in float8: |months| < 2^22 for every PostgreSQL date.
    """CREATE OR REPLACE FUNCTION {s}._orochi_tb_month_floor(n integer, d date, origin date)
RETURNS date LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$SELECT (DATE '2000-01-01' + pg_catalog.make_interval(months =>
   {s}._orochi_tb_month_index($3) - 24000
   + $1 * pg_catalog.floor(({s}._orochi_tb_month_index($2) - {s}._orochi_tb_month_index($3))::float8
                           / $1)::integer))::date$$""",
    # ---- interval widths with an origin ----
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamp, origin timestamp)
RETURNS timestamp LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT CASE
  WHEN NOT pg_catalog.isfinite($2) THEN $2
  WHEN {s}._orochi_tb_months($1) = 0
    THEN pg_catalog.date_bin({s}._orochi_tb_fixed($1, false), $2, $3)
  ELSE {s}._orochi_tb_month_floor({s}._orochi_tb_months($1), $2::date, $3::date)::timestamp
END$$""",
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamptz, origin timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT CASE
  WHEN NOT pg_catalog.isfinite($2) THEN $2
  WHEN {s}._orochi_tb_months($1) = 0
    THEN pg_catalog.date_bin({s}._orochi_tb_fixed($1, false), $2, $3)
  ELSE pg_catalog.timezone('UTC', {s}._orochi_tb_month_floor({s}._orochi_tb_months($1),
         pg_catalog.timezone('UTC', $2)::date, pg_catalog.timezone('UTC', $3)::date)::timestamp)
END$$""",
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts date, origin date)
RETURNS date LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT CASE
  WHEN NOT pg_catalog.isfinite($2) THEN $2
  WHEN {s}._orochi_tb_months($1) = 0
    THEN pg_catalog.date_bin({s}._orochi_tb_fixed($1, true), $2::timestamp, $3::timestamp)::date
  ELSE {s}._orochi_tb_month_floor({s}._orochi_tb_months($1), $2, $3)
END$$""",
    # ---- default origin (Monday 2000-01-03; its month is January 2000) ----
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamp)
RETURNS timestamp LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT {s}.time_bucket($1, $2, TIMESTAMP '2000-01-03 00:00:00')$$""",
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT {s}.time_bucket($1, $2, TIMESTAMPTZ '2000-01-03 00:00:00+00')$$""",
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts date)
RETURNS date LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT {s}.time_bucket($1, $2, DATE '2000-01-03')$$""",
    # ---- offset ----
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamp, "offset" interval)
RETURNS timestamp LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT {s}.time_bucket($1, $2 - $3) + $3$$""",
    # timestamptz - interval depends on the session TimeZone (for days/months), exactly as in
    # TimescaleDB; being STABLE it keeps this one form from being inlined.
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamptz, "offset" interval)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT {s}.time_bucket($1, $2 - $3) + $3$$""",
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts date, "offset" interval)
RETURNS date LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT ({s}.time_bucket($1, ($2 - $3)::date) + $3)::date$$""",
    # ---- time zone (not STRICT in TimescaleDB either: NULL origin/offset mean "none") ----
    """CREATE OR REPLACE FUNCTION {s}.time_bucket(bucket_width interval, ts timestamptz, timezone text,
    origin timestamptz DEFAULT NULL, "offset" interval DEFAULT NULL)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$SELECT pg_catalog.timezone($3,
  {s}.time_bucket($1, pg_catalog.timezone($3, $2) - COALESCE($5, INTERVAL '0'),
                  COALESCE(pg_catalog.timezone($3, $4), TIMESTAMP '2000-01-03 00:00:00'))
  + COALESCE($5, INTERVAL '0'))$$""",
    # ---- integers: floor((ts - o) / w) * w + o, o = offset % w, in the argument's type, so
    # overflow raises exactly where TimescaleDB raises (STRICT and still inlinable: no CASE) ----
    *(
        f"""CREATE OR REPLACE FUNCTION {{s}}.time_bucket(bucket_width {t}, ts {t}) RETURNS {t}
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$SELECT ($2 - $2 % {{s}}._orochi_tb_period($1)
          - $1 * ($2 % {{s}}._orochi_tb_period($1) < 0)::integer::{t})::{t}$$"""
        for t in ("smallint", "integer", "bigint")
    ),
    *(
        f"""CREATE OR REPLACE FUNCTION {{s}}.time_bucket(bucket_width {t}, ts {t}, "offset" {t})
RETURNS {t} LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS
$$SELECT {{s}}.time_bucket($1, ($2 - $3 % {{s}}._orochi_tb_period($1))::{t})
         + $3 % {{s}}._orochi_tb_period($1)$$"""
        for t in ("smallint", "integer", "bigint")
    ),
    # ---- marker, last: a schema reporting VERSION has every statement above ----
    f"""CREATE OR REPLACE FUNCTION {{s}}.{VERSION_FUNCTION}() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$SELECT {VERSION}$$""",
)


def install_statements(schema: str = "public") -> list[str]:
    """The statements that define ``time_bucket`` in ``schema`` (which must exist).

    With ``schema`` on the search_path (``public`` is, by default), ``time_bucket(...)`` resolves
    unqualified as with TimescaleDB. Every statement is idempotent.
    """
    s = quote_ident(schema)
    return [t.replace("{s}", s).replace("{day}", str(_USECS_PER_DAY)) for t in _TEMPLATES]


def version_query(schema: str = "public") -> str:
    """A query giving the version installed in ``schema``: one row, NULL when none is."""
    marker = quote_literal(f"{quote_ident(schema)}.{VERSION_FUNCTION}()")
    return (
        "SELECT (SELECT pg_catalog.substring(prosrc, '[0-9]+')::integer FROM pg_catalog.pg_proc "
        f"WHERE oid = pg_catalog.to_regprocedure({marker}))"
    )


def is_current(installed: int | None) -> bool:
    """Whether a schema whose :func:`version_query` gave ``installed`` needs no statements."""
    return installed is not None and installed >= VERSION
