"""Membership in a fleet: register with the router and send it a heartbeat every second.

The heartbeat (federation's `Heartbeat`) carries what the router selects by: models with
their declared device class, queue depth, in-flight generations, EWMA TTFT and TPOT, and
`BOOT_ID`, which tells the router when the node has restarted. The router's reply carries
its public key, which verifies the principal assertions it attaches to the requests it
forwards. Both are signed with the fleet join secret; the key is kept in `router.pub` so
that a restarted appliance accepts forwarded requests at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import httpx

from appliance._private.errors import RouterRefusedError
from federation import (
    ENCODER,
    REPLY_DECODER,
    SIGNATURE_HEADER,
    AssertionVerifier,
    Heartbeat,
    PalisadeError,
    sign_fleet_message,
    verify_fleet_message,
    write_private,
)

log = logging.getLogger("palisade.appliance.membership")

ROUTER_KEY_FILE = "router.pub"
_DEFAULT_INTERVAL_S = 1.0
# This process's incarnation, sent with every heartbeat: the router counts a node id that
# comes back with another one as a restart, and shows a node that keeps restarting.
BOOT_ID = os.urandom(8).hex()


class Membership:
    """The appliance's side of the fleet protocol."""

    def __init__(
        self,
        router_url: str,
        secret: bytes,
        *,
        home: Path,
        node_id: str,
        snapshot: Callable[[], Heartbeat],
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self._secret = secret
        self._home = home
        self._node_id = node_id
        self._snapshot = snapshot
        self.verifier: AssertionVerifier | None = self._cached_verifier()
        self.interval_s = _DEFAULT_INTERVAL_S
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._reachable: bool | None = None
        self._nudged = asyncio.Event()

    def _cached_verifier(self) -> AssertionVerifier | None:
        path = self._home / ROUTER_KEY_FILE
        try:
            return AssertionVerifier(bytes.fromhex(path.read_text().strip()), self._node_id)
        except (OSError, ValueError):
            return None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(2.0))
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
                self._note_reachable(True, "")
            except (httpx.HTTPError, PalisadeError) as exc:
                self._note_reachable(False, str(exc) or type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), self.interval_s)
            self._nudged.clear()

    def nudge(self) -> None:
        """Send the next heartbeat now (a model became ready: the router should know)."""
        self._nudged.set()

    def _note_reachable(self, reachable: bool, reason: str) -> None:
        """Log changes only: a router outage is one warning, not one per second."""
        if reachable == self._reachable:
            return
        self._reachable = reachable
        if reachable:
            log.info("registered with router %s", self.router_url)
        else:
            log.warning(
                "cannot reach router %s (%s); serving local keys and retrying every %.0f s",
                self.router_url,
                reason,
                self.interval_s,
            )

    async def beat(self) -> None:
        assert self._client is not None
        body = ENCODER.encode(self._snapshot())
        response = await self._client.post(
            f"{self.router_url}/federation/v1/heartbeat",
            content=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign_fleet_message(self._secret, body),
            },
        )
        if response.status_code != 200:
            raise RouterRefusedError(f"HTTP {response.status_code}: {response.text[:300]}")
        verify_fleet_message(self._secret, response.content, response.headers.get(SIGNATURE_HEADER))
        reply = REPLY_DECODER.decode(response.content)
        self.interval_s = reply.interval_s
        key = bytes.fromhex(reply.router_public_key)
        if self.verifier is None or self.verifier.public_key != key:
            if self.verifier is not None:
                log.warning("router %s presented a new signing key; trusting it", reply.router_id)
            self.verifier = AssertionVerifier(key, self._node_id)
            write_private(self._home / ROUTER_KEY_FILE, key.hex() + "\n")
