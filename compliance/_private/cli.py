"""`palisade audit verify|export|residency|content`.

`verify` is fully offline: it reads an export file and checks it with `verify_export`; no
server, network or PALISADE_URL is involved. `export` and `residency` are thin clients of
the /admin/v1/audit routes, configured like the management CLI: the server from `--url` /
`PALISADE_URL`, the credential from `--key` / `PALISADE_API_KEY`, falling back to
`$PALISADE_HOME/admin.key`; so is `content`, which reads back one request's sealed content.
Failures print one `error: …` line to stderr and exit 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from compliance._private.export import Report, verify_export
from compliance._private.fleet_evidence import is_fleet_set
from compliance._private.log import canonical
from federation import signature_valid
from federation.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    Target,
    UrlOpt,
    error_text,
    fail,
    instant,
    print_json,
    resolve_target,
    unreachable,
)

TIMEOUT = 300.0  # a full export of a busy node is large; the server builds it in one go
KEY_HEX_LENGTH = 64  # an Ed25519 public key is 32 bytes

audit_cli = typer.Typer(
    help="Audit log: export, verify and residency reports.", no_args_is_help=True
)

SinceOpt = Annotated[
    str | None, typer.Option("--since", help="From this ISO date or datetime (inclusive).")
]


# --- plumbing ------------------------------------------------------------------------------


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def fingerprint(public_key: bytes) -> str:
    """A short, comparable name for a node key: the first 16 hex digits of its SHA-256."""
    digest = hashlib.sha256(public_key).hexdigest()[:16]
    return "SHA256:" + ":".join(digest[i : i + 4] for i in range(0, len(digest), 4))


@contextmanager
def _get(target: Target, path: str, params: dict[str, str | None]) -> Iterator[httpx.Response]:
    """A streamed GET whose status is a success; exits 1 with one line on any failure."""
    query = {name: value for name, value in params.items() if value is not None}
    headers = {"Authorization": f"Bearer {target.key}"}
    try:
        with (
            httpx.Client(base_url=target.url.rstrip("/"), timeout=TIMEOUT) as client,
            client.stream("GET", path, params=query, headers=headers) as response,
        ):
            if response.is_error:
                response.read()
                raise fail(error_text(response))
            yield response
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise unreachable(target.url, exc) from None


def _writable(out: Path) -> Path:
    """`out`, after checking its folder exists, so no request is made for nothing."""
    if out.is_dir():
        raise fail(f"--out {out} is a directory; name the file to write.")
    if not out.parent.is_dir():
        raise fail(f"cannot write {out}: the folder {out.parent} does not exist.")
    return out


@contextmanager
def _replacing(out: Path) -> Iterator[Any]:
    """A binary file that becomes `out` (fsynced, atomically) only if the block succeeds."""
    partial = out.with_name(out.name + ".part")
    try:
        with partial.open("wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(partial, out)
    except OSError as exc:
        raise fail(f"cannot write {out}: {_reason(exc)}") from None
    finally:
        with suppress(OSError):
            partial.unlink()


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    value, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}, {count} bytes"


# --- verify --------------------------------------------------------------------------------


def _trusted_key(value: str | None) -> bytes | None:
    """--trusted-key: 64 hex digits, or `@path` to a file holding them."""
    if value is None:
        return None
    text, source = value, "--trusted-key"
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = _reason(exc) if isinstance(exc, OSError) else "not a text file"
            raise fail(f"cannot read the trusted key from {path}: {why}") from None
        source = str(path)
    text = text.strip().lower()
    if len(text) != KEY_HEX_LENGTH or not all(c in "0123456789abcdef" for c in text):
        raise fail(
            f"{source} must hold the node's Ed25519 public key as {KEY_HEX_LENGTH} hex "
            "digits (or pass @FILE for a file holding it)."
        )
    return bytes.fromhex(text)


def _read_export(file: Path) -> bytes:
    if str(file) == "-":
        return sys.stdin.buffer.read()
    try:
        return file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {_reason(exc)}") from None


def _context(data: bytes) -> dict[str, Any]:
    """Origin and scope of an export that verified (so it parses)."""
    document = json.loads(data)["export"]
    last = document["checkpoints"][-1] if document.get("checkpoints") else None
    return {
        "origin": document.get("origin"),
        "scope": document.get("scope") or {},
        "full": bool(document.get("full")),
        "tree_size": document.get("tree_size"),
        "last_checkpoint_time": json.loads(last["body"]).get("time") if last else None,
    }


def _scope_text(context: dict[str, Any]) -> str:
    if context["full"]:
        return "the whole log"
    scope = context["scope"]
    parts = [f"{name} {scope[name]}" for name in ("org", "since", "until") if scope.get(name)]
    return ", ".join(parts) or "filtered"


def _verify_json(file: Path, report: Report, trusted: bool, data: bytes) -> dict[str, Any]:
    key = bytes.fromhex(report.public_key) if report.public_key else b""
    return {
        "file": str(file),
        "ok": report.ok,
        "problem": report.problem,
        "entries": report.entries,
        "signed_entries": report.signed_entries,
        "unsigned_tail": report.unsigned_tail,
        "checkpoints": report.checkpoints,
        "public_key": report.public_key or None,
        "fingerprint": fingerprint(key) if key else None,
        "trusted_key_checked": trusted,
        "notes": report.notes,
        **(_context(data) if report.ok else {}),
    }


def _print_summary(file: Path, report: Report, trusted: bool, data: bytes) -> None:
    lines = [f"Audit export {file}: {'OK' if report.ok else 'FAILED'}"]
    if report.ok:
        context = _context(data)
        lines += [
            f"  origin           {context['origin']}",
            f"  scope            {_scope_text(context)}",
        ]
    lines += [
        f"  entries          {report.entries}",
        f"  signed entries   {report.signed_entries}",
        f"  unsigned tail    {report.unsigned_tail}",
        f"  checkpoints      {report.checkpoints}",
    ]
    if report.public_key:
        key = bytes.fromhex(report.public_key)
        trust = "matches --trusted-key" if trusted and report.ok else "as found in the file"
        lines += [
            f"  public key       {report.public_key}",
            f"  key fingerprint  {fingerprint(key)} ({trust})",
        ]
    lines += [f"  note: {note}" for note in report.notes]
    typer.echo("\n".join(lines))


@audit_cli.command("verify")
def audit_verify(
    file: Annotated[
        Path, typer.Argument(help="The export file (from `palisade audit export`); - for stdin.")
    ],
    trusted_key: Annotated[
        str | None,
        typer.Option(
            "--trusted-key",
            show_default=False,
            help="The node's Ed25519 public key: 64 hex digits, or @FILE holding them (for a "
            "fleet evidence set: the router's).",
        ),
    ] = None,
    node_key: Annotated[
        list[str] | None,
        typer.Option(
            "--node-key",
            show_default=False,
            help="For a fleet evidence set: a node's key as NODE=KEY (64 hex digits or @FILE), "
            "or another router's as ROUTER_ID=KEY; repeat for each.",
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Verify an audit export offline; exit 0 only if every check passes.

    Checks the signed checkpoints, the hash chain and every root (full exports) or each
    entry's inclusion proof (filtered exports), the consistency between checkpoints, the
    node's head checkpoint, and the manifest signature over the whole file. A fleet evidence
    set (`export --fleet`) is checked as one: each export alone, then the router's rows
    against each node's, naming every difference.
    """
    trusted = _trusted_key(trusted_key)
    data = _read_export(file)
    if is_fleet_set(data):
        from compliance._private.fleet_cli import node_keys, verify_fleet  # noqa: PLC0415 - cycle

        verify_fleet(file, data, trusted, node_keys(node_key or []), as_json=as_json)
        return
    report = verify_export(data, trusted_key=trusted)
    if as_json:
        print_json(_verify_json(file, report, trusted is not None, data))
    else:
        _print_summary(file, report, trusted is not None, data)
    if not report.ok:
        typer.echo(f"FAILED: {report.problem}", err=True)
        raise typer.Exit(1)


