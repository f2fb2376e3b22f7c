"""Signed exports of the audit log, and their offline verification.

An export is one JSON file: the entries in scope, every signed checkpoint, consistency
proofs between consecutive checkpoints, an inclusion proof for each entry against the last
checkpoint, the node's public key, and a manifest signed by the node. A full export (no org
filter) carries every entry, so the verifier also checks the hash chain and recomputes every
checkpoint's root; an org export reveals only that org's entries and proves each one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from compliance._private.log import (
    GENESIS,
    Checkpoint,
    canonical,
    read_entries,
    read_head,
    read_log,
)
from compliance._private.merkle import (
    CompactRange,
    InclusionVerifier,
    consistency_proof,
    leaf_hash,
    shared_proofs,
    verify_consistency,
)
from federation import NOT_ROUTED, NodeIdentity, signature_valid

FORMAT = "palisade-audit-export/1"
_DECODE = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class Scope:
    org: str | None = None
    since: str | None = None
    until: str | None = None

    def selects(self, entry: dict[str, Any]) -> bool:
        when = str(entry.get("time", ""))
        return (
            (self.org is None or entry.get("org") == self.org)
            and (self.since is None or when >= self.since)
            and (self.until is None or when < self.until)
        )

    @property
    def full(self) -> bool:
        return self.org is None and self.since is None and self.until is None


def build_export(db: Path, identity: NodeIdentity, *, origin: str, scope: Scope) -> bytes:
    """The export file's bytes for `scope`, signed with the node's key."""
    head = _head(db)  # first: the snapshot below is at least as new as the head
    bodies, checkpoints = read_log(db)
    leaves = [leaf_hash(body) for body in bodies]
    tree_size = checkpoints[-1].size if checkpoints else 0
    chosen = [i for i, body in enumerate(bodies) if scope.selects(json.loads(body))]
    # A full export is checked by recomputing every root; only filtered ones need proofs.
    signed = [] if scope.full else [i for i in chosen if i < tree_size]
    # Each proof stops where it joins an earlier one: verify the entries in file order.
    proofs = dict(zip(signed, shared_proofs(signed, leaves[:tree_size]), strict=True))
    export = {
        "format": FORMAT,
        "origin": origin,
        "public_key": identity.public_key.hex(),
        "scope": {"org": scope.org, "since": scope.since, "until": scope.until},
        "full": scope.full,
        "tree_size": tree_size,
        "checkpoints": [_checkpoint_json(cp) for cp in checkpoints],
        "head": head,
        "consistency": _consistency(checkpoints, leaves),
        "entries": [
            {"entry": bodies[i].decode(), "proof": _hex(proofs[i]) if i in proofs else None}
            for i in chosen
        ],
    }
    return sign_document(export, identity)


def sign_document(document: dict[str, Any], identity: NodeIdentity) -> bytes:
    """Wrap `document` with a manifest: its SHA-256 and the node's signature over it.

    The file is the canonical JSON of {"export": document, "manifest": …}; the signed bytes
    are exactly the document's bytes inside it, so a verifier checks them without
    re-encoding anything.
    """
    body = canonical(document)
    manifest = {
        "sha256": hashlib.sha256(body).hexdigest(),
        "signature": identity.sign(body).hex(),
    }
    return _PREFIX + body + _SEPARATOR + canonical(manifest) + b"}\n"


_PREFIX = b'{"export":'
_SEPARATOR = b',"manifest":'


def _head(db: Path) -> dict[str, str] | None:
    """The node's latest signed checkpoint as kept outside the database (see AuditLog)."""
    head = read_head(db)
    return _checkpoint_json(head) if head is not None else None


def _checkpoint_json(checkpoint: Checkpoint) -> dict[str, str]:
    return {"body": checkpoint.body.decode(), "signature": checkpoint.signature.hex()}


def _consistency(checkpoints: list[Checkpoint], leaves: list[bytes]) -> list[dict[str, Any]]:
    pairs = itertools.pairwise(checkpoints)
    return [
        {"from": a.size, "to": b.size, "proof": _hex(consistency_proof(a.size, leaves[: b.size]))}
        for a, b in pairs
    ]


def _hex(hashes: list[bytes]) -> list[str]:
    return [digest.hex() for digest in hashes]


