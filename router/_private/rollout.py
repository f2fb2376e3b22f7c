"""Fleet rollouts of appliance images (`fleet/rollouts.db`): which node is offered which
bundle, batch by batch, and what image each node last reported running.

The router never reads a bundle: it stores the bytes an operator uploaded (checked against
the SHA-256 the operator gave) and each node verifies what it downloads against its own
pinned release keys. A rollout takes the region's enrolled, unrevoked nodes at its start,
in node id order, in batches of `batch` nodes. Only the nodes of the first batch with a
node not yet done are offered the bundle; a node is done when it reports the target version
committed (`committed`), when it already ran that version committed at the start
(`current`), or when it was revoked meanwhile (`revoked`). A node reporting `rolled_back`
or `failed` stops the rollout (`stopped`, the reason names the node): nothing more is
offered, and nodes not yet offered never are. An operator may stop it too.

Everything here is a policy on an injected clock over a small SQLite file (one JSON row
per rollout, one per node image); the routes are `rollout_routes.py`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec
from msgspec import Struct

from federation import (
    ENCODER,
    APIError,
    FleetNode,
    FleetStatus,
    ImageReport,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    UpdateOffer,
    private_database,
)
from router._private.ca import FLEET_DIR
from router._private.sqlite_files import connection, write_transaction

ROLLOUTS_FILE = "rollouts.db"
UPDATES_DIR = "updates"
RolloutState = Literal["running", "completed", "stopped"]
# Where one node is with one rollout: waiting for its batch, offered, what it reported
# (the `ImageState`s), or done without an install.
NodeStep = Literal[
    "pending",
    "offered",
    "installing",
    "installed",
    "trial",
    "committed",
    "rolled_back",
    "failed",
    "current",
    "revoked",
]
DONE: frozenset[str] = frozenset({"committed", "current", "revoked"})
FAILED: frozenset[str] = frozenset({"rolled_back", "failed"})
Clock = Callable[[], float]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS node_images (node_id TEXT PRIMARY KEY, body BLOB NOT NULL);
"""


class RolloutConflictError(APIError):
    """409: the rollout cannot change that way (one already runs, or it has ended)."""

    status_code = 409
    error_type = "conflict_error"
    default_code = "rollout_in_progress"


class RolloutNode(Struct, kw_only=True):
    """One node of a rollout: its batch and how far it got."""

    node_id: str
    batch: int
    step: NodeStep = "pending"
    detail: str = ""
    offered_at: float | None = None
    updated_at: float | None = None


class Rollout(Struct, kw_only=True):
    """`GET /admin/v1/fleet/updates/{id}`: one bundle going out to one region."""

    id: str
    region: str
    version: str
    sha256: str
    size: int
    batch: int
    state: RolloutState
    created_by: str
    created_at: float
    updated_at: float
    nodes: list[RolloutNode]
    reason: str = ""
    done: int = 0
    total: int = 0

    def node(self, node_id: str) -> RolloutNode | None:
        return next((node for node in self.nodes if node.node_id == node_id), None)

    def current_batch(self) -> int | None:
        """The first batch with a node not yet done; None once every node is."""
        return min((node.batch for node in self.nodes if node.step not in DONE), default=None)

    def offered(self, node_id: str) -> bool:
        node = self.node(node_id)
        return node is not None and node.step not in {"pending", "current", "revoked"}

    def offer(self, node_id: str, now: float) -> bool:
        """Whether `node_id` should install this bundle now (marking it offered)."""
        node = self.node(node_id)
        if self.state != "running" or node is None or node.step in DONE:
            return False
        if node.batch != self.current_batch():
            return False
        if node.step == "pending":
            node.step, node.offered_at, node.updated_at = "offered", now, now
        return True

    def record(self, node_id: str, step: NodeStep, detail: str, now: float) -> None:
        """What `node_id` reported; a failure stops the rollout, the last commit ends it."""
        node = self.node(node_id)
        if node is None or (node.step == step and node.detail == detail):
            return
        if node.step in DONE and step not in FAILED:
            return  # a late or repeated report does not undo a commit
        node.step, node.detail, node.updated_at = step, detail, now
        self.updated_at = now
        if self.state != "running":
            return
        if step in FAILED:
            said = f": {detail}" if detail else ""
            self.stop(f"node {node_id} reported {step}{said}", now)
        elif self.current_batch() is None:
            self.state = "completed"

    def stop(self, reason: str, now: float) -> None:
        if self.state == "running":
            self.state, self.reason, self.updated_at = "stopped", reason, now

    def counted(self) -> Rollout:
        self.done = sum(1 for node in self.nodes if node.step in DONE)
        self.total = len(self.nodes)
        return self

    def as_offer(self) -> UpdateOffer:
        return UpdateOffer(
            rollout=self.id, version=self.version, sha256=self.sha256, size=self.size
        )


class NodeImage(Struct, kw_only=True):
    """The image a node last reported running (`PUT /federation/v1/image`)."""

    node_id: str
    region: str
    version: str
    slot: str
    digest: str
    committed: bool
    reported_at: float


