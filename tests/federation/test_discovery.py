"""Discovery with real python-zeroconf instances on 127.0.0.1 (multicast on loopback, IPv4).

Every test makes its own fleet id, so parallel runs on this machine do not see each other's
advertisements. Nothing here is mocked: each `Discovery` opens its own zeroconf sockets, and
what one announces reaches the others through the kernel's loopback multicast.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import msgspec
import pytest

from federation import (
    Advertisement,
    ConfigError,
    DiscoveredNode,
    DiscoveredRouter,
    Discovery,
    DiscoveryConfig,
    FleetPresence,
    convert_config,
    discover_router,
    find_router,
)
from federation._private import discovery as discovery_module

T = TypeVar("T")
CA = "sha256:" + "ab" * 32
OTHER_CA = "sha256:" + "cd" * 32
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - refused by the config, never bound
# Announcing takes about 1.2 s (three probes for a name conflict, then the announcement);
# finding an announced service takes milliseconds. The deadline leaves room for a busy box.
DEADLINE_S = 10.0


# What a timeout most likely means on another machine: these tests need multicast on lo.
NO_MULTICAST = (
    "if nothing is ever found, multicast on 127.0.0.1 does not work here (a firewall "
    "dropping 224.0.0.251:5353, or lo down in a network namespace: `ip link set lo up`)"
)


def new_fleet() -> str:
    return f"fleet-{os.urandom(4).hex()}"


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


async def until(condition: Callable[[], T | None], within_s: float = DEADLINE_S) -> T:
    """Poll `condition` on the event loop (zeroconf answers on it) until it holds."""
    deadline = time.monotonic() + within_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within_s}s; {NO_MULTICAST}")
        await asyncio.sleep(0.02)
    return result


def node_ad(fleet: str, node: str = "edge-1", **fields: str) -> Advertisement:
    return Advertisement(
        role="node",
        node_id=node,
        url=fields.get("url", "https://127.0.0.1:8401"),
        fleet_id=fleet,
        region=fields.get("region", "eu-west"),
        fingerprint=fields.get("fingerprint", "sha256:" + "11" * 32),
    )


def router_ad(fleet: str, fingerprint: str, router: str = "router") -> Advertisement:
    return Advertisement(
        role="router",
        node_id=router,
        url="https://127.0.0.1:8301",
        fleet_id=fleet,
        fingerprint=fingerprint,
    )


async def started(fleet_id: str | None, clock: Callable[[], float] = time.monotonic) -> Discovery:
    discovery = Discovery(["127.0.0.1"], fleet_id=fleet_id, clock=clock)
    await discovery.start()
    return discovery


def seen(browser: Discovery, node_id: str) -> DiscoveredNode | None:
    return next((node for node in browser.discovered() if node.node_id == node_id), None)


def test_a_browser_finds_an_advertised_node_with_its_txt_record() -> None:
    fleet = new_fleet()
    now = [1000.0]

    async def scenario() -> tuple[DiscoveredNode, float, float]:
        node, browser = await started(None), await started(fleet, clock=lambda: now[0])
        try:
            began = time.monotonic()
            await node.advertise(node_ad(fleet))
            found = await until(lambda: seen(browser, "edge-1"))
            took = time.monotonic() - began
            now[0] += 42.0
            aged = seen(browser, "edge-1")
            assert aged is not None
            return found, aged.age_s, took
        finally:
            await node.stop()
            await browser.stop()

    found, age, took = run(scenario)
    assert found == DiscoveredNode(
        node_id="edge-1",
        fleet_id=fleet,
        region="eu-west",
        fingerprint="sha256:" + "11" * 32,
        url="https://127.0.0.1:8401",
        age_s=0.0,
    )
    assert age == 42.0
    assert took < DEADLINE_S
    assert found.row()["state"] == "discovered"


def test_nodes_of_another_fleet_are_not_listed_and_pending_nodes_are() -> None:
    fleet, other = new_fleet(), new_fleet()

    async def scenario() -> list[str]:
        ours, theirs, pending = await started(None), await started(None), await started(None)
        browser = await started(fleet)
        try:
            await asyncio.gather(
                ours.advertise(node_ad(fleet, "edge-ours")),
                theirs.advertise(node_ad(other, "edge-theirs")),
                pending.advertise(node_ad("", f"edge-new-{fleet}", fingerprint="", region="")),
            )
            await until(lambda: seen(browser, "edge-ours") and seen(browser, f"edge-new-{fleet}"))
            theirs_name = node_ad(other, "edge-theirs").instance_name()
            await until(lambda: any(name.startswith(theirs_name) for name in browser.passed_over))
            return [node.node_id for node in browser.discovered()]
        finally:
            for discovery in (ours, theirs, pending, browser):
                await discovery.stop()

    listed = run(scenario)
    assert "edge-ours" in listed
    assert f"edge-new-{fleet}" in listed
    assert "edge-theirs" not in listed


def test_stopping_an_advertiser_removes_it_from_the_browser() -> None:
    fleet = new_fleet()

    async def scenario() -> bool:
        node, browser = await started(None), await started(fleet)
        try:
            await node.advertise(node_ad(fleet))
            await until(lambda: seen(browser, "edge-1"))
            await node.stop()  # says goodbye: the records go with a TTL of 0
            await until(lambda: seen(browser, "edge-1") is None)
            return True
        finally:
            await browser.stop()

    assert run(scenario)


def test_a_changed_txt_record_replaces_what_was_seen() -> None:
    fleet = new_fleet()

    async def scenario() -> DiscoveredNode:
        node, browser = await started(None), await started(fleet)
        try:
            await node.advertise(node_ad(fleet, url="https://127.0.0.1:9001"))
            await until(lambda: seen(browser, "edge-1"))
            await node.advertise(node_ad(fleet, url="https://127.0.0.1:9002"))

            def moved() -> DiscoveredNode | None:
                found = seen(browser, "edge-1")
                return found if found is not None and found.url.endswith(":9002") else None

            return await until(moved)
        finally:
            await node.stop()
            await browser.stop()

    assert run(scenario).url == "https://127.0.0.1:9002"


def test_find_router_ignores_a_router_announcing_another_ca(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Discovery never grants trust: an impostor announcing the fleet id is passed over."""
    fleet = new_fleet()
    caplog.set_level(logging.WARNING, logger="palisade.discovery")

    async def scenario() -> tuple[DiscoveredRouter | None, DiscoveredRouter | None]:
        impostor = await started(None)
        try:
            await impostor.advertise(router_ad(fleet, OTHER_CA, router="impostor"))
            alone = await discover_router(fleet, 2.0, ca_fingerprint=CA)
            genuine = await started(None)
            try:
                await genuine.advertise(router_ad(fleet, CA))
                return alone, await discover_router(fleet, DEADLINE_S, ca_fingerprint=CA)
            finally:
                await genuine.stop()
        finally:
            await impostor.stop()

    alone, found = run(scenario)
    assert alone is None
    assert found == DiscoveredRouter(
        router_id="router", fleet_id=fleet, url="https://127.0.0.1:8301", ca_fingerprint=CA
    )
    warnings = [r.getMessage() for r in caplog.records if "ignoring router" in r.getMessage()]
    assert warnings
    assert OTHER_CA in warnings[0]
    assert "never grants trust" in warnings[0]


