"""The provisioner of the cluster kernel: gateway-provisioners' ``DistributedProvisioner`` with the
checks and messages that ``cluster`` describes (entry point ``dhvm-distributed-provisioner``)."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from typing import Any

from gateway_provisioners.distributed import DistributedProvisioner
from traitlets import Unicode

from .cluster import DOWN_FOR_S, HOST_ENV, REFUSED


class DhvmDistributedProvisioner(DistributedProvisioner):
    """``DistributedProvisioner`` with the checks and messages described in ``dhg_kernel.cluster``."""

    down_until: dict[str, float] = {}

    default_transport_encryption = Unicode(
        "auto", config=True,
        help="The transport encryption used when the launch does not say and the kernel manager keeps its "
             "default ('disabled'): 'auto' (CurveZMQ where jupyter_client can) or 'required' or 'disabled'. Set it "
             "in the kernelspec's kernel_provisioner config.")

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):
        self._dhvm_cwd = kwargs.get("cwd") or os.getcwd()
        try:
            return await super().launch_kernel(cmd, **kwargs)
        except BaseException:
            # Started but never reported back (a launch timeout): end it on its host, or it runs on unowned.
            if self.pid and self.pid > 0:
                await self._on_host(f"kill -9 {int(self.pid)} 2>/dev/null; echo sent", "sent")
            raise

    def _resolve_transport_encryption(self, policy: str | None) -> None:
        """CurveZMQ by default: the kernel's ZMQ traffic crosses the network between hosts. A launch argument,
        a kernel manager set to 'auto'/'required', or ``default_transport_encryption`` in the kernelspec decide
        otherwise."""
        if policy is None:
            chosen = getattr(self.parent, "transport_encryption", None)
            policy = self.default_transport_encryption if chosen in (None, "", "disabled") else chosen
        super()._resolve_transport_encryption(policy)

    def _determine_next_host(self, env_dict: dict) -> str:
        """The next host as the balancing algorithm says, skipping hosts that could not take a kernel a
        moment ago (unless every host failed). Least-connection is done here too: upstream never
        initialises its per-host counts (``min()`` of an empty sequence) and would pick from every host any
        kernelspec ever named, not just this one's."""
        if env_dict.get("KERNEL_REMOTE_HOST"):
            return super()._determine_next_host(env_dict)
        now = time.monotonic()
        hosts = list(self.remote_hosts)
        up = [h for h in hosts if self.down_until.get(h, 0) <= now] or hosts
        for h in hosts:
            if h not in up:
                self.log.warning(f"dhvm: skipping host {h}: it could not take a kernel "
                                 f"{DOWN_FOR_S - (self.down_until[h] - now):.0f}s ago")
        if self.least_connection:
            counts = DistributedProvisioner.kernel_on_host._host_kernels
            host = min(up, key=lambda h: counts.get(h, 0))
            DistributedProvisioner.kernel_on_host.add_kernel_id(host, self.kernel_id)
            return host
        for _ in range(len(hosts)):
            host = hosts[DistributedProvisioner.host_index % len(hosts)]
            DistributedProvisioner.host_index += 1
            if host in up:
                return host
        return host

    def _build_startup_command(self, cmd: list[str], **kwargs: Any) -> list[str]:
        startup = super()._build_startup_command(cmd, **kwargs)
        if isinstance(startup, list):  # the local host: gateway-provisioners runs it directly
            return startup
        cwd = shlex.quote(self._dhvm_cwd)
        refused = shlex.quote(f"{REFUSED} the notebook directory {self._dhvm_cwd} does not exist on this host")
        # After the kernelspec's exports (the host's check sees the same environment as the kernel).
        check = (f"{shlex.quote(cmd[0])} -m dhg_kernel.cluster check || exit 0; "
                 f"export {HOST_ENV}={shlex.quote(self.assigned_host)}; nohup")
        # The kernel must not hold the SSH channel's stdin, or the host's sshd session lives as long as it does.
        startup = startup.replace(" >> ", " < /dev/null >> ", 1)
        return f"cd {cwd} 2>/dev/null || {{ echo {refused}; exit 0; }}; " + startup.replace("nohup", check, 1)

    def _launch_remote_process(self, cmd: list[str], **kwargs: Any):
        host = self.assigned_host
        try:
            result = super()._launch_remote_process(cmd, **kwargs)
        except Exception as e:
            self._mark_down(host)
            raise RuntimeError(f"host {host} could not be reached over SSH ({_first_line(e)}). Check it with: "
                               f"ssh {host} true; dhvm status --host {host}. The next launches skip {host} for "
                               f"{DOWN_FOR_S:.0f}s") from None
        text = str(result).strip()
        if text.startswith(REFUSED):
            self._mark_down(host)
            why = text[len(REFUSED):].strip()
            if "notebook directory" in why:
                fix = (f"cluster kernels need the notebook's directory on a filesystem every host mounts at the same "
                       f"path; mount it on {host}")
            else:
                fix = f"on {host} run: dhvm prepare (and check with: dhvm status --host {host})"
            raise RuntimeError(f"host {host} cannot take a Deephaven microVM kernel: {why}. Fix: {fix}. The next "
                               f"launches skip {host} for {DOWN_FOR_S:.0f}s")
        return result

    async def cleanup(self, restart: bool = False) -> None:
        """Also remove the connection file the launcher left on the host (0600, but litter) when the kernel
        could not remove it itself (killed)."""
        if self.kernel_id and self.pid and self.pid > 0:
            await self._on_host(f'rm -f "${{TMPDIR:-/tmp}}"/kernel-{shlex.quote(str(self.kernel_id))}_*.json; echo done',
                                "done")
        await super().cleanup(restart)

    # -- is it alive, and signals, once the launcher's listener is gone -------------------------------
    #
    # gateway-provisioners asks the launcher's listener (a socket in the kernel process) both whether
    # the kernel lives and to deliver signals. At a shutdown it first tells the listener to stop, so
    # the next poll already says "dead": jupyter_client then closes its control socket at once,
    # usually before its shutdown_request has even reached the host, and never kills the process —
    # the kernel, and its VMs, lived on (seen on every shutdown in the tests). Here a refused listener
    # is followed by asking the host itself over SSH.

    async def poll(self) -> int | None:
        if await self._send_signal_via_listener(0):
            return None
        return None if await self._on_host(f"kill -0 {int(self.pid)} 2>/dev/null && echo alive", "alive") else 0

    async def send_signal(self, signum: int) -> None:
        if not await self._send_signal_via_listener(signum) and signum > 0:
            await self._on_host(f"kill -{int(signum)} {int(self.pid)} 2>/dev/null; echo sent", "sent")

    async def _on_host(self, command: str, expect: str) -> bool:
        """Run ``command`` on the kernel's host; True if its output says ``expect``."""
        if not self.pid or self.pid <= 0 or not self.assigned_ip or self.local_proc is not None:
            return False
        try:
            lines = await asyncio.to_thread(self._rsh, self.assigned_ip, command)
        except Exception as e:  # noqa: BLE001 - an unreachable host cannot run the kernel either
            self.log.warning(f"dhvm: could not ask host {self.assigned_host} about kernel pid {self.pid}: {e}")
            return False
        return any(expect in line for line in lines or [])

    def _mark_down(self, host: str) -> None:
        DhvmDistributedProvisioner.down_until[host] = time.monotonic() + DOWN_FOR_S


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
