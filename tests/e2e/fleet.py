"""Real fleets for end-to-end tests: a router and appliances, each its own process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from federation import JOIN_SECRET_ENV
from tests.federation.tenants import Admin
from tests.standin import RunningStandin, run_standin
from tests.support import (
    REPO,
    Server,
    default_model_path,
    model_toml,
    start_server,
    wait_for,
    write_config,
)

SECRET = "e2e-fleet-join-secret-0123456789"  # noqa: S105 - a test fleet's secret
FLEET_ENV = {JOIN_SECRET_ENV: SECRET}
UPSTREAM_MODEL = "standin-model"


def upstream_toml(standin: RunningStandin, device: str, **extra: object) -> str:
    """An appliance fronting a stand-in OpenAI upstream, declaring `device`."""
    fields: dict[str, object] = {
        "id": UPSTREAM_MODEL,
        "engine": "openai",
        "upstream_url": standin.v1,
        "device_class": device,
    }
    fields.update(extra)
    lines = [f"{key} = {_toml(value)}" for key, value in fields.items()]
    return "[[models]]\n" + "\n".join(lines) + "\n"


def llama_toml(**extra: object) -> str:
    return model_toml(**extra)


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass
class Fleet:
    """A running router, its members, and the stand-ins they front."""

    root: Path
    router: Server
    stack: contextlib.ExitStack
    members: dict[str, Server] = field(default_factory=dict)
    standins: dict[str, RunningStandin] = field(default_factory=dict)

    @property
    def admin(self) -> Admin:
        return Admin(self.router.url, (self.router.home / "admin.key").read_text().strip())

    def standin(self, name: str, **settings: Any) -> RunningStandin:
        standin = self.stack.enter_context(run_standin(**settings))
        self.standins[name] = standin
        return standin

    def start_member(self, node_id: str, region: str, config_text: str) -> Server:
        """Start an appliance that joins this router (the caller waits with `wait_joined`)."""
        home = self.root / node_id
        config = write_config(home, config_text)
        member = start_server(
            "appliance",
            home,
            *config,
            "--region",
            region,
            "--node-id",
            node_id,
            "--router",
            self.router.url,
            env=FLEET_ENV,
        )
        self.stack.callback(member.stop)
        self.members[node_id] = member
        return member

    def status(self) -> dict[str, dict[str, Any]]:
        """The router's fleet view, by node id."""
        data = self.admin.ok("GET", "/federation/v1/fleet")
        return {node["node_id"]: node for node in data["nodes"]}

    def wait_state(
        self, state: str, *nodes: str, timeout: float = 60.0, ready: bool = False
    ) -> None:
        def reached() -> bool:
            status = self.status()
            return all(
                status.get(node, {}).get("state") == state and (not ready or status[node]["ready"])
                for node in nodes
            )

        wait_for(reached, timeout=timeout, interval=0.05)

    def wait_joined(self, *nodes: str, timeout: float = 90.0) -> None:
        for node in nodes:
            self.members[node].wait_ready(timeout)
        self.wait_state("up", *nodes, timeout=timeout, ready=True)

    def org_key(self, org: str, regions: list[str], key_regions: list[str] | None = None) -> str:
        """A new org allowed in `regions` and an org_user key (optionally narrower)."""
        admin = self.admin
        admin.create_org(org, regions)
        member = admin.member(org, "org_admin", f"owner@{org}.test")
        if key_regions is None:
            return member.key
        created = admin.as_member(member).ok(
            "POST", "/admin/v1/keys", {"name": "narrow", "regions": key_regions}
        )
        key: str = created["key"]
        return key


@contextlib.contextmanager
def running_fleet(root: Path, *router_args: str) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        router = start_server("router", root / "router", *router_args, env=FLEET_ENV)
        stack.callback(router.stop)
        router.wait_ready(30)
        yield Fleet(root, router, stack)


def served_by(response: httpx.Response) -> tuple[str, str, str]:
    headers = response.headers
    return (
        headers["x-palisade-region"],
        headers["x-palisade-node"],
        headers["x-palisade-device"],
    )


_FLEET_URL = re.compile(r"export PALISADE_URL=(?P<url>\S+)")
FLEET_READY = "Palisade fleet ready"


@dataclass
class FleetUp:
    """A running `palisade fleet up` and everything it printed so far."""

    process: subprocess.Popen[str]
    output: list[str]

    def text(self) -> str:
        return "".join(self.output)

    def url(self) -> str:
        found = _FLEET_URL.search(self.text())
        assert found is not None, self.text()
        return found["url"]

    def children(self) -> dict[str, int]:
        """Its child processes' PIDs: `router`, and each appliance by node id."""
        found: dict[str, int] = {}
        pids = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        for pid in pids.split():
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            name = args[args.index("--node-id") + 1] if "--node-id" in args else args[3]
            found[name] = int(pid)
        return found


@contextmanager
def fleet_up(home: Path, *flags: str, umask: int = -1) -> Iterator[FleetUp]:
    """`palisade fleet up --port 0 [flags]` on `home` (under `umask` if given); SIGTERM at
    the end must exit 0 and stop it all."""
    (home / "models").symlink_to(default_model_path().parent, target_is_directory=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "palisade", "fleet", "up", "--port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=os.environ | {"PALISADE_HOME": str(home), "PYTHONUNBUFFERED": "1"},
        umask=umask,
    )
    fleet = FleetUp(process, [])

    def pump() -> None:
        assert process.stdout is not None
        fleet.output.extend(process.stdout)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    url = None
    try:
        wait_for(lambda: FLEET_READY in fleet.text(), timeout=180)
        url = fleet.url()
        yield fleet
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0, fleet.text()
    try:
        httpx.get(f"{url}/healthz", timeout=2)
        raise AssertionError("the router still answers after fleet up stopped")
    except httpx.TransportError:
        pass
