"""Discovery on the local network with python-zeroconf (mDNS and DNS-SD).

Appliances and the router advertise `_palisade._tcp.local.`; the TXT record says who
claims to be there: `role` (node or router), `fleet`, `node` (the node or router id),
`region`, `fp` (a node's certificate fingerprint; the router's CA fingerprint) and `url`
(a node's API URL; the router's fleet URL). The router browses and lists nodes it has
seen but not enrolled; an appliance without a router URL finds the router of its fleet.

Discovery never grants trust: anyone on the network can advertise anything. A discovered
router is only an address to try: enrollment checks the CA against the fingerprint the
token (or the operator) pinned, and every later hop is mutual TLS against that CA. A
discovered node is only a row to show an admin until it enrolls with a token.

Zeroconf runs only on the IPv4 interfaces listed in the `[discovery]` config
(`127.0.0.1` by default), never on all interfaces: that would announce the fleet on every
network the machine is attached to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import zeroconf
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from federation._private.discovery_config import (
    DEFAULT_INTERFACES,
    DiscoveryConfig,
    check_interface,
)
from federation._private.tasks import cancel_and_wait
from federation._private.vocabulary import FLEET_ROLES, FleetRole

log = logging.getLogger("palisade.discovery")

SERVICE_TYPE = "_palisade._tcp.local."
# How long other machines cache the records: a process that dies without saying goodbye
# (SIGKILL, power loss) drops out of every browser's list within this time.
RECORD_TTL_S = 120
_RESOLVE_TIMEOUT_MS = 3000
# Announcements kept at most: a flood of fake ones on the link cannot grow memory further.
MAX_SEEN = 1024
_MAX_LABEL = 63  # bytes in one DNS label, the instance name included
_UNSAFE = re.compile(r"[^a-z0-9-]+")
# What a TXT field may hold: anyone on the link can announce anything, and these values end
# up in an operator's terminal (`fleet node list`), so no control characters get through.
_FIELDS = {
    "node": re.compile(r"[a-z0-9][a-z0-9._-]{0,62}"),
    "fleet": re.compile(r"(?:[a-z0-9][a-z0-9._-]{0,62})?"),
    "region": re.compile(r"(?:[a-z0-9][a-z0-9._-]{0,62})?"),
    "fp": re.compile(r"(?:sha256:[0-9a-f]{64})?"),
    "url": re.compile(r"https?://[!-~]{1,240}"),
}


@dataclass(frozen=True)
class Advertisement:
    """What one process announces. Claims only: nothing here is verified."""

    role: FleetRole
    node_id: str  # the router id when role is router
    url: str
    fleet_id: str = ""  # empty while a node has not enrolled
    region: str = ""
    fingerprint: str = ""  # a node's certificate; the router's CA

    def properties(self) -> dict[str, str]:
        return {
            "role": self.role,
            "fleet": self.fleet_id,
            "node": self.node_id,
            "region": self.region,
            "fp": self.fingerprint,
            "url": self.url,
        }

    @classmethod
    def from_properties(cls, properties: Mapping[bytes, bytes | None]) -> Advertisement | None:
        """The advertisement in a TXT record, or None when it is not one of ours."""
        text: dict[str, str] = {}
        for key, value in properties.items():
            try:
                text[key.decode()] = (value or b"").decode()
            except UnicodeDecodeError:
                return None
        role = text.get("role", "")
        if role not in FLEET_ROLES:
            return None
        for name, pattern in _FIELDS.items():
            if not pattern.fullmatch(text.get(name, "")):
                return None
        return cls(
            role="node" if role == "node" else "router",
            node_id=text["node"],
            url=text["url"],
            fleet_id=text.get("fleet", ""),
            region=text.get("region", ""),
            fingerprint=text.get("fp", ""),
        )

    def instance_name(self) -> str:
        """`<role>-<id>-<fleet>`, unique per process in a fleet and within one DNS label."""
        label = _UNSAFE.sub("-", f"{self.role}-{self.node_id}-{self.fleet_id or 'pending'}")
        if len(label) > _MAX_LABEL:
            digest = hashlib.sha256(label.encode()).hexdigest()[:12]
            label = f"{label[: _MAX_LABEL - 13]}-{digest}"
        return label


@dataclass(frozen=True)
class DiscoveredNode:
    """A node seen on the network: what it claims, and for how long."""

    node_id: str
    fleet_id: str
    region: str
    fingerprint: str
    url: str
    age_s: float  # since it was announced, or its record last changed

    def row(self) -> dict[str, Any]:
        """Its row in `GET /admin/v1/fleet/nodes` while it has not enrolled."""
        return {
            "node_id": self.node_id,
            "state": "discovered",
            "region": self.region or None,
            "fleet_id": self.fleet_id or None,
            "fingerprint": self.fingerprint or None,
            "url": self.url,
            "seen_age_s": round(self.age_s, 1),
        }


@dataclass(frozen=True)
class DiscoveredRouter:
    """A router seen on the network whose CA fingerprint is the one asked for."""

    router_id: str
    fleet_id: str
    url: str
    ca_fingerprint: str


@dataclass
class _Seen:
    advertisement: Advertisement
    since: float


class Discovery:
    """One process's zeroconf: what it advertises and the fleet's members it has seen.

    With `fleet_id`, only advertisements of that fleet are kept (and, for nodes, those of
    nodes not enrolled anywhere yet). Start it inside the event loop it will run on.
    """

    def __init__(
        self,
        interfaces: list[str] | tuple[str, ...] = DEFAULT_INTERFACES,
        *,
        fleet_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interfaces = [check_interface(address) for address in interfaces]
        self.fleet_id = fleet_id
        self._clock = clock
        self._zeroconf: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._seen: dict[str, _Seen] = {}
        self._own: set[str] = set()
        self._advertised: AsyncServiceInfo | None = None
        self._resolving: set[asyncio.Task[None]] = set()
        self._warned: set[tuple[str, str]] = set()
        self.passed_over: set[str] = set()  # instance names seen and not kept (other fleets)
        self.overflowed = False  # an announcement was not kept: MAX_SEEN were already
        self.changed = asyncio.Event()

    async def start(self) -> None:
        _require_local(self.interfaces)
        zeroconf = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        try:
            self._browser = AsyncServiceBrowser(
                zeroconf.zeroconf, [SERVICE_TYPE], handlers=[self._on_change]
            )
        except BaseException:
            await zeroconf.async_close()
            raise
        self._zeroconf = zeroconf

    async def stop(self) -> None:
        """Say goodbye (browsers drop this process at once) and close the sockets."""
        resolving = list(self._resolving)
        for task in resolving:
            task.cancel()
        await asyncio.gather(*resolving, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zeroconf is not None:
            await self._zeroconf.async_close()  # unregisters what it advertised
        self._browser = self._zeroconf = None

    async def advertise(self, advertisement: Advertisement) -> None:
        """Announce `advertisement` (replacing what this process announced before).

        Probing for a name conflict takes about a second: callers that must not wait run
        it as a task.
        """
        zeroconf = self._running()
        info = _service_info(advertisement, self.interfaces)
        if self._advertised is not None:
            await zeroconf.async_unregister_service(self._advertised)
        self._own.add(info.name)
        await zeroconf.async_register_service(info, allow_name_change=True)
        self._own.add(info.name)  # the name may have changed to avoid a conflict
        self._seen.pop(info.name, None)
        self._advertised = info
        log.info("advertising %s %s on %s", advertisement.role, info.name, self.interfaces)

    def discovered(self) -> list[DiscoveredNode]:
        """Nodes seen on the network, newest first (enrolled or not: the caller knows)."""
        now = self._clock()
        nodes = [
            DiscoveredNode(
                node_id=ad.node_id,
                fleet_id=ad.fleet_id,
                region=ad.region,
                fingerprint=ad.fingerprint,
                url=ad.url,
                age_s=max(now - seen.since, 0.0),
            )
            for seen in self._seen.values()
            if (ad := seen.advertisement).role == "node"
        ]
        return sorted(nodes, key=lambda node: (node.age_s, node.node_id))

    def routers(self, ca_fingerprint: str | None) -> list[DiscoveredRouter]:
        """Routers of this fleet; with `ca_fingerprint`, only those announcing that CA.

        A router announcing another CA is ignored and logged once: it may be an impostor,
        or the fleet's CA changed and this node must enroll again.
        """
        found = []
        for name, seen in self._seen.items():
            ad = seen.advertisement
            if ad.role != "router":
                continue
            if ca_fingerprint is not None and ad.fingerprint != ca_fingerprint:
                self._warn_once(name, ad.fingerprint, ca_fingerprint)
                continue
            found.append(DiscoveredRouter(ad.node_id, ad.fleet_id, ad.url, ad.fingerprint))
        return found

    def _warn_once(self, name: str, announced: str, pinned: str) -> None:
        if (name, announced) in self._warned or len(self._warned) >= MAX_SEEN:
            return
        self._warned.add((name, announced))
        log.warning(
            "ignoring router %s: it announces CA %s, not the pinned %s (discovery never "
            "grants trust)",
            name,
            announced or "(none)",
            pinned,
        )

    # --- browsing ---------------------------------------------------------------------------

    def _running(self) -> AsyncZeroconf:
        if self._zeroconf is None:
            raise RuntimeError("Discovery.start() has not run")
        return self._zeroconf

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            if self._seen.pop(name, None) is not None:
                self.changed.set()
            return
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._resolving.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, _RESOLVE_TIMEOUT_MS):
            return
        advertisement = Advertisement.from_properties(info.properties)
        if advertisement is None or not self._wanted(name, advertisement):
            self._seen.pop(name, None)
            if len(self.passed_over) < MAX_SEEN:
                self.passed_over.add(name)
            return
        before = self._seen.get(name)
        if before is None and len(self._seen) >= MAX_SEEN:
            self._warn_full()
            return
        if before is None or before.advertisement != advertisement:
            self._seen[name] = _Seen(advertisement, self._clock())
            self.changed.set()

    def _warn_full(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        log.warning("discovery keeps %d announcements at most; ignoring further ones", MAX_SEEN)

    def _wanted(self, name: str, advertisement: Advertisement) -> bool:
        if name in self._own:
            return False
        if self.fleet_id is None or advertisement.fleet_id == self.fleet_id:
            return True
        return advertisement.role == "node" and not advertisement.fleet_id  # not enrolled yet


def _require_local(addresses: list[str]) -> None:
    """Refuse an address that no interface of this machine has, before zeroconf sees it
    (its constructor then fails with a socket left open)."""
    for address in addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError as exc:
                raise OSError(
                    exc.errno, f"{address} is not an address of this machine ({exc.strerror})"
                ) from None


def _service_info(advertisement: Advertisement, interfaces: list[str]) -> AsyncServiceInfo:
    url = urlsplit(advertisement.url)
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses = [socket.inet_aton(address) for address in _addresses(url.hostname, interfaces)]
    instance = advertisement.instance_name()
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        properties=advertisement.properties(),
        addresses=addresses,
        server=f"{instance}.local.",
        host_ttl=RECORD_TTL_S,
        other_ttl=RECORD_TTL_S,
    )


def _addresses(host: str | None, interfaces: list[str]) -> list[str]:
    """The URL's own IPv4 address when it has one; else those of the interfaces announced on."""
    with contextlib.suppress(ValueError):
        address = ipaddress.IPv4Address(host or "")
        if not address.is_unspecified:
            return [str(address)]
    return interfaces


