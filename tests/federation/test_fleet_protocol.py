"""The fleet protocol's building blocks: mTLS listeners and the peer identity they hand to
routes (real sockets on 127.0.0.1), the router's principal assertions and the lab join
secret (injected clock)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from federation import (
    JOIN_SECRET_ENV,
    AssertionSigner,
    AssertionVerifier,
    AuthenticationError,
    ConfigError,
    Listener,
    NodeIdentity,
    Principal,
    ServerConfig,
    bind_socket,
    client_context,
    join_secret,
    make_csr,
    make_server,
    node_dns_name,
    peer_identity,
    server_context,
    sign_fleet_message,
    verify_fleet_message,
    write_private,
)
from router._private.ca import FleetCA
from tests.support import wait_for

SECRET = b"fleet-secret-0123456789"
BODY = b'{"node_id":"n1"}'
ALICE = Principal(
    org="acme",
    user="usr_1",
    key_id="k1",
    regions=frozenset({"eu-west"}),
    role="org_user",
    logging_mode="metadata",
)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- listeners: TLS per listener, the ASGI TLS extension, peer_identity ------------------


class Holder:
    """A fleet member's files: key, certificate (from `ca`), the CA and an empty CRL."""

    def __init__(self, root: Path, ca: FleetCA, node_id: str, region: str) -> None:
        self.identity = NodeIdentity.load_or_create(root / node_id)
        csr = make_csr(self.identity, node_id, ["127.0.0.1"])
        cert = ca.issue_node(csr, node_id, region, None)
        self.cert = root / node_id / "node.pem"
        self.key = root / node_id / "node.key"
        self.ca = root / node_id / "ca.pem"
        self.crl = root / node_id / "crl.pem"
        write_private(self.cert, cert.public_bytes(serialization.Encoding.PEM).decode())
        write_private(self.ca, ca.pem.decode())
        write_private(self.crl, ca.crl([], number=1).decode())


async def _echo_identity(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering with what the listener told it about the connection."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    tls = scope.get("extensions", {}).get("tls")
    peer = peer_identity(scope)
    text = "plain" if tls is None else f"tls {tls['tls_version']:#x} {peer}"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text.encode()})


@contextmanager
def serving(listeners: list[Listener]) -> Iterator[None]:
    server = make_server(_echo_identity, ServerConfig(), listeners)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=10)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _url(sock: socket.socket, scheme: str) -> str:
    return f"{scheme}://127.0.0.1:{sock.getsockname()[1]}/"


def test_one_app_serves_a_plain_and_an_mtls_listener_with_the_peer_identity(
    tmp_path: Path,
) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")
    server = Holder(tmp_path, ca, "node-srv", "eu-west")
    client = Holder(tmp_path, ca, "node-cli", "us-east")
    plain, tls = bind_socket("127.0.0.1", 0), bind_socket("127.0.0.1", 0)
    context = server_context(server.cert, server.key, server.ca, server.crl, client_certs=True)
    with serving([Listener(plain), Listener(tls, context)]):
        assert httpx.get(_url(plain, "http")).text == "plain"
        anonymous = httpx.get(_url(tls, "https"), verify=client_context(server.ca))
        assert anonymous.text == "tls 0x304 None"
        verified = client_context(client.ca, client.cert, client.key)
        with httpx.Client(verify=verified) as session:
            for _ in range(3):  # kept alive: the same connection's identity on each request
                text = session.get(_url(tls, "https")).text
                assert "node_id='node-cli'" in text
                assert "region='us-east'" in text
                assert "role='node'" in text


def test_a_certificate_from_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")
    stranger_ca = FleetCA.load_or_create(tmp_path / "other-router")
    server = Holder(tmp_path, ca, "node-srv", "eu-west")
    stranger = Holder(tmp_path / "elsewhere", stranger_ca, "node-cli", "eu-west")
    tls = bind_socket("127.0.0.1", 0)
    context = server_context(server.cert, server.key, server.ca, server.crl, client_certs=True)
    with serving([Listener(tls, context)]):
        # The stranger trusts our CA (so it would accept our server) but presents its own.
        forged = client_context(server.ca, stranger.cert, stranger.key)
        with pytest.raises(httpx.TransportError):
            httpx.get(_url(tls, "https"), verify=forged)
        # A client that does not trust the fleet CA refuses our server.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(_url(tls, "https"), verify=client_context(stranger.ca))


def test_a_client_checking_the_node_name_refuses_another_nodes_certificate(
    tmp_path: Path,
) -> None:
    ca = FleetCA.load_or_create(tmp_path / "router")
    server = Holder(tmp_path, ca, "node-srv", "eu-west")
    tls = bind_socket("127.0.0.1", 0)
    context = server_context(server.cert, server.key, server.ca, server.crl, client_certs=True)
    port = tls.getsockname()[1]

    def handshake(name: str) -> None:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_context(server.ca).wrap_socket(raw, server_hostname=name),
        ):
            pass

    with serving([Listener(tls, context)]):
        handshake(node_dns_name("node-srv"))
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            handshake(node_dns_name("node-other"))


