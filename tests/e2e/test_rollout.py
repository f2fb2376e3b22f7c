"""Fleet rollouts end to end: a real router, real bundles, `palisade fleet update` as an
operator runs it, and nodes calling the fleet listener with their own certificates (mTLS).

The first test holds the router's routes against hostile nodes and bad uploads; the second
runs the acceptance scenario of issue 13 with three appliances under `palisade image
supervise`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from federation import client_context
from tests.e2e.fleet import Fleet, running_fleet, upstream_toml
from tests.images.bundles import make_bundle
from tests.support import REPO, run_palisade, start_server, wait_for

REGION = "eu-west"
EU = ["eu-1", "eu-2"]
MAX_BUNDLE = 4 * 1024 * 1024


def node_client(fleet: Fleet, node_id: str) -> httpx.Client:
    """An mTLS client to the router's fleet listener with `node_id`'s certificate."""
    home = fleet.root / node_id
    context = client_context(fleet.ca_path, home / "fleet" / "node.pem", home / "node.key")
    return httpx.Client(base_url=fleet.fleet_url, verify=context, timeout=10)


def fleet_update(fleet: Fleet, bundle: Path, trust: Path, *flags: str, ok: bool = True) -> Any:
    """`palisade fleet update … --json`: the rollout (or, with `ok=False`, the process)."""
    result = run_palisade(
        "fleet", "update", str(bundle), "--region", REGION, "--trust", str(trust),
        "--url", fleet.router.url, "--json", *flags,
        env={"PALISADE_HOME": str(fleet.router.home)},
    )  # fmt: skip
    if not ok:
        return result
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def upload(fleet: Fleet, body: bytes, key: str | None = "admin", **params: Any) -> httpx.Response:
    """A raw upload (what `palisade fleet update` sends) with the admin key, or `key=None`."""
    query = {"region": REGION, "version": "9.9.9", "sha256": hashlib.sha256(body).hexdigest()}
    headers = {"Authorization": f"Bearer {fleet.admin.key}"} if key else {}
    return httpx.post(
        f"{fleet.router.url}/admin/v1/fleet/updates",
        content=body,
        params=query | params,
        headers=headers,
        timeout=30,
    )


def hang_up_mid_upload(fleet: Fleet, size: int, part: bytes) -> None:
    """Start an upload of `size` bytes, send `part`, and hang up once the router is writing."""
    router = httpx.URL(fleet.router.url)
    assert router.port is not None
    query = f"region={REGION}&version=9.9.9&sha256={'0' * 64}"
    head = (
        f"POST /admin/v1/fleet/updates?{query} HTTP/1.1\r\nHost: {router.host}\r\n"
        f"Authorization: Bearer {fleet.admin.key}\r\nContent-Length: {size}\r\n\r\n"
    )
    with socket.create_connection((router.host, router.port), timeout=10) as sock:
        sock.sendall(head.encode() + part)
        wait_for(lambda: any(name.endswith(".part") for name in stored(fleet)), timeout=10)


def code_of(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def report(version: str, rollout: str | None = None, state: str = "committed") -> dict[str, Any]:
    body: dict[str, Any] = {"version": version, "slot": "B", "digest": "ab" * 32}
    body["committed"] = state == "committed"
    if rollout is not None:
        body["outcome"] = {"rollout": rollout, "state": state}
    return body


def stored(fleet: Fleet) -> list[str]:
    updates = fleet.router.home / "fleet" / "updates"
    return sorted(path.name for path in updates.iterdir()) if updates.exists() else []


def test_the_router_offers_each_batch_in_turn_and_refuses_hostile_nodes(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(f"max_bundle_bytes = {MAX_BUNDLE}\n")
    bundle, trust = make_bundle(tmp_path / "build", version="2.0.0", region=REGION)
    with running_fleet(tmp_path, "--config", str(config)) as fleet:
        for node_id in [*EU, "us-1"]:
            fleet.enroll(node_id, "us-east" if node_id == "us-1" else REGION)

        # Bad uploads are refused with nothing kept.
        body = bundle.read_bytes()
        assert code_of(upload(fleet, body, sha256="0" * 64)) == "bundle_sha256_mismatch"
        assert code_of(upload(fleet, body, region="ap-south")) == "region_has_no_nodes"
        assert code_of(upload(fleet, bytes(MAX_BUNDLE + 1))) == "bundle_too_large"
        anonymous = upload(fleet, body, key=None)
        assert (anonymous.status_code, code_of(anonymous)) == (401, "invalid_api_key")
        # `palisade fleet update` verifies first: a bundle the nodes would refuse never leaves.
        elsewhere, _ = make_bundle(tmp_path / "build", version="2.0.0", region="us-east")
        flipped = tmp_path / "flipped.pimg"
        flipped.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
        for bad, code in ((elsewhere, "wrong_region"), (flipped, "payload_hash_mismatch")):
            refused = fleet_update(fleet, bad, trust, ok=False)
            assert refused.returncode == 1
            assert refused.stderr.startswith("error: ")
            assert f"({code})" in refused.stderr
        assert stored(fleet) == []
        hang_up_mid_upload(fleet, len(body), body[: len(body) // 2])
        wait_for(lambda: stored(fleet) == [], timeout=10)

        rollout = fleet_update(fleet, bundle, trust)
        rollout_id = rollout["id"]
        assert (rollout["version"], rollout["total"], rollout["state"]) == ("2.0.0", 2, "running")
        assert stored(fleet) == [f"{rollout_id}.pimg"]
        again = upload(fleet, body)
        assert (again.status_code, code_of(again)) == (409, "rollout_in_progress")

        with node_client(fleet, "eu-1") as eu1, node_client(fleet, "eu-2") as eu2:
            # Only the first batch is offered, and only its node may fetch the bundle.
            offer = eu1.get("/federation/v1/updates/next")
            assert offer.status_code == 200, offer.text
            assert offer.json()["sha256"] == hashlib.sha256(body).hexdigest()
            assert eu2.get("/federation/v1/updates/next").status_code == 204
            with node_client(fleet, "us-1") as us1:
                assert us1.get("/federation/v1/updates/next").status_code == 204
            path = f"/federation/v1/updates/{rollout_id}/bundle"
            assert code_of(eu2.get(path)) == "update_not_offered"
            assert eu1.get(path).content == body

            # Reports: only for itself, only for what it was offered, small and well formed.
            assert code_of(eu2.put("/federation/v1/image", json=report("2.0.0", rollout_id))) == (
                "update_not_offered"
            )
            padded = report("2.0.0") | {"digest": "ab" * 32 + " " * 5000}
            assert eu1.put("/federation/v1/image", json=padded).status_code == 413
            malformed = eu1.put("/federation/v1/image", json=report("2.0.0") | {"slot": "C"})
            assert (malformed.status_code, code_of(malformed)) == (400, "invalid_value")
            anonymous = httpx.get(
                f"{fleet.fleet_url}/federation/v1/updates/next", verify=fleet.verify, timeout=10
            )
            assert code_of(anonymous) == "client_certificate_required"

            # eu-1 commits: the next batch (eu-2) is offered.
            for state in ("installed", "trial", "committed"):
                eu1.put("/federation/v1/image", json=report("2.0.0", rollout_id, state))
            assert eu2.get("/federation/v1/updates/next").status_code == 200

            # A revoked node gets nothing more and no longer holds the rollout up.
            fleet.admin.ok("POST", "/admin/v1/fleet/nodes/eu-2/revoke")
        with node_client(fleet, "eu-2") as eu2:
            try:
                refused = eu2.get("/federation/v1/updates/next").status_code
            except httpx.TransportError:
                refused = 0  # the handshake itself failed: the CRL already lists it
            assert refused in (0, 403)
        done = fleet.admin.ok("GET", f"/admin/v1/fleet/updates/{rollout_id}")
        assert done["state"] == "completed"
        assert {node["node_id"]: node["step"] for node in done["nodes"]} == {
            "eu-1": "committed",
            "eu-2": "revoked",
        }

        ended = fleet.admin.call("POST", f"/admin/v1/fleet/updates/{rollout_id}/stop")
        assert (ended.status_code, code_of(ended)) == (409, "rollout_not_running")
        shown = run_palisade(
            "fleet", "updates", "show", rollout_id, "--url", fleet.router.url,
            env={"PALISADE_HOME": str(fleet.router.home)},
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "completed (2/2 nodes done)" in shown.stdout
        assert re.search(r"eu-2\s+2\s+revoked", shown.stdout), shown.stdout

        # The rollout survives a router restart.
        fleet.router.stop()
        router = start_server("router", fleet.router.home, "--config", str(config))
        try:
            router.wait_ready(30)
            fleet.router = router
            assert fleet.admin.ok("GET", f"/admin/v1/fleet/updates/{rollout_id}") == done
        finally:
            router.stop()


# --- the acceptance scenario: three supervised appliances -----------------------------------

NODES = ["eu-1", "eu-2", "eu-3"]
# Small windows: a trial commits after 1 s healthy; nodes ask for updates every 0.3 s.
SUPERVISE_FLAGS = ["--window", "1", "--deadline", "30", "--update-poll", "0.3", "--grace", "5"]


@dataclass
class Supervised:
    """`palisade image supervise` of one node, its output (and its appliance's) captured."""

    node_id: str
    disk: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(self.output)


@contextmanager
def supervised(node_id: str, disk: Path, home: Path) -> Iterator[Supervised]:
    appliance = [sys.executable, "-m", "palisade", "appliance", "serve", "--port", "0"]
    command = [
        sys.executable, "-m", "palisade", "image", "supervise", "--disk", str(disk),
        "--data", str(home), *SUPERVISE_FLAGS, "--", *appliance, "--config", "{config}",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=os.environ | {"PALISADE_HOME": str(home), "PYTHONUNBUFFERED": "1"},
    )
    node = Supervised(node_id, disk, process)

    def pump() -> None:
        assert process.stdout is not None
        node.output.extend(process.stdout)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield node
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0, node.text()


def image_of(fleet: Fleet, node_id: str) -> tuple[str | None, bool | None]:
    row = fleet.status().get(node_id, {})
    return row.get("image_version"), row.get("image_committed")


def test_a_three_node_fleet_updates_in_batches_and_a_failing_bundle_stops_it(
    tmp_path: Path,
) -> None:
    build = tmp_path / "build"
    with running_fleet(tmp_path) as fleet:
        good = f'region = "{REGION}"\n' + upstream_toml(fleet.standin("upstream"), "cpu")
        broken = good + 'engine_threads = "many"\n'  # an appliance that cannot start
        v1, trust = make_bundle(build, version="1.0.0", config_template=good)
        v2, _ = make_bundle(build, version="2.0.0", config_template=good)
        v3, _ = make_bundle(build, version="3.0.0", config_template=broken)
        nodes, homes = [], {}
        for node_id in NODES:
            home = homes[node_id] = fleet.enroll(node_id, REGION)
            (home / "image").mkdir()
            shutil.copy(trust, home / "image" / "trust.json")
            disk = tmp_path / f"{node_id}.img"
            flashed = run_palisade(
                "image", "flash", str(v1), "--target", str(disk), "--init", "--data", str(home),
                "--trust", str(trust), "--slot-size", "4M", "--data-size", "1M",
            )  # fmt: skip
            assert flashed.returncode == 0, flashed.stdout + flashed.stderr
            nodes.append(fleet.stack.enter_context(supervised(node_id, disk, home)))
        # Identity and enrollment live on the data partition: no update may touch them.
        identities = {node_id: identity_files(home) for node_id, home in homes.items()}

        def all_on(version: str) -> bool:
            return all(image_of(fleet, node) == (version, True) for node in NODES)

        wait_for(lambda: all_on("1.0.0"), timeout=60, interval=0.2)

        # v2 goes out one node at a time: each is offered only after the one before commits.
        update = run_palisade(
            "fleet", "update", str(v2), "--region", REGION, "--trust", str(trust),
            "--batch", "1", "--wait", "--timeout", "120", "--url", fleet.router.url,
            env={"PALISADE_HOME": str(fleet.router.home)}, timeout=150,
        )  # fmt: skip
        assert update.returncode == 0, update.stdout + update.stderr + _logs(nodes)
        assert "completed" in update.stdout
        rollout = fleet.admin.ok("GET", "/admin/v1/fleet/updates")["data"][0]
        steps = sorted(rollout["nodes"], key=lambda node: node["offered_at"])
        assert [node["node_id"] for node in steps] == NODES
        assert all(node["step"] == "committed" for node in steps)
        for before, after in itertools.pairwise(steps):
            assert after["offered_at"] >= before["updated_at"]
        assert all_on("2.0.0")
        status = run_palisade(
            "fleet", "status", "--url", fleet.router.url,
            env={"PALISADE_HOME": str(fleet.router.home)},
        )  # fmt: skip
        rows = [line for line in status.stdout.splitlines() if line.startswith("eu-")]
        assert len(rows) == len(NODES)
        assert all("2.0.0 (" in row and "trial" not in row for row in rows), status.stdout

        # v3 cannot start: the first node fails its trial and rolls back to v2 by itself,
        # the rollout stops, and the other two are never offered v3.
        failing = run_palisade(
            "fleet", "update", str(v3), "--region", REGION, "--trust", str(trust),
            "--wait", "--timeout", "120", "--url", fleet.router.url,
            env={"PALISADE_HOME": str(fleet.router.home)}, timeout=150,
        )  # fmt: skip
        assert failing.returncode == 1, failing.stdout + failing.stderr + _logs(nodes)
        assert "(rollout_stopped)" in failing.stderr
        assert "node eu-1 reported rolled_back" in failing.stderr
        stopped = fleet.admin.ok("GET", "/admin/v1/fleet/updates")["data"][0]
        assert stopped["version"] == "3.0.0"
        assert stopped["state"] == "stopped"
        by_node = {node["node_id"]: node for node in stopped["nodes"]}
        assert by_node["eu-1"]["step"] == "rolled_back"
        assert [by_node[node]["offered_at"] for node in NODES[1:]] == [None, None]
        wait_for(lambda: all_on("2.0.0"), timeout=60, interval=0.2)
        fleet.wait_state("up", *NODES, ready=True)
        disks = {node.node_id: disk_slots(node.disk) for node in nodes}
        assert sorted(disks["eu-1"].values()) == [("2.0.0", "good"), ("3.0.0", "bad")]
        for node_id in NODES[1:]:
            assert ("3.0.0", "bad") not in disks[node_id].values()
            assert ("2.0.0", "good") in disks[node_id].values()
        assert {node_id: identity_files(home) for node_id, home in homes.items()} == identities


def identity_files(home: Path) -> dict[str, bytes]:
    """A node's key, node config and fleet certificate: what enrollment gave it."""
    return {
        name: (home / name).read_bytes() for name in ("node.key", "node.toml", "fleet/node.pem")
    }


def disk_slots(disk: Path) -> dict[str, tuple[str, str]]:
    """`palisade image status --json`: each slot's version and state."""
    status = run_palisade("image", "status", "--disk", str(disk), "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    slots = json.loads(status.stdout)["slots"]
    return {name: (slot["version"], slot["state"]) for name, slot in slots.items()}


def _logs(nodes: list[Supervised]) -> str:
    return "".join(f"\n--- {node.node_id} ---\n{node.text()[-3000:]}" for node in nodes)
