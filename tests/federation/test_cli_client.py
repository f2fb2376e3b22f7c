"""The management CLI (`palisade org|user|key|budget|limits|usage`) against a real appliance."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.palisade.test_cli import help_screen
from tests.support import Appliance, model_toml, run_appliance, run_palisade, wait_for

MODEL = "smollm2-135m-instruct"
ORG = "acme"


@dataclass(frozen=True)
class Server:
    appliance: Appliance
    admin_key: str
    empty_home: Path


@dataclass(frozen=True)
class Member:
    user_id: str
    key: str
    key_id: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("cli-client-home")
    config = "\n".join(
        [
            'node_id = "edge-cli-1"',
            'region = "eu-west"',
            model_toml(**{"pricing.input_per_million": 0.5, "pricing.output_per_million": 1.5}),
        ]
    )
    with run_appliance(home, config) as appliance:
        admin_key = wait_for(lambda: _admin_key(home), timeout=10)
        yield Server(appliance, admin_key, tmp_path_factory.mktemp("no-key-home"))


def _admin_key(home: Path) -> str | None:
    path = home / "admin.key"
    return path.read_text().strip() if path.is_file() else None


def palisade(
    server: Server,
    *args: str,
    ok: bool = True,
    home: Path | None = None,
    url: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would; never a traceback, never the admin key in its output."""
    env = {
        "PALISADE_HOME": str(home or server.appliance.home),
        "PALISADE_URL": url or server.appliance.url,
    }
    result = run_palisade(*args, env=env, unset=("PALISADE_API_KEY",))
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert server.admin_key not in output
    if ok:
        assert result.returncode == 0, output
    else:
        assert result.returncode == 1, output
        assert result.stderr.startswith("error: "), output
    return result


def as_json(server: Server, *args: str) -> Any:
    return json.loads(palisade(server, *args, "--json").stdout)


def invite_and_accept(server: Server, email: str, role: str) -> Member:
    invite = as_json(server, "user", "invite", email, "--org", ORG, "--role", role)
    assert invite["email"] == email
    assert invite["org"] == ORG
    # Accepting needs no key: run it where there is no admin.key and no PALISADE_API_KEY.
    accepted = json.loads(
        palisade(
            server, "user", "accept", invite["token"], "--key-name", "first", "--json",
            home=server.empty_home,
        ).stdout
    )  # fmt: skip
    assert accepted["user"]["email"] == email
    assert accepted["user"]["role"] == role
    assert accepted["key"].startswith("pal-sk-")
    assert accepted["key_info"]["name"] == "first"
    return Member(accepted["user"]["id"], accepted["key"], accepted["key_info"]["id"])


@pytest.fixture(scope="module")
def alice(server: Server) -> Member:
    """An org admin of `acme` (created here, with the org, by the system admin)."""
    org = as_json(
        server, "org", "create", ORG, "--regions", "eu-west,us-east",
        "--budget-tokens", "100000", "--logging-mode", "metadata",
    )  # fmt: skip
    assert org["name"] == ORG
    assert org["regions"] == ["eu-west", "us-east"]
    assert org["budget_tokens"] == 100000
    assert org["logging_mode"] == "metadata"
    return invite_and_accept(server, "alice@acme.test", "org_admin")


# --- help -------------------------------------------------------------------------------

COMMANDS = [
    ["org"], ["org", "create"], ["org", "list"],
    ["user"], ["user", "invite"], ["user", "accept"], ["user", "list"], ["user", "remove"],
    ["key"], ["key", "create"], ["key", "list"], ["key", "revoke"],
    ["budget"], ["budget", "set"], ["budget", "show"],
    ["limits"], ["limits", "set"],
    ["usage"], ["usage", "report"],
]  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_command_has_help(args: list[str]) -> None:
    screen = help_screen(*args)
    if len(args) == 2:
        assert "--url" in screen
        assert "--json" in screen


# --- orgs and users ---------------------------------------------------------------------


def test_org_list(server: Server, alice: Member) -> None:
    listing = as_json(server, "org", "list")
    assert [o["name"] for o in listing["data"]] == [ORG]
    table = palisade(server, "org", "list").stdout.splitlines()
    assert table[0].split() == ["name", "regions", "budget_tokens", "logging"]
    assert table[1].split() == [ORG, "eu-west,us-east", "100000", "metadata"]


def test_an_org_admin_sees_only_its_org(server: Server, alice: Member) -> None:
    listing = as_json(server, "org", "list", "--key", alice.key)
    assert [o["name"] for o in listing["data"]] == [ORG]


def test_accept_prints_the_new_key_once(server: Server, alice: Member) -> None:
    invite = as_json(server, "user", "invite", "bob@acme.test", "--org", ORG, "--role", "org_user")
    result = palisade(server, "user", "accept", invite["token"], home=server.empty_home)
    key = result.stdout.splitlines()[-1]
    assert key.startswith("pal-sk-")
    assert result.stdout.count(key) == 1
    assert "bob@acme.test" in result.stdout
    # The token is single-use.
    again = palisade(server, "user", "accept", invite["token"], ok=False)
    assert again.stderr.rstrip().endswith("(invalid_invite)")


