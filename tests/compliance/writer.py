"""A real audit-log writer process for the crash test: writes each durable index, a line each.

`python -m tests.compliance.writer DB` writes to stdout. The crash test starts its writers
with `start_writer`, from a fork server that has imported this module (and so `compliance`
and `federation`) once: each writer is still a process of its own, killed with SIGKILL, but
it skips the 0.25-0.3 s a new interpreter spends importing them, a hundred times a run.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TextIO

from compliance import AuditLog
from federation import NodeIdentity


def write(db: Path, out: TextIO) -> None:
    """Append entries forever, writing each index to `out` once it is durable."""
    log = AuditLog(
        db, NodeIdentity.load_or_create(db.parent), origin="crash-node", checkpoint_every=50
    )
    pending: list[Future[int]] = []
    for n in range(1_000_000):
        pending.append(log.submit({"kind": "request", "org": f"org-{n % 3}", "n": n}))
        if len(pending) >= 16:
            for done in pending:
                out.write(f"{done.result()}\n")
            out.flush()
            pending.clear()


@dataclass
class Writer:
    """A running writer process and the read end of its output, a line per durable index."""

    process: BaseProcess
    lines: TextIO


def start_writer(db: Path) -> Writer:
    """A writer process forked from the preloaded fork server (started on first use)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_write_to, args=(str(db), writer), daemon=True)
    process.start()
    writer.close()  # the child holds the only write end: its death is the reader's EOF
    lines = os.fdopen(os.dup(reader.fileno()), "r")
    reader.close()
    return Writer(process, lines)


def _write_to(db: str, out: Connection) -> None:
    write(Path(db), os.fdopen(os.dup(out.fileno()), "w"))


def main() -> None:
    write(Path(sys.argv[1]), sys.stdout)


if __name__ == "__main__":
    main()
