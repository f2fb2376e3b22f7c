"""`palisade fleet up`: a whole fleet on this machine, for trying Palisade (what `make run` starts).

It starts the router on $PALISADE_HOME, serving HTTPS with a certificate from its own fleet
CA, plus a demo org allowed in every region; then, for one appliance per region, each with
its own state directory under $PALISADE_HOME/fleet/<node>/ (sharing $PALISADE_HOME/models),
it creates a one-time enrollment token through the admin API and runs `palisade node init`
and `palisade node enroll` there, as an operator would (a node enrolled by an earlier run
is not enrolled again). The appliances then serve with their node certificates, mTLS both
ways with the router. It waits until every node is up, prints the URL, the demo key and a
curl line trusting the fleet CA, and stops them all on Ctrl-C or SIGTERM. Once the fleet
is up, a process that exits is started again after a back-off (1 s, doubling to 30 s, from
1 s again after a minute up), and the exit is reported with its code or signal and the
tail of the process's log.

With `--routers N --database postgresql` (issue 18), several routers serve one fleet: a
private PostgreSQL cluster under $PALISADE_HOME/postgres (`PostgresCluster`; the routers'
password in the 0600 passfile there, PGPASSFILE, never on a command line), migrated with
`palisade db migrate`, then routers `router-1`…`router-N` with homes under
$PALISADE_HOME/routers/ (router-1 first: it bootstraps the admin key and the demo org),
each with its `router.toml` naming the shared store and router-1's fleet directory
(`fleet_dir`: one CA, one router certificate, one registry, see fleet_identity.py), and
HAProxy (`Haproxy`, TCP passthrough, so mTLS stays end to end) on the public port and on
the fleet port, the URLs printed and told to nodes. Routers share membership through the
store (shared_members.py), so any of them serves any request. `--routers 1` with SQLite
(the default) is the single router above.

With `--with-prometheus`, Debian's Prometheus and Alertmanager run beside it, on 127.0.0.1,
with configs, data and logs under $PALISADE_HOME/monitoring/: Prometheus scrapes the router
and, through it, every node (discovered from the router), with a key of the monitor user
(which may read the scrape targets and node metrics, nothing else) issued once and kept
there (0600, never printed); Alertmanager posts alerts to the webhook
`palisade alerts tail` receives on 127.0.0.1:9095.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import unquote, urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from federation import (
    JOIN_SECRET_ENV,
    ConfigError,
    NodeCredentials,
    NodeIdentity,
    PalisadeError,
    load_pem_certificate,
    private_dir,
    private_file,
    raw_public_key,
    shown_secret,
    write_private,
)
from router._private.alerts import DEFAULT_ALERTS_PORT
from router._private.ca import FLEET_DIR, FleetCA
from router._private.haproxy import Backend, Haproxy, HealthCheck
from router._private.monitoring import (
    ALERTMANAGER,
    PROMETHEUS,
    RULES,
    Monitoring,
    command,
    free_port,
    start_alertmanager,
    start_prometheus,
    write_configs,
)
from router._private.postgres import PostgresCluster
from router._private.prometheus_routes import MONITOR_KEYS_PATH, SD_PATH

_LISTENING = re.compile(r"listening on (?P<url>https?://\S+)")
_FLEET_LISTENING = re.compile(r"fleet \(mTLS\) on (?P<url>https://[^\s,]+)")
ROUTER_ID = "router"
# `--routers N --database postgresql`: router homes, the PostgreSQL cluster and HAProxy's
# directory under $PALISADE_HOME, the routers' database and its password file.
ROUTERS_DIR = "routers"
POSTGRES_DIR = "postgres"
HAPROXY_DIR = "haproxy"
DATABASE = "palisade"
PASSFILE = "pgpass"
MAX_ROUTERS = 16
# The router's HTTPS certificate for its public listener (issued by the fleet CA), and the
# names a client on this machine may reach it by.
PUBLIC_CERT = "public.pem"
PUBLIC_HOSTS = ("127.0.0.1", "localhost")
# Enrollment tokens made here are bound to one node and live just long enough to be used.
_TOKEN_TTL_S = 600
_ENROLL_TIMEOUT_S = 120
_START_TIMEOUT_S = 180.0
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 30.0
# A process that stayed up this long before exiting starts the back-off from the beginning.
_STABLE_S = 60.0
# `--with-prometheus` (docs/operations.md): Debian's default ports beside the router's 8300,
# free ones with `--port 0`; alerts go to `palisade alerts tail`'s default port either way.
MONITORING_DIR = "monitoring"
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
SCRAPE_KEY = "scrape.key"
# A local fleet is watched closely: a change shows in Prometheus within seconds.
_SCRAPE_S = 5.0


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


@dataclass(frozen=True)
class _RouterUrls:
    public: str  # https://…: the OpenAI and admin APIs
    fleet: str  # https://…: where nodes enroll and heartbeat (mTLS)
    # Each router's own public URL behind a load balancer (empty for a lone router): a
    # client of `public` may land on any of them, so each must know every node.
    behind: tuple[str, ...] = ()


@dataclass(frozen=True)
class _MonitoringUrls:
    prometheus: str
    alertmanager: str
    webhook: str


def run_local_fleet(
    home: Path,
    regions: list[str],
    port: int,
    model: str,
    *,
    with_prometheus: bool = False,
    routers: int = 1,
    database: str = "sqlite",
) -> int:
    shared = _check_shape(routers, database)
    for binary in (PROMETHEUS, ALERTMANAGER) if with_prometheus else ():
        command(binary)  # before anything starts: says to run `make system-deps`
    private_dir(home)
    # Always certificates: the lab switch for plain-HTTP fleets never reaches this fleet.
    env = {k: v for k, v in os.environ.items() if k != JOIN_SECRET_ENV}
    env |= {"PYTHONUNBUFFERED": "1"}
    owner = home / ROUTERS_DIR / f"{ROUTER_ID}-1" if shared else home
    ca_path, public_cert = public_certificate(owner)
    ca = FleetCA.load_or_create(owner)
    if shared:
        ca_path = _ca_copy(home, ca)
    children: list[_Child] = []
    stopping = threading.Event()

    def on_signal(signum: int, _: FrameType | None) -> None:
        del signum
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with contextlib.ExitStack() as stack:
        client = httpx.Client(verify=ssl.create_default_context(cafile=ca_path), timeout=10)
        stack.callback(client.close)
        if shared:
            urls = _start_shared(stack, home, port, regions, routers, env, children, client)
        else:
            stack.callback(_stop_all, children)
            router, urls = _start_router(home, port, regions, public_cert, env)
            children.append(router)
            _wait_router(client, urls.public, router, stopping)
        admin_key = _secret_file(owner, "admin.key")
        for region in regions:
            if stopping.is_set():
                return 0
            _enroll(
                client, home, f"{region}-1", region, urls=urls, admin_key=admin_key, env=env, ca=ca
            )
        children.extend(
            _start_appliance(home, f"{region}-1", region, urls.fleet, env) for region in regions
        )
        _wait_joined(client, urls.behind or (urls.public,), admin_key, children, stopping)
        if stopping.is_set():
            return 0
        nodes = [child.name for child in children if child.log is not None]
        monitoring = None
        if with_prometheus:
            scrape_key = _scrape_key(client, home, urls.public, admin_key)
            started, monitoring = _start_monitoring(home, port, urls.public, ca_path, scrape_key)
            children.extend(started)
            _wait_monitoring(client, started, monitoring, stopping)
        demo_key = shown_secret(_secret_file(owner, "demo.key"), owner / "demo.key")
        _announce(urls.public, demo_key, model, regions, nodes, ca_path=ca_path, then=monitoring)
        while not stopping.wait(0.5):
            for child in children:
                _tend(child, time.monotonic())
        return 0


def _ca_copy(home: Path, ca: FleetCA) -> Path:
    """The fleet CA certificate at $PALISADE_HOME/fleet/ca.pem too, where client commands
    (`palisade fleet status --url`) look for it, as beside a lone router: the certificate
    only, its key stays in router-1's fleet directory."""
    path = home / FLEET_DIR / "ca.pem"
    write_private(path, ca.pem)
    return path