def test_invite_prints_the_token(server: Server, alice: Member) -> None:
    result = palisade(
        server, "user", "invite", "carol@acme.test", "--org", ORG, "--role", "org_user",
        "--key", alice.key,
    )  # fmt: skip
    assert "carol@acme.test" in result.stdout
    assert "palisade user accept " in result.stdout


def test_user_list_and_remove(server: Server, alice: Member) -> None:
    dave = invite_and_accept(server, "dave@acme.test", "org_user")
    users = as_json(server, "user", "list", "--org", ORG)["data"]
    assert {"alice@acme.test", "dave@acme.test"} <= {u["email"] for u in users}
    table = palisade(server, "user", "list", "--key", alice.key).stdout
    assert table.splitlines()[0].split() == ["id", "email", "role", "org"]
    assert dave.user_id in table

    removed = as_json(server, "user", "remove", dave.user_id)
    assert removed["id"] == dave.user_id
    users = as_json(server, "user", "list", "--org", ORG)["data"]
    assert dave.user_id not in {u["id"] for u in users}
    gone = palisade(server, "key", "list", "--key", dave.key, ok=False)
    assert gone.stderr.rstrip().endswith("(invalid_api_key)")
    assert dave.key not in gone.stderr


# --- keys -------------------------------------------------------------------------------


def test_key_create_list_revoke(server: Server, alice: Member) -> None:
    created = as_json(
        server, "key", "create", "--name", "ci", "--regions", "eu-west",
        "--expires-in-days", "30", "--key", alice.key,
    )  # fmt: skip
    assert created["key"].startswith("pal-sk-")
    assert created["name"] == "ci"
    assert created["regions"] == ["eu-west"]
    assert created["expires_at"] is not None
    key_id, secret = created["id"], created["key"]

    listing = as_json(server, "key", "list", "--key", alice.key)
    assert {alice.key_id, key_id} <= {k["id"] for k in listing["data"]}
    assert secret not in json.dumps(listing)
    table = palisade(server, "key", "list", "--org", ORG).stdout
    assert key_id in table
    assert secret not in table

    # The new key works as a credential, then stops working once revoked.
    as_json(server, "key", "list", "--key", secret)
    revoked = as_json(server, "key", "revoke", key_id, "--key", alice.key)
    assert revoked["id"] == key_id
    assert revoked["revoked_at"] is not None
    refused = palisade(server, "key", "list", "--key", secret, ok=False)
    assert refused.stderr.rstrip().endswith("(invalid_api_key)")
    assert secret not in refused.stderr


def test_key_create_prints_the_key_once(server: Server, alice: Member) -> None:
    result = palisade(server, "key", "create", "--name", "laptop", "--key", alice.key)
    key = result.stdout.splitlines()[-1]
    assert key.startswith("pal-sk-")
    assert result.stdout.count(key) == 1


def test_a_key_cannot_widen_its_orgs_regions(server: Server, alice: Member) -> None:
    result = palisade(
        server, "key", "create", "--name", "x", "--regions", "ap-south", "--key", alice.key,
        ok=False,
    )  # fmt: skip
    assert result.stderr.rstrip().endswith("(invalid_value)")


# --- budgets and limits -----------------------------------------------------------------


def test_budget_set_and_show(server: Server, alice: Member) -> None:
    budget = as_json(server, "budget", "set", ORG, "--tokens", "50000")
    assert budget["org"] == ORG
    assert budget["limit_tokens"] == 50000
    shown = as_json(server, "budget", "show", ORG, "--key", alice.key)
    assert shown["limit_tokens"] == 50000
    assert "50000" in palisade(server, "budget", "show", ORG).stdout


def test_limits_set(server: Server, alice: Member) -> None:
    created = as_json(server, "key", "create", "--name", "limited", "--key", alice.key)
    info = as_json(
        server, "limits", "set", created["id"], "--rpm", "100", "--tpm", "200000",
        "--burst", "10", "--key", alice.key,
    )  # fmt: skip
    assert info["id"] == created["id"]
    assert info["limits"] == {
        "requests_per_minute": 100,
        "tokens_per_minute": 200000,
        "burst": 10,
    }
    text = palisade(server, "limits", "set", created["id"], "--rpm", "5").stdout
    assert "rpm 5" in text
    assert "tpm unlimited" in text


def test_limits_set_for_an_org_caps_the_keys_its_members_make(
    server: Server, alice: Member
) -> None:
    shown = as_json(server, "limits", "set", "--org", ORG, "--rpm", "7", "--key", alice.key)
    assert shown["key_limits"] == {
        "requests_per_minute": 7,
        "tokens_per_minute": None,
        "burst": None,
    }
    text = palisade(server, "limits", "set", "--org", ORG, "--rpm", "7", "--tpm", "9000").stdout
    assert f"Org {ORG} default key limits: rpm 7, tpm 9000, burst unlimited." in text
    created = as_json(server, "key", "create", "--name", "capped", "--key", alice.key)
    assert created["limits"]["requests_per_minute"] == 7
    for args in ([], [created["id"], "--org", ORG]):
        refused = palisade(server, "limits", "set", *args, "--rpm", "1", ok=False)
        assert "exactly one of a key id or --org ORG" in refused.stderr
    palisade(server, "limits", "set", "--org", ORG)  # back to unlimited for the other tests


