"""Data set and query catalogue of the differential test (``tests/test_differential.py``).

Why a separate module: the rows and the queries are plain, deterministic data (a seeded
``random.Random``, no clock, no ``random()`` in SQL), so both sides of the comparison — one plain
PostgreSQL database and the cluster behind the proxy — receive byte-identical COPY text, and the
query list is fixed at import time so ``pytest.mark.parametrize`` gives every query a stable id.

The data is shaped to hit what a distributed executor gets wrong: NULLs in every non-key
column, skewed keys (a few users own a large share of the orders and events), negative and
extreme keys (int8 and int4 limits), text with mixed case, non-ASCII letters, emoji, empty
strings and the characters that need escaping in COPY text and in array literals (tab, newline,
backslash, double quote, braces, commas, the word ``NULL``), numerics at the edge of their
precision, and ``infinity`` dates.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from rewriter import hashing

SEED = 20240611
N_USERS = 20_000
N_ORDERS = 120_000
N_EVENTS = 150_000
#: Users that own a large share of the orders and events (skew).
HEAVY_USERS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
#: Order user ids that have no row in ``users`` (LEFT JOIN from orders finds nothing).
ORPHAN_USERS = (50_001, 50_002, 50_003)
EVENTS_SHARDS = 16
USERS_SHARDS = 8

SCHEMA = {
    "countries": "CREATE TABLE countries (code text PRIMARY KEY, name text, region text)",
    "users": "CREATE TABLE users (user_id int PRIMARY KEY, name text, country text, signup date)",
    "orders": (
        "CREATE TABLE orders (order_id bigint, user_id int, total numeric(10,2), status text, "
        "PRIMARY KEY (user_id, order_id))"
    ),
    "events": (
        "CREATE TABLE events (id bigint PRIMARY KEY, user_id int, kind text, "
        "amount numeric(12,2), score float8, flag bool, created timestamptz, note text)"
    ),
}
#: Load order (countries first only for readability; there are no foreign keys).
TABLES = ("countries", "users", "orders", "events")

COUNTRIES = [
    ("US", "United States", "Americas"),
    ("DE", "Deutschland", "Europe"),
    ("FR", "France", "Europe"),
    ("JP", "日本", "Asia"),
    ("CN", "中国", "Asia"),
    ("BR", "Brasil", "Americas"),
    ("IN", "India", "Asia"),
    ("GB", "United Kingdom", "Europe"),
    ("ES", "España", "Europe"),
    ("IT", "Italia", "Europe"),
    ("NL", "Nederland", "Europe"),
    ("SE", "Sverige", "Europe"),
    ("AT", "Österreich", "Europe"),
    ("CH", "Schweiz", "Europe"),
    ("PL", "Polska", "Europe"),
    ("CZ", "Česko", "Europe"),
    ("GR", "Ελλάδα", "Europe"),
    ("RU", "Россия", "Europe"),
    ("TR", "Türkiye", "Asia"),
    ("KR", "대한민국", "Asia"),
    ("MX", "México", "Americas"),
    ("AR", "Argentina", "Americas"),
    ("ZA", "South Africa", "Africa"),
    ("EG", "مصر", "Africa"),
    ("AU", "Australia", "Oceania"),
    ("NZ", "New Zealand", "Oceania"),
    ("AQ", "Antarctica", None),
    ("XK", "Kosovo", None),
    ("IS", "Ísland", "Europe"),
    ("FI", "suomi", "Europe"),
]

FIRST_NAMES = [
    "anna", "Anna", "ANNA", "José", "Zoë", "ßtefan", "Øyvind", "Łukasz", "山田", "たろう",
    "O'Brien", "Mañana", "émile", "Émile", "Ærø", "bob", "Bob", "chloé", "Dana", "李",
    "🙂 smiley", "back\\slash", 'quote"d', "tab\there", "new\nline", "{brace}", "a,b", "NULL",
]
LAST_NAMES = ["Smith", "smith", "Müller", "Straße", "García", "Ng", "Ó Súilleabháin", "日本", ""]
KINDS = ["click", "view", "Purchase", "purchase", "refund", "Ünïcode", "日本", "", "emoji 🎉",
         "straße", "STRASSE", "a\"b", "x\\y"]
STATUSES = ["new", "paid", "shipped", "cancelled", "Refunded", "日本", ""]
NOTES = [
    "Hello", "hello", "HELLO", "héllo wörld", "Straße", "STRASSE", "日本語テキスト", "😀 smile",
    "mixed Case é", "", " leading space", "trailing space ", "tab\tinside", "line\nbreak",
    "back\\slash", 'double "quote"', "single 'quote'", "{curly,braces}", "comma, separated",
    "NULL", "null", "%percent%", "under_score", "ÀÉÎÕÜ", "ab", "abc", "abd", "zz top",
]


def copy_field(v: Any) -> str:
    """One value in COPY text format (NULL is ``\\N``; backslash, tab, newline, CR escaped)."""
    if v is None:
        return "\\N"
    t = type(v)
    if t is str:
        if "\\" not in v and v.isprintable():  # fast path: nothing to escape
            return v
        return v.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    if t is bool:
        return "t" if v else "f"
    if t is float:
        return repr(v)
    return str(v)


def copy_text(rows: list[tuple[Any, ...]]) -> str:
    f = copy_field
    return "".join(["\t".join([f(v) for v in row]) + "\n" for row in rows])


def _money(cents: int) -> str:
    """A numeric with exactly two decimals, as text (never a float: no binary rounding)."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"


def _pick(rng: random.Random, n: int, values: list[Any], p_none: float) -> list[Any]:
    """``n`` uniform picks from ``values``, each None with probability ``p_none``."""
    k = len(values)
    w = [(1 - p_none) / k] * k + [p_none]
    return rng.choices([*values, None], weights=w, k=n)


