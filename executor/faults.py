"""Fault injection at named steps of two-phase commit, for the crash tests (off unless configured).

``OROCHI_FAULT=<step>[#<n>]:<action>`` in the proxy's environment arms one fault:

* steps: ``prepared`` (after one participant's PREPARE TRANSACTION; ``#n`` picks the n-th, default
  1), ``all_prepared`` (every PREPARE done, before the decision), ``decided`` (right after the
  commit point), ``commit_prepared`` (after one participant's COMMIT PREPARED, ``#n`` as above);
  compression steps (orochi_proxy.compressadmin): ``compress_created`` (companion table made),
  ``compress_marked`` (chunk marked warm, rows not moved yet), ``decompress_moved`` (rows back
  in the heap, chunk still warm);
* actions: ``kill`` — the process SIGKILLs itself (a crash: no cleanup, no Python unwinding);
  ``pause=<seconds>`` — the step waits, after touching the file named by ``OROCHI_FAULT_FILE``
  (so a test can stop a node at exactly that moment), then carries on.

Only the first transaction that reaches the step fires it (a counter, not a loop), so a test can
run ordinary statements first. Reading the environment once keeps the hot path to one
``if``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

_SPEC = os.environ.get("OROCHI_FAULT", "")
_FILE = os.environ.get("OROCHI_FAULT_FILE", "")
ARMED = bool(_SPEC)


def _parse(spec: str) -> tuple[str, int, str]:
    where, _, action = spec.partition(":")
    step, _, nth = where.partition("#")
    return step, int(nth or 1), action or "kill"


_step, _nth, _action = _parse(_SPEC) if ARMED else ("", 0, "")
_seen = 0
_fired = False


async def reached(step: str) -> None:
    """Called at ``step``; fires the armed fault the n-th time the step is reached."""
    global _seen, _fired
    if _fired or step != _step:
        return
    _seen += 1
    if _seen < _nth:
        return
    _fired = True
    if _action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if _action.startswith("pause="):
        if _FILE:
            Path(_FILE).write_text(step)
        await asyncio.sleep(float(_action.split("=", 1)[1]))
