"""Deephaven microVM kernels on a pool of hosts, through Jupyter's kernel provisioners.

The engine is gateway-provisioners' ``DistributedProvisioner``: it picks a host (round-robin or
least-connection), starts the kernel there over SSH (paramiko, key-only, host keys checked), gets
its connection info back on a response socket, and relays interrupts and signals through the
launcher's listener. Every Jupyter front end that uses a KernelManager (Jupyter Server/Lab,
nbconvert, papermill, JupyterHub's single-user servers) honours it through
``metadata.kernel_provisioner`` in the kernelspec, which ``dhvm kernel install --hosts`` writes.

What ``provisioner.DhvmDistributedProvisioner`` adds to it:

- the kernel starts in the notebook's directory on the host (the files a cell names are pushed
  from there), and a host without that directory is refused with the host and the path named;
- a host that is down, refuses SSH or is not prepared (no VM backend can run there) is refused
  with its name and the fix, and the next launches skip it for ``DOWN_FOR_S``;
- the kernel learns the host it runs on (``DHG_CLUSTER_HOST``), so ``%dhvm status`` can say.

On each host: ``pip install 'dhg_kernel[cluster]'`` and ``dhvm prepare``. The launcher is
gateway-provisioners' own Python launcher (from its package on the host, so nothing has to be
copied into the hosts' kernelspec directories), started as ``python -m dhg_kernel.cluster launch``
with ``--kernel-class-name dhg_kernel.kernel.DhvmKernel``.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

from .config import CLUSTER_HOST_ENV
from .errors import UsageError

PROVISIONER_NAME = "dhvm-distributed-provisioner"
KERNEL_CLASS = "dhg_kernel.kernel.DhvmKernel"
DEFAULT_NAME = "dhvm-cluster"
DISPLAY_NAME = "Deephaven microVM (cluster)"
BALANCE = ("round-robin", "least-connection")
# A host that could not take a kernel is skipped by the next launches for this long.
DOWN_FOR_S = 60.0
# The first line a host prints instead of a pid when it cannot take the kernel.
REFUSED = "DHVM-REFUSED:"
HOST_ENV = CLUSTER_HOST_ENV


# -- the launcher, on each host -----------------------------------------------------------------------


def launcher_script() -> Path:
    """gateway-provisioners' Python kernel launcher, as installed on this host."""
    try:
        import gateway_provisioners
    except ImportError:
        raise UsageError("gateway-provisioners is not installed on this host — run: pip install "
                         "'dhg_kernel[cluster]'") from None
    return Path(gateway_provisioners.__file__).parent / "kernel-launchers" / "python" / "scripts" / "launch_ipykernel.py"


def launch(argv: list[str]) -> None:
    """Run gateway-provisioners' launcher with our kernel class (its argv otherwise unchanged)."""
    import runpy

    script = launcher_script()
    if "--kernel-class-name" not in argv:
        argv = [*argv, "--kernel-class-name", KERNEL_CLASS]
    # It imports server_listener: the real one is in the launchers' shared/ directory (the one beside the
    # script is a placeholder that jupyter-ssh-spec replaces when it copies the launcher into a kernelspec).
    sys.path[:0] = [str(script.parents[2] / "shared" / "scripts"), str(script.parent)]
    sys.argv = [str(script), *argv]
    kid = argv[argv.index("--kernel-id") + 1] if "--kernel-id" in argv[:-1] else None
    if kid:
        # The launcher writes the connection file (0600) in the temp dir and removes it only if the kernel's
        # app returns; a kernel that shuts down exits before that, so it is removed on the way out here.
        atexit.register(_remove_connection_files, kid)
    runpy.run_path(str(script), run_name="__main__")


def exit_after_shutdown(delay: float = 1.0) -> None:
    """Under the launcher, a kernel's main loop runs on after it has answered a shutdown_request
    (ipykernel 7.4 with gateway-provisioners 0.5, plain IPythonKernel too): the process would live on
    until the provisioner's SIGTERM, seconds later. So once the reply is out, the process ends."""
    import threading

    def finish() -> None:
        time.sleep(delay)
        kid = os.environ.get("KERNEL_ID")
        if kid:
            _remove_connection_files(kid)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    threading.Thread(target=finish, name="dhvm-cluster-exit", daemon=True).start()


def _remove_connection_files(kernel_id: str) -> None:
    import glob
    import tempfile

    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"kernel-{glob.escape(kernel_id)}_*.json")):
        try:
            os.unlink(path)
        except OSError:
            pass


def host_problem(backend: str | None = None) -> str | None:
    """Why this host cannot run Deephaven microVM kernels (None if it can): with ``auto``, a VM backend
    (firecracker or qemu) must be ready — a cluster host that would fall back to running cells
    unisolated on the host is not prepared."""
    from .config import Layout
    from .vm import why_not

    layout = Layout.resolve(None)
    backend = backend or os.environ.get("DHG_BACKEND") or "auto"
    if backend != "auto":
        reason = why_not(backend, layout)
        return None if reason is None else f"the {backend} backend cannot run: {reason}"
    reasons = {name: why_not(name, layout) for name in ("firecracker", "qemu")}
    if any(r is None for r in reasons.values()):
        return None
    return "no VM backend is ready: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())