class FleetPresence:
    """A server's part in discovery, as its `[discovery]` config says: none when disabled.

    Discovery is a convenience, never a dependency: when zeroconf cannot start or announce
    (no multicast on the interface, a name taken), the process logs it and serves on.
    """

    def __init__(self, config: DiscoveryConfig) -> None:
        self.config = config
        self._discovery: Discovery | None = None
        self._announcing: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._discovery is not None

    async def start(self, advertisement: Advertisement) -> None:
        """Browse for this fleet and announce `advertisement` (in the background: the probe
        for a name conflict takes about a second)."""
        if not self.config.enabled:
            return
        discovery = Discovery(self.config.interfaces, fleet_id=advertisement.fleet_id or None)
        try:
            await discovery.start()
        except (OSError, zeroconf.Error) as exc:
            log.warning(
                "discovery is off: zeroconf cannot start on %s (%s)", discovery.interfaces, exc
            )
            return
        self._discovery = discovery
        self._announcing = asyncio.create_task(self._announce(discovery, advertisement))

    async def _announce(self, discovery: Discovery, advertisement: Advertisement) -> None:
        try:
            await discovery.advertise(advertisement)
        except (OSError, zeroconf.Error) as exc:
            log.warning(
                "cannot announce %s on %s (%s)", advertisement.node_id, discovery.interfaces, exc
            )

    async def announced(self) -> None:
        """Wait until the announcement went out (or failed)."""
        if self._announcing is not None:
            await asyncio.shield(self._announcing)

    def discovered(self) -> list[DiscoveredNode]:
        return [] if self._discovery is None else self._discovery.discovered()

    def routers(self, ca_fingerprint: str | None) -> list[DiscoveredRouter]:
        return [] if self._discovery is None else self._discovery.routers(ca_fingerprint)

    async def stop(self) -> None:
        await cancel_and_wait(self._announcing)
        if self._discovery is not None:
            await self._discovery.stop()
        self._discovery = self._announcing = None


async def discover_router(
    fleet_id: str,
    timeout_s: float,
    *,
    ca_fingerprint: str | None,
    interfaces: list[str] | tuple[str, ...] = DEFAULT_INTERFACES,
) -> DiscoveredRouter | None:
    """The first router of `fleet_id` announcing `ca_fingerprint`, or None after `timeout_s`.

    What it returns is an address to try, not a router to trust: the caller still checks
    the router's certificate against the pinned CA.
    """
    discovery = Discovery(interfaces, fleet_id=fleet_id)
    await discovery.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not (found := discovery.routers(ca_fingerprint)):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            discovery.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(discovery.changed.wait(), left)
        return found[0]
    finally:
        await discovery.stop()


def find_router(
    fleet_id: str,
    timeout: float,
    *,
    ca_fingerprint: str | None = None,
    interfaces: list[str] | tuple[str, ...] = DEFAULT_INTERFACES,
) -> DiscoveredRouter | None:
    """`discover_router` for code without an event loop (the `palisade node` CLI)."""
    return asyncio.run(
        discover_router(fleet_id, timeout, ca_fingerprint=ca_fingerprint, interfaces=interfaces)
    )
