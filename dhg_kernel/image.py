"""``dhvm prepare``: build the microVM image and the warm snapshot that every restore starts from.

Phases (each skipped when the checksum of its inputs is unchanged, so a second run takes seconds):

1. ``rootfs``   debootstrap (minbase, bookworm) of the guest OS, cached under ``vm/rootfs/base``
2. ``wheels``   deephaven-server and its dependencies downloaded on the host (the chroot cannot
                verify TLS here), cached under ``vm/rootfs/wheels/<dh-version>``
3. ``venv``     those wheels installed offline into ``/opt/dhg/venv`` inside the tree
4. ``guest``    agent.py, protocol.py and the init (PID 1) copied flat into ``/opt/dhg``
5. ``kernel``   the ELF vmlinux extracted from Debian's bzImage (PVH boot) and its initrd
6. ``image``    the ext4 root disk made from the tree with ``mkfs.ext4 -d`` (no mount)
7. ``snapshot`` a cold boot under QEMU until the agent answers ``hello`` (Deephaven started and
                warmed up), then pause, device-state migration and ``metadata.json``
   or, with ``backend="firecracker"``: the Firecracker binary (given, on PATH, or the pinned release
   downloaded and verified), the prerequisite checks (Linux, a working /dev/kvm), then ``fc-snapshot``:
   a cold boot through Firecracker's API, the same hello + warm-up over hybrid vsock, pause and a
   full snapshot under ``vm/firecracker/snapshots/<v>/``

A changed agent.py only re-runs ``guest``, ``image`` and ``snapshot``. Layout under ``DHG_HOME/vm``::

    kernel/{vmlinux,initrd.img}  rootfs/{base/,wheels/<v>/,rootfs-<v>.ext4}  snapshots/<v>/{mem,state,metadata.json}
    prepare-state.json (phase checksums)  prepare.log
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import lzma
import gzip
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import guest_java
from . import protocol as P
from .config import DH_VERSION, Layout
from .instances import destroy, new_instance, reap_stale
from .vm.base import file_stamp
from .vm.qemu import (DEFAULT_HEAP, DEFAULT_RAM_MB, TCG_CPU, TCG_JVM_OPTS, Machine, Snapshot, free_port,
                      qemu_binary, qemu_version)

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PACKAGES = ("python3", "python3-venv", "libpython3.11", "openjdk-17-jre-headless", "iproute2",
                  "linux-image-cloud-amd64", "initramfs-tools", "ca-certificates")
GUEST_PYTHON = "3.11"
# pip download tries these tags for the guest (glibc 2.36): the newest a wheel offers wins.
# What cells can use beyond Deephaven: IPython's display machinery and the plotting libraries
# (pinned; the same pins are the host's `local` extra, for the local backend — a test checks).
GUEST_WHEELS = ("ipython==9.18.1", "matplotlib==3.11.2", "plotly==6.9.0", "deephaven-plugin-plotly-express==0.21.0")
WHEEL_PLATFORMS = ("manylinux_2_36_x86_64", "manylinux_2_34_x86_64", "manylinux_2_28_x86_64",
                   "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64", "any")
# Cold boot under TCG takes ~2 min to a warm Deephaven; this bounds a hung one.
COLD_BOOT_TIMEOUT_S = 900.0
# Cells run in the cold-booted VM before the snapshot, so that what a first cell typically needs
# (formula compilation, filters, aggregations, joins, CSV, Arrow export) is loaded and JIT-compiled
# in the snapshot instead of after every restore. Each cleans up after itself.
WARMUP_CELLS = (
    'from deephaven import empty_table as _et\n'
    'warm = _et(1000).update(["A = i", "B = A * 2.5 + 1", "C = `k` + (A % 7)", "D = A % 2 == 0", "E = (long) A * 3"])'
    '.where(["B > 10", "D"])',
    'del warm\n'
    'from deephaven import agg as _agg\n'
    '_w = _et(500).update(["K = i % 10", "V = (double) i / 3"]).sum_by(["K"])\n'
    '_w = _et(200).update(["K = i % 5", "X = i * 1.5"]).agg_by([_agg.avg("AX = X"), _agg.count_("N")], by=["K"])\n'
    'del _w, _agg',
    '_a = _et(100).update(["K = i % 10", "P = i * 0.5"])\n'
    '_b = _et(10).update(["K = i", "Q = `q` + i"])\n'
    '_w = _a.natural_join(_b, on=["K"], joins=["Q"]).sort_descending(["P"]).head(20).update_view(["R = P * 2"])\n'
    'del _a, _b, _w',
    'import os as _os\n'
    'with open("/tmp/_warm.csv", "w") as _f:\n'
    '    _f.write("sym,px,qty\\nA,1.5,10\\nB,2.5,20\\n")\n'
    'from deephaven import read_csv as _rc\n'
    'warm = _rc("/tmp/_warm.csv").update(["N = px * qty"]).where("qty > 5")\n'
    '_os.remove("/tmp/_warm.csv")\n'
    'del _rc, _f',
    'del warm, _et, _os\nprint("warm")',
)
# A kernel prints its first console line within a second; silence this long means an early hang
# (seen about once in five TCG cold boots here), so the boot is retried.
SILENT_BOOT_S = 45.0
BOOT_ATTEMPTS = 3
# Commands run inside the guest tree get this environment, not the host's (PIP_*, PYTHON* must not leak in).
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
PHASES = ("rootfs", "wheels", "venv", "guest", "kernel", "image", "snapshot")

Progress = Callable[[str], None]


class PrepareError(Exception):
    """A prepare phase failed; the message names the phase, the log and what to do next."""

    def __init__(self, phase: str, why: str, log_path: Path, hint: str):
        self.phase = phase
        super().__init__(f"dhvm prepare failed in phase '{phase}': {why}\n  log: {log_path}\n  next: {hint}")


@dataclass(frozen=True)
class Artifacts:
    """Where prepare puts each artifact under ``DHG_HOME/vm`` (one copy of the layout)."""

    vm: Path
    dh_version: str

    @property
    def base(self) -> Path:
        return self.vm / "rootfs" / "base"

    @property
    def wheels(self) -> Path:
        return self.vm / "rootfs" / "wheels" / self.dh_version

    @property
    def rootfs_image(self) -> Path:
        return self.vm / "rootfs" / f"rootfs-{self.dh_version}.ext4"

    @property
    def kernel(self) -> Path:
        return self.vm / "kernel" / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.vm / "kernel" / "initrd.img"

    @property
    def snapshot(self) -> Path:
        return self.vm / "snapshots" / self.dh_version

    @property
    def state_file(self) -> Path:
        return self.vm / "prepare-state.json"

    def rel(self, p: Path) -> str:
        return str(p.relative_to(self.vm))


def guest_sources() -> dict[str, Path]:
    """The files copied into the image's /opt/dhg (flat), by their name there."""
    from .vm.local import agent_script

    agent = Path(agent_script()).resolve()
    return {"agent.py": agent, "rich.py": agent.parent / "rich.py", "protocol.py": Path(P.__file__).resolve(),
            "init": agent.parent / "init"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(*parts) -> str:
    """A checksum of a phase's inputs (anything JSON-serialisable)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


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


# ---------------------------------------------------------------------------------------------
# The pipeline


class _Prepare:
    """State of one prepare run: the log, the phase checksums, progress output."""

    def __init__(self, layout: Layout, dh_version: str, rebuild: bool, progress: Progress, log_path: Path,
                 ram_mb: int, heap: str, accel: str, jvm_opts: str | None = None):
        self.layout = layout
        self.art = Artifacts(layout.vm, dh_version)
        self.dh_version = dh_version
        self.rebuild = rebuild
        self.progress = progress
        self.log_path = log_path
        self.ram_mb = ram_mb
        self.heap = heap
        self.accel_wanted = accel
        self.jvm_opts = jvm_opts
        self.root = os.geteuid() == 0
        self.timings: dict[str, float] = {}
        self.keys: dict[str, str] = {}
        self.inputs: dict[str, object] = {}
        try:
            self.state = json.loads(self.art.state_file.read_text())
        except (OSError, ValueError):
            self.state = {}

    # -- helpers -----------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")

    def run(self, phase: str, cmd: list[str], hint: str, **kw) -> None:
        """Run a command with its output appended to the log; failure raises PrepareError."""
        self.log(f"$ {' '.join(cmd)}")
        with open(self.log_path, "ab") as fh:
            r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        if r.returncode:
            raise PrepareError(phase, f"`{' '.join(cmd[:3])} …` exited with status {r.returncode}", self.log_path, hint)

    def up_to_date(self, phase: str, key: str, *outputs: Path) -> bool:
        return (not self.rebuild and self.state.get(phase, {}).get("key") == key
                and all(p.exists() for p in outputs))

    def done(self, phase: str, key: str, seconds: float) -> None:
        self.state[phase] = {"key": key, "seconds": round(seconds, 1), "at": time.time()}
        tmp = self.art.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.art.state_file)

    def phase(self, name: str, key: str, outputs: tuple[Path, ...], build: Callable[[], None]) -> None:
        """Run ``build`` unless the phase's inputs are unchanged and its outputs exist."""
        self.keys[name] = key
        if self.up_to_date(name, key, *outputs):
            self.progress(f"{name:9s} up to date")
            self.timings[name] = 0.0
            return
        self.progress(f"{name:9s} building…")
        self.log(f"=== phase {name} (key {key})")
        t0 = time.monotonic()
        self.state.pop(name, None)  # a failed build must not look up to date next time
        try:
            build()
        except PrepareError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure names its phase
            self.log(f"phase {name} failed: {e!r}")
            raise PrepareError(name, f"{type(e).__name__}: {e}", self.log_path,
                               "fix the cause above, then run: dhvm prepare") from e
        secs = time.monotonic() - t0
        self.timings[name] = round(secs, 1)
        self.done(name, key, secs)
        self.progress(f"{name:9s} done in {secs:.1f}s")

    # -- 1. rootfs ---------------------------------------------------------------------------------

    def rootfs(self) -> None:
        mirror = apt_mirror()
        key = _key("rootfs", SUITE, mirror, GUEST_PACKAGES, "minbase")
        self.inputs["mirror"] = mirror

        def build() -> None:
            tree = self.art.base
            tmp = tree.with_name("base.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            include = ",".join(GUEST_PACKAGES)
            if self.root:
                tool = shutil.which("debootstrap")
                if not tool:
                    raise PrepareError("rootfs", "debootstrap is not installed", self.log_path,
                                       "run: apt-get install debootstrap")
                cmd = [tool, "--variant=minbase", f"--include={include}", SUITE, str(tmp), mirror]
            else:
                tool = shutil.which("mmdebstrap")
                if not tool:
                    raise PrepareError("rootfs", "not root, and mmdebstrap (for an unprivileged build) is missing",
                                       self.log_path, "run as root, or: apt-get install mmdebstrap uidmap")
                cmd = [tool, "--mode=unshare", "--variant=minbase", f"--include={include}", SUITE, str(tmp), mirror]
            self.run("rootfs", cmd, f"check network access to {mirror}, then run: dhvm prepare")
            # The image carries no package caches (read-only root; nothing will be installed in it).
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (tmp / sub).glob("*"):
                    if p.is_file() and p.name != "lock":
                        p.unlink()
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(tmp, tree)

        self.phase("rootfs", key, (self.art.base / "usr/bin/python3",), build)

    # -- 2. wheels ---------------------------------------------------------------------------------

    def wheels(self) -> None:
        reqs = [f"deephaven-server=={self.dh_version}", *GUEST_WHEELS]
        key = _key("wheels", reqs, GUEST_PYTHON, WHEEL_PLATFORMS)
        manifest = self.art.wheels / "manifest.json"

        def build() -> None:
            tmp = self.art.wheels.with_name(self.art.wheels.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                   "--python-version", GUEST_PYTHON, "--implementation", "cp",
                   "--abi", f"cp{GUEST_PYTHON.replace('.', '')}", "-d", str(tmp)]
            for plat in WHEEL_PLATFORMS:
                cmd += ["--platform", plat]
            self.run("wheels", cmd + reqs, "check that PyPI is reachable (pip download), then run: dhvm prepare")
            files = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.whl"))}
            (tmp / "manifest.json").write_text(json.dumps({"requirements": reqs, "wheels": files}, indent=2))
            shutil.rmtree(self.art.wheels, ignore_errors=True)
            os.replace(tmp, self.art.wheels)

        self.phase("wheels", key, (manifest,), build)
        self.inputs["wheels"] = json.loads(manifest.read_text())["wheels"]

    # -- 3. venv -----------------------------------------------------------------------------------

    def venv(self) -> None:
        key = _key("venv", self.keys["rootfs"], self.inputs["wheels"])
        tree = self.art.base

        def build() -> None:
            self._need_root("venv")
            venv = tree / "opt/dhg/venv"
            shutil.rmtree(venv, ignore_errors=True)
            inbox = tree / "tmp/dhg-wheels"
            shutil.rmtree(inbox, ignore_errors=True)
            shutil.copytree(self.art.wheels, inbox)
            try:
                self.run("venv", ["chroot", str(tree), "/usr/bin/python3", "-m", "venv", "/opt/dhg/venv"],
                         "run: dhvm prepare --rebuild (the debootstrap tree may be damaged)", env=CHROOT_ENV)
                self.run("venv", ["chroot", str(tree), "/opt/dhg/venv/bin/pip", "install", "--no-index",
                                  "--no-cache-dir", "--disable-pip-version-check", "--find-links", "/tmp/dhg-wheels",
                                  f"deephaven-server=={self.dh_version}", *GUEST_WHEELS],
                         "a wheel may be missing for the guest's Python; run: dhvm prepare --rebuild", env=CHROOT_ENV)
            finally:
                shutil.rmtree(inbox, ignore_errors=True)

        self.phase("venv", key, (tree / "opt/dhg/venv/bin/python",), build)

    # -- 4. guest files ----------------------------------------------------------------------------

    def guest(self) -> None:
        sources = guest_sources()
        sums = {name: sha256_file(p) for name, p in sources.items()}
        sums.update({f"java/{p.name}": sha256_file(p) for p in guest_java.source_files()})
        self.inputs["guest"] = sums
        key = _key("guest", self.keys["venv"], sums)
        dest = self.art.base / "opt/dhg"

        def build() -> None:
            dest.mkdir(parents=True, exist_ok=True)
            for name, src in sources.items():
                shutil.copyfile(src, dest / name)
                os.chmod(dest / name, 0o755 if name == "init" else 0o644)
            # The agent's Java classes, compiled on the host against the image's own Deephaven jars.
            jars = next((self.art.base / "opt/dhg/venv/lib").glob("python3*/site-packages/deephaven_server/jars"), None)
            if jars is None:
                raise PrepareError("guest", "deephaven_server's jars are missing from the image's venv", self.log_path,
                                   "run: dhvm prepare --rebuild")
            try:
                guest_java.compile_classes(jars, dest / "classes")
            except guest_java.JavaBuildError as e:
                raise PrepareError("guest", str(e), self.log_path, "install a JDK/JRE 17, then run: dhvm prepare") from None
            # Created here because the root is read-only in the VM (init overlays it onto /).
            for d in ("work", "run/ovl"):
                (self.art.base / d).mkdir(parents=True, exist_ok=True)

        self.phase("guest", key, (*(dest / n for n in sources), dest / "classes/dhg/TokenAuthHandler.class"), build)

    # -- 5. kernel ---------------------------------------------------------------------------------

    def kernel(self) -> None:
        boot = self.art.base / "boot"
        vmlinuz = _newest(boot.glob("vmlinuz-*"))
        initrd = _newest(boot.glob("initrd.img-*"))
        if vmlinuz is None or initrd is None:
            raise PrepareError("kernel", f"no vmlinuz/initrd.img under {boot}", self.log_path,
                               "run: dhvm prepare --rebuild (linux-image-cloud-amd64 must be in the tree)")
        sums = {"vmlinuz": sha256_file(vmlinuz), "initrd": sha256_file(initrd), "release": vmlinuz.name[8:]}
        self.inputs["kernel"] = sums
        key = _key("kernel", sums)

        def build() -> None:
            self.art.kernel.parent.mkdir(parents=True, exist_ok=True)
            extract_vmlinux(vmlinuz, self.art.kernel)
            tmp = self.art.initrd.with_suffix(".tmp")
            shutil.copyfile(initrd, tmp)
            os.replace(tmp, self.art.initrd)
            self.log(f"kernel {vmlinuz.name}: vmlinux {self.art.kernel.stat().st_size} bytes")

        self.phase("kernel", key, (self.art.kernel, self.art.initrd), build)

    # -- 6. image ----------------------------------------------------------------------------------

    def image(self) -> None:
        key = _key("image", self.keys["guest"], self.keys["venv"], self.keys["rootfs"])
        out = self.art.rootfs_image

        def build() -> None:
            tree = self.art.base
            used = _tree_bytes(tree)
            size_mb = int(used * 1.15 / 2**20) + 256  # room for ext4 metadata; the root stays read-only
            tmp = out.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            # No journal: the disk is only ever mounted read-only.
            self.run("image", ["mkfs.ext4", "-q", "-F", "-L", "dhg-root", "-m", "0", "-O", "^has_journal",
                               "-E", "root_owner=0:0", "-d", str(tree), str(tmp), f"{size_mb}M"],
                     "mkfs.ext4 needs e2fsprogs ≥ 1.43 (for -d) and free disk space; then run: dhvm prepare")
            # A new inode: running VMs keep the old image open while new ones get this one.
            os.replace(tmp, out)
            self.log(f"image {out}: {size_mb} MB, tree {used / 2**20:.0f} MB")

        self.phase("image", key, (out,), build)

    # -- 7. snapshot -------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot | None:
        qemu = qemu_binary()
        if not qemu:
            raise PrepareError("snapshot", "qemu-system-x86_64 is not installed", self.log_path,
                               "run: apt-get install qemu-system-x86")
        version = qemu_version(qemu)
        accel = self.choose_accel(qemu)
        machine = Machine(kernel=self.art.rel(self.art.kernel), initrd=self.art.rel(self.art.initrd),
                          rootfs=self.art.rel(self.art.rootfs_image), ram_mb=self.ram_mb, heap=self.heap,
                          accel=accel, cpu=TCG_CPU if accel == "tcg" else "host",
                          append=Machine.kernel_cmdline(self.heap, self.jvm_opts if self.jvm_opts is not None
                                                        else TCG_JVM_OPTS if accel == "tcg" else ""))
        key = _key("snapshot", self.keys["image"], self.keys["kernel"], version, machine.__dict__, WARMUP_CELLS)
        snap_dir = self.art.snapshot
        result: list[Snapshot] = []

        def build() -> None:
            for attempt in range(1, BOOT_ATTEMPTS + 1):
                try:
                    result.append(self._cold_boot_and_snapshot(qemu, version, machine, key))
                    return
                except PrepareError as e:
                    if not isinstance(e.__cause__, _SilentBoot) or attempt == BOOT_ATTEMPTS:
                        raise
                    self.progress(f"snapshot  the guest hung before its first console line; retrying ({attempt})")

        self.phase("snapshot", key, (snap_dir / Snapshot.METADATA, snap_dir / "mem", snap_dir / "state"), build)
        return result[0] if result else Snapshot.load(snap_dir)

    def choose_accel(self, qemu: str) -> str:
        """``auto``: KVM only if a probe boot under KVM reaches user space; here it does not."""
        if self.accel_wanted in ("tcg", "kvm"):
            return self.accel_wanted
        cache = accel_probe_path(self.layout)
        probe_key = _key(qemu_version(qemu), self.inputs.get("kernel"))
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == probe_key:
                return cached["accel"]
        except (OSError, ValueError, KeyError):
            pass
        accel = "kvm" if probe_kvm(qemu, self.art.kernel, self.log) else "tcg"
        cache.write_text(json.dumps({"key": probe_key, "accel": accel}))
        self.progress(f"accel     {accel} (KVM probe boot {'succeeded' if accel == 'kvm' else 'failed or unavailable'})")
        return accel

    def _cold_boot_and_snapshot(self, qemu: str, version: str, machine: Machine, key: str) -> Snapshot:
        """Boot from scratch with RAM in a shared file, wait for the agent, pause, save device state."""
        final = self.art.snapshot
        work = final.with_name(final.name + ".new")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, mode=0o700)
        # The cold-boot VM is an instance like any other, so a killed prepare leaves no QEMU behind.
        rec = new_instance(self.layout, "qemu-prepare")
        run_dir = Path(rec.dir)
        snap = Snapshot(work, machine)
        argv = machine.argv(self.layout.vm, qemu, snap.mem, shared=True, host_port=free_port(), incoming=False)
        self.log("$ " + " ".join(argv))
        t0 = time.monotonic()
        with open(run_dir / "qemu.log", "wb") as qlog:
            proc = subprocess.Popen(argv, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=0o077)
        rec.add_process(proc.pid, "qemu")
        console = run_dir / "agent.log"
        kept_console = self.log_path.with_name("cold-boot-console.log")
        hint = f"see the guest console {kept_console}; then run: dhvm prepare"
        try:
            from .qmp import QMPClient

            qmp = QMPClient.connect(run_dir / "qmp.sock", timeout=30, is_alive=lambda: proc.poll() is None)
            sock = _connect_retry(run_dir / "agent.sock", 30, proc)
            stream = P.FrameStream(sock)
            hello = self._wait_hello(stream, proc, console, t0)
            boot_s = time.monotonic() - t0
            self.progress(f"snapshot  agent ready after a {boot_s:.0f}s cold boot (Deephaven {hello.get('deephaven_version')})")
            warm = self._warm_up(stream, proc)
            # Keep the stream open across the snapshot: the restored agent then sits in a read on a
            # connected port, and the clone's first frame reaches it without a reconnect.
            t1 = time.monotonic()
            qmp.execute("stop")
            qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
            qmp.execute("migrate", {"uri": f"exec:cat > {_shq(snap.state)}"})
            mig = qmp.migrate_wait(timeout=300)
            save_s = time.monotonic() - t1
            try:
                qmp.execute("quit")
            except (OSError, EOFError):
                pass
            proc.wait(timeout=30)
            sock.close()
        except Exception as e:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            why = (f"cold boot or snapshot failed: {type(e).__name__}: {e}\n--- guest console (last lines) ---\n"
                   f"{_tail(console)}\n--- qemu.log ---\n{_tail(run_dir / 'qemu.log')}")
            if console.exists():
                shutil.copyfile(console, kept_console)
            destroy(rec)
            if isinstance(e, PrepareError):
                raise
            raise PrepareError("snapshot", why, self.log_path, hint) from (e if isinstance(e, _SilentBoot) else None)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with open(snap.mem, "rb+") as fh:
            os.fsync(fh.fileno())  # the memory image must be on disk before it is declared done
        shutil.move(str(console), work / "cold-boot-console.log")
        destroy(rec)
        vm = self.layout.vm
        snap.meta = {
            "backend": "qemu", "dh_version": self.dh_version, "accel": machine.accel, "qemu_version": version,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "key": key, "phase_keys": dict(self.keys), "inputs": self.inputs,
            "files": {machine.kernel: file_stamp(vm / machine.kernel), machine.rootfs: file_stamp(vm / machine.rootfs),
                      **({machine.initrd: file_stamp(vm / machine.initrd)} if machine.initrd else {})},
            "sizes": {"mem_bytes": snap.mem.stat().st_size, "mem_allocated_bytes": snap.mem.stat().st_blocks * 512,
                      "state_bytes": snap.state.stat().st_size,
                      "rootfs_bytes": (vm / machine.rootfs).stat().st_size,
                      "rootfs_allocated_bytes": (vm / machine.rootfs).stat().st_blocks * 512},
            "warm_up": warm,
            "timings": {"cold_boot_s": round(boot_s, 1), "snapshot_s": round(save_s, 2),
                        "migration_bytes": (mig.get("ram") or {}).get("transferred")},
            "agent": {k: hello.get(k) for k in ("agent_version", "deephaven_version", "python", "server", "startup_ms")},
            "guest_port": 10000,
        }
        snap.save()
        # Swap the finished snapshot in; clones of the old one keep its (unlinked) mem file mapped.
        old = final.with_name(final.name + f".old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
        snap.dir = final
        self.progress(f"snapshot  memory {snap.meta['sizes']['mem_allocated_bytes'] / 2**20:.0f} MB used of "
                      f"{machine.ram_mb} MB, device state {snap.meta['sizes']['state_bytes'] / 1024:.0f} KB, "
                      f"saved in {save_s:.2f}s")
        return snap

    def _wait_hello(self, stream: P.FrameStream, proc: subprocess.Popen, console: Path, t0: float) -> dict:
        stream.send({"op": P.OP_HELLO, "id": 1, "version": P.PROTOCOL_VERSION})
        last_note = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with status {proc.returncode} during the cold boot")
            if time.monotonic() - t0 > COLD_BOOT_TIMEOUT_S:
                raise TimeoutError(f"the agent did not answer within {COLD_BOOT_TIMEOUT_S:.0f}s")
            if time.monotonic() - t0 > SILENT_BOOT_S and not (console.exists() and console.stat().st_size):
                raise _SilentBoot(f"no guest console output after {SILENT_BOOT_S:.0f}s")
            try:
                frame = stream.recv(timeout=2.0)
            except socket.timeout:
                if time.monotonic() - last_note > 20:
                    last_note = time.monotonic()
                    self.progress(f"snapshot  cold boot {time.monotonic() - t0:.0f}s: {_last_line(console)}")
                continue
            h = frame.header
            if h.get("ev") == P.EV_DONE and h.get("re") == 1:
                if h.get("version") != P.PROTOCOL_VERSION:
                    raise RuntimeError(f"the guest agent speaks protocol {h.get('version')}, the host {P.PROTOCOL_VERSION}")
                return h

    def _warm_up(self, stream: P.FrameStream, proc: subprocess.Popen) -> list[dict]:
        """Run WARMUP_CELLS in the agent; a failing one is logged, not fatal (the VM still works)."""
        out = []
        t0 = time.monotonic()
        for i, code in enumerate(WARMUP_CELLS):
            rid = 100 + i
            stream.send({"op": P.OP_EXEC, "id": rid, "code": code, "options": {"max_rows": 10}})
            status, error, t1 = "?", None, time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"QEMU exited with status {proc.returncode} during the warm-up")
                try:
                    h = stream.recv(timeout=600).header
                except socket.timeout:
                    raise TimeoutError(f"warm-up cell {i} did not finish within 600s") from None
                if h.get("re") != rid:
                    continue
                if h.get("ev") == P.EV_ERROR:
                    error = f"{h.get('name')}: {h.get('value')}"
                if h.get("ev") == P.EV_DONE:
                    status = h.get("status")
                    break
            secs = round(time.monotonic() - t1, 1)
            out.append({"cell": i, "status": status, "seconds": secs, **({"error": error} if error else {})})
            self.log(f"warm-up cell {i}: {status} in {secs}s{' ' + error if error else ''}")
        self.progress(f"snapshot  warm-up cells: {len(WARMUP_CELLS)} in {time.monotonic() - t0:.0f}s "
                      f"({sum(c['status'] != 'ok' for c in out)} failed)")
        return out

    # -- 7'. the Firecracker snapshot -------------------------------------------------------------

    def firecracker_snapshot(self, binary: str | None, jailer: str | None, network: bool, fc_version: str):
        """Obtain the binary, check the host, then cold-boot and snapshot through Firecracker's API."""
        from .vm import firecracker as fcm
        from .vm import netns
        from .vm.fc_release import FirecrackerMissing, obtain

        checks = fcm.host_checks(self.layout)
        try:
            fc = obtain(self.layout, binary, fc_version, jailer)
            checks.append(fcm.Check("firecracker", True, f"Firecracker {'.'.join(map(str, fc.version))} at {fc.path}"))
            self.progress(f"firecracker {fc.path} (v{'.'.join(map(str, fc.version))}, {fc.source})")
        except FirecrackerMissing as e:
            fc = None
            checks.append(fcm.Check("firecracker", False, str(e)))
        qemu = qemu_binary()
        if fc is not None and all(c.ok for c in checks) and qemu and not any(c.name == "kvm_boots_guest" for c in checks):
            # A QEMU probe boot under KVM tells a usable KVM from one that cannot run a guest (as here).
            self.accel_wanted = "auto"
            accel = self.choose_accel(qemu)
            checks.append(fcm.Check("kvm_boots_guest", accel == "kvm", f"a probe boot under KVM "
                                    f"{'reached' if accel == 'kvm' else 'did not reach'} the guest kernel",
                                    "use a host with working (nested) KVM, or: dhvm prepare --backend qemu"))
        if network:
            reason = netns.why_not()
            checks.append(fcm.Check("network", reason is None, reason or "ok"))
        for c in checks:
            self.log(f"check {c.name}: {'ok' if c.ok else 'FAILED'}: {c}")
        failed = [c for c in checks if not c.ok]
        if failed:
            first = failed[0]
            raise PrepareError("fc-snapshot", f"the image is built ({self.art.rootfs_image}, {self.art.kernel}), but "
                               "the Firecracker snapshot needs Linux + a working /dev/kvm + firecracker, and the check "
                               f"'{first.name}' failed: {first.detail}" +
                               "".join(f"\n  also failed: {c.name}: {c.detail}" for c in failed[1:]),
                               self.log_path, first.fix or "fix the failed check, then run: dhvm prepare --backend firecracker")
        assert fc is not None
        jvm = self.jvm_opts or ""  # KVM: the JIT needs no TCG workaround
        machine = fcm.FcMachine(kernel=self.art.rel(self.art.kernel), initrd=self.art.rel(self.art.initrd),
                                rootfs=self.art.rel(self.art.rootfs_image), ram_mb=self.ram_mb, heap=self.heap,
                                boot_args=fcm.FcMachine.kernel_cmdline(self.heap, jvm, network), network=network)
        version = ".".join(map(str, fc.version))
        key = _key("fc-snapshot", self.keys["image"], self.keys["kernel"], version, machine.__dict__, WARMUP_CELLS,
                   str(fc.jailer) if jailer else None)
        final = fcm.snapshot_dir(self.layout, self.dh_version)
        result: list = []

        def build() -> None:
            result.append(self._fc_cold_boot_and_snapshot(fcm, fc, machine, key, final, jailer=bool(jailer)))

        self.phase("fc-snapshot", key, (final / fcm.FcSnapshot.METADATA, final / fcm.MEM_NAME), build)
        return result[0] if result else fcm.FcSnapshot.load_from(final, self.layout.vm)

    def _fc_cold_boot_and_snapshot(self, fcm, fc, machine, key: str, final: Path, jailer: bool = False):
        work = final.with_name(final.name + ".new")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, mode=0o700)
        # The cold boot runs unjailed (prepare is root anyway); the snapshot's relative paths restore in a chroot too.
        vm = fcm.ColdBoot(self.layout, fcm.Launch(fc), machine, self.log)
        kept_console = self.log_path.with_name("cold-boot-console.log")
        t0 = time.monotonic()
        try:
            vm.boot()
            sock = vm.connect_agent(COLD_BOOT_TIMEOUT_S)
            stream = P.FrameStream(sock)
            hello = self._wait_hello(stream, vm.proc, vm.console, t0)
            boot_s = time.monotonic() - t0
            self.progress(f"fc-snapshot agent ready after a {boot_s:.0f}s cold boot (Deephaven {hello.get('deephaven_version')})")
            warm = self._warm_up(stream, vm.proc)
            # A snapshot resets every vsock connection; closing ours first leaves the agent in accept().
            sock.close()
            time.sleep(0.2)
            vmstate, mem, save_s = vm.snapshot(work)
        except Exception as e:
            why = (f"cold boot or snapshot failed: {type(e).__name__}: {e}\n--- guest console (last lines) ---\n"
                   f"{_tail(vm.console)}\n--- firecracker.log ---\n{_tail(vm.root / fcm.FC_LOG)}")
            if vm.console.exists():
                shutil.copyfile(vm.console, kept_console)
            vm.destroy()
            raise PrepareError("fc-snapshot", why, self.log_path,
                               f"see the guest console {kept_console}; then run: dhvm prepare --backend firecracker") from None
        shutil.move(str(vm.console), work / "cold-boot-console.log")
        vm.destroy()
        meta = fcm.new_snapshot_meta(
            fc, machine, self.layout.vm, dh_version=self.dh_version, key=key, phase_keys=dict(self.keys),
            inputs=self.inputs, warm_up=warm, guest_port=fcm.GUEST_DH_PORT,
            jailer=str(fc.jailer) if jailer and fc.jailer else None,
            timings={"cold_boot_s": round(boot_s, 1), "snapshot_s": round(save_s, 2)},
            sizes={"mem_bytes": mem.stat().st_size, "mem_allocated_bytes": mem.stat().st_blocks * 512,
                   "vmstate_bytes": vmstate.stat().st_size},
            agent={k: hello.get(k) for k in ("agent_version", "deephaven_version", "python", "server", "startup_ms")})
        fcm.FcSnapshot(vmstate, mem, {fcm.ROOT_DRIVE_ID: self.layout.vm / machine.rootfs}, meta).save_to(work)
        # Swap the finished snapshot in; clones of the old one keep its (unlinked) mem file mapped.
        old = final.with_name(final.name + f".old-{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(work, final)
        shutil.rmtree(old, ignore_errors=True)
        self.progress(f"fc-snapshot memory {meta['sizes']['mem_allocated_bytes'] / 2**20:.0f} MB used of "
                      f"{machine.ram_mb} MB, saved in {save_s:.2f}s")
        return fcm.FcSnapshot.load_from(final, self.layout.vm)

    def _need_root(self, phase: str) -> None:
        if not self.root:
            raise PrepareError(phase, "installing into the guest tree uses chroot, which needs root", self.log_path,
                               "run as root: sudo dhvm prepare (an unprivileged build is not supported yet)")


def accel_probe_path(layout: Layout) -> Path:
    """Where prepare caches whether a probe boot under KVM works on this host (``{"accel": "kvm"|"tcg"}``)."""
    return layout.vm / "accel-probe.json"


class _SilentBoot(Exception):
    """The cold-boot guest printed nothing: it hung before the kernel got going."""


def probe_kvm(qemu: str, kernel: Path, log: Callable[[str], None], timeout: float = 20.0) -> bool:
    """Boot the guest kernel under KVM with no root disk: success is reaching the VFS mount panic."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log("kvm probe: /dev/kvm is not accessible")
        return False
    cmd = [qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-machine", "microvm,acpi=on",
           "-accel", "kvm", "-cpu", "host", "-m", "256M", "-kernel", str(kernel),
           "-append", "console=ttyS0 panic=-1", "-serial", "stdio"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    ok = "VFS: Unable to mount root" in out or "Kernel panic - not syncing: VFS" in out
    log(f"kvm probe: {'ok' if ok else 'failed'}; last output: {out.strip().splitlines()[-3:] if out.strip() else '(none)'}")
    return ok


def _connect_retry(path: Path, timeout: float, proc: subprocess.Popen) -> socket.socket:
    from .vm.base import connect_unix

    return connect_unix(path, timeout, lambda: proc.poll() is None)


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


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def _last_line(path: Path) -> str:
    lines = [ln for ln in _tail(path, 5).splitlines() if ln.strip()]
    return lines[-1][:100] if lines else "(no console output yet)"


def _shq(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def _print_progress(msg: str) -> None:
    print(f"[dhvm prepare] {msg}", file=sys.stderr, flush=True)


def prepare(layout: Layout, backend: str = "qemu", dh_version: str = DH_VERSION, rebuild: bool = False,
            progress: Progress | None = None, log_path: str | os.PathLike | None = None,
            ram_mb: int = DEFAULT_RAM_MB, heap: str = DEFAULT_HEAP, accel: str = "auto",
            jvm_opts: str | None = None, firecracker: str | None = None, jailer: str | None = None,
            network: bool = False, fc_version: str | None = None):
    """Build (or bring up to date) the image and snapshot for ``backend``; returns the snapshot.

    ``backend="firecracker"`` builds the same image, then obtains Firecracker (``firecracker``: a
    path; else PATH; else the pinned release ``fc_version``, downloaded and verified) and, where the
    host can run it, snapshots through its API (``network``: with a TAP device, off by default).

    Every phase reports its name and elapsed time through ``progress`` and logs to ``log_path``
    (default ``DHG_HOME/vm/prepare.log``); a failure raises PrepareError naming the phase.
    ``ram_mb``/``heap`` size the guest and its JVM; ``jvm_opts`` are extra JVM flags (space-separated;
    None: ``-XX:TieredStopAtLevel=1`` under TCG, nothing under KVM).
    """
    if backend not in ("qemu", "firecracker"):
        raise ValueError(f"prepare builds images for the qemu and firecracker backends only (not {backend!r})")
    layout.vm.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path else layout.vm / "prepare.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    say = progress or _print_progress
    t0 = time.monotonic()

    def timed(msg: str) -> None:
        say(f"[{time.monotonic() - t0:6.1f}s] {msg}")

    reap_stale(layout)  # VMs (including cold boots) left behind by killed owners
    # One prepare at a time per DHG_HOME: a second one waits, then finds everything up to date.
    with open(layout.vm / "prepare.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            timed(f"another prepare is running on {layout.vm}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        p = _Prepare(layout, dh_version, rebuild, timed, log, ram_mb, heap, accel, jvm_opts)
        p.log(f"=== prepare dh={dh_version} backend={backend} rebuild={rebuild} ram={ram_mb}M heap={heap}")
        p.rootfs()
        p.wheels()
        p.venv()
        p.guest()
        p.kernel()
        p.image()
        if backend == "firecracker":
            from .vm.fc_api import DEFAULT_VERSION

            snap = p.firecracker_snapshot(firecracker, jailer, network, fc_version or DEFAULT_VERSION)
        else:
            snap = p.snapshot()
    timed(f"ready: {snap.dir} (log: {log})")
    return snap


def main(argv: list[str] | None = None) -> None:
    """``python -m dhg_kernel.image``: the same as ``dhvm prepare``."""
    from .cli import main as cli_main

    sys.exit(cli_main(["prepare", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
