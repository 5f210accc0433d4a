"""Time ranges of hypertable chunks, and the range of a time column a WHERE clause can match.

Pure (no I/O). Two parts:

**Chunk arithmetic as TimescaleDB does it.** A time dimension is partitioned in its *internal*
integer form: microseconds since 1970-01-01 00:00 UTC for ``timestamptz``; for ``timestamp`` and
``date`` the same number computed as if the value were UTC (a date is its midnight); the value
itself for ``smallint``/``integer``/``bigint``. The chunk holding ``v`` for an interval ``I`` is
``[floor(v / I) * I, + I)``, except that a chunk reaching past the type's range is open-ended
(``INT64_MIN``/``INT64_MAX``) as in TimescaleDB's ``calculate_open_range_default``.
(TimescaleDB's newer custom chunk origins and calendar-based chunks are not modelled.)

**Bounds of a WHERE clause.** :func:`time_bounds` derives the half-open internal range
``[lo, hi)`` (``None`` = unbounded) outside which no row can satisfy the clause. The result is
*sound*: anything not understood (a function, a subquery, a cast of the column, ``NOT``, ``<>``,
``IS NULL``, a value of another type family, text in an unsupported format, a parameter whose
value is unknown, ``now()`` when no ``now`` was given) leaves its conjunct unbounded, so the
range can only be too wide, never too narrow. Understood:

* ``AND`` (intersection), ``OR`` (hull of the union), ``TRUE``/``FALSE``/``NULL`` constants;
* ``col op v`` and ``v op col`` for ``= < <= > >=``; ``col BETWEEN [SYMMETRIC] a AND b``;
  ``col IN (...)``; ``col op ANY|ALL (ARRAY[...] | '{...}'::type[] | $n)``; ``NOT BETWEEN``,
  ``NOT IN`` and ``<>`` are unbounded; NULL values match nothing;
* values: literals (untyped ones take the column's type, like PostgreSQL), typed literals
  (``'...'::timestamptz``, ``timestamptz '...'``, ``CAST``), ``$n`` (its text from
  ``param_value``), ``now()``, ``transaction_timestamp()``, ``current_timestamp[(p)]``,
  ``localtimestamp[(p)]``, ``current_date``, and ``v + interval``, ``v - interval``,
  ``interval + v``, ``date +/- integer``, unary ``-interval``, nested;
* comparisons across ``timestamp``/``timestamptz``/``date`` as PostgreSQL does them (the session
  ``timezone`` converts local times; a ``timestamp``/``date`` column compared with a
  ``timestamptz`` value is widened by two days on each side instead of modelling the conversion of
  every row); integer columns against integer or decimal numbers.

Text accepted for ``timestamptz``/``timestamp``/``date`` (other text gives an unbounded
conjunct): ``YYYY-MM-DD`` optionally followed by ``T`` or a space and ``HH:MM[:SS[.f{1,6}]]``,
then optionally (used for ``timestamptz`` only, ignored otherwise, like PostgreSQL) a zone:
``Z``, ``UTC``, ``GMT``, ``+HH``, ``+HHMM``, ``+HH:MM`` (or ``-``), or an IANA name such as
``Europe/Berlin``; years 1-9999; and ``epoch``, ``infinity``, ``-infinity``. Local times are
converted in ``timezone`` with PostgreSQL's rule for DST gaps and folds (the later UTC instant).
Intervals: ``[@] {number unit}... [HH:MM[:SS[.f]]] [ago]`` with units from microseconds to
years (fractions only for units up to weeks).

The ``now`` given must be the statement's ``now()`` (its transaction's start), or ``None``.
"""

from __future__ import annotations

import calendar
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, SQLValueFunctionOp

# ----------------------------------------------------------------------------- types and limits

USECS_PER_SEC = 1_000_000
USECS_PER_DAY = 86_400 * USECS_PER_SEC
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: TimescaleDB's internal values for -infinity/+infinity of timestamp types (and open chunk ends).
NOBEGIN = INT64_MIN
NOEND = INT64_MAX

_EPOCH_DIFF_USECS = 10_957 * USECS_PER_DAY  # 2000-01-01 (PostgreSQL epoch) - 1970-01-01
_PG_MIN_TIMESTAMP = -211_813_488_000_000_000  # 4714-11-24 00:00 BC, PostgreSQL epoch
_PG_END_TIMESTAMP = 9_223_371_331_200_000_000  # 294277-01-01 00:00, PostgreSQL epoch
#: TimescaleDB's TS_TIMESTAMP_INTERNAL_MIN / _END (dates share them).
TIMESTAMP_INTERNAL_MIN = _PG_MIN_TIMESTAMP + _EPOCH_DIFF_USECS
TIMESTAMP_INTERNAL_END = _PG_END_TIMESTAMP

_TYPE_ALIASES = {
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "timestamp": "timestamp",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "int2": "smallint",
    "smallint": "smallint",
    "int4": "integer",
    "int": "integer",
    "integer": "integer",
    "int8": "bigint",
    "bigint": "bigint",
    "interval": "interval",
    "numeric": "numeric",
    "decimal": "numeric",
    "float4": "float",
    "real": "float",
    "float8": "float",
    "double precision": "float",
}
_INT_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (INT64_MIN, INT64_MAX),
}
TIME_TYPES = frozenset({"timestamptz", "timestamp", "date", *_INT_RANGES})
_DATETIME_TYPES = ("timestamptz", "timestamp", "date")


