"""Discovery between real processes: a router with `[discovery] enabled` announces itself on
127.0.0.1 (zeroconf multicast on loopback, IPv4 only), and lists nodes it sees but has not
enrolled. Nothing found this way is trusted: see tests/federation/test_discovery.py for the
impostor that announces another CA.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from appliance._private.config import load_appliance_config
from appliance._private.presence import with_discovered_router
from federation import (
    Advertisement,
    DiscoveredNode,
    Discovery,
    DiscoveryConfig,
    NodeCredentials,
    NodeIdentity,
    TokenClaims,
    find_router,
    fingerprint,
    load_pem_certificate,
    sign_token,
)
from tests.federation.tenants import Admin
from tests.support import (
    Server,
    model_toml,
    run_appliance,
    run_palisade,
    start_server,
    wait_for,
    write_config,
)

_FLEET_LINE = re.compile(r"fleet \(mTLS\) on (?P<url>https://\S+), CA (?P<fp>sha256:[0-9a-f]{64})")
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - refused, never bound
ROUTER_TOML = 'fleet_port = 0\n\n[discovery]\nenabled = true\ninterfaces = ["127.0.0.1"]\n'


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("discovery-router")
    config = write_config(home, ROUTER_TOML, "router.toml")
    server = start_server("router", home, *config)
    try:
        server.wait_ready(30)
        yield server
    finally:
        server.stop()


def fleet_of(router: Server) -> tuple[str, str, str]:
    """The fleet id, the router's fleet URL and its CA fingerprint, as the router prints
    them and keeps them on disk."""
    match = wait_for(lambda: _FLEET_LINE.search(router.log_text()), timeout=10)
    fleet_id = (router.home / "fleet" / "fleet.id").read_text().strip()
    ca = load_pem_certificate((router.home / "fleet" / "ca.pem").read_bytes())
    assert match["fp"] == fingerprint(ca)
    return fleet_id, match["url"], fingerprint(ca)


@contextmanager
def advertising(advertisement: Advertisement) -> Iterator[None]:
    """Announce `advertisement` from a real zeroconf instance on its own event loop."""
    announced, done = threading.Event(), threading.Event()
    failure: list[BaseException] = []

    async def announce() -> None:
        discovery = Discovery(["127.0.0.1"])
        await discovery.start()
        try:
            await discovery.advertise(advertisement)
            announced.set()
            await asyncio.to_thread(done.wait)
        finally:
            await discovery.stop()

    def run() -> None:
        try:
            asyncio.run(announce())
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failure.append(exc)
            announced.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert announced.wait(15), "the advertisement was not announced within 15 s"
        assert not failure, failure
        yield
    finally:
        done.set()
        thread.join(15)


def test_an_appliance_side_lookup_finds_the_router_by_fleet_and_pinned_ca(router: Server) -> None:
    fleet_id, fleet_url, ca_fingerprint = fleet_of(router)
    found = find_router(fleet_id, 15, ca_fingerprint=ca_fingerprint)
    assert found is not None
    assert found.url == fleet_url
    assert found.router_id == "router"
    # The URL leads to the router that owns that CA: its public CA download says so.
    # (Unverified on purpose, as `node enroll` does: the fingerprint is the check.)
    response = httpx.get(f"{found.url}/federation/v1/ca", verify=False, timeout=10)  # noqa: S501
    assert fingerprint(load_pem_certificate(response.content)) == ca_fingerprint


def test_a_node_pinned_to_another_ca_does_not_take_the_router(router: Server) -> None:
    fleet_id, _, _ = fleet_of(router)
    assert find_router(fleet_id, 2, ca_fingerprint="sha256:" + "0" * 64) is None


def admin_of(router: Server) -> Admin:
    return Admin(router.url, (router.home / "admin.key").read_text().strip())


def node_rows(admin: Admin, node_id: str) -> list[dict[str, Any]]:
    """`node_id`'s rows in `GET /admin/v1/fleet/nodes` (what `fleet node list` shows)."""
    listing = admin.ok("GET", "/admin/v1/fleet/nodes")
    return [row for row in listing["data"] if row["node_id"] == node_id]