# --- verification ------------------------------------------------------------------------------
#
# Exports are verified at 100,000 entries a second or more: the file is decoded once into typed
# structs (msgspec skips what the verifier does not read), each entry body is decoded only for
# its `index` and `prev` and checked as it is read, and the structs are kept out of the garbage
# collector's sight (gc=False: they hold no references that could form a cycle).


class _Signed(msgspec.Struct, frozen=True, gc=False):
    """A signed checkpoint as an export carries it."""

    body: str
    signature: str


class _Consistency(msgspec.Struct, frozen=True, gc=False):
    older: int = msgspec.field(name="from")
    newer: int = msgspec.field(name="to")
    proof: tuple[str, ...] = ()


class _Item(msgspec.Struct, frozen=True, gc=False):
    entry: str
    proof: tuple[str, ...] | None = None  # tuples, not lists: the collector soon drops them


class _Document(msgspec.Struct, frozen=True, gc=False):
    format: str
    origin: str
    public_key: str
    tree_size: int
    full: bool = False
    checkpoints: list[_Signed] = msgspec.field(default_factory=list)
    consistency: list[_Consistency] = msgspec.field(default_factory=list)
    entries: list[_Item] = msgspec.field(default_factory=list)
    head: _Signed | None = None


class _Manifest(msgspec.Struct, frozen=True, gc=False):
    sha256: str
    signature: str


class _File(msgspec.Struct, frozen=True, gc=False):
    export: _Document
    manifest: _Manifest


class _CheckpointFields(msgspec.Struct, frozen=True, gc=False):
    origin: str
    size: int
    root: str


class _Position(msgspec.Struct, frozen=True, gc=False):
    """What the verifier reads of an entry: its place in the log and the hash it chains to."""

    index: int
    prev: str | None = None


_DECODE_FILE = msgspec.json.Decoder(_File).decode
_DECODE_CHECKPOINT = msgspec.json.Decoder(_CheckpointFields).decode
_DECODE_POSITION = msgspec.json.Decoder(_Position).decode


@dataclass
class Report:
    """The outcome: `problem` names the first thing that failed, or is None."""

    entries: int = 0
    signed_entries: int = 0
    unsigned_tail: int = 0
    checkpoints: int = 0
    public_key: str = ""
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class _ExportError(Exception):
    """Internal: the first failure found, as the sentence to report."""


def verify_export(data: bytes, *, trusted_key: bytes | None = None) -> Report:
    """Check an export offline; never raises for bad content, reports the first failure."""
    report = Report()
    try:
        _verify(data, trusted_key, report)
    except _ExportError as bad:
        report.problem = str(bad)
    return report


@dataclass(frozen=True, slots=True)
class _Tree:
    """A checkpoint whose signature verified: the log had `size` entries with Merkle `root`."""

    size: int
    root: bytes


def _verify(data: bytes, trusted_key: bytes | None, report: Report) -> None:
    parsed = _parse(data)
    signed_bytes = _signed_bytes(data)
    document = parsed.export
    key = _public_key(document, trusted_key, report)
    trees = _checked_checkpoints(document, key, report)
    report.entries = len(document.entries)
    tree_size = trees[-1].size if trees else 0
    if document.tree_size != tree_size:
        raise _ExportError(
            f"tree_size says {document.tree_size} but the last checkpoint is {tree_size}"
        )
    if document.full:
        report.signed_entries = _check_full(document.entries, trees)
    else:
        root = trees[-1].root if trees else b""
        report.signed_entries = _check_inclusions(document.entries, tree_size, root)
    _check_consistency(document, trees)
    _check_head(document, trees, key)
    report.unsigned_tail = report.entries - report.signed_entries
    if report.unsigned_tail:
        report.notes.append(
            f"{report.unsigned_tail} entries after the last checkpoint (size {tree_size}) are an "
            "unsigned tail: they are chained but no signature covers them yet"
        )
    _check_manifest(signed_bytes, parsed.manifest, key)


def _signed_bytes(data: bytes) -> bytes:
    """The document's bytes as the node signed them (see `sign_document`)."""
    end = data.rfind(_SEPARATOR)
    if not data.startswith(_PREFIX) or end < 0:
        raise _ExportError("the export is not in canonical form: its signed part cannot be found")
    return data[len(_PREFIX) : end]


def _parse(data: bytes) -> _File:
    try:
        parsed = _DECODE_FILE(data)
    except msgspec.ValidationError as wrong:
        raise _ExportError(_shape_problem(data, wrong)) from None
    except msgspec.DecodeError as exc:
        raise _ExportError(_truncated(exc)) from None
    if parsed.export.format != FORMAT:
        raise _ExportError(_unknown_format(parsed.export.format))
    return parsed


