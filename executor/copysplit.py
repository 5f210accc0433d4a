"""Split a COPY FROM STDIN data stream into rows and find each row's distribution value.

CopyData messages carry arbitrary chunks of the stream (a row may span messages), so each
splitter is incremental: ``feed(chunk)`` returns the complete rows seen so far as
``(row_bytes, key)`` where ``row_bytes`` is the row exactly as the client sent it (re-sent to the
shard unchanged) and ``key`` is the distribution column's value as text (None for NULL).

Formats: ``text`` (rows end at an unescaped newline; fields split on the delimiter, escapes
undone only for the key field), ``csv`` (quotes may hide delimiters and newlines; HEADER lines
are dropped), ``binary`` (signature header, then tuples of length-prefixed fields; the key field
is decoded from the column's binary representation).
"""

from __future__ import annotations

import csv
import struct
import uuid

from executor.copyio import unescape_text_field
from executor.protocol import PgError

BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
BINARY_HEADER = BINARY_SIGNATURE + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
BINARY_TRAILER = b"\xff\xff"


class TextSplitter:
    def __init__(self, key_index: int, delimiter: str = "\t", null: str = "\\N") -> None:
        self.key_index = key_index
        self.delimiter = delimiter.encode()
        self.null = null
        self.pending = b""
        self.ended = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, str | None]]:
        data = self.pending + chunk
        out: list[tuple[bytes, str | None]] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            line = data[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if line == b"\\.":
                self.ended = True
                start = len(data)
                break
            out.append((line + b"\n", self._key(line)))
        self.pending = data[start:]
        return out

    def finish(self) -> list[tuple[bytes, str | None]]:
        if self.pending and not self.ended:
            line, self.pending = self.pending, b""
            if line != b"\\.":
                return [(line + b"\n", self._key(line))]
        return []

    def _key(self, line: bytes) -> str | None:
        parts = line.split(self.delimiter)
        if self.key_index >= len(parts):
            raise PgError("22P04", f"missing data for column {self.key_index + 1}")
        field = parts[self.key_index].decode()
        if field == self.null:
            return None
        return unescape_text_field(field)


class CsvSplitter:
    def __init__(
        self, key_index: int, delimiter: str = ",", quote: str = '"', escape: str | None = None,
        null: str = "", header: bool = False,
    ) -> None:
        self.key_index = key_index
        self.delimiter = delimiter
        self.quote = quote.encode()
        self.escape = (escape or quote).encode()
        self.null = null
        self.skip_header = header
        self.pending = b""

    def _records(self, data: bytes, final: bool) -> tuple[list[bytes], bytes]:
        """Cut ``data`` into complete records (quote-aware); return them and the rest."""
        out: list[bytes] = []
        in_quotes = False
        start = 0
        i = 0
        n = len(data)
        q, e = self.quote[0], self.escape[0]
        while i < n:
            b = data[i]
            if in_quotes:
                if b == e and e != q and i + 1 < n and data[i + 1] in (q, e):
                    i += 2
                    continue
                if b == q:
                    if e == q and i + 1 < n and data[i + 1] == q:
                        i += 2
                        continue
                    in_quotes = False
            elif b == q:
                in_quotes = True
            elif b == 10:  # newline ends a record outside quotes
                out.append(data[start : i + 1])
                start = i + 1
            i += 1
        rest = data[start:]
        if final and rest:
            out.append(rest if rest.endswith(b"\n") else rest + b"\n")
            rest = b""
        return out, rest

    def feed(self, chunk: bytes, final: bool = False) -> list[tuple[bytes, str | None]]:
        records, self.pending = self._records(self.pending + chunk, final)
        out: list[tuple[bytes, str | None]] = []
        for rec in records:
            if self.skip_header:
                self.skip_header = False
                continue
            if rec.rstrip(b"\r\n") == b"\\.":
                continue
            out.append((rec, self._key(rec)))
        return out

    def finish(self) -> list[tuple[bytes, str | None]]:
        return self.feed(b"", final=True)

    def _key(self, rec: bytes) -> str | None:
        text = rec.decode().rstrip("\r\n")
        row = next(csv.reader([text], delimiter=self.delimiter, quotechar=self.quote.decode(),
                              escapechar=None if self.escape == self.quote else self.escape.decode(),
                              doublequote=self.escape == self.quote, strict=False))
        if self.key_index >= len(row):
            raise PgError("22P04", f"missing data for column {self.key_index + 1}")
        raw_field = _csv_raw_field(text, self.key_index, self.delimiter, self.quote.decode())
        value = row[self.key_index]
        if raw_field == self.null:  # an unquoted field equal to the NULL string
            return None
        return value


def _csv_raw_field(text: str, index: int, delim: str, quote: str) -> str:
    """The field as written (quotes kept), to tell NULL (unquoted) from an empty quoted string."""
    field_no, i, start, in_q = 0, 0, 0, False
    while i < len(text):
        ch = text[i]
        if ch == quote:
            in_q = not in_q
        elif ch == delim and not in_q:
            if field_no == index:
                return text[start:i]
            field_no += 1
            start = i + 1
        i += 1
    return text[start:] if field_no == index else ""


def binary_key_text(raw: bytes, type_name: str) -> str:
    """The text form of a binary-format value of the distribution column's type."""
    base = type_name.split("(")[0].strip()
    if base in ("bigint", "int8"):
        return str(struct.unpack("!q", raw)[0])
    if base in ("integer", "int4", "int"):
        return str(struct.unpack("!i", raw)[0])
    if base in ("smallint", "int2"):
        return str(struct.unpack("!h", raw)[0])
    if base in ("text", "character varying", "varchar", "name", "character", "bpchar", "char"):
        return raw.decode()
    if base == "uuid":
        return str(uuid.UUID(bytes=raw))
    if base == "date":
        import datetime

        days = struct.unpack("!i", raw)[0]
        if days in (2**31 - 1, -(2**31)):
            return "infinity" if days > 0 else "-infinity"
        return (datetime.date(2000, 1, 1) + datetime.timedelta(days=days)).isoformat()
    if base in ("timestamp with time zone", "timestamptz", "timestamp without time zone", "timestamp"):
        import datetime

        usecs = struct.unpack("!q", raw)[0]
        if usecs in (2**63 - 1, -(2**63)):
            return "infinity" if usecs > 0 else "-infinity"
        text = (datetime.datetime(2000, 1, 1) + datetime.timedelta(microseconds=usecs)).isoformat(sep=" ")
        return text + "+00" if base in ("timestamp with time zone", "timestamptz") else text
    raise PgError("0A000", f"COPY in binary format into a table distributed by {type_name} is not supported", hint="Use text or csv format.")


class BinarySplitter:
    def __init__(self, key_index: int, key_type: str) -> None:
        self.key_index = key_index
        self.key_type = key_type
        self.pending = b""
        self.header_done = False
        self.ended = False

    def feed(self, chunk: bytes) -> list[tuple[bytes, str | None]]:
        data = self.pending + chunk
        pos = 0
        out: list[tuple[bytes, str | None]] = []
        if not self.header_done:
            if len(data) < 19:
                self.pending = data
                return out
            if data[:11] != BINARY_SIGNATURE:
                raise PgError("22P04", "COPY file signature not recognized")
            (ext_len,) = struct.unpack_from("!i", data, 15)
            if len(data) < 19 + ext_len:
                self.pending = data
                return out
            pos = 19 + ext_len
            self.header_done = True
        n = len(data)
        while not self.ended and pos + 2 <= n:
            (nfields,) = struct.unpack_from("!h", data, pos)
            if nfields == -1:
                self.ended = True
                pos += 2
                break
            p = pos + 2
            key: str | None = None
            complete = True
            for f in range(nfields):
                if p + 4 > n:
                    complete = False
                    break
                (ln,) = struct.unpack_from("!i", data, p)
                p += 4
                if ln > 0:
                    if p + ln > n:
                        complete = False
                        break
                    if f == self.key_index:
                        key = binary_key_text(data[p : p + ln], self.key_type)
                    p += ln
                elif ln == 0 and f == self.key_index:
                    key = binary_key_text(b"", self.key_type)
            if not complete:
                break
            out.append((data[pos:p], key))
            pos = p
        self.pending = data[pos:]
        return out

    def finish(self) -> list[tuple[bytes, str | None]]:
        return []


def binary_field(row: bytes, index: int) -> bytes | None:
    """Field ``index`` of one binary COPY tuple (as the splitter returns it); None for NULL."""
    (nfields,) = struct.unpack_from("!h", row, 0)
    if index >= nfields:
        raise PgError("22P04", f"missing data for column {index + 1}")
    p = 2
    for f in range(nfields):
        (ln,) = struct.unpack_from("!i", row, p)
        p += 4
        if f == index:
            return None if ln < 0 else row[p : p + max(ln, 0)]
        p += max(ln, 0)
    return None
