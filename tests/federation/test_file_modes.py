"""State is private whatever the umask: under umask 022, every directory `palisade fleet up`
makes (the router's, the appliance's) is 0700 and every file 0600 (databases, their `-wal`
and `-shm`, keys, heads, logs), while serving and after a clean stop. Secrets are printed
only to a terminal."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from federation import private_database, private_dir, private_file, shown_secret
from tests.conftest import MODEL
from tests.e2e.fleet import FLEET_ENV, fleet_up
from tests.support import REPO, wait_for


def modes(home: Path) -> dict[Path, int]:
    """Every directory and file under `home` (not following the `models` symlink)."""
    found = {home: stat.S_IMODE(home.stat().st_mode)}
    for directory, subdirs, files in os.walk(home):
        for name in [*subdirs, *files]:
            path = Path(directory) / name
            if not path.is_symlink():
                found[path] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(home: Path) -> dict[Path, int]:
    found = modes(home)
    wrong = {
        str(path.relative_to(home)): oct(mode)
        for path, mode in found.items()
        if mode != (0o700 if path.is_dir() else 0o600)
    }
    assert not wrong, f"not private: {wrong}"
    return found


def test_every_state_file_is_private_under_umask_022(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # as a user might have made it: fleet up makes it private
    with fleet_up(home, "--regions", "eu-west", umask=0o022) as fleet:
        url = fleet.url()
        key = (home / "demo.key").read_text().strip()
        answer = httpx.post(
            f"{url.split()[0]}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            verify=fleet.trust(),
        )
        assert answer.status_code == 200, answer.text
        serving = assert_private(home)
    stopped = assert_private(home)  # and after a clean stop
    names = {path.name for path in [*serving, *stopped]}
    expected = {
        "policy.db", "policy.db-wal", "policy.db-shm", "audit.db", "audit.db-wal",
        "audit.db.head", "content.db", "node.key", "node.pub", "admin.key", "demo.key",
        "appliance.log", "fleet", "eu-west-1",
        # The fleet CA and the router's certificates; the node's enrollment and certificate.
        "ca.key", "ca.pem", "fleet.id", "crl.pem", "registry.db", "router.pem", "public.pem",
        "node.toml", "node.pem", "policy.json",
    }  # fmt: skip
    assert expected <= names, sorted(expected - names)
    assert home / "fleet" / "eu-west-1" / "policy.db" in serving  # the appliance's own too


def test_private_helpers_correct_what_an_older_version_left(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = tmp_path / "state" / "deeper"
        state.mkdir(parents=True)
        (tmp_path / "state").chmod(0o755)
        database = state / "policy.db"
        for name in ("policy.db", "policy.db-wal", "policy.db-shm", "policy.db-journal"):
            (state / name).write_bytes(b"")
            (state / name).chmod(0o644)
        private_database(database)
        private_dir(tmp_path / "state")
        private_file(state / "new.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for path in state.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_secret_is_shown_only_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "demo.key"
    controller, terminal = os.openpty()
    try:
        with os.fdopen(terminal, "w", closefd=False) as tty:
            monkeypatch.setattr(sys, "stdout", tty)
            assert shown_secret("pal-sk-secret", path) == "pal-sk-secret"
    finally:
        os.close(controller)
        os.close(terminal)
    read, write = os.pipe()
    try:
        with os.fdopen(write, "w", closefd=False) as pipe:
            monkeypatch.setattr(sys, "stdout", pipe)
            assert shown_secret("pal-sk-secret", path) == f"$(cat {path})"
    finally:
        os.close(read)
        os.close(write)


def test_the_first_start_admin_key_is_printed_on_a_terminal(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "palisade", "router", "serve", "--port", "0", "--fleet-port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        cwd=REPO,
        env=os.environ | {"PALISADE_HOME": str(tmp_path), **FLEET_ENV},
    )
    os.close(terminal)
    seen = bytearray()
    key_file = tmp_path / "admin.key"

    def key_shown() -> bool:
        if select.select([controller], [], [], 0.1)[0]:
            seen.extend(os.read(controller, 4096))
        return key_file.is_file() and key_file.read_text().strip().encode() in seen

    try:
        wait_for(key_shown, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        os.close(controller)
    assert b"Its API key, shown only this once" in seen
