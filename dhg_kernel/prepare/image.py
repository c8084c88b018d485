"""The image phases of ``dhvm prepare``: the guest's root disk and kernel, built from Debian packages
and PyPI wheels on the host (no VM is involved until the snapshot step).

1. ``rootfs``   debootstrap (minbase, bookworm) of the guest OS into ``Layout.rootfs_tree``
2. ``wheels``   deephaven-server and its dependencies downloaded on the host (the chroot cannot
                verify TLS here), into ``Layout.wheels(<dh-version>)``
3. ``venv``     those wheels installed offline into ``/opt/dhg/venv`` inside the tree
4. ``guest``    the agent's package (``guest_files``) into ``/opt/dhg/lib``, the init (PID 1) into
                ``/opt/dhg``, and the agent's Java classes compiled against the tree's Deephaven jars
5. ``kernel``   the ELF vmlinux extracted from Debian's bzImage (PVH boot) and its initrd
6. ``image``    the ext4 root disk made from the tree with ``mkfs.ext4 -d`` (no mount)

A changed agent module only re-runs ``guest``, ``image`` and the snapshot.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from .. import guest_java
from ..config import DH_VERSION, Layout
from ..errors import JavaBuildError
from .runner import PhaseRunner, input_key, sha256_file

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PACKAGES = ("python3", "python3-venv", "libpython3.11", "openjdk-17-jre-headless", "iproute2",
                  "linux-image-cloud-amd64", "initramfs-tools", "ca-certificates")
GUEST_PYTHON = "3.11"
# What cells can use beyond Deephaven: IPython's display machinery and the plotting libraries
# (pinned; the same pins are the host's `local` extra, for the local backend — a test checks).
GUEST_WHEELS = ("ipython==9.18.1", "matplotlib==3.11.2", "plotly==6.9.0", "deephaven-plugin-plotly-express==0.21.0")
# pip download tries these tags for the guest (glibc 2.36): the newest a wheel offers wins.
WHEEL_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
                   "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64", "any")
# Commands run inside the guest tree get this environment, not the host's (PIP_*, PYTHON* must not leak in).
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
# Our files in the guest tree; guest/init names the same paths.
GUEST_HOME = "opt/dhg"


def guest_files() -> dict[str, Path]:
    """What goes into the image under /opt/dhg, by its path there: the agent's package under ``lib/``
    (laid out as on the host, so the agent runs as ``python -m dhg_kernel.guest.agent`` in both
    places) and the init."""
    from .. import protocol
    package = Path(protocol.__file__).resolve().parent
    guest = guest_java.guest_dir()
    files = {"init": guest / "init", "lib/dhg_kernel/__init__.py": package / "__init__.py",
             "lib/dhg_kernel/protocol.py": package / "protocol.py"}
    files.update({f"lib/dhg_kernel/guest/{p.name}": p for p in sorted(guest.glob("*.py"))})
    return files


def apt_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The Debian mirror the host's apt uses (deb822 or one-line format), else deb.debian.org."""
    candidates = [sources, Path("/etc/apt/sources.list")]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        for block in re.split(r"\n\s*\n", text):  # deb822 stanzas
            if re.search(r"^Suites:.*\bbookworm\b", block, re.M) and "security" not in block:
                m = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if m:
                    return m.group(1).rstrip("/")
        for line in text.splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line)
            if m and "security" not in m.group(1):
                return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------------------------------------