def _shape_problem(data: bytes, wrong: msgspec.ValidationError) -> str:
    """Why JSON that is not shaped like an export was refused, the most basic reason first."""
    try:
        parsed = _DECODE(data)
    except msgspec.DecodeError as exc:
        return _truncated(exc)
    document = parsed.get("export") if isinstance(parsed, dict) else None
    if not isinstance(document, dict):
        return "the file is not a Palisade audit export (no `export` object)"
    if document.get("format") != FORMAT:
        return _unknown_format(document.get("format"))
    if not isinstance(parsed.get("manifest"), dict):
        return "the export has no manifest"
    return f"the export is malformed: {wrong}"


def _truncated(exc: msgspec.DecodeError) -> str:
    return f"the file is not a complete export: truncated or corrupted ({exc})"


def _unknown_format(found: object) -> str:
    return f"unknown export format {found!r}; expected {FORMAT}"


def _public_key(document: _Document, trusted: bytes | None, report: Report) -> bytes:
    try:
        key = bytes.fromhex(document.public_key)
    except ValueError:
        raise _ExportError("the export's public_key is not hex") from None
    report.public_key = key.hex()
    if trusted is not None and key != trusted:
        raise _ExportError(
            f"the export was signed by key {key.hex()[:16]}…, not the trusted key "
            f"{trusted.hex()[:16]}…: it comes from another node or was re-signed"
        )
    if trusted is None:
        report.notes.append("no --trusted-key given: the key in the file was trusted as is")
    return key


def _read_checkpoint(item: _Signed, what: str) -> tuple[_Tree, str, bytes, bytes]:
    """A checkpoint in the file, not yet verified: its tree, origin, body and signature."""
    try:
        body = item.body.encode()
        fields = _DECODE_CHECKPOINT(body)
        tree = _Tree(fields.size, bytes.fromhex(fields.root))
        return tree, fields.origin, body, bytes.fromhex(item.signature)
    except (ValueError, msgspec.DecodeError):
        raise _ExportError(f"{what} is malformed") from None


def _checked_checkpoints(document: _Document, key: bytes, report: Report) -> list[_Tree]:
    trees: list[_Tree] = []
    for number, item in enumerate(document.checkpoints):
        what = f"checkpoint #{number}"
        tree, origin, body, signature = _read_checkpoint(item, what)
        if not signature_valid(key, signature, body):
            raise _ExportError(
                f"{what} (size {tree.size}): its signature does not verify: the "
                "checkpoint was edited or signed by another key"
            )
        if origin != document.origin:
            raise _ExportError(f"{what} (size {tree.size}) is for origin {origin!r}")
        if trees and tree.size <= trees[-1].size:
            raise _ExportError(f"{what} (size {tree.size}) does not grow the log")
        trees.append(tree)
    report.checkpoints = len(trees)
    return trees


def _read(item: _Item, position: int) -> tuple[bytes, _Position]:
    """An entry's body, and the fields of it the verifier reads."""
    try:
        body = item.entry.encode()
        return body, _DECODE_POSITION(body)
    except (ValueError, msgspec.DecodeError):
        raise _ExportError(f"entry at position {position} in the file is malformed") from None


def _check_full(items: list[_Item], trees: list[_Tree]) -> int:
    """Every entry present, in order, chained; every checkpoint's root recomputed.

    Returns how many entries the checkpoints sign.
    """
    tree, prev = CompactRange(), GENESIS.hex()
    due = iter(trees)
    pending = next(due, None)
    for position, item in enumerate(items):
        body, fields = _read(item, position)
        if fields.index != position:
            raise _ExportError(
                f"entry {position} is missing or out of place: found index {fields.index} there "
                "(an entry was deleted, inserted or reordered)"
            )
        if fields.prev != prev:
            raise _ExportError(
                f"entry {position} does not chain to entry {position - 1}: entry {position} or "
                "the one before it was changed, swapped or forged"
            )
        leaf = leaf_hash(body)
        prev = leaf.hex()
        tree.append(leaf)
        while pending is not None and pending.size == position + 1:
            if tree.root() != pending.root:
                raise _ExportError(
                    f"checkpoint size {pending.size}: the entries do not produce its signed "
                    f"root (an entry at or before {pending.size - 1} was changed and re-chained)"
                )
            pending = next(due, None)
    if pending is not None:
        raise _ExportError(
            f"checkpoint size {pending.size} covers more entries than the export holds "
            f"({len(items)}): entries were removed from the end"
        )
    return min(len(items), trees[-1].size if trees else 0)