def discovered_row(admin: Admin, node_id: str) -> dict[str, Any] | None:
    rows = node_rows(admin, node_id)
    return next((row for row in rows if row["state"] == "discovered"), None)


def enrolled_row(admin: Admin, node_id: str) -> dict[str, Any] | None:
    rows = node_rows(admin, node_id)
    return next((row for row in rows if row["state"] == "enrolled"), None)


def fleet_state(admin: Admin, node_id: str) -> str | None:
    nodes = admin.ok("GET", "/federation/v1/fleet")["nodes"]
    return next((n["state"] for n in nodes if n["node_id"] == node_id), None)


def test_the_router_lists_a_node_it_sees_but_has_not_enrolled(router: Server) -> None:
    fleet_id, _, _ = fleet_of(router)
    admin = admin_of(router)
    stranger = unique_node("edge-stranger")
    ad = Advertisement(role="node", node_id=stranger, url="https://127.0.0.1:9", fleet_id=fleet_id)

    with advertising(ad):
        listed = wait_for(lambda: discovered_row(admin, stranger), timeout=15)
        assert fleet_state(admin, stranger) is None  # seen, never admitted
    assert listed["state"] == "discovered"
    assert listed["url"] == "https://127.0.0.1:9"
    assert listed["fleet_id"] == fleet_id
    # Gone with its goodbye: the router forgets it.
    wait_for(lambda: discovered_row(admin, stranger) is None, timeout=15)


def test_a_node_and_the_router_find_each_other_and_only_enrollment_admits_it(
    router: Server, tmp_path: Path
) -> None:
    """The whole path with real processes: a pending appliance is seen (and sent nothing);
    `node enroll --discover` finds the router by its announcement; once enrolled the node
    joins over mTLS, and an enrolled node that knows no router URL finds it at start."""
    fleet_id, fleet_url, ca_fingerprint = fleet_of(router)
    admin = admin_of(router)
    node_id = unique_node("edge-zc")
    home = tmp_path / node_id
    env = {"PALISADE_HOME": str(home)}
    init = run_palisade(
        "node", "init", "--region", "eu-west", "--node-id", node_id, "--host", "127.0.0.1", env=env
    )
    assert init.returncode == 0, init.stderr
    config = model_toml()  # discovery from the flag this time

    flags = ("--discovery", "--node-id", node_id, "--region", "eu-west")
    with run_appliance(home, config, *flags) as pending:
        seen = wait_for(lambda: discovered_row(admin, node_id), timeout=20)
        assert seen["url"] == pending.url
        assert seen["region"] == "eu-west"
        assert seen["fleet_id"] is None
        assert fleet_state(admin, node_id) is None

    token = admin.ok("POST", "/admin/v1/fleet/tokens", {"region": "eu-west", "node_id": node_id})
    enrolled = run_palisade("node", "enroll", "--discover", "--token", token["token"], env=env)
    assert enrolled.returncode == 0, enrolled.stderr
    assert fleet_url in enrolled.stdout

    # An enrolled node with no router URL at all looks for one announcing its pinned CA.
    credentials = NodeCredentials.load(home)
    assert credentials.state is not None
    assert credentials.state.ca_fingerprint == ca_fingerprint
    unaddressed = msgspec.structs.replace(credentials.state, fleet_url=None)
    settings = load_appliance_config(None, {"discovery": {"enabled": True, "find_router_s": 10}})
    found = with_discovered_router(settings, NodeCredentials(home, unaddressed))
    assert found.router_url == fleet_url
    other_ca = msgspec.structs.replace(unaddressed, ca_fingerprint="sha256:" + "0" * 64)
    quick = DiscoveryConfig(enabled=True, find_router_s=2)
    short = msgspec.structs.replace(settings, discovery=quick)
    assert with_discovered_router(short, NodeCredentials(home, other_ca)).router_url is None
    nowhere = DiscoveryConfig(enabled=True, interfaces=["203.0.113.9"])  # no interface here
    elsewhere = msgspec.structs.replace(settings, discovery=nowhere)
    assert with_discovered_router(elsewhere, NodeCredentials(home, unaddressed)).router_url is None

    member = start_server("appliance", home, *write_config(home, config), "--discovery")
    member.verify = ssl.create_default_context(cafile=str(home / "fleet" / "ca.pem"))
    try:
        member.wait_ready(60)
        wait_for(lambda: fleet_state(admin, node_id) == "up", timeout=30)
        listed = wait_for(lambda: enrolled_row(admin, node_id), timeout=10)
        assert listed["region"] == "eu-west"
        # Announcing again, now with its certificate: enrolled, so not listed as discovered.
        announced = browse_for(node_id, present=True)
        assert announced is not None
        assert announced.fleet_id == fleet_id
        assert announced.fingerprint == listed["fingerprint"]
        assert announced.url == member.url
        assert discovered_row(admin, node_id) is None
    finally:
        member.stop()