def _check_shape(routers: int, database: str) -> bool:
    """Whether the routers share a PostgreSQL store (several routers need one)."""
    if database not in ("sqlite", "postgresql"):
        raise ConfigError(f"--database {database!r}: give sqlite or postgresql.")
    if routers < 1 or routers > MAX_ROUTERS:
        raise ConfigError(f"--routers {routers}: give 1 to {MAX_ROUTERS}.")
    if routers > 1 and database != "postgresql":
        raise ConfigError(
            f"--routers {routers} needs --database postgresql: routers share one policy store."
        )
    return database == "postgresql"


def _start_shared(  # noqa: PLR0917 - the fleet's parts, each used once
    stack: contextlib.ExitStack,
    home: Path,
    port: int,
    regions: list[str],
    routers: int,
    env: dict[str, str],
    children: list[_Child],
    client: httpx.Client,
) -> _RouterUrls:
    """PostgreSQL, its schema, `routers` routers sharing router-1's fleet directory, and
    HAProxy in front of their public and fleet listeners; the URLs are HAProxy's."""
    url, passfile = _start_postgres(stack, home)
    env = env | {"PGPASSFILE": str(passfile)}
    _run_migrate(home, url, env)
    stack.callback(_stop_all, children)  # before PostgreSQL stops: they use it to the end
    public_port = port or free_port()
    fleet_port = port + 1 if port else free_port()
    fleet_url = f"https://127.0.0.1:{fleet_port}"
    owner = home / ROUTERS_DIR / f"{ROUTER_ID}-1"
    cert = owner / FLEET_DIR / PUBLIC_CERT
    direct: list[_RouterUrls] = []
    for number in range(1, routers + 1):
        name = f"{ROUTER_ID}-{number}"
        router_home = home / ROUTERS_DIR / name
        private_dir(router_home)
        config = _router_config(router_home, name, url, fleet_url, owner / FLEET_DIR)
        extra: tuple[str, ...] = ("--config", str(config))
        if number == 1:  # it bootstraps the admin key and the demo org
            extra += ("--demo-regions", ",".join(regions))
        # Its fleet port chosen here: it prints the fleet URL nodes are told, HAProxy's.
        own_fleet_port = free_port()
        child, urls = _start_router(
            router_home, port, regions, cert, env, name=name, ports=(0, own_fleet_port), extra=extra
        )
        children.append(child)
        _wait_router(client, urls.public, child, threading.Event())
        direct.append(_RouterUrls(urls.public, f"https://127.0.0.1:{own_fleet_port}"))
    ca_file = owner / FLEET_DIR / "ca.pem"
    public = _haproxy(home / HAPROXY_DIR / "public", direct, public_port, HealthCheck(ca_file))
    stack.callback(public.stop)
    fleet = _haproxy(home / HAPROXY_DIR / "fleet", direct, fleet_port, None)
    stack.callback(fleet.stop)
    _say(
        f"HAProxy on {public.url} (routers' public listeners) and {fleet_url} (their fleet "
        f"listeners), in front of {', '.join(f'{ROUTER_ID}-{n}' for n in range(1, routers + 1))}.\n"
    )
    return _RouterUrls(public.url, fleet_url, tuple(router.public for router in direct))


