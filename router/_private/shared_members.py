"""Fleet membership shared through the database, for routers sharing one PostgreSQL store.

Every router knows every appliance, so any router can serve any request. Nodes heartbeat
through HAProxy's fleet frontend, so one router hears a given node (whichever HAProxy
passed its connection to). That router writes the node's latest heartbeat into
`fleet_members` (node, heartbeat, heard_by, seen_at by the database's clock, so the
routers' clocks never meet); every router reads the rows others wrote since its last read
about every `SYNC_S` and feeds them into its `Fleet` as if received `age` seconds ago
(`Fleet.heard_elsewhere` holds the policy: what a beat from elsewhere may change). A node
whose heartbeats go to another router stays up here while its row is fresh, and goes down
here when its row ages past the down limit, as it would with heartbeats of its own.

Each router also writes itself into `routers` (id, public URL, seen_at) every
`ROUTER_BEAT_S` and removes itself at stop; `live_routers` lists those seen within
`ROUTER_LIVE_S`, for whatever needs every router (the fleet's audit export).

With each of those beats it also counts the routers seen within `SHARE_LIVE_S` (three
beats), itself included: `routers_sharing`, the share the gate divides each key's rate
limits by (federation/_private/gate.py). A router SIGKILLed stops counting within
`SHARE_LIVE_S` plus a beat, about 2 s; one stopped removes its row, so at once. A router
whose own beats fail keeps its last count.

Routers sharing a fleet directory share its enrollment registry, but each holds its own
copy of the CRL in its TLS contexts and its own fleet: a revocation through one router
must reach the others. So with each sync the router also runs `revocations` (the
router's check of the shared registry for certificates revoked elsewhere: `RouterState`),
and a node revoked through any router is dropped by every router within about `SYNC_S`.

Only the database I/O is here; `RouterState` starts it when the tenancy store is shared.
A failing database is logged once per outage and retried: membership then runs on the
heartbeats this router hears itself, as a lone router would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec

from federation import Database, Heartbeat, StoreError, cancel_and_wait
from router._private.fleet import Fleet, Node

log = logging.getLogger("palisade.router")

SYNC_S = 0.5
ROUTER_BEAT_S = 0.5
SHARE_LIVE_S = 1.5
ROUTER_LIVE_S = 5.0
# Rows are read from a little before the newest one already read: a row whose transaction
# committed after a later one was read is still seen (feeding one twice changes nothing).
_OVERLAP_S = 1.0
# `now` is the database's clock (seconds since the epoch), so the routers' clocks never meet.
_WRITE = """
INSERT INTO fleet_members (node, heartbeat, heard_by, seen_at)
VALUES (?, ?, ?, CAST(extract(epoch from clock_timestamp()) AS DOUBLE PRECISION))
ON CONFLICT (node) DO UPDATE SET
    heartbeat = excluded.heartbeat, heard_by = excluded.heard_by, seen_at = excluded.seen_at
"""
_READ = """
SELECT node, heartbeat, seen_at,
       CAST(extract(epoch from clock_timestamp()) AS DOUBLE PRECISION) - seen_at
