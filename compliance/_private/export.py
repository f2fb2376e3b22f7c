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
from federation import NodeIdentity, signature_valid

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


def _verify(data: bytes, trusted_key: bytes | None, report: Report) -> None:
    document, manifest = _parse(data)
    signed_bytes = _signed_bytes(data)
    key = _public_key(document, trusted_key, report)
    checkpoints = _checked_checkpoints(document, key, report)
    entries = _entries(document)
    report.entries = len(entries)
    tree_size = checkpoints[-1].size if checkpoints else 0
    if document.get("tree_size") != tree_size:
        raise _ExportError(
            f"tree_size says {document.get('tree_size')} but the last checkpoint is {tree_size}"
        )
    if document.get("full"):
        _check_full(entries, checkpoints)
    else:
        _check_inclusions(entries, tree_size, checkpoints[-1].root if checkpoints else b"")
    _check_consistency(document, checkpoints)
    _check_head(document, checkpoints, key)
    report.signed_entries = sum(1 for entry in entries if entry[0] < tree_size)
    report.unsigned_tail = report.entries - report.signed_entries
    if report.unsigned_tail:
        report.notes.append(
            f"{report.unsigned_tail} entries after the last checkpoint (size {tree_size}) are an "
            "unsigned tail: they are chained but no signature covers them yet"
        )
    _check_manifest(signed_bytes, manifest, key)


def _signed_bytes(data: bytes) -> bytes:
    """The document's bytes as the node signed them (see `sign_document`)."""
    end = data.rfind(_SEPARATOR)
    if not data.startswith(_PREFIX) or end < 0:
        raise _ExportError("the export is not in canonical form: its signed part cannot be found")
    return data[len(_PREFIX) : end]


def _parse(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        parsed = _DECODE(data)
    except msgspec.DecodeError as exc:
        raise _ExportError(
            f"the file is not a complete export: truncated or corrupted ({exc})"
        ) from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("export"), dict):
        raise _ExportError("the file is not a Palisade audit export (no `export` object)")
    document, manifest = parsed["export"], parsed.get("manifest")
    if document.get("format") != FORMAT:
        raise _ExportError(f"unknown export format {document.get('format')!r}; expected {FORMAT}")
    if not isinstance(manifest, dict):
        raise _ExportError("the export has no manifest")
    return document, manifest


def _public_key(document: dict[str, Any], trusted: bytes | None, report: Report) -> bytes:
    try:
        key = bytes.fromhex(str(document.get("public_key", "")))
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


def _checked_checkpoints(document: dict[str, Any], key: bytes, report: Report) -> list[Checkpoint]:
    checkpoints: list[Checkpoint] = []
    for number, item in enumerate(document.get("checkpoints") or []):
        try:
            checkpoint = Checkpoint(str(item["body"]).encode(), bytes.fromhex(item["signature"]))
            size, origin = checkpoint.size, checkpoint.fields.get("origin")
        except (KeyError, ValueError, TypeError):
            raise _ExportError(f"checkpoint #{number} is malformed") from None
        if not signature_valid(key, checkpoint.signature, checkpoint.body):
            raise _ExportError(
                f"checkpoint #{number} (size {size}): its signature does not verify: the "
                "checkpoint was edited or signed by another key"
            )
        if origin != document.get("origin"):
            raise _ExportError(f"checkpoint #{number} (size {size}) is for origin {origin!r}")
        if checkpoints and size <= checkpoints[-1].size:
            raise _ExportError(f"checkpoint #{number} (size {size}) does not grow the log")
        checkpoints.append(checkpoint)
    report.checkpoints = len(checkpoints)
    return checkpoints


Entry = tuple[int, bytes, list[str] | None, dict[str, Any]]