# --- export --------------------------------------------------------------------------------


@audit_cli.command("export")
def audit_export(
    *,
    out: Annotated[Path, typer.Option("--out", help="File to write the signed export to.")],
    org: Annotated[
        str | None, typer.Option("--org", help="Only this organization's entries.")
    ] = None,
    since: SinceOpt = None,
    until: Annotated[
        str | None, typer.Option("--until", help="Until this ISO date or datetime (exclusive).")
    ] = None,
    fleet: Annotated[
        bool,
        typer.Option(
            "--fleet",
            help="Through the router: its export of --org and the export of every node it sent "
            "the org's requests to, in one evidence set.",
        ),
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
) -> None:
    """Download a signed export of the audit log to FILE, byte for byte."""
    if fleet:
        if org is None or since is not None or until is not None:
            raise fail(
                "--fleet collects one org's whole evidence: give --org, not --since/--until."
            )
        target = resolve_target(url, key)
        from compliance._private.fleet_cli import export_fleet  # noqa: PLC0415 - cycle

        export_fleet(target, org, _writable(out))
        return
    params = {
        "org": org,
        "since": instant(since, "--since"),
        "until": instant(until, "--until"),
    }
    target = resolve_target(url, key)
    _writable(out)
    written = 0
    with _get(target, "/admin/v1/audit/export", params) as response, _replacing(out) as sink:
        for chunk in response.iter_bytes():
            sink.write(chunk)
            written += len(chunk)
    if not written:
        raise fail(f"{target.url} answered with an empty export; {out} is empty.")
    typer.echo(
        f"Wrote audit export {out} ({_size(written)}); check it offline with "
        f"`palisade audit verify {out} --trusted-key <node key>`."
    )


# --- residency -----------------------------------------------------------------------------


def _signature_problem(parsed: object) -> tuple[dict[str, Any], str | None]:
    """The signed document, and why its manifest does not verify (None if it does)."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("export"), dict):
        raise fail("the server's answer is not a signed residency report (no `export` object).")
    document: dict[str, Any] = parsed["export"]
    manifest = parsed.get("manifest")
    if not isinstance(manifest, dict):
        return document, "it has no manifest"
    body = canonical(document)
    if manifest.get("sha256") != hashlib.sha256(body).hexdigest():
        return document, "the manifest's SHA-256 does not match the report"
    try:
        key = bytes.fromhex(str(document.get("public_key", "")))
        signature = bytes.fromhex(str(manifest.get("signature", "")))
    except ValueError:
        return document, "its public key or signature is not hex"
    if not signature_valid(key, signature, body):
        return document, "the manifest signature does not verify"
    return document, None


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(_cell(item) for item in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def _listing(title: str, items: object) -> list[str]:
    """A section of the report: a table for a list of objects, else one value per line."""
    values: list[object] = items if isinstance(items, list) else [] if items is None else [items]
    if not values:
        return [f"{title}: none"]
    rows = [value for value in values if isinstance(value, dict)]
    if len(rows) != len(values):
        return [f"{title}:", *(f"  {_cell(value)}" for value in values)]
    headers: list[str] = []
    for row in rows:
        headers += [str(name) for name in row if str(name) not in headers]
    cells = [[_cell(row.get(name)) for name in headers] for row in rows]
    widths = [max(len(c) for c in column) for column in zip(headers, *cells, strict=True)]
    lines = [
        "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *cells]
    ]
    return [f"{title}:", *lines]


@audit_cli.command("residency")
def audit_residency(
    *,
    org: Annotated[str, typer.Option("--org", help="The organization to report on.")],
    since: SinceOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also write the signed report to this file.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Where an organization's requests ran: the regions and nodes, signed by the node."""
    params = {"org": org, "since": instant(since, "--since")}
    target = resolve_target(url, key)
    if out is not None:
        _writable(out)
    with _get(target, "/admin/v1/audit/residency", params) as response:
        data = response.read()
    try:
        parsed = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise fail(f"{target.url} answered with a residency report that is not JSON.") from None
    document, problem = _signature_problem(parsed)
    if problem is not None:
        raise fail(f"the residency report from {target.url} is not validly signed: {problem}.")
    if out is not None:
        with _replacing(out) as sink:
            sink.write(data)
    if as_json:
        print_json(parsed)
    else:
        key_hex = str(document.get("public_key", ""))
        lines = [
            f"Residency report for org {_cell(document.get('org'))}, "
            + (f"since {document['since']}" if document.get("since") else "all time"),
            f"  origin           {_cell(document.get('origin'))}",
            f"  signed by        {fingerprint(bytes.fromhex(key_hex))} ({key_hex})",
            *_listing("regions", document.get("regions")),
            *_listing("nodes", document.get("nodes")),
        ]
        typer.echo("\n".join(lines))
    if out is not None:
        typer.echo(f"Wrote residency report {out} ({_size(len(data))}).", err=as_json)


# --- content -------------------------------------------------------------------------------


@audit_cli.command("content")
def audit_content(
    request_id: Annotated[str, typer.Argument(help="The request's id (its audit row's `id`).")],
    *,
    node: Annotated[
        str | None,
        typer.Option("--node", help="Through the fleet's router (--url), from this node."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Read back a request's sealed content (orgs logging in `full`) from the node that
    served it, directly or (`--node`) through the router; the read is itself recorded in
    that node's audit log."""
    target = resolve_target(url, key)
    path = f"/audit/content/{quote(request_id, safe='')}"
    if node is not None:
        path = f"/fleet/nodes/{quote(node, safe='')}{path}"
    with _get(target, f"/admin/v1{path}", {}) as response:
        data = response.read()
    try:
        answer = json.loads(data)
        content = answer["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise fail(f"{target.url} answered with something that is not sealed content.") from None
    if as_json:
        print_json(answer)
        return
    typer.echo(
        f"Request {_cell(answer.get('id'))} of org {_cell(answer.get('org'))}, sealed "
        f"{_cell(answer.get('sealed_at'))} on node {_cell(answer.get('node'))} (this read is "
        "recorded in its audit log):"
    )
    typer.echo(json.dumps(content, indent=2, ensure_ascii=False))
