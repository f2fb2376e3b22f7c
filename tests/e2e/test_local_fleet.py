"""`palisade fleet up` (what `make run` starts): a router serving HTTPS with a certificate
from its fleet CA and two regions whose appliances it enrolled with one-time tokens (mTLS
between them), that answer the printed curl line as pasted, keep their enrollment across
runs, and come back by themselves when one of their processes dies."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation import NodeCredentials
from tests.e2e.fleet import FleetUp, fleet_up
from tests.federation.tenants import Admin
from tests.support import run_palisade, wait_for

_CURL = re.compile(r"^\s*(curl -s --cacert .*Authorization: Bearer .*)$", re.MULTILINE)
REGIONS = ("eu-west", "us-east")
NODES = tuple(f"{region}-1" for region in REGIONS)


def pinned(fleet: FleetUp, key: str, region: str) -> httpx.Response:
    """A one-token completion that may run only in `region`, trusting the fleet CA."""
    return httpx.post(
        f"{fleet.url()}/v1/completions",
        json={"model": "smollm2-135m-instruct", "prompt": "Hi", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}", "X-Palisade-Regions": region},
        timeout=60,
        verify=fleet.trust(),
    )


def pasted(command: str) -> subprocess.CompletedProcess[str]:
    """`command` run by a shell, as if pasted into a terminal."""
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=180, check=False
    )


def enrolled(fleet: FleetUp) -> dict[str, dict[str, Any]]:
    """`palisade fleet node list --json` as the router's system admin, by node id (the CLI
    trusts the fleet CA of its PALISADE_HOME)."""
    home = {"PALISADE_HOME": str(fleet.home)}
    listing = run_palisade("fleet", "node", "list", "--json", "--url", fleet.url(), env=home)
    assert listing.returncode == 0, listing.stderr
    return {node["node_id"]: node for node in json.loads(listing.stdout)["data"]}


def test_fleet_up_serves_https_from_enrolled_nodes_and_the_printed_curl_works_as_pasted(
    tmp_path: Path,
) -> None:
    assert shutil.which("curl") is not None, "curl is needed to run the printed line"
    with fleet_up(tmp_path) as fleet:
        url = fleet.url()
        assert url.startswith("https://127.0.0.1:"), url
        curl = _CURL.search(fleet.text())
        assert curl is not None, fleet.text()
        result = pasted(f"{curl[1]} -D -")  # it reads the key from its file, trusts the CA
        assert result.returncode == 0, result.stderr
        assert '"object":"chat.completion"' in result.stdout
        receipt = re.search(r"x-palisade-region: (\S+)", result.stdout)
        assert receipt is not None
        assert receipt[1] in REGIONS
        # The same line without the fleet CA: curl refuses the router's certificate (60).
        untrusting = pasted(re.sub(r"--cacert \S+ ", "", curl[1]))
        assert untrusting.returncode == 60, (untrusting.returncode, untrusting.stderr)
        demo_key = (tmp_path / "demo.key").read_text().strip()
        assert demo_key not in fleet.text()  # not a terminal: where the key is, not the key
        for region in REGIONS:  # both regions serve the default model
            answer = pinned(fleet, demo_key, region)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-palisade-node"] == f"{region}-1"

        nodes = enrolled(fleet)
        assert set(nodes) == {"eu-west-1", "us-east-1"}
        for region in REGIONS:
            node = nodes[f"{region}-1"]
            assert (node["region"], node["revoked_at"]) == (region, None)
            credentials = NodeCredentials.load(tmp_path / "fleet" / f"{region}-1")
            assert credentials.enrolled
            certified = credentials.identity()
            assert (certified.node_id, certified.region) == (f"{region}-1", region)
            assert f"{certified.serial}" == node["serial"]
        status = run_palisade(
            "fleet", "status", "--json", "--url", url, env={"PALISADE_HOME": str(tmp_path)}
        )
        assert status.returncode == 0, status.stderr
        # The router reaches each appliance over HTTPS (its node certificate).
        assert all(n["url"].startswith("https://") for n in json.loads(status.stdout)["nodes"])
    assert "enrolled in eu-west with a one-time token" in fleet.text()

    # A second run on the same home: the same CA, the nodes keep their certificates.
    with fleet_up(tmp_path) as again:
        assert again.text().count("already enrolled") == 2, again.text()
        assert "with a one-time token" not in again.text()
        assert enrolled(again) == nodes
        demo_key = (tmp_path / "demo.key").read_text().strip()
        assert pinned(again, demo_key, "us-east").status_code == 200


def test_fleet_up_restarts_a_killed_appliance_and_router_and_the_other_region_stays_up(
    tmp_path: Path,
) -> None:
    with fleet_up(tmp_path) as fleet:
        url = fleet.url()
        admin = Admin(url, (tmp_path / "admin.key").read_text().strip(), fleet.trust())
        demo_key = (tmp_path / "demo.key").read_text().strip()
        before = fleet.children()
        assert set(before) == {"router", "eu-west-1", "us-east-1"}

        os.kill(before["eu-west-1"], signal.SIGKILL)
        us_east: list[int] = []

        def eu_west_back() -> bool:
            us_east.append(pinned(fleet, demo_key, "us-east").status_code)
            node = nodes(admin)["eu-west-1"]
            return node["restarts"] == 1 and node["state"] == "up" and node["ready"] is True

        wait_for(eu_west_back, timeout=120, interval=0.2)
        answer = pinned(fleet, demo_key, "eu-west")
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-palisade-node"] == "eu-west-1"
        after = fleet.children()
        assert after["eu-west-1"] != before["eu-west-1"]
        assert (after["us-east-1"], after["router"]) == (before["us-east-1"], before["router"])
        assert set(us_east) == {200}  # the other region answered all along
        assert fleet.process.poll() is None
        assert "eu-west-1 was killed by SIGKILL" in fleet.text()
        assert "restarting eu-west-1 in 1 s" in fleet.text()
        assert (
            "--- fleet up: restart 1 of eu-west-1 ---"
            in (tmp_path / "fleet" / "eu-west-1" / "appliance.log").read_text()
        )  # the crashed run's log is kept, the new one follows it

        status = run_palisade("fleet", "status", "--url", url, env={"PALISADE_HOME": str(tmp_path)})
        assert status.returncode == 0, status.stderr
        assert row(status.stdout, "eu-west-1")["restarts"] == "1"
        assert row(status.stdout, "us-east-1")["restarts"] == "0"
        metrics = httpx.get(f"{url}/metrics", timeout=10, verify=fleet.trust()).text
        assert 'palisade_router_node_restarts_total{node="eu-west-1"} 1.0' in metrics

        # The router comes back on the same URL, and the appliances find it there again.
        os.kill(after["router"], signal.SIGKILL)
        wait_for(lambda: both_joined(admin), timeout=60, interval=0.2)
        assert pinned(fleet, demo_key, "us-east").status_code == 200
        assert "router was killed by SIGKILL" in fleet.text()
        final = fleet.children()
        assert final["router"] != after["router"]
        assert (final["eu-west-1"], final["us-east-1"]) == (after["eu-west-1"], after["us-east-1"])


def nodes(admin: Admin) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in admin.ok("GET", "/federation/v1/fleet")["nodes"]}


def both_joined(admin: Admin) -> bool:
    try:
        fleet = nodes(admin)
    except httpx.TransportError:
        return False  # not listening again yet
    return len(fleet) == 2 and all(
        n["state"] == "up" and n["ready"] is True for n in fleet.values()
    )


def row(table: str, node: str) -> dict[str, str]:
    """One node's row of `palisade fleet status`, by column name."""
    lines = table.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    line = next(line for line in lines if line.startswith(node))
    return dict(zip(header, re.split(r"\s{2,}", line), strict=True))


