"""PostgreSQL-compatible hashing: the shard of a value is the slot PostgreSQL would pick.

Why reimplement PostgreSQL's hash functions instead of inventing our own: a distributed table's
shard ``i`` must hold exactly the rows a ``PARTITION BY HASH (col)`` table would put in
``MODULUS shard_count, REMAINDER i``. Then placement can be verified on any node with
``satisfies_hash_partition(parent, shard_count, slot, value)``, a shard can later be attached to
a hash-partitioned parent as is, and the proxy never needs a node to route a row.

The facts come from PostgreSQL 15's sources (stable across releases because ``pg_upgrade`` keeps
hash partitions; checked against a live server by ``tests/test_hashing.py``):

* ``src/common/hashfn.c``: ``hash_bytes_extended`` / ``hash_bytes_uint32_extended`` (Bob
  Jenkins' lookup3 with a 64-bit seed mixed in first; result ``b << 32 | c``). Only the
  little-endian variant is implemented: PostgreSQL's result is byte-order dependent and every
  platform the project targets is little-endian.
* ``src/backend/access/hash/hashfunc.c`` and the per-type ``*_hash_extended`` functions: which
  bytes or which 32-bit integer each type feeds to those.
* ``src/backend/partitioning/partbounds.c``: ``compute_partition_hash_value`` combines the
  per-column hashes with ``hash_combine64`` starting from 0, seeded with ``HASH_PARTITION_SEED``,
  skipping NULL columns; ``get_partition_for_tuple`` takes ``row_hash % greatest_modulus``. A
  NULL key therefore has row hash 0 and always lands in slot 0.

A value is hashed *as stored in the column*: typmods that change the stored value are applied
first (``numeric(p,s)`` and ``timestamp(p)`` round, ``varchar(n)``/``char(n)`` drop excess
trailing spaces), so type names may carry them (``"numeric(10,2)"``). Text is assumed to be
UTF-8 (the nodes' database encoding) and text collations deterministic (non-deterministic ICU
collations hash differently and are not supported).

This module is pure Python with no project imports beyond :class:`rewriter.errors.PgError`:
it runs once per inserted row and per routed parameter, so the hot paths avoid allocations and
per-call dispatch (type resolution is cached by type name).
"""

from __future__ import annotations

import math
import re
import struct
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

from .errors import PgError

__all__ = [
    "HASH_PARTITION_SEED",
    "SUPPORTED_TYPES",
    "PgInternal",
    "UnsupportedLiteral",
    "base_type",
    "canonical_type",
    "hash_bytes_extended",
    "hash_combine64",
    "hash_uint32_extended",
    "hash_value",
    "parse_text_value",
    "partition_hash",
    "shard_slot",
    "shard_slot_null",
]

#: ``HASH_PARTITION_SEED`` from ``src/include/catalog/partition.h``: the seed PostgreSQL passes
#: to every column's extended hash function when routing a row to a hash partition.
HASH_PARTITION_SEED = 0x7A5B22367996DCFD

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
#: The additive constant of ``hash_combine64`` (``src/include/common/hashfn.h``).
_COMBINE_K = 0x49A0F4DD15E5A8E3
#: lookup3's initial state before the length is added (``0x9e3779b9 + 3923095``).
_INIT = 0x9E3779B9 + 3923095

_INT16_MIN, _INT16_MAX = -(1 << 15), (1 << 15) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

_U32 = struct.Struct("<I")
_3U32 = struct.Struct("<3I")
_F8 = struct.Struct("<d")
_F4 = struct.Struct("<f")


# --------------------------------------------------------------------------- lookup3 core


def _mix(a: int, b: int, c: int) -> tuple[int, int, int]:
    """lookup3 ``mix()`` on three uint32 (inputs must already be reduced mod 2**32)."""
    a = ((a - c) ^ ((c << 4) | (c >> 28))) & _M32
    c = (c + b) & _M32
    b = ((b - a) ^ ((a << 6) | (a >> 26))) & _M32
    a = (a + c) & _M32
    c = ((c - b) ^ ((b << 8) | (b >> 24))) & _M32
    b = (b + a) & _M32
    a = ((a - c) ^ ((c << 16) | (c >> 16))) & _M32
    c = (c + b) & _M32
    b = ((b - a) ^ ((a << 19) | (a >> 13))) & _M32
    a = (a + c) & _M32
    c = ((c - b) ^ ((b << 4) | (b >> 28))) & _M32
    b = (b + a) & _M32
    return a, b, c


def _final(a: int, b: int, c: int) -> int:
    """lookup3 ``final()``; returns the 64-bit result PostgreSQL's extended variants report."""
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & _M32
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & _M32
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & _M32
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & _M32
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & _M32
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & _M32
    c = ((c ^ b) - ((b << 24) | (b >> 8))) & _M32
    return (b << 32) | c


# Seeded start states: computing them costs one mix(); the partition seed is used for every row,
# so memoise per (length, seed). Bounded: lengths past _STATE_CACHE_MAX_LEN are not cached.
_STATE_CACHE_MAX_LEN = 256
_state_cache: dict[tuple[int, int], tuple[int, int, int]] = {}


def _start_state(length: int, seed: int) -> tuple[int, int, int]:
    """The state after initialisation and seed mixing, as in ``hash_bytes_extended``."""
    key = (length, seed)
    st = _state_cache.get(key)
    if st is not None:
        return st
    a = b = c = (_INIT + length) & _M32
    if seed:
        # The seed is hashed as if it were a 12-byte chunk: high half, low half, zero.
        a = (a + (seed >> 32)) & _M32
        b = (b + (seed & _M32)) & _M32
        a, b, c = _mix(a, b, c)
    st = (a, b, c)
    if length <= _STATE_CACHE_MAX_LEN and len(_state_cache) < 4096:
        _state_cache[key] = st
    return st


def hash_bytes_extended(data: bytes | bytearray | memoryview, seed: int) -> int:
    """PostgreSQL's ``hash_bytes_extended`` (= ``hash_any_extended``): 64-bit hash of bytes.

    Little-endian semantics: full 12-byte blocks are three little-endian words mixed in; the
    last 0..11 bytes are added to a, b and (shifted left one byte, whose low byte lookup3
    reserves for the length) c before ``final()``. ``mix``/``final`` are written out inline:
    in CPython the calls and tuple packing would cost more than the arithmetic.
    """
    seed &= _M64
    n = len(data)
    st = _state_cache.get((n, seed))
    a, b, c = st if st is not None else _start_state(n, seed)
    M = _M32
    off = 0
    if n >= 12:
        unpack = _3U32.unpack_from
        end = n - n % 12
        while off < end:
            x, y, z = unpack(data, off)
            a = (a + x) & M
            b = (b + y) & M
            c = (c + z) & M
            # mix(a, b, c)
            a = ((a - c) ^ ((c << 4) | (c >> 28))) & M
            c = (c + b) & M
            b = ((b - a) ^ ((a << 6) | (a >> 26))) & M
            a = (a + c) & M
            c = ((c - b) ^ ((b << 8) | (b >> 24))) & M
            b = (b + a) & M
            a = ((a - c) ^ ((c << 16) | (c >> 16))) & M
            c = (c + b) & M
            b = ((b - a) ^ ((a << 19) | (a >> 13))) & M
            a = (a + c) & M
            c = ((c - b) ^ ((b << 4) | (b >> 28))) & M
            b = (b + a) & M
            off += 12
    if off < n:
        t = int.from_bytes(data[off:] if off else data, "little")
        a = (a + (t & M)) & M
        b = (b + ((t >> 32) & M)) & M
        c = (c + ((t >> 64) << 8)) & M
    # final(a, b, c)
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & M
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & M
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & M
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & M
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & M
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & M
    c = ((c ^ b) - ((b << 24) | (b >> 8))) & M
    return (b << 32) | c