def normalize_type(name: str) -> str:
    """The canonical name of a time column type (``timestamp with time zone`` -> ``timestamptz``)."""
    canonical = _TYPE_ALIASES.get(" ".join(name.lower().split()))
    if canonical is None or canonical not in TIME_TYPES:
        raise ValueError(f"not a time dimension type: {name!r}")
    return canonical


def type_min(type_name: str) -> int:
    """TimescaleDB's smallest internal value of the type (``ts_time_get_min``)."""
    t = normalize_type(type_name)
    return _INT_RANGES[t][0] if t in _INT_RANGES else TIMESTAMP_INTERNAL_MIN


def type_max(type_name: str) -> int:
    """TimescaleDB's largest internal value of the type (``ts_time_get_max``)."""
    t = normalize_type(type_name)
    return _INT_RANGES[t][1] if t in _INT_RANGES else TIMESTAMP_INTERNAL_END - 1


def clamp(type_name: str, value: int) -> int:
    """``value`` limited to the type's internal range (infinities of timestamp types kept)."""
    t = normalize_type(type_name)
    if t not in _INT_RANGES and value in (NOBEGIN, NOEND):
        return value
    return max(type_min(t), min(type_max(t), value))


def chunk_range(value: int, interval: int, type_name: str = "timestamptz") -> tuple[int, int]:
    """The ``[start, end)`` of the chunk holding internal ``value`` for chunk ``interval``.

    ``start = floor(value / interval) * interval``; a chunk that would end past the type's max
    ends at ``INT64_MAX``, one that would start before its min starts at ``INT64_MIN``
    (TimescaleDB's ``calculate_open_range_default``).
    """
    if interval <= 0:
        raise ValueError("chunk interval must be positive")
    start = (value // interval) * interval
    end = start + interval
    if start < type_min(type_name):
        start = INT64_MIN
    if end > type_max(type_name):
        end = INT64_MAX
    return start, end


# ----------------------------------------------------------------------------- ranges


@dataclass(frozen=True, slots=True)
class Range:
    """Internal values ``lo <= v < hi``; ``None`` means unbounded on that side."""

    lo: int | None = None
    hi: int | None = None

    @property
    def empty(self) -> bool:
        return self.lo is not None and self.hi is not None and self.lo >= self.hi

    @property
    def unbounded(self) -> bool:
        return self.lo is None and self.hi is None

    def contains_any(self, start: int, end: int) -> bool:
        """Whether some value of ``[start, end)`` lies in the range (a chunk that may match)."""
        return not ((self.hi is not None and start >= self.hi) or (self.lo is not None and end <= self.lo) or self.empty)

    def contains(self, v: int) -> bool:
        return not ((self.lo is not None and v < self.lo) or (self.hi is not None and v >= self.hi))

    def intersect(self, other: Range) -> Range:
        lo = (
            self.lo if other.lo is None else other.lo if self.lo is None else max(self.lo, other.lo)
        )
        hi = (
            self.hi if other.hi is None else other.hi if self.hi is None else min(self.hi, other.hi)
        )
        return Range(lo, hi)

    def hull(self, other: Range) -> Range:
        """The smallest range holding both (the union when they overlap or touch)."""
        if self.empty:
            return other
        if other.empty:
            return self
        lo = None if self.lo is None or other.lo is None else min(self.lo, other.lo)
        hi = None if self.hi is None or other.hi is None else max(self.hi, other.hi)
        return Range(lo, hi)


FULL = Range()
EMPTY = Range(0, 0)


def chunks_overlapping(rng: Range, chunks: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The chunks ``(start, end)`` of ``chunks`` that overlap ``rng``.

    ``chunks`` must be sorted by start, and any two must be equal or disjoint (time slices of
    one dimension are; the same slice may repeat, e.g. once per space partition).
    """
    if rng.empty:
        return []
    i = 0 if rng.lo is None else bisect_right(chunks, rng.lo, key=lambda c: c[1])
    j = len(chunks) if rng.hi is None else bisect_left(chunks, rng.hi, key=lambda c: c[0])
    return list(chunks[i:j])


# ----------------------------------------------------------------------------- calendar

_UNIX_EPOCH = datetime(1970, 1, 1)
_UNIX_EPOCH_UTC = _UNIX_EPOCH.replace(tzinfo=UTC)


def _naive_to_usecs(dt: datetime) -> int:
    d = dt - _UNIX_EPOCH
    return (d.days * 86_400 + d.seconds) * USECS_PER_SEC + d.microseconds


def _usecs_to_naive(us: int) -> datetime | None:
    try:
        return _UNIX_EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return None


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def _local_to_instant(local_us: int, tz: ZoneInfo) -> int | None:
    """PostgreSQL's conversion of a local time to an instant: in a DST gap or fold, the later
    of the two UTC instants (the offset before a gap, the standard-time reading of a fold)."""
    naive = _usecs_to_naive(local_us)
    if naive is None:
        return None
    try:
        u0 = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
        u1 = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
    except (OverflowError, ValueError):
        return None
    u = max(u0, u1)
    return _naive_to_usecs(u.replace(tzinfo=None))


def _instant_to_local(us: int, tz: ZoneInfo) -> int | None:
    naive = _usecs_to_naive(us)
    if naive is None:
        return None
    try:
        local = naive.replace(tzinfo=UTC).astimezone(tz)
    except (OverflowError, ValueError):
        return None
    return _naive_to_usecs(local.replace(tzinfo=None))


def _add_months_local(local_us: int, months: int) -> int | None:
    naive = _usecs_to_naive(local_us)
    if naive is None:
        return None
    m = naive.year * 12 + naive.month - 1 + months
    year, month = divmod(m, 12)
    month += 1
    if not 1 <= year <= 9999:
        return None
    last = calendar.monthrange(year, month)[1]
    return _naive_to_usecs(naive.replace(year=year, month=month, day=min(naive.day, last)))


# ----------------------------------------------------------------------------- text input

_TS_RE = re.compile(
    r"""\s*(?P<y>\d{4,})-(?P<mo>\d{1,2})-(?P<d>\d{1,2})
        (?:(?:T|\s+)(?P<h>\d{1,2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,6}))?)?)?
        \s*(?P<z>Z|UTC|GMT|[+-]\d{1,2}(?::?\d{2})?|[A-Za-z_]+(?:/[A-Za-z0-9_+\-]+)+)?\s*$""",
    re.X | re.I,
)


@dataclass(frozen=True, slots=True)
class _Parsed:
    local_us: int  # the written date and time, as if UTC
    offset_us: int | None  # explicit UTC offset (east positive), if written
    zone: str | None  # explicit IANA zone, if written
    special: int | None = None  # NOBEGIN / NOEND


def _parse_datetime_text(text: str) -> _Parsed | None:
    word = text.strip().lower()
    if word in ("infinity", "+infinity"):
        return _Parsed(0, None, None, NOEND)
    if word == "-infinity":
        return _Parsed(0, None, None, NOBEGIN)
    if word == "epoch":
        return _Parsed(0, 0, None)
    m = _TS_RE.match(text)
    if m is None:
        return None
    try:
        year, month, day = int(m["y"]), int(m["mo"]), int(m["d"])
        if not 1 <= year <= 9999:
            return None
        d = datetime(year, month, day)
        if m["h"] is not None:
            hour, minute = int(m["h"]), int(m["mi"])
            sec = int(m["s"] or 0)
            if hour > 23 or minute > 59 or sec > 59:
                return None
            frac = int((m["f"] or "").ljust(6, "0"))
            d = d.replace(hour=hour, minute=minute, second=sec, microsecond=frac)
    except ValueError:
        return None
    offset_us: int | None = None
    zone: str | None = None
    z = m["z"]
    if z is not None:
        if z.upper() in ("Z", "UTC", "GMT"):
            offset_us = 0
        elif z[0] in "+-":
            digits = z[1:].replace(":", "")
            hh, mm = (digits, "0") if len(digits) <= 2 else (digits[:-2], digits[-2:])
            if int(hh) > 15 or int(mm) > 59:
                return None
            offset_us = (int(hh) * 3600 + int(mm) * 60) * USECS_PER_SEC * (1 if z[0] == "+" else -1)
        else:
            zone = z
    return _Parsed(_naive_to_usecs(d), offset_us, zone)


_INTERVAL_UNITS: dict[str, tuple[str, int]] = {}
for _names, _kind, _mult in (
    (("microsecond", "microseconds", "usec", "usecs", "us"), "us", 1),
    (("millisecond", "milliseconds", "msec", "msecs", "ms"), "us", 1_000),
    (("second", "seconds", "sec", "secs", "s"), "us", USECS_PER_SEC),
    (("minute", "minutes", "min", "mins", "m"), "us", 60 * USECS_PER_SEC),
    (("hour", "hours", "hr", "hrs", "h"), "us", 3600 * USECS_PER_SEC),
    (("day", "days", "d"), "day", 1),
    (("week", "weeks", "w"), "day", 7),
    (("month", "months", "mon", "mons"), "month", 1),
    (("year", "years", "yr", "yrs", "y"), "month", 12),
):
    for _n in _names:
        _INTERVAL_UNITS[_n] = (_kind, _mult)

_IV_TOKEN = re.compile(
    r"\s*(?:(?P<num>[+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*(?P<unit>[a-z]+)|(?P<time>[+-]?\d+:\d{1,2}(?::\d{1,2}(?:\.\d{1,6})?)?))",
    re.I,
)


def _parse_interval_text(text: str) -> tuple[int, int, int] | None:
    """``(months, days, microseconds)`` of PostgreSQL's verbose interval input, or None."""
    s = text.strip()
    if s.startswith("@"):
        s = s[1:]
    ago = False
    if re.search(r"\s+ago\s*$", s, re.I):
        ago = True
        s = re.sub(r"\s+ago\s*$", "", s, flags=re.I)
    months = days = us = 0
    pos = 0
    seen = False
    while pos < len(s):
        m = _IV_TOKEN.match(s, pos)
        if m is None:
            if s[pos:].strip():
                return None
            break
        pos = m.end()
        seen = True
        if m["time"] is not None:
            t = m["time"]
            sign = -1 if t.startswith("-") else 1
            parts = t.lstrip("+-").split(":")
            sec = Fraction(parts[2]) if len(parts) == 3 else Fraction(0)
            total = (
                int(parts[0]) * 3600 + int(parts[1]) * 60
            ) * USECS_PER_SEC + sec * USECS_PER_SEC
            us += sign * int(total)
            continue
        unit = _INTERVAL_UNITS.get(m["unit"].lower())
        if unit is None:
            return None
        kind, mult = unit
        num = Fraction(m["num"]) * mult
        if kind == "month":
            if num.denominator != 1:
                return None
            months += int(num)
        elif kind == "day":
            whole = int(num)  # toward zero, like PostgreSQL; the rest spills into time
            days += whole
            rest = (num - whole) * USECS_PER_DAY
            if rest.denominator != 1:
                return None
            us += int(rest)
        else:
            if num.denominator != 1:
                return None
            us += int(num)
    if not seen:
        return None
    if ago:
        months, days, us = -months, -days, -us
    return months, days, us


