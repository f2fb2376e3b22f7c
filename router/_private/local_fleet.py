"""`palisade fleet up`: a whole fleet on this machine, for trying Palisade (what `make run` starts).

It starts the router on $PALISADE_HOME and one appliance per region, each with its own
state directory under $PALISADE_HOME/fleet/<node>/ (sharing $PALISADE_HOME/models), joined
with a generated join secret, plus a demo org allowed in every region. It waits until
every node is up, prints the URL, the demo key and a curl line, and stops them all on
Ctrl-C or SIGTERM. Once the fleet is up, a process that exits is started again after a
back-off (1 s, doubling to 30 s, from 1 s again after a minute up), and the exit is
reported with its code or signal and the tail of the process's log.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from federation import (
    JOIN_SECRET_ENV,
    ConfigError,
    PalisadeError,
    private_dir,
    private_file,
    shown_secret,
    write_private,
)

_LISTENING = re.compile(r"listening on (?P<url>http://\S+)")
_START_TIMEOUT_S = 180.0
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 30.0
# A process that stayed up this long before exiting starts the back-off from the beginning.
_STABLE_S = 60.0


class LocalFleetError(PalisadeError):
    """A process of the local fleet failed to start or died."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[str]
    log: Path | None
    # Starts the process again, with the same command and state directory.
    respawn: Callable[[], subprocess.Popen[str]] | None = None
    started: float = field(default_factory=time.monotonic)
    backoff: float = _BACKOFF_FIRST_S
    # When the exited process is to be started again (None while it runs).
    restart_at: float | None = None
    restarts: int = 0


def run_local_fleet(home: Path, regions: list[str], port: int, model: str) -> int:
    private_dir(home)
    secret = os.environ.get(JOIN_SECRET_ENV) or _local_secret(home)
    env = os.environ | {JOIN_SECRET_ENV: secret, "PYTHONUNBUFFERED": "1"}
    children: list[_Child] = []
    stopping = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        del signum
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        router, url = _start_router(home, port, regions, env)
        children.append(router)
        children.extend(
            _start_appliance(home, f"{region}-1", region, url, env) for region in regions
        )
        _wait_router(url, router, stopping)
        _wait_joined(url, _secret_file(home, "admin.key"), children, stopping)
        if stopping.is_set():
            return 0
        demo_key = shown_secret(_secret_file(home, "demo.key"), home / "demo.key")
        _announce(url, demo_key, model, regions, children)
        while not stopping.wait(0.5):
            for child in children:
                _tend(child, time.monotonic())
        return 0
    finally:
        _stop_all(children)


def _local_secret(home: Path) -> str:
    path = home / "join.secret"
    if path.is_file():
        return path.read_text().strip()
    value = secrets.token_urlsafe(32)
    write_private(path, value + "\n")
    return value


def _secret_file(home: Path, name: str) -> str:
    try:
        return (home / name).read_text().strip()
    except OSError as exc:
        raise LocalFleetError(
            f"cannot read {home / name} ({exc.strerror}); the router writes it on its first "
            "start. If it was deleted, move policy.db aside to start over."
        ) from exc


def _wait_router(url: str, router: _Child, stopping: threading.Event) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not stopping.is_set() and time.monotonic() < deadline:
        if router.process.poll() is not None:
            raise LocalFleetError(_died(router))
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        stopping.wait(0.1)


def _palisade(*args: str) -> list[str]:
    return [sys.executable, "-m", "palisade", *args]


def _start_router(
    home: Path, port: int, regions: list[str], env: dict[str, str]
) -> tuple[_Child, str]:
    process, urls, found = _spawn_router(home, port, regions, env)
    child = _Child("router", process, None)
    found.wait(_START_TIMEOUT_S)
    if not urls:
        _stop_all([child])
        raise LocalFleetError("the router did not start; its output is above.")
    # Started again on the port it got, so the appliances find it at the same URL.
    bound = int(urls[0].rsplit(":", 1)[1])
    child.respawn = lambda: _spawn_router(home, bound, regions, env)[0]
    return child, urls[0]


