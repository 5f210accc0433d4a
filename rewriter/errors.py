"""The error type every layer raises: a PostgreSQL error that becomes an ErrorResponse.

It lives in ``rewriter`` because the rewriter is the innermost package (it imports no other
project package); the executor and server import it from here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


def parse_error_fields(payload: bytes | memoryview) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body: code letter -> text."""
    data = bytes(payload)
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        code = chr(data[pos])
        end = data.find(b"\x00", pos + 1)
        if end < 0:
            break
        fields[code] = data[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


@dataclass(slots=True)
class PgError(Exception):
    """An error to be sent to the client as ErrorResponse (or raised from a backend's one)."""

    sqlstate: str
    message: str
    severity: str = "ERROR"
    detail: str | None = None
    hint: str | None = None
    fields: dict[str, str] | None = None  # all fields when it came from a backend

    def __str__(self) -> str:
        return f"{self.severity} {self.sqlstate}: {self.message}"

    def as_fields(self) -> dict[str, str]:
        if self.fields:
            return self.fields
        f = {"S": self.severity, "V": self.severity, "C": self.sqlstate, "M": self.message}
        if self.detail:
            f["D"] = self.detail
        if self.hint:
            f["H"] = self.hint
        return f

    def to_message(self) -> bytes:
        """The ErrorResponse ('E') message bytes."""
        body = b"".join(k.encode() + v.encode() + b"\x00" for k, v in self.as_fields().items()) + b"\x00"
        return b"E" + struct.pack("!i", len(body) + 4) + body

    @classmethod
    def from_payload(cls, payload: bytes | memoryview) -> PgError:
        """Parse the body of a backend's ErrorResponse."""
        f = parse_error_fields(payload)
        return cls(
            sqlstate=f.get("C", "XX000"),
            message=f.get("M", ""),
            severity=f.get("V", f.get("S", "ERROR")),
            detail=f.get("D"),
            hint=f.get("H"),
            fields=f,
        )
