"""The Firecracker binary: given by hand, found on PATH, or downloaded from a pinned official release.

A download fetches ``firecracker-vX.Y.Z-x86_64.tgz`` and its published ``….tgz.sha256.txt`` from
the GitHub releases (or ``$DHG_FIRECRACKER_RELEASES``), refuses the tarball unless its SHA-256
matches, and unpacks only the firecracker binary, the jailer and the release's own
``firecracker_spec-vX.Y.Z.yaml`` into ``DHG_HOME/vm/firecracker/vX.Y.Z/``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..config import Layout
from ..errors import FirecrackerMissing
from .fc_api import DEFAULT_VERSION, MIN_VERSION, Version, parse_version, spec_beside, version_str

RELEASES_ENV = "DHG_FIRECRACKER_RELEASES"
DEFAULT_RELEASES = "https://github.com/firecracker-microvm/firecracker/releases/download"
ARCH = "x86_64"
DOWNLOAD_TIMEOUT_S = 60.0
# A release tarball is ~ 10 MB; anything far bigger is not one.
MAX_TARBALL_BYTES = 512 * 2**20
# The binaries' names in a release directory.
BINARY = "firecracker"


@dataclass(frozen=True)
class FirecrackerBinary:
    """A Firecracker binary we may run, with what we know about it."""

    path: Path
    version: Version
    jailer: Path | None = None
    spec: Path | None = None
    source: str = "path"  # "explicit", "path", "download"

    def describe(self) -> dict:
        return {"firecracker": str(self.path), "firecracker_version": version_str(self.version),
                "jailer": str(self.jailer) if self.jailer else None,
                "spec": str(self.spec) if self.spec else None, "source": self.source}


def tag(version: str) -> str:
    return version if version.startswith("v") else f"v{version}"


def release_urls(version: str = DEFAULT_VERSION, base: str | None = None) -> tuple[str, str]:
    """(tarball URL, checksum URL) of the official x86_64 release ``version``."""
    base = (base or os.environ.get(RELEASES_ENV) or DEFAULT_RELEASES).rstrip("/")
    t = tag(version)
    tarball = f"{base}/{t}/firecracker-{t}-{ARCH}.tgz"
    return tarball, tarball + ".sha256.txt"


def binary_version(path: str | os.PathLike) -> Version:
    """Ask the binary itself (``firecracker --version``: ``Firecracker v1.16.1``)."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10)
    except OSError as e:
        raise FirecrackerMissing(f"cannot run {path}: {e}") from None
    text = (out.stdout or "") + (out.stderr or "")
    m = re.search(r"Firecracker v?(\d+\.\d+\.\d+)", text)
    if out.returncode or not m:
        raise FirecrackerMissing(f"{path} --version did not print a Firecracker version: {text.strip()[:200]!r}")
    return parse_version(m.group(1))


def manual_steps(version: str = DEFAULT_VERSION) -> str:
    """What to do by hand when the download cannot happen here."""
    tarball, sums = release_urls(version)
    t = tag(version)
    return (f"on a machine with internet access, download {tarball} and {sums}, check it with "
            f"`sha256sum -c {Path(sums).name}`, unpack it (tar xzf), copy release-{t}-{ARCH}/ here and run: "
            f"dhvm prepare --backend firecracker --firecracker /path/to/release-{t}-{ARCH}/firecracker-{t}-{ARCH} "
            "(or put a `firecracker` binary on PATH)")


