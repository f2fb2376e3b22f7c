"""The router's registry of enrollment tokens and enrolled nodes (`fleet/registry.db`).

Enrollment is decided here: a token must verify with the router's key, be known to this
registry, not be expired or used up, and allow the node id, region and device class the
node asks for; the certificate request must verify; a node id already enrolled with
another key (and not revoked) is refused. Every refusal leaves the registry unchanged. A
token use is taken only when the certificate is issued, in one `BEGIN IMMEDIATE`
transaction, so two nodes racing for a one-use token cannot both get in.

Revocation marks the node and every certificate it was issued revoked, bumps the CRL
number and rewrites `fleet/crl.pem` (the fleet listener, the policy publisher and through
its snapshots every node pick it up from there).

Monitor certificates (`palisade fleet monitor issue`, for a scraper such as Prometheus) are
recorded here too, one row per certificate under the name it was issued for; revoking a
name puts every certificate issued for it on the same CRL.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from msgspec import Struct

from federation import (
    EnrollmentConflictError,
    EnrollRequest,
    EnrollResponse,
    NodeIdentity,
    NotFoundError,
    PeerIdentity,
    PermissionDeniedError,
    TokenClaims,
    enrollment_node_mismatch,
    enrollment_region_mismatch,
    enrollment_token_used,
    identity_of,
    invalid_enrollment_token,
    private_database,
    raw_public_key,
    replace_private,
    sign_token,
    verify_token,
)
from router._private.ca import CRL_FILE, FLEET_DIR, FleetCA, checked_csr
from router._private.sqlite_files import connection, write_transaction

REGISTRY_FILE = "registry.db"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    node_id TEXT,
    device_class TEXT,
    expires_at REAL NOT NULL,
    uses_left INTEGER NOT NULL,
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    device_class TEXT,
    public_key TEXT NOT NULL,
    serial TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after REAL NOT NULL,
    enrolled_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS monitors (
    serial TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_after REAL NOT NULL,
    issued_at REAL NOT NULL,
    issued_by TEXT NOT NULL,
    revoked_at REAL
);
"""
Clock = Callable[[], float]


class EnrolledNode(Struct, kw_only=True):
    """One row of `palisade fleet node list` (`GET /admin/v1/fleet/nodes`)."""

    node_id: str
    state: Literal["enrolled", "revoked"]
    region: str
    device_class: str | None
    serial: str
    fingerprint: str
    not_after: float
    enrolled_at: float
    revoked_at: float | None


class MonitorCertificate(Struct, kw_only=True):
    """One row of `palisade fleet monitor list` (`GET /admin/v1/fleet/monitors`)."""

    name: str
    state: Literal["valid", "revoked"]
    serial: str
    fingerprint: str
    not_after: float
    issued_at: float
    issued_by: str
    revoked_at: float | None


class IssuedMonitor(Struct, kw_only=True):
    """`POST /admin/v1/fleet/monitors`: the certificate (PEM), the fleet CA and its row."""

    certificate: str
    ca: str
    monitor: MonitorCertificate


class CreatedToken(Struct, kw_only=True):
    """`POST /admin/v1/fleet/tokens`: the token (shown once) and what it allows."""

    token: str
    id: str
    region: str
    node_id: str | None
    device_class: str | None
    expires_at: float
    uses: int
    ca_fingerprint: str
    fleet_url: str
    enroll_command: str


@dataclass(frozen=True)
class PendingEnrollment:
    """An enrollment that passed every check, its certificate issued but not yet handed
    out: the token's use is taken by `NodeRegistry.commit`."""

    token_id: str
    certificate: x509.Certificate
    public_key: str

    @property
    def node(self) -> PeerIdentity:
        return identity_of(self.certificate)