def test_find_router_from_code_without_an_event_loop() -> None:
    """The `palisade node enroll --discover` path: a blocking call while a router announces."""
    fleet = new_fleet()
    announced = asyncio.Event()
    done = asyncio.Event()

    async def router() -> None:
        discovery = await started(None)
        try:
            await discovery.advertise(router_ad(fleet, CA))
            announced.set()
            await done.wait()
        finally:
            await discovery.stop()

    async def scenario() -> DiscoveredRouter | None:
        task = asyncio.create_task(router())
        await until(announced.is_set)
        try:
            # find_router runs its own event loop: give it a thread, as the CLI has one.
            return await asyncio.to_thread(find_router, fleet, DEADLINE_S, ca_fingerprint=CA)
        finally:
            done.set()
            await task

    found = run(scenario)
    assert found is not None
    assert found.fleet_id == fleet
    assert found.ca_fingerprint == CA


def test_a_process_does_not_list_its_own_advertisement() -> None:
    fleet = new_fleet()

    async def scenario() -> list[DiscoveredNode]:
        both, watcher = await started(fleet), await started(fleet)
        try:
            await both.advertise(node_ad(fleet))
            await until(lambda: seen(watcher, "edge-1"))  # it is on the network
            return both.discovered()
        finally:
            await both.stop()
            await watcher.stop()

    assert run(scenario) == []


def test_a_router_presence_lists_nodes_and_a_node_presence_finds_the_router() -> None:
    """Both sides as the servers run them: each announces itself and browses its fleet."""
    fleet = new_fleet()
    config = DiscoveryConfig(enabled=True)

    async def scenario() -> tuple[list[str], list[DiscoveredRouter]]:
        router, node = FleetPresence(config), FleetPresence(config)
        try:
            await router.start(router_ad(fleet, CA))
            await node.start(node_ad(fleet))
            await until(lambda: router.discovered() and node.routers(CA))
            # Nodes not enrolled anywhere yet (other tests' too) are listed as well.
            ours = [n.node_id for n in router.discovered() if n.fleet_id == fleet]
            return ours, node.routers(CA)
        finally:
            await router.stop()
            await node.stop()

    nodes, routers = run(scenario)
    assert nodes == ["edge-1"]
    assert [r.router_id for r in routers] == ["router"]


