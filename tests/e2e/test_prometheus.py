"""Debian's Prometheus and Alertmanager on a real fleet: discovery through the router, exact
counts through PromQL, and the shipped alert rules reaching a webhook receiver.

A router and two appliances (one per region, scripted engines), Prometheus scraping every
second with a monitor key, the generated config and ops/prometheus/rules.yml, Alertmanager
posting to `palisade alerts tail`'s receiver. Killing the only node of us-east must bring
`PalisadeRegionWithoutHealthyNode` to the webhook within the rule's `for` plus two scrape
intervals of the router seeing it; an org past 80 % of its budget raises
`PalisadeOrgBudget80`, then at 100 % `PalisadeOrgBudget100`.
"""

from __future__ import annotations

import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation import write_private
from router._private.alerts import AlertReceiver
from router._private.monitoring import (
    ALERTMANAGER,
    PROMETHEUS,
    RULES,
    Monitoring,
    free_port,
    start_alertmanager,
    start_prometheus,
    write_configs,
)
from router._private.prometheus_routes import MONITOR_KEYS_PATH
from tests.e2e.fleet import Fleet, running_fleet
from tests.support import wait_for

SCRAPE_S = 1.0
CHAT = "/v1/chat/completions"
MODEL = "scripted"
SCRIPTED = f"""[[models]]
id = "{MODEL}"
engine = "scripted"
replies = ["one two three four five"]
"""
REGION_ALERT = "PalisadeRegionWithoutHealthyNode"

pytestmark = pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None or shutil.which(ALERTMANAGER) is None,
    reason="Debian's prometheus and prometheus-alertmanager are absent: run `make system-deps`",
)


class Alerts:
    """What the webhook received, with when each alert first arrived firing."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.firing: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}

    def emit(self, alert: dict[str, Any]) -> None:
        labels = alert.get("labels", {})
        key = (labels.get("alertname", ""), labels.get("region") or labels.get("org") or "")
        with self.lock:
            if alert.get("status") == "firing" and key not in self.firing:
                self.firing[key] = (time.monotonic(), alert)

    def arrived(self, name: str, scope: str) -> float | None:
        with self.lock:
            found = self.firing.get((name, scope))
        return found[0] if found else None


@contextmanager
def monitored(fleet: Fleet, root: Path, webhook: str) -> Iterator[str]:
    """Alertmanager, then Prometheus over `fleet`, scraping with a monitor key; yields
    Prometheus's URL."""
    key_file = root / "sd.key"
    write_private(key_file, fleet.admin.ok("POST", MONITOR_KEYS_PATH)["key"] + "\n")
    prometheus = f"127.0.0.1:{free_port()}"
    alertmanager = f"127.0.0.1:{free_port()}"
    setup = Monitoring(
        router_url=fleet.router.url,
        ca_file=fleet.ca_path,
        credentials_file=key_file,
        webhook_url=webhook,
        alertmanager_address=alertmanager,
        scrape_interval_s=SCRAPE_S,
        evaluation_interval_s=SCRAPE_S,
    )
    directory = write_configs(root / "monitoring", setup, group_wait_s=0.0)
    with ExitStack() as stack:
        for start, address in ((start_alertmanager, alertmanager), (start_prometheus, prometheus)):
            process = start(directory, address, directory / f"{start.__name__}.log")
            stack.callback(_stop, process)
            wait_for(lambda a=address: _ready(a), timeout=30, interval=0.1)  # type: ignore[misc]
        yield f"http://{prometheus}"


def _ready(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: Any) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except Exception:  # noqa: BLE001 - a stuck process is killed
        process.kill()
        process.wait(timeout=5)


def query(prometheus: str, promql: str) -> dict[str, float]:
    """An instant query's vector, keyed by the `node` label (or "" for none)."""
    data = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert data["status"] == "success", data
    return {r["metric"].get("node", ""): float(r["value"][1]) for r in data["data"]["result"]}


def _scrape_errors(prometheus: str) -> list[tuple[str, str, str]]:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]
    return [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets["activeTargets"]]