def check_host() -> int:
    """``python -m dhg_kernel.cluster check``: print REFUSED and why if this host cannot take a kernel."""
    problem = host_problem()
    if problem:
        print(f"{REFUSED} {problem}")
        return 1
    return 0


# -- asking a host ------------------------------------------------------------------------------------


def run_on(host: str, command: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``command`` on ``host`` over SSH the way the provisioner does (paramiko, the user's keys,
    host keys checked against known_hosts, ``$GP_REMOTE_USER``, ``$GP_SSH_PORT``)."""
    import getpass

    import paramiko

    ssh = paramiko.SSHClient()
    ssh.load_system_host_keys()
    ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        ssh.connect(host, port=int(os.environ.get("GP_SSH_PORT", "22")),
                    username=os.environ.get("GP_REMOTE_USER") or getpass.getuser(), timeout=timeout)
        _, out, err = ssh.exec_command(command, timeout=timeout)
        code = out.channel.recv_exit_status()
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
    finally:
        ssh.close()


def remote_status(host: str, python: str | None = None, as_json: bool = False) -> int:
    """``dhvm status --host H``: can H be reached over SSH, and can it run Deephaven microVM kernels?"""
    import shlex

    py = shlex.quote(python or sys.executable)
    try:
        code, out, err = run_on(host, f"{py} -m dhg_kernel status --json; {py} -m dhg_kernel.cluster check")
    except Exception as e:  # noqa: BLE001 - every way SSH fails is reported the same way
        msg = (f"{host}: not reachable over SSH ({type(e).__name__}: {str(e).strip()[:300]}). The cluster kernel "
               f"reaches hosts as the provisioner does: key-only SSH, the host in known_hosts — check: ssh {host} true")
        print(json.dumps({"host": host, "ok": False, "error": msg}) if as_json else msg)
        return 2
    lines = out.strip().splitlines()
    refused = next((ln for ln in lines if ln.startswith(REFUSED)), None)
    try:
        status = json.loads("\n".join(ln for ln in lines if not ln.startswith(REFUSED)))
    except ValueError:
        msg = f"{host}: dhg_kernel did not answer ({(err or out).strip()[-300:]}) — on {host} run: pip install 'dhg_kernel[cluster]'"
        print(json.dumps({"host": host, "ok": False, "error": msg}) if as_json else msg)
        return 2
    verdict = (f"NOT ready: {refused[len(REFUSED):].strip()} — on {host} run: dhvm prepare" if refused else
               f"ready: cells would run on the {status.get('backend')} backend")
    if as_json:
        print(json.dumps({"host": host, "ok": refused is None, "verdict": verdict, "status": status}, indent=2))
    else:
        from .display import format_mapping

        print(f"{host}: {verdict}")
        print(format_mapping({k: v for k, v in status.items() if k in ("dhg_home", "backend", "checks", "instances")}))
    return 0 if refused is None else 1


# -- the kernelspec -------------------------------------------------------------------------------------


def kernelspec(hosts: list[str], balance: str = "round-robin", python: str | None = None,
               display_name: str = DISPLAY_NAME, launch_timeout: int = 120) -> dict:
    """The kernel.json of a cluster kernel over ``hosts``."""
    if not hosts or any(not h or "," in h or h.strip() != h for h in hosts):
        raise UsageError(f"--hosts wants host names separated by commas, like --hosts h1,h2 (got {hosts!r})")
    if balance not in BALANCE:
        raise UsageError(f"--balance must be one of {', '.join(BALANCE)} (got {balance!r})")
    return {
        "argv": [python or sys.executable, "-m", "dhg_kernel.cluster", "launch", "--kernel-id", "{kernel_id}",
                 "--port-range", "{port_range}", "--response-address", "{response_address}",
                 "--public-key", "{public_key}", "--transport-encryption", "{transport_encryption}",
                 "--kernel-class-name", KERNEL_CLASS],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "debugger": False,
            # The kernel's ZMQ traffic crosses the network: CurveZMQ when jupyter_client can (gateway-provisioners
            # hands the keys over encrypted with the connection info).
            "supported_encryption": ["curve"],
            "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME,
                                   "config": {"remote_hosts": list(hosts), "load_balancing_algorithm": balance,
                                              "launch_timeout": launch_timeout}},
            "dhg_kernel": {"about": "every cell runs in a Deephaven server inside a microVM on one of the hosts",
                           "hosts": list(hosts)},
        },
    }


def install(hosts: list[str], name: str = DEFAULT_NAME, balance: str = "round-robin", user: bool = False,
            prefix: str | None = None, python: str | None = None) -> str:
    """Install the cluster kernelspec; returns its directory."""
    import shutil
    import tempfile

    from jupyter_client.kernelspec import KernelSpecManager

    from .kernelspec import spec_files

    launcher_script()  # refuse early if gateway-provisioners is missing
    spec = kernelspec(hosts, balance, python, DISPLAY_NAME if name == DEFAULT_NAME else f"{DISPLAY_NAME}: {name}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.mkdir()
        for f in spec_files().iterdir():
            if f.suffix == ".png":
                shutil.copy(f, src / f.name)
        (src / "kernel.json").write_text(json.dumps(spec, indent=1))
        if not user and prefix is None:
            prefix = sys.prefix
        return KernelSpecManager().install_kernel_spec(str(src), name, user=user, prefix=prefix)


K8S_NAME = "dhvm-k8s"
K8S_DISPLAY_NAME = "Deephaven microVM (Kubernetes)"
KVM_MODES = ("device-plugin", "privileged")


def pod_template() -> Path:
    """The kernel pod's template shipped with the package (``k8s/kernel-pod.yaml.j2``)."""
    from importlib import resources

    return Path(str(resources.files("dhg_kernel.kubernetes_data") / "kernel-pod.yaml.j2"))


def install_kubernetes(image: str, name: str = K8S_NAME, kvm: str = "device-plugin", home_claim: str = "dhvm-home",
                       backend: str = "firecracker", user: bool = False, prefix: str | None = None) -> str:
    """A kernelspec for gateway-provisioners' ``KubernetesProvisioner``: its own installer
    (``jupyter-k8s-spec``) writes the spec and its launcher, then our pod template replaces its
    generic one and the spec's env picks the KVM mode, the DHG_HOME claim and the backend."""
    import subprocess

    if kvm not in KVM_MODES:
        raise UsageError(f"--kvm must be one of {', '.join(KVM_MODES)} (got {kvm!r})")
    if not image or any(c.isspace() for c in image):
        raise UsageError(f"--kubernetes wants a container image name, like registry.example.com/dhvm-kernel:0.1.0 "
                         f"(got {image!r}); build it with k8s/Dockerfile")
    launcher_script()  # gateway-provisioners must be here
    where = ["--user"] if user else ["--prefix", prefix or sys.prefix]
    p = subprocess.run([sys.executable, "-m", "gateway_provisioners.cli.k8s_specapp", "install", "--kernel-name", name,
                        "--display-name", K8S_DISPLAY_NAME if name == K8S_NAME else f"{K8S_DISPLAY_NAME}: {name}",
                        "--image-name", image, "--ipykernel-subclass-name", KERNEL_CLASS, *where],
                       capture_output=True, text=True)
    found = [ln.split(" in ", 1)[1].strip() for ln in p.stderr.splitlines() if "Installed kernelspec" in ln]
    if p.returncode or not found:
        raise UsageError(f"jupyter-k8s-spec could not install the kernelspec: {(p.stderr or p.stdout).strip()[-500:]}")
    spec_dir = Path(found[-1])
    (spec_dir / "scripts" / "kernel-pod.yaml.j2").write_text(pod_template().read_text())
    spec = json.loads((spec_dir / "kernel.json").read_text())
    spec["env"].update({"KERNEL_DHVM_KVM": kvm, "KERNEL_DHVM_HOME_CLAIM": home_claim, "KERNEL_DHVM_BACKEND": backend})
    spec["metadata"]["kernel_provisioner"]["config"]["launch_timeout"] = 300  # an image pull, then prepare's check
    spec["metadata"]["dhg_kernel"] = {"about": "every cell runs in a Deephaven server inside a microVM in a kernel pod",
                                      "kvm": kvm, "home_claim": home_claim}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return str(spec_dir)


def run(args) -> int:
    """``dhvm kernel install|uninstall --hosts/--name``: the cluster kernelspec."""
    from .kernelspec import uninstall

    if getattr(args, "kubernetes", None) and args.action == "install":
        name = args.name or K8S_NAME
        path = install_kubernetes(args.kubernetes, name, args.kvm, args.home_claim, user=args.user, prefix=args.prefix)
        print(f"installed kernelspec '{name}' ({K8S_DISPLAY_NAME}, image {args.kubernetes}, /dev/kvm by {args.kvm}, "
              f"DHG_HOME on claim {args.home_claim}) in {path}\nit needs Jupyter to run with gateway-provisioners' "
              "Kubernetes access (pip install 'gateway-provisioners[k8s]'); see docs/many-hosts.md")
        return 0
    name = args.name or DEFAULT_NAME
    if args.action == "uninstall":
        print(f"removed kernelspec '{name}' from {uninstall(name)}")
        return 0
    if not args.hosts:
        raise UsageError("--name, --balance and --python go with --hosts H1,H2,...")
    hosts = [h.strip() for h in args.hosts.split(",")]
    path = install(hosts, name, args.balance, user=args.user, prefix=args.prefix, python=args.python)
    print(f"installed kernelspec '{name}' (Deephaven microVM (cluster), {args.balance} over {', '.join(hosts)}) in "
          f"{path}\neach host needs: pip install 'dhg_kernel[cluster]' and dhvm prepare; check one with: "
          f"dhvm status --host {hosts[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        launch(argv[1:])
        return 0
    if argv[:1] == ["check"]:
        return check_host()
    print("usage: python -m dhg_kernel.cluster launch ARGS... | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
