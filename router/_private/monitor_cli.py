"""`palisade monitor key`: the key Prometheus sends to scrape the fleet through the router."""

from __future__ import annotations

import typer

from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    UrlOpt,
    call_api,
    print_json,
    resolve_target,
)
from router._private.prometheus_routes import MONITOR_KEYS_PATH

monitor_cli = typer.Typer(
    help="Prometheus's access to the fleet: monitor keys, which read the scrape targets and "
    "node metrics and nothing else.",
    no_args_is_help=True,
)


@monitor_cli.command("key")
def key_command(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False) -> None:
    """Issue a new monitor key (a system admin's key; shown once): the monitor user's, which
    may read the scrape targets and each node's metrics through the router, nothing else.
    Store it 0600 and name it in Prometheus's `credentials_file`."""
    created = call_api(resolve_target(url, key), "POST", MONITOR_KEYS_PATH)
    if as_json:
        print_json(created)
        return
    info = created["info"]
    typer.echo(f"Created monitor key {info['id']} (org {info['org']}). Shown once, store it now:")
    typer.echo(created["key"])
