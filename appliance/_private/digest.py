"""What a model is, as bytes: the SHA-256 of its file, or of its directory's manifest.

A directory (a Hugging Face folder, a TensorRT-LLM engine) is digested as the SHA-256 of
its manifest: one line `"<relative path>\\0<sha256 of the file>\\n"` per file, sorted by
path, so the digest names the whole tree and nothing about where it sits.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from federation import file_sha256

# (path, device, inode, size, mtime_ns) → digest: a reload of an unchanged multi-gigabyte
# file does not read it again; any rewrite changes the mtime or the inode.
_Key = tuple[str, int, int, int, int]
_known: dict[_Key, str] = {}
_known_lock = threading.Lock()


def model_digest(path: Path) -> str:
    """SHA-256 (hex) of a model file or of a directory's manifest."""
    if path.is_dir():
        return _manifest_digest(path)
    return _cached_file_digest(path)


def _manifest_digest(directory: Path) -> str:
    files = sorted(
        (item.relative_to(directory).as_posix(), item)
        for item in directory.rglob("*")
        if item.is_file()
    )
    manifest = "".join(f"{name}\0{_cached_file_digest(item)}\n" for name, item in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def _cached_file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _known_lock:
        known = _known.get(key)
    if known is not None:
        return known
    digest = file_sha256(path)
    with _known_lock:
        _known[key] = digest
    return digest


def default_version(sha256: str) -> str:
    """The version a model without a configured one is shown with."""
    return sha256[:12]