def unique_node(prefix: str) -> str:
    return f"{prefix}-{os.urandom(3).hex()}"


def browse_for(node_id: str, *, present: bool, within_s: float = 20.0) -> DiscoveredNode | None:
    """What a real browser on 127.0.0.1 sees of `node_id`, once it is (or is no longer)
    announced; fails after `within_s`."""

    async def look() -> DiscoveredNode | None:
        browser = Discovery(["127.0.0.1"])
        await browser.start()
        try:
            deadline = time.monotonic() + within_s
            while True:
                found = next((n for n in browser.discovered() if n.node_id == node_id), None)
                if (found is not None) == present:
                    return found
                if time.monotonic() > deadline:
                    state = "absent" if present else "present"
                    raise TimeoutError(
                        f"{node_id} still {state} after {within_s}s (multicast on 127.0.0.1 "
                        "must work here: see tests/federation/test_discovery.py)"
                    )
                await asyncio.sleep(0.05)
        finally:
            await browser.stop()

    return asyncio.run(look())


def test_an_appliance_announces_its_id_region_and_url_until_it_stops(tmp_path: Path) -> None:
    node_id = unique_node("edge-announce")
    config = (
        f'node_id = "{node_id}"\nregion = "eu-west"\n{model_toml()}\n[discovery]\nenabled = true\n'
    )
    with run_appliance(tmp_path / node_id, config) as appliance:
        seen = browse_for(node_id, present=True)
        assert seen is not None
        assert seen.url == appliance.url
        assert seen.region == "eu-west"
        assert seen.fleet_id == ""  # not enrolled: it claims no fleet
        assert seen.fingerprint == ""
    assert browse_for(node_id, present=False) is None  # its goodbye on SIGTERM


def orphan_token(home: Path) -> str:
    """A well-formed token for a fleet whose router announces nothing anywhere."""
    claims = TokenClaims(
        id=os.urandom(8).hex(),
        fleet_id=f"fleet-{os.urandom(4).hex()}",
        router_id="router",
        region="eu-west",
        expires_at=time.time() + 3600,
        uses=1,
        ca_fingerprint="sha256:" + "ab" * 32,
        fleet_url="https://127.0.0.1:9",
    )
    return sign_token(NodeIdentity.load_or_create(home / "issuer"), claims)


def test_enroll_discover_refuses_clearly_and_leaves_the_node_pending(tmp_path: Path) -> None:
    home = tmp_path / "node"
    env = {"PALISADE_HOME": str(home)}
    assert run_palisade("node", "init", "--region", "eu-west", env=env).returncode == 0
    before = (home / "node.toml").read_text()
    token = orphan_token(tmp_path)

    nobody = run_palisade("node", "enroll", "--discover", "--token", token, env=env)
    assert nobody.returncode == 1
    assert "router_not_found" in nobody.stderr
    assert "--router" in nobody.stderr  # says how to do without discovery

    for interface in (ALL_INTERFACES, "203.0.113.9"):  # all of them; none of this machine's
        bad = run_palisade(
            "node", "enroll", "--discover", "--interface", interface, "--token", token, env=env
        )
        assert bad.returncode == 1
        assert "invalid_interface" in bad.stderr

    both = run_palisade(
        "node", "enroll", "--discover", "--router", "https://127.0.0.1:9", "--token", token,
        env=env,
    )  # fmt: skip
    assert both.returncode == 1
    assert "--discover" in both.stderr
    assert (home / "node.toml").read_text() == before
    assert not (home / "fleet" / "node.pem").exists()
