"""The router's side of policy snapshots: build, version, sign and hand them out.

`PolicyPublisher` makes a `PolicySnapshot` from the tenancy (orgs, users, keys, budgets)
and the fleet's revocation list (`fleet/crl.pem`, which the CA rewrites on every
revocation), signs it with the router's identity key, and wakes the appliances waiting in
a long poll. The version goes up only when what the snapshot grants changes (its
`content_digest`), never for a new issue time or budget spent, and it is kept in
`fleet/policy.state` with that digest, so it never goes back across restarts (an appliance
refuses a lower version). A router that lost that file catches up with the highest version
an appliance reports (`catch_up`). Routers sharing a store and a fleet directory number
their snapshots together, under the directory's policy lock
(`_rebuild_with_the_others`): one version, one content, whichever router an appliance asks.

A change is noticed three ways: the tenancy store announces every management change
(`TenancyStore.on_change`), whoever revokes a node certificate may call `changed()`, and a
cheap check every `check_interval_s` compares the store's generation and the CRL file's
size and modification time, in case anything was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from cryptography import x509

from federation import (
    DEFAULT_GRACE_S,
    KeyPolicy,
    NodeIdentity,
    OrgPolicy,
    PolicySnapshot,
    Tenancy,
    UserPolicy,
    content_digest,
    replace_private,
    sign_policy,
)
from router._private.ca import FLEET_DIR

log = logging.getLogger("palisade.router.policy")

# Under the router's home by default; in its fleet directory (`fleet_dir`) in any case.
STATE_FILE = Path(FLEET_DIR) / "policy.state"
CRL_FILE = Path(FLEET_DIR) / "crl.pem"
FLEET_ID_FILE = Path(FLEET_DIR) / "fleet.id"
MAX_WAIT_S = 30.0
_CHECK_INTERVAL_S = 0.25


class PolicyPublisher:
    """The newest signed snapshot, rebuilt when the tenancy or the revocations change."""

    def __init__(
        self,
        tenancy: Tenancy,
        identity: NodeIdentity,
        *,
        home: Path,
        router_id: str,
        fleet_dir: Path | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        check_interval_s: float = _CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tenancy = tenancy
        self._identity = identity
        # The fleet directory: its CRL and fleet id, and the version state its routers share.
        self._fleet_dir = fleet_dir or home / FLEET_DIR
        self._router_id = router_id
        self._grace_s = grace_s
        self._check_interval_s = check_interval_s
        self._clock = clock
        self.version, self._digest = _read_state(self._fleet_dir / STATE_FILE.name)
        self.blob = b""
        self.revoked_serials: frozenset[int] = frozenset()
        self._published = asyncio.Event()
        self._dirty = asyncio.Event()
        self._seen: tuple[int, tuple[int, int] | None] | None = None
        self._task: asyncio.Task[None] | None = None
        # Whether the server is shutting down (`server.should_exit`): long polls then end
        # at once, or the server would wait for them before it stops.
        self.stopping: Callable[[], bool] = lambda: False
        self._released = False
        self._building = asyncio.Lock()
        self._stopped = False

    async def start(self) -> None:
        """Publish the current snapshot, then follow changes (after `Tenancy.start`)."""
        self._tenancy.store.on_change.append(self.changed)
        await self.rebuild()
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        """Stop following changes, once a build under way has finished (cancelling it could
        leave its thread writing `policy.state` after we return)."""
        self._stopped = self._released = True
        self._dirty.set()
        self._published.set()
        if self._task is not None:
            await self._task
        with contextlib.suppress(ValueError, RuntimeError):  # RuntimeError: never started
            self._tenancy.store.on_change.remove(self.changed)

    def changed(self) -> None:
        """Something the snapshot holds may have changed: rebuild it soon."""
        self._dirty.set()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self._check_interval_s)
            if self._stopped:
                return
            if self.stopping() and not self._released:
                self._released = True
                self._published.set()
            if self._dirty.is_set() or self._sources() != self._seen:
                self._dirty.clear()
                await self._tenancy.store.settled()  # the change is committed and in memory
                try:
                    await self.rebuild()
                except Exception:  # keep following: the next change may well succeed
                    log.exception("could not publish a policy snapshot")

    def _sources(self) -> tuple[int, tuple[int, int] | None]:
        try:
            stat = (self._fleet_dir / CRL_FILE.name).stat()
            crl: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            crl = None
        return self._tenancy.store.generation, crl

    async def rebuild(self) -> bool:
        """Build the snapshot; publish it under a new version if it grants anything new.
        Returns whether a new version was published."""
        if self._tenancy.store.shared:
            async with self._building:
                return await self._rebuild_with_the_others()
        async with self._building:
            self._seen = self._sources()
            snapshot = self.build(self.version)
            digest = content_digest(snapshot)
            if digest == self._digest and self.blob:
                return False
            if digest != self._digest:
                snapshot = await self._persist(snapshot, self.version + 1, digest)
            self._publish(snapshot)
            return True

    async def _rebuild_with_the_others(self) -> bool:
        """Routers sharing a store and this fleet directory number snapshots together.

        Each builds while holding the directory's policy lock, after catching up with every
        change committed before it took the lock (`TenancyStore.caught_up`), so a snapshot
        published later never grants from older state than one published before it: a
        higher version never holds older content. Content already on file keeps its version.
        """
        path = self._fleet_dir / STATE_FILE.name
        lock = await asyncio.to_thread(_lock, path.with_name(path.name + ".lock"))
        try:
            await self._tenancy.store.caught_up()
            self._seen = self._sources()
            version, on_file = _read_state(path)
            snapshot = self.build(version)
            # Which router signed it is not what it grants: equal grants, one version.
            digest = content_digest(msgspec.structs.replace(snapshot, router_id=""))
            if digest != on_file:
                snapshot = await self._persist(snapshot, max(version, self.version) + 1, digest)
            elif (version, digest) == (self.version, self._digest) and self.blob:
                return False
            else:
                self.version, self._digest = version, digest
            self._publish(snapshot)
            return True
        finally:
            await asyncio.to_thread(_unlock, lock)

    async def catch_up(self, version: int) -> None:
        """An appliance holds `version`, above ours (this router lost `policy.state`):
        publish the same content above it, or the appliance would refuse every snapshot."""
        if version <= self.version:
            return
        async with self._building:
            if version <= self.version:
                return
            log.warning(
                "an appliance holds policy version %d, above this router's %d; continuing from it",
                version,
                self.version,
            )
            snapshot = self.build(version)
            digest = content_digest(snapshot)
            self._publish(await self._persist(snapshot, version + 1, digest))

    async def _persist(self, snapshot: PolicySnapshot, version: int, digest: str) -> PolicySnapshot:
        """On disk before anyone sees it, so a restart never reuses a version for new
        content; written and synced off the event loop (tens of milliseconds here)."""
        state = json.dumps({"version": version, "digest": digest}).encode()
        await asyncio.to_thread(replace_private, self._fleet_dir / STATE_FILE.name, state)
        self.version, self._digest = version, digest
        return msgspec.structs.replace(snapshot, version=version)

    def _publish(self, snapshot: PolicySnapshot) -> None:
        self.blob = sign_policy(self._identity, snapshot)
        self.revoked_serials = frozenset(snapshot.revoked_serials)
        log.info("published policy snapshot version %d", snapshot.version)
        self._published.set()
        self._published = asyncio.Event()

    async def wait_newer(self, after: int, wait_s: float) -> bytes | None:
        """The signed snapshot once its version is above `after`, or None after `wait_s`."""
        deadline = asyncio.get_running_loop().time() + min(wait_s, MAX_WAIT_S)
        while self.version <= after and not self._released:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._published.wait(), remaining)
        return self.blob if self.version > after else None

    def build(self, version: int) -> PolicySnapshot:
        store, gate = self._tenancy.store, self._tenancy.gate
        orgs = []
        for record in sorted(store.orgs.values(), key=lambda org: org.name):
            month, used, _ = gate.budget_state(record.name)
            orgs.append(
                OrgPolicy(
                    name=record.name,
                    regions=sorted(record.regions),
                    logging_mode=record.logging_mode,
                    budget_tokens=record.budget_tokens,
                    key_limits=record.key_limits,
                    month=month,
                    used_tokens=used,
                )
            )
        users = {
            user.id: UserPolicy(id=user.id, email=user.email, role=user.role, org=user.org)
            for user in store.users.values()
            if user.removed_at is None
        }
        keys = [
            KeyPolicy(
                key_id=key.id,
                secret_hash=key.secret_hash.hex(),
                org=key.org,
                user=key.user_id,
                role=users[key.user_id].role if key.user_id in users else "",
                regions=sorted(key.regions) if key.regions is not None else None,
                limits=key.limits,
                expires_at=key.expires_at,
                revoked=key.revoked_at is not None or key.user_id not in users,
            )
            for key in sorted(store.keys.values(), key=lambda key: key.id)
        ]
        crl_pem = _read_text(self._fleet_dir / CRL_FILE.name)
        return PolicySnapshot(
            version=version,
            issued_at=self._clock(),
            fleet_id=_read_text(self._fleet_dir / FLEET_ID_FILE.name).strip(),
            router_id=self._router_id,
            orgs=orgs,
            keys=keys,
            users=sorted(users.values(), key=lambda user: user.id),
            revoked_serials=_revoked_serials(crl_pem),
            crl_pem=crl_pem,
            grace_s=self._grace_s,
        )


def _revoked_serials(crl_pem: str) -> list[int]:
    if not crl_pem:
        return []
    try:
        crl = x509.load_pem_x509_crl(crl_pem.encode("ascii"))
    except ValueError:
        log.exception("the fleet CRL is not readable; publishing no revoked serials")
        return []
    return sorted(revoked.serial_number for revoked in crl)


def _lock(path: Path) -> int:
    """Hold `path`'s exclusive lock (made 0600 if missing); blocks until it is free."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_text(path: Path) -> str:
    try:
        return path.read_text("ascii")
    except FileNotFoundError:
        return ""


def _read_state(path: Path) -> tuple[int, str]:
    """The last published version and content digest (0 and "" before the first)."""
    try:
        state = json.loads(path.read_text())
        return int(state["version"]), str(state["digest"])
    except FileNotFoundError:
        return 0, ""
    except (ValueError, KeyError, TypeError) as exc:
        # Appliances report the version they hold in their long polls (`catch_up`).
        log.warning("%s is damaged (%s); starting again from version 0", path, exc)
        return 0, ""