def _opener(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never via a proxy
    return urllib.request.build_opener()


def _fetch(url: str, limit: int, version: str) -> bytes:
    try:
        with _opener(url).open(url, timeout=DOWNLOAD_TIMEOUT_S) as r:
            data = r.read(limit + 1)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FirecrackerMissing(f"could not download {url} ({reason}).\n  To install Firecracker by hand: "
                                 f"{manual_steps(version)}") from None
    if len(data) > limit:
        raise FirecrackerMissing(f"{url} is larger than {limit} bytes; not a Firecracker release")
    return data


def download(layout: Layout, version: str = DEFAULT_VERSION, base: str | None = None) -> FirecrackerBinary:
    """Download, verify and unpack the official release into ``DHG_HOME/vm/firecracker/vX.Y.Z``."""
    t = tag(version)
    tarball_url, sums_url = release_urls(version, base)
    sums = _fetch(sums_url, 4096, version).decode(errors="replace")
    m = re.search(r"\b([0-9a-fA-F]{64})\b", sums)
    if not m:
        raise FirecrackerMissing(f"{sums_url} holds no SHA-256 checksum, so the download cannot be verified.\n"
                                 f"  To install Firecracker by hand: {manual_steps(version)}")
    expected = m.group(1).lower()
    data = _fetch(tarball_url, MAX_TARBALL_BYTES, version)
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise FirecrackerMissing(f"checksum mismatch for {tarball_url}: sha256 {actual}, but {sums_url} says "
                                 f"{expected}; refusing to use it.\n  To install Firecracker by hand: "
                                 f"{manual_steps(version)}")
    dest = layout.firecracker_release(t)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted = {f"firecracker-{t}-{ARCH}": "firecracker", f"jailer-{t}-{ARCH}": "jailer",
              f"firecracker_spec-{t}.yaml": f"firecracker_spec-{t}.yaml"}
    got: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                # Only the named regular files are taken, each written flat: no path in the tarball is trusted.
                if member.isfile() and name in wanted and wanted[name] not in got:
                    src = tar.extractfile(member)
                    assert src is not None
                    out = tmp / wanted[name]
                    out.write_bytes(src.read())
                    out.chmod(0o755 if not name.endswith(".yaml") else 0o644)
                    got.add(wanted[name])
    except tarfile.TarError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FirecrackerMissing(f"{tarball_url} is not a readable tarball ({e})") from None
    if "firecracker" not in got:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FirecrackerMissing(f"{tarball_url} holds no firecracker-{t}-{ARCH} binary")
    (tmp / "SOURCE").write_text(f"{tarball_url}\nsha256 {actual}\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return FirecrackerBinary(dest / BINARY, parse_version(version), _opt(dest / "jailer"),
                             _opt(dest / f"firecracker_spec-{t}.yaml"), "download")


def _opt(p: Path) -> Path | None:
    return p if p.exists() else None


def cached(layout: Layout, version: str = DEFAULT_VERSION) -> FirecrackerBinary | None:
    """A release downloaded earlier (verified then) for ``version``."""
    d = layout.firecracker_release(tag(version))
    if (d / BINARY).is_file() and (d / "SOURCE").is_file():
        return FirecrackerBinary(d / BINARY, parse_version(version), _opt(d / "jailer"),
                                 _opt(d / f"firecracker_spec-{tag(version)}.yaml"), "download")
    return None


def from_path(path: str | os.PathLike, source: str = "explicit", jailer: str | os.PathLike | None = None) -> FirecrackerBinary:
    """A binary the user named (or PATH found): checked to run and to be new enough."""
    p = Path(path).expanduser()
    if not p.is_file() or not os.access(p, os.X_OK):
        raise FirecrackerMissing(f"{p} is not an executable file — give the firecracker binary with --firecracker PATH")
    version = binary_version(p)
    if version[:2] < MIN_VERSION:
        raise FirecrackerMissing(f"{p} is Firecracker {version_str(version)}; this backend needs ≥ "
                                 f"{version_str(MIN_VERSION + (0,))} (ACPI device discovery) — run: dhvm prepare "
                                 f"--backend firecracker (downloads v{DEFAULT_VERSION})")
    j = Path(jailer).expanduser() if jailer else None
    if j is None:
        beside = p.parent / ("jailer" if p.name == "firecracker" else p.name.replace("firecracker", "jailer"))
        j = beside if beside.is_file() and beside != p else None
    return FirecrackerBinary(p.resolve(), version, j, spec_beside(p), source)


def obtain(layout: Layout, explicit: str | os.PathLike | None = None, version: str = DEFAULT_VERSION,
           jailer: str | os.PathLike | None = None, allow_download: bool = True) -> FirecrackerBinary:
    """``--firecracker PATH``, else ``firecracker`` on PATH, else the pinned release (cached or downloaded)."""
    if explicit:
        return from_path(explicit, "explicit", jailer)
    on_path = shutil.which("firecracker")
    if on_path:
        return from_path(on_path, "path", jailer or shutil.which("jailer"))
    have = cached(layout, version)
    if have is None:
        if not allow_download:
            raise FirecrackerMissing(f"no firecracker binary (not on PATH, not downloaded under "
                                     f"{layout.firecracker}) — run: dhvm prepare --backend firecracker, or "
                                     f"{manual_steps(version)}")
        have = download(layout, version)
    if jailer:
        have = FirecrackerBinary(have.path, have.version, Path(jailer), have.spec, have.source)
    return have
