"""Fleet membership and health: who is up, who is ejected, and who gets the next request.

A node is **down** when it has missed `missed_beats_down` heartbeats. Each node also has a
circuit: consecutive failures (requests that failed before their first byte, or `/readyz`
probes) open it, which **ejects** the node; once the cooldown has passed, one half-open
probe decides: success closes the circuit, failure re-opens it for twice as long. A node
that went down comes back through the same half-open probe, so a node that resumes after a
pause (SIGSTOP, a network partition) proves itself before it takes traffic again, and so
does a node that restarted (its heartbeat carries a new boot id). A node that restarts
`_CRASH_LOOP_RESTARTS` times within `_CRASH_LOOP_WINDOW_S` is crash-looping: each further
restart holds it out for longer (the circuit's back-off) before its probe.

Routers sharing a store share membership (shared_members.py): a heartbeat another router
heard is fed in with `heard_elsewhere`, as if received when that router got it, so a node
heartbeating to one router is up on all of them; the policy of what such a beat changes is
here, the database I/O there.

Selection (`Fleet.pick`): residency filter (fail closed) → the most preferred device class
that has a healthy candidate → power of two choices on expected latency, EWMA TTFT times (1
+ in-flight + queue). Time comes from an injected monotonic clock.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from federation import (
    FleetNode,
    FleetStatus,
    Heartbeat,
    NodeModel,
    PeerIdentity,
    device_label,
)
from router._private.config import HealthConfig

log = logging.getLogger("palisade.router")

Circuit = Literal["closed", "open", "half_open"]
# A node not chosen for this long is scored with the fleet's typical TTFT instead of its own
# last figure, so one slow spell does not starve it forever.
_STALE_S = 10.0
_MIN_TTFT_MS = 0.1
_CRASH_LOOP_WINDOW_S = 300.0
_CRASH_LOOP_RESTARTS = 3


@dataclass(eq=False)
class Node:
    """One appliance as the router sees it."""

    id: str
    region: str
    url: str
    version: str
    models: dict[str, NodeModel]
    last_beat: float
    in_flight: int = 0
    consecutive_failures: int = 0
    circuit: Circuit = "closed"
    open_until: float = 0.0
    cooldown: float = 0.0
    last_chosen: float = 0.0
    down: bool = False
    boot_id: str = ""
    # The serial of the certificate it last heartbeat with (0 under the lab join secret).
    serial: int = 0
    restarts: int = 0
    # The heartbeat sequence its figures are from (a shared one applies only when newer).
    sequence: int = 0
    # The outage the node reported (unix s) and is still reconciling (the offline edge).
    offline_since: float | None = None
    # When the recent restarts were seen (within the crash-loop window).
    recent_restarts: list[float] = field(default_factory=list)
    # Requests still waiting for this node's answer: cancelled (and retried elsewhere,
    # once) the moment the node is declared down or is seen to have restarted.
    waiting: set[asyncio.Future[Any]] = field(default_factory=set)
    # Streams being relayed from this node: cut (with an error frame) when it goes down.
    streams: set[asyncio.Future[Any]] = field(default_factory=set)

    def device(self, model: str) -> str:
        """`X-Palisade-Device` for `model` here: its class, and what runs it when reported."""
        served = self.models.get(model)
        if served is None:
            return "cpu"
        return device_label(served.device_class, served.accelerator)

    def abandon_waiting(self) -> None:
        for waiter in list(self.waiting):
            waiter.cancel()

    def abandon_streams(self) -> None:
        for stream in list(self.streams):
            stream.cancel()


class Fleet:
    """Every registered node, its health, and the selection policy."""

    def __init__(
        self,
        health: HealthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.health = health
        self.nodes: dict[str, Node] = {}
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - load balancing, not cryptography
        self._prior_ttft: dict[str, float] = {}

    # --- membership ---------------------------------------------------------------------

    def beat(self, heartbeat: Heartbeat, identity: PeerIdentity | None = None) -> Node:
        """Register a node or refresh it; a node back from down, or restarted, waits for a
        half-open probe.

        The node's id and region are the certificate's (`identity`; the heartbeat route has
        refused a heartbeat that claims others). None only under the lab join secret, where
        the heartbeat's own claims are all there is.
        """
        now = self._clock()
        region = (
            heartbeat.region if identity is None or identity.region is None else identity.region
        )
        models = {model.id: model for model in heartbeat.models}
        node = self.nodes.get(heartbeat.node_id)
        url = normalised_url(heartbeat.url)
        if node is None:
            node = self._register(heartbeat, models, now, region=region, url=url)
        elif node.boot_id != heartbeat.boot_id or node.url != url:
            node = self._reincarnate(node, heartbeat, models, now, region=region, url=url)
        else:
            node.region, node.version, node.models = region, heartbeat.version, models
            node.last_beat = now
            node.down = False
        if identity is not None:
            node.serial = identity.serial
        node.offline_since = heartbeat.offline_since
        node.sequence = heartbeat.sequence
        self._refresh_prior(models)
        return node

    def heard_elsewhere(self, heartbeat: Heartbeat, *, serial: int, age_s: float) -> Node | None:
        """A heartbeat another router of the fleet heard `age_s` ago (shared membership);
        the node as it is now, or None when the beat told nothing new.

        It counts as if received then, if it is newer than the last beat heard here: a
        node not known here joins, a known one stays up (its figures change only with a
        newer sequence of the same process), a restart or a new URL is seen as one. An
        older beat never brings back a node's previous process, and one older than the
        down limit is ignored (the node is down everywhere by then)."""
        now = self._clock()
        if age_s > self._down_after_s():
            return None
        heard_at = now - max(age_s, 0.0)
        node = self.nodes.get(heartbeat.node_id)
        if node is not None and heard_at <= node.last_beat:
            return None
        if (
            node is not None
            and _same_process(node, heartbeat)
            and heartbeat.sequence <= node.sequence
        ):
            node.last_beat, node.down = heard_at, False
            return node
        node = self.beat(heartbeat)
        node.last_beat, node.serial = heard_at, serial
        return node

    def _down_after_s(self) -> float:
        return self.health.heartbeat_interval_s * self.health.missed_beats_down

    def revoke(self, node_id: str) -> Node | None:
        """Drop a revoked node at once: no new requests, and those waiting on it or streaming
        from it are abandoned (waiting ones retried elsewhere, once) rather than left to a
        node the fleet no longer trusts."""
        node = self.nodes.pop(node_id, None)
        if node is not None:
            node.down = True
            node.abandon_waiting()
            node.abandon_streams()
        return node

    def _register(
        self,
        heartbeat: Heartbeat,
        models: dict[str, NodeModel],
        now: float,
        *,
        region: str,
        url: str,
    ) -> Node:
        node = Node(
            id=heartbeat.node_id,
            region=region,
            url=url,
            version=heartbeat.version,
            models=models,
            last_beat=now,
            cooldown=self.health.eject_base_s,
            last_chosen=now,  # its own figures count until it has gone unchosen a while
            boot_id=heartbeat.boot_id,
        )
        self.nodes[node.id] = node
        return node

    def _reincarnate(
        self,
        old: Node,
        heartbeat: Heartbeat,
        models: dict[str, NodeModel],
        now: float,
        *,
        region: str,
        url: str,
    ) -> Node:
        """A node id back with another URL or boot id: a fresh node that keeps the restart
        history; a restart is held out until a half-open probe passes."""
        # The old process is gone: nothing more will come from requests still waiting on it.
        old.abandon_waiting()
        old.abandon_streams()
        node = self._register(heartbeat, models, now, region=region, url=url)
        node.restarts = old.restarts
        node.recent_restarts = _within(old.recent_restarts, now)
        if old.boot_id and heartbeat.boot_id != old.boot_id:
            node.restarts += 1
            node.recent_restarts.append(now)
            cooldown = self._restart_cooldown(node)
            self._open(node, now, cooldown=cooldown)
            log.warning(
                "node %s (%s) restarted (restart %d; %d within %.0f s)%s",
                node.id,
                node.region,
                node.restarts,
                len(node.recent_restarts),
                _CRASH_LOOP_WINDOW_S,
                f"; crash-looping, held out for {cooldown:g} s" if cooldown else "",
            )
        return node

    def _restart_cooldown(self, node: Node) -> float:
        """0 for an occasional restart (probed at once); growing while it crash-loops."""
        beyond = len(node.recent_restarts) - _CRASH_LOOP_RESTARTS
        if beyond < 0:
            return 0.0
        return min(self.health.eject_base_s * 2.0**beyond, self.health.eject_max_s)

    def crash_looping(self, node: Node) -> bool:
        recent = _within(node.recent_restarts, self._clock())
        return len(recent) >= _CRASH_LOOP_RESTARTS

    def _refresh_prior(self, models: Iterable[str]) -> None:
        for model in models:
            known = [
                served.ttft_ewma_ms
                for node in self.nodes.values()
                if (served := node.models.get(model)) is not None
                and served.ttft_ewma_ms is not None
            ]
            if known:
                self._prior_ttft[model] = statistics.median(known)

    def sweep(self) -> list[Node]:
        """Mark nodes that missed their heartbeats down; returns the newly down ones."""
        now = self._clock()
        limit = self._down_after_s()
        newly_down = []
        for node in self.nodes.values():
            if not node.down and now - node.last_beat > limit:
                node.down = True
                self._open(node, now, cooldown=0.0)
                node.abandon_waiting()
                node.abandon_streams()
                newly_down.append(node)
        return newly_down

    def state(self, node: Node) -> Literal["up", "down", "ejected"]:
        if node.down:
            return "down"
        return "up" if node.circuit == "closed" else "ejected"

    # --- passive and active health --------------------------------------------------------

    def failed(self, node: Node) -> None:
        """A request to `node` failed (refused, reset, timed out, a 502/504 answer, cut
        mid-stream) or a probe did. Ejection stops new requests; those already waiting on
        the node are left to finish or fail on their own (only going down abandons them)."""
        node.consecutive_failures += 1
        now = self._clock()
        if node.circuit == "half_open":
            self._open(node, now, cooldown=min(node.cooldown * 2, self.health.eject_max_s))
        elif (
            node.circuit == "closed"
            and node.consecutive_failures >= self.health.eject_after_failures
        ):
            self._open(node, now, cooldown=self.health.eject_base_s)

    def succeeded(self, node: Node) -> None:
        node.consecutive_failures = 0

    def _open(self, node: Node, now: float, *, cooldown: float) -> None:
        node.circuit = "open"
        node.cooldown = cooldown or self.health.eject_base_s
        node.open_until = now + cooldown

    def probe_due(self, node: Node) -> bool:
        """Whether the prober should check `node` now (half-open when its cooldown is over)."""
        if node.down:
            return False
        if node.circuit == "open":
            if self._clock() < node.open_until:
                return False
            node.circuit = "half_open"
        return True

    def probed(self, node: Node, *, ok: bool) -> None:
        if ok:
            if node.circuit == "half_open":
                node.circuit = "closed"
                node.consecutive_failures = 0
                node.cooldown = self.health.eject_base_s
            return
        self.failed(node)

    # --- selection -------------------------------------------------------------------------

    def serves(self, model: str) -> bool:
        """Whether any node anywhere, healthy or not, declares `model`."""
        return any(model in node.models for node in self.nodes.values())

    def model_ids(self, regions: frozenset[str]) -> list[str]:
        nodes = [node for node in self.nodes.values() if node.region in regions]
        return sorted({model for node in nodes for model in node.models})

    def pick(
        self,
        model: str,
        regions: frozenset[str],
        preference: Sequence[str],
        exclude: Sequence[str] = (),
        *,
        mark: bool = True,
    ) -> Node | None:
        """The node for the next request, or None: never a node outside `regions`.

        `mark=False` only looks (for listings): the node is not counted as chosen.
        """
        now = self._clock()
        by_class: dict[str, list[tuple[Node, NodeModel]]] = {}
        for node in self.nodes.values():
            if node.region not in regions or node.down or node.circuit != "closed":
                continue
            served = node.models.get(model)
            if served is None or not served.ready or node.id in exclude:
                continue
            by_class.setdefault(served.device_class, []).append((node, served))
        group = next((by_class[device] for device in preference if device in by_class), None)
        if group is None:
            return None
        if len(group) == 1:
            chosen = group[0][0]
        else:
            first, second = self._rng.sample(group, 2)
            chosen = min(first, second, key=lambda pair: self._expected(pair, model, now))[0]
        if mark:
            chosen.last_chosen = now
        return chosen

    def device_fallback(
        self, model: str, regions: frozenset[str], preference: Sequence[str], chosen: Node
    ) -> tuple[str, str] | None:
        """(preferred, served) when `chosen` serves `model` on a device class below the most
        preferred one that a node in `regions` declares for it, healthy or not: the better
        pool had no node to take the request (an RDU -> GPU failover)."""
        served = chosen.models[model].device_class
        if not preference or served == preference[0]:
            return None
        declared = {
            node.models[model].device_class
            for node in self.nodes.values()
            if node.region in regions and model in node.models
        }
        best = next((device for device in preference if device in declared), served)
        return None if best == served else (best, served)

    def _expected(self, pair: tuple[Node, NodeModel], model: str, now: float) -> float:
        node, served = pair
        ttft = served.ttft_ewma_ms
        if ttft is None or now - node.last_chosen > _STALE_S:
            ttft = self._prior_ttft.get(model, 1.0)
        return max(ttft, _MIN_TTFT_MS) * (1 + node.in_flight + served.queue_depth)

    # --- the fleet view -----------------------------------------------------------------------

    def status(self, router_id: str) -> FleetStatus:
        now = self._clock()
        rows = [
            FleetNode(
                node_id=node.id,
                region=node.region,
                url=node.url,
                device_classes=sorted({m.device_class for m in node.models.values()}),
                models=sorted(node.models),
                state=self.state(node),
                in_flight=node.in_flight,
                queue_depth=sum(m.queue_depth for m in node.models.values()),
                ttft_p50_ms=_first(m.ttft_p50_ms for m in node.models.values()),
                heartbeat_age_s=round(now - node.last_beat, 3),
                version=node.version,
                consecutive_failures=node.consecutive_failures,
                ready=all(m.ready for m in node.models.values()),
                restarts=node.restarts,
                crash_loop=self.crash_looping(node),
                offline_since=self._offline_since(node, now),
            )
            for node in sorted(self.nodes.values(), key=lambda n: (n.region, n.id))
        ]
        return FleetStatus(router_id=router_id, nodes=rows)

    def _offline_since(self, node: Node, now: float) -> float | None:
        """A down node has been offline (as far as the router knows) since its last beat."""
        if self.state(node) == "down":
            return round(time.time() - (now - node.last_beat), 3)
        return node.offline_since


def normalised_url(url: str) -> str:
    """A node's advertised URL as the router stores and compares it: scheme and host in
    lower case, no trailing slash. (Compared raw, `http://n:8400/` differed from the stored
    `http://n:8400` on every heartbeat, and each one re-registered the node.)"""
    scheme, sep, rest = url.rstrip("/").partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{path}"


def _same_process(node: Node, heartbeat: Heartbeat) -> bool:
    return node.boot_id == heartbeat.boot_id and node.url == normalised_url(heartbeat.url)


def _within(moments: list[float], now: float) -> list[float]:
    return [moment for moment in moments if now - moment <= _CRASH_LOOP_WINDOW_S]


def _first(values: Iterable[float | None]) -> float | None:
    return next((value for value in values if value is not None), None)
