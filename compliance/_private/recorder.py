"""What one node writes into its audit log, per each org's logging mode.

Modes, strictest last: `full` (metadata, plus request and response content sealed in the
vault for the retention period), `metadata` (counts, timings, status; no content), `zero`
(no per-request rows at all). A node-wide floor can only make an org's mode stricter.
Management events are audited in every mode.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from compliance._private.log import AuditLog, read_entries
from compliance._private.vault import ContentVault, load_or_create_content_key
from federation import AuditEvent, NodeIdentity, effective_mode

Mode = Literal["full", "metadata", "zero"]


class Recorder:
    """The node's audit log, its content vault, and the tenancy store's audit sink."""

    def __init__(
        self, home: Path, *, origin: str, floor: Mode = "full", retention_days: int = 30
    ) -> None:
        self.home = home
        self.origin = origin
        self.floor = floor
        self.identity = NodeIdentity.load_or_create(home)
        # What auditors pin with `palisade audit verify --trusted-key @node.pub`.
        (home / "node.pub").write_text(self.identity.public_key.hex() + "\n")
        self.log = AuditLog(home / "audit.db", self.identity, origin=origin)
        self.vault = ContentVault(
            home / "content.db",
            load_or_create_content_key(home),
            retention=timedelta(days=retention_days),
        )

    @property
    def db(self) -> Path:
        return self.log.path

    def close(self) -> None:
        self.log.close()
        self.vault.close()

    # --- the tenancy store's audit sink ---------------------------------------------------------

    async def record(
        self, event: str, actor: str, org: str | None, payload: dict[str, Any]
    ) -> None:
        entry = {
            "kind": "management",
            "event": event,
            "actor": actor,
            "org": org,
            "payload": payload,
        }
        await self.log.append_async(entry)

    async def events(self, org: str | None) -> list[AuditEvent]:
        found = []
        for body in read_entries(self.log.path):
            entry = json.loads(body)
            if entry.get("kind") == "management" and (org is None or entry.get("org") == org):
                found.append(
                    AuditEvent(
                        id=entry["index"],
                        at=entry["time"],
                        event=entry["event"],
                        actor=entry["actor"],
                        org=entry["org"],
                        payload=entry["payload"],
                    )
                )
        return found

    # --- requests -------------------------------------------------------------------------------

    def mode_for(self, org_mode: str) -> str:
        return effective_mode(org_mode, self.floor)

    def request(self, org_mode: str, entry: dict[str, Any]) -> None:
        """Queue one request's metadata row (not awaited: the response never waits)."""
        if self.mode_for(org_mode) == "zero":
            return
        self.log.submit({"kind": "request", **entry})

    def content(self, org_mode: str, record_id: str, org: str, content: dict[str, Any]) -> None:
        """Seal a request's content, only for orgs whose effective mode is `full`."""
        if self.mode_for(org_mode) != "full":
            return
        self.vault.seal(record_id, org, json.dumps(content, ensure_ascii=False).encode())
