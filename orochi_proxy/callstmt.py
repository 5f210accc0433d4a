"""``CALL`` of admin procedures (TimescaleDB's ``CALL run_job(1000)``).

TimescaleDB defines some of its API as procedures (``run_job``, ``refresh_continuous_aggregate``),
so clients write ``CALL``. The interceptor in ``rewriter`` recognises admin functions in
``SELECT`` only; :class:`CallInterceptor` adds ``CALL``: a ``CALL`` naming an admin function is
analysed as the equivalent ``SELECT`` (the same argument binding, constants and ``$n``) and
reported as a :class:`ProcedureCall`, which ``localexec`` answers the way PostgreSQL answers a
procedure without output parameters: no row description (``NoData`` to Describe) and the
command tag ``CALL``. Whether the function is a procedure is ``localexec``'s business (PostgreSQL's
42809 for ``CALL`` of a function or ``SELECT`` of a procedure).

The ``SELECT`` is built by deparsing the call (pglast), which costs a parse per ``CALL`` of an
admin procedure; such statements are rare and never on the data path.
"""

from __future__ import annotations

from dataclasses import dataclass

from pglast import ast
from pglast.stream import RawStream

from rewriter.intercept import AdminCall, Distributed, Interceptor, Passthrough


@dataclass(frozen=True, slots=True)
class ProcedureCall(AdminCall):
    """An admin function called with ``CALL``."""


class CallInterceptor(Interceptor):
    """The rewriter's interceptor, plus ``CALL`` of admin functions."""

    def _analyze_one(self, raw: ast.RawStmt, text: str) -> Passthrough | AdminCall | Distributed:
        stmt = raw.stmt
        if isinstance(stmt, ast.CallStmt) and stmt.funccall is not None:
            names = [n.sval for n in stmt.funccall.funcname]
            if names[-1] in self.functions and (len(names) == 1 or names[0] == "pg_catalog"):
                select = RawStream()(ast.SelectStmt(targetList=(ast.ResTarget(val=stmt.funccall),)))
                (call,) = self.analyze(select)
                if isinstance(call, AdminCall):
                    return ProcedureCall(call.function, call.args, call.named, call.function, False)
        return super()._analyze_one(raw, text)
