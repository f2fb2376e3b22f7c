"""The edge ledger: what an appliance admitted and served for fleet keys, until the router
has counted it.

One `federation.Journal` (`edge.journal`, lines of JSON) holds the budget shares leased
from the router, every admission (before its request reaches an engine), every settlement
(the usage row and audit row the router will be sent), the ids the router acknowledged,
and when the router was lost. The books in memory are rebuilt from it at start-up, so a
SIGKILL loses nothing admitted and counts nothing twice: an admission that never settled
becomes an `interrupted` row charged at its reservation (as the router's admission journal
does), and an acknowledged row is never sent again. A journal read back under another boot
id (a power cut: its tail may be lost) charges each org the rest of its share, so the
fleet never overshoots a budget whatever the node forgot.

The journal is compacted (rewritten with what is still open or unacknowledged and a
summary of what was spent) when it grows past `_ROTATE_BYTES` and at a clean stop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from federation import (
    INTERRUPTED,
    EdgeRow,
    Journal,
    UsageRecord,
    boot_id,
    iso,
    journal_epoch,
)

log = logging.getLogger("palisade.appliance.edge")
_ROTATE_BYTES = 4 * 1024 * 1024
Slot = tuple[str, str]  # (org, month)


class _Header(msgspec.Struct, tag="h", tag_field="t"):
    epoch: str
    boot: str
    clean: bool = False  # written at a clean stop, fsynced: nothing of it can be lost


class _Share(msgspec.Struct, tag="l", tag_field="t"):
    org: str
    month: str
    total: int  # the node's whole share for the month, as the router last said


class _Spent(msgspec.Struct, tag="p", tag_field="t"):
    org: str
    month: str
    tokens: int  # acknowledged by the router before the journal was compacted


class _Admitted(msgspec.Struct, tag="a", tag_field="t"):
    id: str
    org: str
    month: str
    reserved: int
    row: EdgeRow  # what the router is sent if the request never settles (`interrupted`)


class _Settled(msgspec.Struct, tag="s", tag_field="t"):
    row: EdgeRow


class _Acked(msgspec.Struct, tag="k", tag_field="t"):
    ids: list[str]


class _Offline(msgspec.Struct, tag="o", tag_field="t"):
    since: float | None  # wall clock; None: the router answered again


_Line = _Header | _Share | _Spent | _Admitted | _Settled | _Acked | _Offline
_DECODE = msgspec.json.Decoder(_Line)
_ENCODE = msgspec.json.encode


@dataclass(slots=True)
class Books:
    """Per (org, month): the share leased, tokens spent (settled) and reserved (in flight)."""

    shares: dict[Slot, int] = field(default_factory=dict)
    spent: dict[Slot, int] = field(default_factory=dict)
    reserved: dict[Slot, int] = field(default_factory=dict)

    def left(self, slot: Slot) -> int:
        return self.shares.get(slot, 0) - self.spent.get(slot, 0) - self.reserved.get(slot, 0)

    def add(self, table: dict[Slot, int], slot: Slot, tokens: int) -> None:
        table[slot] = table.get(slot, 0) + tokens


class EdgeLedger:
    """The appliance's durable books for fleet keys; every change is journaled first."""

    def __init__(self, home: Path, *, node: str, region: str) -> None:
        self._node = node
        self._region = region
        self._journal = Journal(home / "edge.journal")
        self.books = Books()
        self.open: dict[str, _Admitted] = {}  # admitted, not settled
        self.unacked: dict[str, EdgeRow] = {}  # settled, not yet counted by the router
        self.offline_since: float | None = None
        self.recovered = 0  # rows made at start-up from what a killed predecessor left

    # --- start and stop -------------------------------------------------------------------

    def start(self) -> None:
        """Rebuild the books from the journal, charge what never settled, start afresh."""
        lines = self._journal.read() or []
        header = self._replay(lines)
        epoch = journal_epoch()
        for entry in list(self.open.values()):
            self._settle_line(_interrupted(entry.row, entry.reserved))
            self.recovered += 1
        if (
            lines
            and not (header is not None and header.clean)
            and (header is None or header.boot != boot_id())
        ):
            self.recovered += self._charge_shares(epoch)
        if self.recovered:
            log.warning("the edge ledger recovered %d interrupted requests", self.recovered)
        self._compact(epoch, clean=False, durable=True)

    def stop(self) -> None:
        """Compact and fsync: a clean journal needs nothing charged at the next start."""
        if not self._journal.closed:
            self._compact(journal_epoch(), clean=not self.open, durable=True)
            self._journal.close()

    def _replay(self, lines: list[bytes]) -> _Header | None:
        header: _Header | None = None
        for raw in lines:
            try:
                line = _DECODE.decode(raw)
            except msgspec.DecodeError:
                continue  # torn by a power cut
            if isinstance(line, _Header):
                header = header or line
            else:
                self._apply(line)
        return header

    def _apply(self, line: _Line) -> None:
        books = self.books
        if isinstance(line, _Share):
            slot = (line.org, line.month)
            books.shares[slot] = max(books.shares.get(slot, 0), line.total)
        elif isinstance(line, _Spent):
            books.add(books.spent, (line.org, line.month), line.tokens)
        elif isinstance(line, _Admitted):
            self.open[line.id] = line
            books.add(books.reserved, (line.org, line.month), line.reserved)
        elif isinstance(line, _Settled):
            self._settle_line(line.row)
        elif isinstance(line, _Acked):
            for row_id in line.ids:
                self.unacked.pop(row_id, None)
        elif isinstance(line, _Offline):
            self.offline_since = line.since

    def _settle_line(self, row: EdgeRow) -> None:
        slot = (row.org, row.month)
        admitted = self.open.pop(row.id, None)
        if admitted is not None:
            self.books.add(self.books.reserved, slot, -admitted.reserved)
        if row.id in self.unacked:
            return  # settled twice (a journal carried over): counted once
        self.books.add(self.books.spent, slot, row.tokens)
        self.unacked[row.id] = row

    def _charge_shares(self, epoch: str) -> int:
        """After a power cut, whatever share is left counts as spent (`interrupted`)."""
        charged = 0
        for (org, month), total in sorted(self.books.shares.items()):
            rest = total - self.books.spent.get((org, month), 0)
            if rest > 0:
                self._settle_line(
                    self._lease_charge(f"lease-{epoch}-{org}-{month}", org, month, rest)
                )
                charged += 1
        return charged

    def _lease_charge(self, row_id: str, org: str, month: str, tokens: int) -> EdgeRow:
        record = UsageRecord(
            at=iso(datetime.now(UTC)),
            org=org,
            user_id="-",
            key_id=None,
            model="-",
            region=self._region,
            node=self._node,
            input_tokens=tokens,
            output_tokens=0,
            latency_ms=0.0,
            status=INTERRUPTED,
            cost=0.0,
            request_id=row_id,
        )
        return EdgeRow(
            id=row_id, org=org, month=month, tokens=tokens, status=INTERRUPTED, record=record
        )

    def _compact(self, epoch: str, *, clean: bool, durable: bool) -> None:
        spent = dict(self.books.spent)
        for row in self.unacked.values():
            spent[(row.org, row.month)] -= row.tokens
        lines: list[msgspec.Struct] = [_Header(epoch, boot_id(), clean=clean)]
        lines += [_Share(o, m, t) for (o, m), t in sorted(self.books.shares.items())]
        lines += [_Spent(o, m, t) for (o, m), t in sorted(spent.items()) if t]
        lines += [_Settled(row) for row in self.unacked.values()]
        lines += list(self.open.values())
        if self.offline_since is not None:
            lines.append(_Offline(self.offline_since))
        self._journal.start([_ENCODE(line) for line in lines], durable=durable)

    # --- changes --------------------------------------------------------------------------

    def share(self, org: str, month: str, total: int) -> None:
        slot = (org, month)
        if total <= self.books.shares.get(slot, 0):
            return
        try:
            self._journal.append(_ENCODE(_Share(org, month, total)))
        except OSError:  # forgotten at a crash: the node then holds less than it was granted
            log.exception("the edge ledger could not record a budget share for %s", org)
        self.books.shares[slot] = total

    def admit(self, request_id: str, reserved: int, row: EdgeRow) -> None:
        """Journal an admission (raises OSError if the disk refuses: nothing is taken)."""
        line = _Admitted(request_id, row.org, row.month, reserved, row)
        self._journal.append(_ENCODE(line))
        self.open[request_id] = line
        self.books.add(self.books.reserved, (row.org, row.month), reserved)

    def settle(self, row: EdgeRow) -> None:
        try:
            self._journal.append(_ENCODE(_Settled(row)))
        except OSError:  # the books in memory are right; only a crash now charges it whole
            log.exception("the edge ledger could not record settling %s", row.id)
        self._settle_line(row)
        if self._journal.size > _ROTATE_BYTES:
            self._compact(journal_epoch(), clean=False, durable=False)

    def acknowledged(self, ids: list[str]) -> None:
        """The router holds these rows: never send them again."""
        known = [row_id for row_id in ids if row_id in self.unacked]
        if not known:
            return
        self._journal.append(_ENCODE(_Acked(known)))
        for row_id in known:
            self.unacked.pop(row_id)

    def note_offline(self, since: float | None) -> None:
        if since == self.offline_since:
            return
        self.offline_since = since
        try:
            self._journal.append(_ENCODE(_Offline(since)))
        except OSError:
            log.exception("the edge ledger could not record the router's state")


def _interrupted(row: EdgeRow, reserved: int) -> EdgeRow:
    """An admission that never settled: charged at its reservation."""
    record = None
    if row.record is not None:
        record = msgspec.structs.replace(
            row.record, input_tokens=reserved, output_tokens=0, status=INTERRUPTED
        )
    audit: dict[str, Any] | None = None
    if row.audit is not None:
        audit = row.audit | {"input_tokens": reserved, "output_tokens": 0, "status": INTERRUPTED}
    return msgspec.structs.replace(
        row, tokens=reserved, status=INTERRUPTED, record=record, audit=audit
    )