# Kernel


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the ELF vmlinux inside a bzImage (for PVH direct boot).

    The setup header's ``payload_offset``/``payload_length`` (at 0x248) locate the compressed
    kernel after the real-mode setup sectors; Debian compresses it with lz4 (legacy frame,
    followed by the 4-byte decompressed size that the lz4 tool does not expect).
    """
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise ValueError(f"{bzimage} is not a bzImage (no HdrS setup header)")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    if payload[:4] == b"\x02\x21\x4c\x18":  # lz4 legacy
        tool = shutil.which("lz4")
        if not tool:
            raise FileNotFoundError("the kernel is lz4-compressed and the lz4 tool is missing: apt-get install lz4")
        raw = subprocess.run([tool, "-dc"], input=payload[:-4], capture_output=True, check=True).stdout
    elif payload[:2] == b"\x1f\x8b":
        raw = gzip.decompress(payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(payload[:-4] if len(payload) > 4 else payload)
    elif payload[:4] == b"\x28\xb5\x2f\xfd":  # zstd
        raw = subprocess.run(["zstd", "-dc"], input=payload[:-4], capture_output=True, check=True).stdout
    else:
        raise ValueError(f"unknown kernel compression (payload starts {payload[:4].hex()})")
    if raw[:4] != b"\x7fELF":
        raise ValueError("the decompressed kernel is not an ELF file")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, out)


class ImageBuild:
    """The image phases of one prepare run (see the module docstring), in order."""

    def __init__(self, runner: PhaseRunner, dh_version: str = DH_VERSION):
        self.runner = runner
        self.layout: Layout = runner.layout
        self.dh_version = dh_version
        self.wheels_dir = self.layout.wheels(dh_version)

    def run_all(self) -> None:
        self.rootfs()
        self.wheels()
        self.venv()
        self.guest()
        self.kernel()
        self.image()

    # -- 1. rootfs ---------------------------------------------------------------------------------

    def rootfs(self) -> None:
        mirror = apt_mirror()
        key = input_key("rootfs", SUITE, mirror, GUEST_PACKAGES, "minbase")
        self.runner.inputs["mirror"] = mirror

        def build() -> None:
            tree = self.layout.rootfs_tree
            tmp = tree.with_name("base.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            include = ",".join(GUEST_PACKAGES)
            if self.runner.root:
                tool = shutil.which("debootstrap")
                if not tool:
                    raise self.runner.fail("rootfs", "debootstrap is not installed", "run: apt-get install debootstrap")
                cmd = [tool, "--variant=minbase", f"--include={include}", SUITE, str(tmp), mirror]
            else:
                tool = shutil.which("mmdebstrap")
                if not tool:
                    raise self.runner.fail("rootfs", "not root, and mmdebstrap (for an unprivileged build) is missing",
                                           "run as root, or: apt-get install mmdebstrap uidmap")
                cmd = [tool, "--mode=unshare", "--variant=minbase", f"--include={include}", SUITE, str(tmp), mirror]
            self.runner.run("rootfs", cmd, f"check network access to {mirror}, then run: dhvm prepare")
            # The image carries no package caches (read-only root; nothing will be installed in it).
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (tmp / sub).glob("*"):
                    if p.is_file() and p.name != "lock":
                        p.unlink()
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(tmp, tree)

        self.runner.phase("rootfs", key, (self.layout.rootfs_tree / "usr/bin/python3",), build)

    # -- 2. wheels ---------------------------------------------------------------------------------

    def wheels(self) -> None:
        reqs = [f"deephaven-server=={self.dh_version}", *GUEST_WHEELS]
        key = input_key("wheels", reqs, GUEST_PYTHON, WHEEL_PLATFORMS)
        manifest = self.wheels_dir / "manifest.json"

        def build() -> None:
            tmp = self.wheels_dir.with_name(self.wheels_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                   "--python-version", GUEST_PYTHON, "--implementation", "cp",
                   "--abi", f"cp{GUEST_PYTHON.replace('.', '')}", "-d", str(tmp)]
            for plat in WHEEL_PLATFORMS:
                cmd += ["--platform", plat]
            self.runner.run("wheels", cmd + reqs, "check that PyPI is reachable (pip download), then run: dhvm prepare")
            files = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.whl"))}
            (tmp / "manifest.json").write_text(json.dumps({"requirements": reqs, "wheels": files}, indent=2))
            shutil.rmtree(self.wheels_dir, ignore_errors=True)
            os.replace(tmp, self.wheels_dir)

        self.runner.phase("wheels", key, (manifest,), build)
        self.runner.inputs["wheels"] = json.loads(manifest.read_text())["wheels"]

    # -- 3. venv -----------------------------------------------------------------------------------

    def venv(self) -> None:
        key = input_key("venv", self.runner.keys["rootfs"], self.runner.inputs["wheels"])
        tree = self.layout.rootfs_tree

        def build() -> None:
            self.runner.need_root("venv")
            venv = tree / "opt/dhg/venv"
            shutil.rmtree(venv, ignore_errors=True)
            inbox = tree / "tmp/dhg-wheels"
            shutil.rmtree(inbox, ignore_errors=True)
            shutil.copytree(self.wheels_dir, inbox)
            try:
                self.runner.run("venv", ["chroot", str(tree), "/usr/bin/python3", "-m", "venv", "/opt/dhg/venv"],
                         "run: dhvm prepare --rebuild (the debootstrap tree may be damaged)", env=CHROOT_ENV)
                self.runner.run("venv", ["chroot", str(tree), "/opt/dhg/venv/bin/pip", "install", "--no-index",
                                  "--no-cache-dir", "--disable-pip-version-check", "--find-links", "/tmp/dhg-wheels",
                                  f"deephaven-server=={self.dh_version}", *GUEST_WHEELS],
                         "a wheel may be missing for the guest's Python; run: dhvm prepare --rebuild", env=CHROOT_ENV)
            finally:
                shutil.rmtree(inbox, ignore_errors=True)

        self.runner.phase("venv", key, (tree / "opt/dhg/venv/bin/python",), build)

    # -- 4. guest files ----------------------------------------------------------------------------

    def guest(self) -> None:
        sources = guest_files()
        sums = {name: sha256_file(p) for name, p in sources.items()}
        sums.update({f"java/{p.name}": sha256_file(p) for p in guest_java.source_files()})
        self.runner.inputs["guest"] = sums
        key = input_key("guest", self.runner.keys["venv"], sums)
        dest = self.layout.rootfs_tree / GUEST_HOME

        def build() -> None:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(dest / "lib", ignore_errors=True)
            for stale in ("agent.py", "rich.py", "protocol.py"):  # the flat layout of older versions
                (dest / stale).unlink(missing_ok=True)
            for name, src in sources.items():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest / name)
                os.chmod(dest / name, 0o755 if name == "init" else 0o644)
            # The agent's Java classes, compiled on the host against the image's own Deephaven jars.
            jars = next((dest / "venv/lib").glob("python3*/site-packages/deephaven_server/jars"), None)
            if jars is None:
                raise self.runner.fail("guest", "deephaven_server's jars are missing from the image's venv",
                                       "run: dhvm prepare --rebuild")
            try:
                guest_java.compile_classes(jars, dest / "classes")
            except JavaBuildError as e:
                raise self.runner.fail("guest", str(e), "install a JDK/JRE 17, then run: dhvm prepare") from None
            # Created here because the root is read-only in the VM (init overlays it onto /).
            for d in ("work", "run/ovl"):
                (self.layout.rootfs_tree / d).mkdir(parents=True, exist_ok=True)

        self.runner.phase("guest", key, (*(dest / n for n in sources), dest / "classes/dhg/TokenAuthHandler.class"),
                          build)

    # -- 5. kernel ---------------------------------------------------------------------------------

    def kernel(self) -> None:
        boot = self.layout.rootfs_tree / "boot"
        vmlinuz = _newest(boot.glob("vmlinuz-*"))
        initrd = _newest(boot.glob("initrd.img-*"))
        if vmlinuz is None or initrd is None:
            raise self.runner.fail("kernel", f"no vmlinuz/initrd.img under {boot}", "run: dhvm prepare --rebuild (linux-image-cloud-amd64 must be in the tree)")
        sums = {"vmlinuz": sha256_file(vmlinuz), "initrd": sha256_file(initrd), "release": vmlinuz.name[8:]}
        self.runner.inputs["kernel"] = sums
        key = input_key("kernel", sums)

        def build() -> None:
            self.layout.kernel.parent.mkdir(parents=True, exist_ok=True)
            extract_vmlinux(vmlinuz, self.layout.kernel)
            tmp = self.layout.initrd.with_suffix(".tmp")
            shutil.copyfile(initrd, tmp)
            os.replace(tmp, self.layout.initrd)
            self.runner.log(f"kernel {vmlinuz.name}: vmlinux {self.layout.kernel.stat().st_size} bytes")

        self.runner.phase("kernel", key, (self.layout.kernel, self.layout.initrd), build)

    # -- 6. image ----------------------------------------------------------------------------------

    def image(self) -> None:
        key = input_key("image", self.runner.keys["guest"], self.runner.keys["venv"], self.runner.keys["rootfs"])
        out = self.layout.rootfs_image(self.dh_version)

        def build() -> None:
            tree = self.layout.rootfs_tree
            used = _tree_bytes(tree)
            size_mb = int(used * 1.15 / 2**20) + 256  # room for ext4 metadata; the root stays read-only
            tmp = out.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            # No journal: the disk is only ever mounted read-only.
            self.runner.run("image", ["mkfs.ext4", "-q", "-F", "-L", "dhg-root", "-m", "0", "-O", "^has_journal",
                               "-E", "root_owner=0:0", "-d", str(tree), str(tmp), f"{size_mb}M"],
                     "mkfs.ext4 needs e2fsprogs ≥ 1.43 (for -d) and free disk space; then run: dhvm prepare")
            # A new inode: running VMs keep the old image open while new ones get this one.
            os.replace(tmp, out)
            self.runner.log(f"image {out}: {size_mb} MB, tree {used / 2**20:.0f} MB")

        self.runner.phase("image", key, (out,), build)


def _newest(paths) -> Path | None:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def _tree_bytes(tree: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(tree):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total
