"""The appliance's copy of the fleet's policy: the newest signed snapshot, kept on disk.

`PolicyBook` holds the snapshot in force. `offer` installs a newer one only if the router's
key (pinned at enrollment) signed it and its version is higher than the one in force (no
rollback: a replayed old snapshot cannot bring back a revoked key). The file is replaced
atomically, so a crash leaves either snapshot whole, and a restarted appliance starts from
the newest it accepted. The CRL the snapshot carries goes to `fleet/crl.pem`, and the
reload hooks (the TLS contexts that check peers against it) are called.

Fleet API keys are authenticated from the snapshot: same refusals as the router (401
`invalid_api_key`, 403 `permission_denied`), plus residency against the region this node's
certificate names, which must be in the org's regions ∩ the key's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from federation import (
    FLEET_POLICY_VIA,
    Action,
    AuthenticationError,
    PalisadeError,
    PermissionDeniedError,
    PolicyIndex,
    PolicyRollbackError,
    PolicySnapshot,
    Principal,
    effective_mode,
    replace_private,
    require,
    verify_policy,
)

log = logging.getLogger("palisade.appliance.policy")

POLICY_FILE = Path("fleet") / "policy.json"
CRL_FILE = Path("fleet") / "crl.pem"
CrlHook = Callable[[Path], None]


class PolicyBook:
    """The snapshot in force, its file, and the fleet keys it authenticates."""

    def __init__(
        self,
        home: Path,
        router_public_key: bytes,
        *,
        region: str,
        logging_floor: str = "full",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = home / POLICY_FILE
        self.crl_path = home / CRL_FILE
        self.region = region
        self.logging_floor = logging_floor
        self.crl_hooks: list[CrlHook] = []
        self._key = router_public_key
        self._clock = clock
        self._index: PolicyIndex | None = None
        self._offering = asyncio.Lock()
        self._load()

    @property
    def snapshot(self) -> PolicySnapshot | None:
        return self._index.snapshot if self._index is not None else None

    @property
    def version(self) -> int:
        """The version in force; 0 before the first snapshot."""
        return self._index.snapshot.version if self._index is not None else 0

    def _load(self) -> None:
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            snapshot = verify_policy(self._key, blob)
        except PalisadeError as exc:
            # Not ours to trust (another router's, or damaged): wait for the router's next one.
            log.warning("ignoring %s: %s", self.path, exc)
            return
        self._index = PolicyIndex(snapshot)
        self._write_crl(snapshot)  # in case a crash came between the two files

    def offer(self, blob: bytes) -> PolicySnapshot:
        """Verify and install `blob` if it is newer than the snapshot in force.

        Raises 401 `policy_signature_invalid` or 409 `policy_rollback`; the snapshot in
        force then stays, on disk and in memory. The files are written (and synced) on the
        calling thread: on the event loop, use `offer_async`.
        """
        snapshot = self._newer(blob)
        return self._install(snapshot, self._store(blob, snapshot))

    async def offer_async(self, blob: bytes) -> PolicySnapshot:
        """`offer`, with the disk writes off the event loop (their fsyncs take tens of
        milliseconds here, a stall for every request in flight); one offer at a time."""
        async with self._offering:
            snapshot = self._newer(blob)
            crl_changed = await asyncio.to_thread(self._store, blob, snapshot)
            return self._install(snapshot, crl_changed)

    def _newer(self, blob: bytes) -> PolicySnapshot:
        snapshot = verify_policy(self._key, blob)
        if snapshot.version <= self.version:
            raise PolicyRollbackError(
                f"Refused policy snapshot version {snapshot.version}: version {self.version} "
                "is in force, and snapshots never go back. The snapshot in force is unchanged."
            )
        return snapshot

    def _store(self, blob: bytes, snapshot: PolicySnapshot) -> bool:
        """The snapshot's file, then its CRL's; whether the CRL changed."""
        replace_private(self.path, blob)
        return self._write_crl(snapshot)

    def _install(self, snapshot: PolicySnapshot, crl_changed: bool) -> PolicySnapshot:
        self._index = PolicyIndex(snapshot)
        log.info("policy snapshot version %d in force", snapshot.version)
        if crl_changed:
            for hook in self.crl_hooks:
                try:
                    hook(self.crl_path)
                except Exception:  # a hook's failure must not undo an installed snapshot
                    log.exception("reloading the CRL from %s failed", self.crl_path)
        return snapshot

    def _write_crl(self, snapshot: PolicySnapshot) -> bool:
        if not snapshot.crl_pem:
            return False
        data = snapshot.crl_pem.encode("ascii")
        try:
            if self.crl_path.read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
        replace_private(self.crl_path, data)
        return True

    def principal(self, presented: str) -> Principal:
        """The principal of fleet key `presented`, from the snapshot in force."""
        if self._index is None:
            raise AuthenticationError(
                "Invalid API key: this appliance has no fleet policy yet, so it knows only "
                "its local keys.",
                code="invalid_api_key",
            )
        now = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds")
        caller = self._index.caller(presented, now)
        require(caller.user.role, Action.CALL_INFERENCE, actor_org=caller.user.org, target_org=None)
        regions = frozenset(caller.org.regions)
        if caller.key.regions is not None:
            regions &= frozenset(caller.key.regions)
        if self.region not in regions:
            raise PermissionDeniedError(
                f"This appliance is certified for region `{self.region}`, which is outside the "
                f"regions your key may use ({', '.join(sorted(regions)) or 'none'}).",
                code="residency_violation",
            )
        return Principal(
            org=caller.org.name,
            user=caller.user.id,
            key_id=caller.key.key_id,
            regions=regions,
            role=caller.user.role,
            logging_mode=effective_mode(caller.org.logging_mode, self.logging_floor),
            via=FLEET_POLICY_VIA,
        )
