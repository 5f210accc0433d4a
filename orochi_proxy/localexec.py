"""Admin SQL functions the proxy answers itself (Citus/TimescaleDB names and argument order).

Each function declares its parameters (name, type, default) and its result columns, so the
proxy can bind positional and named arguments exactly as PostgreSQL would, describe the result
for the extended protocol, and encode values in text or binary. Implementations act on the
catalog and the nodes; they are async and run as a blocking local answer of the session.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from executor import protocol as pg
from executor.protocol import PgError
from orochi_proxy.callstmt import ProcedureCall
from rewriter.intercept import AdminCall, Const, DimensionArg, Param

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer

# Type OIDs used by admin functions.
BOOL, INT8, INT2, INT4, TEXT, VOID, REGCLASS, NAME, UNKNOWN, VARCHAR = 16, 20, 21, 23, 25, 2278, 2205, 19, 705, 1043
RECORD, INTERVAL, TIMESTAMPTZ, JSONB = 2249, 1186, 1184, 3802
_TYPE_NAMES = {BOOL: "boolean", INT8: "bigint", INT4: "integer", TEXT: "text", VOID: "void", REGCLASS: "regclass"}

Impl = Callable[..., Awaitable[list[tuple[Any, ...]]]]  # (server, args[, session])


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type_oid: int
    default: Any = ...  # Ellipsis: required


@dataclass(frozen=True)
class AdminFunction:
    name: str
    params: tuple[ParamSpec, ...]
    columns: tuple[tuple[str, int], ...]  # result columns; a single scalar result uses the call's column name
    impl: Impl
    scalar: bool = True
    doc: str = ""
    needs_session: bool = False  # impl takes the calling session as a third argument
    procedure: bool = False  # called with CALL (orochi_proxy.callstmt), answers no rows
    # The result columns depend on the call (an overloaded function such as create_hypertable).
    columns_for: Callable[[AdminCall], tuple[tuple[str, int], ...]] | None = None

    def result_columns(self, call: AdminCall) -> tuple[tuple[str, int], ...]:
        return self.columns_for(call) if self.columns_for is not None else self.columns


@dataclass
class AdminRegistry:
    functions: dict[str, AdminFunction] = field(default_factory=dict)

    def register(self, fn: AdminFunction) -> None:
        self.functions[fn.name] = fn

    def get(self, name: str) -> AdminFunction:
        try:
            return self.functions[name]
        except KeyError:
            raise PgError("42883", f"function {name} does not exist") from None


REGISTRY = AdminRegistry()


def admin_function(
    name: str,
    params: list[ParamSpec],
    columns: list[tuple[str, int]],
    *,
    scalar: bool = True,
    needs_session: bool = False,
    procedure: bool = False,
    columns_for: Callable[[AdminCall], tuple[tuple[str, int], ...]] | None = None,
) -> Callable[[Impl], Impl]:
    """Decorator: register ``impl`` as the admin SQL function ``name``.

    A scalar function with several result columns returns a composite (TimescaleDB's
    ``create_hypertable``): ``SELECT fn()`` gives one ``record`` column, ``SELECT * FROM fn()``
    its columns.
    """

    def deco(impl: Impl) -> Impl:
        REGISTRY.register(
            AdminFunction(
                name, tuple(params), tuple(columns), impl, scalar, impl.__doc__ or "", needs_session,
                columns_for=columns_for, procedure=procedure,
            )
        )
        return impl

    return deco


# ------------------------------------------------------------------------------ binding
def _bind_params(fn: AdminFunction, call: AdminCall) -> dict[str, Arg]:
    """Match positional and named arguments to parameters, as PostgreSQL resolves a call."""
    if fn.procedure != isinstance(call, ProcedureCall):
        raise _wrong_call_kind(fn)
    if len(call.args) > len(fn.params):
        raise _no_such_function(fn, call)
    bound: dict[str, Arg] = {}
    for spec, arg in zip(fn.params, call.args, strict=False):
        bound[spec.name] = arg
    names = {p.name for p in fn.params}
    for name, arg in call.named:
        if name not in names or name in bound:
            raise _no_such_function(fn, call)
        bound[name] = arg
    for spec in fn.params:
        if spec.name not in bound and spec.default is ...:
            raise _no_such_function(fn, call)
    return bound


Arg = Const | Param


def _no_such_function(fn: AdminFunction, call: AdminCall) -> PgError:
    sig = ", ".join(f"{p.name} {_TYPE_NAMES.get(p.type_oid, 'text')}" + ("" if p.default is ... else " DEFAULT ...") for p in fn.params)
    return PgError(
        "42883",
        f"function {call.function} with {len(call.args) + len(call.named)} argument(s) as given does not exist",
        hint=f"The signature is {fn.name}({sig}).",
    )


def _wrong_call_kind(fn: AdminFunction) -> PgError:
    """PostgreSQL's 42809 for SELECT of a procedure or CALL of a function."""
    types = ", ".join(_TYPE_NAMES.get(p.type_oid, "text") for p in fn.params if p.default is ...)
    if fn.procedure:
        return PgError("42809", f"{fn.name}({types}) is a procedure", hint="To call a procedure, use CALL.")
    return PgError("42809", f"{fn.name}({types}) is not a procedure", hint="To call a function, use SELECT.")