def hash_uint32_extended(value: int, seed: int) -> int:
    """PostgreSQL's ``hash_bytes_uint32_extended``: 64-bit hash of one uint32 (masked)."""
    seed &= _M64
    a, b, c = _start_state(4, seed)
    return _final((a + (value & _M32)) & _M32, b, c)


def hash_combine64(a: int, b: int) -> int:
    """``hash_combine64`` from ``common/hashfn.h``: how partitioning folds column hashes."""
    return (a ^ ((b + _COMBINE_K + (a << 54) + (a >> 7)) & _M64)) & _M64


# Partition seed state for the 4-byte path, precomputed: the integer hot path is then one add
# and one final().
_P_A, _P_B, _P_C = _start_state(4, HASH_PARTITION_SEED)


def _hash_u32(value: int, seed: int) -> int:
    """``hash_uint32_extended`` for an already-masked uint32; ``final()`` inline (hot path)."""
    if seed == HASH_PARTITION_SEED:
        a, b, c = (_P_A + value) & _M32, _P_B, _P_C
    else:
        a, b, c = _start_state(4, seed)
        a = (a + value) & _M32
    M = _M32
    c = ((c ^ b) - ((b << 14) | (b >> 18))) & M
    a = ((a ^ c) - ((c << 11) | (c >> 21))) & M
    b = ((b ^ a) - ((a << 25) | (a >> 7))) & M
    c = ((c ^ b) - ((b << 16) | (b >> 16))) & M
    a = ((a ^ c) - ((c << 4) | (c >> 28))) & M
    b = ((b ^ a) - ((a << 14) | (a >> 18))) & M
    c = ((c ^ b) - ((b << 24) | (b >> 8))) & M
    return (b << 32) | c


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class PgInternal:
    """A date/time value in PostgreSQL's internal integer form.

    Why: Python's ``date``/``datetime`` cannot hold what PostgreSQL can (BC dates, years past
    9999, ``infinity``), and binary-format parameters arrive in this form anyway. ``value`` is
    days since 2000-01-01 for ``date`` (``infinity`` = 2**31-1, ``-infinity`` = -2**31),
    microseconds since 2000-01-01 00:00 (UTC for timestamptz) for timestamps (``infinity`` =
    2**63-1, ``-infinity`` = -2**63), microseconds since midnight for ``time``.
    """

    value: int


class UnsupportedLiteral(PgError):
    """A literal the proxy cannot turn into a stored value itself (SQLSTATE 0A000).

    Distinct from invalid input (22P02/22007/22008, raised as plain :class:`PgError` with
    PostgreSQL's message): the literal may be valid PostgreSQL, written in a form whose meaning
    depends on session settings (``DateStyle``, ``TimeZone``) or that the proxy does not parse.
    A caller may fall back to letting a node evaluate it.
    """


def _unsupported(type_name: str, text: str, hint: str) -> UnsupportedLiteral:
    return UnsupportedLiteral(
        "0A000",
        f'cannot compute the shard of {type_name} literal "{text}"',
        hint=hint,
    )


def _invalid(type_name: str, text: str) -> PgError:
    return PgError("22P02", f'invalid input syntax for type {type_name}: "{text}"')


def _out_of_range(type_name: str) -> PgError:
    return PgError("22003", f"{type_name} out of range")


# --------------------------------------------------------------------------- per-type hashes
# Each hasher takes (value, seed) with seed already reduced to uint64 and returns a uint64,
# exactly what the type's hash opclass support function 2 returns (as unsigned).


def _hash_int64(value: Any, seed: int) -> int:
    """``hashint8extended``: fold the int64 to 32 bits so int4-range values hash like int4."""
    if type(value) is not int:
        value = _as_int(value, "bigint")
    if value >= 0:
        if value > _INT64_MAX:
            raise _out_of_range("bigint")
        lo = (value ^ (value >> 32)) & _M32
    else:
        if value < _INT64_MIN:
            raise _out_of_range("bigint")
        # (uint32) val ^ ~(uint32)(val >> 32); Python's >> on negatives is arithmetic, like C.
        lo = (value ^ ~(value >> 32)) & _M32
    return _hash_u32(lo, seed)


def _hash_int32(value: Any, seed: int) -> int:
    """``hashint4extended``: the int32 reinterpreted as uint32."""
    if type(value) is not int:
        value = _as_int(value, "integer")
    if value < _INT32_MIN or value > _INT32_MAX:
        raise _out_of_range("integer")
    return _hash_u32(value & _M32, seed)


def _hash_int16(value: Any, seed: int) -> int:
    """``hashint2extended``: widened to int32 first, so it equals ``hashint4extended``."""
    if type(value) is not int:
        value = _as_int(value, "smallint")
    if value < _INT16_MIN or value > _INT16_MAX:
        raise _out_of_range("smallint")
    return _hash_u32(value & _M32, seed)


def _hash_oid(value: Any, seed: int) -> int:
    """``hashoidextended``: the oid as uint32."""
    if type(value) is not int:
        value = _as_int(value, "oid")
    if value < 0 or value > _M32:
        raise _out_of_range("OID")
    return _hash_u32(value, seed)


def _as_int(value: Any, type_name: str) -> int:
    """Accept int subclasses (not bool: a bool where an integer key belongs is a bug)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"a {type_name} distribution value must be int, not {type(value).__name__}")


def _hash_bool(value: Any, seed: int) -> int:
    """boolean uses ``hashcharextended`` on 0/1."""
    if value is True or value is False:
        return _hash_u32(int(value), seed)
    if isinstance(value, int) and value in (0, 1):
        return _hash_u32(int(value), seed)
    raise TypeError(f"a boolean distribution value must be bool, not {type(value).__name__}")


def _char_byte(value: Any) -> int:
    """The byte a ``"char"`` holds: an int 0..255 (or -128..-1), or the first byte of a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        if -128 <= value <= 255:
            return value & 0xFF
        raise _out_of_range('"char"')
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return value[0] if len(value) else 0
    raise TypeError(f'a "char" distribution value must be int or str, not {type(value).__name__}')


def _hash_char(value: Any, seed: int) -> int:
    """``hashcharextended``: ``(int32) (char)``; C ``char`` is signed on x86, so bytes >= 128
    sign-extend."""
    byte = _char_byte(value)
    if byte >= 128:
        byte -= 256
    return _hash_u32(byte & _M32, seed)


def _text_bytes(value: Any, type_name: str) -> bytes:
    """The UTF-8 bytes PostgreSQL stores for a string; NUL and lone surrogates cannot be stored."""
    if type(value) is str:
        if "\x00" in value:
            raise PgError("22021", 'invalid byte sequence for encoding "UTF8": 0x00')
        try:
            return value.encode()
        except UnicodeEncodeError as exc:
            raise PgError(
                "22021", f'invalid byte sequence for encoding "UTF8": {exc.reason}'
            ) from None
    if isinstance(value, str):
        return _text_bytes(str(value), type_name)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a {type_name} distribution value must be str, not {type(value).__name__}")


