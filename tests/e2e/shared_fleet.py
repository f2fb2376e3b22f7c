"""Several real routers of one fleet: one PostgreSQL store and one fleet directory.

Router 1 owns the fleet directory (its CA, router certificate, enrollment registry);
routers 2..N name it as their `fleet_dir`, as `palisade fleet up --routers N` lays them
out, so a node enrolled through any of them is trusted by all and any router can serve it
or forward an auditor to it. Each router has one member, `node-N`, enrolled through router
N's fleet listener and heartbeating to it alone (no HAProxy): the other routers know it
only through the shared membership, which is what these tests are about.

The store comes from `tests/e2e/routers.py` (`shared_store`: migrated, password in a 0600
PGPASSFILE); the admin key is router 1's (the store's one bootstrap key).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from federation import write_private
from router._private.monitoring import free_port
from tests.e2e.fleet import Fleet, running_fleet, upstream_toml
from tests.e2e.routers import REGION, SharedStore, passing
from tests.support import start_server, write_config


@dataclass
class JoinedFleet(Fleet):
    """A router using another router's fleet directory (its CA is there, not in its home)."""

    fleet_dir: Path = field(default_factory=Path)

    @property
    def ca_path(self) -> Path:
        return self.fleet_dir / "ca.pem"


@dataclass
class SharedFleet:
    store: SharedStore
    routers: list[Fleet]  # router-1 first; routers[n - 1] is router-n

    @property
    def fleet_dir(self) -> Path:
        return self.routers[0].router.home / "fleet"


def _router_args(home: Path, n: int, store: SharedStore, fleet_dir: Path | None) -> list[str]:
    lines = [f'router_id = "router-{n}"']
    if fleet_dir is not None:
        lines.append(f'fleet_dir = "{fleet_dir}"')
    config = write_config(home, "\n".join(lines) + "\n", "router.toml")
    ports = ["--port", str(free_port("127.0.0.1")), "--fleet-port", str(free_port("127.0.0.1"))]
    return [*config, "--database", store.url, *ports]


@contextmanager
def shared_fleet(root: Path, store: SharedStore, count: int = 3) -> Iterator[SharedFleet]:
    """`count` routers of one fleet on `store`, each with its member joined (seen `up` by
    every router)."""
    with contextlib.ExitStack() as stack, passing(store):
        first_home = root / "r1" / "router"
        first = stack.enter_context(
            running_fleet(root / "r1", *_router_args(first_home, 1, store, None))
        )
        fleets: list[Fleet] = [first]
        for n in range(2, count + 1):
            home = root / f"r{n}" / "router"
            server = start_server(
                "router", home, *_router_args(home, n, store, first_home / "fleet")
            )
            stack.callback(server.stop)
            server.wait_ready(30)
            write_private(home / "admin.key", (first_home / "admin.key").read_text())
            fleets.append(
                JoinedFleet(root / f"r{n}", server, stack, fleet_dir=first_home / "fleet")
            )
        for n, fleet in enumerate(fleets, start=1):
            standin = fleet.standin(f"standin-{n}", tokens=4)
            fleet.start_member(f"node-{n}", REGION, upstream_toml(standin, "gpu"))
        nodes = [f"node-{n}" for n in range(1, count + 1)]
        for n, fleet in enumerate(fleets, start=1):
            fleet.wait_joined(f"node-{n}", timeout=120)
        for fleet in fleets:
            fleet.wait_state("up", *nodes, timeout=60, ready=True)
        yield SharedFleet(store, fleets)
