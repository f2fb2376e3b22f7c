"""`palisade router …` and `palisade fleet …`."""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import msgspec
import typer

from federation import PalisadeError, configure_logging
from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    LogFormatOpt,
    OtlpEndpointOpt,
    SampleRatioOpt,
    UrlOpt,
    call_api,
    fail,
    observability_settings,
    print_json,
    resolve_target,
    table,
)
from router._private.canary_cli import with_canary_every
from router._private.config import load_router_config, palisade_home
from router._private.local_fleet import check_regions, run_local_fleet
from router._private.monitor_cert_cli import monitor_cert_cli
from router._private.server import serve

router_cli = typer.Typer(help="Run the federated front door.", no_args_is_help=True)
fleet_cli = typer.Typer(help="Watch and run a fleet of appliances.", no_args_is_help=True)


@router_cli.command("serve")
def serve_command(  # noqa: PLR0917 - typer maps each option to a parameter
    config: Annotated[
        Path | None, typer.Option("--config", help="Router TOML config file.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (overrides the file).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Listen port; 0 picks a free one (default 8300).")
    ] = None,
    demo_regions: Annotated[
        str | None,
        typer.Option(
            "--demo-regions",
            help="Also make a demo org allowed in these comma-separated regions; print its key.",
        ),
    ] = None,
    fleet_port: Annotated[
        int | None,
        typer.Option(
            "--fleet-port", help="mTLS fleet listener port; 0 picks a free one (default 8301)."
        ),
    ] = None,
    fleet_url: Annotated[
        str | None,
        typer.Option("--fleet-url", help="The fleet URL nodes are told to use (https://…)."),
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option("--tls-cert", help="Serve the public listener over HTTPS: certificate PEM."),
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option("--tls-key", help="The key PEM for --tls-cert.")
    ] = None,
    discovery: Annotated[
        bool | None,
        typer.Option(
            "--discovery/--no-discovery",
            help="Announce the router by zeroconf and list nodes seen (overrides [discovery]).",
            show_default=False,
        ),
    ] = None,
    canary_every: Annotated[
        str | None,
        typer.Option(
            "--canary-every",
            help="Run the router's own canary every DURATION, e.g. 60s (overrides [canary]).",
        ),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            help="The policy store: postgresql://user@host/db (shared by several routers; "
            "its password from PGPASSFILE or ~/.pgpass) or a SQLite path (default policy.db "
            "in the router's home).",
        ),
    ] = None,
    log_format: LogFormatOpt = None,
    otlp_endpoint: OtlpEndpointOpt = None,
    trace_sample_ratio: SampleRatioOpt = None,
) -> None:
    """Serve the OpenAI API in front of the fleet, and the mTLS fleet listener."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    regions = [r.strip() for r in demo_regions.split(",") if r.strip()] if demo_regions else None
    overrides = {
        "host": host,
        "port": port,
        "fleet_port": fleet_port,
        "fleet_url": fleet_url,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "database": database,
    }
    try:
        settings = load_router_config(config, overrides)
        switched = settings.discovery.switched(discovery)
        settings = with_canary_every(settings, canary_every)
        logs, traces = observability_settings(
            settings.logs,
            settings.traces,
            log_format=log_format,
            otlp_endpoint=otlp_endpoint,
            sample_ratio=trace_sample_ratio,
        )
        settings = msgspec.structs.replace(settings, discovery=switched, logs=logs, traces=traces)
        configure_logging(settings.logs, node=settings.router_id)
        code = serve(settings, demo_regions=regions)
    except PalisadeError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


@fleet_cli.command("status")
def status_command(
    url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """Every node: region, device class, models, state, load, TTFT, heartbeat age, restarts,
    software version and appliance image."""
    status = call_api(resolve_target(url, key), "GET", "/federation/v1/fleet")
    if as_json:
        print_json(status)
        return
    nodes: list[dict[str, Any]] = status["nodes"]
    if not nodes:
        typer.echo(f"Router {status['router_id']}: no nodes have joined yet.")
        return
    headers = [
        "node",
        "region",
        "device",
        "models",
        "state",
        "in_flight",
        "queue",
        "ttft_p50_ms",
        "heartbeat_age_s",
        "restarts",
        "version",
        "image",
    ]
    rows = [
        [
            node["node_id"],
            node["region"],
            ",".join(node["device_classes"]) or "-",
            ",".join(node["models"]) or "-",
            _state(node),
            str(node["in_flight"]),
            str(node["queue_depth"]),
            "-" if node["ttft_p50_ms"] is None else f"{node['ttft_p50_ms']:.1f}",
            f"{node['heartbeat_age_s']:.1f}",
            _restarts(node),
            node["version"],
            _image(node),
        ]
        for node in nodes
    ]
    typer.echo(table(headers, rows))
    up = sum(1 for node in nodes if node["state"] == "up")
    looping = [node["node_id"] for node in nodes if node.get("crash_loop")]
    summary = f"{up} of {len(nodes)} nodes up (router {status['router_id']})."
    if looping:
        summary += f" Crash-looping: {', '.join(looping)}; see their logs."
    typer.echo(summary)


def _state(node: dict[str, Any]) -> str:
    """`down (offline since 2026-11-30T12:00:00Z)`: when a node lost the router, as long as
    it is down or still reconciling what it served meanwhile."""
    since = node.get("offline_since")
    if since is None:
        return str(node["state"])
    moment = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{node['state']} (offline since {moment})"


def _image(node: dict[str, Any]) -> str:
    """The appliance image the node reported: `2.0.0 (B)`, `2.0.0 (B, trial)`, or `-`."""
    version = node.get("image_version")
    if version is None:
        return "-"
    trial = "" if node.get("image_committed") else ", trial"
    return f"{version} ({node.get('image_slot') or '?'}{trial})"


def _restarts(node: dict[str, Any]) -> str:
    count = str(node.get("restarts", 0))
    return f"{count} (crash loop)" if node.get("crash_loop") else count


@fleet_cli.command("up")
def up_command(  # noqa: PLR0917 - typer maps each option to a parameter
    regions: Annotated[
        str, typer.Option(help="Comma-separated regions; one appliance is started in each.")
    ] = "eu-west,us-east",
    port: Annotated[int, typer.Option(help="Router port (0 picks a free one).")] = 8300,
    model: Annotated[
        str, typer.Option(help="Model id the printed curl line asks for.")
    ] = "smollm2-135m-instruct",
    with_prometheus: Annotated[
        bool,
        typer.Option(
            "--with-prometheus",
            help="Also run Prometheus (port 9090) and Alertmanager (9093) on 127.0.0.1, "
            "alerts to `palisade alerts tail` (9095); free ports with --port 0.",
        ),
    ] = False,
    routers: Annotated[
        int,
        typer.Option(
            "--routers",
            help="How many routers, behind HAProxy on --port (and its fleet port); more than "
            "one needs --database postgresql.",
        ),
    ] = 1,
    database: Annotated[
        str,
        typer.Option(
            "--database",
            help="The routers' policy store: sqlite (the router's policy.db) or postgresql "
            "(a private cluster under $PALISADE_HOME/postgres, migrated before they start).",
        ),
    ] = "sqlite",
) -> None:
    """Run a local fleet: the router plus one appliance per region on the default model."""
    logging.basicConfig(level=logging.WARNING)
    try:
        code = run_local_fleet(
            palisade_home(),
            check_regions(regions),
            port,
            model,
            with_prometheus=with_prometheus,
            routers=routers,
            database=database,
        )
    except PalisadeError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


token_cli = typer.Typer(help="Enrollment tokens for new nodes.", no_args_is_help=True)
node_cli = typer.Typer(help="Enrolled nodes: list, revoke.", no_args_is_help=True)
fleet_cli.add_typer(token_cli, name="token")
fleet_cli.add_typer(node_cli, name="node")
fleet_cli.add_typer(monitor_cert_cli, name="monitor")
_DURATION = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhd]?)$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """`90`, `90s`, `15m`, `24h`, `7d` in seconds."""
    match = _DURATION.match(text.strip())
    if match is None or float(match["amount"]) <= 0:
        raise fail(f"--ttl must be a positive duration such as 15m, 24h or 7d, not {text!r}.")
    return float(match["amount"]) * _SECONDS[match["unit"]]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@token_cli.command("create")
def token_create_command(  # noqa: PLR0917 - typer maps each option to a parameter
    region: Annotated[str, typer.Option(help="The region the node will serve.")],
    node_id: Annotated[
        str | None, typer.Option("--node-id", help="Only a node with this id may use it.")
    ] = None,
    device_class: Annotated[
        str | None,
        typer.Option("--device-class", help="Only a node of this device class (cpu, gpu, rdu)."),
    ] = None,
    ttl: Annotated[str, typer.Option(help="How long the token is valid: 15m, 24h, 7d.")] = "24h",
    uses: Annotated[int, typer.Option(help="How many nodes may enroll with it.")] = 1,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Make an enrollment token and print the command that enrolls a node with it."""
    body = {
        "region": region,
        "node_id": node_id,
        "device_class": device_class,
        "ttl_s": duration_s(ttl),
        "uses": uses,
    }
    created = call_api(resolve_target(url, key), "POST", "/admin/v1/fleet/tokens", body=body)
    if as_json:
        print_json(created)
        return
    scope = f"region {created['region']}"
    if created["node_id"]:
        scope += f", node {created['node_id']}"
    if created["device_class"]:
        scope += f", device class {created['device_class']}"
    plural = "use" if created["uses"] == 1 else "uses"
    init = f"palisade node init --region {created['region']}"
    if created["node_id"]:
        init += f" --node-id {created['node_id']}"
    if created["device_class"]:
        init += f" --device-class {created['device_class']}"
    typer.echo(
        f"Enrollment token ({scope}; {created['uses']} {plural}; expires "
        f"{_when(created['expires_at'])}):\n  {created['token']}\n"
        f"Fleet CA fingerprint: {created['ca_fingerprint']}\n"
        f"On the node:\n  {init}\n  {created['enroll_command']}"
    )


