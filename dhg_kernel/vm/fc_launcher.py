"""Starting Firecracker processes: the ``Launcher`` (plain, or under the jailer in a chroot of its own),
the jailer's cleanup hook, and the checks that the binary and the guest kernel are usable here."""


import glob
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Layout
from ..errors import BackendUnavailable
from ..instances import InstanceRecord
from . import netns
from .fc_api import FirecrackerAPI, FirecrackerAPIError
from .fc_release import FirecrackerBinary
from .host import Check
from .fc_calls import API_SOCK, CONSOLE_LOG, FC_LOG



def kernel_check(layout: Layout) -> Check:
    kernel = layout.kernel
    try:
        ok = kernel.read_bytes()[:4] == b"\x7fELF" if kernel.stat().st_size else False
    except OSError:
        ok = False
    return Check("kernel", ok, f"ELF vmlinux at {kernel}" if ok else f"no ELF vmlinux at {kernel}",
                 "run: dhvm prepare --backend firecracker")


def api_check(fc: FirecrackerBinary, timeout: float = 5.0) -> Check:
    """Start the binary with its API socket in a private temporary directory, ask ``GET /`` and stop
    it: proves the binary runs on this host (its libc, seccomp filters, the socket), with no VM made.
    The process dies with its parent (PR_SET_PDEATHSIG), so even a killed caller leaves none behind."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dhg-fc-check-"))
    proc: subprocess.Popen | None = None
    api: FirecrackerAPI | None = None
    t0 = time.perf_counter()
    try:
        with open(d / "out.log", "wb") as out:
            proc = subprocess.Popen([str(fc.path), "--api-sock", API_SOCK, "--id", "dhg-check"], cwd=d,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        api = FirecrackerAPI(d / API_SOCK, fc.version)
        api.wait_ready(timeout, is_alive=lambda: proc is not None and proc.poll() is None)
        info = api.request("GET", "/", None) or {}
        return Check("firecracker_api", True, f"it started and answered on its API socket in "
                                              f"{(time.perf_counter() - t0) * 1000:.0f} ms (vmm_version "
                                              f"{info.get('vmm_version')}, state {info.get('state')!r})")
    except (FirecrackerAPIError, OSError) as e:
        said = (d / "out.log").read_text(errors="replace").strip().splitlines()[-1:] if (d / "out.log").exists() else []
        return Check("firecracker_api", False, f"{fc.path} did not serve its API here: "
                     f"{getattr(e, 'fault', e)}" + (f" (it said: {said[0][:200]})" if said else ""),
                     f"run it by hand to see why: {fc.path} --api-sock /tmp/fc-test.sock")
    finally:
        if api is not None:
            api.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child, between fork and exec: SIGKILL when the parent dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)



@dataclass
class Launcher:
    """How to start one Firecracker process for an instance (plain, or under the jailer)."""

    fc: FirecrackerBinary
    jailer: Path | None = None
    uid: int = 0
    gid: int = 0

    def root(self, rec: InstanceRecord) -> Path:
        """The instance root: the run dir, or the jailer's chroot inside it."""
        if self.jailer is None:
            return Path(rec.dir)
        return Path(rec.dir) / "jail" / self.fc.path.name / rec.id / "root"

    def argv(self, rec: InstanceRecord, plan: netns.NetPlan | None) -> list[str]:
        if self.jailer is None:
            return [str(self.fc.path), "--api-sock", API_SOCK, "--id", rec.id]
        argv = [str(self.jailer), "--id", rec.id, "--exec-file", str(self.fc.path), "--uid", str(self.uid),
                "--gid", str(self.gid), "--chroot-base-dir", str(Path(rec.dir) / "jail"),
                "--cgroup-version", "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "1"]
        if plan is not None:
            argv += ["--netns", plan.netns_path]
        return argv + ["--", "--api-sock", "/" + API_SOCK]

    def cleanup_items(self, rec: InstanceRecord) -> list[dict]:
        """The jailer makes a cgroup per instance, outside the run dir: recorded for destroy()."""
        if self.jailer is None:
            return []
        name = self.fc.path.name
        # cgroup v2 (one tree), then v1 (a tree per controller).
        dirs = [f"/sys/fs/cgroup/{name}/{rec.id}"] + [f"{d}/{rec.id}" for d in sorted(glob.glob(f"/sys/fs/cgroup/*/{name}"))]
        return [{"kind": "jailer", "id": rec.id, "cgroup_dirs": dirs}]

    def populate(self, root: Path, files: dict[str, Path]) -> None:
        """Put the artifacts in the root under their recorded names: symlinks in a run dir, hard
        links in a chroot (a symlink would point outside it), each readable by the jail's user."""
        root.mkdir(parents=True, exist_ok=True)
        for name, target in files.items():
            dst = root / name
            if self.jailer is None:
                os.symlink(target, dst)
            else:
                self.grant_read(target)
                try:
                    os.link(target, dst)
                except OSError as e:
                    raise BackendUnavailable(f"cannot hard-link {target} into the jailer chroot {root} ({e}); "
                                             "DHG_HOME/vm must be on one filesystem") from None
        (root / FC_LOG).touch(mode=0o600)  # older Firecrackers open the log file without creating it
        if self.jailer is not None:
            os.chown(root / FC_LOG, self.uid, self.gid)

    def grant_read(self, target: Path) -> None:
        """Let the jailed Firecracker (``uid``:``gid``, often not the files' owner) read a file it must
        open: the file gets the jail's group, read-only (g+r), and nothing else changes. A hard link is
        the same inode, so this is done on the original, once."""
        st = target.stat()
        if self.uid in (0, st.st_uid) or (st.st_gid == self.gid and st.st_mode & 0o040):
            return
        try:
            os.chown(target, -1, self.gid)
            os.chmod(target, (st.st_mode & 0o7777) | 0o040)
        except OSError as e:
            raise BackendUnavailable(f"the jailer runs Firecracker as uid {self.uid}, gid {self.gid}, which cannot read "
                                     f"{target}, and its group could not be set ({e}); run as root, or give the "
                                     "jail a group that can read DHG_HOME/vm") from None

    def spawn(self, rec: InstanceRecord, plan: netns.NetPlan | None) -> subprocess.Popen:
        root = self.root(rec)
        enter = None
        if plan is not None and self.jailer is None:
            name = plan.netns
            enter = lambda: netns.enter(name)  # noqa: E731 - runs between fork and exec
        with open(Path(rec.dir) / CONSOLE_LOG, "ab") as console:
            # The guest's serial console is Firecracker's stdout: the instance log, as with QEMU.
            proc = subprocess.Popen(self.argv(rec, plan), cwd=root if self.jailer is None else rec.dir,
                                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    start_new_session=True, umask=0o077, preexec_fn=enter)
        rec.add_process(proc.pid, "firecracker")
        return proc


def cleanup(item: dict) -> None:
    """``instances.destroy`` hook: remove the jailer's per-instance cgroups (empty once it is dead)."""
    for d in item.get("cgroup_dirs", []):
        # Only a directory named after this instance, under the cgroup tree, is ever removed.
        if d.startswith("/sys/fs/cgroup/") and Path(d).name == item.get("id") and os.path.isdir(d):
            try:
                os.rmdir(d)
            except OSError:
                pass