def _cents(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    span = hi - lo + 1
    r = rng.random
    return [lo + int(r() * span) for _ in range(n)]


def _skewed_users(rng: random.Random, n: int, user_ids: list[int], p_none: float = 0.0) -> list[int | None]:
    """User ids where user 1 gets 8% and the other heavy users 17% of the picks (skew)."""
    pool: list[int | None] = [None, 1, *HEAVY_USERS, *user_ids]
    rest = 1 - p_none
    weights = [p_none, 0.08 * rest] + [0.17 * rest / len(HEAVY_USERS)] * len(HEAVY_USERS)
    weights += [0.75 * rest / len(user_ids)] * len(user_ids)
    return rng.choices(pool, weights=weights, k=n)


@dataclass
class DataSet:
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def copy_text(self, table: str) -> str:
        return copy_text(self.rows[table])

    @property
    def total_rows(self) -> int:
        return sum(len(r) for r in self.rows.values())


def generate(seed: int = SEED) -> DataSet:
    """The whole data set; the same seed always yields the same rows in the same order.

    Column by column with ``Random.choices`` (one call per column, not per row): per-row
    ``choice``/``randint`` calls made generating several hundred thousand rows take seconds.
    """
    rng = random.Random(seed)
    data = DataSet()
    data.rows["countries"] = list(COUNTRIES)

    # The last four countries have no users: outer joins from the reference table must keep
    # them exactly once.
    codes = [c for c, _, _ in COUNTRIES][:-4]
    user_ids = list(range(1, N_USERS - 7)) + [-7, -1, 0, 1_000_000, 2_147_483_000, 2_147_483_647,
                                              -2_147_483_648, 123_456_789]
    n = len(user_ids)
    full_names = [f"{a} {b}".strip() for a in FIRST_NAMES for b in LAST_NAMES]
    names = rng.choices([*full_names, None, ""], weights=[0.97 / len(full_names)] * len(full_names) + [0.02, 0.01], k=n)
    countries = rng.choices([*codes, None, "XX", ""], weights=[0.93 / len(codes)] * len(codes) + [0.04, 0.02, 0.01], k=n)
    base_day = dt.date(2015, 1, 1)
    days = [(base_day + dt.timedelta(days=d)).isoformat() for d in range(3651)]
    signups = _pick(rng, n, days, 0.03)
    signups[10:13] = ["infinity", "-infinity", "1999-12-31"]
    data.rows["users"] = list(zip(user_ids, names, countries, signups, strict=True))

    order_user_ids = user_ids + list(ORPHAN_USERS)
    totals = [_money(c) for c in _cents(rng, N_ORDERS, -50_000, 9_999_999)]
    for i in range(0, N_ORDERS, 33):  # ~3% NULL
        totals[i] = None
    orders = list(zip(
        range(1, N_ORDERS + 1),
        _skewed_users(rng, N_ORDERS, order_user_ids),
        totals,
        _pick(rng, N_ORDERS, STATUSES, 0.05),
        strict=True,
    ))
    orders += [
        (10**12, 1, "99999999.99", "paid"),
        (10**12 + 1, 2, "-99999999.99", "paid"),
        (9_223_372_036_854_775_807, 3, "0.01", None),
        (-1, 5, "0.00", "new"),
    ]
    data.rows["orders"] = orders

    ids = list(range(1, N_EVENTS - 1000 + 1))
    ids += [-i for i in range(1, 498)] + [10**15 + i for i in range(1, 500)]
    ids += [9_223_372_036_854_775_807, -9_223_372_036_854_775_808, 0, 4_294_967_296]
    assert len(ids) == N_EVENTS
    m = N_EVENTS
    amounts: list[str | None] = [_money(c) for c in _cents(rng, m, -1_000_000, 100_000_000)]
    specials = ["9999999999.99", "-9999999999.99", "0.01", "-0.01"]
    for i, r in enumerate(rng.choices(range(100), k=m)):
        if r < 4:
            amounts[i] = None
        elif r == 4:
            amounts[i] = "0.00" if i % 10 else specials[(i // 10) % 4]
    gauss = rng.gauss
    scores: list[float | None] = [gauss(50.0, 30.0) for _ in range(m)]
    odd_scores = [0.0, 1e-12, 123456789.125, 0.1, 1e12 / 3]
    for i, r in enumerate(rng.choices(range(500), k=m)):
        if r < 20:
            scores[i] = None
        elif r == 20:
            scores[i] = odd_scores[(i // 3) % 5]
    t0 = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
    span = 2 * 365 * 86400
    rnd = rng.random
    created: list[str | None] = []
    for _ in range(m):
        r = rnd()
        if r < 0.03:
            created.append(None)
            continue
        ts = t0 + dt.timedelta(seconds=int(rnd() * span))
        if r > 0.7:  # 30% with microseconds
            ts += dt.timedelta(microseconds=1 + int(rnd() * 999_999))
        created.append(ts.isoformat(sep=" "))
    data.rows["events"] = list(zip(
        ids,
        _skewed_users(rng, m, user_ids, p_none=0.05),
        _pick(rng, m, KINDS, 0.03),
        amounts,
        scores,
        rng.choices([True, False, None], weights=[0.4, 0.4, 0.2], k=m),
        created,
        _pick(rng, m, NOTES, 0.1),
        strict=True,
    ))
    return data


# ====================================================================================== queries
@dataclass(frozen=True)
class Query:
    """One differential query: ``ordered`` when its ORDER BY fixes the row order completely."""

    id: str
    sql: str
    ordered: bool = False
    params: tuple[Any, ...] | None = None  # psycopg %s parameters
    count_only: bool = False  # result rows are not determined (LIMIT without ORDER BY)
    #: The proxy may refuse with 0A000 instead (a shape it may not support), never answer wrongly.
    allow_unsupported: bool = False
    #: A known wrong answer that needs a design change: the test is a strict xfail with this reason.
    xfail: str | None = None


AGGREGATES = [
    ("count_star", "count(*)"),
    ("count_amount", "count(amount)"),
    ("sum_amount", "sum(amount)"),
    ("avg_amount", "avg(amount)"),
    ("min_amount", "min(amount)"),
    ("max_amount", "max(amount)"),
    ("sum_score", "sum(score)"),
    ("avg_score", "avg(score)"),
    ("min_score", "min(score)"),
    ("max_created", "max(created)"),
    ("min_created", "min(created)"),
    ("stddev_amount", "stddev(amount)"),
    ("variance_amount", "variance(amount)"),
    ("stddev_pop_amount", "stddev_pop(amount)"),
    ("var_pop_amount", "var_pop(amount)"),
    ("bool_and_flag", "bool_and(flag)"),
    ("bool_or_flag", "bool_or(flag)"),
    ("every_flag", "every(flag)"),
    ("count_distinct_kind", "count(DISTINCT kind)"),
    ("count_distinct_user", "count(DISTINCT user_id)"),
    ("min_note", "min(note)"),
    ("max_kind", "max(kind)"),
    ("sum_user", "sum(user_id)"),
    ("avg_user", "avg(user_id)"),
    ("stddev_samp_user", "stddev_samp(user_id)"),
    ("var_samp_id", "var_samp(id)"),
]
GROUPINGS = [
    ("all", None),
    ("kind", "kind"),
    ("flag", "flag"),
    ("user_mod7", "user_id % 7"),
    ("month", "date_trunc('month', created)"),
]
FILTERS = [
    ("nofilter", None),
    ("amount_pos", "amount > 0"),
    ("flag_null", "flag IS NULL"),
    ("kind_like", "kind LIKE 'p%'"),
    ("note_notnull", "note IS NOT NULL AND created < '2024-01-01'"),
]


def _where(f: str | None) -> str:
    return f" WHERE {f}" if f else ""


def _aggregate_queries() -> list[Query]:
    out = []
    for i, (aname, agg) in enumerate(AGGREGATES):
        for j, (gname, g) in enumerate(GROUPINGS):
            fname, f = FILTERS[(i + j) % len(FILTERS)]
            if g is None:
                sql = f"SELECT {agg} FROM events{_where(f)}"
            else:
                sql = f"SELECT {g} AS g, {agg} FROM events{_where(f)} GROUP BY {g}"
            out.append(Query(f"agg-{aname}-by_{gname}-{fname}", sql))
    # Several aggregates in one query, grouped by a skewed key (thousands of groups).
    out.append(Query(
        "agg-multi-by_user",
        "SELECT user_id, count(*), sum(amount), avg(amount), min(created), max(note), "
        "bool_or(flag), count(DISTINCT kind) FROM events GROUP BY user_id",
    ))
    out.append(Query(
        "agg-multi-by_kind_flag",
        "SELECT kind, flag, count(*), sum(score), stddev(amount), var_pop(amount), "
        "max(amount) - min(amount) FROM events GROUP BY kind, flag",
    ))
    out.append(Query(
        "agg-float-variance-by_kind",
        "SELECT kind, stddev(score), variance(score), stddev_pop(score), var_pop(score) "
        "FROM events WHERE abs(score) < 1000 GROUP BY kind",
    ))
    out.append(Query("agg-empty-input", "SELECT count(*), sum(amount), avg(score), max(kind), "
                     "bool_and(flag), stddev(amount) FROM events WHERE id < -10000000000000000000"))
    out.append(Query("agg-empty-groups", "SELECT kind, count(*) FROM events WHERE amount > 1e15 "
                     "GROUP BY kind"))
    out.append(Query("agg-group-position", "SELECT kind, flag, count(*) FROM events GROUP BY 1, 2"))
    out.append(Query("agg-group-alias", "SELECT upper(kind) AS k, count(*) FROM events GROUP BY k"))
    out.append(Query("agg-group-by-not-output",
                     "SELECT count(*), sum(amount) FROM events GROUP BY kind"))
    out.append(Query("agg-ordered-limit",
                     "SELECT user_id, count(*) AS n FROM events WHERE user_id IS NOT NULL "
                     "GROUP BY user_id ORDER BY n DESC, user_id LIMIT 15", ordered=True))
    out.append(Query("agg-ordered-offset",
                     "SELECT kind, sum(amount) AS s FROM events GROUP BY kind "
                     "ORDER BY s DESC NULLS LAST, kind NULLS FIRST LIMIT 5 OFFSET 3", ordered=True))
    out.append(Query("agg-order-by-agg-not-output",
                     "SELECT kind FROM events GROUP BY kind ORDER BY count(*) DESC, kind NULLS LAST",
                     ordered=True))
    out.append(Query("agg-filter-clause",
                     "SELECT kind, count(*) FILTER (WHERE flag), sum(amount) FILTER (WHERE score > 50), "
                     "avg(score) FILTER (WHERE amount < 0) FROM events GROUP BY kind"))
    out.append(Query("agg-distinct-output",
                     "SELECT DISTINCT count(*) FROM events GROUP BY user_id % 3"))
    out.append(Query("agg-count-distinct-two",
                     "SELECT flag, count(DISTINCT kind), count(DISTINCT note), count(*) FROM events "
                     "GROUP BY flag"))
    out.append(Query("agg-sum-distinct",
                     "SELECT kind, sum(DISTINCT amount), avg(DISTINCT user_id) FROM events "
                     "WHERE id % 10 = 0 GROUP BY kind"))
    out.append(Query("agg-text-expr-group",
                     "SELECT lower(note) AS l, length(note), count(*) FROM events GROUP BY 1, 2"))
    out.append(Query("agg-coalesce-group",
                     "SELECT coalesce(kind, '<null>') AS k, count(*) FROM events GROUP BY 1"))
    out.append(Query("agg-count-star-bare", "SELECT count(*) FROM events"))
    out.append(Query("agg-bool-group-case",
                     "SELECT CASE WHEN amount < 0 THEN 'neg' WHEN amount = 0 THEN 'zero' "
                     "WHEN amount > 0 THEN 'pos' END AS sign, count(*), sum(amount) FROM events "
                     "GROUP BY 1"))
    out.append(Query("agg-orders-by-status",
                     "SELECT status, count(*), sum(total), avg(total), min(total), max(total), "
                     "stddev(total) FROM orders GROUP BY status"))
    out.append(Query("agg-users-by-country",
                     "SELECT country, count(*), min(signup), max(signup), min(name), max(name) "
                     "FROM users GROUP BY country"))
    return out


def _expression_queries() -> list[Query]:
    exprs = [
        ("sum_div_count", "sum(amount) / count(*)"),
        ("avg_cast", "avg(amount)::numeric(10,2)"),
        ("round_avg", "round(avg(amount), 2)"),
        ("range", "max(amount) - min(amount)"),
        ("ratio_float", "sum(score) / nullif(count(score), 0)"),
        ("count_plus", "count(*) + count(amount) * 2"),
        ("pct_flag", "round(100.0 * count(*) FILTER (WHERE flag) / count(*), 3)"),
        ("coalesce_sum", "coalesce(sum(amount), 0) + 1"),
        ("case_agg", "CASE WHEN count(*) > 1000 THEN 'big' ELSE 'small' END"),
        ("avg_int_cast", "avg(user_id)::numeric(20,4)"),
        ("epoch_range", "extract(epoch FROM max(created) - min(created))"),
        ("text_agg_expr", "upper(min(kind)) || '/' || lower(max(kind))"),
        ("abs_sum", "abs(sum(amount))"),
        ("greatest", "greatest(max(amount), 0)"),
        ("nested_cast", "(sum(amount)::float8 / count(*))::numeric(30,6)"),
    ]
    out = []
    for i, (name, e) in enumerate(exprs):
        g = ("kind", "flag", None)[i % 3]
        if g is None:
            sql = f"SELECT {e} AS v FROM events"
        else:
            sql = f"SELECT {g}, {e} AS v FROM events GROUP BY {g}"
        out.append(Query(f"expr-{name}", sql))
    return out


def _having_queries() -> list[Query]:
    cases = [
        ("count_gt", "events", "user_id", "count(*) > 200"),
        ("sum_gt", "events", "user_id", "sum(amount) > 1000000000"),
        ("avg_between", "events", "kind", "avg(score) BETWEEN 49 AND 51"),
        ("min_max", "events", "user_id % 100", "min(amount) < -9000 AND max(amount) > 99000000"),
        ("bool", "events", "kind", "bool_or(flag) AND NOT bool_and(flag)"),
        ("distinct", "events", "kind", "count(DISTINCT user_id) > 100"),
        ("expr", "events", "flag", "sum(amount) / count(*) > 0"),
        ("not_in_select", "events", "kind", "max(created) > '2024-12-30'"),
        ("orders_sum", "orders", "user_id", "sum(total) > 500000"),
        ("orders_count", "orders", "status", "count(*) > 10"),
        ("orders_null", "orders", "user_id", "count(total) < count(*)"),
        ("users", "users", "country", "count(*) BETWEEN 500 AND 800"),
        ("having_only", "events", None, "count(*) > 0"),
        ("having_false", "events", None, "count(*) < 0"),
        ("or", "events", "user_id", "count(*) > 1000 OR sum(amount) < -1000000"),
    ]
    out = []
    for name, table, g, h in cases:
        if g is None:
            sql = f"SELECT count(*) FROM {table} HAVING {h}"
        else:
            sql = f"SELECT {g} AS g, count(*), sum({'amount' if table == 'events' else 'total' if table == 'orders' else 'user_id'}) FROM {table} GROUP BY {g} HAVING {h}"
        out.append(Query(f"having-{name}", sql))
    return out


def _router_queries() -> list[Query]:
    keys = [1, 2, 17, 1000, 99_999, 148_999, -1, -250, 0, 10**15 + 7, 9_223_372_036_854_775_807,
            -9_223_372_036_854_775_808, 4_294_967_296, 999_999_999, 123_456]
    out = []
    for k in keys:
        out.append(Query(f"router-eq-{k}", f"SELECT * FROM events WHERE id = {k}"))
    for k in keys[:8]:
        out.append(Query(f"router-param-{k}", "SELECT id, kind, amount, score, note FROM events WHERE id = %s",
                         params=(k,)))
    out.append(Query("router-eq-reversed", "SELECT * FROM events WHERE 42 = id"))
    out.append(Query("router-eq-cast", "SELECT * FROM events WHERE id = '77'::bigint"))
    out.append(Query("router-eq-string", "SELECT * FROM events WHERE id = '78'"))
    out.append(Query("router-eq-and-filter", "SELECT * FROM events WHERE id = 79 AND amount IS NOT NULL"))
    out.append(Query("router-eq-contradiction", "SELECT * FROM events WHERE id = 80 AND id = 81"))
    out.append(Query("router-eq-null", "SELECT * FROM events WHERE id = NULL"))
    out.append(Query("router-agg", "SELECT count(*), sum(amount) FROM events WHERE id = 82"))
    out.append(Query("router-in-list",
                     "SELECT * FROM events WHERE id IN (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, -5, 1000000000000003)"))
    out.append(Query("router-in-one", "SELECT * FROM events WHERE id IN (555)"))
    out.append(Query("router-in-missing", "SELECT * FROM events WHERE id IN (-999999, 999999999)"))
    out.append(Query("router-in-and-eq", "SELECT * FROM events WHERE id IN (11, 12, 13) AND id = 12"))
    out.append(Query("router-any-array", "SELECT * FROM events WHERE id = ANY(ARRAY[21, 22, 23, -21])"))
    out.append(Query("router-any-array-cast",
                     "SELECT * FROM events WHERE id = ANY('{31,32,33}'::bigint[])"))
    out.append(Query("router-any-param", "SELECT id, note FROM events WHERE id = ANY(%s)",
                     params=([41, 42, 43, 10**15 + 1],)))
    out.append(Query("router-in-params", "SELECT id, note FROM events WHERE id IN (%s, %s, %s)",
                     params=(51, 52, -52)))
    out.append(Query("router-in-agg",
                     "SELECT kind, count(*), sum(amount) FROM events WHERE id IN (61, 62, 63, 64, 65, 66, 67) "
                     "GROUP BY kind"))
    out.append(Query("router-in-order",
                     "SELECT id, created FROM events WHERE id IN (71, 72, 73, 74, 75) ORDER BY created DESC NULLS LAST, id",
                     ordered=True))
    out.append(Query("router-or-not-pinned", "SELECT * FROM events WHERE id = 91 OR id = 92"))
    out.append(Query("router-users", "SELECT * FROM users WHERE user_id = 1"))
    out.append(Query("router-users-neg", "SELECT * FROM users WHERE user_id = -2147483648"))
    out.append(Query("router-orders-heavy",
                     "SELECT count(*), sum(total), max(order_id) FROM orders WHERE user_id = 1"))
    out.append(Query("router-orders-in",
                     "SELECT user_id, count(*), sum(total) FROM orders WHERE user_id IN (2, 3, 50001) GROUP BY user_id"))
    out.append(Query("router-orders-param", "SELECT order_id, total, status FROM orders WHERE user_id = %s",
                     params=(21,)))
    out.append(Query("router-update-like-expr", "SELECT id, amount * 2, note || '!' FROM events WHERE id = 101"))
    return out


SORT_COLUMNS = ["amount", "score", "created", "note", "kind", "user_id"]


def _order_queries() -> list[Query]:
    out = []
    n = 0
    for c in SORT_COLUMNS:
        for direction in ("ASC", "DESC"):
            for nulls in ("NULLS FIRST", "NULLS LAST"):
                limit = (5, 20, 50)[n % 3]
                offset = (0, 7, 130)[(n // 3) % 3]
                where = ("", " WHERE flag", " WHERE amount < 0")[n % 3]
                sql = (f"SELECT id, {c} FROM events{where} ORDER BY {c} {direction} {nulls}, id "
                       f"LIMIT {limit}" + (f" OFFSET {offset}" if offset else ""))
                out.append(Query(f"order-{c}-{direction.lower()}-{nulls.split()[1].lower()}", sql, ordered=True))
                n += 1
    out += [
        Query("order-star-limit", "SELECT * FROM events ORDER BY created DESC NULLS LAST, id LIMIT 25", ordered=True),
        Query("order-star-where", "SELECT * FROM events WHERE kind = 'refund' AND amount > 99000000 ORDER BY id",
              ordered=True),
        Query("order-position", "SELECT note, id FROM events WHERE id % 1000 = 1 ORDER BY 1 NULLS FIRST, 2",
              ordered=True),
        Query("order-alias", "SELECT id, amount * -1 AS neg FROM events ORDER BY neg NULLS LAST, id LIMIT 10",
              ordered=True),
        Query("order-expr-not-output", "SELECT id FROM events ORDER BY abs(score - 50) NULLS LAST, id LIMIT 12",
              ordered=True),
        Query("order-multi-keys", "SELECT kind, flag, id FROM events ORDER BY kind DESC NULLS FIRST, "
              "flag NULLS LAST, id DESC LIMIT 40 OFFSET 5", ordered=True),
        Query("order-text-unicode", "SELECT note, id FROM events WHERE note > 'z' ORDER BY note, id LIMIT 30",
              ordered=True),
        Query("order-offset-only", "SELECT id FROM events WHERE id < -480 ORDER BY id OFFSET 5", ordered=True),
        Query("order-big-offset", "SELECT id FROM events ORDER BY id LIMIT 3 OFFSET 149990", ordered=True),
        Query("order-limit-zero", "SELECT id FROM events ORDER BY id LIMIT 0", ordered=True),
        Query("order-limit-all", "SELECT id, note FROM events WHERE id BETWEEN 100 AND 160 ORDER BY note NULLS FIRST, id LIMIT ALL",
              ordered=True),
        Query("order-users-signup", "SELECT user_id, signup FROM users ORDER BY signup DESC NULLS LAST, user_id LIMIT 20",
              ordered=True),
        Query("order-users-name", "SELECT name, user_id FROM users ORDER BY name NULLS FIRST, user_id LIMIT 40",
              ordered=True),
        Query("order-orders-total", "SELECT order_id, user_id, total FROM orders ORDER BY total DESC NULLS LAST, "
              "user_id, order_id LIMIT 15 OFFSET 2", ordered=True),
        Query("order-timestamp-asc", "SELECT created, id FROM events ORDER BY created, id LIMIT 10", ordered=True),
    ]
    return out


def _distinct_queries() -> list[Query]:
    return [
        Query("distinct-kind", "SELECT DISTINCT kind FROM events"),
        Query("distinct-kind-flag", "SELECT DISTINCT kind, flag FROM events"),
        Query("distinct-note-where", "SELECT DISTINCT note FROM events WHERE amount < 0"),
        Query("distinct-ordered", "SELECT DISTINCT kind FROM events ORDER BY kind NULLS FIRST", ordered=True),
        Query("distinct-expr", "SELECT DISTINCT lower(kind) FROM events"),
        Query("distinct-status", "SELECT DISTINCT status FROM orders"),
        Query("distinct-country", "SELECT DISTINCT country FROM users ORDER BY country NULLS LAST LIMIT 10", ordered=True),
        Query("distinct-on-last-event-per-user",
              "SELECT DISTINCT ON (user_id) user_id, id, created, kind FROM events "
              "ORDER BY user_id, created DESC NULLS LAST, id DESC", ordered=True),
        Query("distinct-on-first-order-per-user",
              "SELECT DISTINCT ON (user_id) user_id, order_id, total FROM orders "
              "ORDER BY user_id, order_id", ordered=True),
        Query("distinct-on-biggest-order-per-user",
              "SELECT DISTINCT ON (user_id) user_id, total, order_id FROM orders WHERE total IS NOT NULL "
              "ORDER BY user_id DESC, total DESC, order_id", ordered=True),
        Query("distinct-on-kind",
              "SELECT DISTINCT ON (kind) kind, id, amount FROM events ORDER BY kind NULLS FIRST, amount DESC NULLS LAST, id",
              ordered=True),
        Query("distinct-on-limit",
              "SELECT DISTINCT ON (user_id) user_id, id FROM events WHERE user_id IS NOT NULL "
              "ORDER BY user_id, id DESC LIMIT 25 OFFSET 10", ordered=True),
        Query("distinct-on-expr",
              "SELECT DISTINCT ON (user_id % 10) user_id % 10 AS b, id FROM events ORDER BY user_id % 10, id",
              ordered=True),
        Query("distinct-on-not-first-output",
              "SELECT DISTINCT ON (kind) id, kind FROM events ORDER BY kind, id DESC", ordered=True),
        Query("distinct-agg-group", "SELECT DISTINCT flag, count(*) > 1000 FROM events GROUP BY flag, kind"),
    ]


def user_pair(same_shard: bool) -> tuple[int, int]:
    """Two heavy users whose rows live on the same (or on different) shards of ``users``."""
    def slot(k: int) -> int:
        return hashing.shard_slot("integer", hashing.parse_text_value("integer", str(k)), USERS_SHARDS)

    for a in HEAVY_USERS:
        for b in HEAVY_USERS:
            if a != b and (slot(a) == slot(b)) == same_shard:
                return a, b
    raise AssertionError("no such pair of heavy users")


def _join_queries() -> list[Query]:
    a, b = user_pair(same_shard=False)
    c, d = user_pair(same_shard=True)
    out = [
        # Both tables pinned, but not joined on the key: one shard only if both keys share it.
        Query("join-pinned-cross-shards",
              f"SELECT u.name, o.order_id FROM users u, orders o WHERE u.user_id = {a} AND o.user_id = {b}",
              allow_unsupported=True),
        Query("join-pinned-cross-same-shard",
              f"SELECT u.name, o.order_id FROM users u, orders o WHERE u.user_id = {c} AND o.user_id = {d}",
              allow_unsupported=True),
        Query("join-pinned-cross-in",
              f"SELECT u.user_id, o.user_id, count(*) FROM users u JOIN orders o ON u.name < o.status "
              f"WHERE u.user_id IN ({a}, {c}) AND o.user_id = {d} GROUP BY 1, 2",
              allow_unsupported=True),
        # A reference table on the outer side of an outer join with a distributed table: per
        # shard, every unmatched reference row would come back once per shard.
        Query("ref-outer-left-join-count",
              "SELECT c.code, count(*) FROM countries c LEFT JOIN users u ON u.country = c.code GROUP BY c.code",
              allow_unsupported=True),
        Query("ref-outer-left-join-rows",
              "SELECT c.code, u.user_id FROM countries c LEFT JOIN users u ON u.country = c.code "
              "WHERE c.region IS NULL", allow_unsupported=True),
        Query("ref-outer-right-join",
              "SELECT c.code, count(*), count(u.user_id) FROM users u RIGHT JOIN countries c "
              "ON u.country = c.code GROUP BY c.code", allow_unsupported=True),
        Query("values-outer-left-join",
              "SELECT v.x, count(*), count(u.user_id) FROM (VALUES (1), (2), (-999)) v(x) "
              "LEFT JOIN users u ON u.user_id = v.x GROUP BY v.x", allow_unsupported=True),
        Query("ref-outer-left-join-pinned",
              "SELECT c.code, u.name FROM countries c LEFT JOIN users u ON u.country = c.code "
              "WHERE u.user_id = 13", allow_unsupported=True),
        Query("ref-inner-side-of-left-join",
              "SELECT c.region, count(*), count(c.code) FROM users u LEFT JOIN countries c "
              "ON c.code = u.country GROUP BY c.region"),
        Query("ref-outer-full-join",
              "SELECT count(*), count(u.user_id), count(c.code) FROM users u FULL JOIN countries c "
              "ON c.code = u.country", allow_unsupported=True),
        Query("ref-anti-join-not-exists",
              "SELECT count(*) FROM countries c WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.country = c.code)",
              allow_unsupported=True),
        Query("join-inner-count", "SELECT count(*) FROM users u JOIN orders o ON u.user_id = o.user_id"),
        Query("join-inner-by-country",
              "SELECT u.country, count(*), sum(o.total), avg(o.total) FROM users u JOIN orders o "
              "ON u.user_id = o.user_id GROUP BY u.country"),
        Query("join-left-count-orders",
              "SELECT u.user_id, count(o.order_id) AS n FROM users u LEFT JOIN orders o "
              "ON o.user_id = u.user_id GROUP BY u.user_id HAVING count(o.order_id) = 0 OR count(*) > 100"),
        Query("join-left-no-orders",
              "SELECT count(*) FROM users u LEFT JOIN orders o ON u.user_id = o.user_id WHERE o.order_id IS NULL"),
        Query("join-orders-left-users-orphans",
              "SELECT o.user_id, count(*) FROM orders o LEFT JOIN users u ON u.user_id = o.user_id "
              "WHERE u.user_id IS NULL GROUP BY o.user_id"),
        Query("join-using", "SELECT status, count(*) FROM users JOIN orders USING (user_id) GROUP BY status"),
        Query("join-where-equality",
              "SELECT u.name, count(*) FROM users u, orders o WHERE u.user_id = o.user_id AND o.total > 9000000 "
              "GROUP BY u.name"),
        Query("join-router", "SELECT u.name, o.order_id, o.total FROM users u JOIN orders o ON u.user_id = o.user_id "
              "WHERE u.user_id = 34"),
        Query("join-router-other-side", "SELECT u.name, o.order_id FROM users u JOIN orders o ON u.user_id = o.user_id "
              "WHERE o.user_id = 35"),
        Query("join-router-in", "SELECT u.user_id, count(*) FROM users u JOIN orders o ON u.user_id = o.user_id "
              "WHERE u.user_id IN (1, 2, 3, 4) GROUP BY u.user_id"),
        Query("join-order-limit",
              "SELECT u.user_id, u.name, o.order_id, o.total FROM users u JOIN orders o ON u.user_id = o.user_id "
              "ORDER BY o.total DESC NULLS LAST, o.order_id LIMIT 20", ordered=True),
        Query("join-distinct-on-latest-order",
              "SELECT DISTINCT ON (u.user_id) u.user_id, u.name, o.order_id FROM users u JOIN orders o "
              "ON u.user_id = o.user_id WHERE u.country = 'JP' ORDER BY u.user_id, o.order_id DESC", ordered=True),
        Query("join-full-outer",
              "SELECT count(*), count(u.user_id), count(o.order_id) FROM users u FULL JOIN orders o "
              "ON u.user_id = o.user_id"),
        Query("join-self-users",
              "SELECT count(*) FROM users a JOIN users b ON a.user_id = b.user_id WHERE a.name = b.name"),
        Query("join-left-filter-on",
              "SELECT u.user_id, count(o.order_id) FROM users u LEFT JOIN orders o ON o.user_id = u.user_id "
              "AND o.status = 'paid' WHERE u.user_id < 50 GROUP BY u.user_id"),
        Query("join-count-distinct-status",
              "SELECT u.country, count(DISTINCT o.status) FROM users u JOIN orders o ON u.user_id = o.user_id "
              "GROUP BY u.country"),
        # Reference table joins.
        Query("ref-join-users-region",
              "SELECT c.region, count(*) FROM users u JOIN countries c ON u.country = c.code GROUP BY c.region"),
        Query("ref-join-users-left",
              "SELECT c.name, count(*) FROM users u LEFT JOIN countries c ON c.code = u.country GROUP BY c.name"),
        Query("ref-join-three-way",
              "SELECT c.region, count(*), sum(o.total) FROM orders o JOIN users u ON u.user_id = o.user_id "
              "JOIN countries c ON c.code = u.country GROUP BY c.region"),
        Query("ref-join-order",
              "SELECT u.user_id, c.name FROM users u JOIN countries c ON u.country = c.code "
              "ORDER BY c.name DESC, u.user_id LIMIT 30", ordered=True),
        Query("ref-join-router",
              "SELECT u.name, c.name, c.region FROM users u JOIN countries c ON u.country = c.code WHERE u.user_id = 7"),
        Query("ref-join-events-kind",
              "SELECT c.code, count(*) FROM events e JOIN countries c ON e.kind = c.name GROUP BY c.code"),
        Query("ref-join-countries-right",
              "SELECT c.code, count(u.user_id) FROM countries c LEFT JOIN users u ON u.country = c.code "
              "WHERE c.region = 'Oceania' AND u.user_id = 5 GROUP BY c.code"),
        Query("ref-join-distinct", "SELECT DISTINCT c.region FROM users u JOIN countries c ON c.code = u.country"),
        Query("ref-join-filter-region",
              "SELECT u.country, count(*) FROM users u JOIN countries c ON c.code = u.country "
              "WHERE c.region IS NULL GROUP BY u.country"),
        # Subqueries over the reference table inside a distributed query.
        Query("ref-subquery-in",
              "SELECT count(*) FROM users WHERE country IN (SELECT code FROM countries WHERE region = 'Europe')"),
        Query("ref-subquery-not-in",
              "SELECT count(*) FROM users WHERE country NOT IN (SELECT code FROM countries WHERE region IS NOT NULL)"),
        Query("ref-subquery-exists",
              "SELECT count(*) FROM users u WHERE EXISTS (SELECT 1 FROM countries c WHERE c.code = u.country "
              "AND c.name LIKE '%ä%' OR c.code = u.country AND c.region = 'Asia')"),
        Query("ref-subquery-scalar",
              "SELECT user_id, (SELECT name FROM countries c WHERE c.code = u.country) FROM users u "
              "WHERE user_id % 997 = 0"),
    ]
    return out


def _filter_queries() -> list[Query]:
    filters = [
        ("flag_true", "flag"),
        ("flag_not", "NOT flag"),
        ("flag_is_null", "flag IS NULL"),
        ("flag_not_true", "flag IS NOT TRUE"),
        ("flag_distinct", "flag IS DISTINCT FROM false"),
        ("note_null", "note IS NULL"),
        ("note_empty", "note = ''"),
        ("amount_null", "amount IS NULL"),
        ("like_prefix", "note LIKE 'h%'"),
        ("ilike", "note ILIKE 'h%'"),
        ("like_unicode", "note LIKE '%é%'"),
        ("like_cjk", "kind LIKE '日%'"),
        ("like_escape", "note LIKE '%\\%%'"),
        ("like_underscore", "note LIKE 'a_'"),
        ("emoji", "note LIKE '%😀%' OR kind LIKE '%🎉%'"),
        ("between_ts", "created BETWEEN '2023-06-01' AND '2023-06-30 23:59:59.999999+00'"),
        ("in_text", "kind IN ('click', 'Purchase', '')"),
        ("not_in_text", "kind NOT IN ('click', 'view')"),
        ("regex", "note ~ '^[A-Z]'"),
        ("quote", "note LIKE '%''%' OR note LIKE '%\"%'"),
        ("backslash", "note LIKE '%\\\\%' ESCAPE '!'"),
        ("newline_tab", "note LIKE E'%\\n%' OR note LIKE E'%\\t%'"),
        ("numeric_edge", "amount >= 9999999999.99 OR amount <= -9999999999.99"),
        ("float_cmp", "score > 100.5 AND score < 101"),
        ("neg_ids", "id < 0"),
        ("big_ids", "id > 1000000000000000"),
        ("user_null", "user_id IS NULL AND flag"),
        ("or_mixed", "amount IS NULL OR score IS NULL"),
        ("coalesce", "coalesce(note, kind, '') = ''"),
        ("length", "length(note) > 10 AND upper(note) <> note"),
    ]
    out = []
    for i, (name, f) in enumerate(filters):
        if i % 2 == 0:
            sql = f"SELECT count(*), sum(amount), min(id), max(id) FROM events WHERE {f}"
        else:
            sql = f"SELECT kind, count(*), sum(score) FROM events WHERE {f} GROUP BY kind"
        out.append(Query(f"filter-{name}", sql))
    return out


def _concat_queries() -> list[Query]:
    return [
        Query("concat-filter-all-shards", "SELECT id, amount, note FROM events WHERE amount > 99990000"),
        Query("concat-star", "SELECT * FROM events WHERE kind = 'x\\y' AND flag AND score < 0"),
        Query("concat-users", "SELECT * FROM users WHERE country = 'JP' AND signup < '2016-01-01'"),
        Query("concat-orders", "SELECT * FROM orders WHERE total < -499 AND status = 'paid'"),
        Query("concat-expr", "SELECT id, amount * 2 + 1, upper(note), created + interval '1 day' FROM events "
              "WHERE id % 5000 = 3"),
        Query("concat-join", "SELECT u.user_id, o.order_id FROM users u JOIN orders o ON u.user_id = o.user_id "
              "WHERE o.total > 9990000"),
        Query("concat-no-rows", "SELECT * FROM events WHERE amount > 1e15"),
        Query("concat-limit-count", "SELECT id FROM events WHERE flag LIMIT 7", count_only=True),
        Query("concat-limit-offset-count", "SELECT id FROM events LIMIT 5 OFFSET 3", count_only=True),
        Query("concat-limit-big-count", "SELECT id FROM events WHERE id < 0 LIMIT 1000", count_only=True),
        Query("concat-unicode", "SELECT id, note FROM events WHERE note = '日本語テキスト' AND id % 100 = 7"),
        Query("concat-specials", "SELECT id, note FROM events WHERE note IN ('{curly,braces}', 'NULL', "
              "'double \"quote\"', 'back\\slash') AND id % 50 = 1"),
    ]


def _reference_queries() -> list[Query]:
    return [
        Query("refonly-all", "SELECT * FROM countries"),
        Query("refonly-order", "SELECT code, name FROM countries ORDER BY name DESC", ordered=True),
        Query("refonly-group", "SELECT region, count(*) FROM countries GROUP BY region"),
        Query("refonly-subquery-in",
              "SELECT code FROM countries WHERE region IN (SELECT region FROM countries WHERE code IN ('JP', 'DE'))"),
        Query("refonly-exists",
              "SELECT c.code FROM countries c WHERE EXISTS (SELECT 1 FROM countries c2 "
              "WHERE c2.region = c.region AND c2.code <> c.code AND c2.name > c.name)"),
        Query("refonly-cte",
              "WITH r AS (SELECT region, count(*) AS n FROM countries GROUP BY region) "
              "SELECT * FROM r WHERE n > 2"),
        Query("refonly-window",
              "SELECT code, row_number() OVER (PARTITION BY region ORDER BY code) FROM countries"),
        Query("refonly-self-join",
              "SELECT a.code, b.code FROM countries a JOIN countries b ON a.region = b.region AND a.code < b.code "
              "WHERE a.region = 'Oceania'"),
    ]


def _edge_queries() -> list[Query]:
    """Shapes that stress routing and the combine step in less common ways; errors included."""
    a, b = user_pair(same_shard=False)
    return [
        Query("edge-order-by-constant-output",
              "SELECT kind, 'x' AS c, count(*) FROM events GROUP BY kind ORDER BY 2, 1 NULLS FIRST", ordered=True),
        Query("edge-order-by-constant-plain",
              "SELECT id, 'const' AS c FROM events WHERE id < -490 ORDER BY 2, 1", ordered=True),
        Query("edge-router-large", "SELECT * FROM orders WHERE user_id = 1"),
        Query("edge-concat-large", "SELECT id, user_id, amount FROM events WHERE user_id = 1"),
        Query("edge-order-large", "SELECT id, note FROM events WHERE user_id = 2 ORDER BY id DESC", ordered=True),
        Query("edge-limit-params", "SELECT id FROM events ORDER BY id LIMIT %s OFFSET %s", ordered=True,
              params=(7, 1000)),
        Query("edge-distinct-order-limit",
              "SELECT DISTINCT user_id FROM events ORDER BY user_id DESC NULLS LAST LIMIT 10 OFFSET 2", ordered=True),
        Query("edge-any-empty-array", "SELECT count(*) FROM events WHERE id = ANY(ARRAY[]::bigint[])"),
        Query("edge-in-subquery-no-table", "SELECT id, kind FROM events WHERE id IN (SELECT 5)"),
        Query("edge-or-in", "SELECT id FROM events e WHERE e.id = 5 OR e.id IN (6, 7)"),
        Query("edge-eq-numeric-cast", "SELECT id FROM events WHERE id = 5::numeric"),
        Query("edge-eq-float-literal", "SELECT id FROM events WHERE id = 6.0"),
        Query("edge-eq-rounding-cast", "SELECT id FROM events WHERE id = 6.5::int8"),
        Query("edge-eq-int4-overflow-literal", "SELECT user_id FROM users WHERE user_id = 2147483648"),
        Query("edge-eq-padded-string", "SELECT id FROM events WHERE id = '  8 '"),
        Query("edge-eq-plus-string", "SELECT id FROM events WHERE id = '+9'"),
        Query("edge-param-decimal", "SELECT id FROM events WHERE id = %s", params=(Decimal("10"),)),
        # A float8 parameter cannot be hashed as bigint: all shards (or 0A000), never a wrong shard.
        Query("edge-param-float", "SELECT id FROM events WHERE id = %s", params=(11.0,),
              allow_unsupported=True),
        Query("edge-param-binary-int", "SELECT id, note FROM events WHERE id = %b", params=(12,)),
        Query("edge-param-text-int", "SELECT id, note FROM events WHERE id = %t", params=(13,)),
        Query("edge-param-binary-array", "SELECT id FROM events WHERE id = ANY(%b)", params=([14, 15, -14],)),
        Query("edge-param-null", "SELECT id FROM events WHERE id = %s", params=(None,)),
        Query("edge-router-correlated-subquery",
              "SELECT u.user_id, (SELECT count(*) FROM orders o WHERE o.user_id = u.user_id) FROM users u "
              "WHERE u.user_id = 1", allow_unsupported=True),
        # A pinned top level says nothing about a subquery's own table: routing to one shard
        # would let the subquery read one shard only (planner.py _routing now refuses).
        Query("edge-router-subquery-pinned-elsewhere",
              f"SELECT u.user_id, u.name FROM users u WHERE u.user_id = {a} "
              f"AND EXISTS (SELECT 1 FROM orders o WHERE o.user_id = {b})",
              allow_unsupported=True),
        Query("edge-router-subquery-unpinned",
              f"SELECT u.user_id FROM users u WHERE u.user_id = {a} "
              f"AND (SELECT count(*) FROM users x) = {N_USERS}",
              allow_unsupported=True),
        # GROUP BY <name> means the input column even when an output alias has that name.
        Query("edge-group-alias-shadows-column",
              "SELECT lower(note) AS note, count(*) FROM events GROUP BY note"),
        Query("edge-with-ties-plain",
              "SELECT user_id, id FROM events WHERE user_id IS NOT NULL ORDER BY user_id FETCH FIRST 3 ROWS WITH TIES"),
        Query("edge-with-ties-agg",
              "SELECT count(*) > 0 AS any, flag FROM events GROUP BY flag ORDER BY 1 FETCH FIRST 1 ROW WITH TIES"),
        Query("edge-interval-aggs",
              "SELECT kind, avg(created - timestamptz '2023-01-01 00:00:00+00'), "
              "sum(created - timestamptz '2023-01-01 00:00:00+00'), max(created - timestamptz '2023-01-01') "
              "FROM events WHERE id % 7 = 0 GROUP BY kind"),
        Query("edge-distinct-on-star", "SELECT DISTINCT ON (kind) * FROM events ORDER BY kind, id", ordered=True),
        Query("edge-having-group-column",
              "SELECT count(*), sum(amount) FROM events GROUP BY kind HAVING kind LIKE 'p%' OR kind IS NULL"),
        Query("edge-group-column-in-expression",
              "SELECT coalesce(kind, '?') || ':' || count(*) AS label FROM events GROUP BY kind"),
        Query("edge-order-by-group-column-not-output",
              "SELECT kind, count(*) FROM events GROUP BY kind, flag ORDER BY flag NULLS FIRST, kind NULLS FIRST",
              ordered=True),
        Query("edge-limit-null", "SELECT id FROM events WHERE id < -480 ORDER BY id LIMIT NULL", ordered=True),
        Query("edge-offset-beyond", "SELECT id FROM events ORDER BY id LIMIT 10 OFFSET 1000000", ordered=True),
        Query("edge-order-using", "SELECT id, amount FROM events WHERE id < -470 ORDER BY amount USING >, id",
              ordered=True),
        Query("edge-distinct-float", "SELECT DISTINCT score FROM events WHERE id < 300"),
        Query("edge-cross-join-reference", "SELECT count(*), count(DISTINCT c.code) FROM users u, countries c "
              "WHERE u.user_id < 100"),
        # Errors must be PostgreSQL's own, with its SQLSTATE.
        Query("error-div-zero-combine", "SELECT kind, sum(amount) / 0 FROM events GROUP BY kind"),
        Query("error-div-zero-worker", "SELECT id, 1 / amount FROM events WHERE amount = 0 AND flag"),
        Query("error-int-overflow-combine", "SELECT max(id)::int FROM events"),
        Query("error-router", "SELECT id / 0 FROM events WHERE id = 5"),
        Query("error-undefined-column", "SELECT nope FROM events"),
        Query("error-agg-not-grouped", "SELECT kind, note, count(*) FROM events GROUP BY kind"),
    ]


def all_queries() -> list[Query]:
    qs = (
        _aggregate_queries() + _expression_queries() + _having_queries() + _router_queries()
        + _order_queries() + _distinct_queries() + _join_queries() + _filter_queries()
        + _concat_queries() + _reference_queries() + _edge_queries()
    )
    ids = [q.id for q in qs]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"duplicate query ids: {sorted(dupes)}"
    return qs


QUERIES = all_queries()