def _hash_text(value: Any, seed: int) -> int:
    """``hashtextextended`` with a deterministic collation: the bytes themselves."""
    return hash_bytes_extended(_text_bytes(value, "text"), seed)


def _hash_bpchar(value: Any, seed: int) -> int:
    """``hashbpcharextended``: trailing spaces are insignificant for character(n)."""
    return hash_bytes_extended(_text_bytes(value, "character").rstrip(b" "), seed)


_NAMEDATALEN = 64


def _name_bytes(value: Any) -> bytes:
    """``namein`` keeps at most NAMEDATALEN-1 bytes, clipped at a character boundary."""
    data = _text_bytes(value, "name")
    if len(data) >= _NAMEDATALEN:
        cut = _NAMEDATALEN - 1
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # do not split a UTF-8 sequence
            cut -= 1
        data = data[:cut]
    return data


def _hash_name(value: Any, seed: int) -> int:
    """``hashnameextended``: the (clipped) bytes, like text."""
    return hash_bytes_extended(_name_bytes(value), seed)


def _hash_bytea(value: Any, seed: int) -> int:
    """``hashvarlenaextended``: the raw bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return hash_bytes_extended(value, seed)
    raise TypeError(f"a bytea distribution value must be bytes, not {type(value).__name__}")


def _uuid_bytes(value: Any) -> bytes:
    if isinstance(value, _uuid.UUID):
        return value.bytes
    if isinstance(value, bytes | bytearray | memoryview) and len(value) == 16:
        return bytes(value)
    if isinstance(value, str):
        return _parse_uuid(value)
    raise TypeError(f"a uuid distribution value must be uuid.UUID or 16 bytes, not {value!r}")


def _hash_uuid(value: Any, seed: int) -> int:
    """``uuid_hash_extended``: the 16 bytes in network order."""
    return hash_bytes_extended(_uuid_bytes(value), seed)


#: glibc's ``NAN`` as float8 bytes: the positive quiet NaN ``get_float8_nan()`` returns.
_FLOAT8_NAN = b"\x00\x00\x00\x00\x00\x00\xf8\x7f"


def _float8_bits(x: float) -> bytes:
    """The float8 bytes hashed: NaNs normalised to the platform's ``NAN`` (0x7ff8...)."""
    if x != x:
        return _FLOAT8_NAN
    return _F8.pack(x)


def _hash_float8(value: Any, seed: int) -> int:
    """``hashfloat8extended``: +-0 hash to the seed itself; otherwise the 8 bytes."""
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise TypeError(f"a double precision value must be float, not {type(value).__name__}")
    x = float(value)
    if x == 0.0:
        return seed
    return hash_bytes_extended(_float8_bits(x), seed)


def _to_float4(x: float) -> float:
    """float8 -> float4 like PostgreSQL's ``dtof`` (overflow and underflow are errors)."""
    try:
        y = _F4.unpack(_F4.pack(x))[0]
    except OverflowError:
        raise PgError("22003", "value out of range: overflow") from None
    if y == 0.0 and x != 0.0:
        raise PgError("22003", "value out of range: underflow")
    return y


def _hash_float4(value: Any, seed: int) -> int:
    """``hashfloat4extended``: widened to float8 and hashed like it (cross-type hashing)."""
    if isinstance(value, bool) or not isinstance(value, float | int):
        raise TypeError(f"a real value must be float, not {type(value).__name__}")
    x = _to_float4(float(value))
    if x == 0.0:
        return seed
    return hash_bytes_extended(_float8_bits(x), seed)


def _numeric_decimal(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    if isinstance(value, float):
        # float8 -> numeric (float8_numeric) prints the double with DBL_DIG significant digits.
        if math.isnan(value):
            return Decimal("NaN")
        if math.isinf(value):
            return Decimal("Infinity") if value > 0 else Decimal("-Infinity")
        return Decimal(f"{value:.15g}")
    raise TypeError(f"a numeric distribution value must be Decimal or int, not {value!r}")


#: NUMERIC limits: 131072 digits before the point (weight <= 32767 base-10000 digits), 16383 after.
_NUMERIC_MAX_INT_DIGITS = 131072
_NUMERIC_MAX_DSCALE = 16383


def _check_numeric_range(d: Decimal) -> None:
    """PostgreSQL's limits: the display scale (digits written after the point) and the integer
    digits of the value; beyond them it raises rather than storing."""
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    if exp < -_NUMERIC_MAX_DSCALE or (d and d.adjusted() >= _NUMERIC_MAX_INT_DIGITS):
        raise PgError("22003", "value overflows numeric format")


def _hash_numeric(value: Any, seed: int) -> int:
    """``hash_numeric_extended``.

    PostgreSQL hashes the base-10000 digits (int16, little-endian) with leading and trailing
    zero digits stripped, then XORs in the weight of the first non-zero digit (sign-extended).
    Neither sign nor display scale is hashed, so 1.50 and 1.5 (and -1.5) hash alike. NaN and
    +-Infinity hash to the seed; zero to ``seed - 1``.
    """
    d = _numeric_decimal(value)
    if not d.is_finite():
        if d.is_snan():
            raise _invalid("numeric", str(d))
        return seed
    _check_numeric_range(d)
    _sign, digits, exp = d.as_tuple()
    assert isinstance(exp, int)
    nd = len(digits)
    while nd and digits[nd - 1] == 0:  # decimal trailing zeros: keeps the integer small
        nd -= 1
        exp += 1
    if nd == 0:
        return (seed - 1) & _M64
    coef = int("".join(map(str, digits[:nd])))
    # Align the decimal point on a base-10000 digit boundary: value = n * 10000**(-k).
    k = (-exp + 3) // 4 if exp < 0 else 0
    s = str(coef * 10 ** (exp + 4 * k))
    pad = -len(s) % 4
    if pad:
        s = "0" * pad + s
    groups = [int(s[i : i + 4]) for i in range(0, len(s), 4)]
    weight = len(groups) - 1 - k
    while groups[-1] == 0:
        groups.pop()
    h = hash_bytes_extended(struct.pack(f"<{len(groups)}h", *groups), seed)
    return h ^ (weight & _M64)


_POSTGRES_EPOCH_JDATE = 2451545  # date2j(2000, 1, 1)
_UNIX_EPOCH_JDATE = 2440588  # date2j(1970, 1, 1)
_USECS_PER_DAY = 86_400_000_000
_ORDINAL_OF_PG_EPOCH = date(2000, 1, 1).toordinal()
_DT_PG_EPOCH = datetime(2000, 1, 1)
_DT_PG_EPOCH_UTC = datetime(2000, 1, 1, tzinfo=UTC)
_DATE_BEGIN = -_POSTGRES_EPOCH_JDATE  # julian day 0 (4714-11-24 BC)
_DATE_END = 2147483494 - _POSTGRES_EPOCH_JDATE  # DATE_END_JULIAN, exclusive
_TS_MIN = -211813488000000000  # 4714-11-24 00:00:00 BC
_TS_END = 9223371331200000000  # 294277-01-01 00:00:00, exclusive


def _date_days(value: Any) -> int:
    if isinstance(value, PgInternal):
        return value.value
    if isinstance(value, datetime):
        raise TypeError("a date distribution value must be datetime.date, not datetime")
    if isinstance(value, date):
        return value.toordinal() - _ORDINAL_OF_PG_EPOCH
    raise TypeError(f"a date distribution value must be datetime.date, not {value!r}")


def _hash_date(value: Any, seed: int) -> int:
    """``date`` uses ``hashint4extended`` on the day number relative to 2000-01-01."""
    days = _date_days(value)
    if days < _INT32_MIN or days > _INT32_MAX:
        raise PgError("22008", "date out of range")
    return _hash_u32(days & _M32, seed)


def _timestamp_usecs(value: Any, with_tz: bool) -> int:
    """Microseconds since 2000-01-01 (UTC for timestamptz) of a datetime or PgInternal."""
    if isinstance(value, PgInternal):
        return value.value
    if isinstance(value, datetime):
        aware = value.tzinfo is not None and value.utcoffset() is not None
        if with_tz:
            if not aware:
                raise UnsupportedLiteral(
                    "0A000",
                    "cannot compute the shard of a timestamp with time zone from a naive datetime",
                    hint="Pass an aware datetime: a naive one means the session TimeZone.",
                )
            delta = value - _DT_PG_EPOCH_UTC
        else:
            if aware:
                raise UnsupportedLiteral(
                    "0A000",
                    "cannot compute the shard of a timestamp without time zone from an aware "
                    "datetime",
                    hint="Pass a naive datetime: converting an aware one uses the session TimeZone.",
                )
            delta = value - _DT_PG_EPOCH
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, date):
        raise TypeError("a timestamp distribution value must be datetime, not date")
    raise TypeError(f"a timestamp distribution value must be datetime, not {value!r}")