# --- usage ------------------------------------------------------------------------------


_USAGE_COLUMNS = ["group", "requests", "input_tokens", "cached_tokens", "output_tokens", "cost"]


def _usage(server: Server, *args: str) -> Any:
    return json.loads(palisade(server, "usage", "report", *args, "--format", "json").stdout)


def test_usage_report_in_every_format(server: Server, alice: Member) -> None:
    with openai.OpenAI(base_url=server.appliance.v1, api_key=alice.key, max_retries=0) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert completion.usage is not None

    report = wait_for(
        lambda: (r := _usage(server, "--by", "model", "--org", ORG))["rows"] and r, timeout=10
    )
    assert report["by"] == "model"
    [row] = report["rows"]
    assert row["group"] == MODEL
    assert row["requests"] == 1  # the only completion in this module
    assert row["input_tokens"] == completion.usage.prompt_tokens
    assert row["output_tokens"] == completion.usage.completion_tokens
    assert row["cost"] > 0
    assert report["total"]["requests"] == row["requests"]

    table = palisade(server, "usage", "report", "--by", "model", "--org", ORG).stdout.splitlines()
    assert table[0].split() == _USAGE_COLUMNS
    assert table[1].split()[:2] == [MODEL, str(row["requests"])]
    assert table[-1].split()[:2] == ["total", str(row["requests"])]
    starts = [table[0].index(name) for name in table[0].split()]
    for line in table:  # every cell starts at its column's offset
        assert all(line[at - 1] == " " and line[at] != " " for at in starts[1:]), table

    rows = list(
        csv.reader(
            palisade(
                server, "usage", "report", "--by", "user", "--org", ORG, "--format", "csv",
                "--key", alice.key,
            ).stdout.splitlines()
        )
    )  # fmt: skip
    assert rows[0] == _USAGE_COLUMNS
    assert [alice.user_id, str(row["requests"])] == rows[1][:2]
    assert rows[-1][:2] == ["total", str(row["requests"])]

    by_day = _usage(server, "--by", "day", "--since", "2000-01-01")
    assert by_day["total"]["requests"] >= row["requests"]
    future = _usage(server, "--by", "region", "--since", "2999-01-01T00:00:00Z")
    assert future["rows"] == []
    assert future["total"]["requests"] == 0


def test_usage_report_rejects_a_bad_date(server: Server) -> None:
    result = palisade(server, "usage", "report", "--since", "yesterday", ok=False)
    assert "--since" in result.stderr


# --- errors -----------------------------------------------------------------------------


def test_a_bad_key_is_refused_with_its_code(server: Server) -> None:
    bogus = "pal-sk-notarealkey0000000000000000"
    result = palisade(server, "org", "list", "--key", bogus, ok=False)
    assert result.stderr.rstrip().endswith("(invalid_api_key)")
    assert bogus not in result.stderr
    assert result.stdout == ""


def test_the_key_can_come_from_the_environment(server: Server, alice: Member) -> None:
    env = os.environ | {"PALISADE_HOME": str(server.empty_home), "PALISADE_API_KEY": alice.key}
    result = run_palisade("key", "list", "--url", server.appliance.url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert alice.key_id in {k["id"] for k in json.loads(result.stdout)["data"]}


def test_an_org_user_may_not_create_orgs(server: Server, alice: Member) -> None:
    erin = invite_and_accept(server, "erin@acme.test", "org_user")
    result = palisade(
        server, "org", "create", "rogue", "--regions", "eu-west", "--key", erin.key, ok=False
    )
    assert result.stderr.rstrip().endswith("(permission_denied)")


def test_invalid_input_names_the_problem(server: Server) -> None:
    result = palisade(server, "org", "create", "Not A Name", "--regions", "eu-west", ok=False)
    assert "(HTTP" not in result.stderr
    assert result.stderr.rstrip().endswith(")")


def test_no_key_anywhere(server: Server) -> None:
    result = palisade(server, "org", "list", home=server.empty_home, ok=False)
    assert "no API key" in result.stderr


def test_an_unreachable_server(server: Server) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = palisade(server, "org", "list", "--json", url=url, ok=False)
    assert result.stderr.startswith(f"error: cannot reach {url}: ")
    assert "Is the server running? Set --url or PALISADE_URL." in result.stderr
    assert result.stdout == ""


def test_a_key_that_cannot_be_sent_is_refused_locally(server: Server) -> None:
    result = palisade(server, "org", "list", "--key", "pal-sk-ключ", ok=False)
    assert "non-ASCII" in result.stderr
    assert "ключ" not in result.stderr
