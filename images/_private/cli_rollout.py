"""`palisade fleet update` and `palisade fleet updates …`: hand a bundle to the router for a
rollout and follow it (registered onto the router's `fleet` command group by
palisade/__main__.py; the router side is router/_private/rollout.py).

The bundle is verified here first, against the operator's trust file, so the operator sees
what is about to go out (version, hardware class, region, signing key) and a bad bundle is
refused before a byte is uploaded. The router stores it only if its SHA-256 is the one
computed here, and each node verifies it again against its own pinned keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from federation import file_sha256
from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    Target,
    UrlOpt,
    call_api,
    error_text,
    fail,
    print_json,
    resolve_target,
    table,
    trusted_cas,
    unreachable,
)
from images._private.errors import ImageError
from images._private.keys import TrustSet, default_trust_file
from images._private.verify import VerifiedBundle, verify_bundle

_CHUNK = 1024 * 1024
# Per network operation (connect, each read and write), not for the whole upload.
_TIMEOUT = 30.0
_ENDED = {"completed", "stopped"}

BundleArg = Annotated[
    Path, typer.Argument(help="The signed bundle (.pimg) to roll out.", show_default=False)
]
RegionOpt = Annotated[
    str, typer.Option("--region", help="The region whose nodes install it.", show_default=False)
]
BatchOpt = Annotated[
    int, typer.Option("--batch", min=1, max=10_000, help="Nodes updated at a time.")
]
TrustOpt = Annotated[
    Path | None,
    typer.Option(
        "--trust",
        help="Release key trust file the bundle is verified against "
        "(default: $PALISADE_HOME/image/trust.json).",
        show_default=False,
    ),
]
WaitFlag = Annotated[
    bool, typer.Option("--wait", help="Follow the rollout until it completes or stops.")
]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", help="With --wait: give up waiting after this many seconds."),
]
RolloutArg = Annotated[str, typer.Argument(help="The rollout id (upd-…).", show_default=False)]


def register_fleet(app: typer.Typer) -> None:
    """Add `update` and `updates list|show|stop` to the `palisade fleet` group `app`."""
    app.command("update")(update_command)
    updates = typer.Typer(help="Image rollouts: list, show, stop.", no_args_is_help=True)
    updates.command("list")(list_command)
    updates.command("show")(show_command)
    updates.command("stop")(stop_command)
    app.add_typer(updates, name="updates")


def update_command(  # noqa: PLR0917 - typer maps each option to a parameter
    bundle: BundleArg,
    region: RegionOpt,
    trust: TrustOpt = None,
    batch: BatchOpt = 1,
    wait: WaitFlag = False,
    timeout: TimeoutOpt = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Verify a bundle and roll it out to a region's nodes, a batch at a time: each batch
    must commit before the next is offered; a node that rolls back stops the rollout."""
    target = resolve_target(url, key)
    verified = _verified(bundle, trust, region)
    manifest = verified.manifest
    if not as_json:
        typer.echo(
            f"Bundle {bundle}: version {manifest.version}, hardware {manifest.compatible}, "
            f"region {manifest.region}, signed by release key {verified.signed_by}."
        )
    digest, size = _sha256(bundle)
    params = {"region": region, "version": manifest.version, "sha256": digest, "batch": batch}
    rollout = _upload(target, bundle, size, params)
    if as_json and not wait:
        print_json(rollout)
        return
    if not as_json:
        typer.echo(
            f"Rollout {rollout['id']} of {rollout['version']} to {rollout['region']}: "
            f"{rollout['total']} nodes in batches of {rollout['batch']} "
            f"({size} bytes, sha256 {digest})."
        )
    if wait:
        _follow(target, rollout, timeout=timeout, as_json=as_json)


def list_command(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False) -> None:
    """Every rollout, newest first: version, region, state, progress."""
    listing = call_api(resolve_target(url, key), "GET", "/admin/v1/fleet/updates")
    if as_json:
        print_json(listing)
        return
    rollouts: list[dict[str, Any]] = listing["data"]
    if not rollouts:
        typer.echo("No rollouts yet: palisade fleet update X.pimg --region R.")
        return
    headers = ["rollout", "version", "region", "state", "done", "batch", "reason"]
    rows = [
        [
            rollout["id"],
            rollout["version"],
            rollout["region"],
            rollout["state"],
            f"{rollout['done']}/{rollout['total']}",
            str(rollout["batch"]),
            rollout["reason"] or "-",
        ]
        for rollout in rollouts
    ]
    typer.echo(table(headers, rows))