def _entries(document: dict[str, Any]) -> list[Entry]:
    entries: list[Entry] = []
    for position, item in enumerate(document.get("entries") or []):
        try:
            body = str(item["entry"]).encode()
            fields = _DECODE(body)
            index = int(fields["index"])
        except (KeyError, ValueError, TypeError, msgspec.DecodeError):
            raise _ExportError(f"entry at position {position} in the file is malformed") from None
        entries.append((index, body, item.get("proof"), fields))
    return entries


def _check_full(entries: list[Entry], checkpoints: list[Checkpoint]) -> None:
    """Every entry present, in order, chained; every checkpoint's root recomputed."""
    tree, prev = CompactRange(), GENESIS
    due = iter([(checkpoint.size, checkpoint.root) for checkpoint in checkpoints])
    pending = next(due, None)
    for position, (index, body, _, fields) in enumerate(entries):
        if index != position:
            raise _ExportError(
                f"entry {position} is missing or out of place: found index {index} there "
                "(an entry was deleted, inserted or reordered)"
            )
        if fields.get("prev") != prev.hex():
            raise _ExportError(
                f"entry {index} does not chain to entry {index - 1}: entry {index} or the one "
                "before it was changed, swapped or forged"
            )
        prev = leaf_hash(body)
        tree.append(prev)
        while pending is not None and pending[0] == tree.size:
            if tree.root() != pending[1]:
                raise _ExportError(
                    f"checkpoint size {pending[0]}: the entries do not produce its signed root "
                    f"(an entry at or before {pending[0] - 1} was changed and re-chained)"
                )
            pending = next(due, None)
    if pending is not None:
        raise _ExportError(
            f"checkpoint size {pending[0]} covers more entries than the export holds "
            f"({len(entries)}): entries were removed from the end"
        )


def _check_inclusions(entries: list[Entry], tree_size: int, root: bytes) -> None:
    verifier = InclusionVerifier(tree_size, root)
    for index, body, proof, _ in entries:
        if index >= tree_size:
            continue
        if not verifier.verify(leaf_hash(body), index, _hashes(proof, index)):
            raise _ExportError(
                f"entry {index}: not included in the signed tree of size {tree_size}: it was "
                "changed, moved or forged"
            )


def _hashes(proof: list[str] | None, index: int) -> list[bytes]:
    try:
        return [bytes.fromhex(item) for item in proof or []]
    except (ValueError, TypeError):
        raise _ExportError(f"entry {index}: its inclusion proof is malformed") from None


def _check_consistency(document: dict[str, Any], checkpoints: list[Checkpoint]) -> None:
    proofs = {
        (p.get("from"), p.get("to")): p.get("proof") for p in document.get("consistency") or []
    }
    for older, newer in itertools.pairwise(checkpoints):
        proof = _hashes(proofs.get((older.size, newer.size)), newer.size)
        if not verify_consistency(older.size, newer.size, older.root, newer.root, proof):
            raise _ExportError(
                f"checkpoints {older.size} and {newer.size} are not consistent: the log was "
                "rewritten between them"
            )


def _check_head(document: dict[str, Any], checkpoints: list[Checkpoint], key: bytes) -> None:
    """The node's latest checkpoint must be the export's last one: else the DB is older."""
    head = document.get("head")
    if head is None:
        return
    latest = Checkpoint(
        str(head.get("body", "")).encode(), bytes.fromhex(head.get("signature", ""))
    )
    if not signature_valid(key, latest.signature, latest.body):
        raise _ExportError("the node's head checkpoint does not verify: it was edited")
    last = checkpoints[-1] if checkpoints else None
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


def _check_manifest(body: bytes, manifest: dict[str, Any], key: bytes) -> None:
    if manifest.get("sha256") != hashlib.sha256(body).hexdigest():
        raise _ExportError(
            "the manifest's SHA-256 does not match: the file was modified after export"
        )
    try:
        signature = bytes.fromhex(str(manifest.get("signature", "")))
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
        region, node = str(entry.get("region")), str(entry.get("node"))
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
