"""`palisade org|user|key|budget|limits|usage …`: a thin client over the /admin/v1 API.

Each command finds its server with `--url` / `PALISADE_URL` and its credential with
`--key` / `PALISADE_API_KEY`, falling back to `$PALISADE_HOME/admin.key` (the system
admin key the server writes on first start). HTTP errors print the server's OpenAI-shaped
message and code and exit 1; no command prints a key other than one it just created.
"""

from __future__ import annotations

import csv
import io
from enum import StrEnum
from typing import Annotated, Any
from urllib.parse import quote

import typer

from federation._private.admin_wire import UsageGroup
from federation._private.client import (
    DEFAULT_URL,
    JsonFlag,
    KeyOpt,
    Target,
    UrlOpt,
    call_api,
    fail,
    instant,
    print_json,
    resolve_target,
    table,
)
from federation._private.vocabulary import InvitedRole, LoggingMode

org_cli = typer.Typer(help="Manage organizations (tenants).", no_args_is_help=True)
user_cli = typer.Typer(help="Invite, list and remove users.", no_args_is_help=True)
key_cli = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
budget_cli = typer.Typer(help="Monthly token budgets per organization.", no_args_is_help=True)
limits_cli = typer.Typer(help="Per-key rate limits.", no_args_is_help=True)
usage_cli = typer.Typer(help="Usage and cost reports.", no_args_is_help=True)


class ReportFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


OrgFilter = Annotated[str | None, typer.Option("--org", help="Only this organization.")]


# --- plumbing ---------------------------------------------------------------------------


def _seg(value: str) -> str:
    return quote(value, safe="")


def _csv_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _or(value: object, fallback: str = "-") -> str:
    return fallback if value is None else str(value)


def _limit(value: object) -> str:
    return _or(value, "unlimited")


# --- org --------------------------------------------------------------------------------


