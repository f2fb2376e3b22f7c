"""Issue 18's acceptance, failures: three real routers on one PostgreSQL store behind HAProxy
lose no usage and count nothing twice when a router is SIGKILLed under load (tests/e2e/routers.py).

The routers lease their budget slices for LEASE_S seconds (`budget_lease_s`), so a dead
router's slices return within seconds; their stand-ins answer after TTFT_MS, so requests are
in flight on a router when it dies.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import pytest

from router._private.haproxy import Haproxy
from router._private.postgres import PostgresCluster
from tests.e2e.fleet import UPSTREAM_MODEL
from tests.e2e.routers import Routers, running_routers, shared_store
from tests.support import wait_for

LEASE_S = 3.0
TTFT_MS = 100
CLIENTS = 6
BUDGET = 100_000_000  # room for the whole test: what matters is that it is sliced
BODY = json.dumps(
    {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": 4,
    }
).encode()
RECONNECT_S = 1.0
_orgs = itertools.count()


@pytest.fixture(scope="module")
def routers(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresCluster,
) -> Iterator[Routers]:
    root = tmp_path_factory.mktemp("shared-store-failures")
    store = shared_store(postgres, root, "shared_store_failures")
    config = f"budget_lease_s = {LEASE_S}\n"
    with running_routers(root, store, config=config, ttft_ms=TTFT_MS) as running:
        yield running


def budgeted_org(routers: Routers) -> tuple[str, str]:
    """A new org with a budget, its admin's key known to every router."""
    name = f"failures{next(_orgs)}"
    key = routers.org(name, BUDGET)
    deadline = time.monotonic() + 10
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as client:
        for router in routers.routers:
            while client.get(f"{router.url}/v1/models").status_code != 200:
                assert time.monotonic() < deadline, f"{router.url} never heard of the key"
    return name, key


# --- clients under steady load -----------------------------------------------------------


@dataclass
class Sent:
    """One attempt: its status (None: the connection failed) and x-request-id."""

    started: float
    ended: float
    status: int | None
    request_id: str | None
    detail: str = ""
    retry: Sent | None = None

    @property
    def final(self) -> Sent:
        return self.retry or self


def attempt(client: httpx.Client, key: str) -> Sent:
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        answer = client.post("/v1/chat/completions", content=BODY, headers=headers)
    except httpx.TransportError as exc:
        return Sent(started, time.monotonic(), None, None, type(exc).__name__)
    detail = "" if answer.status_code == 200 else answer.text
    request_id = answer.headers.get("x-request-id")
    return Sent(started, time.monotonic(), answer.status_code, request_id, detail)


class Load:
    """`clients` threads sending BODY through `url` back to back, each request on a new
    connection (so HAProxy places every one); a connection error is retried once."""

    def __init__(self, url: str, key: str, clients: int = CLIENTS) -> None:
        self.url = url
        self.key = key
        self.sent: list[Sent] = []  # appended by the threads (atomic in CPython)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=self.url, timeout=30, limits=limits) as client:
            while not self._stop.is_set():
                sent = attempt(client, self.key)
                if sent.status is None:
                    sent.retry = attempt(client, self.key)
                self.sent.append(sent)

    def answered_since(self, moment: float) -> int:
        return sum(1 for sent in self.sent if sent.started > moment)


# --- the store's books -------------------------------------------------------------------


def slices_held(routers: Routers, org: str, holder: str) -> int:
    rows = routers.store.query(
        "SELECT count(*) FROM budget_slices WHERE org = $1 AND holder = $2", org, holder
    )
    count: int = rows[0][0]
    return count


def usage_rows(routers: Routers, org: str) -> list[Any]:
    return routers.store.query(
        "SELECT request_id, input_tokens + output_tokens, status FROM usage WHERE org = $1", org
    )


def used_tokens(routers: Routers, org: str) -> int:
    rows = routers.store.query("SELECT sum(used_tokens) FROM budget_usage WHERE org = $1", org)
    return int(rows[0][0] or 0)


