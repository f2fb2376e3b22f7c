"""The global front door: residency-filtered, latency-aware routing across appliances.

`palisade router serve` authenticates keys (the tenancy store lives here in a fleet),
computes each request's effective regions, and forwards it, with a signed principal
assertion, to the fastest healthy appliance of the most preferred device class in those
regions; it fails over before the first byte and fails closed on residency.
"""

from router._private.alerts import AlertReceiver, alert_line, alerts_cli
from router._private.app import RouterState, create_router_app
from router._private.canary_cli import canary_cli
from router._private.cli import fleet_cli, router_cli
from router._private.config import (
    DEFAULT_PORT,
    HealthConfig,
    ProxyConfig,
    RouterConfig,
    load_router_config,
)
from router._private.errors import (
    BackendCrashedError,
    BackendUnavailableError,
    NoBackendError,
    RegionHeaderError,
    RouterError,
)
from router._private.fleet import Fleet, Node
from router._private.metrics import RouterMetrics
from router._private.monitor_cli import monitor_cli
from router._private.prometheus_routes import SD_PATH, TargetGroup, scrape_targets

__all__ = [
    "DEFAULT_PORT",
    "SD_PATH",
    "AlertReceiver",
    "BackendCrashedError",
    "BackendUnavailableError",
    "Fleet",
    "HealthConfig",
    "NoBackendError",
    "Node",
    "ProxyConfig",
    "RegionHeaderError",
    "RouterConfig",
    "RouterError",
    "RouterMetrics",
    "RouterState",
    "TargetGroup",
    "alert_line",
    "alerts_cli",
    "canary_cli",
    "create_router_app",
    "fleet_cli",
    "load_router_config",
    "monitor_cli",
    "router_cli",
    "scrape_targets",
]
