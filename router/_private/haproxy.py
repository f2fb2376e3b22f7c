"""HAProxy in front of several routers: its generated config and its process.

The routers serve HTTPS with the fleet CA's certificate, so HAProxy passes TCP through
(`mode tcp`): TLS ends at a router, and HAProxy never holds a key or sees a request. It
sends each new connection to the router with the fewest (`balance leastconn`), checks each
router every 500 ms (`GET /readyz` over TLS verified with the fleet CA, or a TCP connect),
takes one out after two failed checks and puts it back after one good one, and then cuts
the connections it still had (`on-marked-down shutdown-sessions`) so clients reconnect to
a live one. A connection refused by a router that just died is retried on another
(`retries 3`, `option redispatch 1`: every retry may go elsewhere), before any check saw it
fail.

Debian's `haproxy` runs in the foreground (`-db`) as our child, its log (one line per
connection) on its standard output, a file. As root it drops to Debian's `haproxy` user
once it has read its config and bound its port.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from federation import PalisadeError, private_dir, private_file, write_private
from router._private.monitoring import free_port

HOST = "127.0.0.1"
CONFIG_FILE = "haproxy.cfg"
LOG_FILE = "haproxy.log"
HAPROXY_USER = "haproxy"  # Debian's, made by the haproxy package
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Streams (server-sent events) stay open while a model writes: idle limits, not lifetimes.
IDLE_TIMEOUT = "10m"
_LOG_TAIL_LINES = 20
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class HaproxyError(PalisadeError):
    """HAProxy is missing or did not start."""


@dataclass(frozen=True)
class Backend:
    """One router's HTTPS listener."""

    name: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or not _NAME.match(self.host):
            raise HaproxyError(
                f"backend {self.name!r} at {self.host!r}: names and hosts are letters, digits, "
                "'.', '_' and '-'."
            )


@dataclass(frozen=True)
class HealthCheck:
    """`GET path` over TLS, the certificate checked against `ca_file`; 2xx/3xx is up."""

    ca_file: Path
    path: str = "/readyz"


class Haproxy:
    """HAProxy on 127.0.0.1:`port` (a free one if not given) in front of `backends`; its
    config and log in `directory`. `health=None` checks routers with a TCP connect."""

    def __init__(
        self,
        directory: Path,
        backends: Sequence[Backend],
        *,
        port: int | None = None,
        health: HealthCheck | None = None,
    ) -> None:
        if not backends:
            raise HaproxyError("HAProxy needs at least one router to send connections to.")
        self.directory = directory
        self.backends = tuple(backends)
        self.port = port or free_port(HOST)
        self.health = health
        self.config_file = directory / CONFIG_FILE
        self.log_file = directory / LOG_FILE
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    def config(self) -> str:
        """haproxy.cfg's text."""
        return "\n".join(
            [*_global_section(), *_defaults_section(), *self._frontend(), *self._backend(), ""]
        )

    def start(self) -> None:
        """Write the config, start HAProxy, and wait until its port accepts connections."""
        if self.running:
            return
        private_dir(self.directory)
        write_private(self.config_file, self.config())
        args = [haproxy_command(), "-db", "-f", str(self.config_file)]
        private_file(self.log_file)
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 - haproxy, arguments built here
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/"
            )
        try:
            self._wait_accepting(time.monotonic() + START_TIMEOUT_S)
        except HaproxyError:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (HAProxy closes every connection at once), SIGKILL if it lingers."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)

    def _wait_accepting(self, deadline: float) -> None:
        while not _accepts(HOST, self.port):
            if self._process is not None and (code := self._process.poll()) is not None:
                raise HaproxyError(
                    f"HAProxy exited ({code}) while starting; the end of {self.log_file}:\n"
                    + self._log_tail()
                )
            if time.monotonic() > deadline:
                raise HaproxyError(
                    f"HAProxy did not accept connections on {HOST}:{self.port} within "
                    f"{START_TIMEOUT_S:.0f} s; the end of {self.log_file}:\n" + self._log_tail()
                )
            time.sleep(0.02)

    def _frontend(self) -> list[str]:
        return [
            "frontend palisade",
            f"    bind {HOST}:{self.port}",
            "    default_backend routers",
            "",
        ]

    def _backend(self) -> list[str]:
        lines = ["backend routers", "    balance leastconn"]
        server_check = "check"
        if self.health is not None:
            path = _quoted(self.health.path)
            lines += [
                "    option httpchk",
                f"    http-check send meth GET uri {path} ver HTTP/1.1 hdr Host localhost",
                "    http-check expect status 200-399",
            ]
            ca_file = _quoted(str(self.health.ca_file))
            server_check = f"check check-ssl verify required ca-file {ca_file}"
        lines.append(
            "    default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions"
        )
        lines += [
            f"    server {backend.name} {backend.host}:{backend.port} {server_check}"
            for backend in self.backends
        ]
        return lines

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def _global_section() -> list[str]:
    lines = [
        "global",
        "    log stdout format raw local0",
        "    maxconn 4096",
    ]
    if os.geteuid() == 0 and _user_exists(HAPROXY_USER):
        lines += [f"    user {HAPROXY_USER}", f"    group {HAPROXY_USER}"]
    return [*lines, ""]


def _defaults_section() -> list[str]:
    return [
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    option redispatch 1",
        "    retries 3",
        "    timeout connect 2s",
        "    timeout check 2s",
        f"    timeout client {IDLE_TIMEOUT}",
        f"    timeout server {IDLE_TIMEOUT}",
        "",
    ]


def haproxy_command() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if found is None:
        raise HaproxyError(
            "HAProxy is not installed: run `make system-deps` (Debian's haproxy package)."
        )
    return found


def _quoted(value: str) -> str:
    """A word of HAProxy's config in single quotes: nothing inside is expanded ($VAR)."""
    if "'" in value or "\n" in value:
        raise HaproxyError(f"{value!r}: HAProxy's config cannot carry a quote or a newline here.")
    return f"'{value}'"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True