def books_balance(routers: Routers, org: str) -> bool:
    """budget_usage.used_tokens is the sum of the org's usage rows' tokens (one snapshot)."""
    rows = routers.store.query(
        "SELECT (SELECT coalesce(sum(used_tokens), 0) FROM budget_usage WHERE org = $1), "
        "(SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM usage WHERE org = $1)",
        org,
    )
    return bool(rows[0][0] == rows[0][1])


def marked_down(proxy: Haproxy, server: str) -> float | None:
    """When this poll found HAProxy's log saying `server` is down (None: not yet)."""
    if f"routers/{server} is DOWN" in proxy.log_file.read_text(errors="replace"):
        return time.monotonic()
    return None


def rows_cover(routers: Routers, org: str, ids: set[str]) -> list[Any] | None:
    rows = usage_rows(routers, org)
    return rows if ids <= {row[0] for row in rows} else None


# --- 1. a router SIGKILLed under load ------------------------------------------------------


def test_a_router_killed_under_load_loses_no_usage_and_its_slices_return(
    routers: Routers,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """CLIENTS clients send requests through HAProxy without pause; router 2 is SIGKILLed
    once it holds a slice of the org's budget. The requests in flight on it fail (counted);
    every request started after HAProxy marked it down succeeds, allowing each request one
    client retry on a connection error (a connection HAProxy had already handed to router 2
    is reset with it). Every 200 the clients saw has exactly one usage row, also after
    router 2 restarts and recovers its journal; the org's used tokens are the sum of its
    rows' tokens; router 2's slices are gone within the lease (another router's top-up
    drops them)."""
    proxy = routers.haproxy(tmp_path_factory.mktemp("haproxy"))
    org, key = budgeted_org(routers)
    with Load(f"http://127.0.0.1:{proxy.port}", key) as load:
        wait_for(lambda: slices_held(routers, org, "router-2"), timeout=20)
        killed_at = time.monotonic()
        routers.kill(1)
        down_at = wait_for(lambda: marked_down(proxy, "r2"), timeout=10)
        gone_at = wait_for(
            lambda: time.monotonic() if not slices_held(routers, org, "router-2") else None,
            timeout=LEASE_S + 10,
        )
        wait_for(lambda: load.answered_since(down_at) >= 10 * CLIENTS, timeout=30)
    sent = list(load.sent)
    failed_first = [s for s in sent if s.status is None]
    after_down = [s for s in sent if s.started > down_at]
    assert [s.final.detail for s in after_down if s.final.status != 200] == []
    assert {s.final.status for s in sent} <= {200, None}, {s.final.detail for s in sent}
    assert all(s.started < down_at for s in sent if s.final.status is None)
    assert gone_at - killed_at < LEASE_S + 1.5

    served = [s.final.request_id for s in sent if s.final.status == 200]
    assert all(rid is not None and rid.startswith("route-") for rid in served)
    ids = {rid for rid in served if rid is not None}
    assert len(ids) == len(served)  # every answer its own id
    restarted = routers.restart(1)
    rows = wait_for(lambda: rows_cover(routers, org, ids), timeout=20)
    counts = Counter(row[0] for row in rows)
    assert [rid for rid, n in counts.items() if n != 1] == []
    interrupted = [row for row in rows if row[2] == "interrupted"]
    assert not {row[0] for row in interrupted} & ids  # an answered request is never interrupted
    assert len(interrupted) <= len(failed_first)
    wait_for(lambda: books_balance(routers, org), timeout=10)
    recovered = re.search(r"recovered (\d+) requests", restarted.log_text())
    figures = {
        "requests": len(sent),
        "answered_200": len(served),
        "failed_in_flight": len(failed_first),
        "retried_ok": sum(1 for s in failed_first if s.final.status == 200),
        "failures": [
            (s.detail, s.final.detail, round(s.started - killed_at, 3)) for s in failed_first
        ],
        "interrupted_rows": len(interrupted),
        "recovered_by_router_2": int(recovered.group(1)) if recovered else 0,
        "marked_down_after_s": round(down_at - killed_at, 3),
        "slices_gone_after_s": round(gone_at - killed_at, 3),
        "used_tokens": used_tokens(routers, org),
    }
    for name, value in figures.items():
        record_property(name, value)
    with capsys.disabled():  # the figures the lead reports
        print(f"\nrouter 2 SIGKILLed under load: {figures}")  # noqa: T201


# --- 2. PostgreSQL restarted under load ----------------------------------------------------


def router_errors(routers: Routers) -> list[str]:
    """The routers' log lines naming an error (what a failed assertion shows)."""
    lines = (line for r in routers.routers for line in r.server.log_text().splitlines())
    return [line for line in lines if "Error" in line or "Traceback" in line][-40:]


def served_between(load: Load, start: float, end: float) -> list[Sent]:
    """Requests sent after `start` and answered 200 before `end`."""
    return [s for s in load.sent if s.status == 200 and s.started > start and s.ended < end]


def test_routers_serve_through_a_database_restart_and_count_it_once(
    routers: Routers,
    postgres: PostgresCluster,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Load through HAProxy on a budgeted org whose slices have room; PostgreSQL is stopped
    (a fast shutdown) and started again. While it is down the routers keep answering from
    their slices (at least one 200 sent and answered in the outage); afterwards the usage
    written meanwhile lands (a row for every 200, none twice) and used_tokens is the sum of
    the org's rows. Requests refused in the outage are 503 store_unavailable (no slice room
    left, or none renewed for 80 % of the lease)."""
    proxy = routers.haproxy(tmp_path_factory.mktemp("haproxy"))
    org, key = budgeted_org(routers)
    try:
        with Load(f"http://127.0.0.1:{proxy.port}", key) as load:
            wait_for(lambda: len(usage_rows(routers, org)) >= 5 * CLIENTS, timeout=20)
            stopping = time.monotonic()
            postgres.stop()
            stopped = time.monotonic()
            wait_for(lambda: served_between(load, stopped, time.monotonic()), timeout=5)
            starting = time.monotonic()
            postgres.start()
            started = time.monotonic()
            wait_for(lambda: len(served_between(load, started, time.monotonic())) >= 30, timeout=30)
    finally:
        postgres.start()  # shared by the session's other tests: leave it running
    sent = list(load.sent)
    during = served_between(load, stopped, starting)
    refused = [s.final for s in sent if s.final.status != 200]
    codes = Counter(
        json.loads(s.detail)["error"]["code"] if s.status else s.detail for s in refused
    )
    assert set(codes) <= {"store_unavailable"}, (codes, router_errors(routers))
    # A router's pooled connections broke with the server: it may refuse until it reconnects.
    outside = [s for s in refused if not stopping < s.started < started + RECONNECT_S]
    assert [(round(s.started - stopping, 3), s.detail) for s in outside] == []

    served = [s.final.request_id for s in sent if s.final.status == 200]
    ids = {rid for rid in served if rid is not None}
    assert len(ids) == len(served)
    rows = wait_for(lambda: rows_cover(routers, org, ids), timeout=30)
    assert [rid for rid, n in Counter(row[0] for row in rows).items() if n != 1] == []
    assert {row[0] for row in rows} == ids  # nobody was interrupted: no row without an answer
    wait_for(lambda: books_balance(routers, org), timeout=10)
    figures = {
        "requests": len(sent),
        "answered_200": len(served),
        "served_in_outage": len(during),
        "served_from_stop_to_start": len(served_between(load, stopping, started)),
        "refused_in_outage": dict(codes),
        "stop_s": round(stopped - stopping, 3),
        "outage_s": round(started - stopping, 3),
        "refused_after_start": sum(1 for s in refused if s.started > started),
        "used_tokens": used_tokens(routers, org),
    }
    for name, value in figures.items():
        record_property(name, value)
    with capsys.disabled():  # the figures the lead reports
        print(f"\nPostgreSQL restarted under load: {figures}")  # noqa: T201