def param_types(call: AdminCall, client_oids: list[int]) -> list[int]:
    """Types of $1..$n for ParameterDescription: the client's, else the parameter's declared type."""
    fn = REGISTRY.get(call.function)
    n = max(call.max_param, len(client_oids))
    oids = [client_oids[i] if i < len(client_oids) else 0 for i in range(n)]
    bound = _bind_params(fn, call)
    for spec in fn.params:
        arg = bound.get(spec.name)
        if isinstance(arg, Param) and oids[arg.number - 1] == 0:
            oids[arg.number - 1] = spec.type_oid
    return [o or TEXT for o in oids]


def result_fields(call: AdminCall, bind: pg.BindMsg | None) -> list[pg.Field]:
    fn = REGISTRY.get(call.function)
    if isinstance(call, ProcedureCall):
        return []  # a procedure without output parameters
    columns = fn.result_columns(call)
    if fn.scalar and len(columns) > 1:
        cols = list(columns) if call.expand else [(call.column, RECORD)]
    elif fn.scalar:
        cols = [(call.column, columns[0][1])]
    else:
        cols = list(columns)
    out = []
    for i, (name, oid) in enumerate(cols):
        fmt = bind.result_format(i) if bind is not None else 0
        size = {BOOL: 1, INT8: 8, INT4: 4, INT2: 2, VOID: 4}.get(oid, -1)
        out.append(pg.Field(name, oid, size, -1, fmt))
    return out


def describe(call: AdminCall, bind: pg.BindMsg | None) -> bytes:
    fields = result_fields(call, bind)
    return pg.row_description(fields) if fields else pg.NO_DATA


# ------------------------------------------------------------------------------ values
def _decode_param(raw: bytes | None, fmt: int, oid: int) -> str | None:
    if raw is None:
        return None
    if fmt == 0:
        return raw.decode()
    if oid in (INT2, INT4, INT8) and len(raw) in (2, 4, 8):
        # By width: run_admin knows the declared type, not the one the client bound (psycopg
        # binds a small int as int2 for an integer parameter).
        return str(struct.unpack({2: "!h", 4: "!i", 8: "!q"}[len(raw)], raw)[0])
    if oid == BOOL:
        return "true" if raw != b"\x00" else "false"
    if oid in (TEXT, VARCHAR, NAME, UNKNOWN):
        return raw.decode()
    raise PgError("0A000", f"binary format for parameter type {oid} is not supported by admin functions")


def _convert(value: str | None, spec: ParamSpec, fn: AdminFunction) -> Any:
    if value is None:
        return None
    try:
        if spec.type_oid in (INT4, INT8, INT2):
            return int(value)
        if spec.type_oid == BOOL:
            v = value.strip().lower()
            if v in ("t", "true", "yes", "on", "1", "y"):
                return True
            if v in ("f", "false", "no", "off", "0", "n"):
                return False
            raise ValueError(value)
    except ValueError:
        raise PgError(
            "22P02",
            f'invalid input syntax for type {_TYPE_NAMES.get(spec.type_oid, "text")}: "{value}"',
            hint=f"argument {spec.name} of {fn.name}()",
        ) from None
    return value


@dataclass(frozen=True)
class _Composite:
    """A row value of a composite result (``SELECT create_hypertable(...)``)."""

    values: tuple[Any, ...]
    types: list[int]

    def text(self) -> bytes:
        parts = []
        for v, oid in zip(self.values, self.types, strict=False):
            raw = _encode(v, oid, 0)
            if raw is None:
                parts.append(b"")
            elif raw == b"" or any(c in raw for c in b'(),"\\ '):
                parts.append(b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'""') + b'"')
            else:
                parts.append(raw)
        return b"(" + b",".join(parts) + b")"

    def binary(self) -> bytes:
        out = [struct.pack("!i", len(self.values))]
        for v, oid in zip(self.values, self.types, strict=False):
            raw = _encode(v, oid, 1)
            out.append(struct.pack("!I", oid))
            out.append(struct.pack("!i", -1) if raw is None else struct.pack("!i", len(raw)) + raw)
        return b"".join(out)


@dataclass(frozen=True)
class WireValue:
    """A value in both wire formats as PostgreSQL produced them (its output and send functions).

    For result types whose binary form the proxy does not build itself (interval, timestamptz,
    jsonb): the implementation selects ``x::text`` and ``encode(typsend(x), 'hex')``.
    """

    text: bytes
    binary: bytes


