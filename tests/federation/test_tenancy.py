"""Tenancy on a real appliance: keys, RBAC, rate limits, budgets, metering, local mode."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.federation.tenants import (
    BACKENDS,
    Admin,
    Member,
    admin_of,
    policy_database,
    secured_appliance,
    system_member,
)
from tests.support import Appliance, model_toml, run_palisade, wait_for

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say one word."}], "max_tokens": 2}
_emails = (f"person{n}@example.eu" for n in itertools.count())
_org_names = (f"org-{n}" for n in itertools.count())


@dataclass
class World:
    appliance: Appliance
    admin: Admin
    system: Member
    acme_admin: Member
    acme_user: Member
    globex_admin: Member

    def client(self, member: Member) -> Admin:
        return Admin(self.appliance.url, member.key)

    def fresh(self, org: str, role: str = "org_user") -> Member:
        return self.admin.member(org, role, next(_emails))


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[World]:
    """The same tenancy, on each policy store: SQLite (the default) and PostgreSQL."""
    database = policy_database(request, request.param)
    home = tmp_path_factory.mktemp(f"tenancy-{request.param}")
    with secured_appliance(home, "eu-west", database, max_queue=128) as appliance:
        admin = admin_of(appliance)
        admin.create_org("acme", ["eu-west"])
        admin.create_org("globex", ["eu-west", "us-east"])
        yield World(
            appliance,
            admin,
            system_member(appliance),
            admin.member("acme", "org_admin", "ada@acme.eu"),
            admin.member("acme", "org_user", "bob@acme.eu"),
            admin.member("globex", "org_admin", "gail@globex.eu"),
        )


def chat(world: World, key: str, **extra: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(
        f"{world.appliance.v1}/chat/completions", json=CHAT | extra, headers=headers, timeout=60
    )


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# --- authentication -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer pal-sk-nothere",
        "Bearer pal-sk-000000000000-" + "A" * 43,
    ],
)
def test_missing_malformed_and_unknown_keys_are_401(world: World, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.post(f"{world.appliance.v1}/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 401
    assert error_code(response) == "invalid_api_key"


def test_sdk_sees_invalid_key_and_revocation_takes_effect_at_once(world: World) -> None:
    member = world.fresh("acme")
    sdk = openai.OpenAI(base_url=world.appliance.v1, api_key=member.key, max_retries=0)
    assert sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    ).usage
    world.admin.ok("DELETE", f"/admin/v1/keys/{member.key_id}")
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=world.appliance.v1, api_key="sk-wrong", max_retries=0).models.list()


def test_invite_token_works_once(world: World) -> None:
    invite = world.admin.ok(
        "POST", "/admin/v1/invites", {"email": next(_emails), "org": "acme", "role": "org_user"}
    )
    first = httpx.post(
        f"{world.appliance.url}/admin/v1/invites/accept", json={"token": invite["token"]}
    )
    second = httpx.post(
        f"{world.appliance.url}/admin/v1/invites/accept", json={"token": invite["token"]}
    )
    assert first.status_code == 201
    assert first.json()["key"]["key"].startswith("pal-sk-")
    assert second.status_code == 401
    assert error_code(second) == "invalid_invite"


def test_org_user_cannot_revoke_another_users_key(world: World) -> None:
    victim = world.fresh("acme")
    response = world.client(world.acme_user).call("DELETE", f"/admin/v1/keys/{victim.key_id}")
    assert response.status_code == 403
    assert error_code(response) == "permission_denied"
    assert chat(world, victim.key).status_code == 200


def test_management_writes_are_audited(world: World) -> None:
    member = world.fresh("acme")
    created = world.client(member).ok("POST", "/admin/v1/keys", {"name": "ci"})
    world.client(member).ok("DELETE", f"/admin/v1/keys/{created['info']['id']}")
    world.client(world.acme_admin).ok("PUT", "/admin/v1/orgs/acme/budget", {"tokens": 10_000_000})
    events = world.client(world.acme_admin).ok("GET", "/admin/v1/audit", org="acme")["data"]
    kinds = {(e["event"], e["payload"].get("key_id")) for e in events}
    assert ("key_created", created["info"]["id"]) in kinds
    assert ("key_revoked", created["info"]["id"]) in kinds
    budget = [e for e in events if e["event"] == "budget_changed"][-1]
    assert budget["actor"] == world.acme_admin.user_id
    assert budget["payload"] == {"budget_tokens": 10_000_000}
    assert all(e["org"] == "acme" for e in events)


# --- RBAC: every cell of the matrix ------------------------------------------------------------

ROLES = ["system_admin", "org_admin", "org_user"]
# (action, where) → roles allowed. `own`/`other` is the target org relative to the actor.
MATRIX: dict[tuple[str, str], set[str]] = {
    ("view system-wide usage", "all"): {"system_admin"},
    ("manage models", "all"): {"system_admin"},
    ("create/manage organizations", "all"): {"system_admin"},
    ("view org usage", "own"): {"system_admin", "org_admin", "org_user"},
    ("view org usage", "other"): {"system_admin"},
    ("invite/remove users", "own"): {"system_admin", "org_admin"},
    ("invite/remove users", "other"): {"system_admin"},
    ("set org budgets", "own"): {"system_admin", "org_admin"},
    ("set org budgets", "other"): {"system_admin"},
    ("create API key", "own"): {"org_admin", "org_user"},
    ("view/revoke own keys", "own"): {"org_admin", "org_user"},
    ("view/revoke all org keys", "own"): {"system_admin", "org_admin"},
    ("view/revoke all org keys", "other"): {"system_admin"},
    ("view org audit log", "own"): {"system_admin", "org_admin"},
    ("view org audit log", "other"): {"system_admin"},
    ("call the inference API", "own"): {"org_admin", "org_user"},
}


def _actor(world: World, role: str) -> Member:
    return {
        "system_admin": world.system,
        "org_admin": world.fresh("acme", "org_admin"),
        "org_user": world.fresh("acme"),
    }[role]


def _attempt(world: World, action: str, where: str, actor: Member) -> list[httpx.Response]:
    """Do `action` as `actor` on its own org (acme) or another (globex)."""
    client = world.client(actor)
    org = "globex" if where == "other" else "acme"
    calls: dict[str, Callable[[], list[httpx.Response]]] = {
        "view system-wide usage": lambda: [
            client.call("GET", "/admin/v1/usage", by="org", all="true")
        ],
        "manage models": lambda: [
            client.call(
                "PUT",
                f"/admin/v1/models/{MODEL}/pricing",
                {"input_per_million": 0.1, "output_per_million": 0.2},
            )
        ],
        "create/manage organizations": lambda: [
            client.call(
                "POST",
                "/admin/v1/orgs",
                {"name": next(_org_names), "regions": ["eu-west"]},
            )
        ],
        "view org usage": lambda: [client.call("GET", "/admin/v1/usage", by="model", org=org)],
        "invite/remove users": lambda: [
            client.call(
                "POST",
                "/admin/v1/invites",
                {"email": next(_emails), "org": org, "role": "org_user"},
            ),
            client.call("DELETE", f"/admin/v1/users/{world.fresh(org).user_id}"),
        ],
        "set org budgets": lambda: [
            client.call("PUT", f"/admin/v1/orgs/{org}/budget", {"tokens": None})
        ],
        "create API key": lambda: [client.call("POST", "/admin/v1/keys", {"name": "k"})],
        "view/revoke own keys": lambda: [
            client.call("GET", "/admin/v1/keys"),
            client.call("DELETE", f"/admin/v1/keys/{actor.key_id}"),
        ],
        "view/revoke all org keys": lambda: [
            client.call("GET", "/admin/v1/keys", org=org),
            client.call("DELETE", f"/admin/v1/keys/{world.fresh(org).key_id}"),
        ],
        "view org audit log": lambda: [client.call("GET", "/admin/v1/audit", org=org)],
        "call the inference API": lambda: [chat(world, actor.key)],
    }
    return calls[action]()


@pytest.mark.parametrize(
    ("action", "where", "role"), [(a, w, r) for (a, w) in MATRIX for r in ROLES]
)
def test_rbac_matrix(world: World, action: str, where: str, role: str) -> None:
    allowed = role in MATRIX[(action, where)]
    for response in _attempt(world, action, where, _actor(world, role)):
        if allowed:
            assert response.status_code in (200, 201), response.text[:300]
        else:
            assert response.status_code == 403, response.text[:300]
            assert error_code(response) == "permission_denied"


# --- budgets and rate limits under concurrency -------------------------------------------------


def test_budget_admits_at_most_what_fits_under_concurrency(world: World) -> None:
    world.admin.create_org("tight", ["eu-west"])
    member = world.fresh("tight")
    calibration = chat(world, world.acme_user.key).json()["usage"]
    worst_case = calibration["prompt_tokens"] + 2  # CHAT["max_tokens"]
    world.admin.ok("PUT", "/admin/v1/orgs/tight/budget", {"tokens": 10 * worst_case})
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda _: chat(world, member.key), range(50)))
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert 1 <= len(admitted) <= 10
    assert sum(r.json()["usage"]["total_tokens"] for r in admitted) <= 10 * worst_case
    assert {r.status_code for r in refused} == {429}
    assert {error_code(r) for r in refused} == {"budget_exceeded"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    budget = world.admin.ok("GET", "/admin/v1/orgs/tight/budget")
    assert budget["used_tokens"] <= budget["limit_tokens"]
    assert budget["reserved_tokens"] == 0


def test_cancelled_stream_settles_to_what_it_used(world: World) -> None:
    world.admin.create_org("streamers", ["eu-west"], budget=1_000_000)
    member = world.fresh("streamers")
    body = CHAT | {
        "max_tokens": 1500,
        "stream": True,
        "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
    }
    headers = {"Authorization": f"Bearer {member.key}"}
    with httpx.stream(
        "POST", f"{world.appliance.v1}/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(4)]
        reserved = world.admin.ok("GET", "/admin/v1/orgs/streamers/budget")["reserved_tokens"]
        assert reserved > 1500  # the worst case is held while the stream runs
    budget = wait_for(
        lambda: (
            (b := world.admin.ok("GET", "/admin/v1/orgs/streamers/budget"))["reserved_tokens"] == 0
            and b
        )
    )
    assert 0 < budget["used_tokens"] < 1500
    records = world.admin.ok("GET", "/admin/v1/usage/records", org="streamers")["data"]
    assert [r["status"] for r in records] == ["cancelled"]
    assert records[0]["input_tokens"] + records[0]["output_tokens"] == budget["used_tokens"]


def test_rate_limit_admits_at_most_rate_plus_burst(world: World) -> None:
    member = world.fresh("acme")
    limits = {"requests_per_minute": 30, "burst": 10}
    world.client(world.acme_admin).ok("PUT", f"/admin/v1/keys/{member.key_id}/limits", limits)
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: chat(world, member.key, max_tokens=1), range(100)))
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert 10 <= len(admitted) <= 30 + 10
    assert {error_code(r) for r in refused} == {"rate_limit_exceeded"}
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["error"]["retry_after"] >= 1 for r in refused)
    ok = admitted[0].headers
    assert ok["x-ratelimit-limit-requests"] == "30"
    assert int(ok["x-ratelimit-remaining-requests"]) < 10
    assert ok["x-ratelimit-reset-requests"].endswith("s")


def test_token_limit_headers_and_lowering_a_limit_applies_to_the_next_request(world: World) -> None:
    member = world.fresh("acme")
    admin = world.client(world.acme_admin)
    admin.ok("PUT", f"/admin/v1/keys/{member.key_id}/limits", {"tokens_per_minute": 100_000})
    first = chat(world, member.key)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100_000
    admin.ok(
        "PUT", f"/admin/v1/keys/{member.key_id}/limits", {"requests_per_minute": 1, "burst": 1}
    )
    assert chat(world, member.key).status_code == 200
    limited = chat(world, member.key)
    assert limited.status_code == 429
    assert error_code(limited) == "rate_limit_exceeded"


def test_key_regions_may_only_narrow_the_org(world: World) -> None:
    member = world.fresh("acme")
    response = world.client(member).call(
        "POST", "/admin/v1/keys", {"name": "x", "regions": ["us-east"]}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "regions"
    narrow = world.fresh("globex")
    created = world.client(narrow).ok(
        "POST", "/admin/v1/keys", {"name": "us", "regions": ["us-east"]}
    )
    refused = chat(world, created["key"])  # the appliance is in eu-west
    assert refused.status_code == 403
    assert error_code(refused) == "residency_violation"


# --- metering ------------------------------------------------------------------------------------


def test_usage_report_sums_match_the_records_to_the_token(world: World) -> None:
    member = world.fresh("globex")
    counting = [{"role": "user", "content": "Count from 1 to 1000."}]  # runs to max_tokens
    for max_tokens in (1, 2, 3):
        response = chat(world, member.key, max_tokens=max_tokens, messages=counting)
        assert response.status_code == 200
    admin = world.client(world.globex_admin)

    def mine() -> list[dict[str, object]] | None:
        data = admin.ok("GET", "/admin/v1/usage/records", org="globex")["data"]
        rows = [r for r in data if r["user_id"] == member.user_id]
        return rows if len(rows) == 3 else None

    records = wait_for(mine)
    assert len(records) == 3
    assert [r["output_tokens"] for r in records] == [1, 2, 3]
    assert {(r["region"], r["node"], r["model"], r["status"]) for r in records} == {
        ("eu-west", "appliance-local", MODEL, "ok")
    }
    all_records = admin.ok("GET", "/admin/v1/usage/records", org="globex")["data"]
    for by in ("model", "user", "region", "day"):
        report = admin.ok("GET", "/admin/v1/usage", by=by, org="globex")
        assert report["total"]["requests"] == len(all_records)
        assert report["total"]["input_tokens"] == sum(r["input_tokens"] for r in all_records)
        assert report["total"]["output_tokens"] == sum(r["output_tokens"] for r in all_records)
        assert (
            sum(row["output_tokens"] for row in report["rows"]) == report["total"]["output_tokens"]
        )
    by_user = {
        row["group"]: row
        for row in admin.ok("GET", "/admin/v1/usage", by="user", org="globex")["rows"]
    }
    assert by_user[member.user_id]["output_tokens"] == 6


def test_usage_records_carry_cost_from_model_pricing(world: World) -> None:
    world.admin.ok(
        "PUT",
        f"/admin/v1/models/{MODEL}/pricing",
        {"input_per_million": 2.0, "output_per_million": 4.0},
    )
    member = world.fresh("globex")
    usage = chat(world, member.key).json()["usage"]
    admin = world.client(world.globex_admin)
    record = wait_for(
        lambda: next(
            (
                r
                for r in admin.ok("GET", "/admin/v1/usage/records", org="globex")["data"]
                if r["user_id"] == member.user_id
            ),
            None,
        )
    )
    expected = (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 4.0) / 1e6
    assert record["cost"] == pytest.approx(expected)
    card = httpx.get(
        f"{world.appliance.v1}/models", headers={"Authorization": f"Bearer {member.key}"}
    ).json()
    assert card["data"][0]["pricing"]["output_per_million"] == 4.0


# --- local mode -----------------------------------------------------------------------------------


def test_no_auth_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    config = tmp_path / "a.toml"
    config.write_text(model_toml())
    result = run_palisade(
        "appliance",
        "serve",
        "--no-auth",
        "--host",
        "0.0.0.0",  # noqa: S104 - the refusal is the test
        "--config",
        str(config),
    )
    assert result.returncode == 1
    assert "--no-auth refuses to listen on 0.0.0.0" in result.stderr


def test_no_auth_serves_without_keys_and_disables_management(appliance: Appliance) -> None:
    assert httpx.post(f"{appliance.v1}/chat/completions", json=CHAT, timeout=60).status_code == 200
    assert httpx.get(f"{appliance.url}/admin/v1/orgs").status_code == 404
    assert "AUTHENTICATION IS OFF (--no-auth)" in appliance.log_text()
    assert not (appliance.home / "admin.key").exists()


def test_secure_by_default_every_route_needs_a_key(world: World) -> None:
    url = world.appliance.url
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/embeddings"),
        ("GET", "/admin/v1/orgs"),
        ("GET", "/admin/v1/usage"),
    ]:
        response = httpx.request(method, f"{url}{path}", json={})
        assert response.status_code == 401, (path, response.text)


# --- limits cannot be escalated ------------------------------------------------------------------


def _limited(world: World, limits: dict[str, int], role: str = "org_user") -> Member:
    """A fresh acme member whose key acme's admin limited to `limits`."""
    member = world.fresh("acme", role)
    world.client(world.acme_admin).ok("PUT", f"/admin/v1/keys/{member.key_id}/limits", limits)
    return member


