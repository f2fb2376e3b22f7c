"""State only its owner may read: directories 0700, files 0600, whatever the umask.

State files hold tenant emails, usage, audit metadata and secrets. A file is made private
before anything is written to it; SQLite gives a database's `-wal`, `-shm` and `-journal`
files the mode of the database itself, and `private_database` also corrects files left by
an older version.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_JOURNALS = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> Path:
    """`path` as a directory only its owner may enter; the parents it has to make are too.

    A directory someone else owns (say, /tmp) is left as it is: it is not ours to change.
    """
    missing = [each for each in (path, *path.parents) if not each.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=DIR_MODE, exist_ok=True)
        directory.chmod(DIR_MODE)
    if path.stat().st_uid == os.getuid():
        path.chmod(DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """`path` as a file only its owner may read, created empty if missing, in a private
    directory."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    path.chmod(FILE_MODE)
    return path


def write_private(path: Path, data: str | bytes) -> None:
    """Write `data` to `path`, which is made private before the data lands."""
    private_file(path)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


def replace_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` (0600) so that a crash leaves the old file or the new one,
    whole: a private temporary file, synced, renamed over `path`, the directory synced."""
    temporary = path.with_name(path.name + ".tmp")
    write_private(temporary, data)
    with temporary.open("rb+") as file:
        os.fsync(file.fileno())
    temporary.replace(path)
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """Make a rename or a new file in the directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in chunks (model files and bundles are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def private_database(path: Path) -> Path:
    """Make a SQLite database (before it is opened) and its journals private."""
    private_file(path)
    for suffix in _JOURNALS:
        journal = path.with_name(path.name + suffix)
        if journal.exists():
            journal.chmod(FILE_MODE)
    return path


def shown_secret(secret: str, path: Path) -> str:
    """What to print for a secret kept in `path`: the secret on a terminal; elsewhere (a
    service manager's journal, a log file) a shell expression that reads the file."""
    if sys.stdout.isatty():
        return secret
    return f"$(cat {shlex.quote(str(path))})"