def ask(fleet: Fleet, key: str, region: str) -> None:
    reply = httpx.post(
        f"{fleet.router.url}{CHAT}",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        headers={"Authorization": f"Bearer {key}", "X-Palisade-Regions": region},
        timeout=30,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-palisade-region"] == region


def healthy(fleet: Fleet, node: str) -> bool:
    """What `palisade_router_node_up` exports for `node`: up and ready in the fleet view."""
    status = fleet.status()[node]
    return bool(status["state"] == "up" and status["ready"])


def test_prometheus_counts_requests_and_alerts_reach_the_webhook(tmp_path: Path) -> None:
    found = re.search(rf"alert: {REGION_ALERT}\n(?:\s+[^\n]*\n)*?\s+for: (\d+)s", RULES.read_text())
    assert found is not None
    for_s = float(found[1])
    alerts = Alerts()
    with (
        running_fleet(tmp_path) as fleet,
        AlertReceiver(alerts.emit, "127.0.0.1", 0) as receiver,
    ):
        fleet.start_member("eu-1", "eu-west", SCRIPTED)
        fleet.start_member("us-1", "us-east", SCRIPTED)
        fleet.wait_joined("eu-1", "us-1")
        key = fleet.org_key("acme", ["eu-west", "us-east"])
        for region, count in (("eu-west", 3), ("us-east", 2)):
            for _ in range(count):
                ask(fleet, key, region)
        # Budget set after the fact: 85 % of it is used (admission never refused a request).
        used = fleet.admin.ok("GET", "/admin/v1/orgs/acme/budget")["used_tokens"]
        assert used > 0
        fleet.admin.ok("PUT", "/admin/v1/orgs/acme/budget", {"tokens": int(used / 0.85)})

        with monitored(fleet, tmp_path, receiver.url) as prometheus:
            served = f'sum by (node) (palisade_requests_total{{endpoint="{CHAT}",status="200"}})'
            routed = 'sum(palisade_router_requests_total{endpoint="chat",status="200"})'
            try:
                wait_for(
                    lambda: len(query(prometheus, served)) == 2 and query(prometheus, routed),
                    timeout=20,
                    interval=0.2,
                )
            except TimeoutError:
                pytest.fail(f"not scraped: {_scrape_errors(prometheus)}")
            assert query(prometheus, served) == {"eu-1": 3.0, "us-1": 2.0}
            assert query(prometheus, routed) == {"": 5.0}
            ratio = query(prometheus, 'palisade_org_budget_used_ratio{org="acme"}')
            assert 0.8 <= ratio[""] < 1.0

            wait_for(lambda: alerts.arrived("PalisadeOrgBudget80", "acme"), timeout=15)
            assert alerts.arrived(REGION_ALERT, "us-east") is None
            # Its whole budget used: the 100 % alert arrives while the region alert is awaited.
            fleet.admin.ok("PUT", "/admin/v1/orgs/acme/budget", {"tokens": used})
            assert alerts.arrived("PalisadeOrgBudget100", "acme") is None

            killed = time.monotonic()
            fleet.members["us-1"].process.send_signal(signal.SIGKILL)
            wait_for(lambda: not healthy(fleet, "us-1"), timeout=15, interval=0.02)
            seen_down = time.monotonic()
            arrived = wait_for(
                lambda: alerts.arrived(REGION_ALERT, "us-east"), timeout=for_s + 20, interval=0.05
            )
            took = arrived - seen_down
            sys.stdout.write(
                f"\nregion alert at the webhook {took:.2f} s after the router saw us-east down "
                f"({arrived - killed:.2f} s after the kill; for {for_s:g} s, "
                f"scrape {SCRAPE_S:g} s)\n"
            )
            assert took <= for_s + 2 * SCRAPE_S, took
            assert alerts.arrived(REGION_ALERT, "eu-west") is None
            wait_for(lambda: alerts.arrived("PalisadeOrgBudget100", "acme"), timeout=15)
            assert query(prometheus, 'palisade_org_budget_used_ratio{org="acme"}') == {"": 1.0}