@org_cli.command("create")
def org_create(
    name: Annotated[str, typer.Argument(help="Organization name (lowercase, e.g. acme).")],
    *,
    regions: Annotated[
        str, typer.Option("--regions", help="Comma-separated regions, e.g. eu-west,us-east.")
    ],
    budget_tokens: Annotated[
        int | None, typer.Option("--budget-tokens", help="Monthly token budget (default: none).")
    ] = None,
    logging_mode: Annotated[
        LoggingMode, typer.Option("--logging-mode", help="What request logs keep.")
    ] = "metadata",
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an organization pinned to REGIONS."""
    body = {
        "name": name,
        "regions": _csv_list(regions),
        "budget_tokens": budget_tokens,
        "logging_mode": logging_mode,
    }
    org = call_api(resolve_target(url, key), "POST", "/admin/v1/orgs", body=body)
    if as_json:
        print_json(org)
        return
    typer.echo(
        f"Created org {org['name']} (regions {','.join(org['regions'])}, "
        f"budget {_limit(org['budget_tokens'])} tokens/month, logging {org['logging_mode']})."
    )


@org_cli.command("list")
def org_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False) -> None:
    """List the organizations you can see."""
    listing = call_api(resolve_target(url, key), "GET", "/admin/v1/orgs")
    if as_json:
        print_json(listing)
        return
    rows = [
        [o["name"], ",".join(o["regions"]), _limit(o["budget_tokens"]), o["logging_mode"]]
        for o in listing["data"]
    ]
    typer.echo(table(["name", "regions", "budget_tokens", "logging"], rows))


# --- user -------------------------------------------------------------------------------


@user_cli.command("invite")
def user_invite(
    email: Annotated[str, typer.Argument(help="The invitee's email address.")],
    *,
    role: Annotated[InvitedRole, typer.Option("--role", help="Role in the organization.")],
    org: Annotated[
        str | None,
        typer.Option("--org", help="Organization to join (none for the fleet-wide auditor)."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Invite EMAIL to an organization (or as the fleet-wide `auditor`, with no --org);
    prints the one-time invitation token."""
    body = {"email": email, "role": role, **({"org": org} if org is not None else {})}
    invite = call_api(resolve_target(url, key), "POST", "/admin/v1/invites", body=body)
    if as_json:
        print_json(invite)
        return
    where = invite["org"] or "every organization"
    typer.echo(
        f"Invited {invite['email']} to {where} as {invite['role']} "
        f"(expires {invite['expires_at']})."
    )
    typer.echo(f"Invitation token (shown once): {invite['token']}")
    typer.echo(f"The invitee runs: palisade user accept {invite['token']}")


@user_cli.command("accept")
def user_accept(
    token: Annotated[str, typer.Argument(help="The invitation token.")],
    key_name: Annotated[
        str, typer.Option("--key-name", help="Name for your first API key.")
    ] = "default",
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonFlag = False,
) -> None:
    """Accept an invitation (no API key needed); prints your first API key once."""
    body = {"token": token, "key_name": key_name}
    result = call_api(Target(url, None), "POST", "/admin/v1/invites/accept", body=body)
    user, created = result["user"], result["key"]
    if as_json:
        print_json({"user": user, "key": created["key"], "key_info": created["info"]})
        return
    typer.echo(f"Welcome {user['email']}: user {user['id']}, {user['role']} in {user['org']}.")
    typer.echo(f"API key {created['info']['id']} (shown once, store it now):")
    typer.echo(created["key"])


@user_cli.command("list")
def user_list(
    org: OrgFilter = None, url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """List users (your organization's unless --org is given)."""
    listing = call_api(resolve_target(url, key), "GET", "/admin/v1/users", params={"org": org})
    if as_json:
        print_json(listing)
        return
    rows = [[u["id"], u["email"], u["role"], _or(u["org"])] for u in listing["data"]]
    typer.echo(table(["id", "email", "role", "org"], rows))


@user_cli.command("remove")
def user_remove(
    user_id: Annotated[str, typer.Argument(help="The user's id (usr_…).")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Remove a user; their keys stop working."""
    user = call_api(resolve_target(url, key), "DELETE", f"/admin/v1/users/{_seg(user_id)}")
    if as_json:
        print_json(user)
        return
    typer.echo(f"Removed user {user['id']} ({user['email']}).")


# --- key --------------------------------------------------------------------------------


@key_cli.command("create")
def key_create(
    name: Annotated[str, typer.Option("--name", help="A label for the key.")],
    *,
    regions: Annotated[
        str | None,
        typer.Option("--regions", help="Comma-separated regions to narrow the key to."),
    ] = None,
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", help="Expire the key after N days.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key for yourself; prints the key once."""
    body = {"name": name, "regions": _csv_list(regions), "expires_in_days": expires_in_days}
    created = call_api(resolve_target(url, key), "POST", "/admin/v1/keys", body=body)
    info = created["info"]
    if as_json:
        print_json({"id": info["id"], "key": created["key"], **info})
        return
    typer.echo(
        f"Created key {info['id']} ({info['name']}) for org {info['org']}, "
        f"expires {_or(info['expires_at'], 'never')}. Shown once, store it now:"
    )
    typer.echo(created["key"])


@key_cli.command("list")
def key_list(
    org: OrgFilter = None, url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonFlag = False
) -> None:
    """List keys (your own unless --org is given); never shows key secrets."""
    listing = call_api(resolve_target(url, key), "GET", "/admin/v1/keys", params={"org": org})
    if as_json:
        print_json(listing)
        return
    rows = [
        [
            k["id"],
            k["name"],
            k["user_id"],
            k["org"],
            "revoked" if k["revoked_at"] else "active",
            _or(k["expires_at"], "never"),
            _or(k["last_used_at"], "never"),
        ]
        for k in listing["data"]
    ]
    headers = ["id", "name", "user_id", "org", "status", "expires", "last_used"]
    typer.echo(table(headers, rows))


@key_cli.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a key; it stops working at once."""
    info = call_api(resolve_target(url, key), "DELETE", f"/admin/v1/keys/{_seg(key_id)}")
    if as_json:
        print_json(info)
        return
    typer.echo(f"Revoked key {info['id']} ({info['name']}) at {info['revoked_at']}.")


# --- budget and limits ------------------------------------------------------------------


def _print_budget(budget: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(budget)
        return
    typer.echo(
        f"Org {budget['org']}, {budget['month']}: {budget['used_tokens']} of "
        f"{_limit(budget['limit_tokens'])} tokens used ({budget['reserved_tokens']} reserved)."
    )


@budget_cli.command("set")
def budget_set(
    org: Annotated[str, typer.Argument(help="Organization name.")],
    *,
    tokens: Annotated[
        int | None, typer.Option("--tokens", help="Monthly token budget.", min=0)
    ] = None,
    unlimited: Annotated[bool, typer.Option("--unlimited", help="Remove the budget.")] = False,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Set an organization's monthly token budget."""
    if (tokens is None) == (not unlimited):
        raise fail("pass exactly one of --tokens N or --unlimited.")
    path = f"/admin/v1/orgs/{_seg(org)}/budget"
    budget = call_api(resolve_target(url, key), "PUT", path, body={"tokens": tokens})
    _print_budget(budget, as_json)


@budget_cli.command("show")
def budget_show(
    org: Annotated[str, typer.Argument(help="Organization name.")],
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Show an organization's budget and this month's spend."""
    budget = call_api(resolve_target(url, key), "GET", f"/admin/v1/orgs/{_seg(org)}/budget")
    _print_budget(budget, as_json)


@limits_cli.command("set")
def limits_set(
    key_id: Annotated[str | None, typer.Argument(help="The key's id.")] = None,
    *,
    org: Annotated[
        str | None,
        typer.Option(
            "--org",
            help="Set an organization's default key limits instead: the limits its members' "
            "new keys get, and the most they may ask for.",
        ),
    ] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.", min=1)] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.", min=1)] = None,
    burst: Annotated[int | None, typer.Option("--burst", help="Bucket depth.", min=1)] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """Replace a key's (or, with --org, an org's default key) rate limits; a limit you omit
    becomes unlimited."""
    if (key_id is None) == (org is None):
        raise fail("pass exactly one of a key id or --org ORG.")
    body = {"requests_per_minute": rpm, "tokens_per_minute": tpm, "burst": burst}
    path = (
        f"/admin/v1/orgs/{_seg(org)}/key-limits"
        if org is not None
        else f"/admin/v1/keys/{_seg(key_id or '')}/limits"
    )
    info = call_api(resolve_target(url, key), "PUT", path, body=body)
    if as_json:
        print_json(info)
        return
    limits = info["key_limits"] if org is not None else info["limits"]
    what = f"Org {info['name']} default key limits" if org is not None else f"Key {info['id']}"
    typer.echo(
        f"{what}: rpm {_limit(limits['requests_per_minute'])}, "
        f"tpm {_limit(limits['tokens_per_minute'])}, burst {_limit(limits['burst'])}."
    )


# --- usage ------------------------------------------------------------------------------


def _usage_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["group"],
        str(row["requests"]),
        str(row["input_tokens"]),
        str(row.get("cached_tokens", 0)),  # a server from before prompt caching has none
        str(row["output_tokens"]),
        f"{row['cost']:.6f}",
    ]


def _usage_text(report: dict[str, Any], fmt: ReportFormat) -> str:
    # `cached_tokens`: the part of `input_tokens` served from a prompt cache.
    headers = ["group", "requests", "input_tokens", "cached_tokens", "output_tokens", "cost"]
    rows = [_usage_cells(r) for r in [*report["rows"], report["total"]]]
    if fmt is ReportFormat.table:
        return table(headers, rows)
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([headers, *rows])
    return out.getvalue().rstrip("\n")


@usage_cli.command("report")
def usage_report(
    *,
    by: Annotated[UsageGroup, typer.Option("--by", help="Group rows by this.")] = "model",
    org: OrgFilter = None,
    since: Annotated[str | None, typer.Option("--since", help="From (ISO, inclusive).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="To (ISO, exclusive).")] = None,
    fmt: Annotated[
        ReportFormat, typer.Option("--format", help="Output format.")
    ] = ReportFormat.table,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
) -> None:
    """Requests, tokens (`cached_tokens`: input tokens served from a prompt cache) and
    cost, grouped, with a total row."""
    params = {
        "by": by,
        "org": org,
        "since": instant(since, "--since"),
        "until": instant(until, "--until"),
    }
    report = call_api(resolve_target(url, key), "GET", "/admin/v1/usage", params=params)
    if as_json or fmt is ReportFormat.json:
        print_json(report)
        return
    typer.echo(_usage_text(report, fmt))
