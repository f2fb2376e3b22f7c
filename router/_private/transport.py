"""The router's TLS material: its fleet certificate, the contexts of its two listeners and
of its connections to nodes, and the CRL they all honour.

The fleet listener presents `fleet/router.pem` (issued by the fleet CA for the fleet's
router key, `fleet_identity`) and asks every client for a certificate: optional at the TLS
level (enrollment and the CA download come without one), required by every fleet route
that a node calls (`app.certified_node`). A presented certificate must chain to the fleet
CA and not be on the CRL, or the handshake fails. The router reaches nodes with the same
certificate as a client certificate, checking theirs against the CA, the CRL and the node
id's DNS name.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from federation import (
    ConfigError,
    NodeIdentity,
    client_context,
    crl_serials,
    identity_of,
    load_pem_certificate,
    raw_public_key,
    reload_crl,
    server_context,
    write_private,
)
from router._private.ca import FleetCA
from router._private.config import RouterConfig
from router._private.fleet_identity import ROUTER_CERT, FleetIdentity

log = logging.getLogger("palisade.router")

CRL_FILE = "crl.pem"


@dataclass
class RouterTLS:
    """The contexts the router serves and connects with; `reload_crl` after a revocation
    (and `drop_revoked`, the server's, cuts the connections the new CRL refuses)."""

    ca: FleetCA
    ca_path: Path
    cert_path: Path
    key_path: Path
    crl_path: Path
    fleet: ssl.SSLContext
    client: ssl.SSLContext
    public: ssl.SSLContext | None
    drop_revoked: Callable[[Collection[int]], object] = lambda _serials: None

    def reload_crl(self) -> None:
        """The newest `fleet/crl.pem`, from the next handshake on, both ways; the open
        connections of certificates it lists are cut now."""
        reload_crl(self.fleet, self.crl_path)
        reload_crl(self.client, self.crl_path)
        self.drop_revoked(crl_serials(self.crl_path))


def router_tls(config: RouterConfig, fleet: FleetIdentity) -> RouterTLS:
    """Load the fleet CA, make sure the router's fleet certificate is current, and build
    the contexts (`fleet/crl.pem` must exist: `NodeRegistry.current_crl` makes it). The
    certificate and key are the fleet's (`fleet_identity`): shared by the routers of a fleet
    directory."""
    directory = config.fleet_path()
    ca = FleetCA.in_directory(directory)
    cert_path, crl_path = directory / ROUTER_CERT, directory / CRL_FILE
    _ensure_router_certificate(ca, fleet, config, cert_path)
    if not crl_path.exists():
        raise ConfigError(f"{crl_path} is missing: the registry writes it before serving.")
    ca_path = directory / "ca.pem"
    key_path = fleet.key_path
    return RouterTLS(
        ca=ca,
        ca_path=ca_path,
        cert_path=cert_path,
        key_path=key_path,
        crl_path=crl_path,
        fleet=server_context(cert_path, key_path, ca_path, crl_path, client_certs=True),
        client=client_context(ca_path, cert_path, key_path, crl_path),
        public=public_context(config),
    )


def public_context(config: RouterConfig) -> ssl.SSLContext | None:
    """HTTPS for the public listener when `tls_cert` and `tls_key` are both set."""
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError(
            "Set both tls_cert and tls_key (--tls-cert/--tls-key) to serve HTTPS, or neither "
            "for plain HTTP."
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"Cannot use {config.tls_cert} with {config.tls_key} for HTTPS: {exc}."
        ) from exc
    return ctx


def _ensure_router_certificate(
    ca: FleetCA, fleet: FleetIdentity, config: RouterConfig, path: Path
) -> None:
    """Issue `fleet/router.pem` when missing, for another router name or key or host, or
    with less than a third of its lifetime left."""
    hosts = _fleet_hosts(config)
    if _current(path, fleet.identity, fleet.name, hosts):
        return
    cert = ca.issue_router(fleet.identity, fleet.name, hosts)
    write_private(path, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    log.info("issued the router's fleet certificate for %s", ", ".join(hosts))


def _fleet_hosts(config: RouterConfig) -> list[str]:
    """The names and addresses nodes may reach the fleet listener by (beside the router's
    fleet DNS name, which the CA always adds)."""
    hosts = [config.fleet_host]
    if config.fleet_url is not None and (name := urlsplit(config.fleet_url).hostname):
        hosts.append(name)
    return [host for host in dict.fromkeys(hosts) if host not in ("0.0.0.0", "::")]  # noqa: S104


def _current(path: Path, identity: NodeIdentity, router_id: str, hosts: list[str]) -> bool:
    try:
        cert = load_pem_certificate(path.read_bytes())
        holder = identity_of(cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    listed = set(san.get_values_for_type(x509.DNSName))
    listed |= {str(address) for address in san.get_values_for_type(x509.IPAddress)}
    life = holder.not_after - cert.not_valid_before_utc.timestamp()
    return (
        holder.role == "router"
        and holder.node_id == router_id
        and raw_public_key(cert) == identity.public_key
        and holder.not_after - time.time() > life / 3
        and set(hosts) <= listed
    )