def _refused_escalation(response: httpx.Response, field: str, most: int, asked: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "limit_escalation"
    assert error["param"] == f"limits.{field}"
    assert f"at most {most}" in error["message"]
    assert f"not {asked}" in error["message"]


def test_a_limited_user_cannot_make_a_wider_key(world: World) -> None:
    member = _limited(world, {"requests_per_minute": 1})
    wider = world.client(member).call(
        "POST", "/admin/v1/keys", {"name": "x", "limits": {"requests_per_minute": 1_000_000}}
    )
    _refused_escalation(wider, "requests_per_minute", 1, "1000000")
    # Omitted limits are inherited: the new key is as limited as the one that made it.
    child = world.client(member).ok("POST", "/admin/v1/keys", {"name": "inherits"})
    assert child["info"]["limits"] == {
        "requests_per_minute": 1,
        "tokens_per_minute": None,
        "burst": 1,
    }
    assert chat(world, child["key"]).status_code == 200
    limited = chat(world, child["key"])
    assert limited.status_code == 429
    assert error_code(limited) == "rate_limit_exceeded"


# (the parent key's limits, what its holder asks for, the field refused, its cap, as shown)
WIDER = [
    ({"tokens_per_minute": 1000}, {"tokens_per_minute": 1001}, ("tokens_per_minute", 1000, "1001")),
    ({"requests_per_minute": 60, "burst": 5}, {"burst": 6}, ("burst", 5, "6")),
    # Without `burst`, the bucket is as deep as the rate: asking for a deeper one escalates.
    ({"requests_per_minute": 10}, {"burst": 11}, ("burst", 10, "11")),
    (
        {"requests_per_minute": 10},
        {"requests_per_minute": 11, "burst": 1},
        ("requests_per_minute", 10, "11"),
    ),
]


@pytest.mark.parametrize(("parent", "asked", "refusal"), WIDER)
def test_no_limit_field_can_be_widened(
    world: World, parent: dict[str, int], asked: dict[str, int], refusal: tuple[str, int, str]
) -> None:
    member = _limited(world, parent)
    response = world.client(member).call("POST", "/admin/v1/keys", {"name": "x", "limits": asked})
    _refused_escalation(response, *refusal)


def test_narrower_keys_are_made_with_the_rest_inherited(world: World) -> None:
    member = _limited(world, {"requests_per_minute": 60, "tokens_per_minute": 5000, "burst": 5})
    child = world.client(member).ok(
        "POST", "/admin/v1/keys", {"name": "narrow", "limits": {"requests_per_minute": 3}}
    )
    assert child["info"]["limits"] == {
        "requests_per_minute": 3,
        "tokens_per_minute": 5000,
        "burst": 3,
    }


def test_a_user_cannot_widen_a_key_after_making_it(world: World) -> None:
    member = _limited(world, {"requests_per_minute": 1})
    child = world.client(member).ok("POST", "/admin/v1/keys", {"name": "child"})
    for key_id in (child["info"]["id"], member.key_id):
        raised = world.client(member).call(
            "PUT", f"/admin/v1/keys/{key_id}/limits", {"requests_per_minute": 1_000_000}
        )
        assert raised.status_code == 403, raised.text
        assert error_code(raised) == "permission_denied"


def test_an_org_admin_cannot_raise_their_own_keys_limits(world: World) -> None:
    boss = _limited(world, {"requests_per_minute": 2}, "org_admin")
    client = world.client(boss)
    raised = client.call(
        "PUT", f"/admin/v1/keys/{boss.key_id}/limits", {"requests_per_minute": 100}
    )
    _refused_escalation(raised, "requests_per_minute", 2, "100")
    unlimited = client.call("PUT", f"/admin/v1/keys/{boss.key_id}/limits", {})
    _refused_escalation(unlimited, "requests_per_minute", 2, "unlimited")
    lowered = client.ok(
        "PUT", f"/admin/v1/keys/{boss.key_id}/limits", {"requests_per_minute": 1, "burst": 1}
    )
    assert lowered["limits"]["requests_per_minute"] == 1
    # Setting others' limits stays an admin's power (RBAC "set org budgets").
    other = world.fresh("acme")
    raised_other = client.ok(
        "PUT", f"/admin/v1/keys/{other.key_id}/limits", {"requests_per_minute": 100}
    )
    assert raised_other["limits"]["requests_per_minute"] == 100


def test_org_default_key_limits_are_the_default_and_the_ceiling(world: World) -> None:
    org = next(_org_names)
    world.admin.create_org(org, ["eu-west"])
    boss = world.admin.member(org, "org_admin", next(_emails))
    defaults = {"requests_per_minute": 5, "tokens_per_minute": 1000}
    shown = world.client(boss).ok("PUT", f"/admin/v1/orgs/{org}/key-limits", defaults)
    assert shown["key_limits"] == defaults | {"burst": None}
    listed = world.client(boss).ok("GET", "/admin/v1/orgs")["data"]
    assert next(o for o in listed if o["name"] == org)["key_limits"]["requests_per_minute"] == 5

    newcomer = world.admin.member(org, "org_user", next(_emails))  # their first key
    first = world.client(newcomer).ok("GET", "/admin/v1/keys")["data"][0]
    assert first["limits"] == defaults | {"burst": None}
    # Even an unlimited key (the org admin's) makes keys only within the org's default.
    for member in (newcomer, boss):
        wider = world.client(member).call(
            "POST", "/admin/v1/keys", {"name": "x", "limits": {"tokens_per_minute": 1001}}
        )
        _refused_escalation(wider, "tokens_per_minute", 1000, "1001")
    made = world.client(boss).ok("POST", "/admin/v1/keys", {"name": "within"})
    assert made["info"]["limits"] == defaults | {"burst": 5}

    events = world.client(boss).ok("GET", "/admin/v1/audit")["data"]
    changed = [e for e in events if e["event"] == "org_key_limits_changed"]
    assert changed[-1]["payload"]["limits"]["requests_per_minute"] == 5


@pytest.mark.parametrize("who", ["org_user", "other_org_admin"])
def test_only_an_orgs_admins_set_its_default_key_limits(world: World, who: str) -> None:
    actor = world.acme_user if who == "org_user" else world.globex_admin
    response = world.client(actor).call(
        "PUT", "/admin/v1/orgs/acme/key-limits", {"requests_per_minute": 1_000_000}
    )
    assert response.status_code == 403, response.text
    assert error_code(response) == "permission_denied"