def _encode(value: Any, oid: int, fmt: int) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, WireValue):
        return value.binary if fmt == 1 else value.text
    if isinstance(value, _Composite):
        return value.binary() if fmt == 1 else value.text()
    if oid == VOID:
        return b""
    if fmt == 1:
        if oid == INT4:
            return struct.pack("!i", value)
        if oid == INT8:
            return struct.pack("!q", value)
        if oid == BOOL:
            return b"\x01" if value else b"\x00"
        return str(value).encode()
    if oid == BOOL:
        return b"t" if value else b"f"
    return str(value).encode()


async def run_admin(
    server: ProxyServer, call: AdminCall, bind: pg.BindMsg | None, *, simple: bool, session: Any = None
) -> bytes:
    """Run ``call`` and return RowDescription (simple protocol only), DataRows and CommandComplete."""
    fn = REGISTRY.get(call.function)
    bound = _bind_params(fn, call)
    kwargs: dict[str, Any] = {}
    oids = param_types(call, []) if bind is not None else []
    for spec in fn.params:
        arg = bound.get(spec.name)
        if arg is None:
            kwargs[spec.name] = spec.default
            continue
        if isinstance(arg, DimensionArg):
            kwargs[spec.name] = arg
            continue
        if isinstance(arg, Const):
            text = arg.value
        else:
            if bind is None or arg.number > len(bind.params):
                raise PgError("42P02", f"there is no parameter ${arg.number}")
            i = arg.number - 1
            text = _decode_param(bind.params[i], bind.param_format(i), oids[i])
        kwargs[spec.name] = _convert(text, spec, fn)
    from orochi_proxy.catalog import CatalogError

    try:
        rows = await (fn.impl(server, kwargs, session) if fn.needs_session else fn.impl(server, kwargs))
    except CatalogError as exc:
        # The catalog words its errors for SQL clients and carries a SQLSTATE (42704 unknown
        # node, 22023 bad address...); without this they reached the client as XX000.
        raise PgError(exc.sqlstate, exc.message) from None
    if isinstance(call, ProcedureCall):
        return pg.command_complete("CALL")
    fields = result_fields(call, bind)
    if fields and fields[0].type_oid == RECORD and len(fields) == 1:
        types = [oid for _, oid in fn.result_columns(call)]
        rows = [(_Composite(row, types),) for row in rows]
    out: list[bytes] = []
    if simple:
        out.append(pg.row_description(fields))
    for row in rows:
        out.append(pg.data_row([_encode(v, f.type_oid, f.format) for v, f in zip(row, fields, strict=False)]))
    out.append(pg.command_complete(f"SELECT {len(rows)}"))
    return b"".join(out)


# ------------------------------------------------------------------------------ node admin
@admin_function(
    "citus_add_node",
    [
        ParamSpec("nodename", TEXT),
        ParamSpec("nodeport", INT4),
        ParamSpec("groupid", INT4, -1),
        ParamSpec("noderole", TEXT, "primary"),
        ParamSpec("nodecluster", TEXT, "default"),
    ],
    [("citus_add_node", INT4)],
)
async def citus_add_node(server: ProxyServer, a: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Register a node (host, port); returns its node id. Adding a known node returns its id."""
    if a["nodename"] is None or a["nodeport"] is None:
        raise PgError("22004", "nodename and nodeport must not be NULL")
    if a["noderole"] not in ("primary", None):
        raise PgError("0A000", "only primary nodes are supported", hint="Omit noderole.")
    node_id = await server.add_node(a["nodename"], a["nodeport"])
    return [(node_id,)]


@admin_function(
    "citus_remove_node",
    [ParamSpec("nodename", TEXT), ParamSpec("nodeport", INT4)],
    [("citus_remove_node", VOID)],
)
async def citus_remove_node(server: ProxyServer, a: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Remove a node that holds no shards from the cluster."""
    if a["nodename"] is None or a["nodeport"] is None:
        raise PgError("22004", "nodename and nodeport must not be NULL")
    await server.remove_node(a["nodename"], a["nodeport"])
    return [("",)]


@admin_function("orochi_catalog_version", [], [("orochi_catalog_version", INT8)])
async def orochi_catalog_version(server: ProxyServer, a: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The catalog version this proxy process has loaded (changes propagate by LISTEN/NOTIFY)."""
    return [(server.catalog.version,)]


@admin_function("recover_prepared_transactions", [], [("recover_prepared_transactions", INT4)])
async def recover_prepared_transactions(server: ProxyServer, a: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Resolve orphaned two-phase transactions now; returns how many were committed or rolled back."""
    from orochi_proxy.recovery import recover

    return [(await recover(server),)]


ADMIN_VIEWS = ("citus_nodes", "pg_dist_node", "citus_tables", "citus_shards")