def _check_inclusions(items: list[_Item], tree_size: int, root: bytes) -> int:
    """Every entry the last checkpoint covers proven in its tree; returns how many it covers."""
    verify = InclusionVerifier(tree_size, root).verify
    signed = 0
    for position, item in enumerate(items):
        body, fields = _read(item, position)
        index = fields.index
        if index >= tree_size:
            continue
        proof = _hashes(item.proof)
        if proof is None:
            raise _ExportError(f"entry {index}: its inclusion proof is malformed")
        if not verify(leaf_hash(body), index, proof):
            raise _ExportError(
                f"entry {index}: not included in the signed tree of size {tree_size}: it was "
                "changed, moved or forged"
            )
        signed += 1
    return signed


def _hashes(proof: tuple[str, ...] | None) -> list[bytes] | None:
    """A proof's hashes (none for a missing proof), or None if one of them is not hex."""
    try:
        return list(map(bytes.fromhex, proof or ()))
    except ValueError:
        return None


def _check_consistency(document: _Document, trees: list[_Tree]) -> None:
    proofs = {(p.older, p.newer): p.proof for p in document.consistency}
    for older, newer in itertools.pairwise(trees):
        proof = _hashes(proofs.get((older.size, newer.size)))
        if proof is None:
            raise _ExportError(
                f"the consistency proof from checkpoint {older.size} to {newer.size} is malformed"
            )
        if not verify_consistency(older.size, newer.size, older.root, newer.root, proof):
            raise _ExportError(
                f"checkpoints {older.size} and {newer.size} are not consistent: the log was "
                "rewritten between them"
            )


def _check_head(document: _Document, trees: list[_Tree], key: bytes) -> None:
    """The node's latest checkpoint must be the export's last one: else the DB is older."""
    if document.head is None:
        return
    what = "the node's head checkpoint"
    latest, _, body, signature = _read_checkpoint(document.head, what)
    if not signature_valid(key, signature, body):
        raise _ExportError(f"{what} does not verify: it was edited")
    last = trees[-1] if trees else None
    if (
        last is None
        or latest.size > last.size
        or (latest.size == last.size and latest.root != last.root)
    ):
        exported = last.size if last is not None else 0
        raise _ExportError(
            f"the node signed a checkpoint of size {latest.size}, but the exported log's last "
            f"checkpoint is size {exported}: the database was restored from an older copy or "
            "rolled back"
        )


def _check_manifest(body: bytes, manifest: _Manifest, key: bytes) -> None:
    if manifest.sha256 != hashlib.sha256(body).hexdigest():
        raise _ExportError(
            "the manifest's SHA-256 does not match: the file was modified after export"
        )
    try:
        signature = bytes.fromhex(manifest.signature)
    except ValueError:
        signature = b""
    if not signature_valid(key, signature, body):
        raise _ExportError(
            "the manifest signature does not verify: the file was modified after export"
        )


RESIDENCY_FORMAT = "palisade-residency-report/1"


def build_residency(
    db: Path, identity: NodeIdentity, *, origin: str, org: str, since: str | None
) -> bytes:
    """A signed list of the regions and nodes that processed `org`'s requests since `since`."""
    regions: dict[str, int] = {}
    nodes: dict[tuple[str, str], int] = {}
    scope = Scope(org=org, since=since)
    for body in read_entries(db):
        entry = json.loads(body)
        if entry.get("kind") != "request" or not scope.selects(entry):
            continue
        # Rows written before refused requests had an explicit region have none.
        region = str(entry.get("region") or NOT_ROUTED)
        node = str(entry.get("node") or NOT_ROUTED)
        regions[region] = regions.get(region, 0) + 1
        nodes[(node, region)] = nodes.get((node, region), 0) + 1
    document = {
        "format": RESIDENCY_FORMAT,
        "origin": origin,
        "public_key": identity.public_key.hex(),
        "org": org,
        "since": since,
        "regions": [{"region": r, "requests": n} for r, n in sorted(regions.items())],
        "nodes": [
            {"node": node, "region": region, "requests": n}
            for (node, region), n in sorted(nodes.items())
        ],
        "checkpoint": _head(db),
    }
    return sign_document(document, identity)
