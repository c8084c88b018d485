"""Hosts for the cluster tests, made on this machine: one network namespace per "host".

Each host is a namespace the test creates, joined to this one by a veth pair (10.203.N.1 here,
10.203.N.2 there) and running its own ``sshd`` bound to its own address: key-only, a host key of its
own, and ``SetEnv DHG_HOME=…`` so each host has a DHG_HOME of its own (the prepared QEMU snapshot
shared read-only through symlinks). The client side gets a HOME of its own with the key and a
known_hosts that lists exactly these hosts, so paramiko (the provisioner's SSH) checks host keys
as it would anywhere. Only addresses inside these namespaces, and this side of their veth pairs,
are ever contacted. Everything is removed by ``close``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
SUBNET = "10.203"


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "the cluster hosts need root (network namespaces, sshd)"
    for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("ip")):
        if not tool or not os.path.exists(tool):
            return f"missing {tool or 'ssh-keygen/ip'}: apt-get install openssh-server iproute2"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@dataclass
class Host:
    index: int
    netns: str
    dir: Path
    home: Path  # the host's DHG_HOME
    proc: subprocess.Popen | None = None

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @property
    def gateway_ip(self) -> str:
        return f"{SUBNET}.{self.index}.1"

    @property
    def veth(self) -> str:
        return f"dhgh{os.getpid() % 10000}x{self.index}"

    def start_sshd(self) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.netns, SSHD, "-D", "-e", "-f",
                                      str(self.dir / "sshd_config")], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "sshd.log", "ab"), start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = subprocess.run(["ip", "netns", "exec", self.netns, "ss", "-ltnH", f"src {self.ip}:22"],
                               capture_output=True, text=True)
            if r.stdout.strip():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"sshd of host {self.ip} did not start: {(self.dir / 'sshd.log').read_text()[-500:]}")

    def stop_sshd(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


@dataclass
class Cluster:
    root: Path
    hosts: list[Host] = field(default_factory=list)

    @property
    def client_home(self) -> Path:
        """The HOME the provisioner runs with: its ~/.ssh holds the key and known_hosts."""
        return self.root / "client"

    def close(self) -> None:
        for h in self.hosts:
            h.stop_sshd()
            subprocess.run(["ip", "link", "del", h.veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)


def share_vm(src_home: Path, dest_home: Path) -> None:
    """A DHG_HOME whose vm/ links every prepared artifact of ``src_home`` (read only, shared) but has a
    run directory of its own, so each host's VMs and records stay on that host."""
    vm = dest_home / "vm"
    vm.mkdir(parents=True)
    for entry in (src_home / "vm").iterdir():
        if entry.name in ("run", "prepare.lock", "prepare.log"):
            continue
        os.symlink(entry, vm / entry.name)


def make(root: Path, count: int, src_home: Path | None, prepared: list[bool] | None = None) -> Cluster:
    """``count`` hosts under ``root``; host i gets the prepared artifacts of ``src_home`` when
    ``prepared[i]`` (default: all), else an empty DHG_HOME (an unprepared host)."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    cluster = Cluster(root)
    ssh = cluster.client_home / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id_ed25519"))
    (root / "authorized_keys").write_text((ssh / "id_ed25519.pub").read_text())
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    known = []
    try:
        for i in range(1, count + 1):
            netns = f"dhgh-{os.getpid()}-{i}"
            hdir = root / f"host{i}"
            hdir.mkdir()
            host = Host(i, netns, hdir, hdir / "dhg")
            cluster.hosts.append(host)
            if prepared is None or prepared[i - 1]:
                assert src_home is not None
                share_vm(src_home, host.home)
            else:
                host.home.mkdir()
            _run("ip", "netns", "add", netns)
            _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _run("ip", "addr", "add", f"{host.gateway_ip}/24", "dev", host.veth)
            _run("ip", "link", "set", host.veth, "up")
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{host.ip}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"], ["ip", "route", "add", "default", "via", host.gateway_ip]):
                _run("ip", "netns", "exec", netns, *cmd)
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hdir / "hostkey"))
            (hdir / "sshd_config").write_text(
                f"ListenAddress {host.ip}\nPort 22\nHostKey {hdir / 'hostkey'}\nPidFile {hdir / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "X11Forwarding no\nAllowTcpForwarding no\nLogLevel ERROR\n"
                f"SetEnv DHG_HOME={host.home} DHG_TEST_HOST=host{i}\n")
            known.append(f"{host.ip} {(hdir / 'hostkey.pub').read_text().split(' ', 2)[0]} "
                         f"{(hdir / 'hostkey.pub').read_text().split(' ', 2)[1]}")
            host.start_sshd()
        (ssh / "known_hosts").write_text("\n".join(known) + "\n")
    except BaseException:
        cluster.close()
        raise
    return cluster