@node_cli.command("list")
def node_list_command(
    url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """Every enrolled node: region, device class, certificate, expiry, revocation."""
    listing = call_api(resolve_target(url, key), "GET", "/admin/v1/fleet/nodes")
    if as_json:
        print_json(listing)
        return
    nodes: list[dict[str, Any]] = listing["data"]
    if not nodes:
        typer.echo("No node has enrolled yet: palisade fleet token create --region <region>.")
        return
    headers = ["node", "region", "device", "state", "serial", "expires", "enrolled"]
    typer.echo(table(headers, [_node_row(node) for node in nodes]))


def _node_row(node: dict[str, Any]) -> list[str]:
    if node["state"] == "discovered":  # seen on the network, not enrolled: nothing certified
        return [node["node_id"], node["region"] or "-", "-", "discovered", "-", "-", "-"]
    expired = node["state"] == "enrolled" and node["not_after"] < time.time()
    return [
        node["node_id"],
        node["region"],
        node["device_class"] or "any",
        "expired" if expired else node["state"],
        f"{int(node['serial']):x}"[:16],
        _when(node["not_after"]),
        _when(node["enrolled_at"]),
    ]


@node_cli.command("revoke")
def node_revoke_command(
    node_id: Annotated[str, typer.Argument(help="The node to revoke.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a node: its certificates go on the CRL and the router drops it at once."""
    path = f"/admin/v1/fleet/nodes/{quote(node_id, safe='')}/revoke"
    node = call_api(resolve_target(url, key), "POST", path)
    if as_json:
        print_json(node)
        return
    typer.echo(
        f"Node {node['node_id']} revoked at {_when(node['revoked_at'])}: its certificates are "
        "refused from the next handshake, and nodes learn the new CRL with the next policy "
        "snapshot. Enrolling it again needs a new token."
    )
