"""Make the image's wheelhouse: Palisade's wheel plus its installed runtime deps.

`python -m images.os.wheelhouse OUT [PREBUILT]` writes `OUT/*.whl` for Palisade and every
distribution its requirements pull in, at the versions installed in the running
interpreter's environment (the tested ones). Each dependency's wheel is taken from PREBUILT
or pip's cache, else re-packed from its installed files (its RECORD): nothing is
downloaded. `pip install --no-index --find-links OUT palisade` then
installs the same versions in the guest (Debian bookworm's Python 3.11, the same ABI).
"""

from __future__ import annotations

import base64
import hashlib
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIP_CACHE = Path.home() / ".cache" / "pip" / "wheels"
PACKAGES = ("palisade", "appliance", "federation", "router", "images", "provisioning", "compliance")
SKIPPED_METADATA = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


def runtime_closure(requirements: list[str]) -> list[metadata.Distribution]:
    """The installed distributions `requirements` need, transitively (markers applied)."""
    seen: dict[str, metadata.Distribution] = {}
    pending = [(each.name, frozenset(each.extras)) for each in map(Requirement, requirements)]
    while pending:
        name, extras = pending.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key in seen and not extras:
            continue
        seen[key] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in extras or {""}
            ):
                pending.append((requirement.name, frozenset(requirement.extras)))
    return [dist for _, dist in sorted(seen.items())]


def wheel_name(dist: metadata.Distribution) -> str:
    info = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Tag:")]
    parts = [tag.split("-") for tag in tags or ["py3-none-any"]]
    # A compressed tag set (PEP 425): py2-none-any + py3-none-any → py2.py3-none-any.
    compressed = "-".join(".".join(dict.fromkeys(part[i] for part in parts)) for i in range(3))
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    return f"{name}-{dist.version}-{compressed}.whl"


def record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def repack(dist: metadata.Distribution, out: Path) -> Path:
    """A wheel of `dist` from its installed files (scripts are remade by pip at install)."""
    target = out / wheel_name(dist)
    site = Path(str(dist.locate_file("")))
    records: list[str] = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for entry in sorted(dist.files or [], key=str):
            arcname = entry.as_posix()
            if arcname.startswith("..") or "__pycache__" in arcname:
                continue
            if ".dist-info/" in arcname and arcname.rsplit("/", 1)[1] in SKIPPED_METADATA:
                continue
            data = (site / entry).read_bytes()
            wheel.writestr(arcname, data)
            records.append(record_line(arcname, data))
        dist_info = next(e.as_posix() for e in dist.files or [] if e.name == "METADATA")
        record = dist_info.rsplit("/", 1)[0] + "/RECORD"
        wheel.writestr(record, "\n".join([*records, f"{record},,"]) + "\n")
    return target


def found_wheel(dist: metadata.Distribution, places: list[Path]) -> Path | None:
    """A ready wheel of `dist` in the first of `places` that has one."""
    name = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    for place in places:
        found = sorted(place.rglob(f"{name}-{dist.version}-*.whl"))
        if found:
            return found[0]
    return None


def palisade_wheel(out: Path) -> Path:
    """Palisade's own wheel, straight from the source tree and pyproject.toml.

    (No setuptools build: the venv's setuptools has no bdist_wheel, and its file scan walks
    var/, which holds the image build's root tree.)
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dist_info = f"palisade-{project['version']}.dist-info"
    meta = [f"Metadata-Version: 2.1\nName: palisade\nVersion: {project['version']}"]
    meta += [f"Requires-Dist: {dep}" for dep in project["dependencies"]]
    scripts = "".join(f"{k} = {v}\n" for k, v in project["scripts"].items())
    generated = {
        f"{dist_info}/METADATA": "\n".join(meta) + "\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: palisade-wheelhouse\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist_info}/entry_points.txt": f"[console_scripts]\n{scripts}",
    }
    target = out / f"palisade-{project['version']}-py3-none-any.whl"
    records: list[str] = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for package in PACKAGES:
            for path in sorted((ROOT / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    arcname = path.relative_to(ROOT).as_posix()
                    data = path.read_bytes()
                    wheel.writestr(arcname, data)
                    records.append(record_line(arcname, data))
        for arcname, text in generated.items():
            wheel.writestr(arcname, text)
            records.append(record_line(arcname, text.encode()))
        wheel.writestr(f"{dist_info}/RECORD", "\n".join([*records, f"{dist_info}/RECORD,,"]) + "\n")
    return target


def build(out: Path, prebuilt: Path | None = None) -> list[Path]:
    """The wheelhouse in `out`; wheels in `prebuilt` win (llama-cpp-python built for the
    guest's CPU: the one in pip's cache may use this host's AVX-512, which QEMU lacks)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    palisade_wheel(out)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dist in runtime_closure(project["dependencies"]):
        cached = found_wheel(dist, [*([prebuilt] if prebuilt else []), PIP_CACHE])
        if cached is not None:
            (out / cached.name).write_bytes(cached.read_bytes())
        else:
            repack(dist, out)
    return sorted(out.glob("*.whl"))


if __name__ == "__main__":
    for wheel in build(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None):
        print(wheel.name)  # noqa: T201 - the script's output