def _hash_timestamp(value: Any, seed: int) -> int:
    """``timestamp_hash_extended`` = ``hashint8extended`` on the int64 microseconds."""
    return _hash_int64(_timestamp_usecs(value, False), seed)


def _hash_timestamptz(value: Any, seed: int) -> int:
    """Same as timestamp, on the UTC instant."""
    return _hash_int64(_timestamp_usecs(value, True), seed)


def _time_usecs(value: Any) -> int:
    if isinstance(value, PgInternal):
        return value.value
    if isinstance(value, time):
        if value.utcoffset() is not None:
            raise TypeError("a time without time zone value must be a naive datetime.time")
        return (
            (value.hour * 60 + value.minute) * 60 + value.second
        ) * 1_000_000 + value.microsecond
    raise TypeError(f"a time distribution value must be datetime.time, not {value!r}")


def _hash_time(value: Any, seed: int) -> int:
    """``time_hash_extended`` = ``hashint8extended`` on microseconds since midnight."""
    return _hash_int64(_time_usecs(value), seed)


# --------------------------------------------------------------------------- typmods
# Applied before hashing because PostgreSQL hashes the stored (coerced) value.


def _round_usecs(usecs: int, precision: int) -> int:
    """``AdjustTimestampForTypmod``: round half away from zero to ``precision`` digits."""
    if precision >= 6:
        return usecs
    scale = 10 ** (6 - precision)
    offset = scale // 2
    if usecs >= 0:
        return ((usecs + offset) // scale) * scale
    return -((((-usecs) + offset) // scale) * scale)


def _timestamp_coercer(precision: int, with_tz: bool) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        usecs = _timestamp_usecs(value, with_tz)
        if usecs in (_INT64_MIN, _INT64_MAX):
            return value
        rounded = _round_usecs(usecs, precision)
        if not (_TS_MIN <= rounded < _TS_END):
            raise PgError("22008", "timestamp out of range")
        return PgInternal(rounded)

    return coerce


def _time_coercer(precision: int) -> Callable[[Any], Any]:
    def coerce(value: Any) -> Any:
        return PgInternal(_round_usecs(_time_usecs(value), precision))

    return coerce


#: Exact decimal context for typmod rounding: the default 28-digit context would refuse to
#: quantize wide values. ROUND_HALF_UP is half away from zero, like PostgreSQL's round_var.
_DEC_CTX = Context(prec=200_000, Emax=10**6, Emin=-(10**6), rounding=ROUND_HALF_UP)


def _numeric_coercer(precision: int, scale: int) -> Callable[[Any], Any]:
    """``apply_typmod``: round to ``scale`` (half away from zero), then check the precision."""
    quantum = Decimal((0, (1,), -scale))
    max_int_digits = precision - scale

    def coerce(value: Any) -> Any:
        d = _numeric_decimal(value)
        if d.is_nan():
            return d
        if d.is_infinite():
            raise PgError(
                "22003",
                "numeric field overflow",
                detail=f"A field with precision {precision}, scale {scale} cannot hold an "
                "infinite value.",
            )
        try:
            r = d.quantize(quantum, context=_DEC_CTX)
        except InvalidOperation:
            raise PgError("22003", "numeric field overflow") from None
        if r and r.adjusted() + 1 > max_int_digits:
            raise PgError(
                "22003",
                "numeric field overflow",
                detail=f"A field with precision {precision}, scale {scale} must round to an "
                f"absolute value less than 10^{max_int_digits}.",
            )
        return r

    return coerce


def _varchar_coercer(length: int, type_label: str) -> Callable[[Any], Any]:
    """Over-length strings are an error unless the excess is spaces, which are cut off."""

    def coerce(value: Any) -> Any:
        if isinstance(value, str):
            if len(value) > length:
                if value[length:].strip(" "):
                    raise PgError("22001", f"value too long for type {type_label}({length})")
                return value[:length]
            return value
        if isinstance(value, bytes | bytearray | memoryview):
            return coerce(bytes(value).decode())
        return value

    return coerce


# --------------------------------------------------------------------------- type names


@dataclass(frozen=True, slots=True)
class _TypeSpec:
    canonical: str  # format_type() spelling, typmod included
    base: str  # canonical name without typmod (a key of _BASE)
    hasher: Callable[[Any, int], int]
    parser: Callable[[str, tzinfo | str | None], Any]
    coerce: Callable[[Any], Any] | None = None


#: Base name (lower case, no typmod) -> canonical base name (what ``format_type`` prints).
#: ``bpchar`` stays apart from ``character``: bare ``character`` means ``character(1)``.
_ALIASES: dict[str, str] = {
    "smallint": "smallint",
    "int2": "smallint",
    "smallserial": "smallint",
    "serial2": "smallint",
    "integer": "integer",
    "int": "integer",
    "int4": "integer",
    "serial": "integer",
    "serial4": "integer",
    "bigint": "bigint",
    "int8": "bigint",
    "bigserial": "bigint",
    "serial8": "bigint",
    "oid": "oid",
    "numeric": "numeric",
    "decimal": "numeric",
    "real": "real",
    "float4": "real",
    "double precision": "double precision",
    "float8": "double precision",
    "float": "double precision",
    "boolean": "boolean",
    "bool": "boolean",
    '"char"': '"char"',
    "text": "text",
    "character varying": "character varying",
    "varchar": "character varying",
    "character": "character",
    "char": "character",
    "bpchar": "bpchar",
    "name": "name",
    "bytea": "bytea",
    "uuid": "uuid",
    "date": "date",
    "time": "time without time zone",
    "time without time zone": "time without time zone",
    "timestamp": "timestamp without time zone",
    "timestamp without time zone": "timestamp without time zone",
    "timestamptz": "timestamp with time zone",
    "timestamp with time zone": "timestamp with time zone",
}

#: Every accepted type name without typmod: canonical names and their aliases.
SUPPORTED_TYPES: frozenset[str] = frozenset(_ALIASES)

_CANONICAL: frozenset[str] = frozenset(_ALIASES.values())

_TYPE_RE = re.compile(
    r"""^\s*(?:pg_catalog\s*\.\s*)?
    (?P<base>"char"|[a-z_][a-z0-9_]*(?:\s+[a-z_][a-z0-9_]*)*?)\s*
    (?:\(\s*(?P<m1>-?\d+)\s*(?:,\s*(?P<m2>-?\d+)\s*)?\))?\s*
    (?P<tail>with(?:out)?\s+time\s+zone)?\s*(?P<arr>\[\s*\])?\s*$""",
    re.X,
)

_SUPPORTED_HINT = (
    "Distribution columns may be of type smallint, integer, bigint, oid, numeric, real, "
    'double precision, boolean, "char", text, character varying, character, name, bytea, '
    "uuid, date, time, timestamp or timestamptz."
)


def _unsupported_type(name: str) -> PgError:
    return PgError(
        "0A000",
        f"cannot distribute by type {name.strip()}",
        detail="The proxy computes shards with PostgreSQL's hash functions and implements them "
        "only for some types.",
        hint=_SUPPORTED_HINT,
    )


def _split_type(name: str) -> tuple[str, int | None, int | None]:
    """(canonical base, typmod 1, typmod 2) of a type name; raises 0A000 if unsupported."""
    raw = name.strip()
    lowered = raw if raw == '"char"' else raw.lower()
    lowered = re.sub(r"\s+", " ", lowered)
    m = _TYPE_RE.match(lowered)
    if not m or m.group("arr"):
        raise _unsupported_type(raw)
    base = m.group("base")
    tail = m.group("tail")
    if tail:
        if base not in ("timestamp", "time"):
            raise _unsupported_type(raw)
        base = f"{base} {'without' if tail.startswith('without') else 'with'} time zone"
    m1 = int(m.group("m1")) if m.group("m1") is not None else None
    m2 = int(m.group("m2")) if m.group("m2") is not None else None
    if base == "float":
        # float(p): p <= 24 is real, otherwise double precision (SQL standard bits of mantissa).
        if m1 is not None:
            if not 1 <= m1 <= 53 or m2 is not None:
                raise PgError("22023", "precision for type float must be between 1 and 53 bits")
            base = "real" if m1 <= 24 else "double precision"
            m1 = None
    canonical = _ALIASES.get(base)
    if canonical is None:
        raise _unsupported_type(raw)
    if m2 is not None and canonical != "numeric":
        raise _unsupported_type(raw)
    if m1 is not None and canonical not in (
        "numeric",
        "character varying",
        "character",
        "time without time zone",
        "timestamp without time zone",
        "timestamp with time zone",
    ):
        raise _unsupported_type(raw)
    if base in ("char", "character") and m1 is None:
        m1 = 1  # bare "char" / "character" means character(1)
    return canonical, m1, m2


def canonical_type(name: str) -> str:
    """The type as ``format_type(atttypid, atttypmod)`` prints it, typmod included.

    Why keep the typmod: PostgreSQL hashes the stored value, and ``numeric(10,2)`` or
    ``timestamp(3)`` round before storing, so routing a value by ``numeric`` instead of
    ``numeric(10,2)`` could pick another slot. Store this (or the catalog's ``format_type``)
    as the distribution column's type and pass it to :func:`shard_slot`. Raises
    ``PgError('0A000')`` for types whose hash function is not implemented here.
    """
    return _resolve(name).canonical


def base_type(name: str) -> str:
    """The canonical name without typmod: columns with the same base type hash equal stored
    values to the same slot (a co-location criterion); ``bpchar`` counts as ``character``."""
    base = _resolve(name).base
    return "character" if base == "bpchar" else base


_spec_cache: dict[str, _TypeSpec] = {}


def _resolve(type_name: str) -> _TypeSpec:
    spec = _spec_cache.get(type_name)
    if spec is None:
        spec = _build_spec(type_name)
        if len(_spec_cache) < 1024:
            _spec_cache[type_name] = spec
    return spec


def _build_spec(type_name: str) -> _TypeSpec:
    canonical, m1, m2 = _split_type(type_name)
    hasher, parser = _BASE[canonical]
    coerce: Callable[[Any], Any] | None = None
    if canonical == "numeric" and m1 is not None:
        if not 1 <= m1 <= 1000:
            raise PgError("22023", f"NUMERIC precision {m1} must be between 1 and 1000")
        scale = m2 if m2 is not None else 0
        if not -1000 <= scale <= 1000:
            raise PgError("22023", f"NUMERIC scale {scale} must be between -1000 and 1000")
        coerce = _numeric_coercer(m1, scale)
    elif canonical in ("character varying", "character") and m1 is not None:
        if m1 < 1:
            raise PgError("22023", f"length for type {canonical} must be at least 1")
        coerce = _varchar_coercer(
            m1, "character varying" if canonical != "character" else "character"
        )
    elif (
        canonical in ("timestamp without time zone", "timestamp with time zone") and m1 is not None
    ):
        if m1 < 0:
            raise PgError("22023", f"TIMESTAMP({m1}) precision must not be negative")
        coerce = _timestamp_coercer(min(m1, 6), canonical.endswith("with time zone"))
    elif canonical == "time without time zone" and m1 is not None:
        if m1 < 0:
            raise PgError("22023", f"TIME({m1}) precision must not be negative")
        coerce = _time_coercer(min(m1, 6))
    return _TypeSpec(_format_type(canonical, m1, m2), canonical, hasher, parser, coerce)


def _format_type(base: str, m1: int | None, m2: int | None) -> str:
    """``format_type`` spelling of a base type and its modifiers."""
    if m1 is None:
        return base
    if base == "numeric":
        return f"numeric({m1},{m2 if m2 is not None else 0})"
    if base in ("character varying", "character"):
        return f"{base}({m1})"
    words = base.split(" ", 1)  # timestamp(3) with time zone, time(2) without time zone
    return f"{words[0]}({min(m1, 6)}) {words[1]}"


# --------------------------------------------------------------------------- public hashing


def hash_value(type_name: str, value: object, seed: int = HASH_PARTITION_SEED) -> int:
    """The type's extended hash (hash opclass support function 2) of ``value``, as uint64.

    With ``seed=0`` this equals e.g. ``hashint8extended(v, 0)`` (reported signed by SQL); with
    the default seed it is the per-column hash that hash partitioning combines. ``value`` is the
    Python form of a stored value (see :func:`parse_text_value`); ``None`` is not hashable here
    (partitioning skips NULLs: use :func:`shard_slot`).
    """
    spec = _spec_cache.get(type_name) or _resolve(type_name)
    if value is None:
        raise TypeError("NULL has no hash value; partitioning routes NULL keys to slot 0")
    if spec.coerce is not None:
        value = spec.coerce(value)
    return spec.hasher(value, seed & _M64)


def partition_hash(type_name: str, value: object) -> int:
    """``compute_partition_hash_value`` for a one-column key: ``hash_combine64(0, h)``.

    With ``a = 0`` the combine reduces to ``h + 0x49a0f4dd15e5a8e3 (mod 2**64)``. A NULL key
    contributes nothing: its row hash is 0.
    """
    if value is None:
        return 0
    spec = _spec_cache.get(type_name) or _resolve(type_name)
    if spec.coerce is not None:
        value = spec.coerce(value)
    return (spec.hasher(value, HASH_PARTITION_SEED) + _COMBINE_K) & _M64


def shard_slot(type_name: str, value: object, shard_count: int) -> int:
    """The remainder of the hash partition (``MODULUS shard_count``) PostgreSQL puts ``value``
    in; ``None`` (NULL) goes to slot 0 like in PostgreSQL."""
    if value is None:
        return 0
    spec = _spec_cache.get(type_name) or _resolve(type_name)
    if spec.coerce is not None:
        value = spec.coerce(value)
    return ((spec.hasher(value, HASH_PARTITION_SEED) + _COMBINE_K) & _M64) % shard_count


def shard_slot_null(shard_count: int) -> int:
    """Slot of a NULL key: row hash 0, so always 0 (kept explicit for readers of routing code)."""
    if shard_count < 1:
        raise ValueError("shard_count must be at least 1")
    return 0


# --------------------------------------------------------------------------- text input
# Each parser turns a PostgreSQL text representation (what a literal or a text-format parameter
# holds) into the Python value the hasher takes, rejecting what PostgreSQL rejects.

_INT_RE = re.compile(r"^[ \t\n\r\f\v]*([+-]?[0-9]+)[ \t\n\r\f\v]*$")


def _int_parser(type_name: str, lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(text: str, _tz: Any = None) -> int:
        m = _INT_RE.match(text)
        if not m:
            raise _invalid(type_name, text)
        v = int(m.group(1))
        if v < lo or v > hi:
            raise PgError("22003", f'value "{text}" is out of range for type {type_name}')
        return v

    return parse


_OID_RE = re.compile(r"^[ \t\n\r\f\v]*([+-]?)([0-9]+)[ \t\n\r\f\v]*$")


def _parse_oid(text: str, _tz: Any = None) -> int:
    """``oidin``: C ``strtoul`` (base 10, a minus sign negates modulo 2**64), then the value
    must survive truncation to 32 bits under unsigned or signed extension. So ``'-1'`` is
    4294967295 and, as on every 64-bit PostgreSQL, ``'18446744071562067968'`` is 2**31."""
    m = _OID_RE.match(text)
    if not m:
        raise _invalid("oid", text)
    sign, digits = m.groups()
    magnitude = int(digits)
    if magnitude > _M64:
        raise PgError("22003", f'value "{text}" is out of range for type oid')
    cvt = (-magnitude if sign == "-" else magnitude) & _M64
    result = cvt & _M32
    sign_extended = result | 0xFFFFFFFF00000000 if result & 0x80000000 else result
    if cvt != result and cvt != sign_extended:
        raise PgError("22003", f'value "{text}" is out of range for type oid')
    return result


_BOOL_WORDS = {
    "t": True,
    "tr": True,
    "tru": True,
    "true": True,
    "y": True,
    "ye": True,
    "yes": True,
    "on": True,
    "1": True,
    "f": False,
    "fa": False,
    "fal": False,
    "fals": False,
    "false": False,
    "n": False,
    "no": False,
    "of": False,
    "off": False,
    "0": False,
}


def _parse_bool(text: str, _tz: Any = None) -> bool:
    """``boolin``: unique prefixes of true/false/yes/no, on/off, 1/0; case-insensitive."""
    v = _BOOL_WORDS.get(text.strip(" \t\n\r\f\v").lower())
    if v is None:
        raise _invalid("boolean", text)
    return v


def _parse_char(text: str, _tz: Any = None) -> int:
    """``charin``: ``\\ooo`` octal escapes, else the first byte (0 for the empty string)."""
    data = text.encode()
    if len(data) == 4 and data[0] == 0x5C and all(48 <= x <= 55 for x in data[1:]):
        return int(data[1:].decode(), 8) & 0xFF
    return data[0] if data else 0


def _parse_text(text: str, _tz: Any = None) -> str:
    _text_bytes(text, "text")  # NUL / surrogate check
    return text


_HEX = frozenset(b"0123456789abcdefABCDEF")


def _parse_bytea(text: str, _tz: Any = None) -> bytes:
    """``byteain``: ``\\x`` hex (whitespace between pairs allowed) or the escape format."""
    if text.startswith("\\x"):
        digits = "".join(text[2:].split())
        if len(digits) % 2:
            raise PgError("22023", "invalid hexadecimal data: odd number of digits")
        try:
            return bytes.fromhex(digits)
        except ValueError:
            bad = next(ch for ch in digits if ch.encode()[0] not in _HEX)
            raise PgError("22023", f'invalid hexadecimal digit: "{bad}"') from None
    data = _text_bytes(text, "bytea")
    if b"\\" not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        ch = data[i]
        if ch != 0x5C:
            out.append(ch)
            i += 1
        elif i + 1 < n and data[i + 1] == 0x5C:
            out.append(0x5C)
            i += 2
        elif (
            i + 3 < n
            and 48 <= data[i + 1] <= 51
            and 48 <= data[i + 2] <= 55
            and 48 <= data[i + 3] <= 55
        ):
            out.append(int(data[i + 1 : i + 4], 8))
            i += 4
        else:
            raise _invalid("bytea", text)
    return bytes(out)


_UUID_RE = re.compile(r"^(\{)?([0-9a-fA-F]{4}-?){7}[0-9a-fA-F]{4}(?(1)\})$")


def _parse_uuid(text: str, _tz: Any = None) -> bytes:
    """``uuid_in``: 32 hex digits, optional ``-`` after any group of four, optional braces."""
    if not _UUID_RE.match(text):
        raise _invalid("uuid", text)
    return bytes.fromhex(text.strip("{}").replace("-", ""))


_NUMERIC_RE = re.compile(r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*$")
_NUMERIC_SPECIAL = {
    "nan": "NaN",
    "infinity": "Infinity",
    "+infinity": "Infinity",
    "-infinity": "-Infinity",
    "inf": "Infinity",
    "+inf": "Infinity",
    "-inf": "-Infinity",
}


def _parse_numeric(text: str, _tz: Any = None) -> Decimal:
    """``numeric_in``: decimal notation with optional exponent, NaN and (+-)Infinity."""
    special = _NUMERIC_SPECIAL.get(text.strip().lower())
    if special is not None:
        return Decimal(special)
    if not _NUMERIC_RE.match(text):
        raise _invalid("numeric", text)
    d = Decimal(text.strip())
    _check_numeric_range(d)
    return d


_FLOAT_RE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$")
_FLOAT_SPECIAL = {
    "nan": math.nan,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-infinity": -math.inf,
    "inf": math.inf,
    "+inf": math.inf,
    "-inf": -math.inf,
}


def _float_text(text: str, type_name: str) -> tuple[str | None, float]:
    special = _FLOAT_SPECIAL.get(text.strip().lower())
    if special is not None:
        return None, special
    m = _FLOAT_RE.match(text)
    if not m:
        raise _invalid(type_name, text)
    return m.group(1), float(m.group(1))


def _has_nonzero_digit(literal: str) -> bool:
    mantissa = literal.split("e")[0].split("E")[0]
    return any(ch in "123456789" for ch in mantissa)


def _parse_float8(text: str, _tz: Any = None) -> float:
    """``float8in``: strtod (correctly rounded, as Python's float); overflow and underflow to
    zero are errors, subnormals are not."""
    literal, x = _float_text(text, "double precision")
    if literal is not None:
        if math.isinf(x) or (x == 0.0 and _has_nonzero_digit(literal)):
            raise PgError("22003", f'"{literal}" is out of range for type double precision')
    return x


def _parse_float4(text: str, _tz: Any = None) -> float:
    """``float4in`` uses strtof: decimal -> float32 rounded once (not via float8)."""
    literal, x = _float_text(text, "real")
    if literal is None:
        return x
    exact = Fraction(Decimal(literal))
    try:
        y = _F4.unpack(_F4.pack(x))[0]
    except OverflowError:
        y = math.copysign(math.inf, x)
    if not math.isinf(y):
        # x was rounded to float8 first (double rounding); the correctly rounded float32 is y
        # or one of its neighbours: pick the nearest, ties to an even mantissa.
        bits = _U32.unpack(_F4.pack(y))[0]
        best_key = (abs(Fraction(y) - exact), bits & 1)
        for nb in (bits - 1, bits + 1):
            if not 0 <= nb <= _M32:
                continue
            cand = _F4.unpack(_U32.pack(nb))[0]
            if math.isinf(cand) or math.isnan(cand):
                continue
            key = (abs(Fraction(cand) - exact), nb & 1)
            if key < best_key:
                y, best_key = cand, key
    if math.isinf(y) or (y == 0.0 and exact != 0):
        raise PgError("22003", f'"{literal}" is out of range for type real')
    return y


# ---- dates and times ---------------------------------------------------------------------

_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _isleap(y: int) -> bool:
    return y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)


def _date2j(year: int, month: int, day: int) -> int:
    """PostgreSQL's ``date2j`` (Julian day number; year 0 = 1 BC)."""
    if month > 2:
        month += 1
        year += 4800
    else:
        month += 13
        year += 4799
    century = year // 100
    julian = year * 365 - 32167
    julian += year // 4 - century + century // 4
    julian += 7834 * month // 256 + day
    return julian


_DATE_PART = r"(?P<y>\d{4,})-(?P<mo>\d{1,2})-(?P<d>\d{1,2})"
_TIME_PART = r"(?P<h>\d{1,2}):(?P<mi>\d{1,2})(?::(?P<s>\d{1,2})(?P<f>\.\d+)?)?"
_ZONE_PART = (
    r"(?P<tz>[zZ]|UTC|utc|GMT|gmt|[+-]\d{1,2}(?::?\d{2}(?::?\d{2})?)?"
    r"|[A-Za-z_]+(?:/[A-Za-z0-9_+-]+)+)"
)
# A zone only after a time: PostgreSQL reads "2024-01-02-08" as a malformed date, not an offset.
_TS_RE = re.compile(
    rf"^\s*{_DATE_PART}(?:(?:\s+|[Tt]){_TIME_PART}\s*(?:{_ZONE_PART})?)?"
    r"\s*(?P<era>BC|bc|AD|ad)?\s*$"
)
_TIME_RE = re.compile(rf"^\s*(?:{_DATE_PART}(?:\s+|[Tt]))?{_TIME_PART}\s*(?:{_ZONE_PART})?\s*$")

_SPECIAL_TS = {"infinity": _INT64_MAX, "+infinity": _INT64_MAX, "-infinity": _INT64_MIN}


def _range_error(text: str) -> PgError:
    return PgError("22008", f'date/time field value out of range: "{text}"')


def _ymd(m: re.Match[str], text: str) -> int:
    """Validated (year, month, day) of a match -> days since 2000-01-01."""
    year, month, day = int(m.group("y")), int(m.group("mo")), int(m.group("d"))
    era = m.group("era") if "era" in m.re.groupindex else None
    if era and era.lower() == "bc":
        if year <= 0:
            raise _range_error(text)
        year = -(year - 1)
    if not 1 <= month <= 12 or day < 1:
        raise _range_error(text)
    dim = 29 if month == 2 and _isleap(year) else _DAYS_IN_MONTH[month - 1]
    if day > dim:
        raise _range_error(text)
    days = _date2j(year, month, day) - _POSTGRES_EPOCH_JDATE
    return days


def _time_of_day(m: re.Match[str], text: str) -> int:
    """Microseconds since midnight of the matched time part (``None`` fields are zero)."""
    if m.group("h") is None:
        return 0
    hour, minute = int(m.group("h")), int(m.group("mi"))
    sec = int(m.group("s") or 0)
    frac = m.group("f")
    # ParseFractionalSecond: rint(strtod(".ddd") * 1e6), half to even like Python's round().
    fsec = round(float(frac) * 1_000_000) if frac else 0
    if (
        hour > 24
        or minute > 59
        or sec > 60
        or fsec > 1_000_000
        or (hour == 24 and (minute or sec or fsec))
    ):
        raise _range_error(text)
    return ((hour * 60 + minute) * 60 + sec) * 1_000_000 + fsec


def _zone_of_token(tok: str, text: str) -> int | tzinfo:
    """A literal's zone: seconds east of UTC for Z/UTC/GMT and numeric offsets, else the named
    zone. Checked even where the zone is then ignored (date, timestamp, time): PostgreSQL
    rejects bad zones there too (22009 displacement out of range, 22023 unknown name)."""
    if tok in ("z", "Z") or tok.lower() in ("utc", "gmt"):
        return 0
    if tok[0] in "+-":
        digits = tok[1:].replace(":", "")
        if len(digits) <= 2:
            h, mi, s = int(digits), 0, 0
        elif len(digits) in (3, 4):
            h, mi, s = int(digits[:-2]), int(digits[-2:]), 0
        else:
            h, mi, s = int(digits[:-4]), int(digits[-4:-2]), int(digits[-2:])
        if h > 15 or mi > 59 or s > 59:  # PostgreSQL: offsets up to +-15:59:59
            raise PgError("22009", f'time zone displacement out of range: "{text}"')
        off = (h * 60 + mi) * 60 + s
        return -off if tok[0] == "-" else off
    return _zone(tok)


#: TimeZone settings that mean UTC: resolved without zoneinfo, so they work for any year.
_UTC_NAMES = frozenset({"utc", "etc/utc", "gmt", "etc/gmt", "uct", "etc/uct", "zulu", "universal"})


def _zone(name: str | tzinfo) -> tzinfo:
    if isinstance(name, tzinfo):
        return name
    if name.lower() in _UTC_NAMES:
        return UTC
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PgError("22023", f'time zone "{name}" not recognized') from None


def _local_to_utc_usecs(local_usecs: int, zone: tzinfo, text: str, type_name: str) -> int:
    """Local wall time (usecs since 2000-01-01) in a named zone -> UTC usecs, PostgreSQL style.

    PostgreSQL's ``DetermineTimeZoneOffset`` reads a time in a spring-forward gap with the
    offset before the transition and an ambiguous fall-back time with the offset after it;
    both are the smaller of the two offsets zoneinfo reports for fold=0 and fold=1.
    """
    if isinstance(zone, timezone):  # fixed offset (UTC included): valid for every year
        off = zone.utcoffset(None)
        return local_usecs - (off.days * 86400 + off.seconds) * 1_000_000 - off.microseconds
    try:
        naive = _DT_PG_EPOCH + timedelta(microseconds=local_usecs)
    except OverflowError:
        raise _unsupported(
            type_name, text, "Named time zones are resolved only for years 1..9999."
        ) from None
    off0 = naive.replace(tzinfo=zone, fold=0).utcoffset()
    off1 = naive.replace(tzinfo=zone, fold=1).utcoffset()
    if off0 is None or off1 is None:
        raise _unsupported(type_name, text, "The time zone has no UTC offset.")
    off = min(off0, off1)
    return local_usecs - (off.days * 86400 + off.seconds) * 1_000_000 - off.microseconds


def _from_internal_date(days: int) -> date | PgInternal:
    ordinal = days + _ORDINAL_OF_PG_EPOCH
    if 1 <= ordinal <= date.max.toordinal():
        return date.fromordinal(ordinal)
    return PgInternal(days)


def _parse_date(text: str, _tz: Any = None) -> date | PgInternal:
    """``date_in`` for ISO dates (``YYYY-MM-DD`` [BC]), ``epoch`` and (+-)infinity.

    A time part and zone are allowed and ignored, as PostgreSQL does. Other spellings depend on
    ``DateStyle`` (is 01/02/2024 January or February?) and raise :class:`UnsupportedLiteral`.
    """
    word = text.strip().lower()
    if word in _SPECIAL_TS:
        return PgInternal(_INT32_MAX if _SPECIAL_TS[word] > 0 else _INT32_MIN)
    if word == "epoch":
        return date(1970, 1, 1)
    m = _TS_RE.match(text)
    if not m:
        raise _unsupported("date", text, "Write dates as YYYY-MM-DD (ISO 8601).")
    days = _ymd(m, text)
    if m.group("h") is not None:
        _time_of_day(m, text)  # validated, then ignored
    if m.group("tz") is not None:
        _zone_of_token(m.group("tz"), text)  # likewise
    if not _DATE_BEGIN <= days < _DATE_END:
        raise PgError("22008", f'date out of range: "{text}"')
    return _from_internal_date(days)


def _from_internal_ts(usecs: int, with_tz: bool) -> datetime | PgInternal:
    base = _DT_PG_EPOCH_UTC if with_tz else _DT_PG_EPOCH
    if usecs in (_INT64_MIN, _INT64_MAX):
        return PgInternal(usecs)
    try:
        return base + timedelta(microseconds=usecs)
    except OverflowError:
        return PgInternal(usecs)


def _timestamp_parser(with_tz: bool) -> Callable[[str, tzinfo | str | None], Any]:
    type_name = "timestamp with time zone" if with_tz else "timestamp without time zone"

    def parse(text: str, tz: tzinfo | str | None = None) -> datetime | PgInternal:
        word = text.strip().lower()
        if word in _SPECIAL_TS:
            return PgInternal(_SPECIAL_TS[word])
        if word == "epoch":
            return _from_internal_ts(
                (_UNIX_EPOCH_JDATE - _POSTGRES_EPOCH_JDATE) * _USECS_PER_DAY, with_tz
            )
        m = _TS_RE.match(text)
        if not m:
            raise _unsupported(
                type_name, text, "Write timestamps in ISO 8601 form, e.g. 2024-01-02 03:04:05+00."
            )
        days = _ymd(m, text)
        usecs = days * _USECS_PER_DAY + _time_of_day(m, text)
        zone_token = m.group("tz")
        literal_zone = _zone_of_token(zone_token, text) if zone_token is not None else None
        if with_tz:
            if isinstance(literal_zone, int):
                usecs -= literal_zone * 1_000_000
            elif literal_zone is not None:
                usecs = _local_to_utc_usecs(usecs, literal_zone, text, type_name)
            elif tz is None:
                raise _unsupported(
                    type_name,
                    text,
                    "The value has no UTC offset, so its instant depends on the session TimeZone; "
                    "write it with an offset (e.g. +00).",
                )
            else:
                zone = _zone(tz)
                usecs = _local_to_utc_usecs(usecs, zone, text, type_name)
        # For timestamp without time zone a zone in the literal is silently ignored.
        if not _TS_MIN <= usecs < _TS_END:
            raise PgError("22008", f'timestamp out of range: "{text}"')
        return _from_internal_ts(usecs, with_tz)

    return parse


def _parse_time(text: str, _tz: Any = None) -> time | PgInternal:
    """``time_in`` for ``HH:MM[:SS[.frac]]`` (a date prefix and a zone are ignored)."""
    if text.strip().lower() == "allballs":
        return time(0)
    m = _TIME_RE.match(text)
    if not m:
        raise _unsupported("time without time zone", text, "Write times as HH:MM:SS.")
    if m.group("y") is not None:
        _ymd(m, text)  # a date prefix is validated, then ignored
    if m.group("tz") is not None:
        _zone_of_token(m.group("tz"), text)
    usecs = _time_of_day(m, text)
    if usecs > _USECS_PER_DAY:  # 23:59:60.5 and the like
        raise _range_error(text)
    if usecs == _USECS_PER_DAY:
        return PgInternal(usecs)  # 24:00:00 has no datetime.time
    secs, micro = divmod(usecs, 1_000_000)
    return time(secs // 3600, secs // 60 % 60, secs % 60, micro)


_BASE: dict[str, tuple[Callable[[Any, int], int], Callable[[str, Any], Any]]] = {
    "smallint": (_hash_int16, _int_parser("smallint", _INT16_MIN, _INT16_MAX)),
    "integer": (_hash_int32, _int_parser("integer", _INT32_MIN, _INT32_MAX)),
    "bigint": (_hash_int64, _int_parser("bigint", _INT64_MIN, _INT64_MAX)),
    "oid": (_hash_oid, _parse_oid),
    "numeric": (_hash_numeric, _parse_numeric),
    "real": (_hash_float4, _parse_float4),
    "double precision": (_hash_float8, _parse_float8),
    "boolean": (_hash_bool, _parse_bool),
    '"char"': (_hash_char, _parse_char),
    "text": (_hash_text, _parse_text),
    "character varying": (_hash_text, _parse_text),
    "character": (_hash_bpchar, _parse_text),
    "bpchar": (_hash_bpchar, _parse_text),
    "name": (_hash_name, _parse_text),
    "bytea": (_hash_bytea, _parse_bytea),
    "uuid": (_hash_uuid, _parse_uuid),
    "date": (_hash_date, _parse_date),
    "time without time zone": (_hash_time, _parse_time),
    "timestamp without time zone": (_hash_timestamp, _timestamp_parser(False)),
    "timestamp with time zone": (_hash_timestamptz, _timestamp_parser(True)),
}
assert set(_BASE) == _CANONICAL


def parse_text_value(type_name: str, text: str, *, timezone: tzinfo | str | None = None) -> object:
    """The Python value :func:`hash_value` expects for a PostgreSQL text representation.

    ``'42'`` -> 42 (integers), uuid text -> 16 bytes, ``'2024-01-02'`` -> ``date``, timestamps
    -> ``datetime`` (aware, UTC, for timestamptz), numeric -> ``Decimal``, ``"char"`` -> its
    byte as int, bytea (hex or escape format) -> bytes; values Python's types cannot hold (BC,
    year > 9999, infinity, 24:00:00) -> :class:`PgInternal`. Typmods in ``type_name`` are
    applied by the hashing functions, not here.

    Invalid input raises :class:`PgError` with PostgreSQL's SQLSTATE and message. Valid input
    whose meaning depends on session settings, or that this parser does not read, raises
    :class:`UnsupportedLiteral` (0A000): notably a timestamptz without a UTC offset when
    ``timezone`` (the session's TimeZone, a tz database name or ``tzinfo``) is not given, and
    dates not in ISO form.
    """
    spec = _spec_cache.get(type_name) or _resolve(type_name)
    return spec.parser(text, timezone)
