"""Running the router: bind its two listeners, print where they are, serve until signalled.

The public listener (plain HTTP, or HTTPS with `tls_cert`/`tls_key`) serves the OpenAI and
management APIs; the fleet listener (always mTLS, see `transport`) serves the nodes. Both
serve the same app: fleet routes refuse callers without a node certificate, and only the
fleet listener asks for one.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from compliance import Recorder
from federation import (
    Listener,
    StoreError,
    Tenancy,
    announce_lab_secret,
    bind_socket,
    check_target,
    join_secret,
    make_server,
    observed,
    private_dir,
    start_tracing,
    url_of,
)
from router._private.app import INFERENCE_ROUTES, RouterState, create_router_app
from router._private.config import RouterConfig
from router._private.transport import RouterTLS, router_tls

log = logging.getLogger("palisade.router")

# The region the router's own tenancy reports when it is not naming a node's region.
ROUTER_REGION = "global"


def serve(config: RouterConfig, *, demo_regions: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    lab_secret = join_secret(required=False)
    if lab_secret is not None:
        announce_lab_secret("router")
    home = config.home()
    private_dir(home)
    try:
        asyncio.run(check_target(config.database, home))
    except StoreError as exc:
        log.error("%s", exc.message)  # noqa: TRY400 - the message says it all
        return 1
    public = bind_socket(config.host, config.port)
    fleet = bind_socket(config.fleet_host, config.fleet_port)
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
        database=config.database,
        budget_lease_s=config.budget_lease_s,
    )
    app, state = create_router_app(
        config, tenancy=tenancy, recorder=recorder, lab_secret=lab_secret, demo_regions=demo_regions
    )
    state.registry.current_crl()  # an empty CRL at first: checking client certificates needs one
    tls = router_tls(config, state.fleet_identity)
    use_tls(state, tls)
    state.url = url_of(public, "https" if tls.public is not None else "http")
    state.fleet_url = config.fleet_url.rstrip("/") if config.fleet_url else url_of(fleet, "https")
    tracing = start_tracing(config.traces, service="palisade-router", node=config.router_id)
    server = make_server(
        observed(app, routes=INFERENCE_ROUTES, tracing=tracing),
        config.server,
        [Listener(public, tls.public), Listener(fleet, tls.fleet)],
    )
    tls.drop_revoked = server.drop_revoked  # a revocation cuts connections already open
    state.policy.stopping = lambda: server.should_exit  # long polls end as shutdown starts
    sys.stdout.write(
        f"Palisade router {config.router_id} listening on {state.url}\n"
        f"  fleet (mTLS) on {state.fleet_url}, CA {tls.ca.fingerprint}\n"
        "  enroll a node: palisade fleet token create --region <region>, then on the node "
        "palisade node init and palisade node enroll\n"
    )
    sys.stdout.flush()
    try:
        server.run()
    finally:
        if tracing is not None:
            tracing.close()  # the spans still queued
    return 0


def use_tls(state: RouterState, tls: RouterTLS) -> None:
    """Connect to nodes with the router's fleet certificate; on a revocation drop the node,
    refuse its certificate's heartbeats, and load the new CRL into every context."""
    state.tls = tls
    state.forwarder.tls = tls.client

    def revoked(node_id: str) -> None:
        state.fleet.revoke(node_id)
        state.revoked_serials |= state.registry.revoked_serials()
        tls.reload_crl()
        log.warning("node %s revoked: dropped from the fleet, its certificate refused", node_id)

    state.on_revoked.append(revoked)