def _parse_array_text(text: str) -> list[str | None] | None:
    """Elements of a one-dimensional array literal ``{a,"b c",NULL}``, or None."""
    s = text.strip()
    if len(s) < 2 or s[0] != "{" or s[-1] != "}":
        return None
    body = s[1:-1]
    out: list[str | None] = []
    i = 0
    if not body.strip():
        return out
    while i <= len(body):
        while i < len(body) and body[i].isspace():
            i += 1
        if i < len(body) and body[i] == '"':
            i += 1
            buf = []
            while i < len(body) and body[i] != '"':
                if body[i] == "\\" and i + 1 < len(body):
                    i += 1
                buf.append(body[i])
                i += 1
            if i >= len(body):
                return None
            i += 1
            out.append("".join(buf))
            while i < len(body) and body[i].isspace():
                i += 1
        else:
            j = i
            while j < len(body) and body[j] not in ',{}"':
                j += 1
            if j < len(body) and body[j] != ",":
                return None
            item = body[i:j].strip()
            out.append(None if item.upper() == "NULL" else item)
            i = j
        if i < len(body) and body[i] != ",":
            return None
        i += 1
    return out


# ----------------------------------------------------------------------------- values

_TS_SCALES = [10 ** (6 - p) for p in range(7)]


def _round_typmod(internal_unix_us: int, precision: int) -> int:
    """PostgreSQL's rounding of a timestamp to ``precision`` fractional digits (half away from
    zero around its 2000-01-01 epoch)."""
    if not 0 <= precision < 6:
        return internal_unix_us
    scale = _TS_SCALES[precision]
    t = internal_unix_us - _EPOCH_DIFF_USECS
    t = (t + scale // 2) // scale * scale if t >= 0 else -(((-t + scale // 2) // scale) * scale)
    return t + _EPOCH_DIFF_USECS


@dataclass(frozen=True, slots=True)
class _Val:
    """A typed value: ``tstz``/``ts`` (unix µs), ``date`` (days), ``interval`` ((m, d, µs)),
    ``num`` (Fraction), ``text`` (an untyped literal), ``null``."""

    kind: str
    v: object = None


_NULL = _Val("null")


class _Ctx:
    def __init__(
        self,
        column: str,
        aliases: set[str],
        column_type: str,
        param_value: Callable[[int], str | None],
        now: datetime | None,
        tz_name: str,
    ) -> None:
        self.column = column
        self.aliases = aliases
        self.ctype = column_type
        self.param_value = param_value
        self.tz = _zone(tz_name)
        self.now_us: int | None = None
        if now is not None:
            aware = now if now.tzinfo is not None else now.replace(tzinfo=UTC)
            d = aware.astimezone(UTC) - _UNIX_EPOCH_UTC
            self.now_us = (d.days * 86_400 + d.seconds) * USECS_PER_SEC + d.microseconds

    # ---- text of a type -> value

    def text_as(self, text: str, type_name: str) -> _Val | None:
        if type_name in _INT_RANGES or type_name == "numeric":
            try:
                n = (
                    Fraction(text.strip())
                    if type_name == "numeric"
                    else Fraction(int(text.strip()))
                )
            except (ValueError, ZeroDivisionError):
                return None
            return _Val("num", n)
        if type_name == "interval":
            iv = _parse_interval_text(text)
            return None if iv is None else _Val("interval", iv)
        if type_name not in _DATETIME_TYPES:
            return None
        p = _parse_datetime_text(text)
        if p is None:
            return None
        if p.special is not None:
            if type_name == "date":
                return None
            return _Val("tstz" if type_name == "timestamptz" else "ts", p.special)
        if type_name == "date":
            return _Val("date", p.local_us // USECS_PER_DAY)
        if type_name == "timestamp":
            return _Val("ts", p.local_us)
        if p.offset_us is not None:
            return _Val("tstz", p.local_us - p.offset_us)
        zone = self.tz if p.zone is None else _zone(p.zone)
        if zone is None:
            return None
        inst = _local_to_instant(p.local_us, zone)
        return None if inst is None else _Val("tstz", inst)

    # ---- expressions

    def value(self, node: ast.Node) -> _Val | None:
        if isinstance(node, ast.A_Const):
            if node.isnull:
                return _NULL
            v = node.val
            if isinstance(v, ast.Integer):
                return _Val("num", Fraction(v.ival))
            if isinstance(v, ast.Float):
                return _Val("num", Fraction(v.fval))
            if isinstance(v, ast.String):
                return _Val("text", v.sval)
            return None
        if isinstance(node, ast.ParamRef):
            text = self.param_value(node.number)
            return None if text is None else _Val("text", text)
        if isinstance(node, ast.TypeCast):
            return self.cast(node)
        if isinstance(node, ast.FuncCall):
            return self.func(node)
        if isinstance(node, ast.SQLValueFunction):
            return self.sql_value_function(node)
        if isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP:
            op = _op_name(node)
            if op in ("+", "-"):
                return self.arith(op, node.lexpr, node.rexpr)
        return None

    def cast(self, node: ast.TypeCast) -> _Val | None:
        tn = node.typeName
        if tn.setof or tn.pct_type or tn.arrayBounds:
            return None
        type_name = _type_name(tn)
        if type_name is None:
            return None
        precision: int | None = None
        if tn.typmods:
            if type_name not in ("timestamptz", "timestamp") or len(tn.typmods) != 1:
                return None
            mod = tn.typmods[0]
            if not (isinstance(mod, ast.A_Const) and isinstance(mod.val, ast.Integer)):
                return None
            precision = mod.val.ival
        inner = self.value(node.arg)
        if inner is None:
            return None
        out = self.convert(inner, type_name)
        if out is not None and precision is not None and out.kind in ("ts", "tstz"):
            assert isinstance(out.v, int)
            if out.v not in (NOBEGIN, NOEND):
                out = _Val(out.kind, _round_typmod(out.v, precision))
        return out

    def convert(self, val: _Val, type_name: str) -> _Val | None:
        """``val::type_name`` for the conversions that are exact here."""
        if val.kind == "null":
            return val
        if val.kind == "text":
            return self.text_as(val.v, type_name)  # type: ignore[arg-type]
        if type_name == "numeric" and val.kind == "num":
            return val
        if type_name in _INT_RANGES and val.kind == "num":
            n = val.v
            assert isinstance(n, Fraction)
            # numeric -> integer rounds half away from zero
            r = int(abs(n) + Fraction(1, 2)) * (1 if n >= 0 else -1)
            return _Val("num", Fraction(r))
        if type_name == "interval" and val.kind == "interval":
            return val
        if type_name not in _DATETIME_TYPES or val.kind not in ("ts", "tstz", "date"):
            return None
        target = {"timestamptz": "tstz", "timestamp": "ts", "date": "date"}[type_name]
        if val.kind == target:
            return val
        us = val.v * USECS_PER_DAY if val.kind == "date" else val.v  # type: ignore[operator]
        assert isinstance(us, int)
        if val.kind in ("ts", "tstz") and us in (NOBEGIN, NOEND):
            return None if target == "date" else _Val(target, us)
        if val.kind == "tstz":  # -> local time
            if self.tz is None:
                return None
            local = _instant_to_local(us, self.tz)
            if local is None:
                return None
            return _Val("ts", local) if target == "ts" else _Val("date", local // USECS_PER_DAY)
        # ts or date
        if target == "date":
            return _Val("date", us // USECS_PER_DAY)
        if target == "ts":
            return _Val("ts", us)
        if self.tz is None:
            return None
        inst = _local_to_instant(us, self.tz)
        return None if inst is None else _Val("tstz", inst)

    def now_value(self, kind: str, precision: int | None = None) -> _Val | None:
        if self.now_us is None:
            return None
        us = self.now_us if precision is None else _round_typmod(self.now_us, precision)
        if kind == "tstz":
            return _Val("tstz", us)
        return self.convert(_Val("tstz", us), "timestamp" if kind == "ts" else "date")

    def func(self, node: ast.FuncCall) -> _Val | None:
        names = [n.sval for n in node.funcname if isinstance(n, ast.String)]
        if len(names) == 2 and names[0] == "pg_catalog":
            names = names[1:]
        if len(names) != 1 or node.args or node.agg_star or node.over is not None:
            return None
        if names[0].lower() in ("now", "transaction_timestamp"):
            return self.now_value("tstz")
        return None

    def sql_value_function(self, node: ast.SQLValueFunction) -> _Val | None:
        op = node.op
        precision = node.typmod if node.typmod is not None and node.typmod >= 0 else None
        if op in (
            SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP,
            SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP_N,
        ):
            return self.now_value("tstz", precision)
        if op in (
            SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP,
            SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP_N,
        ):
            return self.now_value("ts", precision)
        if op == SQLValueFunctionOp.SVFOP_CURRENT_DATE:
            return self.now_value("date")
        return None

    def arith(self, op: str, lnode: ast.Node | None, rnode: ast.Node) -> _Val | None:
        right = self.value(rnode)
        if right is None:
            return None
        if lnode is None:  # unary
            if right.kind == "text":
                return None
            if right.kind == "interval" and op == "-":
                m, d, u = right.v  # type: ignore[misc]
                return _Val("interval", (-m, -d, -u))
            if right.kind == "num":
                return _Val("num", -right.v if op == "-" else right.v)  # type: ignore[operator]
            return right if op == "+" and right.kind == "interval" else None
        left = self.value(lnode)
        if left is None:
            return None
        if left.kind == "null" or right.kind == "null":
            return _NULL
        # An untyped literal next to a typed operand takes the operand's type.
        if right.kind == "text" and left.kind == "interval":
            right = self.text_as(right.v, "interval")  # type: ignore[arg-type]
        elif left.kind == "text" and right.kind == "interval" and op == "+":
            return None  # unknown + interval: ambiguous in PostgreSQL
        if right is None or left.kind == "text" or right.kind == "text":
            return None
        if right.kind == "interval" and left.kind in ("tstz", "ts", "date"):
            m, d, u = right.v  # type: ignore[misc]
            sign = 1 if op == "+" else -1
            return self.add_interval(left, sign * m, sign * d, sign * u)
        if left.kind == "interval" and right.kind in ("tstz", "ts", "date") and op == "+":
            m, d, u = left.v  # type: ignore[misc]
            return self.add_interval(right, m, d, u)
        if left.kind == "interval" and right.kind == "interval":
            (m1, d1, u1), (m2, d2, u2) = left.v, right.v  # type: ignore[misc]
            s = 1 if op == "+" else -1
            return _Val("interval", (m1 + s * m2, d1 + s * d2, u1 + s * u2))
        if left.kind == "date" and right.kind == "num":
            n = right.v
            assert isinstance(n, Fraction)
            if n.denominator != 1:
                return None
            return _Val("date", left.v + (int(n) if op == "+" else -int(n)))  # type: ignore[operator]
        if left.kind == "num" and right.kind == "num" and self.ctype in _INT_RANGES:
            return _Val("num", left.v + right.v if op == "+" else left.v - right.v)  # type: ignore[operator]
        return None

    def add_interval(self, base: _Val, months: int, days: int, us: int) -> _Val | None:
        """``base + interval`` with PostgreSQL's calendar rules (months, then days, then time);
        for ``timestamptz`` the months and days move the local time of the session zone."""
        if base.kind == "date":
            base = _Val("ts", base.v * USECS_PER_DAY)  # type: ignore[operator]
        t = base.v
        assert isinstance(t, int)
        if t in (NOBEGIN, NOEND):
            return base
        if base.kind == "ts":
            if months:
                nt = _add_months_local(t, months)
                if nt is None:
                    return None
                t = nt
            return _Val("ts", t + days * USECS_PER_DAY + us)
        if months or days:
            if self.tz is None:
                return None
            for step in ("m", "d"):
                if (step == "m" and not months) or (step == "d" and not days):
                    continue
                local = _instant_to_local(t, self.tz)
                if local is None:
                    return None
                nl = (
                    _add_months_local(local, months)
                    if step == "m"
                    else local + days * USECS_PER_DAY
                )
                if nl is None:
                    return None
                nt = _local_to_instant(nl, self.tz)
                if nt is None:
                    return None
                t = nt
        return _Val("tstz", t + us)

    # ---- predicates

    def is_column(self, node: ast.Node) -> bool:
        if isinstance(node, ast.TypeCast):
            tn = node.typeName
            if tn.typmods or tn.arrayBounds or _type_name(tn) != self.ctype:
                return False
            node = node.arg
        if not isinstance(node, ast.ColumnRef):
            return False
        if not all(isinstance(f, ast.String) for f in node.fields):
            return False
        names = [f.sval for f in node.fields]
        if names[-1] != self.column:
            return False
        if len(names) == 1:
            return True
        return names[-2] in self.aliases or ".".join(names[:-1]) in self.aliases

    def bounds(self, node: ast.Node | None) -> Range:
        if node is None:
            return FULL
        if isinstance(node, ast.BoolExpr):
            if node.boolop == BoolExprType.AND_EXPR:
                r = FULL
                for a in node.args:
                    r = r.intersect(self.bounds(a))
                return r
            if node.boolop == BoolExprType.OR_EXPR:
                r = EMPTY
                for a in node.args:
                    r = r.hull(self.bounds(a))
                    if r.unbounded:
                        break
                return r
            return FULL
        if isinstance(node, ast.A_Const):
            if node.isnull or (isinstance(node.val, ast.Boolean) and not node.val.boolval):
                return EMPTY
            return FULL
        if isinstance(node, ast.A_Expr):
            return self.a_expr(node)
        return FULL

    def a_expr(self, e: ast.A_Expr) -> Range:
        kind = e.kind
        op = _op_name(e)
        if kind == A_Expr_Kind.AEXPR_OP and op in _FLIP:
            if self.is_column(e.lexpr):
                return self.compare(op, e.rexpr)
            if self.is_column(e.rexpr):
                return self.compare(_FLIP[op], e.lexpr)
            return FULL
        if kind == A_Expr_Kind.AEXPR_IN and op == "=" and self.is_column(e.lexpr):
            r = EMPTY
            for item in e.rexpr:
                r = r.hull(self.compare("=", item))
            return r
        if kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM) and self.is_column(
            e.lexpr
        ):
            a, b = e.rexpr
            r = self.compare(">=", a).intersect(self.compare("<=", b))
            if kind == A_Expr_Kind.AEXPR_BETWEEN_SYM:
                r = r.hull(self.compare(">=", b).intersect(self.compare("<=", a)))
            return r
        if (
            kind in (A_Expr_Kind.AEXPR_OP_ANY, A_Expr_Kind.AEXPR_OP_ALL)
            and op in _FLIP
            and self.is_column(e.lexpr)
        ):
            elements = self.array_elements(e.rexpr)
            if elements is None:
                return FULL
            if kind == A_Expr_Kind.AEXPR_OP_ANY:
                r = EMPTY
                for el in elements:
                    r = r.hull(self.compare_value(op, el))
            else:
                r = FULL
                for el in elements:
                    r = r.intersect(self.compare_value(op, el))
            return r
        return FULL

    def array_elements(self, node: ast.Node) -> list[_Val | None] | None:
        if isinstance(node, ast.A_ArrayExpr):
            return [self.value(x) for x in (node.elements or ())]
        elem_type: str | None = self.ctype  # an untyped '{...}' or $n takes the column's array type
        if isinstance(node, ast.TypeCast):
            tn = node.typeName
            if tn.typmods or not tn.arrayBounds or len(tn.arrayBounds) != 1:
                return None
            elem_type = _type_name(tn)
            if elem_type is None:
                return None
            node = node.arg
            if isinstance(node, ast.A_ArrayExpr):
                out: list[_Val | None] = []
                for x in node.elements or ():
                    v = self.value(x)
                    out.append(None if v is None else self.convert(v, elem_type))
                return out
        text: str | None = None
        if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
            text = node.val.sval
        elif isinstance(node, ast.ParamRef):
            text = self.param_value(node.number)
        if text is None:
            return None
        items = _parse_array_text(text)
        if items is None:
            return None
        return [_NULL if x is None else self.text_as(x, elem_type) for x in items]

    def compare(self, op: str, node: ast.Node) -> Range:
        return self.compare_value(op, self.value(node))

    def compare_value(self, op: str, val: _Val | None) -> Range:
        """The range of ``column op val``."""
        if val is None:
            return FULL
        if val.kind == "null":
            return EMPTY
        ctype = self.ctype
        if val.kind == "text":
            val = self.text_as(val.v, ctype)  # type: ignore[arg-type]
            if val is None:
                return FULL
        if ctype in _INT_RANGES:
            if val.kind != "num":
                return FULL
            return _int_range(op, val.v)  # type: ignore[arg-type]
        if val.kind not in ("ts", "tstz", "date"):
            return FULL
        slack = 0
        if ctype == "timestamptz":
            val = self.convert(val, "timestamptz")
            if val is None:
                return FULL
            v = val.v
        elif val.kind == "tstz":  # timestamp/date column: compare in local time, widened
            local = self.convert(val, "timestamp")
            if local is None:
                return FULL
            # UTC offsets can jump by a whole day (Pacific/Apia, 2011): widen by two.
            v, slack = local.v, 2 * USECS_PER_DAY
        else:
            v = val.v * USECS_PER_DAY if val.kind == "date" else val.v  # type: ignore[operator]
        assert isinstance(v, int)
        if v in (NOBEGIN, NOEND):
            return _infinite_range(op, v)
        r = _point_range(op, v, slack)
        if ctype == "date" and not r.empty:  # a date column holds midnights only
            r = Range(_ceil_day(r.lo), _ceil_day(r.hi))
        return r


_FLIP = {"=": "=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def _ceil_day(v: int | None) -> int | None:
    return None if v is None else -((-v) // USECS_PER_DAY) * USECS_PER_DAY


def _point_range(op: str, v: int, slack: int) -> Range:
    if op == "=":
        return Range(v - slack, v + 1 + slack)
    if op == "<":
        return Range(None, v + slack)
    if op == "<=":
        return Range(None, v + 1 + slack)
    if op == ">":
        return Range(v + 1 - slack, None)
    return Range(v - slack, None)  # >=


def _infinite_range(op: str, v: int) -> Range:
    """Ranges for comparisons with -infinity/+infinity (which columns may hold)."""
    if v == NOEND:
        return {
            "=": Range(NOEND, None),
            "<": FULL,
            "<=": FULL,
            ">": EMPTY,
            ">=": Range(NOEND, None),
        }[op]
    return {
        "=": Range(None, NOBEGIN + 1),
        "<": EMPTY,
        "<=": Range(None, NOBEGIN + 1),
        ">": FULL,
        ">=": FULL,
    }[op]


def _int_range(op: str, n: Fraction) -> Range:
    floor = n.numerator // n.denominator
    ceil = -((-n.numerator) // n.denominator)
    if op == "=":
        return Range(floor, floor + 1) if n.denominator == 1 else EMPTY
    if op == "<":
        return Range(None, ceil)
    if op == "<=":
        return Range(None, floor + 1)
    if op == ">":
        return Range(floor + 1, None)
    return Range(ceil, None)


def _op_name(e: ast.A_Expr) -> str | None:
    if not e.name or not all(isinstance(n, ast.String) for n in e.name):
        return None
    names = [n.sval for n in e.name]
    if len(names) == 2 and names[0] == "pg_catalog":
        names = names[1:]
    return names[0] if len(names) == 1 else None


def _type_name(tn: ast.TypeName) -> str | None:
    names = [n.sval for n in tn.names if isinstance(n, ast.String)]
    if len(names) != len(tn.names):
        return None
    if len(names) == 2 and names[0] == "pg_catalog":
        names = names[1:]
    if len(names) != 1:
        return None
    return _TYPE_ALIASES.get(names[0].lower())


# ----------------------------------------------------------------------------- public API


def to_internal(type_name: str, value: object, timezone: str = "UTC") -> int:
    """The internal integer of ``value`` for a dimension of ``type_name``.

    ``value``: an ``int`` (integer types), a ``datetime`` (naive ones are local times of
    ``timezone`` for ``timestamptz``; aware ones become local times of ``timezone`` for
    ``timestamp``/``date``), a ``date`` (midnight), or text as described in the module
    docstring (``infinity`` gives :data:`NOEND`). Raises ValueError when it cannot convert or
    the value is outside TimescaleDB's range for the type.
    """
    t = normalize_type(type_name)
    if t in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"not an integer: {value!r}")
        n = int(value.strip()) if isinstance(value, str) else value
        lo, hi = _INT_RANGES[t]
        if not lo <= n <= hi:
            raise ValueError(f"{t} out of range: {n}")
        return n
    ctx = _Ctx("", set(), t, lambda _n: None, None, timezone)
    val: _Val | None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            u = value.astimezone(UTC).replace(tzinfo=None)
            val = _Val("tstz", _naive_to_usecs(u))
        else:
            val = _Val("ts", _naive_to_usecs(value))
    elif isinstance(value, date):
        val = _Val("date", (value - _UNIX_EPOCH.date()).days)
    elif isinstance(value, str):
        special = _parse_datetime_text(value)
        if special is not None and special.special is not None:
            return special.special
        val = ctx.text_as(value, t)
    else:
        raise ValueError(f"cannot convert {value!r} to {t}")
    if val is None:
        raise ValueError(f"cannot convert {value!r} to {t}")
    out = ctx.convert(val, t)
    if out is None:
        raise ValueError(f"cannot convert {value!r} to {t} in time zone {timezone!r}")
    v = out.v * USECS_PER_DAY if out.kind == "date" else out.v  # type: ignore[operator]
    assert isinstance(v, int)
    if v not in (NOBEGIN, NOEND) and not TIMESTAMP_INTERNAL_MIN <= v < TIMESTAMP_INTERNAL_END:
        raise ValueError(f"{t} out of range: {value!r}")
    return v


def from_internal(type_name: str, internal: int) -> object:
    """The value of an internal integer: ``int``; aware UTC ``datetime`` (timestamptz); naive
    ``datetime`` (timestamp); ``date``; ``"infinity"``/``"-infinity"`` for :data:`NOEND`/
    :data:`NOBEGIN` of timestamp types. Raises ValueError outside Python's years 1-9999."""
    t = normalize_type(type_name)
    if t in _INT_RANGES:
        return internal
    if internal == NOEND:
        return "infinity"
    if internal == NOBEGIN:
        return "-infinity"
    naive = _usecs_to_naive(internal)
    if naive is None:
        raise ValueError(f"{internal} is outside the years Python can represent")
    if t == "timestamptz":
        return naive.replace(tzinfo=UTC)
    if t == "date":
        return naive.date()
    return naive


def time_bounds(
    where_node: ast.Node | None,
    time_column: str,
    table_aliases: set[str],
    param_value: Callable[[int], str | None],
    now: datetime | None,
    *,
    column_type: str = "timestamptz",
    timezone: str = "UTC",
) -> Range:
    """The internal range ``[lo, hi)`` of ``time_column`` that rows satisfying ``where_node``
    can have (see the module docstring for what is understood; the rest is unbounded).

    ``table_aliases``: the names that qualify the column (``t`` in ``t.ts``); an unqualified
    ``time_column`` is taken to be this table's. ``param_value(n)`` gives the text of ``$n`` or
    None if unknown. ``now``: the statement's ``now()`` (naive means UTC), or None.
    ``timezone``: the session's TimeZone (IANA name) for local times.
    """
    ctx = _Ctx(time_column, table_aliases, normalize_type(column_type), param_value, now, timezone)
    return ctx.bounds(where_node)


__all__ = [
    "EMPTY",
    "FULL",
    "NOBEGIN",
    "NOEND",
    "TIMESTAMP_INTERNAL_END",
    "TIMESTAMP_INTERNAL_MIN",
    "TIME_TYPES",
    "USECS_PER_DAY",
    "Range",
    "chunk_range",
    "chunks_overlapping",
    "clamp",
    "from_internal",
    "normalize_type",
    "time_bounds",
    "to_internal",
    "type_max",
    "type_min",
]
