"""`palisade image build|verify` and `palisade image keys create|rotate|revoke|show`.

Every command is offline: build reads an image config and a release key, verify reads a
bundle and a trust file. A refusal prints `error: <message> (<code>)` and exits 1, having
written nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from federation.client import JsonFlag, fail, print_json
from images._private.build import build_bundle
from images._private.errors import ImageError
from images._private.keys import ReleaseKey, SigningKey, TrustSet
from images._private.manifest import Manifest
from images._private.verify import verify_bundle

keys_cli = typer.Typer(
    help="Release keys: create one, rotate to a new one, revoke one, show a trust file.",
    no_args_is_help=True,
)

TrustOpt = Annotated[
    Path,
    typer.Option("--trust", help="Trust file (JSON): pinned release keys and key records."),
]
KeyOpt = Annotated[Path, typer.Option("--key", help="Release private key (PEM) that signs.")]


def register(app: typer.Typer) -> None:
    """Add this room's commands to `app`."""
    app.command("build")(build_command)
    app.command("verify")(verify_command)
    app.add_typer(keys_cli, name="keys")


def _refusal(exc: ImageError) -> typer.Exit:
    return fail(str(exc))


def _epoch_default() -> int:
    raw = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        return int(raw)
    except ValueError:
        raise fail(f"SOURCE_DATE_EPOCH={raw!r} is not a number of seconds.") from None


def build_command(  # noqa: PLR0917 - typer maps each option to a parameter
    config: Annotated[Path, typer.Argument(help="The image config (TOML).")],
    version: Annotated[str, typer.Option("--version", help="Semantic version, e.g. 1.4.0.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the bundle (.pimg).")],
    key: KeyOpt,
    source_date_epoch: Annotated[
        int | None,
        typer.Option(
            "--source-date-epoch",
            help="Timestamp of every file and of the manifest [default: $SOURCE_DATE_EPOCH or 0].",
        ),
    ] = None,
    min_version: Annotated[
        str | None, typer.Option("--min-version", help="Recorded in the manifest (informational).")
    ] = None,
    records: Annotated[
        Path | None,
        typer.Option("--records", help="Trust file whose rotation/revocation records to ship."),
    ] = None,
) -> None:
    """Build one signed, deterministic bundle from an image config."""
    epoch = _epoch_default() if source_date_epoch is None else source_date_epoch
    try:
        manifest = build_bundle(
            config,
            version=version,
            out=out,
            signing_key=key,
            source_date_epoch=epoch,
            min_version=min_version,
            records=records,
        )
    except ImageError as exc:
        raise _refusal(exc) from exc
    typer.echo(f"built {out}: {_summary(manifest)}")


