"""Membership in a fleet: register with the router and send it a heartbeat every second.

The heartbeat (federation's `Heartbeat`) carries what the router selects by: models with
their declared device class, queue depth, in-flight generations, EWMA TTFT and TPOT, and
`BOOT_ID`, which tells the router when the node has restarted. The router's reply carries
its public key, which verifies the principal assertions it attaches to the requests it
forwards; the key is kept in `router.pub` so that a restarted appliance accepts forwarded
requests at once.

An enrolled node talks to the router's fleet URL over mTLS (`fleet_client`): it presents
its node certificate and checks the router's against the pinned fleet CA and the router
id's DNS name, so the router knows who is speaking and the node knows whom it speaks to.
When less than a third of its certificate's lifetime is left it asks for a fresh one
(`/federation/v1/renew`, same key) and presents that from the next connection on. Under
the lab switch (`PALISADE_LAB_JOIN_SECRET`, see `federation.join`) an unenrolled node
talks plain HTTP instead, each heartbeat and reply signed with the shared secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec

from appliance._private.errors import RouterRefusedError
from federation import (
    ENCODER,
    REPLY_DECODER,
    SIGNATURE_HEADER,
    AssertionVerifier,
    EnrollResponse,
    Heartbeat,
    HeartbeatReply,
    NodeCredentials,
    NodeIdentity,
    PalisadeError,
    RenewRequest,
    cancel_and_wait,
    client_context,
    identity_of,
    load_pem_certificate,
    make_csr,
    raw_public_key,
    router_dns_name,
    sign_fleet_message,
    verify_fleet_message,
    write_private,
)

log = logging.getLogger("palisade.appliance.membership")

ROUTER_KEY_FILE = "router.pub"
_DEFAULT_INTERVAL_S = 1.0
# A failed renewal is tried again this much later (the old certificate is still valid).
_RENEW_RETRY_S = 60.0
# This process's incarnation, sent with every heartbeat: the router counts a node id that
# comes back with another one as a restart, and shows a node that keeps restarting.
BOOT_ID = os.urandom(8).hex()
_ENROLL_REPLY = msgspec.json.Decoder(EnrollResponse)


class _RouterNameTransport(httpx.AsyncHTTPTransport):
    """Every request checks the router's certificate against the router id's fleet DNS
    name, whatever address the fleet URL names (httpx takes the TLS name per request)."""

    def __init__(self, tls: ssl.SSLContext, router_name: str) -> None:
        super().__init__(verify=tls)
        self._router_name = router_name

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions["sni_hostname"] = self._router_name
        return await super().handle_async_request(request)


class Membership:
    """The appliance's side of the fleet protocol."""

    def __init__(
        self,
        router_url: str,
        *,
        home: Path,
        node_id: str,
        snapshot: Callable[[], Heartbeat],
        credentials: NodeCredentials | None = None,
        lab_secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (credentials is None) == (lab_secret is None):
            raise ValueError("a membership uses the node's credentials or the lab secret")
        self.fleet_url = router_url.rstrip("/")
        self._home = home
        self._node_id = node_id
        self._snapshot = snapshot
        self._credentials = credentials
        self._lab_secret = lab_secret
        self._clock = clock
        self.verifier: AssertionVerifier | None = self._pinned_verifier()
        self.interval_s = _DEFAULT_INTERVAL_S
        # Called after a renewal, once the new certificate is on disk (the server presents it).
        self.on_renewed: list[Callable[[], None]] = []
        # Called with every heartbeat reply (the policy sync learns the published version).
        self.on_reply: list[Callable[[HeartbeatReply], None]] = []
        self.tls: ssl.SSLContext | None = None
        self.fleet_client = self._make_client()
        self._renew_after = self._renewal_time()
        self._task: asyncio.Task[None] | None = None
        self._reachable: bool | None = None
        self._nudged = asyncio.Event()

    @property
    def router_url(self) -> str:
        return self.fleet_url

    @property
    def joined(self) -> bool:
        """Whether the router accepted the last heartbeat."""
        return self._reachable is True

    def _make_client(self) -> httpx.AsyncClient:
        timeout = httpx.Timeout(2.0)
        credentials = self._credentials
        if credentials is None:
            return httpx.AsyncClient(timeout=timeout)
        state = credentials.state
        router_id = state.router_id if state is not None else None
        if router_id is None:
            raise PalisadeError(
                f"{credentials.home / 'node.toml'} names no router; enroll the node again."
            )
        crl = credentials.crl_path if credentials.crl_path.exists() else None
        self.tls = client_context(
            credentials.ca_path, credentials.cert_path, credentials.key_path, crl
        )
        transport = _RouterNameTransport(self.tls, router_dns_name(router_id))
        return httpx.AsyncClient(timeout=timeout, transport=transport)

    def _pinned_verifier(self) -> AssertionVerifier | None:
        """The router key pinned at enrollment, else the one the last reply carried."""
        state = self._credentials.state if self._credentials is not None else None
        text = state.router_public_key if state is not None else None
        if text is None:
            try:
                text = (self._home / ROUTER_KEY_FILE).read_text().strip()
            except OSError:
                return None
        try:
            return AssertionVerifier(bytes.fromhex(text), self._node_id)
        except ValueError:
            return None

    def reload_crl(self) -> None:
        """The newest `fleet/crl.pem` for the router's certificate, from the next handshake."""
        if self.tls is not None and self._credentials is not None:
            self.tls.load_verify_locations(cafile=os.fspath(self._credentials.crl_path))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self.fleet_client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.beat()
                self._note_reachable(True, "")
                if self._renew_after is not None and self._clock() >= self._renew_after:
                    await self._renew_quietly()
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
            log.info("registered with router %s", self.fleet_url)
        else:
            log.warning(
                "cannot reach router %s (%s); serving local keys and retrying every %.0f s",
                self.fleet_url,
                reason,
                self.interval_s,
            )

    async def beat(self) -> None:
        body = ENCODER.encode(self._snapshot())
        headers = {"Content-Type": "application/json"}
        if self._lab_secret is not None:
            headers[SIGNATURE_HEADER] = sign_fleet_message(self._lab_secret, body)
        response = await self.fleet_client.post(
            f"{self.fleet_url}/federation/v1/heartbeat", content=body, headers=headers
        )
        if response.status_code != 200:
            raise RouterRefusedError(f"HTTP {response.status_code}: {response.text[:300]}")
        if self._lab_secret is not None:
            signature = response.headers.get(SIGNATURE_HEADER)
            verify_fleet_message(self._lab_secret, response.content, signature)
        reply = REPLY_DECODER.decode(response.content)
        self.interval_s = reply.interval_s
        for hook in self.on_reply:
            hook(reply)
        key = bytes.fromhex(reply.router_public_key)
        if self.verifier is None or self.verifier.public_key != key:
            if self.verifier is not None:
                log.warning("router %s presented a new signing key; trusting it", reply.router_id)
            self.verifier = AssertionVerifier(key, self._node_id)
            write_private(self._home / ROUTER_KEY_FILE, key.hex() + "\n")

    # --- certificate renewal --------------------------------------------------------------

    def _renewal_time(self) -> float | None:
        """When a third of the certificate's lifetime is left (None: nothing to renew)."""
        if self._credentials is None:
            return None
        cert = self._credentials.certificate()
        start = cert.not_valid_before_utc.timestamp()
        end = cert.not_valid_after_utc.timestamp()
        return end - (end - start) / 3

    async def _renew_quietly(self) -> None:
        try:
            await self.renew()
        except (httpx.HTTPError, PalisadeError, ValueError) as exc:
            self._renew_after = self._clock() + _RENEW_RETRY_S
            log.warning(
                "certificate renewal failed (%s); the current certificate stays in use, "
                "retrying in %.0f s",
                exc,
                _RENEW_RETRY_S,
            )

    async def renew(self) -> None:
        """A fresh certificate for the same key from the router; presented from the next
        connection on (this client's and the node's server's)."""
        credentials = self._credentials
        if credentials is None or self.tls is None:
            return
        identity = NodeIdentity.load_or_create(credentials.home)
        hosts = credentials.state.hosts if credentials.state is not None else []
        csr = make_csr(identity, self._node_id, hosts).decode("ascii")
        response = await self.fleet_client.post(
            f"{self.fleet_url}/federation/v1/renew",
            content=ENCODER.encode(RenewRequest(csr=csr)),
            headers={"Content-Type": "application/json"},
        )
        if response.status_code != 200:
            raise RouterRefusedError(f"HTTP {response.status_code}: {response.text[:300]}")
        reply = _ENROLL_REPLY.decode(response.content)
        cert = load_pem_certificate(reply.certificate.encode("ascii"))
        renewed, current = identity_of(cert), credentials.identity()
        if raw_public_key(cert) != identity.public_key or (renewed.node_id, renewed.region) != (
            current.node_id,
            current.region,
        ):
            raise RouterRefusedError(
                "the renewed certificate is not for this node's key, id and region; kept "
                "the current one"
            )
        write_private(credentials.cert_path, reply.certificate)
        self.tls.load_cert_chain(credentials.cert_path, credentials.key_path)
        for renewed_hook in self.on_renewed:
            renewed_hook()
        self._renew_after = self._renewal_time()
        log.info(
            "certificate renewed: serial %x, valid until %s",
            renewed.serial,
            cert.not_valid_after_utc,
        )
