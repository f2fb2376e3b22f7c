"""The appliance in zeroconf discovery: what it announces, and finding its router.

Discovery never grants trust. The node announces what its certificate says (a pending node
only its id and URL); it takes a discovered router's URL only when that router announces
the CA pinned at enrollment, and even then talks to it only over mutual TLS verified
against that CA, exactly as with a URL given on the command line.
"""

from __future__ import annotations

import logging

import msgspec

from appliance._private.config import ApplianceConfig
from federation import Advertisement, NodeCredentials, find_router

log = logging.getLogger("palisade.appliance.discovery")


def node_advertisement(
    config: ApplianceConfig, url: str, credentials: NodeCredentials | None
) -> Advertisement:
    """An enrolled node announces its certified identity; any other, its configured id and
    region, and no fleet."""
    url = config.advertise_url or url
    if credentials is None or not credentials.enrolled:
        return Advertisement(role="node", node_id=config.node_id, url=url, region=config.region)
    identity = credentials.identity()
    return Advertisement(
        role="node",
        node_id=identity.node_id,
        url=url,
        fleet_id=identity.fleet_id,
        region=identity.region or "",
        fingerprint=identity.fingerprint,
    )


def with_discovered_router(
    config: ApplianceConfig, credentials: NodeCredentials | None
) -> ApplianceConfig:
    """`config` with the fleet URL of a router announcing this node's fleet and pinned CA,
    when discovery is enabled and the node is enrolled but knows no router URL."""
    state = credentials.state if credentials is not None else None
    if (
        config.router_url is not None
        or not config.discovery.enabled
        or credentials is None
        or not credentials.enrolled
        or state is None
        or state.fleet_id is None
        or state.ca_fingerprint is None
    ):
        return config
    wait_s = config.discovery.find_router_s
    try:
        found = find_router(
            state.fleet_id,
            wait_s,
            ca_fingerprint=state.ca_fingerprint,
            interfaces=config.discovery.interfaces,
        )
    except OSError as exc:  # discovery is a convenience: serve without it
        log.warning("cannot look for a router: %s; serving standalone", exc)
        return config
    if found is None:
        log.warning(
            "no router of fleet %s announcing CA %s answered on %s within %.0f s; serving "
            "standalone",
            state.fleet_id,
            state.ca_fingerprint,
            ", ".join(config.discovery.interfaces),
            wait_s,
        )
        return config
    log.info("found router %s at %s by discovery", found.router_id, found.url)
    return msgspec.structs.replace(config, router_url=found.url)
