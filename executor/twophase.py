"""Two-phase commit across node connections, with a durable decision record.

Protocol (DESIGN.md, Transactions):

1. every participant connection has done its work inside ``BEGIN``;
2. ``PREPARE TRANSACTION '<gid>_<i>'`` on each participant (``_<i>`` keeps gids unique when two
   participants share a node); a failure here rolls back everything — nothing was decided;
3. the decision is recorded in the metadata database (``Decider.decide``): **that commit is the
   commit point**;
4. ``COMMIT PREPARED`` on each participant; one that fails now (node down) is left prepared and
   finished by recovery (``orochi_proxy.recovery``), which commits it because the decision exists;
5. the decision record is deleted when every participant committed (else recovery deletes it).

Gids are ``orochi_<coordinator>_<n>``; ``<coordinator>`` is the proxy process's key, whose
advisory lock the process holds on its decision connection for its lifetime. Recovery in any
replica decides a prepared transaction only after taking that lock, i.e. only once the
coordinator is gone, so it never races a live coordinator between steps 2 and 3.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from executor import faults
from executor.backend import BackendConnection
from executor.protocol import PgError

log = logging.getLogger(__name__)

GID_PREFIX = "orochi_"
_counter = itertools.count(1)


class OutcomeUnknown(PgError):
    """Recording the decision failed in a way that leaves unknown whether it was recorded.

    The participants must then stay prepared: recovery commits them if the record exists and
    rolls them back otherwise. Rolling them back here could contradict a record that did commit.
    """


@dataclass
class Decider:
    """How a coordinator records and forgets decisions (provided by the server)."""

    coordinator: int  # this process's key (its advisory lock is held while it lives)
    decide: Callable[[str, list[int]], Awaitable[None]]  # durable INSERT of the decision
    forget: Callable[[str], Awaitable[None]]  # DELETE once every participant committed
    in_flight: set[str]  # gids this process is committing (recovery leaves them alone)

    def new_gid(self, kind: str = "tx") -> str:
        return f"{GID_PREFIX}{self.coordinator}_{next(_counter)}_{kind}"


def parse_gid(gid: str) -> tuple[int, str] | None:
    """(coordinator key, base gid) of a participant gid ``orochi_<key>_<n>_<kind>_<i>``."""
    if not gid.startswith(GID_PREFIX):
        return None
    parts = gid[len(GID_PREFIX) :].split("_")
    if len(parts) < 4 or not parts[0].isdigit():
        return None
    return int(parts[0]), gid.rsplit("_", 1)[0]


async def commit(
    participants: Sequence[tuple[int, BackendConnection]],
    decider: Decider,
    *,
    kind: str = "tx",
) -> None:
    """Commit the open transactions of ``participants`` (node id, connection) atomically.

    One participant: a plain COMMIT (no prepare, no decision record).
    """
    if not participants:
        return
    if len(participants) == 1:
        await participants[0][1].simple_query("COMMIT")
        return
    gid = decider.new_gid(kind)
    decider.in_flight.add(gid)
    try:
        await _commit(participants, decider, gid)
    finally:
        decider.in_flight.discard(gid)


async def _commit(participants: Sequence[tuple[int, BackendConnection]], decider: Decider, gid: str) -> None:
    prepared: list[tuple[BackendConnection, str]] = []
    try:
        for i, (_node, conn) in enumerate(participants):
            g = f"{gid}_{i}"
            await conn.simple_query(f"PREPARE TRANSACTION '{g}'")
            prepared.append((conn, g))
            if faults.ARMED:
                await faults.reached("prepared")
        if faults.ARMED:
            await faults.reached("all_prepared")
        await decider.decide(gid, [node for node, _ in participants])
        if faults.ARMED:
            await faults.reached("decided")
    except OutcomeUnknown:
        raise  # every participant is prepared; recovery settles them by the record
    except BaseException:
        # Nothing was decided: undo every prepared participant and abort the rest.
        done = {id(c) for c, _ in prepared}
        for conn, g in prepared:
            await _quietly(conn, f"ROLLBACK PREPARED '{g}'")
        for _node, conn in participants:
            if id(conn) not in done and conn.usable and conn.tx_status != b"I":
                await _quietly(conn, "ROLLBACK")
        raise
    unfinished = False
    for conn, g in prepared:
        try:
            await conn.simple_query(f"COMMIT PREPARED '{g}'")
            if faults.ARMED:
                await faults.reached("commit_prepared")
        except (PgError, OSError) as exc:
            # Decided: recovery will commit it. The client's commit stands.
            log.warning("COMMIT PREPARED %s failed (%s); recovery will finish it", g, exc)
            unfinished = True
    if not unfinished:
        try:
            await decider.forget(gid)
        except Exception as exc:  # noqa: BLE001 - recovery removes stale decisions too
            log.info("could not delete decision %s (%s); recovery will", gid, exc)


async def _quietly(conn: BackendConnection, sql: str) -> None:
    if not conn.usable:
        return
    try:
        await conn.simple_query(sql)
    except Exception:  # noqa: BLE001 - best effort while unwinding
        conn.broken = True
