"""A real audit-log writer process for the crash test: prints each durable index."""

from __future__ import annotations

import sys
from concurrent.futures import Future
from pathlib import Path

from compliance import AuditLog
from federation import NodeIdentity


def main() -> None:
    db = Path(sys.argv[1])
    log = AuditLog(
        db, NodeIdentity.load_or_create(db.parent), origin="crash-node", checkpoint_every=50
    )
    out = sys.stdout
    pending: list[Future[int]] = []
    for n in range(1_000_000):
        pending.append(log.submit({"kind": "request", "org": f"org-{n % 3}", "n": n}))
        if len(pending) >= 16:
            for done in pending:
                out.write(f"{done.result()}\n")
            out.flush()
            pending.clear()


if __name__ == "__main__":
    main()