class NodeRegistry:
    """Tokens, enrolled nodes and their certificates; issues through the fleet CA."""

    def __init__(
        self,
        home: Path,
        ca: FleetCA,
        identity: NodeIdentity,
        router_id: str,
        clock: Clock = time.time,
        *,
        fleet_dir: Path | None = None,
    ) -> None:
        directory = fleet_dir or home / FLEET_DIR
        self.path = private_database(directory / REGISTRY_FILE)
        self.crl_path = directory / CRL_FILE
        self.ca = ca
        self.identity = identity
        self.router_id = router_id
        self._clock = clock
        with connection(self.path) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        private_database(self.path)  # WAL made its -wal and -shm files: keep them private

    # --- tokens ----------------------------------------------------------------------------

    def draft_token(
        self,
        *,
        region: str,
        fleet_url: str,
        ttl_s: float = 24 * 3600,
        uses: int = 1,
        node_id: str | None = None,
        device_class: str | None = None,
    ) -> TokenClaims:
        """A new token's claims, not yet valid: `add_token` records it (audit in between)."""
        return TokenClaims(
            id=secrets.token_hex(8),
            fleet_id=self.ca.fleet_id,
            router_id=self.router_id,
            region=region,
            node_id=node_id,
            device_class=device_class,
            expires_at=self._clock() + ttl_s,
            uses=uses,
            ca_fingerprint=self.ca.fingerprint,
            fleet_url=fleet_url,
        )

    def add_token(self, claims: TokenClaims, created_by: str) -> CreatedToken:
        """Record a drafted token (from now on it enrolls) and sign it."""
        with write_transaction(self.path) as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claims.id,
                    claims.region,
                    claims.node_id,
                    claims.device_class,
                    claims.expires_at,
                    claims.uses,
                    self._clock(),
                    created_by,
                ),
            )
        token = sign_token(self.identity, claims)
        return CreatedToken(
            token=token,
            id=claims.id,
            region=claims.region,
            node_id=claims.node_id,
            device_class=claims.device_class,
            expires_at=claims.expires_at,
            uses=claims.uses,
            ca_fingerprint=claims.ca_fingerprint,
            fleet_url=claims.fleet_url,
            enroll_command=f"palisade node enroll --router {claims.fleet_url} --token {token}",
        )

    def create_token(self, *, created_by: str, **fields: Any) -> CreatedToken:
        """`draft_token(**fields)` and `add_token` at once (no audit between)."""
        return self.add_token(self.draft_token(**fields), created_by)

    def uses_left(self, token_id: str) -> int | None:
        with connection(self.path) as db:
            row = db.execute("SELECT uses_left FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return None if row is None else int(row[0])

    # --- enrollment ------------------------------------------------------------------------

    def enroll(self, request: EnrollRequest) -> EnrollResponse:
        """`prepare` and `commit` at once (no audit between)."""
        return self.commit(self.prepare(request))

    def prepare(self, request: EnrollRequest) -> PendingEnrollment:
        """Every check, and the certificate: the refusal, with the registry unchanged, or an
        enrollment `commit` makes real (the router audits it in between)."""
        claims = self._allowed(request)
        csr = checked_csr(request.csr.encode("utf-8"))
        public_key = raw_public_key(csr).hex()
        with connection(self.path) as db:
            self._check_key(db, request.node_id, public_key)
        cert = self.ca.issue_node(
            request.csr.encode("utf-8"), request.node_id, request.region, request.device_class
        )
        return PendingEnrollment(token_id=claims.id, certificate=cert, public_key=public_key)

    def commit(self, pending: PendingEnrollment) -> EnrollResponse:
        """Take the token's use and record the node, in one transaction; refused (and
        nothing changed) if another enrollment took the last use or the node id meanwhile."""
        holder = identity_of(pending.certificate)
        with write_transaction(self.path) as db:
            row = db.execute(
                "SELECT uses_left FROM tokens WHERE id = ?", (pending.token_id,)
            ).fetchone()
            if row is None or row[0] < 1:
                raise enrollment_token_used()
            self._check_key(db, holder.node_id, pending.public_key)
            db.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?", (pending.token_id,)
            )
            self._record(db, pending.certificate, pending.public_key)
        return self._answer(pending.certificate)

    def _allowed(self, request: EnrollRequest) -> TokenClaims:
        claims = verify_token(self.identity.public_key, request.token, self._clock())
        if claims.fleet_id != self.ca.fleet_id or claims.router_id != self.router_id:
            raise invalid_enrollment_token("it was issued for another fleet")
        uses_left = self.uses_left(claims.id)
        if uses_left is None:
            raise invalid_enrollment_token("this router has no record of it")
        if uses_left == 0:
            raise enrollment_token_used()
        if claims.region != request.region:
            raise enrollment_region_mismatch(claims.region, request.region)
        if claims.node_id is not None and claims.node_id != request.node_id:
            raise enrollment_node_mismatch("node_id", claims.node_id, request.node_id)
        if claims.device_class is not None and claims.device_class != request.device_class:
            raise enrollment_node_mismatch(
                "device_class", claims.device_class, request.device_class
            )
        return claims

    @staticmethod
    def _check_key(db: sqlite3.Connection, node_id: str, public_key: str) -> None:
        row = db.execute(
            "SELECT public_key, revoked_at FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
        if row is not None and row[0] != public_key and row[1] is None:
            raise EnrollmentConflictError(
                f"Node `{node_id}` is already enrolled with another key. Revoke it first "
                f"(`palisade fleet node revoke {node_id}`) or pick another node id.",
                param="node_id",
            )

    def _record(self, db: sqlite3.Connection, cert: x509.Certificate, public_key: str) -> None:
        """A (re-)enrolled node: its row replaced, its new certificate on record."""
        holder = identity_of(cert)
        now = self._clock()
        db.execute(
            "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                holder.node_id,
                holder.region,
                holder.device_class,
                public_key,
                str(holder.serial),
                holder.fingerprint,
                holder.not_after,
                now,
            ),
        )
        self._record_certificate(db, cert)

    def _record_certificate(self, db: sqlite3.Connection, cert: x509.Certificate) -> None:
        holder = identity_of(cert)
        db.execute(
            "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, NULL)",
            (
                str(holder.serial),
                holder.node_id,
                holder.fingerprint,
                holder.not_after,
                self._clock(),
            ),
        )

    def _answer(self, cert: x509.Certificate) -> EnrollResponse:
        holder = identity_of(cert)
        return EnrollResponse(
            certificate=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            ca=self.ca.pem.decode("ascii"),
            crl=self.current_crl().decode("ascii"),
            fleet_id=self.ca.fleet_id,
            router_id=self.router_id,
            router_public_key=self.identity.public_key.hex(),
            node_id=holder.node_id,
            region=holder.region or "",
            device_class=holder.device_class,
            serial=holder.serial,
            not_after=holder.not_after,
        )

    def renew(self, peer: PeerIdentity, csr_pem: str) -> EnrollResponse:
        """A fresh certificate for an enrolled node, for the same key, with the identity its
        current certificate names. The old certificate stays valid until it expires."""
        csr = checked_csr(csr_pem.encode("utf-8"))
        public_key = raw_public_key(csr).hex()
        with connection(self.path) as db:
            node = db.execute(
                "SELECT public_key, revoked_at FROM nodes WHERE node_id = ?", (peer.node_id,)
            ).fetchone()
            cert_row = db.execute(
                "SELECT revoked_at FROM certificates WHERE serial = ?", (str(peer.serial),)
            ).fetchone()
        if peer.role != "node" or node is None or cert_row is None:
            raise PermissionDeniedError(
                f"`{peer.node_id}` is not an enrolled node of this fleet; enroll it with a token.",
                code="node_identity_mismatch",
            )
        if node[1] is not None or cert_row[0] is not None:
            raise _revoked(peer.node_id)
        if node[0] != public_key:
            raise EnrollmentConflictError(
                f"The certificate request is for another key than node `{peer.node_id}`'s. A "
                "node renews for its own key; a new key needs a new enrollment.",
                param="csr",
            )
        cert = self.ca.issue_node(
            csr_pem.encode("utf-8"), peer.node_id, peer.region or "", peer.device_class
        )
        holder = identity_of(cert)
        with write_transaction(self.path) as db:
            row = db.execute("SELECT revoked_at FROM nodes WHERE node_id = ?", (peer.node_id,))
            if row.fetchone()[0] is not None:  # revoked while this certificate was made
                raise _revoked(peer.node_id)
            db.execute(
                "UPDATE nodes SET serial = ?, fingerprint = ?, not_after = ? WHERE node_id = ?",
                (str(holder.serial), holder.fingerprint, holder.not_after, peer.node_id),
            )
            self._record_certificate(db, cert)
        return self._answer(cert)

    # --- nodes and revocation --------------------------------------------------------------

    def nodes(self) -> list[EnrolledNode]:
        with connection(self.path) as db:
            rows = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node_id").fetchall()  # noqa: S608
        return [_enrolled_node(row) for row in rows]

    def node(self, node_id: str) -> EnrolledNode:
        """The enrolled node `node_id`; 404 `node_not_found` if there is none."""
        with connection(self.path) as db:
            row = db.execute(
                f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = ?",  # noqa: S608
                (node_id,),
            ).fetchone()
        if row is None:
            raise _unknown(node_id)
        return _enrolled_node(row)

    def revoked_serials(self) -> set[int]:
        with connection(self.path) as db:
            rows = db.execute(_REVOKED).fetchall()
        return {int(row[0]) for row in rows}

    def revoke(self, node_id: str) -> list[int]:
        """Revoke the node and every certificate it holds; returns their serials. Revoking
        a revoked node again changes nothing."""
        now = self._clock()
        with write_transaction(self.path) as db:
            row = db.execute(
                "SELECT revoked_at FROM nodes WHERE node_id = ?", (node_id,)
            ).fetchone()
            if row is None:
                raise _unknown(node_id)
            serials = [
                int(each[0])
                for each in db.execute(
                    "SELECT serial FROM certificates WHERE node_id = ?", (node_id,)
                ).fetchall()
            ]
            if row[0] is not None:
                return serials
            db.execute("UPDATE nodes SET revoked_at = ? WHERE node_id = ?", (now, node_id))
            db.execute(
                "UPDATE certificates SET revoked_at = ? WHERE node_id = ? AND revoked_at IS NULL",
                (now, node_id),
            )
            self._publish_crl(db)
        return serials

    def current_crl(self) -> bytes:
        """`fleet/crl.pem`, made (empty) if there is none yet."""
        try:
            return self.crl_path.read_bytes()
        except FileNotFoundError:
            with write_transaction(self.path) as db:
                return self._publish_crl(db)

    def _publish_crl(self, db: sqlite3.Connection) -> bytes:
        number = _bump(db, "crl_number")
        revoked = db.execute(_REVOKED).fetchall()
        pem = self.ca.crl([(int(serial), when) for serial, when in revoked], number)
        # Readers (TLS contexts, the policy publisher) must never see half a file.
        replace_private(self.crl_path, pem)
        return pem

    # --- monitor certificates --------------------------------------------------------------

    def draft_monitor(self, csr_pem: str, name: str, days: int) -> x509.Certificate:
        """A monitor certificate for the key in `csr_pem`, not yet on record: `add_monitor`
        records it (the router audits in between). The request's host names are ignored: a
        monitor certificate names none."""
        csr = checked_csr(csr_pem.encode("utf-8"))
        return self.ca.issue_monitor(_ed25519_key(csr), name, days)

    def add_monitor(self, cert: x509.Certificate, issued_by: str) -> IssuedMonitor:
        holder = identity_of(cert)
        with write_transaction(self.path) as db:
            db.execute(
                "INSERT INTO monitors VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    str(holder.serial),
                    holder.node_id,
                    holder.fingerprint,
                    holder.not_after,
                    self._clock(),
                    issued_by,
                ),
            )
        row = next(m for m in self.monitors(holder.node_id) if m.serial == str(holder.serial))
        return IssuedMonitor(
            certificate=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            ca=self.ca.pem.decode("ascii"),
            monitor=row,
        )

    def monitors(self, name: str | None = None) -> list[MonitorCertificate]:
        """Every monitor certificate issued, by name then issue time; or those issued for
        `name`, 404 `monitor_not_found` if there are none."""
        query = f"SELECT {_MONITOR_COLUMNS} FROM monitors"  # noqa: S608
        with connection(self.path) as db:
            if name is None:
                rows = db.execute(query + " ORDER BY name, issued_at").fetchall()
            else:
                rows = db.execute(query + " WHERE name = ? ORDER BY issued_at", (name,)).fetchall()
                if not rows:
                    raise _unknown_monitor(name)
        return [_monitor(row) for row in rows]

    def revoke_monitor(self, name: str) -> list[int]:
        """Revoke every certificate issued for the monitor `name` and publish the CRL;
        returns their serials. 404 `monitor_not_found` if none was; again, nothing changes."""
        now = self._clock()
        with write_transaction(self.path) as db:
            rows = db.execute(
                "SELECT serial, revoked_at FROM monitors WHERE name = ?", (name,)
            ).fetchall()
            if not rows:
                raise _unknown_monitor(name)
            if any(row[1] is None for row in rows):
                db.execute(
                    "UPDATE monitors SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                    (now, name),
                )
                self._publish_crl(db)
        return [int(row[0]) for row in rows]


