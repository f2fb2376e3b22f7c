"""Write-ahead journals for admitted requests, and durable budget leases.

A `Journal` is one append-only file of JSON lines, written on a descriptor opened `O_APPEND`
and never fsynced: once written, a line is in the kernel's page cache, so it survives the
process being killed (SIGKILL, the OOM killer, a crash) but not the machine losing power.
Lines appended on an event loop are written together, in one `os.write` at the end of the
loop's current iteration (a system call per request each was a measurable part of the
router's saturation throughput): an admission is therefore on file before its request
reaches a node or an engine, which always takes another iteration.
The first line is a header naming the journal's epoch and the boot it was written in; a
journal read back under another boot id may have lost its tail, and its reader falls back
on what was fsynced: the `LeaseBook`.

A `LeaseBook` holds, per org and month, a token high-water mark that the org's used and
reserved tokens never exceed. It is fsynced before it grows, in steps of a sixteenth of the
budget, so admitting within a lease needs no sync, and after a power cut the org is charged
up to its lease: never above its budget, at most one step above what it really used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from federation._private.private_files import sync_directory

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_MODE = 0o600


def boot_id() -> str:
    """This boot's id (Linux); a process restart keeps it, a reboot or power cut changes it."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def journal_epoch() -> str:
    """A fresh, sortable journal epoch."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}"


class Journal:
    """One append-only file of lines, replaced whole when it is rotated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self._failure: OSError | None = None
        self.size = 0
        self.closed = False

    def read(self) -> list[bytes] | None:
        """The journal's complete lines, or None when there is none."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        pieces = data.split(b"\n")
        return [line for line in pieces[:-1] if line]  # the last piece has no newline: torn

    def start(self, lines: Iterable[bytes], *, durable: bool = False) -> None:
        """Replace the file atomically with `lines` and append from there on.

        `durable` fsyncs the new file and its directory first (at start-up: the header then
        reliably names this boot).
        """
        self.flush()
        data = b"".join(line + b"\n" for line in lines)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        if durable:
            sync_directory(self.path.parent)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, _FLAGS, _MODE)
        self.closed = False
        self.size = len(data)

    def append(self, line: bytes) -> None:
        if self._fd is None:
            if self.closed:
                return  # a straggler after shutdown: everything it would say is flushed
            raise RuntimeError("Journal.start() has not run")
        if self._failure is not None:  # the disk refused the last write: try again now
            self._pending.append(line)
            try:
                self._write_pending()
            except OSError:
                self._pending.pop()  # this line's caller is told: it is not on file
                raise
            self.size += len(line) + 1
            return
        self._pending.append(line)
        self.size += len(line) + 1
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines appended so far, in one system call. A disk that refuses keeps
        them pending, and the next `append` raises until a write succeeds again."""
        self._flush_scheduled = False
        with contextlib.suppress(OSError):  # remembered in `_failure`, raised by `append`
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending or self._fd is None:
            self._failure = None
            return
        data = b"".join(line + b"\n" for line in self._pending)
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self._failure = exc
            raise
        self._failure = None
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.closed = True


class _Lease(msgspec.Struct, array_like=True):
    org: str
    month: str
    tokens: int


_LEASES = msgspec.json.Decoder(list[_Lease])


class LeaseBook:
    """Durable per-org, per-month token high-water marks (`budget.leases`)."""

    STEPS = 16  # a lease grows by a sixteenth of the budget at a time

    def __init__(self, path: Path) -> None:
        self.path = path
        self.leases: dict[tuple[str, str], int] = {}
        with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
            for lease in _LEASES.decode(path.read_bytes()):
                self.leases[(lease.org, lease.month)] = lease.tokens

    def cover(self, org: str, month: str, needed: int, limit: int) -> None:
        """Make sure the org's lease for `month` is at least `needed` (at most `limit`).

        Growing it syncs the disk; within the lease this is a dictionary lookup.
        """
        if self.leases.get((org, month), 0) >= needed:
            return
        self.leases[(org, month)] = min(limit, needed + max(1, limit // self.STEPS))
        self._write(month)

    def _write(self, month: str) -> None:
        """Keep this month's leases (and later ones): earlier months' budgets are closed."""
        self.leases = {slot: tokens for slot, tokens in self.leases.items() if slot[1] >= month}
        body = msgspec.json.encode(
            [_Lease(org, m, tokens) for (org, m), tokens in sorted(self.leases.items())]
        )
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _MODE)
        try:
            os.write(fd, body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        sync_directory(self.path.parent)
