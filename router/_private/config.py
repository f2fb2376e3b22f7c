"""Router configuration: a TOML file parsed into msgspec Structs, overridden by flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from federation import (
    DEFAULT_DEVICE_PREFERENCE,
    DeviceClass,
    DiscoveryConfig,
    LoggingMode,
    LogsConfig,
    ServerConfig,
    TracesConfig,
    convert_config,
    load_config,
)
from router._private.ca import FLEET_DIR

DEFAULT_PORT = 8300
DEFAULT_FLEET_PORT = 8301
Name = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
Seconds = Annotated[float, Meta(gt=0, le=3600)]


class HealthConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """How quickly a node is declared down, ejected and let back in."""

    heartbeat_interval_s: Seconds = 1.0
    missed_beats_down: Annotated[int, Meta(ge=1, le=100)] = 3
    probe_interval_s: Seconds = 1.0
    probe_timeout_s: Seconds = 1.0
    # Consecutive failures (requests or probes) that open a node's circuit.
    eject_after_failures: Annotated[int, Meta(ge=1, le=100)] = 3
    # First wait before a half-open probe; doubles on each failed probe up to the maximum.
    eject_base_s: Seconds = 1.0
    eject_max_s: Seconds = 30.0


class ProxyConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    connect_timeout_s: Seconds = 1.0
    # Longest silence from a node once connected (headers, or between stream frames).
    read_timeout_s: Seconds = 120.0
    max_retries: Annotated[int, Meta(ge=0, le=10)] = 2
    max_connections: Annotated[int, Meta(ge=1, le=100_000)] = 1024


class CanaryConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The router's own canary: one small request per region and device class, every
    `every_s`, through its public listener with the canary key (docs/operations.md)."""

    enabled: bool = False
    every_s: Annotated[float, Meta(ge=1, le=3600)] = 60.0
    # A probe not answered within this long counts as failed.
    timeout_s: Seconds = 10.0


class RouterConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    router_id: Name = "router"
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_PORT
    # The public listener serves HTTPS with this certificate and key (PEM files) when both
    # are set, plain HTTP otherwise.
    tls_cert: str | None = None
    tls_key: str | None = None
    # The fleet listener (always mTLS, the router's fleet certificate): heartbeats,
    # enrollment, renewal, policy. `fleet_url` is what nodes are told to use (default
    # https://<fleet_host>:<bound port>).
    fleet_host: str = "127.0.0.1"
    fleet_port: Annotated[int, Meta(ge=0, le=65535)] = DEFAULT_FLEET_PORT
    fleet_url: Annotated[str, Meta(pattern=r"^https://[^\s/]+/?$")] | None = None
    data_dir: str | None = None
    # The fleet identity directory (fleet CA, router certificate, enrollment registry,
    # rollouts, policy state): `<home>/fleet` by default. Routers of one fleet on one host
    # share one: the `fleet` directory of the router whose home holds it (fleet_identity.py).
    fleet_dir: str | None = None
    # The policy store (tenancy, usage, budgets, membership): a postgresql:// URL shared by
    # several routers, or a SQLite path; default policy.db under the router's home.
    database: str | None = None
    # On a shared (PostgreSQL) store: how long a router's slice of an org's budget outlives
    # its last renewal (renewed every fifth of it). A router that dies holds its slices this
    # long before another may spend them; one cut off from the database stops admitting
    # budgeted requests after 80 % of it.
    budget_lease_s: Annotated[float, Meta(ge=1, le=300)] = 15.0
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 1024 * 1024
    # The largest appliance-image bundle `palisade fleet update` may upload (streamed to disk).
    max_bundle_bytes: Annotated[int, Meta(ge=1024)] = 8 * 1024**3
    logging_floor: LoggingMode = "full"
    content_retention_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    assertion_ttl_s: Annotated[float, Meta(ge=5, le=3600)] = 30.0
    # Device classes in order of preference; `models` overrides it per model id.
    device_preference: list[DeviceClass] = msgspec.field(
        default_factory=lambda: list(DEFAULT_DEVICE_PREFERENCE)
    )
    models: dict[str, list[DeviceClass]] = msgspec.field(default_factory=dict)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    proxy: ProxyConfig = msgspec.field(default_factory=ProxyConfig)
    # Limits on each client connection: read timeouts, keep-alive, how many at once.
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    # zeroconf: announce this process on the listed interfaces and browse for its fleet.
    discovery: DiscoveryConfig = msgspec.field(default_factory=DiscoveryConfig)
    canary: CanaryConfig = msgspec.field(default_factory=CanaryConfig)
    # Log lines: text, or JSON objects one per line (`--log-format`); access lines.
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)
    # OpenTelemetry traces over OTLP/HTTP (`--otlp-endpoint`): off unless an endpoint is set.
    traces: TracesConfig = msgspec.field(default_factory=TracesConfig)

    def home(self) -> Path:
        return Path(self.data_dir) if self.data_dir else palisade_home()

    def fleet_path(self) -> Path:
        return Path(self.fleet_dir) if self.fleet_dir else self.home() / FLEET_DIR

    def preference(self, model: str) -> list[DeviceClass]:
        return self.models.get(model, self.device_preference)


def palisade_home() -> Path:
    return Path(os.environ.get("PALISADE_HOME", "var")).resolve()


def load_router_config(path: Path | None, overrides: dict[str, Any] | None = None) -> RouterConfig:
    """Read `path` (or the defaults), then apply flag overrides such as host and port."""
    config = RouterConfig() if path is None else load_config(path, RouterConfig)
    if not overrides:
        return config
    source = "defaults" if path is None else str(path)
    merged = msgspec.to_builtins(config) | {k: v for k, v in overrides.items() if v is not None}
    return convert_config(merged, RouterConfig, source=f"{source} with flags")
