"""Real fleets for end-to-end tests: a router and appliances, each its own process.

Every member is enrolled the way an operator enrolls one (`palisade fleet token create`,
`palisade node init`, `palisade node enroll`, all real processes) before it serves, so
every hop is mTLS: the member heartbeats to the router's fleet listener with its node
certificate, and serves HTTPS with it (tests reach it with `Fleet.verify`, which trusts the
fleet CA).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from federation import NodeCredentials
from provisioning import enroll_node, init_node
from tests.federation.tenants import Admin
from tests.standin import RunningStandin, run_standin
from tests.support import (
    REPO,
    Server,
    default_model_path,
    model_toml,
    run_palisade,
    start_server,
    wait_for,
    write_config,
)

# Fleets need no shared secret: members enroll. (Kept for callers that lay it over an env.)
FLEET_ENV: dict[str, str] = {}
UPSTREAM_MODEL = "standin-model"
_FLEET_LISTENER = re.compile(r"fleet \(mTLS\) on (?P<url>https://[^\s,]+)")


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

    @property
    def fleet_url(self) -> str:
        found = _FLEET_LISTENER.search(self.router.log_text())
        assert found is not None, self.router.log_text()
        return found["url"]

    @property
    def ca_path(self) -> Path:
        return self.router.home / "fleet" / "ca.pem"

    @property
    def verify(self) -> ssl.SSLContext:
        """Checks a member's certificate (issued for 127.0.0.1 by the fleet CA)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def standin(self, name: str, **settings: Any) -> RunningStandin:
        standin = self.stack.enter_context(run_standin(**settings))
        self.standins[name] = standin
        return standin

    def token(self, region: str, node_id: str | None = None, *flags: str) -> str:
        """A one-use enrollment token from the router (`palisade fleet token create`)."""
        args = ["--region", region, *(["--node-id", node_id] if node_id else []), *flags]
        created = run_palisade(
            "fleet", "token", "create", *args, "--url", self.router.url, "--json",
            env={"PALISADE_HOME": str(self.router.home)},
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        token: str = json.loads(created.stdout)["token"]
        return token

    def enroll(self, node_id: str, region: str, *, device_class: str | None = None) -> Path:
        """Initialise and enroll a home for `node_id` with a one-use token bound to it (once:
        an enrolled home is reused, as a restarted node reuses its certificate).

        In this process, through provisioning's API: the CLI commands doing the same are
        tested in test_enrollment and the local fleet, and three interpreter starts per
        member would cost every e2e fleet seconds."""
        home = self.root / node_id
        if NodeCredentials.load(home).enrolled:
            return home
        spec: dict[str, Any] = {"region": region, "node_id": node_id}
        if device_class is not None:
            spec["device_class"] = device_class
        token: str = self.admin.ok("POST", "/admin/v1/fleet/tokens", spec)["token"]
        init_node(
            home, region=region, node_id=node_id, device_class=device_class, hosts=["127.0.0.1"]
        )
        enroll_node(home, token=token, router_url=self.fleet_url)
        return home

    def start_member(self, node_id: str, region: str, config_text: str) -> Server:
        """Enroll `node_id` in `region` and start it (the caller waits with `wait_joined`)."""
        home = self.enroll(node_id, region)
        config = write_config(home, config_text)
        member = start_server("appliance", home, *config)
        member.verify = self.verify
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
    """A router (its fleet listener on a free port) in `root / "router"`.

    Meanwhile this process's default TLS trust (`SSL_CERT_FILE`, which httpx and the openai
    SDK read) is the fleet CA, so a test reaches a member's HTTPS URL as a client of that
    fleet would; tests of other trust pass their own context.
    """
    with contextlib.ExitStack() as stack:
        router = start_server("router", root / "router", *router_args)
        stack.callback(router.stop)
        fleet = Fleet(root, router, stack)
        stack.enter_context(_trusting(fleet.ca_path))
        router.wait_ready(30)
        yield fleet


@contextmanager
def _trusting(ca_path: Path) -> Iterator[None]:
    previous = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(ca_path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous


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
    home: Path

    def text(self) -> str:
        return "".join(self.output)

    @property
    def ca(self) -> Path:
        """The fleet CA the router's HTTPS certificate is from (what clients must trust)."""
        return self.home / "fleet" / "ca.pem"

    def trust(self) -> ssl.SSLContext:
        """A client context trusting the fleet CA only (for httpx `verify=`)."""
        return ssl.create_default_context(cafile=self.ca)

    def url(self) -> str:
        found = _FLEET_URL.search(self.text())
        assert found is not None, self.text()
        return found["url"]

    def children(self) -> dict[str, int]:
        """Its child processes' PIDs: `router`, each appliance by node id, and with
        `--with-prometheus` `prometheus` and `prometheus-alertmanager`."""
        found: dict[str, int] = {}
        pids = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        for pid in pids.split():
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if "--node-id" in args:
                name = args[args.index("--node-id") + 1]
            elif "palisade" in args:  # python -m palisade router serve …
                name = args[3]
            else:
                name = Path(args[0]).name
            found[name] = int(pid)
        return found


@contextmanager
def fleet_up(home: Path, *flags: str, umask: int = -1) -> Iterator[FleetUp]:
    """`palisade fleet up --port 0 [flags]` on `home` (under `umask` if given); SIGTERM at
    the end must exit 0 and stop it all. `home` may hold an earlier run's fleet."""
    if not (home / "models").exists():
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
    fleet = FleetUp(process, [], home)

    def pump() -> None:
        assert process.stdout is not None
        fleet.output.extend(process.stdout)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    url = None
    try:
        wait_for(lambda: FLEET_READY in fleet.text() or process.poll() is not None, timeout=240)
        assert FLEET_READY in fleet.text(), fleet.text()
        url = fleet.url()
        yield fleet
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0, fleet.text()
    with pytest.raises(httpx.ConnectError) as refused:  # the router no longer answers
        httpx.get(f"{url}/healthz", timeout=2, verify=fleet.trust())
    assert "CERTIFICATE" not in str(refused.value).upper()  # refused, not distrusted
