"""What crosses from the router to an appliance: signed principals, usage and budgets."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from federation import (
    ASSERTION_HEADER,
    JOIN_SECRET_ENV,
    AssertionSigner,
    NodeIdentity,
    Principal,
    client_context,
)
from tests.e2e.fleet import UPSTREAM_MODEL, Fleet, running_fleet, upstream_toml
from tests.federation.tenants import Admin
from tests.support import run_palisade, wait_for, write_config

CHAT = "/v1/chat/completions"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three"}]
BODY = {"model": UPSTREAM_MODEL, "messages": MESSAGES}


def one_member(fleet: Fleet, region: str = "eu-west", tokens: int = 5) -> None:
    upstream = fleet.standin("upstream", tokens=tokens)
    fleet.start_member("eu-1", region, upstream_toml(upstream, "gpu"))
    fleet.wait_joined("eu-1")


def assertion(fleet: Fleet, node: str, regions: set[str]) -> str:
    """An assertion signed with the router's own key (its node.key), as the router makes them."""
    identity = NodeIdentity.load_or_create(fleet.router.home)
    principal = Principal(org="acme", user="usr_x", key_id="k", regions=frozenset(regions))
    return AssertionSigner(identity, "router").assertion(principal, node)


def test_an_appliance_takes_a_valid_assertion_or_a_local_key_and_nothing_else(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        one_member(fleet)
        appliance = fleet.members["eu-1"].url + CHAT
        # Assertions are taken only from a connection presenting the router's certificate.
        fleet_dir = fleet.router.home / "fleet"
        as_router = client_context(
            fleet.ca_path, fleet_dir / "router.pem", fleet.router.home / "node.key"
        )

        def post(**headers: str) -> httpx.Response:
            return httpx.post(appliance, json=BODY, headers=headers, timeout=30, verify=as_router)

        assert post().json()["error"]["code"] == "invalid_api_key"
        assert post().status_code == 401
        valid = {ASSERTION_HEADER: assertion(fleet, "eu-1", {"eu-west"})}
        assert post(**valid).status_code == 200
        anonymous = httpx.post(appliance, json=BODY, headers=valid, timeout=30)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "client_certificate_required"

        impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
        principal = Principal(org="acme", user="u", regions=frozenset({"eu-west"}))
        forged = AssertionSigner(impostor, "router").assertion(principal, "eu-1")
        refused = post(**{ASSERTION_HEADER: forged})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_assertion"
        elsewhere = post(**{ASSERTION_HEADER: assertion(fleet, "eu-2", {"eu-west"})})
        assert elsewhere.status_code == 401
        assert "issued for node `eu-2`" in elsewhere.json()["error"]["message"]

        outside = post(**{ASSERTION_HEADER: assertion(fleet, "eu-1", {"us-east"})})
        assert outside.status_code == 403
        assert outside.json()["error"]["code"] == "residency_violation"

        # Its own tenancy still works standalone: a local org and key of the appliance.
        home = fleet.members["eu-1"].home
        local = Admin(fleet.members["eu-1"].url, (home / "admin.key").read_text().strip())
        local.create_org("local-org", ["eu-west"])
        key = local.member("local-org", "org_user", "u@local.test").key
        assert post(Authorization=f"Bearer {key}").status_code == 200


def test_the_router_meters_streams_and_strips_the_usage_chunk_nobody_asked_for(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        one_member(fleet)
        key = fleet.org_key("acme", ["eu-west"])
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)

        plain = list(
            client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES, stream=True)
        )
        assert all(chunk.usage is None for chunk in plain)
        text = "".join(c.choices[0].delta.content or "" for c in plain if c.choices)
        assert text == " tok0 tok1 tok2 tok3 tok4"

        asked = list(
            client.chat.completions.create(
                model=UPSTREAM_MODEL,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = asked[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (3, 5)

        report = fleet.admin.ok("GET", "/admin/v1/usage", by="region", org="acme")
        rows = {row["group"]: row for row in report["rows"]}
        assert rows["eu-west"]["requests"] == 2
        assert rows["eu-west"]["input_tokens"] == 6  # both streams metered, usage or not
        assert rows["eu-west"]["output_tokens"] == 10
        by_node = fleet.admin.ok("GET", "/admin/v1/usage", by="node", org="acme")
        assert [row["group"] for row in by_node["rows"]] == ["eu-1"]

        # The appliance left metering to the router, and audited both requests as forwarded.
        member = fleet.members["eu-1"]
        local = Admin(member.url, (member.home / "admin.key").read_text().strip())
        assert local.ok("GET", "/admin/v1/usage/records", all="true")["data"] == []
        wait_for(lambda: _audited_via(member.home / "audit.db") == 2, timeout=20)


def _audited_via(db: Path) -> int:
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            'SELECT COUNT(*) FROM entries WHERE CAST(body AS TEXT) LIKE \'%"via":"router"%\''
        ).fetchone()
    return int(rows[0])


def test_budgets_are_enforced_at_the_router_before_any_node_works(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        one_member(fleet, tokens=100)  # 103 tokens a request; ~200 reserved while it runs
        admin = fleet.admin
        admin.create_org("thrifty", ["eu-west"], budget=600)
        key = admin.member("thrifty", "org_user", "t@thrifty.test").key
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)
        before = fleet.members["eu-1"].metric(
            "palisade_requests_total", endpoint=CHAT, status="200"
        )
        codes = []
        for _ in range(20):
            try:
                client.chat.completions.create(
                    model=UPSTREAM_MODEL, messages=MESSAGES, max_tokens=100
                )
                codes.append("ok")
            except openai.RateLimitError as exc:
                codes.append(str(exc.code))
        served, refused = codes.count("ok"), codes.count("budget_exceeded")
        assert served + refused == 20
        after = fleet.members["eu-1"].metric("palisade_requests_total", endpoint=CHAT, status="200")
        assert served >= 1
        assert refused >= 1
        assert after - before == served  # refused requests never reached the appliance
        budget = admin.ok("GET", "/admin/v1/orgs/thrifty/budget")
        assert budget["used_tokens"] <= 600


def test_an_unenrolled_appliance_never_joins(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        upstream = fleet.standin("upstream")
        home = tmp_path / "stranger"
        config = write_config(home, upstream_toml(upstream, "gpu"))
        refused = run_palisade(
            "appliance", "serve", "--port", "0", *config, "--node-id", "stranger",
            "--region", "eu-west", "--router", fleet.fleet_url,
            env={"PALISADE_HOME": str(home), "PALISADE_JOIN_SECRET": "the-old-secret-0123456789"},
            unset=(JOIN_SECRET_ENV,),
        )  # fmt: skip
        assert refused.returncode == 1
        assert "not enrolled" in refused.stderr
        assert fleet.status() == {}


def test_the_router_exports_a_signed_log_of_where_each_request_ran(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        one_member(fleet)
        key = fleet.org_key("acme", ["eu-west"])
        client = openai.OpenAI(base_url=fleet.router.v1, api_key=key, max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model=UPSTREAM_MODEL, messages=MESSAGES)
        env = {"PALISADE_HOME": str(fleet.router.home)}
        export = tmp_path / "acme.json"

        def exported() -> bool:
            result = run_palisade(
                "audit", "export", "--url", fleet.router.url, "--org", "acme",
                "--out", str(export), env=env,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            entries = json.loads(export.read_text())["export"]["entries"]
            rows = [json.loads(item["entry"]) for item in entries]
            routed = [row for row in rows if row.get("kind") == "request"]
            assert all(row["region"] == "eu-west" and row["node"] == "eu-1" for row in routed)
            return len(routed) == 3  # each routing row is written just after its answer

        wait_for(exported, timeout=20)
        node_pub = f"@{fleet.router.home / 'node.pub'}"
        verified = run_palisade("audit", "verify", str(export), "--trusted-key", node_pub)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "OK" in verified.stdout
        report = tmp_path / "residency.json"
        residency = run_palisade(
            "audit", "residency", "--url", fleet.router.url, "--org", "acme",
            "--out", str(report), "--json", env=env,
        )  # fmt: skip
        assert residency.returncode == 0, residency.stderr
        assert "eu-west" in report.read_text()
        assert "us-east" not in report.read_text()
