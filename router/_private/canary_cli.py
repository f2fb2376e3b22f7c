"""`palisade canary`: the canary run standalone, and the canary keys it runs with."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from prometheus_client import CollectorRegistry, start_http_server

from federation import CANARY_KEY_FILE, convert_config
from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    UrlOpt,
    call_api,
    fail,
    print_json,
    resolve_target,
    trusted_cas,
)
from router._private.canary import (
    Canary,
    CanaryError,
    CanaryMetrics,
    CanaryPolicy,
    ProbeResult,
    parse_duration,
)
from router._private.config import RouterConfig

canary_cli = typer.Typer(
    help="Probe every region and device class through the router with a small synthetic "
    "request (run standalone; the router can run it itself: [canary] or --canary-every).",
    invoke_without_command=True,
)


@canary_cli.callback()
def canary_command(  # noqa: PLR0917 - typer maps each option to a parameter
    ctx: typer.Context,
    every: Annotated[
        str, typer.Option("--every", help="How often a round probes every target (60s, 5m).")
    ] = "60s",
    timeout: Annotated[
        str, typer.Option("--timeout", help="A probe unanswered this long fails.")
    ] = "10s",
    once: Annotated[
        bool, typer.Option("--once", help="One round, then exit (1 if any probe failed).")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Also serve the canary's Prometheus metrics on 127.0.0.1:PORT (/metrics).",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            envvar="PALISADE_CANARY_KEY",
            show_default=False,
            help=f"The canary key (default: $PALISADE_HOME/{CANARY_KEY_FILE}).",
        ),
    ] = None,
) -> None:
    """Probe each (region, device class) of the fleet every --every; one line per probe."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        every_s, timeout_s = parse_duration(every), parse_duration(timeout)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if every_s < 1 or not 0 < timeout_s <= 3600:
        raise fail("--every must be at least 1s and --timeout between 0 and 1h.")
    registry = CollectorRegistry()
    metrics = CanaryMetrics(registry)
    if metrics_port is not None:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    canary = Canary(
        CanaryPolicy(every_s),
        metrics,
        url=url,
        key=_canary_key(key),
        timeout_s=timeout_s,
        tls=trusted_cas() if url.startswith("https:") else None,
        report=_print_result,
    )
    try:
        results = asyncio.run(_run(canary, once=once))
    except CanaryError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    if once and any(result.outcome == "error" for result in results):
        raise typer.Exit(1)


async def _run(canary: Canary, *, once: bool) -> list[ProbeResult]:
    async with canary:
        if once:
            return await canary.round(await canary.fleet_targets())
        return await canary.run(canary.fleet_targets)


@canary_cli.command("key")
def key_command(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False) -> None:
    """Issue a new canary key (a system admin's key; shown once): the canary user's, allowed
    in every region of the fleet, with tight rate limits."""
    created = call_api(resolve_target(url, key), "POST", "/federation/v1/canary/keys")
    if as_json:
        print_json(created)
        return
    info = created["info"]
    typer.echo(f"Created canary key {info['id']} (org {info['org']}). Shown once, store it now:")
    typer.echo(created["key"])


def with_canary_every(settings: RouterConfig, every: str | None) -> RouterConfig:
    """`palisade router serve --canary-every 60s`: the router's own canary on, that often."""
    if every is None:
        return settings
    try:
        every_s = parse_duration(every)
    except ValueError as exc:
        raise fail(f"--canary-every: {exc}") from None
    canary = msgspec.structs.replace(settings.canary, enabled=True, every_s=every_s)
    return convert_config(
        msgspec.to_builtins(msgspec.structs.replace(settings, canary=canary)),
        RouterConfig,
        source="--canary-every",
    )


def _canary_key(key: str | None) -> str:
    if key:
        return key.strip()
    path = Path(os.environ.get("PALISADE_HOME", "var")).resolve() / CANARY_KEY_FILE
    try:
        return path.read_text().strip()
    except OSError:
        raise fail(
            f"no canary key: pass --key, set PALISADE_CANARY_KEY, or run the router with its "
            f"canary on (it writes {path}); `palisade canary key` issues one."
        ) from None


def _print_result(result: ProbeResult) -> None:
    target = result.target
    when = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    typer.echo(
        f"{when} {target.region} {target.device_class} {target.model} {result.outcome} "
        f"{result.elapsed_s * 1000:.1f}ms {result.reason}"
    )
