"""Bringing a node into a fleet: `palisade node init`, `enroll` and `status`.

`init` gives the node its identity (node.key, made once) and node.toml (state "pending").
`enroll` trusts nothing it has not checked:

1. The token names the fleet URL, the router and the CA fingerprint to pin (or the
   operator pins one with --ca-fingerprint; if both are given they must agree).
2. The CA is downloaded without verification (there is nothing to verify it with yet)
   and kept only if its fingerprint is the pinned one.
3. Enrollment goes over TLS verified against that CA, with the router's fleet DNS name
   (`<router_id>.router.palisade.internal`, from the token) as the TLS server name, so
   only the router the token names, certified by the pinned CA, can answer.
4. The answer is checked before anything is written: the certificate is signed by the
   pinned CA, is for this node's key, node id, region and device class; the CRL is signed
   by the CA; the router key in the answer signed the token and is the key of the TLS
   certificate that answered.

Files are written only when every check passed; node.toml (state "enrolled") last, so an
interrupted enrollment leaves a pending node.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation import (
    EnrollRequest,
    EnrollResponse,
    NodeCredentials,
    NodeIdentity,
    NodeState,
    PalisadeError,
    TokenClaims,
    client_context,
    fingerprint,
    host_problem,
    identity_of,
    load_pem_certificate,
    make_csr,
    private_dir,
    raw_public_key,
    read_token,
    replace_private,
    router_dns_name,
    token_signed_by,
)

TIMEOUT_S = 30.0
MAX_ANSWER_BYTES = 1 << 20


class BringupError(PalisadeError):
    """`palisade node …` refused; `code` is stable (`ca_fingerprint_mismatch`, or the
    router's error code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class InitResult:
    state: NodeState
    changed: bool


def init_node(
    home: Path,
    *,
    region: str,
    node_id: str | None = None,
    device_class: str | None = None,
    hosts: list[str] | None = None,
) -> InitResult:
    """Make node.key (if missing) and node.toml; a second identical run changes nothing, a
    conflicting one (other node id, region, device class or hosts) is refused."""
    for host in hosts or []:
        if (problem := host_problem(host)) is not None:
            raise BringupError(f"--host: {problem}.", code="invalid_value")
    private_dir(home)
    identity = NodeIdentity.load_or_create(home)
    existing = NodeState.load(home)
    fields = {
        "node_id": node_id or (existing.node_id if existing else default_node_id(identity)),
        "region": region,
        "device_class": device_class,
        "hosts": hosts or [],
    }
    try:
        wanted = msgspec.convert(fields, NodeState)
    except msgspec.ValidationError as exc:
        raise BringupError(
            f"{exc}. Node ids and regions are lowercase letters, digits, `.`, `_` and `-`; "
            "device classes are cpu, gpu or rdu.",
            code="invalid_value",
        ) from None
    if existing is None:
        wanted.save(home)
        return InitResult(wanted, changed=True)
    if _same_identity(existing, wanted):
        return InitResult(existing, changed=False)
    raise BringupError(
        f"This node is already initialised as `{existing.node_id}` in region "
        f"`{existing.region}` ({existing.state}); refusing to change it to "
        f"{_describe(wanted)}. "
        + (
            "An enrolled node keeps the identity in its certificate: revoke it on the router "
            "and initialise a fresh home to change it."
            if existing.state == "enrolled"
            else f"Delete {home / 'node.toml'} to start over."
        ),
        code="node_already_initialised",
    )


def default_node_id(identity: NodeIdentity) -> str:
    return f"node-{identity.public_key.hex()[:8]}"


def _same_identity(existing: NodeState, wanted: NodeState) -> bool:
    return (existing.node_id, existing.region, existing.device_class, existing.hosts) == (
        wanted.node_id,
        wanted.region,
        wanted.device_class,
        wanted.hosts,
    )


def _describe(state: NodeState) -> str:
    text = f"`{state.node_id}` in `{state.region}`"
    if state.device_class:
        text += f" ({state.device_class})"
    if state.hosts:
        text += f" for {', '.join(state.hosts)}"
    return text


def enroll_node(
    home: Path, *, token: str, router_url: str | None = None, ca_fingerprint: str | None = None
) -> NodeState:
    """Enroll the initialised node at `home` (see the module docstring); returns node.toml."""
    credentials = NodeCredentials.load(home)
    state = credentials.state
    if state is None:
        raise BringupError(
            f"No node.toml under {home}: run `palisade node init --region <region>` first.",
            code="node_not_initialised",
        )
    claims = _claims(token)
    if state.state == "enrolled" and state.fleet_id != claims.fleet_id:
        raise BringupError(
            f"This node is enrolled in fleet {state.fleet_id}; the token is for fleet "
            f"{claims.fleet_id}. A node belongs to one fleet: initialise a fresh home to move it.",
            code="node_already_enrolled",
        )
    url = (router_url or claims.fleet_url).rstrip("/")
    pin = _pin(claims, ca_fingerprint)
    ca_pem = fetch_pinned_ca(url, pin)
    attempt = _Attempt(
        url=url,
        token=token,
        claims=claims,
        identity=NodeIdentity.load_or_create(home),
        state=state,
        ca_pem=ca_pem,
    )
    answer, router_cert = _enroll(attempt)
    _check_answer(attempt, answer, router_cert)
    enrolled = msgspec.structs.replace(
        state,
        state="enrolled",
        fleet_id=answer.fleet_id,
        fleet_url=url,
        ca_fingerprint=pin,
        router_id=answer.router_id,
        router_public_key=answer.router_public_key,
    )
    replace_private(credentials.ca_path, ca_pem)
    replace_private(credentials.cert_path, answer.certificate.encode("ascii"))
    replace_private(credentials.crl_path, answer.crl.encode("ascii"))
    enrolled.save(home)
    return enrolled


def _claims(token: str) -> TokenClaims:
    try:
        return read_token(token)
    except PalisadeError as exc:
        raise BringupError(str(exc), code="invalid_enrollment_token") from None


def _pin(claims: TokenClaims, ca_fingerprint: str | None) -> str:
    if ca_fingerprint is None:
        return claims.ca_fingerprint
    pinned = ca_fingerprint.strip().lower()
    if not pinned.startswith("sha256:"):
        pinned = "sha256:" + pinned.replace(":", "")
    if pinned != claims.ca_fingerprint:
        raise BringupError(
            f"The token is for the fleet whose CA is {claims.ca_fingerprint}, but "
            f"--ca-fingerprint pins {pinned}. Check both with the fleet operator.",
            code="ca_fingerprint_mismatch",
        )
    return pinned


def fetch_pinned_ca(url: str, pin: str) -> bytes:
    """The router's CA certificate (PEM), if its fingerprint is `pin`."""
    # No verification possible yet: the fingerprint check below is what makes it trusted.
    answer = _request("GET", f"{url}/federation/v1/ca", verify=False)
    try:
        ca = load_pem_certificate(answer.body)
    except ValueError:
        raise BringupError(
            f"{url}/federation/v1/ca did not answer with a PEM certificate: is it a Palisade "
            "router's fleet URL?",
            code="ca_fingerprint_mismatch",
        ) from None
    got = fingerprint(ca)
    if got != pin:
        raise BringupError(
            f"The CA at {url} has fingerprint {got}, not the pinned {pin}: this is not the "
            "fleet your token is for (or someone is in the way). Nothing was changed.",
            code="ca_fingerprint_mismatch",
        )
    return answer.body


@dataclass(frozen=True)
class _Attempt:
    """One enrollment: where, with which token, for which node, against which CA."""

    url: str
    token: str
    claims: TokenClaims
    identity: NodeIdentity
    state: NodeState
    ca_pem: bytes


def _enroll(attempt: _Attempt) -> tuple[EnrollResponse, x509.Certificate]:
    state, url = attempt.state, attempt.url
    request = EnrollRequest(
        token=attempt.token,
        csr=make_csr(attempt.identity, state.node_id, state.hosts).decode("ascii"),
        node_id=state.node_id,
        region=state.region,
        device_class=state.device_class,
    )
    reply = _request(
        "POST",
        f"{url}/federation/v1/enroll",
        verify=client_context(None, ca_pem=attempt.ca_pem),
        content=msgspec.json.encode(request),
        headers={"content-type": "application/json"},
        extensions={"sni_hostname": router_dns_name(attempt.claims.router_id)},
    )
    try:
        answer = msgspec.json.decode(reply.body, type=EnrollResponse)
    except msgspec.DecodeError:
        raise BringupError(
            f"{url} answered the enrollment with something that is not an enrollment answer.",
            code="invalid_enrollment_response",
        ) from None
    return answer, _peer_certificate(reply.peer)


def _check_answer(attempt: _Attempt, answer: EnrollResponse, router_cert: x509.Certificate) -> None:
    state = attempt.state
    ca = load_pem_certificate(attempt.ca_pem)
    try:
        cert = load_pem_certificate(answer.certificate.encode("ascii"))
        cert.verify_directly_issued_by(ca)
        holder = identity_of(cert)
        crl = x509.load_pem_x509_crl(answer.crl.encode("ascii"))
        router_key = bytes.fromhex(answer.router_public_key)
    except (ValueError, TypeError, InvalidSignature) as exc:
        reason = str(exc) or "a signature does not verify"
        raise _bad_answer(f"the certificate or CRL does not check out ({reason})") from None
    ca_key = ca.public_key()
    if not isinstance(ca_key, Ed25519PublicKey) or not crl.is_signature_valid(ca_key):
        raise _bad_answer("the CRL is not signed by the pinned CA")
    if raw_public_key(cert) != attempt.identity.public_key:
        raise _bad_answer("the certificate is for another key than this node's")
    wanted = (state.node_id, "node", state.region, state.device_class, attempt.claims.fleet_id)
    got = (holder.node_id, holder.role, holder.region, holder.device_class, holder.fleet_id)
    if got != wanted:
        raise _bad_answer(f"the certificate names {got}, this node asked for {wanted}")
    signed = token_signed_by(router_key, attempt.token)
    if not signed or raw_public_key(router_cert) != router_key:
        raise _bad_answer("the router key in the answer is not the key that issued the token")


def _bad_answer(reason: str) -> BringupError:
    return BringupError(
        f"The router's enrollment answer was refused: {reason}. Nothing was written; the node "
        "is still pending.",
        code="invalid_enrollment_response",
    )


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    peer: bytes  # the DER certificate the server presented (empty over plain HTTP)


def _request(method: str, url: str, *, verify: ssl.SSLContext | bool, **options: Any) -> _Answer:
    """One request; transport failures and error answers become a BringupError."""
    try:
        with httpx.Client(timeout=TIMEOUT_S, verify=verify) as client:
            response = client.send(client.build_request(method, url, **options), stream=True)
            try:
                answer = _Answer(
                    status=response.status_code,
                    peer=_peer_der(response),  # while the connection is open
                    body=_capped_body(response, url),
                )
            finally:
                response.close()
    except httpx.HTTPError as exc:
        raise BringupError(
            f"cannot reach {url}: {exc}. Is the router's fleet URL right?", code="unreachable"
        ) from None
    if answer.status >= 400:
        error = _error_body(answer.body)
        message = error.get("message") or answer.body.decode("utf-8", "replace").strip()[:200]
        raise BringupError(
            f"the router refused: {message}", code=str(error.get("code") or f"http_{answer.status}")
        )
    return answer


def _capped_body(response: httpx.Response, url: str) -> bytes:
    """The body, refused past MAX_ANSWER_BYTES: a hostile server cannot fill the memory."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise BringupError(
                f"{url} answered with more than {MAX_ANSWER_BYTES} bytes; a fleet router's "
                "answers are a few kilobytes.",
                code="invalid_enrollment_response",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _peer_der(response: httpx.Response) -> bytes:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    # A raw _ssl socket: its getpeercert takes the binary_form flag positionally.
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    return bytes(der or b"")


def _peer_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise _bad_answer("the router presented no certificate") from None


def _error_body(body: bytes) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error body, or {}."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return {}
    error = decoded.get("error") if isinstance(decoded, dict) else None
    return error if isinstance(error, dict) else {}


def node_status(home: Path, now: float | None = None) -> dict[str, Any]:
    """What `palisade node status` shows: node.toml, and the certificate when enrolled."""
    credentials = NodeCredentials.load(home)
    state = credentials.state
    if state is None:
        return {"home": str(home), "state": "uninitialised"}
    status: dict[str, Any] = {"home": str(home), **msgspec.structs.asdict(state)}
    if not credentials.enrolled:
        return status
    holder = credentials.identity()
    left = holder.not_after - (time.time() if now is None else now)
    status["certificate"] = {
        "serial": f"{holder.serial:x}",
        "fingerprint": holder.fingerprint,
        "not_after": holder.not_after,
        "days_left": round(left / 86400, 1),
        "revoked": holder.serial in _revoked_serials(credentials.crl_path),
    }
    return status


def _revoked_serials(crl_path: Path) -> set[int]:
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError):
        return set()
    return {entry.serial_number for entry in crl}
