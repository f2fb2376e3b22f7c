"""`palisade node init|enroll|status`: bring a node into a fleet (see `bringup`)."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from federation import DiscoveryConfig, PalisadeError
from federation.client import JsonFlag, fail, print_json
from provisioning._private.bringup import BringupError, enroll_node, init_node, node_status
from provisioning._private.discover import discovered_fleet_url

node_cli = typer.Typer(
    help="Bring this node into a fleet: init, enroll, status.", no_args_is_help=True
)

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home",
        show_default=False,
        help="The node's state directory (default: $PALISADE_HOME, else ./var).",
    ),
]


def _home(home: Path | None) -> Path:
    return (home or Path(os.environ.get("PALISADE_HOME", "var"))).resolve()


def _refused(exc: PalisadeError) -> typer.Exit:
    code = f" ({exc.code})" if isinstance(exc, BringupError) else ""
    return fail(f"{exc}{code}")


@node_cli.command("init")
def init_command(
    region: Annotated[str, typer.Option(help="The region this node serves.")],
    node_id: Annotated[
        str | None,
        typer.Option("--node-id", help="The node's id (default: node-<first 8 hex of its key>)."),
    ] = None,
    device_class: Annotated[
        str | None,
        typer.Option("--device-class", help="cpu, gpu or rdu (default: any)."),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A DNS name or IP clients reach this node by (repeatable)."),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Give this node its key and node.toml (pending until `palisade node enroll`)."""
    where = _home(home)
    try:
        result = init_node(
            where, region=region, node_id=node_id, device_class=device_class, hosts=host or []
        )
    except PalisadeError as exc:
        raise _refused(exc) from None
    state = result.state
    if not result.changed:
        typer.echo(
            f"Node {state.node_id} ({state.region}) is already initialised in {where}; "
            "nothing changed."
        )
        return
    typer.echo(
        f"Node {state.node_id} initialised in {where} for region {state.region} (pending).\n"
        "Next: palisade node enroll --router <fleet URL> --token <token from "
        "`palisade fleet token create`>"
    )


@node_cli.command("enroll")
def enroll_command(  # noqa: PLR0917 - typer maps each option to a parameter
    token: Annotated[str, typer.Option(help="The enrollment token from the fleet operator.")],
    router: Annotated[
        str | None,
        typer.Option("--router", help="The router's fleet URL (default: the token's)."),
    ] = None,
    ca_fingerprint: Annotated[
        str | None,
        typer.Option(
            "--ca-fingerprint", help="Pin the fleet CA (sha256:…); must match the token's."
        ),
    ] = None,
    discover: Annotated[
        bool,
        typer.Option(
            "--discover",
            help="Find the router by zeroconf: one announcing the token's fleet and CA.",
        ),
    ] = False,
    interface: Annotated[
        list[str] | None,
        typer.Option(
            "--interface",
            help="IPv4 address of an interface to look on with --discover (repeatable; "
            "default 127.0.0.1).",
        ),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Check the router's CA against the pinned fingerprint, get this node's certificate."""
    where = _home(home)
    if discover and router is not None:
        raise fail("--discover finds the router's URL; drop it or --router.")
    try:
        if discover:
            router = discovered_fleet_url(token, interface or DiscoveryConfig().interfaces)
        state = enroll_node(where, token=token, router_url=router, ca_fingerprint=ca_fingerprint)
    except PalisadeError as exc:
        raise _refused(exc) from None
    typer.echo(
        f"Node {state.node_id} enrolled in fleet {state.fleet_id} (region {state.region}), "
        f"router {state.router_id} at {state.fleet_url}; CA {state.ca_fingerprint} pinned.\n"
        "Start it: palisade appliance serve"
    )


@node_cli.command("status")
def status_command(home: HomeOpt = None, as_json: JsonFlag = False) -> None:
    """This node's identity, enrollment and certificate."""
    try:
        status = node_status(_home(home))
    except PalisadeError as exc:
        raise _refused(exc) from None
    if as_json:
        print_json(status)
        return
    typer.echo("\n".join(_lines(status)))


def _lines(status: dict[str, Any]) -> list[str]:
    if status["state"] == "uninitialised":
        return [f"No node in {status['home']}: palisade node init --region <region>."]
    lines = [
        f"node:         {status['node_id']}",
        f"region:       {status['region']}",
        f"device class: {status['device_class'] or 'any'}",
        f"state:        {status['state']}",
        f"home:         {status['home']}",
    ]
    certificate = status.get("certificate")
    if certificate is None:
        return lines
    expires = datetime.fromtimestamp(certificate["not_after"], UTC)
    lines += [
        f"fleet:        {status['fleet_id']} via {status['fleet_url']}",
        f"router:       {status['router_id']}",
        f"CA:           {status['ca_fingerprint']}",
        f"certificate:  serial {certificate['serial'][:16]}, expires "
        f"{expires:%Y-%m-%dT%H:%M:%SZ} ({certificate['days_left']} days left)",
    ]
    if certificate["revoked"]:
        lines.append("REVOKED:      this node's certificate is on the fleet CRL.")
    return lines