# --- the lab join secret ---------------------------------------------------------------------


def test_a_signed_fleet_message_verifies_and_any_change_is_refused() -> None:
    clock = Clock()
    header = sign_fleet_message(SECRET, BODY, now=clock.now)
    verify_fleet_message(SECRET, BODY, header, clock=clock)
    cases = {
        "wrong secret": (b"another-secret-01234567", BODY, header),
        "edited body": (SECRET, BODY + b" ", header),
        "no header": (SECRET, BODY, None),
        "malformed": (SECRET, BODY, "v1=abc"),
    }
    for name, (secret, body, value) in cases.items():
        with pytest.raises(AuthenticationError) as caught:
            verify_fleet_message(secret, body, value, clock=clock)
        assert caught.value.code == "invalid_join_signature", name
    assert SECRET.decode() not in header


def test_an_old_fleet_message_cannot_be_replayed() -> None:
    clock = Clock()
    header = sign_fleet_message(SECRET, BODY, now=clock.now)
    clock.now += 31
    with pytest.raises(AuthenticationError, match="check both machines' clocks"):
        verify_fleet_message(SECRET, BODY, header, clock=clock)


def test_the_lab_secret_is_off_unless_set_and_must_be_long_enough(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert JOIN_SECRET_ENV == "PALISADE_LAB_JOIN_SECRET"  # noqa: S105 - a variable's name
    monkeypatch.delenv(JOIN_SECRET_ENV, raising=False)
    monkeypatch.setenv("PALISADE_JOIN_SECRET", SECRET.decode())  # the old name: ignored
    assert join_secret(required=False) is None
    with pytest.raises(ConfigError, match="PALISADE_LAB_JOIN_SECRET is not set"):
        join_secret(required=True)
    monkeypatch.setenv(JOIN_SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16"):
        join_secret(required=True)
    monkeypatch.setenv(JOIN_SECRET_ENV, SECRET.decode())
    assert join_secret(required=True) == SECRET


@pytest.fixture
def router_identity(tmp_path: Path) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path / "router")


def test_an_assertion_carries_the_principal_to_the_node_it_names(
    router_identity: NodeIdentity,
) -> None:
    clock = Clock()
    signer = AssertionSigner(router_identity, "r1", clock=clock)
    verifier = AssertionVerifier(router_identity.public_key, "node-a", clock=clock)
    principal = verifier.principal(signer.assertion(ALICE, "node-a"))
    assert principal.org == "acme"
    assert principal.key_id == "k1"
    assert principal.regions == frozenset({"eu-west"})
    assert principal.logging_mode == "metadata"
    assert principal.via == "r1"


def test_assertions_for_another_node_with_another_key_expired_or_edited_are_refused(
    router_identity: NodeIdentity, tmp_path: Path
) -> None:
    clock = Clock()
    signer = AssertionSigner(router_identity, "r1", ttl_s=30, clock=clock)
    token = signer.assertion(ALICE, "node-a")
    impostor = NodeIdentity.load_or_create(tmp_path / "impostor")
    forged = AssertionSigner(impostor, "r1", clock=clock).assertion(ALICE, "node-a")
    payload, _, signature = token.partition(".")
    cases = {
        "another node": (
            AssertionVerifier(router_identity.public_key, "node-b", clock=clock),
            token,
        ),
        "another key": (
            AssertionVerifier(router_identity.public_key, "node-a", clock=clock),
            forged,
        ),
        "edited claims": (
            AssertionVerifier(router_identity.public_key, "node-a", clock=clock),
            payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature,
        ),
        "garbage": (AssertionVerifier(router_identity.public_key, "node-a", clock=clock), "x.y.z"),
    }
    for name, (verifier, value) in cases.items():
        with pytest.raises(AuthenticationError) as caught:
            verifier.principal(value)
        assert caught.value.code == "invalid_assertion", name
    late = AssertionVerifier(router_identity.public_key, "node-a", clock=clock)
    clock.now += 36  # 30 s lifetime + 5 s skew allowance
    with pytest.raises(AuthenticationError, match="expired"):
        late.principal(token)


def test_signer_and_verifier_reuse_work_within_the_lifetime(
    router_identity: NodeIdentity,
) -> None:
    clock = Clock()
    signer = AssertionSigner(router_identity, "r1", ttl_s=30, clock=clock)
    verifier = AssertionVerifier(router_identity.public_key, "node-a", clock=clock)
    first = signer.assertion(ALICE, "node-a")
    clock.now += 10
    assert signer.assertion(ALICE, "node-a") == first  # reused for half its lifetime
    assert signer.assertion(ALICE, "node-b") != first
    assert verifier.principal(first) is verifier.principal(first)  # cached once verified
    clock.now += 6
    fresh = signer.assertion(ALICE, "node-a")
    assert fresh != first
    assert verifier.principal(fresh).org == "acme"
    clock.now += 30  # the first has expired; even the cache refuses it now
    with pytest.raises(AuthenticationError, match="expired"):
        verifier.principal(first)
