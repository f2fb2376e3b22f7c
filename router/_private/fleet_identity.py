"""Which key and name a router presents to the fleet: its own, or the fleet's it joined.

Several routers of one fleet on one host share its fleet directory (`fleet_dir`): one CA,
one router certificate, one enrollment registry, one rollout book. The directory belongs
to the router whose home holds it (`<owner home>/fleet`); every router using it presents
that owner's identity to the nodes: its key (`<owner home>/node.key`: the router
certificate's key, the one that signs assertions, policy snapshots and enrollment tokens)
and its name (the router certificate's, which nodes check as the TLS server name and
tokens carry). So a node enrolled through any of them, heartbeating to whichever one
HAProxy passes its connection to, and served by any other, sees one router.

A router whose fleet directory is its own (the default) is its owner: it uses its own key
and `router_id`, as a lone router always has. A router joining another's directory needs
the owner to have started once (the certificate names the fleet); until then it refuses
to start. Each router keeps its own `router_id` for everything
else: its audit origin, its journal, its budget slices, its row in the `routers` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation import ConfigError, NodeIdentity, identity_of, load_pem_certificate
from router._private.ca import FLEET_DIR
from router._private.config import RouterConfig

ROUTER_CERT = "router.pem"
KEY_FILE = "node.key"  # NodeIdentity's, in a home


@dataclass(frozen=True)
class FleetIdentity:
    """The key (and its file, the TLS key) and the name the router presents to nodes."""

    identity: NodeIdentity
    key_path: Path
    name: str


def fleet_identity(config: RouterConfig) -> FleetIdentity:
    home = config.home()
    directory = config.fleet_path()
    if directory.resolve() == (home / FLEET_DIR).resolve():
        return FleetIdentity(NodeIdentity.load_or_create(home), home / KEY_FILE, config.router_id)
    owner = directory.parent
    key_path, cert_path = owner / KEY_FILE, directory / ROUTER_CERT
    if not key_path.is_file() or not cert_path.is_file():
        raise ConfigError(
            f"fleet_dir {directory} has no router certificate and key yet: start the router "
            f"whose home is {owner} first (it makes the fleet's identity)."
        )
    try:
        name = identity_of(load_pem_certificate(cert_path.read_bytes())).node_id
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_path} is unreadable: {exc}.") from exc
    return FleetIdentity(NodeIdentity.load_or_create(owner), key_path, name)