FROM fleet_members WHERE seen_at > ? AND heard_by <> ? ORDER BY seen_at
"""
_FORGET = "DELETE FROM fleet_members WHERE node = ?"
_ROUTER = """
INSERT INTO routers (id, public_url, seen_at)
VALUES (?, ?, CAST(extract(epoch from clock_timestamp()) AS DOUBLE PRECISION))
ON CONFLICT (id) DO UPDATE SET public_url = excluded.public_url, seen_at = excluded.seen_at
"""
_LIVE = """
SELECT id, public_url FROM routers
WHERE seen_at > CAST(extract(epoch from clock_timestamp()) AS DOUBLE PRECISION) - ?
ORDER BY id
"""
_SHARING = """
SELECT count(*) FROM routers
WHERE seen_at > CAST(extract(epoch from clock_timestamp()) AS DOUBLE PRECISION) - ?
"""


class SharedBeat(msgspec.Struct, kw_only=True):
    """A `fleet_members.heartbeat`: the heartbeat, and the serial of the certificate it
    came with (the hearing router checked the certificate and the heartbeat's claims)."""

    heartbeat: Heartbeat
    serial: int = 0


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(SharedBeat)


class SharedMembers:
    """Writes the heartbeats this router hears, feeds in those the others heard."""

    def __init__(
        self,
        db: Database,
        fleet: Fleet,
        *,
        router_id: str,
        public_url: Callable[[], str],
        revoked: Callable[[int], bool],
        joined: Callable[[Node], Awaitable[None]],
        revocations: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._db = db
        self._fleet = fleet
        self._router_id = router_id
        self._public_url = public_url
        self._revoked = revoked
        self._joined = joined
        self._revocations = revocations
        self._heard: dict[str, bytes] = {}
        self._forget: set[str] = set()
        self._since = 0.0
        self._failing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._sharing = 1

    def heard(self, heartbeat: Heartbeat, serial: int) -> None:
        """A heartbeat this router received: written at the next sync (the newest only)."""
        self._heard[heartbeat.node_id] = _ENCODER.encode(
            SharedBeat(heartbeat=heartbeat, serial=serial)
        )

    def forget(self, node_id: str) -> None:
        """A revoked node: its row goes at the next sync, so no router feeds it in again."""
        self._heard.pop(node_id, None)
        self._forget.add(node_id)

    async def start(self) -> None:
        await self._attempt(self.announce)  # this router's share before it serves
        self._tasks = [
            asyncio.create_task(self._every(SYNC_S, self.sync)),
            asyncio.create_task(self._every(ROUTER_BEAT_S, self.announce)),
        ]
        if self._revocations is not None:
            self._tasks.append(asyncio.create_task(self._every(SYNC_S, self._revocations)))

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        with contextlib.suppress(StoreError):
            await self.sync()  # the last beats heard, for the routers that stay
            async with self._db.transaction() as tx:
                await tx.execute("DELETE FROM routers WHERE id = ?", (self._router_id,))

    async def sync(self) -> None:
        """Write what this router heard, then feed in what the others heard since."""
        heard, self._heard = self._heard, {}
        forget, self._forget = self._forget, set()
        try:
            await self._write(heard, forget)
        except StoreError:
            for node, beat in heard.items():
                self._heard.setdefault(node, beat)  # kept for the next try, unless newer
            self._forget |= forget
            raise
        rows = await self._db.fetch(_READ, (self._since - _OVERLAP_S, self._router_id))
        for node, blob, seen_at, age_s in rows:
            self._since = max(self._since, float(seen_at))
            await self._feed(node, bytes(blob), float(age_s))

    async def announce(self) -> None:
        """This router is alive; how many are (`routers_sharing`)."""
        async with self._db.transaction() as tx:
            await tx.execute(_ROUTER, (self._router_id, self._public_url()))
            row = await tx.fetchone(_SHARING, (SHARE_LIVE_S,))
        self._sharing = max(1, int(row[0])) if row is not None else 1

    def routers_sharing(self) -> int:
        """Live routers sharing the store, this one included, as of the last beat."""
        return self._sharing

    async def _write(self, heard: dict[str, bytes], forget: set[str]) -> None:
        if not heard and not forget:
            return
        async with self._db.transaction() as tx:
            for node, blob in heard.items():
                await tx.execute(_WRITE, (node, blob, self._router_id))
            for node in forget:
                await tx.execute(_FORGET, (node,))

    async def _feed(self, node_id: str, blob: bytes, age_s: float) -> None:
        try:
            shared = _DECODER.decode(blob)
        except msgspec.DecodeError:
            log.warning("fleet_members holds an unreadable heartbeat of node %s", node_id)
            return
        if self._revoked(shared.serial) or shared.heartbeat.node_id != node_id:
            return
        known = node_id in self._fleet.nodes
        node = self._fleet.heard_elsewhere(shared.heartbeat, serial=shared.serial, age_s=age_s)
        if node is not None and not known:
            await self._joined(node)

    async def _every(self, period_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await self._attempt(step)
            await asyncio.sleep(period_s)

    async def _attempt(self, step: Callable[[], Awaitable[None]]) -> None:
        try:
            await step()
            self._note(ok=True, reason="")
        except StoreError as exc:
            self._note(ok=False, reason=str(exc))

    def _note(self, *, ok: bool, reason: str) -> None:
        """One warning per outage, not one per sync."""
        if ok and self._failing:
            log.info("shared fleet membership: the database answers again")
        elif not ok and not self._failing:
            log.warning(
                "shared fleet membership: %s; serving with the heartbeats this router hears",
                reason,
            )
        self._failing = not ok


async def live_routers(db: Database) -> list[tuple[str, str]]:
    """(id, public URL) of every router of the fleet seen within `ROUTER_LIVE_S`."""
    rows = await db.fetch(_LIVE, (ROUTER_LIVE_S,))
    return [(str(router), str(url)) for router, url in rows]