def _spawn_router(
    home: Path, port: int, regions: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    """The router process, its output relayed here; `urls` gets its URL, then `found` is set."""
    command = _palisade("router", "serve", "--port", str(port), "--demo-regions", ",".join(regions))
    process = subprocess.Popen(  # noqa: S603 - our own CLI, arguments built here
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env | {"PALISADE_HOME": str(home)},
    )
    found = threading.Event()
    urls: list[str] = []

    def relay() -> None:
        # The router's own output (its first-start admin key, warnings) goes to this terminal.
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if not urls and (match := _LISTENING.search(line)):
                urls.append(match["url"])
                found.set()
        found.set()

    threading.Thread(target=relay, daemon=True).start()
    return process, urls, found


def _start_appliance(
    home: Path, node: str, region: str, router_url: str, env: dict[str, str]
) -> _Child:
    node_home = home / "fleet" / node
    private_dir(node_home)
    models = node_home / "models"
    if not models.exists():
        models.symlink_to(home / "models", target_is_directory=True)
    log = node_home / "appliance.log"
    private_file(log)  # like the state beside it: owner only
    command = _palisade(
        "appliance", "serve", "--port", "0", "--region", region, "--node-id", node,
        "--router", router_url,
    )  # fmt: skip

    def spawn(mode: str) -> subprocess.Popen[str]:
        # A restart appends: the crashed run's last lines stay in the log.
        with log.open(mode) as output:
            return subprocess.Popen(  # noqa: S603 - our own CLI, arguments built here
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                env=env | {"PALISADE_HOME": str(node_home)},
            )

    return _Child(node, spawn("w"), log, respawn=lambda: spawn("a"))


def _tend(child: _Child, now: float) -> None:
    """Once `child` has exited, report it and start it again after its back-off."""
    if child.respawn is None:
        if child.process.poll() is not None:
            raise LocalFleetError(_died(child))
        return
    if child.restart_at is None:
        if child.process.poll() is None:
            return
        if now - child.started >= _STABLE_S:
            child.backoff = _BACKOFF_FIRST_S
        child.restart_at = now + child.backoff
        _say(f"\n{_died(child)}\nfleet up: restarting {child.name} in {child.backoff:g} s.\n")
        child.backoff = min(child.backoff * 2, _BACKOFF_MAX_S)
    elif now >= child.restart_at:
        child.restarts += 1
        if child.log is not None:
            with child.log.open("a") as log:
                log.write(f"--- fleet up: restart {child.restarts} of {child.name} ---\n")
        child.process = child.respawn()
        child.started, child.restart_at = now, None
        _say(f"fleet up: {child.name} restarted (restart {child.restarts}).\n")


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _wait_joined(
    url: str, admin_key: str, children: list[_Child], stopping: threading.Event
) -> None:
    expected = {child.name for child in children if child.log is not None}
    sys.stdout.write(f"Waiting for {len(expected)} appliances to load and join…\n")
    sys.stdout.flush()
    deadline = time.monotonic() + _START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {admin_key}"}
    while not stopping.is_set():
        if dead := next((c for c in children if c.process.poll() is not None), None):
            raise LocalFleetError(_died(dead))
        try:
            nodes = httpx.get(f"{url}/federation/v1/fleet", headers=headers, timeout=5).json()
            ready = {n["node_id"] for n in nodes["nodes"] if n["state"] == "up" and n["ready"]}
        except (httpx.HTTPError, ValueError, KeyError):
            ready = set()
        if expected <= ready:
            return
        if time.monotonic() > deadline:
            raise LocalFleetError(
                f"appliances {sorted(expected - ready)} did not join within "
                f"{_START_TIMEOUT_S:.0f} s; see their logs under fleet/."
            )
        stopping.wait(0.25)


def _died(child: _Child) -> str:
    tail = ""
    if child.log is not None and child.log.is_file():
        lines = child.log.read_text(errors="replace").splitlines()[-15:]
        tail = "\n  ".join(["", *lines])
    where = f" (log: {child.log})" if child.log is not None else ""
    return f"{child.name} {_exit(child.process.returncode)}{where}{tail}"


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _announce(url: str, key: str, model: str, regions: list[str], children: list[_Child]) -> None:
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    nodes = ", ".join(f"{c.name}" for c in children if c.log is not None)
    sys.stdout.write(
        f"\nPalisade fleet ready: router {url}, appliances {nodes} "
        f"(regions {', '.join(regions)}).\n"
        f"  export PALISADE_URL={url} PALISADE_API_KEY={key}\n"
        f"  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
        f"-H \"Authorization: Bearer {key}\" -d '{body}'\n"
        f"  palisade fleet status --url {url}      # as the system admin (admin.key)\n"
        "Stop with Ctrl-C.\n"
    )
    sys.stdout.flush()


def _stop_all(children: list[_Child]) -> None:
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            child.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(timeout=5)


def check_regions(text: str) -> list[str]:
    regions = [part.strip() for part in text.split(",") if part.strip()]
    pattern = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
    if not regions or not all(pattern.match(region) for region in regions):
        raise ConfigError(
            f"--regions {text!r}: give comma-separated region names such as eu-west,us-east "
            "(lowercase letters, digits, '.', '_' or '-')."
        )
    return regions
