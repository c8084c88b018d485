"""Optional guest networking for Firecracker VMs: a TAP inside a per-instance network namespace.

Every clone of one snapshot has the same guest IP and the same TAP name baked into its device
state, so each instance gets a network namespace of its own, where that TAP (``TAP_NAME``,
``TAP_HOST_IP`` ↔ ``GUEST_IP``) can exist once per instance. A veth pair joins the namespace to
its parent (normally the host's own namespace), with a /30 per instance out of ``VETH_POOL``.
Guest traffic is masqueraded twice: to the veth address inside the namespace, and to the host's
address in the parent (nftables, one table per instance). Links, addresses and namespaces are made
with pyroute2; the NAT rules with ``nft`` (pyroute2 has no masquerade expression builder).

What must be removed is recorded (``NetPlan.cleanup_item``) in the instance's ``instance.json``
info, so ``instances.destroy`` — also from the stale-instance reaper after a crash — undoes it.
Nothing here touches a namespace other than the parent and the instance's own.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import NetworkSetupError

TAP_NAME = "dhg-tap0"
TAP_HOST_IP = "172.16.0.1"
GUEST_IP = "172.16.0.2"
TAP_PREFIX = 30
GUEST_MAC = "06:00:ac:10:00:02"
# One /30 per instance for its veth pair: host end .1, namespace end .2.
VETH_POOL = ipaddress.ip_network("10.200.0.0/16")
NETNS_RUN_DIR = "/run/netns"
NETNS_PREFIX = "dhg-"
CLEANUP_KIND = "netns"
_CLONE_NEWNET = 0x40000000


@dataclass
class NetPlan:
    """The names and addresses of one instance's network plumbing."""

    netns: str
    veth_host: str
    veth_ns: str
    slot: int
    parent_netns: str | None = None  # None: the host's own namespace
    tap: str = TAP_NAME

    @classmethod
    def for_instance(cls, instance_id: str, slot: int, parent_netns: str | None = None) -> "NetPlan":
        short = instance_id.rsplit("-", 1)[-1][:10]  # interface names are at most 15 bytes
        return cls(f"{NETNS_PREFIX}{instance_id}", f"dhgh{short}", f"dhgn{short}", slot, parent_netns)

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network((int(VETH_POOL.network_address) + 4 * self.slot, 30))

    @property
    def host_ip(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def ns_ip(self) -> str:
        return str(self.subnet.network_address + 2)

    @property
    def nft_table(self) -> str:
        return f"dhg_{self.veth_host}"

    def cleanup_item(self) -> dict:
        """What ``instances.destroy`` needs to undo this plan (stored in instance.json)."""
        return {"kind": CLEANUP_KIND, **asdict(self)}

    @property
    def netns_path(self) -> str:
        return f"{NETNS_RUN_DIR}/{self.netns}"


def why_not() -> str | None:
    """None when guest networking can be set up here, else why and what fixes it."""
    if sys.platform != "linux":
        return "guest networking needs Linux network namespaces"
    if os.geteuid() != 0:
        return "guest networking creates network namespaces and TAP devices, which needs root (CAP_NET_ADMIN)"
    import importlib.util

    if importlib.util.find_spec("pyroute2") is None:
        return "pyroute2 is missing — run: pip install pyroute2"
    if shutil.which("nft") is None:
        return "the nft command (for NAT) is missing — run: apt-get install nftables"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (modprobe tun)"
    return None


def enter(netns: str) -> None:
    """setns(2) the calling process into ``netns`` (used between fork and exec)."""
    fd = os.open(f"{NETNS_RUN_DIR}/{netns}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
    finally:
        os.close(fd)


def _run_in(netns: str | None, argv: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                       preexec_fn=(lambda: enter(netns)) if netns else None)
    if check and r.returncode:
        raise NetworkSetupError(f"`{' '.join(argv)}` failed in netns {netns or '(host)'}: {r.stderr.strip()}")
    return r


def _ipr(netns: str | None):
    from pyroute2 import IPRoute, NetNS

    return NetNS(netns, flags=0) if netns else IPRoute()


def _enable_forwarding(netns: str | None) -> None:
    _run_in(netns, [sys.executable, "-c", "open('/proc/sys/net/ipv4/ip_forward','w').write('1')"])


def _used_slots(parent: str | None) -> set[int]:
    used = set()
    with _ipr(parent) as ipr:
        for a in ipr.get_addr(family=2):
            ip = ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
            if ip in VETH_POOL:
                used.add((int(ip) - int(VETH_POOL.network_address)) // 4)
    return used


def setup(instance_id: str, lock_dir: Path, parent_netns: str | None = None) -> NetPlan:
    """Create the namespace, veth pair, TAP and NAT for one instance. On failure, what was made is removed."""
    reason = why_not()
    if reason:
        raise NetworkSetupError(reason)
    from pyroute2 import netns as pnetns

    lock_dir.mkdir(parents=True, exist_ok=True)
    # Slot choice and creation under one lock: concurrent starts must not pick the same /30.
    with open(lock_dir / "netns.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = _used_slots(parent_netns)
        slot = next(i for i in range(VETH_POOL.num_addresses // 4) if i not in used and i > 0)
        plan = NetPlan.for_instance(instance_id, slot, parent_netns)
        try:
            _create(plan, pnetns)
        except Exception as e:
            teardown(plan)
            if isinstance(e, NetworkSetupError):
                raise
            raise NetworkSetupError(f"could not set up guest networking for {instance_id}: {e}") from e
    return plan


def _create(plan: NetPlan, pnetns) -> None:
    pnetns.create(plan.netns)
    with _ipr(plan.parent_netns) as host:
        host.link("add", ifname=plan.veth_host, kind="veth", peer={"ifname": plan.veth_ns, "net_ns_fd": plan.netns})
        idx = host.link_lookup(ifname=plan.veth_host)[0]
        host.addr("add", index=idx, address=plan.host_ip, prefixlen=30)
        host.link("set", index=idx, state="up")
    with _ipr(plan.netns) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        vidx = ns.link_lookup(ifname=plan.veth_ns)[0]
        ns.addr("add", index=vidx, address=plan.ns_ip, prefixlen=30)
        ns.link("set", index=vidx, state="up")
        ns.route("add", dst="0.0.0.0/0", gateway=plan.host_ip)
        ns.link("add", ifname=plan.tap, kind="tuntap", mode="tap")
        tidx = ns.link_lookup(ifname=plan.tap)[0]
        ns.addr("add", index=tidx, address=TAP_HOST_IP, prefixlen=TAP_PREFIX)
        ns.link("set", index=tidx, state="up")
    tap_net = f"{TAP_HOST_IP}/{TAP_PREFIX}"
    _enable_forwarding(plan.netns)
    _run_in(plan.netns, ["nft", "-f", "-"], stdin=(
        "table ip dhg {\n"
        " chain nat_out { type nat hook postrouting priority 100; "
        f"ip saddr {ipaddress.ip_network(tap_net, strict=False)} oifname \"{plan.veth_ns}\" masquerade; }}\n"
        "}\n"))
    # Parent side: masquerade the instance's /30 out of whatever interface routes it onward.
    _enable_forwarding(plan.parent_netns)
    _run_in(plan.parent_netns, ["nft", "-f", "-"], stdin=(
        f"table ip {plan.nft_table} {{\n"
        f" chain nat_out {{ type nat hook postrouting priority 100; ip saddr {plan.subnet} "
        f"oifname != \"{plan.veth_host}\" masquerade; }}\n"
        f" chain allow {{ type filter hook forward priority 0; iifname \"{plan.veth_host}\" accept; "
        f"oifname \"{plan.veth_host}\" ct state established,related accept; }}\n"
        "}\n"))


def teardown(plan: NetPlan | dict) -> None:
    """Remove an instance's NAT table, veth pair and namespace (with its TAP). Idempotent."""
    if isinstance(plan, dict):
        plan = NetPlan(**{k: v for k, v in plan.items() if k != "kind"})
    parent_ok = plan.parent_netns is None or os.path.exists(f"{NETNS_RUN_DIR}/{plan.parent_netns}")
    if parent_ok and shutil.which("nft"):
        _run_in(plan.parent_netns, ["nft", "delete", "table", "ip", plan.nft_table], check=False)
    if parent_ok:
        try:
            with _ipr(plan.parent_netns) as host:
                found = host.link_lookup(ifname=plan.veth_host)
                if found:
                    host.link("del", index=found[0])  # takes its peer in the namespace with it
        except Exception:  # noqa: BLE001 - teardown goes on; the namespace removal below still runs
            pass
    if os.path.exists(plan.netns_path):
        from pyroute2 import netns as pnetns

        try:
            pnetns.remove(plan.netns)  # the TAP and the veth end inside go with the namespace
        except OSError:
            pass


def cleanup(item: dict) -> None:
    """``instances.destroy`` hook: undo a recorded ``NetPlan``."""
    teardown(item)


def exists(plan: NetPlan) -> dict[str, bool]:
    """Which parts of ``plan`` exist now (for status and tests)."""
    out = {"netns": os.path.exists(plan.netns_path), "veth": False, "tap": False, "nat": False}
    parent_ok = plan.parent_netns is None or os.path.exists(f"{NETNS_RUN_DIR}/{plan.parent_netns}")
    if parent_ok:
        with _ipr(plan.parent_netns) as host:
            out["veth"] = bool(host.link_lookup(ifname=plan.veth_host))
        if shutil.which("nft"):
            r = _run_in(plan.parent_netns, ["nft", "list", "table", "ip", plan.nft_table], check=False)
            out["nat"] = r.returncode == 0
    if out["netns"]:
        with _ipr(plan.netns) as ns:
            out["tap"] = bool(ns.link_lookup(ifname=plan.tap))
    return out
