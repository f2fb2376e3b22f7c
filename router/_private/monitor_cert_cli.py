"""`palisade fleet monitor …`: client certificates for a scraper such as Prometheus.

The key is made here, on the operator's machine, and never leaves it: the router signs a
certificate request for it (as for a node's key) and records the certificate, so that
`revoke` can put it on the fleet CRL. Renewal is a new `issue` for the same name.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from federation import replace_private
from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    UrlOpt,
    call_api,
    print_json,
    resolve_target,
    table,
)
from router._private.ca import MONITOR_DAYS

monitor_cert_cli = typer.Typer(
    help="Monitor certificates for scraping nodes directly: issue, list, revoke.",
    no_args_is_help=True,
)
MONITORS_PATH = "/admin/v1/fleet/monitors"


@monitor_cert_cli.command("issue")
def monitor_issue_command(  # noqa: PLR0917 - typer maps each option to a parameter
    name: Annotated[str, typer.Option(help="The scraper's name, e.g. prometheus.")],
    out: Annotated[
        Path, typer.Option(help="Directory for <name>.key (0600), <name>.pem and ca.pem.")
    ],
    days: Annotated[int, typer.Option(help="How long the certificate is valid.")] = MONITOR_DAYS,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Make a key here and have the router certify it; issuing again for a name renews."""
    private_key = Ed25519PrivateKey.generate()
    body = {"name": name, "csr": _csr(private_key, name), "days": days}
    issued = call_api(resolve_target(url, key), "POST", MONITORS_PATH, body=body)
    paths = _write(out, name, private_key, issued)
    if as_json:
        print_json({**issued["monitor"], "files": [str(path) for path in paths]})
        return
    row = issued["monitor"]
    typer.echo(
        f"Monitor certificate for {row['name']} (serial {_serial(row)}), valid until "
        f"{_when(row['not_after'])}:\n"
        + "".join(f"  {path}\n" for path in paths)
        + "Give them to the scraper as tls_config cert_file, key_file and ca_file; issue "
        "again before it expires."
    )


@monitor_cert_cli.command("list")
def monitor_list_command(
    url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """Every monitor certificate issued: name, serial, expiry, who issued it, revocation."""
    listing = call_api(resolve_target(url, key), "GET", MONITORS_PATH)
    if as_json:
        print_json(listing)
        return
    rows: list[dict[str, Any]] = listing["data"]
    if not rows:
        typer.echo("No monitor certificate yet: palisade fleet monitor issue --name … --out ….")
        return
    headers = ["name", "state", "serial", "expires", "issued", "issued by"]
    typer.echo(table(headers, [_row(row) for row in rows]))


@monitor_cert_cli.command("revoke")
def monitor_revoke_command(
    name: Annotated[str, typer.Argument(help="The monitor whose certificates to revoke.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke every certificate issued for a monitor: nodes refuse them once they have the
    new CRL (the next policy snapshot)."""
    path = f"{MONITORS_PATH}/{quote(name, safe='')}/revoke"
    listing = call_api(resolve_target(url, key), "POST", path)
    if as_json:
        print_json(listing)
        return
    serials = ", ".join(_serial(row) for row in listing["data"])
    typer.echo(
        f"Monitor {name} revoked (serials {serials}): the router refuses its certificates from "
        "the next handshake, nodes once the next policy snapshot reaches them."
    )


def _csr(private_key: Ed25519PrivateKey, name: str) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(private_key, None)
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _write(
    out: Path, name: str, private_key: Ed25519PrivateKey, issued: dict[str, Any]
) -> list[Path]:
    """The key, certificate and CA under `out` (made private if new), each replaced whole."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = {
        out / f"{name}.key": key_pem,
        out / f"{name}.pem": issued["certificate"].encode("ascii"),
        out / "ca.pem": issued["ca"].encode("ascii"),
    }
    for path, data in files.items():
        replace_private(path, data)
    return list(files)


def _row(row: dict[str, Any]) -> list[str]:
    expired = row["state"] == "valid" and row["not_after"] < time.time()
    return [
        row["name"],
        "expired" if expired else row["state"],
        _serial(row),
        _when(row["not_after"]),
        _when(row["issued_at"]),
        row["issued_by"],
    ]


def _serial(row: dict[str, Any]) -> str:
    return f"{int(row['serial']):x}"[:16]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
