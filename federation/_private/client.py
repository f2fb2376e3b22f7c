"""What every `palisade` client command shares: finding the server and the key, calling it,
and turning failures into one `error:` line with exit code 1."""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

# The router of `make run` (`palisade fleet up`): HTTPS with the fleet CA (see trusted_cas).
DEFAULT_URL = "https://127.0.0.1:8300"
TIMEOUT = 30.0

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="PALISADE_URL", help="Base URL of the Palisade server.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        envvar="PALISADE_API_KEY",
        show_default=False,
        help="API key (default: $PALISADE_HOME/admin.key).",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@dataclass(frozen=True)
class Target:
    """Where a command sends its request, and the key it authenticates with (if any)."""

    url: str
    key: str | None


def fail(message: str) -> typer.Exit:
    """Print `error: message` and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def resolve_target(url: str, key: str | None) -> Target:
    """The server plus a key: --key / PALISADE_API_KEY, else $PALISADE_HOME/admin.key."""
    if not key:
        path = Path(os.environ.get("PALISADE_HOME", "var")).resolve() / "admin.key"
        try:
            key = path.read_text().strip()
        except FileNotFoundError:
            key = ""
        except OSError as exc:
            raise fail(f"cannot read {path}: {exc.strerror or exc}") from None
        if not key:
            raise fail(
                "no API key: pass --key, set PALISADE_API_KEY, or point PALISADE_HOME at the "
                f"server's state directory (no key in {path})."
            )
    key = key.strip()
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise fail(
            "the API key has spaces or non-ASCII characters; "
            "check --key, PALISADE_API_KEY or admin.key."
        )
    return Target(url, key)


def error_text(response: httpx.Response) -> str:
    """`<message> (<code>)` from an OpenAI-shaped error body, or the best we can say."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return f"{error['message']} ({error.get('code') or response.status_code})"
    detail = body.get("detail") if isinstance(body, dict) else None
    text = detail or response.text.strip()[:200] or response.reason_phrase
    return f"{text} (HTTP {response.status_code})"


def unreachable(url: str, exc: Exception) -> typer.Exit:
    reason = str(exc).rstrip(".") or type(exc).__name__
    return fail(f"cannot reach {url}: {reason}. Is the server running? Set --url or PALISADE_URL.")


def print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def instant(value: str | None, flag: str) -> str | None:
    """An ISO date or datetime in the server's timestamp form (UTC, milliseconds).

    Timestamps are compared as strings on the server, so bounds must be written the same way.
    """
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"{flag} must be an ISO date or datetime, e.g. 2025-06-01.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


def trusted_cas() -> ssl.SSLContext:
    """What client commands trust for https:// URLs: the public CAs, plus the fleet CA in
    $PALISADE_HOME (the router's `fleet/ca.pem`, or a node's pinned copy) when there is one,
    so `palisade fleet status --url https://…` works against the router of `fleet up`."""
    context = httpx.create_ssl_context()  # httpx's default: certifi, or SSL_CERT_FILE
    fleet_ca = Path(os.environ.get("PALISADE_HOME", "var")).resolve() / "fleet" / "ca.pem"
    if fleet_ca.is_file():
        try:
            context.load_verify_locations(cafile=fleet_ca)
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"cannot use the fleet CA {fleet_ca}: {exc}") from None
    return context


def call_api(
    target: Target,
    method: str,
    path: str,
    *,
    body: object = None,
    params: dict[str, str | None] | None = None,
    timeout: float = TIMEOUT,
) -> Any:
    """One API request; exits 1 with a one-line message on any failure. `timeout`: for
    requests that wait for work on the server (a model loading)."""
    headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
    query = {k: v for k, v in (params or {}).items() if v is not None}
    try:
        with httpx.Client(
            base_url=target.url.rstrip("/"), timeout=timeout, verify=trusted_cas()
        ) as client:
            response = client.request(method, path, json=body, params=query, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise unreachable(target.url, exc) from None
    if response.is_error:
        raise fail(error_text(response))
    try:
        return response.json()
    except ValueError:
        raise fail(f"{target.url} answered {method} {path} with a body that is not JSON") from None


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in lines
    )