class RolloutList(Struct, kw_only=True):
    """`GET /admin/v1/fleet/updates`: newest first."""

    data: list[Rollout]


_ROLLOUT = msgspec.json.Decoder(Rollout)
_IMAGE = msgspec.json.Decoder(NodeImage)


class RolloutBook:
    """Rollouts and node images, persisted; every change is one `BEGIN IMMEDIATE`."""

    def __init__(
        self, home: Path, clock: Clock = time.time, *, fleet_dir: Path | None = None
    ) -> None:
        directory = fleet_dir or home / FLEET_DIR
        self.path = private_database(directory / ROLLOUTS_FILE)
        self.updates = directory / UPDATES_DIR
        self._clock = clock
        with connection(self.path) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        private_database(self.path)

    # --- the operator's side ------------------------------------------------------------

    @staticmethod
    def new_id() -> str:
        return f"upd-{os.urandom(6).hex()}"

    def bundle_path(self, rollout_id: str) -> Path:
        return self.updates / f"{rollout_id}.pimg"

    def check_can_start(self, region: str, nodes: list[str]) -> None:
        """Refuse a rollout to a region without nodes, or with one already running."""
        if not nodes:
            raise InvalidRequestError(
                f"No enrolled node serves region `{region}`; `palisade fleet node list` lists "
                "the fleet's nodes.",
                code="region_has_no_nodes",
                param="region",
            )
        with connection(self.path) as db:
            _refuse_running(db, region)

    def create(
        self,
        rollout_id: str,
        *,
        region: str,
        version: str,
        sha256: str,
        size: int,
        batch: int,
        nodes: list[str],
        created_by: str,
    ) -> Rollout:
        """Start a rollout of the stored bundle `rollout_id` to `nodes` (of `region`)."""
        self.check_can_start(region, nodes)
        now = self._clock()
        with write_transaction(self.path) as db:
            _refuse_running(db, region)
            images = _images(db)
            members = [
                RolloutNode(node_id=node_id, batch=index // batch, updated_at=now)
                for index, node_id in enumerate(sorted(nodes))
            ]
            for member in members:
                image = images.get(member.node_id)
                if image is not None and image.version == version and image.committed:
                    member.step = "current"
            rollout = Rollout(
                id=rollout_id,
                region=region,
                version=version,
                sha256=sha256,
                size=size,
                batch=batch,
                state="running",
                created_by=created_by,
                created_at=now,
                updated_at=now,
                nodes=members,
            )
            if rollout.current_batch() is None:
                rollout.state = "completed"
            _save(db, rollout)
        return rollout.counted()

    def get(self, rollout_id: str) -> Rollout:
        with connection(self.path) as db:
            return _load(db, rollout_id).counted()

    def list(self) -> list[Rollout]:
        with connection(self.path) as db:
            rows = db.execute("SELECT body FROM rollouts ORDER BY created_at DESC").fetchall()
        return [_ROLLOUT.decode(row[0]).counted() for row in rows]

    def stop(self, rollout_id: str, reason: str) -> Rollout:
        """Stop a running rollout; stopping one that has ended is refused."""
        with write_transaction(self.path) as db:
            rollout = _load(db, rollout_id)
            if rollout.state != "running":
                raise RolloutConflictError(
                    f"Rollout `{rollout_id}` has already {_ended(rollout)}.",
                    code="rollout_not_running",
                )
            rollout.stop(reason, self._clock())
            _save(db, rollout)
        return rollout.counted()

    # --- the nodes' side ----------------------------------------------------------------

    def next_for(self, node_id: str, region: str) -> UpdateOffer | None:
        """The bundle `node_id` should install now, if any."""
        with connection(self.path) as db:  # the usual answer, without taking the write lock
            if _running(db, region) is None:
                return None
        with write_transaction(self.path) as db:
            rollout = _running(db, region)
            if rollout is None or not rollout.offer(node_id, self._clock()):
                return None
            _save(db, rollout)
        return rollout.as_offer()

    def bundle_for(self, node_id: str, rollout_id: str) -> Path:
        """The stored bundle of `rollout_id`, for a node it was offered to while it runs."""
        with connection(self.path) as db:
            rollout = _find(db, rollout_id)
        if rollout is None or not rollout.offered(node_id):
            raise _not_offered(rollout_id)
        if rollout.state != "running":
            raise RolloutConflictError(
                f"Rollout `{rollout_id}` has {_ended(rollout)}; its bundle is no longer served.",
                code="rollout_not_running",
            )
        return self.bundle_path(rollout_id)

    def report(self, node_id: str, region: str, report: ImageReport) -> Rollout | None:
        """Record what `node_id` runs; returns the rollout this report ended (stopped by a
        failure, or completed by the last commit), if it ended one."""
        now = self._clock()
        image = NodeImage(
            node_id=node_id,
            region=region,
            version=report.version,
            slot=report.slot,
            digest=report.digest,
            committed=report.committed,
            reported_at=now,
        )
        ended = None
        with write_transaction(self.path) as db:
            rollout = _moved_by(db, node_id, region, report)
            if rollout is not None:
                step, detail = _step_of(rollout, node_id, report)
                was = rollout.state
                rollout.record(node_id, step, detail, now)
                _save(db, rollout)
                ended = rollout.counted() if rollout.state != was else None
            db.execute(
                "INSERT OR REPLACE INTO node_images VALUES (?, ?)",
                (node_id, ENCODER.encode(image)),
            )
        return ended

    def revoked(self, node_id: str) -> None:
        """A revoked node no longer holds up a running rollout (it gets nothing more)."""
        now = self._clock()
        with write_transaction(self.path) as db:
            rows = db.execute("SELECT body FROM rollouts WHERE state = 'running'").fetchall()
            for row in rows:
                rollout = _ROLLOUT.decode(row[0])
                node = rollout.node(node_id)
                if node is not None and node.step not in DONE:
                    rollout.record(node_id, "revoked", "revoked during the rollout", now)
                    _save(db, rollout)

    def images(self) -> dict[str, NodeImage]:
        with connection(self.path) as db:
            return _images(db)


def with_images(status: FleetStatus, images: dict[str, NodeImage]) -> FleetStatus:
    """The fleet view with each node's reported image (`palisade fleet status`)."""
    rows = [_with_image(row, images.get(row.node_id)) for row in status.nodes]
    return msgspec.structs.replace(status, nodes=rows)


def _with_image(row: FleetNode, image: NodeImage | None) -> FleetNode:
    if image is None:
        return row
    return msgspec.structs.replace(
        row, image_version=image.version, image_committed=image.committed, image_slot=image.slot
    )


def _moved_by(
    db: sqlite3.Connection, node_id: str, region: str, report: ImageReport
) -> Rollout | None:
    """The rollout a report speaks about: the one its outcome names (which must have been
    offered to this node), else the region's running one if the node runs its version
    (offered, or already installed some other way)."""
    if report.outcome is not None:
        rollout = _find(db, report.outcome.rollout)
        if rollout is None or not rollout.offered(node_id):
            raise _not_offered(report.outcome.rollout, param="outcome.rollout")
        return rollout
    rollout = _running(db, region)
    if rollout is None or rollout.version != report.version or rollout.node(node_id) is None:
        return None
    if not (rollout.offered(node_id) or report.committed):
        return None
    return rollout


def _step_of(rollout: Rollout, node_id: str, report: ImageReport) -> tuple[NodeStep, str]:
    if report.outcome is None:
        if not rollout.offered(node_id):
            return "current", "runs the version already"
        return ("committed" if report.committed else "trial"), ""
    step: NodeStep = report.outcome.state
    if step == "committed" and not (report.committed and report.version == rollout.version):
        raise InvalidRequestError(
            f"The report says rollout `{rollout.id}` is committed, but the node runs "
            f"{report.version} ({'committed' if report.committed else 'not committed'}), not "
            f"{rollout.version} committed.",
            code="image_report_inconsistent",
            param="outcome.state",
        )
    return step, report.outcome.detail


def _running(db: sqlite3.Connection, region: str) -> Rollout | None:
    row = db.execute(
        "SELECT body FROM rollouts WHERE region = ? AND state = 'running'", (region,)
    ).fetchone()
    return None if row is None else _ROLLOUT.decode(row[0])


def _refuse_running(db: sqlite3.Connection, region: str) -> None:
    running = _running(db, region)
    if running is not None:
        raise RolloutConflictError(
            f"Rollout `{running.id}` of {running.version} is still running in `{region}`; wait "
            f"for it or stop it (`palisade fleet updates stop {running.id}`).",
            param="region",
        )


def _find(db: sqlite3.Connection, rollout_id: str) -> Rollout | None:
    row = db.execute("SELECT body FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
    return None if row is None else _ROLLOUT.decode(row[0])


def _load(db: sqlite3.Connection, rollout_id: str) -> Rollout:
    rollout = _find(db, rollout_id)
    if rollout is None:
        raise NotFoundError(
            f"No rollout `{rollout_id}` on this router; `GET /admin/v1/fleet/updates` lists them.",
            code="rollout_not_found",
            param="rollout",
        )
    return rollout


def _save(db: sqlite3.Connection, rollout: Rollout) -> None:
    db.execute(
        "INSERT OR REPLACE INTO rollouts VALUES (?, ?, ?, ?, ?)",
        (rollout.id, rollout.region, rollout.state, rollout.created_at, ENCODER.encode(rollout)),
    )


def _images(db: sqlite3.Connection) -> dict[str, NodeImage]:
    rows = db.execute("SELECT body FROM node_images").fetchall()
    images = [_IMAGE.decode(row[0]) for row in rows]
    return {image.node_id: image for image in images}


def _ended(rollout: Rollout) -> str:
    if rollout.state == "completed":
        return "completed"
    return f"been stopped ({rollout.reason})"


def _not_offered(rollout_id: str, param: str | None = None) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"This node was not offered rollout `{rollout_id}`; it may fetch and report only the "
        "update `GET /federation/v1/updates/next` offers it.",
        code="update_not_offered",
        param=param,
    )
