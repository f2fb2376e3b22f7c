"""Keeping the appliance's policy snapshot current: a long poll to the router.

`PolicySync` asks the router's fleet URL, over the node's mTLS client, for a snapshot newer
than the one in force (`GET /federation/v1/policy?after=<version>&wait_s=25`). The router
answers at once when it has one, or holds the request until it does (then answers at once),
or answers 204 after 25 s; either way the next poll follows immediately. A change therefore
reaches the node in about one round trip. A heartbeat reply that names a newer version
(`HeartbeatReply.policy_version`) cuts short the pause after a failed poll.

A fleet member (a connection presenting a fleet certificate) may also offer a snapshot
(`POST /federation/v1/policy`); it is still the router's signature and a higher version that
make it count, not who delivers it. Strangers get 401: the endpoint is not theirs to probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import httpx
from litestar import MediaType, Request, Response, post
from litestar.handlers import HTTPRouteHandler

from appliance._private.errors import RouterRefusedError
from appliance._private.fleet_policy_book import PolicyBook
from federation import (
    ENCODER,
    FLEET_ROLES,
    AuthenticationError,
    HeartbeatReply,
    NodeCredentials,
    PalisadeError,
    PolicyRollbackError,
    cancel_and_wait,
    peer_identity,
    read_body,
)

log = logging.getLogger("palisade.appliance.policy")

POLICY_PATH = "/federation/v1/policy"
LONG_POLL_S = 25.0
_RETRY_S = 1.0
# Beyond the long poll itself: the router's answer, once it has one, is quick.
_ANSWER_S = 10.0


class FleetLink(Protocol):
    """The node's channel to the router (`Membership`): its mTLS client and fleet URL."""

    fleet_url: str
    fleet_client: httpx.AsyncClient
    on_reply: list[Callable[[HeartbeatReply], None]]


class PolicySync:
    """The task that long-polls the router for newer snapshots and offers them to the book."""

    def __init__(
        self,
        book: PolicyBook,
        membership: FleetLink,
        *,
        long_poll_s: float = LONG_POLL_S,
        retry_s: float = _RETRY_S,
    ) -> None:
        self.book = book
        self._membership = membership
        self._long_poll_s = long_poll_s
        self._retry_s = retry_s
        self._newer = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing: str | None = None

    async def start(self) -> None:
        self._membership.on_reply.append(self.heard)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def heard(self, reply: HeartbeatReply) -> None:
        """A heartbeat reply: the router says which version it publishes."""
        if reply.policy_version > self.book.version:
            self._newer.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
                self._note(None)
                continue
            except (httpx.HTTPError, PalisadeError) as exc:
                self._note(str(exc) or type(exc).__name__)
            self._newer.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._newer.wait(), self._retry_s)

    async def poll(self) -> None:
        """One long poll: offer the router's answer, if newer than the snapshot in force."""
        client = self._membership.fleet_client
        response = await client.get(
            f"{self._membership.fleet_url}{POLICY_PATH}",
            params={"after": self.book.version, "wait_s": self._long_poll_s},
            timeout=httpx.Timeout(self._long_poll_s + _ANSWER_S, connect=2.0),
        )
        if response.status_code == 204:
            return
        if response.status_code != 200:
            raise RouterRefusedError(f"HTTP {response.status_code}: {response.text[:300]}")
        with contextlib.suppress(PolicyRollbackError):  # an offer delivered it first
            await self.book.offer_async(response.content)

    def _note(self, failure: str | None) -> None:
        """Log changes only: an outage is one warning, not one per retry."""
        if failure == self._failing:
            return
        if failure is None:
            log.info("following the router's policy snapshots again")
        elif self._failing is None:
            log.warning(
                "cannot fetch policy snapshots (%s); version %d stays in force, retrying",
                failure,
                self.book.version,
            )
        self._failing = failure


def policy_book_for(credentials: NodeCredentials, *, logging_floor: str) -> PolicyBook | None:
    """The book of an enrolled node: the router key pinned at enrollment, the certified
    region. None for a node that is not enrolled (it has no fleet keys)."""
    state = credentials.state
    if not credentials.enrolled or state is None or state.router_public_key is None:
        return None
    return PolicyBook(
        credentials.home,
        bytes.fromhex(state.router_public_key),
        region=credentials.identity().region or state.region,
        logging_floor=logging_floor,
    )


def policy_offer_routes(book: PolicyBook) -> list[HTTPRouteHandler]:
    @post(POLICY_PATH, status_code=200)
    async def offer(request: Request[Any, Any, Any]) -> Response[Any]:
        peer = peer_identity(request)
        if peer is None or peer.role not in FLEET_ROLES:  # a monitor only scrapes
            raise AuthenticationError(
                "Only fleet members offer policy snapshots: present a node or router certificate.",
                code="client_certificate_required",
            )
        snapshot = await book.offer_async(await read_body(request))
        body = ENCODER.encode({"version": snapshot.version})
        return Response(body, media_type=MediaType.JSON)

    return [offer]