_MONITORING_BINARIES = ("prometheus", "prometheus-alertmanager")
_PROMETHEUS_URL = re.compile(r"^Prometheus (?P<url>http://127\.0\.0\.1:\d+) ", re.MULTILINE)
_ALERTMANAGER_URL = re.compile(r"^Alertmanager (?P<url>http://127\.0\.0\.1:\d+),", re.MULTILINE)


def promql(prometheus: str, query: str) -> list[dict[str, Any]]:
    data = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=5).json()
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


def scraped_up(prometheus: str) -> dict[str, str]:
    """Each active target's health, by node (the router's own target as `router`)."""
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]
    return {
        t["labels"].get("node", t["labels"].get("palisade_role", "?")): t["health"]
        for t in targets["activeTargets"]
    }


@pytest.mark.skipif(
    any(shutil.which(binary) is None for binary in _MONITORING_BINARIES),
    reason="Debian's prometheus and prometheus-alertmanager are absent: run `make system-deps`",
)
def test_fleet_up_with_prometheus_scrapes_the_router_and_both_nodes_and_stops_them(
    tmp_path: Path,
) -> None:
    with fleet_up(tmp_path, "--with-prometheus") as fleet:
        text = fleet.text()
        prometheus, alertmanager = _PROMETHEUS_URL.search(text), _ALERTMANAGER_URL.search(text)
        assert prometheus is not None, text
        assert alertmanager is not None, text
        assert "palisade alerts tail --port 9095" in text
        children = fleet.children()
        assert set(children) == {"router", *NODES, *_MONITORING_BINARIES}, children
        monitoring = tmp_path / "monitoring"
        key = (monitoring / "scrape.key").read_text().strip()
        assert key not in text  # where the key is, never the key
        for private in ("scrape.key", "prometheus.yml", "alertmanager.yml", "prometheus.log"):
            assert (monitoring / private).stat().st_mode & 0o777 == 0o600, private
        assert (monitoring / "prometheus-data").is_dir()
        webhook = httpx.get(f"{alertmanager['url']}/api/v2/status", timeout=5).json()
        assert "url: http://127.0.0.1:9095/" in webhook["config"]["original"]

        wait_for(
            lambda: scraped_up(prometheus["url"]) == {"router": "up"} | dict.fromkeys(NODES, "up"),
            timeout=60,
            interval=0.5,
        )
        demo_key = (tmp_path / "demo.key").read_text().strip()
        for region in REGIONS:
            assert pinned(fleet, demo_key, region).status_code == 200
        # The scrape key is a monitor's: Prometheus reads the targets with it, no model.
        refused = pinned(fleet, key, REGIONS[0])
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "permission_denied"
        served = 'sum(palisade_router_requests_total{endpoint="completion",status="200"})'

        def counted() -> bool:
            found = promql(prometheus["url"], served)
            return bool(found) and found[0]["value"][1] == "2"

        wait_for(counted, timeout=30, interval=0.5)
    for name in _MONITORING_BINARIES:  # stopped with the fleet, and reaped by it
        assert not Path(f"/proc/{children[name]}").exists(), name


def test_fleet_up_with_prometheus_says_how_to_install_it_when_absent(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    result = run_palisade(
        "fleet", "up", "--with-prometheus", "--port", "0",
        env={"PALISADE_HOME": str(tmp_path), "PATH": str(tmp_path / "bin")},
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "`prometheus` is not installed: run `make system-deps`" in result.stderr
    assert not (tmp_path / "policy.db").exists()  # nothing was started