def _start_postgres(stack: contextlib.ExitStack, home: Path) -> tuple[str, Path]:
    """The cluster under $PALISADE_HOME/postgres, started; the routers' database URL (no
    password in it) and the 0600 passfile the password is read from (PGPASSFILE)."""
    cluster = PostgresCluster(home / POSTGRES_DIR)
    cluster.init()
    stack.callback(cluster.stop)
    cluster.start()
    with_password = urlsplit(cluster.create_database(DATABASE))
    password = unquote(with_password.password or "")
    passfile = home / POSTGRES_DIR / PASSFILE
    write_private(passfile, f"127.0.0.1:{cluster.port}:{DATABASE}:{DATABASE}:{password}\n")
    return f"postgresql://{DATABASE}@127.0.0.1:{cluster.port}/{DATABASE}", passfile


def _run_migrate(home: Path, url: str, env: dict[str, str]) -> None:
    result = subprocess.run(  # noqa: S603 - our own CLI, arguments built here
        _palisade("db", "migrate", "--database", url),
        capture_output=True,
        text=True,
        env=env | {"PALISADE_HOME": str(home)},
        timeout=_ENROLL_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise LocalFleetError(f"`palisade db migrate` failed: {result.stderr or result.stdout}")
    _say(result.stdout)


def _router_config(home: Path, name: str, url: str, fleet_url: str, fleet_dir: Path) -> Path:
    """`router.toml` in the router's home: its id, the shared store and fleet directory."""
    path = home / "router.toml"
    lines = [
        f"router_id = {json.dumps(name)}",
        f"database = {json.dumps(url)}",
        f"fleet_url = {json.dumps(fleet_url)}",
        f"fleet_dir = {json.dumps(str(fleet_dir))}",
    ]
    write_private(path, "\n".join(lines) + "\n")
    return path


def _haproxy(
    directory: Path, routers: list[_RouterUrls], port: int, health: HealthCheck | None
) -> Haproxy:
    """HAProxy on `port` before the routers' public listeners (`health` set) or fleet ones."""
    backends = [
        Backend(
            f"{ROUTER_ID}-{number}",
            "127.0.0.1",
            _port_of(urls.public if health is not None else urls.fleet),
        )
        for number, urls in enumerate(routers, start=1)
    ]
    proxy = Haproxy(directory, backends, port=port, health=health)
    proxy.start()
    return proxy


def public_certificate(home: Path) -> tuple[Path, Path]:
    """The fleet CA (made here on the first run, as the router would) and `fleet/public.pem`,
    the router's HTTPS certificate for 127.0.0.1 and localhost (for its `node.key`), issued
    again when missing, from another CA or key, or with less than a third of its life left."""
    ca = FleetCA.load_or_create(home)
    identity = NodeIdentity.load_or_create(home)
    path = home / FLEET_DIR / PUBLIC_CERT
    if not _still_good(path, ca, identity):
        cert = ca.issue_router(identity, ROUTER_ID, PUBLIC_HOSTS)
        write_private(path, cert.public_bytes(serialization.Encoding.PEM))
    return home / FLEET_DIR / "ca.pem", path


def _still_good(path: Path, ca: FleetCA, identity: NodeIdentity) -> bool:
    try:
        cert = load_pem_certificate(path.read_bytes())
        cert.verify_directly_issued_by(ca.certificate)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    listed = set(san.get_values_for_type(x509.DNSName))
    listed |= {str(address) for address in san.get_values_for_type(x509.IPAddress)}
    begins, ends = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return (
        raw_public_key(cert) == identity.public_key
        and ends - time.time() > (ends - begins) / 3
        and set(PUBLIC_HOSTS) <= listed
    )


def _secret_file(home: Path, name: str) -> str:
    try:
        return (home / name).read_text().strip()
    except OSError as exc:
        raise LocalFleetError(
            f"cannot read {home / name} ({exc.strerror}); the router writes it on its first "
            "start. If it was deleted, move policy.db aside to start over."
        ) from exc


def _wait_router(client: httpx.Client, url: str, router: _Child, stopping: threading.Event) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not stopping.is_set() and time.monotonic() < deadline:
        if router.process.poll() is not None:
            raise LocalFleetError(_died(router))
        try:
            if client.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        stopping.wait(0.1)


def _palisade(*args: str) -> list[str]:
    return [sys.executable, "-m", "palisade", *args]


def _start_router(
    home: Path,
    port: int,
    regions: list[str],
    cert: Path,
    env: dict[str, str],
    *,
    name: str = ROUTER_ID,
    ports: tuple[int, int] | None = None,
    extra: tuple[str, ...] | None = None,
) -> tuple[_Child, _RouterUrls]:
    # The fleet listener on the next port (8301 beside 8300), or a free one beside a free one.
    ports = ports or (port, port + 1 if port else 0)
    if extra is None:
        extra = (
            "--demo-regions", ",".join(regions),
            "--discovery",  # zeroconf on 127.0.0.1 only: `fleet node list` shows nodes seen
        )  # fmt: skip
    process, urls, found = _spawn_router(home, ports, cert, env, extra)
    child = _Child(name, process, None)
    found.wait(_START_TIMEOUT_S)
    if len(urls) < 2:
        _stop_all([child])
        raise LocalFleetError(f"{name} did not start; its output is above.")
    # Started again on the ports it got, so the appliances find it at the same URLs.
    # (A fleet port given is the one bound: the URL printed may be another's, HAProxy's.)
    bound = (_port_of(urls[0]), ports[1] or _port_of(urls[1]))
    child.respawn = lambda: _spawn_router(home, bound, cert, env, extra)[0]
    return child, _RouterUrls(public=urls[0], fleet=urls[1])


def _port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _spawn_router(
    home: Path,
    ports: tuple[int, int],
    cert: Path,
    env: dict[str, str],
    extra: tuple[str, ...],
) -> tuple[subprocess.Popen[str], list[str], threading.Event]:
    """The router process, its output relayed here; `urls` gets its public URL, then its
    fleet URL, then `found` is set. Its key is the fleet's (its own unless `extra` names
    another router's fleet directory in a config)."""
    key = cert.parent.parent / "node.key"
    command = _palisade(
        "router", "serve", "--port", str(ports[0]), "--fleet-port", str(ports[1]),
        "--tls-cert", str(cert), "--tls-key", str(key), *extra,
    )  # fmt: skip
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
            elif len(urls) == 1 and (match := _FLEET_LISTENING.search(line)):
                urls.append(match["url"])
                found.set()
        found.set()

    threading.Thread(target=relay, daemon=True).start()
    return process, urls, found


def _node_home(home: Path, node: str) -> Path:
    node_home = home / FLEET_DIR / node
    private_dir(node_home)
    models = node_home / "models"
    if not models.exists():
        models.symlink_to(home / "models", target_is_directory=True)
    return node_home


def _enroll(
    client: httpx.Client,
    home: Path,
    node: str,
    region: str,
    *,
    urls: _RouterUrls,
    admin_key: str,
    env: dict[str, str],
    ca: FleetCA,
) -> None:
    """Enroll `node` as an operator would: a one-time token bound to it (admin API), then
    `palisade node init` and `palisade node enroll` in its state directory. Their output
    goes to its `appliance.log`. A node already enrolled with this fleet CA, whose
    certificate is still valid, is left as it is (it renews its certificate itself)."""
    node_home = _node_home(home, node)
    credentials = NodeCredentials.load(node_home)
    if _enrolled_with(credentials, ca):
        _say(f"{node}: already enrolled in {region} (fleet {ca.fleet_id}), not enrolled again.\n")
        return
    if credentials.state is not None and credentials.state.fleet_id not in (None, ca.fleet_id):
        raise LocalFleetError(
            f"{node_home} is enrolled in fleet {credentials.state.fleet_id}, but this router's "
            f"CA is fleet {ca.fleet_id}'s (its home was started over): move {node_home} aside "
            "to enroll the node afresh."
        )
    try:
        reply = client.post(
            f"{urls.public}/admin/v1/fleet/tokens",
            json={"region": region, "node_id": node, "ttl_s": _TOKEN_TTL_S, "uses": 1},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
    except httpx.HTTPError as exc:
        raise LocalFleetError(f"cannot ask the router for {node}'s token: {exc}") from None
    if reply.status_code != 201:
        raise LocalFleetError(f"the router refused an enrollment token for {node}: {reply.text}")
    token: str = reply.json()["token"]
    log = node_home / "appliance.log"
    private_file(log)
    steps = [
        ("node", "init", "--region", region, "--node-id", node),
        ("node", "enroll", "--router", urls.fleet, "--token", token),
    ]
    for step in steps:
        _run_step(node, step, node_home, log, env)
    _say(f"{node}: enrolled in {region} with a one-time token (fleet {ca.fleet_id}).\n")


def _enrolled_with(credentials: NodeCredentials, ca: FleetCA) -> bool:
    state = credentials.state
    if state is None or not credentials.enrolled or state.ca_fingerprint != ca.fingerprint:
        return False
    try:
        not_after = credentials.certificate().not_valid_after_utc.timestamp()
    except PalisadeError:
        return False
    return not_after > time.time()


def _run_step(
    node: str, step: tuple[str, ...], node_home: Path, log: Path, env: dict[str, str]
) -> None:
    """One `palisade …` command for `node`, its output appended to `log`."""
    with log.open("a") as output:
        output.write(f"--- fleet up: palisade {' '.join(step[:2])} ---\n")
        output.flush()
        try:
            result = subprocess.run(  # noqa: S603 - our own CLI, arguments built here
                _palisade(*step),
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                env=env | {"PALISADE_HOME": str(node_home)},
                timeout=_ENROLL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LocalFleetError(
                f"`palisade {' '.join(step[:2])}` for {node} did not finish in "
                f"{_ENROLL_TIMEOUT_S} s (log: {log})"
            ) from None
    if result.returncode != 0:
        tail = "\n  ".join(["", *log.read_text(errors="replace").splitlines()[-10:]])
        raise LocalFleetError(
            f"`palisade {' '.join(step[:2])}` for {node} exited with code "
            f"{result.returncode} (log: {log}){tail}"
        )


def _start_appliance(
    home: Path, node: str, region: str, fleet_url: str, env: dict[str, str]
) -> _Child:
    node_home = _node_home(home, node)
    log = node_home / "appliance.log"
    private_file(log)  # like the state beside it: owner only
    # Node id and region are its certificate's; given here too, they are checked against it.
    command = _palisade(
        "appliance", "serve", "--port", "0", "--region", region, "--node-id", node,
        "--router", fleet_url, "--discovery",
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

    # Appends: the enrollment's output stays at the top of the log.
    return _Child(node, spawn("a"), log, respawn=lambda: spawn("a"))


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
    client: httpx.Client,
    routers: tuple[str, ...],
    admin_key: str,
    children: list[_Child],
    stopping: threading.Event,
) -> None:
    """Until every router in `routers` (public URLs) sees every appliance up and ready:
    behind HAProxy the printed curl may land on any of them."""
    expected = {child.name for child in children if child.log is not None}
    sys.stdout.write(f"Waiting for {len(expected)} appliances to load and join…\n")
    sys.stdout.flush()
    deadline = time.monotonic() + _START_TIMEOUT_S
    headers = {"Authorization": f"Bearer {admin_key}"}
    while not stopping.is_set():
        if dead := next((c for c in children if c.process.poll() is not None), None):
            raise LocalFleetError(_died(dead))
        missing: set[str] = set()
        for url in routers:
            missing |= expected - _ready_nodes(client, url, headers)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise LocalFleetError(
                f"appliances {sorted(missing)} did not join within "
                f"{_START_TIMEOUT_S:.0f} s; see their logs under fleet/."
            )
        stopping.wait(0.25)


def _ready_nodes(client: httpx.Client, url: str, headers: dict[str, str]) -> set[str]:
    """The nodes the router at `url` sees up and ready (none while it cannot say)."""
    try:
        nodes = client.get(f"{url}/federation/v1/fleet", headers=headers, timeout=5).json()
        return {n["node_id"] for n in nodes["nodes"] if n["state"] == "up" and n["ready"]}
    except (httpx.HTTPError, ValueError, KeyError):
        return set()


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


def _announce(
    url: str,
    key: str,
    model: str,
    regions: list[str],
    nodes: list[str],
    *,
    ca_path: Path,
    then: _MonitoringUrls | None,
) -> None:
    # A bounded answer: the first try should come back in a second, not run to the context.
    body = (
        f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}], '
        '"max_tokens": 64}'
    )
    ca = shlex.quote(str(ca_path))
    sys.stdout.write(
        f"\nPalisade fleet ready: router {url}, appliances {', '.join(nodes)} "
        f"(regions {', '.join(regions)}; enrolled, mTLS between router and appliances).\n"
        f"  export PALISADE_URL={url} PALISADE_API_KEY={key}\n"
        f"  curl -s --cacert {ca} {url}/v1/chat/completions "
        f"-H 'Content-Type: application/json' -H \"Authorization: Bearer {key}\" -d '{body}'\n"
        f"  palisade fleet status --url {url}      # as the system admin (admin.key)\n"
        f"  palisade fleet node list --url {url}   # enrolled nodes and their certificates\n"
        f"The router's certificate is from the fleet CA {ca_path} (not a public CA): clients "
        "trust that file (curl --cacert, SSL_CERT_FILE, httpx verify=).\n"
        f"{'' if then is None else _monitoring_lines(then)}"
        "Stop with Ctrl-C.\n"
    )
    sys.stdout.flush()


def _scrape_key(client: httpx.Client, home: Path, url: str, admin_key: str) -> Path:
    """The key file Prometheus sends: a monitor key (it may read the scrape targets and node
    metrics, nothing else), issued on the first run and kept while the router accepts it (a
    key that cannot read the targets, such as an earlier run's canary key, is replaced)."""
    path = home / MONITORING_DIR / SCRAPE_KEY
    if path.is_file():
        headers = {"Authorization": f"Bearer {path.read_text().strip()}"}
        try:
            if client.get(url + SD_PATH, headers=headers).status_code == 200:
                return path
        except httpx.HTTPError as exc:
            raise LocalFleetError(
                f"cannot ask the router for Prometheus's targets: {exc}"
            ) from None
    try:
        reply = client.post(
            url + MONITOR_KEYS_PATH, headers={"Authorization": f"Bearer {admin_key}"}
        )
    except httpx.HTTPError as exc:
        raise LocalFleetError(f"cannot ask the router for a scrape key: {exc}") from None
    if reply.status_code != 201:
        raise LocalFleetError(f"the router refused a scrape key: {reply.text}")
    write_private(path, reply.json()["key"] + "\n")
    return path


def _start_monitoring(
    home: Path, port: int, router_url: str, ca_path: Path, scrape_key: Path
) -> tuple[list[_Child], _MonitoringUrls]:
    """Alertmanager, then Prometheus, on 127.0.0.1; each started again if it dies."""
    directory = home / MONITORING_DIR
    prometheus = f"127.0.0.1:{PROMETHEUS_PORT if port else free_port()}"
    alertmanager = f"127.0.0.1:{ALERTMANAGER_PORT if port else free_port()}"
    urls = _MonitoringUrls(
        f"http://{prometheus}", f"http://{alertmanager}", f"http://127.0.0.1:{DEFAULT_ALERTS_PORT}/"
    )
    setup = Monitoring(
        router_url=router_url,
        ca_file=ca_path,
        credentials_file=scrape_key,
        webhook_url=urls.webhook,
        alertmanager_address=alertmanager,
        scrape_interval_s=_SCRAPE_S,
        evaluation_interval_s=_SCRAPE_S,
    )
    write_configs(directory, setup)
    children = []
    for name, start, address in (
        (ALERTMANAGER, start_alertmanager, alertmanager),
        (PROMETHEUS, start_prometheus, prometheus),
    ):
        log = directory / f"{name}.log"

        def spawn(
            start: Callable[..., subprocess.Popen[str]] = start,
            address: str = address,
            log: Path = log,
        ) -> subprocess.Popen[str]:
            return start(directory, address, log)

        children.append(_Child(name, spawn(), log, respawn=spawn))
    return children, urls


def _wait_monitoring(
    client: httpx.Client,
    started: list[_Child],
    urls: _MonitoringUrls,
    stopping: threading.Event,
) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    waiting = {urls.alertmanager, urls.prometheus}
    while not stopping.is_set():
        if dead := next((c for c in started if c.process.poll() is not None), None):
            raise LocalFleetError(_died(dead))
        waiting -= {url for url in waiting if _ready(client, url)}
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise LocalFleetError(f"{sorted(waiting)} not ready within {_START_TIMEOUT_S:.0f} s")
        stopping.wait(0.1)


def _ready(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _monitoring_lines(urls: _MonitoringUrls) -> str:
    return (
        f"Prometheus {urls.prometheus} (the router and its nodes, every {_SCRAPE_S:g} s; "
        f"alert rules {RULES})\n"
        f"Alertmanager {urls.alertmanager}, posting alerts to {urls.webhook}:\n"
        f"  palisade alerts tail --port {_port_of(urls.webhook)}   # prints them as they arrive\n"
    )


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
