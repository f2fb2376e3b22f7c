"""`palisade router …` and `palisade fleet …`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from federation import PalisadeError
from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    UrlOpt,
    call_api,
    fail,
    print_json,
    resolve_target,
    table,
)
from router._private.config import load_router_config, palisade_home
from router._private.local_fleet import check_regions, run_local_fleet
from router._private.server import serve

router_cli = typer.Typer(help="Run the federated front door.", no_args_is_help=True)
fleet_cli = typer.Typer(help="Watch and run a fleet of appliances.", no_args_is_help=True)


@router_cli.command("serve")
def serve_command(
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
) -> None:
    """Serve the OpenAI API in front of the fleet (needs PALISADE_JOIN_SECRET)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    regions = [r.strip() for r in demo_regions.split(",") if r.strip()] if demo_regions else None
    try:
        settings = load_router_config(config, {"host": host, "port": port})
        code = serve(settings, demo_regions=regions)
    except PalisadeError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)


@fleet_cli.command("status")
def status_command(
    url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """Every node: region, device class, models, state, load, TTFT, heartbeat age, restarts."""
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
    ]
    rows = [
        [
            node["node_id"],
            node["region"],
            ",".join(node["device_classes"]) or "-",
            ",".join(node["models"]) or "-",
            node["state"],
            str(node["in_flight"]),
            str(node["queue_depth"]),
            "-" if node["ttft_p50_ms"] is None else f"{node['ttft_p50_ms']:.1f}",
            f"{node['heartbeat_age_s']:.1f}",
            _restarts(node),
            node["version"],
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


def _restarts(node: dict[str, Any]) -> str:
    count = str(node.get("restarts", 0))
    return f"{count} (crash loop)" if node.get("crash_loop") else count


@fleet_cli.command("up")
def up_command(
    regions: Annotated[
        str, typer.Option(help="Comma-separated regions; one appliance is started in each.")
    ] = "eu-west,us-east",
    port: Annotated[int, typer.Option(help="Router port (0 picks a free one).")] = 8300,
    model: Annotated[
        str, typer.Option(help="Model id the printed curl line asks for.")
    ] = "smollm2-135m-instruct",
) -> None:
    """Run a local fleet: the router plus one appliance per region on the default model."""
    logging.basicConfig(level=logging.WARNING)
    try:
        code = run_local_fleet(palisade_home(), check_regions(regions), port, model)
    except PalisadeError as exc:
        raise fail(str(exc)) from None
    raise typer.Exit(code)
