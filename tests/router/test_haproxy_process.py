"""Haproxy for real, in front of two small HTTPS servers (tests/router/https_echo.py) that
serve the fleet CA's certificate, as routers do: TLS passes through, connections spread,
a killed server costs no request, a server that is not ready is taken out."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from router._private.haproxy import Backend, Haproxy, HaproxyError, HealthCheck, haproxy_command
from router._private.local_fleet import public_certificate
from tests.support import REPO, wait_for


@dataclass(frozen=True)
class Certificate:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@dataclass(frozen=True)
class Echo:
    process: subprocess.Popen[str]
    backend: Backend


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """The fleet CA and a certificate for 127.0.0.1 from it (the router's own, `fleet up`'s)."""
    home = tmp_path_factory.mktemp("fleet-home")
    ca, cert = public_certificate(home)
    return Certificate(ca, cert, home / "node.key")


@contextmanager
def echo(name: str, certificate: Certificate, *flags: str) -> Iterator[Echo]:
    command = [
        sys.executable, "-m", "tests.router.https_echo", "--name", name,
        "--cert", str(certificate.cert), "--key", str(certificate.key), *flags,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("listening on https://127.0.0.1:"), line
        yield Echo(process, Backend(name, "127.0.0.1", int(line.rsplit(":", 1)[1])))
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@contextmanager
def running(proxy: Haproxy) -> Iterator[Haproxy]:
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def answer(proxy: Haproxy, certificate: Certificate, path: str = "/") -> str:
    """One request on a connection of its own, its certificate checked against the CA."""
    response = httpx.get(proxy.url + path, verify=certificate.client_context(), timeout=10)
    response.raise_for_status()
    return response.text


def test_connections_are_spread_over_both_routers(tmp_path: Path, certificate: Certificate) -> None:
    health = HealthCheck(certificate.ca)
    with echo("a", certificate) as a, echo("b", certificate) as b:
        proxy = Haproxy(tmp_path, [a.backend, b.backend], health=health)
        with running(proxy):
            answers = [answer(proxy, certificate) for _ in range(20)]

    assert set(answers) == {"a", "b"}
    assert min(answers.count("a"), answers.count("b")) >= 5


def test_a_killed_router_costs_no_request(tmp_path: Path, certificate: Certificate) -> None:
    health = HealthCheck(certificate.ca)
    with echo("a", certificate) as a, echo("b", certificate) as b:
        proxy = Haproxy(tmp_path, [a.backend, b.backend], health=health)
        with running(proxy):
            assert {answer(proxy, certificate) for _ in range(6)} == {"a", "b"}
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(timeout=10)

            # At once, before any health check noticed: refused by a, retried on b.
            answers = [answer(proxy, certificate) for _ in range(20)]

    assert answers == ["b"] * 20


def test_a_router_that_is_not_ready_is_taken_out(tmp_path: Path, certificate: Certificate) -> None:
    health = HealthCheck(certificate.ca)
    with echo("a", certificate) as a, echo("b", certificate, "--not-ready") as b:
        proxy = Haproxy(tmp_path, [a.backend, b.backend], health=health)
        with running(proxy):
            wait_for(lambda: "routers/b is DOWN" in proxy.log_file.read_text(), timeout=10)
            answers = [answer(proxy, certificate) for _ in range(10)]
            log = proxy.log_file.read_text()

    assert answers == ["a"] * 10
    assert "routers/a is DOWN" not in log


def test_tcp_checks_when_no_health_path_is_given(tmp_path: Path, certificate: Certificate) -> None:
    with echo("a", certificate) as a, echo("b", certificate, "--not-ready") as b:
        proxy = Haproxy(tmp_path, [a.backend, b.backend])
        with running(proxy):
            answers = {answer(proxy, certificate) for _ in range(10)}

    assert answers == {"a", "b"}  # b accepts connections: a TCP check keeps it in
    assert "httpchk" not in proxy.config()


def test_the_config_is_valid_for_haproxy_and_private(
    tmp_path: Path, certificate: Certificate
) -> None:
    proxy = Haproxy(
        tmp_path / "lb",
        [Backend("r1", "127.0.0.1", 1), Backend("r2", "127.0.0.1", 2)],
        health=HealthCheck(certificate.ca),
    )
    with running(proxy):
        checked = subprocess.run(
            [haproxy_command(), "-c", "-f", str(proxy.config_file)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (proxy.config_file.stat().st_mode & 0o777) == 0o600
    assert (proxy.log_file.stat().st_mode & 0o777) == 0o600
    text = proxy.config()
    for line in (
        "mode tcp",
        "balance leastconn",
        "option redispatch 1",
        "retries 3",
        f"bind 127.0.0.1:{proxy.port}",
        "default-server inter 500ms fall 2 rise 1 on-marked-down shutdown-sessions",
    ):
        assert line in text


def test_stop_closes_the_port(tmp_path: Path, certificate: Certificate) -> None:
    with echo("a", certificate) as a:
        proxy = Haproxy(tmp_path, [a.backend])
        proxy.start()
        assert answer(proxy, certificate) == "a"
        proxy.stop()

    assert not proxy.running
    with pytest.raises(httpx.ConnectError):
        answer(proxy, certificate)


def test_a_bad_config_is_reported_with_haproxys_words(tmp_path: Path) -> None:
    missing_ca = HealthCheck(tmp_path / "no-such-ca.pem")
    proxy = Haproxy(tmp_path / "lb", [Backend("r1", "127.0.0.1", 1)], health=missing_ca)

    with pytest.raises(HaproxyError, match=r"no-such-ca\.pem"):
        proxy.start()
    assert not proxy.running


def test_a_backend_name_cannot_carry_config() -> None:
    with pytest.raises(HaproxyError, match="letters, digits"):
        Backend("r1 check\n  server evil 10.0.0.1:80", "127.0.0.1", 1)
