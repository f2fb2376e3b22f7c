"""Running the router: bind the socket, print where it listens, serve until signalled."""

from __future__ import annotations

import logging
import sys

from compliance import Recorder
from federation import Tenancy, bind_socket, join_secret, make_server, private_dir, url_of
from router._private.app import create_router_app
from router._private.config import RouterConfig

log = logging.getLogger("palisade.router")

# The region the router's own tenancy reports when it is not naming a node's region.
ROUTER_REGION = "global"


def serve(config: RouterConfig, *, demo_regions: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    secret = join_secret(required=True)
    assert secret is not None
    home = config.home()
    private_dir(home)
    sock = bind_socket(config.host, config.port)
    recorder = Recorder(
        home,
        origin=config.router_id,
        floor=config.logging_floor,
        retention_days=config.content_retention_days,
    )
    tenancy = Tenancy(
        home,
        region=ROUTER_REGION,
        node=config.router_id,
        audit=recorder,
        logging_floor=config.logging_floor,
    )
    app, state = create_router_app(
        config, tenancy=tenancy, recorder=recorder, join_secret=secret, demo_regions=demo_regions
    )
    state.url = url_of(sock)
    server = make_server(app, config.server)
    sys.stdout.write(
        f"Palisade router {config.router_id} listening on {state.url}\n"
        f"  appliances join with: palisade appliance serve --router {state.url} "
        "--region <region> --node-id <id> (and the same PALISADE_JOIN_SECRET)\n"
    )
    sys.stdout.flush()
    server.run(sockets=[sock])
    return 0