_REVOKED = (
    "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
    "UNION ALL SELECT serial, revoked_at FROM monitors WHERE revoked_at IS NOT NULL"
)
_MONITOR_COLUMNS = "name, serial, fingerprint, not_after, issued_at, issued_by, revoked_at"


def _monitor(row: tuple[Any, ...]) -> MonitorCertificate:
    return MonitorCertificate(
        name=row[0],
        state="valid" if row[6] is None else "revoked",
        serial=row[1],
        fingerprint=row[2],
        not_after=row[3],
        issued_at=row[4],
        issued_by=row[5],
        revoked_at=row[6],
    )


def _ed25519_key(csr: x509.CertificateSigningRequest) -> Ed25519PublicKey:
    key = csr.public_key()
    if not isinstance(key, Ed25519PublicKey):  # checked_csr refused any other
        raise TypeError("fleet keys are Ed25519")
    return key


def _unknown_monitor(name: str) -> NotFoundError:
    return NotFoundError(
        f"No monitor certificate was issued for `{name}`; `palisade fleet monitor list` "
        "lists them.",
        code="monitor_not_found",
        param="name",
    )


def _bump(db: sqlite3.Connection, name: str) -> int:
    db.execute(
        "INSERT INTO counters VALUES (?, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
        (name,),
    )
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0])


_NODE_COLUMNS = (
    "node_id, region, device_class, serial, fingerprint, not_after, enrolled_at, revoked_at"
)


def _enrolled_node(row: tuple[Any, ...]) -> EnrolledNode:
    return EnrolledNode(
        node_id=row[0],
        state="enrolled" if row[7] is None else "revoked",
        region=row[1],
        device_class=row[2],
        serial=row[3],
        fingerprint=row[4],
        not_after=row[5],
        enrolled_at=row[6],
        revoked_at=row[7],
    )


def _unknown(node_id: str) -> NotFoundError:
    return NotFoundError(
        f"No node `{node_id}` is enrolled in this fleet; `palisade fleet node list` lists them.",
        code="node_not_found",
        param="node_id",
    )


def _revoked(node_id: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"Node `{node_id}` has been revoked; enroll it again with a new token.",
        code="node_revoked",
    )
