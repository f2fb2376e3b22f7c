"""The canary on a real fleet: a router running its own canary every second, two appliances
(stand-in upstreams) in two regions; counts go up per region, and killing one region's only
node turns that region's outcome to error while the other stays ok. The standalone
`palisade canary --once` sees the same, and a tenant may not pin a device class."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

from tests.e2e.fleet import UPSTREAM_MODEL, running_fleet, upstream_toml
from tests.support import Server, run_palisade, wait_for

REGIONS = ("eu-west", "us-east")
CHAT = "/v1/chat/completions"


def canary_count(router: Server, region: str, outcome: str) -> float:
    return router.metric(
        "palisade_canary_requests_total", region=region, device_class="cpu", outcome=outcome
    )


def test_the_canary_counts_per_region_and_fails_where_the_node_died(tmp_path: Path) -> None:
    with running_fleet(tmp_path, "--canary-every", "1s") as fleet:
        for region in REGIONS:
            node = f"{region}-1"
            fleet.start_member(node, region, upstream_toml(fleet.standin(node), "cpu"))
        fleet.wait_joined(*(f"{region}-1" for region in REGIONS))
        router = fleet.router

        # Every region's probe succeeds, round after round, and is timed.
        wait_for(lambda: all(canary_count(router, r, "ok") >= 2 for r in REGIONS), timeout=30)
        assert all(canary_count(router, r, "error") == 0 for r in REGIONS)
        assert (
            router.metric(
                "palisade_canary_latency_seconds_count", region="eu-west", device_class="cpu"
            )
            >= 2
        )
        # The probes reached each region's node, pinned there.
        for region in REGIONS:
            assert fleet.standins[f"{region}-1"].stats()["requests"].get(CHAT, 0) >= 2

        # The standalone canary, with a key issued to it, sees the same fleet.
        issued = run_palisade(
            "canary", "key", "--url", router.url, "--key", fleet.admin.key, "--json"
        )
        assert issued.returncode == 0, issued.stderr
        canary_key = json.loads(issued.stdout)["key"]
        once = run_palisade("canary", "--once", "--url", router.url, "--key", canary_key)
        assert once.returncode == 0, once.stdout + once.stderr
        assert sorted(line.split()[1:5] for line in once.stdout.splitlines()) == [
            [region, "cpu", UPSTREAM_MODEL, "ok"] for region in REGIONS
        ]

        # us-east's only node dies: its canary turns to error; eu-west's stays ok.
        member = fleet.members["us-east-1"]
        member.process.send_signal(signal.SIGKILL)
        member.process.wait(timeout=10)
        errors_before = canary_count(router, "us-east", "error")
        wait_for(lambda: canary_count(router, "us-east", "error") >= errors_before + 2, timeout=30)
        eu_ok = canary_count(router, "eu-west", "ok")
        wait_for(lambda: canary_count(router, "eu-west", "ok") > eu_ok, timeout=30)
        assert canary_count(router, "eu-west", "error") == 0
        assert "canary us-east/cpu" in router.log_text()

        failing = run_palisade("canary", "--once", "--url", router.url, "--key", canary_key)
        assert failing.returncode == 1, failing.stdout + failing.stderr
        outcomes = {line.split()[1]: line.split()[4] for line in failing.stdout.splitlines()}
        assert outcomes == {"eu-west": "ok", "us-east": "error"}


def test_a_tenant_may_not_pin_a_device_class(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        fleet.start_member("eu-1", "eu-west", upstream_toml(fleet.standin("eu-1"), "cpu"))
        fleet.wait_joined("eu-1")
        key = fleet.org_key("acme", ["eu-west"])
        body = {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {key}", "X-Palisade-Device-Class": "cpu"}
        refused = httpx.post(fleet.router.url + CHAT, json=body, headers=headers, timeout=30)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "permission_denied"
        assert fleet.standins["eu-1"].stats()["requests"].get(CHAT, 0) == 0
        # Nothing was admitted for it: the org's key is served as usual without the header.
        del headers["X-Palisade-Device-Class"]
        served = httpx.post(fleet.router.url + CHAT, json=body, headers=headers, timeout=30)
        assert served.status_code == 200, served.text