def show_command(
    rollout_id: RolloutArg, url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """One rollout: its state and where each node is."""
    rollout = call_api(resolve_target(url, key), "GET", _path(rollout_id))
    if as_json:
        print_json(rollout)
        return
    typer.echo(_summary(rollout))
    headers = ["node", "batch", "step", "detail"]
    rows = [
        [node["node_id"], str(node["batch"] + 1), node["step"], node["detail"] or "-"]
        for node in rollout["nodes"]
    ]
    typer.echo(table(headers, rows))


def stop_command(
    rollout_id: RolloutArg, url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """Stop a rollout: nothing more is offered; nodes already updating finish on their own."""
    rollout = call_api(resolve_target(url, key), "POST", f"{_path(rollout_id)}/stop")
    if as_json:
        print_json(rollout)
        return
    typer.echo(_summary(rollout))


def _verified(bundle: Path, trust_file: Path | None, region: str) -> VerifiedBundle:
    if trust_file is None:
        trust_file = default_trust_file()
    try:
        return verify_bundle(bundle, TrustSet.load(trust_file), region=region)
    except ImageError as exc:
        raise fail(str(exc)) from None


def _sha256(bundle: Path) -> tuple[str, int]:
    try:
        return file_sha256(bundle), bundle.stat().st_size
    except OSError as exc:
        raise fail(f"cannot read {bundle}: {exc.strerror or exc}") from None


def _upload(target: Target, bundle: Path, size: int, params: dict[str, Any]) -> Any:
    """POST the bundle's bytes, streamed from the file, with its metadata in the query."""
    headers = {
        "Authorization": f"Bearer {target.key}",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(size),
    }
    try:
        with (
            bundle.open("rb") as source,
            httpx.Client(
                base_url=target.url.rstrip("/"), timeout=_TIMEOUT, verify=trusted_cas()
            ) as client,
        ):
            response = client.post(
                "/admin/v1/fleet/updates",
                content=_chunks(source),
                params=params,
                headers=headers,
            )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise unreachable(target.url, exc) from None
    except OSError as exc:
        raise fail(f"cannot read {bundle}: {exc.strerror or exc}") from None
    if response.is_error:
        raise fail(error_text(response))
    return response.json()


def _chunks(source: Any) -> Any:
    while chunk := source.read(_CHUNK):
        yield chunk


def _follow(
    target: Target, rollout: dict[str, Any], *, timeout: float | None, as_json: bool
) -> None:
    """Poll the rollout, printing each node's progress, until it ends (exit 1 if stopped)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        rollout = call_api(target, "GET", _path(rollout["id"]))
        if not as_json:
            for node in rollout["nodes"]:
                step = node["step"]
                if seen.get(node["node_id"], "pending") != step:
                    done = f"{rollout['done']}/{rollout['total']}"
                    detail = f": {node['detail']}" if node["detail"] else ""
                    typer.echo(f"  {node['node_id']}: {step}{detail} ({done} done)")
                seen[node["node_id"]] = step
        if rollout["state"] in _ENDED:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise fail(
                f"rollout {rollout['id']} is still running after {timeout:g} s "
                f"({rollout['done']}/{rollout['total']} done); `palisade fleet updates show "
                f"{rollout['id']}` follows it (rollout_wait_timeout)"
            )
        time.sleep(1.0)
    if as_json:
        print_json(rollout)
    else:
        typer.echo(_summary(rollout))
    if rollout["state"] == "stopped":
        raise fail(f"rollout {rollout['id']} stopped: {rollout['reason']} (rollout_stopped)")


def _summary(rollout: dict[str, Any]) -> str:
    progress = f"{rollout['done']}/{rollout['total']} nodes done"
    reason = f": {rollout['reason']}" if rollout["reason"] else ""
    return (
        f"Rollout {rollout['id']} of {rollout['version']} to {rollout['region']}: "
        f"{rollout['state']}{reason} ({progress})."
    )


def _path(rollout_id: str) -> str:
    return f"/admin/v1/fleet/updates/{quote(rollout_id, safe='')}"