def test_a_presence_that_cannot_start_zeroconf_logs_it_and_lets_the_server_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """203.0.113.9 (TEST-NET-3) is no interface of this machine: discovery is a convenience,
    so the server starts without it."""
    caplog.set_level(logging.WARNING, logger="palisade.discovery")

    async def scenario() -> tuple[bool, list[DiscoveredNode]]:
        presence = FleetPresence(DiscoveryConfig(enabled=True, interfaces=["203.0.113.9"]))
        await presence.start(node_ad(new_fleet()))
        await presence.announced()
        running, seen = presence.running, presence.discovered()
        await presence.stop()
        return running, seen

    assert run(scenario) == (False, [])
    assert any("discovery is off" in r.getMessage() for r in caplog.records)


def test_a_disabled_presence_opens_nothing_and_lists_nothing() -> None:
    async def scenario() -> tuple[bool, list[DiscoveredNode]]:
        presence = FleetPresence(DiscoveryConfig())
        await presence.start(node_ad(new_fleet()))
        await presence.announced()
        running = presence.running
        await presence.stop()
        return running, presence.discovered()

    assert run(scenario) == (False, [])


def test_a_flood_of_announcements_is_kept_to_a_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone on the link can announce: the browser keeps `MAX_SEEN` at most (2 here)."""
    monkeypatch.setattr(discovery_module, "MAX_SEEN", 2)
    caplog.set_level(logging.WARNING, logger="palisade.discovery")
    fleet = new_fleet()

    async def scenario() -> list[DiscoveredNode]:
        flood = [await started(None) for _ in range(3)]
        browser = await started(fleet)
        try:
            await asyncio.gather(
                *(ad.advertise(node_ad(fleet, f"edge-{i}")) for i, ad in enumerate(flood))
            )
            await until(lambda: browser.overflowed)  # the third was seen, and not kept
            return browser.discovered()
        finally:
            for discovery in (*flood, browser):
                await discovery.stop()

    kept = run(scenario)
    assert len(kept) == 2
    assert {node.node_id for node in kept} < {"edge-0", "edge-1", "edge-2"}
    assert any("announcements at most" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "properties",
    [
        {b"role": b"printer", b"node": b"n", b"url": b"http://x"},
        {b"role": b"node", b"node": b"", b"url": b"http://x"},
        {b"role": b"node", b"node": b"n", b"url": b"ftp://x"},
        {b"role": b"node", b"node": b"\xff\xfe", b"url": b"http://x"},
        {b"node": b"n", b"url": b"http://x"},
        {b"role": b"node", b"node": b"n\x1b[2J", b"url": b"http://x"},
        {b"role": b"node", b"node": b"n", b"url": b"http://x\x1b[31m"},
        {b"role": b"node", b"node": b"n", b"url": b"http://x", b"fp": b"sha256:zz"},
        {b"role": b"node", b"node": b"n", b"url": b"http://x", b"region": b"EU West"},
    ],
)
def test_txt_records_that_are_not_ours_are_dropped(properties: dict[bytes, bytes | None]) -> None:
    assert Advertisement.from_properties(properties) is None


def test_txt_record_round_trip_and_a_long_instance_name_fits_one_label() -> None:
    ad = node_ad(new_fleet(), node="n" * 63)
    encoded = {key.encode(): value.encode() for key, value in ad.properties().items()}
    assert Advertisement.from_properties(encoded) == ad
    name = ad.instance_name()
    assert len(name.encode()) <= 63
    assert name != node_ad(new_fleet(), node="n" * 63).instance_name()


def test_discovery_config_defaults_to_off_on_loopback_only() -> None:
    config = DiscoveryConfig()
    assert config.enabled is False
    assert config.interfaces == ["127.0.0.1"]


@pytest.mark.parametrize("interface", [ALL_INTERFACES, "::1", "eth0", "224.0.0.251"])
def test_discovery_config_refuses_anything_but_one_ipv4_interface(interface: str) -> None:
    with pytest.raises(ConfigError, match=r"key `discovery`: `interfaces`: "):
        convert_config(
            {"discovery": {"enabled": True, "interfaces": [interface]}},
            _Holder,
            source="test.toml",
        )


def test_announcements_leave_by_the_listed_interface_only() -> None:
    """Never InterfaceChoice.All: every socket zeroconf sends from is bound to 127.0.0.1 and
    multicasts there (this reads zeroconf's engine, which keeps its sending sockets)."""

    async def scenario() -> list[tuple[str, str]]:
        discovery = await started(None)
        try:
            assert discovery._zeroconf is not None
            sockets = discovery._zeroconf.zeroconf.engine._respond_sockets
            return [
                (
                    sock.getsockname()[0],
                    socket.inet_ntoa(sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)),
                )
                for sock in sockets
            ]
        finally:
            await discovery.stop()

    assert run(scenario) == [("127.0.0.1", "127.0.0.1")]


def test_discovery_refuses_all_interfaces_even_when_built_in_code() -> None:
    with pytest.raises(ValueError, match="one interface's address"):
        Discovery([ALL_INTERFACES])


class _Holder(msgspec.Struct, forbid_unknown_fields=True):
    discovery: DiscoveryConfig