def verify_command(  # noqa: PLR0917 - typer maps each option to a parameter
    bundle: Annotated[Path, typer.Argument(help="The bundle (.pimg) to check.")],
    trust: TrustOpt,
    compatible: Annotated[
        str | None, typer.Option("--compatible", help="Refuse unless made for this hardware.")
    ] = None,
    region: Annotated[
        str | None, typer.Option("--region", help="Refuse unless pinned to this region.")
    ] = None,
    min_version: Annotated[
        str | None, typer.Option("--min-version", help="Refuse versions below this one.")
    ] = None,
    records: Annotated[
        Path | None,
        typer.Option("--records", help="Trust file whose key records to consider as well."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Check a bundle offline: signature, key records, constraints and every payload."""
    try:
        trust_set = TrustSet.load(trust)
        if records is not None:
            trust_set = trust_set.with_records(TrustSet.load(records).records)
        verified = verify_bundle(
            bundle,
            trust_set,
            compatible=compatible,
            region=region,
            min_version=min_version,
        )
    except ImageError as exc:
        raise _refusal(exc) from exc
    if as_json:
        print_json(
            {"ok": True, "signed_by": verified.signed_by, **_manifest_json(verified.manifest)}
        )
        return
    typer.echo(f"ok: {_summary(verified.manifest)}; signed by {verified.signed_by}")
    for payload in verified.manifest.payloads:
        typer.echo(
            f"  {payload.kind:<7} {payload.name}  {payload.size} bytes  sha256:{payload.sha256}"
        )


def _summary(manifest: Manifest) -> str:
    return (
        f"version {manifest.version}, compatible {manifest.compatible}, region "
        f"{manifest.region}, rootfs sha256:{manifest.rootfs.sha256}"
    )


def _manifest_json(manifest: Manifest) -> dict[str, Any]:
    return {"manifest": msgspec.to_builtins(manifest)}


@keys_cli.command("create")
def keys_create_command(
    out: Annotated[Path, typer.Option("--out", help="Where to write the private key (0600).")],
    trust: Annotated[
        Path | None,
        typer.Option("--trust", help="Also pin the new public key in this trust file."),
    ] = None,
) -> None:
    """Make a new Ed25519 release key; never overwrites an existing one."""
    key = SigningKey.generate()
    try:
        existing = _load_or_empty(trust)
        key.save(out)
        if trust is not None:
            existing.with_key(key.public).save(trust)
    except ImageError as exc:
        raise _refusal(exc) from exc
    typer.echo(f"created release key {key.key_id} in {out}")
    if trust is not None:
        typer.echo(f"pinned {key.key_id} in {trust}")


@keys_cli.command("rotate")
def keys_rotate_command(
    key: Annotated[Path, typer.Option("--key", help="The current release private key.")],
    to: Annotated[Path, typer.Option("--to", help="The new release private key.")],
    trust: TrustOpt,
) -> None:
    """Endorse a new release key with the current one (a rotation record), and pin it.

    Ship the record with `image build --records TRUST`: nodes that trust only the current
    key learn the new one from the bundle itself.
    """
    try:
        current, successor = SigningKey.load(key), SigningKey.load(to)
        trust_set = TrustSet.load(trust)
        _require_trusted(trust_set, current)
        record = current.endorse(successor.public)
        trust_set.with_key(successor.public).with_records([record]).save(trust)
    except ImageError as exc:
        raise _refusal(exc) from exc
    typer.echo(f"{current.key_id} endorsed {successor.key_id}; rotation record added to {trust}")


@keys_cli.command("revoke")
def keys_revoke_command(
    key_id: Annotated[str, typer.Argument(help="Id of the key to revoke.")],
    key: Annotated[Path, typer.Option("--key", help="A trusted release key that signs this.")],
    trust: TrustOpt,
    keep: Annotated[
        list[str] | None,
        typer.Option(
            "--keep",
            help="Successor key id whose rotation from the revoked key still counts "
            "[default: every successor the trust file records].",
        ),
    ] = None,
) -> None:
    """Revoke a release key: bundles it signs are refused even where it is pinned."""
    try:
        signer = SigningKey.load(key)
        trust_set = TrustSet.load(trust)
        _require_trusted(trust_set, signer)
        subject = _known_key(trust_set, key_id)
        keeps = keep if keep is not None else _successors(trust_set, key_id)
        record = signer.revoke(subject, keeps)
        trust_set.with_records([record]).save(trust)
    except ImageError as exc:
        raise _refusal(exc) from exc
    kept = ", ".join(record.keeps) or "none"
    typer.echo(
        f"{signer.key_id} revoked {key_id} (successors kept: {kept}); record added to {trust}"
    )


@keys_cli.command("show")
def keys_show_command(trust: TrustOpt, as_json: JsonFlag = False) -> None:
    """List a trust file's keys: pinned or learnt, trusted or revoked."""
    try:
        trust_set = TrustSet.load(trust)
    except ImageError as exc:
        raise _refusal(exc) from exc
    rows = _key_rows(trust_set)
    if as_json:
        print_json({"keys": rows, "records": len(trust_set.records)})
        return
    for row in rows:
        typer.echo(f"{row['key_id']}  {row['status']:<9} {row['source']:<7} {row['public_key']}")
    typer.echo(f"{len(trust_set.records)} record(s)")


def _key_rows(trust_set: TrustSet) -> list[dict[str, str]]:
    status = trust_set.status()
    pinned = {key.key_id for key in trust_set.keys}
    known = {key.key_id: key for key in trust_set.keys}
    known.update({record.subject.key_id: record.subject for record in trust_set.records})
    rows = []
    for key_id, key in sorted(known.items()):
        state = (
            "revoked"
            if key_id in status.revoked
            else "trusted"
            if key_id in status.trusted
            else "untrusted"
        )
        source = "pinned" if key_id in pinned else "learnt"
        rows.append(
            {"key_id": key_id, "status": state, "source": source, "public_key": key.public_key}
        )
    return rows


def _load_or_empty(trust: Path | None) -> TrustSet:
    if trust is None or not trust.exists():
        return TrustSet(keys=())
    return TrustSet.load(trust)


def _require_trusted(trust_set: TrustSet, key: SigningKey) -> None:
    if key.key_id not in trust_set.status().trusted:
        raise ImageError(
            f"Key {key.key_id} is not trusted by this trust file, so nodes would ignore what it "
            "signs; sign with a trusted key.",
            code="untrusted_key",
        )


def _known_key(trust_set: TrustSet, key_id: str) -> ReleaseKey:
    for key in (*trust_set.keys, *(record.subject for record in trust_set.records)):
        if key.key_id == key_id:
            return key
    raise ImageError(f"Key {key_id} is not in the trust file.", code="unknown_key")


def _successors(trust_set: TrustSet, key_id: str) -> list[str]:
    return [
        record.subject.key_id
        for record in trust_set.records
        if record.kind == "rotation" and record.signer == key_id
    ]
