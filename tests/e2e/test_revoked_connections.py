"""A revoked node loses the connection it kept open to the router's fleet listener.

The handshake checks the CRL once; a compromised node that keeps its connection busy (a
request every 100 ms, so the keep-alive timeout never ends it) would keep it forever. The
router cuts it while answering the revoke: every request started after the revoke's answer
fails, and a new handshake with the certificate is refused. (The same at a node's listener
for a monitor certificate: tests/e2e/test_prometheus_direct.py.)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from federation import NodeCredentials, client_context
from tests.e2e.fleet import running_fleet
from tests.support import wait_for

# How soon after the revoke's answer the router has cut the connection (it cuts before
# answering; this leaves the client's own scheduling some room).
CUT_S = 1.0


@dataclass(frozen=True)
class Attempt:
    started: float
    port: int | None  # the client's local port when it succeeded; None: it failed


class BusyNode:
    """A node's certificate on one kept-alive httpx connection, a request every 100 ms."""

    def __init__(self, url: str, home: Path) -> None:
        credentials = NodeCredentials.load(home)
        self._client = httpx.Client(
            verify=client_context(credentials.ca_path, credentials.cert_path, credentials.key_path),
            timeout=5,
        )
        self._url = url
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BusyNode:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self._client.get(self._url)
                response.raise_for_status()
                stream = response.extensions["network_stream"]
                port: int | None = stream.get_extra_info("client_addr")[1]
            except httpx.HTTPError:
                port = None
            self.attempts.append(Attempt(started, port))
            self._stop.wait(0.1)


def _handshake_refused(url: str, home: Path) -> bool:
    credentials = NodeCredentials.load(home)
    context = client_context(credentials.ca_path, credentials.cert_path, credentials.key_path)
    try:
        httpx.get(url, verify=context, timeout=5)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def test_a_revoked_node_loses_its_kept_alive_connection_to_the_fleet_listener(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        home = fleet.enroll("eu-1", "eu")
        url = f"{fleet.fleet_url}/federation/v1/ca"
        with BusyNode(url, home) as node:
            wait_for(lambda: len(node.attempts) >= 5, timeout=10)
            before = [attempt.port for attempt in node.attempts]
            assert None not in before, before
            assert len(set(before)) == 1, before  # one kept-alive connection

            fleet.admin.ok("POST", "/admin/v1/fleet/nodes/eu-1/revoke")
            answered = time.monotonic()
            wait_for(
                lambda: any(a.started > answered + CUT_S for a in node.attempts),
                timeout=10,
            )
        after = [attempt for attempt in node.attempts if attempt.started > answered]
        assert after
        assert all(attempt.port is None for attempt in after), after
        assert _handshake_refused(url, home)
