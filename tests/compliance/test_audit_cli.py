"""`palisade audit verify`: the offline verifier as an auditor runs it, in a subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from compliance import AuditLog, Scope, build_export
from federation import NodeIdentity
from tests.support import REPO, run_palisade

ORIGIN = "edge-eu-1"


def palisade(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_palisade(*args, env=env)


def verify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return palisade("audit", "verify", *args, env=env)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeIdentity:
    return NodeIdentity.load_or_create(tmp_path_factory.mktemp("node"))


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, node: NodeIdentity) -> Path:
    """250 request-shaped entries for two orgs; checkpoints at 100, 200 and 250 (close)."""
    path = tmp_path_factory.mktemp("log") / "audit.db"
    log = AuditLog(path, node, origin=ORIGIN, checkpoint_every=100, checkpoint_seconds=3600)
    futures = [
        log.submit({"kind": "request", "org": f"org-{n % 2}", "model": "m", "n": n})
        for n in range(250)
    ]
    assert [f.result() for f in futures] == list(range(250))
    log.close()
    return path


@pytest.fixture
def full(tmp_path: Path, db: Path, node: NodeIdentity) -> Path:
    path = tmp_path / "full.json"
    path.write_bytes(build_export(db, node, origin=ORIGIN, scope=Scope()))
    return path


def key_hex(node: NodeIdentity) -> str:
    return node.public_key.hex()


def test_a_good_export_verifies_with_a_summary(full: Path, node: NodeIdentity) -> None:
    result = verify(str(full), "--trusted-key", key_hex(node))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"Audit export {full}: OK" in out
    assert "origin           edge-eu-1" in out
    assert "scope            the whole log" in out
    assert "entries          250" in out
    assert "signed entries   250" in out
    assert "unsigned tail    0" in out
    assert "checkpoints      3" in out
    assert key_hex(node) in out
    assert "key fingerprint  SHA256:" in out
    assert "matches --trusted-key" in out
    assert result.stderr == ""


def test_without_a_trusted_key_the_summary_says_so(full: Path) -> None:
    result = verify(str(full))
    assert result.returncode == 0, result.stderr
    assert "as found in the file" in result.stdout
    assert "note: no --trusted-key given" in result.stdout


def test_an_org_export_verifies_as_json(tmp_path: Path, db: Path, node: NodeIdentity) -> None:
    path = tmp_path / "org.json"
    path.write_bytes(build_export(db, node, origin=ORIGIN, scope=Scope(org="org-1")))
    result = verify(str(path), "--trusted-key", key_hex(node), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["problem"] is None
    assert (report["entries"], report["signed_entries"], report["unsigned_tail"]) == (125, 125, 0)
    assert report["checkpoints"] == 3
    assert report["public_key"] == key_hex(node)
    assert report["fingerprint"].startswith("SHA256:")
    assert report["full"] is False
    assert report["scope"] == {"org": "org-1", "since": None, "until": None}
    assert report["origin"] == ORIGIN


def test_the_key_can_come_from_a_file(full: Path, node: NodeIdentity, tmp_path: Path) -> None:
    key_file = tmp_path / "node.pub"
    key_file.write_text(key_hex(node).upper() + "\n")
    result = verify(str(full), "--trusted-key", f"@{key_file}")
    assert result.returncode == 0, result.stderr
    assert "matches --trusted-key" in result.stdout


def test_a_tampered_checkpoint_signature_fails(full: Path, node: NodeIdentity) -> None:
    parsed = json.loads(full.read_bytes())
    signature = parsed["export"]["checkpoints"][1]["signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    full.write_bytes(full.read_bytes().replace(signature.encode(), flipped.encode()))
    result = verify(str(full), "--trusted-key", key_hex(node))
    assert result.returncode == 1
    assert "FAILED: checkpoint #1 (size 200): its signature does not verify" in result.stderr
    assert f"Audit export {full}: FAILED" in result.stdout


def test_a_truncated_export_fails(full: Path, node: NodeIdentity) -> None:
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    result = verify(str(full), "--trusted-key", key_hex(node))
    assert result.returncode == 1
    assert "FAILED: the file is not a complete export: truncated or corrupted" in result.stderr


def test_a_failure_in_json_mode_still_exits_1(full: Path, node: NodeIdentity) -> None:
    data = full.read_bytes()
    full.write_bytes(data.replace(b'"scope":{"org":null', b'"scope":{"org":"x"'))
    result = verify(str(full), "--trusted-key", key_hex(node), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert "the manifest's SHA-256 does not match" in report["problem"]
    assert "FAILED: the manifest's SHA-256 does not match" in result.stderr


def test_the_wrong_trusted_key_fails(full: Path, tmp_path: Path) -> None:
    stranger = NodeIdentity.load_or_create(tmp_path / "stranger")
    result = verify(str(full), "--trusted-key", key_hex(stranger))
    assert result.returncode == 1
    assert "not the trusted key" in result.stderr
    assert result.stderr.startswith("FAILED: ")


def test_a_malformed_trusted_key_is_refused(full: Path, tmp_path: Path) -> None:
    result = verify(str(full), "--trusted-key", "abc123")
    assert result.returncode == 1
    assert "error: --trusted-key must hold the node's Ed25519 public key as 64 hex" in (
        result.stderr
    )
    missing = tmp_path / "no-such.pub"
    result = verify(str(full), "--trusted-key", f"@{missing}")
    assert result.returncode == 1
    assert f"error: cannot read the trusted key from {missing}" in result.stderr


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    result = verify(str(missing))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: cannot read {missing}: No such file or directory"
    assert result.stdout == ""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens once the probe is closed


def test_verify_is_offline(full: Path, node: NodeIdentity, tmp_path: Path) -> None:
    """No server, no admin key, and a PALISADE_URL nothing answers on: verify still works."""
    env = {
        "PALISADE_URL": f"http://127.0.0.1:{closed_port()}",
        "PALISADE_HOME": str(tmp_path / "empty-home"),
        "PALISADE_API_KEY": "",
    }
    result = verify(str(full), "--trusted-key", key_hex(node), env=env)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_the_export_can_be_piped_in(full: Path, node: NodeIdentity) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "palisade", "audit", "verify", "-", "--trusted-key", key_hex(node)],
        input=full.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "entries          250" in result.stdout
