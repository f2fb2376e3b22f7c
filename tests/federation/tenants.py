"""Provisioning tenants on a real server through its /admin/v1 API (for tests)."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from router._private.postgres import PostgresCluster
from tests.postgres import migrated_database
from tests.support import Appliance, model_toml, run_appliance


@dataclass(frozen=True)
class Member:
    user_id: str
    key: str
    key_id: str
    org: str | None
    role: str


class Admin:
    """A client for /admin/v1 acting with one key."""

    def __init__(self, url: str, key: str, verify: ssl.SSLContext | bool = True) -> None:
        self.url = url
        self.key = key
        # For an https:// server: a context trusting its CA (the fleet CA of `fleet up`).
        self.verify = verify

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        # One connection per call: these clients are made freely and never need closing.
        return httpx.request(
            method,
            f"{self.url}{path}",
            json=body,
            params=params or None,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=60,
            verify=self.verify,
        )

    def ok(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = self.call(method, path, body, **params)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def create_org(self, name: str, regions: list[str], budget: int | None = None) -> None:
        self.ok(
            "POST", "/admin/v1/orgs", {"name": name, "regions": regions, "budget_tokens": budget}
        )

    def member(self, org: str, role: str, email: str) -> Member:
        invite = self.ok("POST", "/admin/v1/invites", {"email": email, "org": org, "role": role})
        accepted = httpx.post(
            f"{self.url}/admin/v1/invites/accept",
            json={"token": invite["token"]},
            timeout=30,
            verify=self.verify,
        )
        assert accepted.status_code == 201, accepted.text
        data = accepted.json()
        return Member(data["user"]["id"], data["key"]["key"], data["key"]["info"]["id"], org, role)

    def as_member(self, member: Member) -> Admin:
        return Admin(self.url, member.key, self.verify)


def admin_of(appliance: Appliance) -> Admin:
    key = (appliance.home / "admin.key").read_text().strip()
    return Admin(appliance.url, key)


def system_member(appliance: Appliance) -> Member:
    admin = admin_of(appliance)
    users = admin.ok("GET", "/admin/v1/users")["data"]
    me = next(u for u in users if u["role"] == "system_admin")
    key_id = admin.key.split("-")[2]
    return Member(me["id"], admin.key, key_id, None, "system_admin")


@contextmanager
def secured_appliance(
    home: Path, region: str = "eu-west", database: str | None = None, /, **model: object
) -> Iterator[Appliance]:
    """An appliance with tenancy on (keys required), in `region`, its policy store in
    `database` (a migrated PostgreSQL database's URL) or in its own policy.db."""
    config = f'region = "{region}"\n' + database_toml(database) + model_toml(**model)
    with run_appliance(home, config) as running:
        yield running


def database_toml(database: str | None) -> str:
    """The top-level config line that puts a server's policy store in `database` (a
    PostgreSQL URL); nothing for its own policy.db."""
    return "" if database is None else f"database = {json.dumps(database)}\n"


BACKENDS = ("sqlite", "postgresql")


def policy_database(request: pytest.FixtureRequest, backend: str) -> str | None:
    """For `postgresql`, a new migrated database in the session's cluster (its URL); for
    `sqlite`, None (the server's own policy.db)."""
    if backend == "sqlite":
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return asyncio.run(migrated_database(cluster, "tenancy"))
