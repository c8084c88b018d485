"""The ``dhvm`` command (also ``python -m dhg_kernel``): run scripts through the same session path as the
magic, and manage the VM side. Every error a user can act on is a DhvmError, caught once in ``main``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import files as files_mod
from .config import DEFAULT_MAX_PUSH_MB, DEFAULT_MAX_ROWS, DH_VERSION, Layout, default_backend, default_start_from
from .display import format_mapping, format_text, timing_line
from .errors import DhvmError
from .session import Session


def _add_run(p: argparse.ArgumentParser) -> None:
    """The options of commands that run code in a fresh server (exec, fetch)."""
    p.add_argument("script", nargs="?", help="Python file to run ('-' for stdin)")
    p.add_argument("-c", "--code", help="code to run instead of a file")
    p.add_argument("-i", "--input", action="append", default=[], metavar="NAME=FILE",
                   help="send a local parquet, CSV or Arrow file as the Deephaven table NAME before the code runs "
                        "(repeatable; counts against --max-push-mb)")
    p.add_argument("--timeout", type=float, default=0, help="cancel after this many seconds")
    p.add_argument("--file", action="append", default=[], metavar="PATH", help="push this workspace file too")
    p.add_argument("--no-files", action="store_true", help="do not scan the code for files to push")
    p.add_argument("--max-push-mb", type=float, default=DEFAULT_MAX_PUSH_MB, help="push limit in MiB")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-phase timings")
    _add_start_from(p)


def _add_start_from(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start-from", default=default_start_from() or None, metavar="CHECKPOINT",
                   help="start the server from this checkpoint (dhvm checkpoint list) instead of the base snapshot "
                        "(default: $DHG_START_FROM)")
    p.add_argument("--snapshot", dest="start_from", help=argparse.SUPPRESS)  # the old name


def _session(args) -> Session:
    """The session of a command that runs code (its server starts from --start-from, if given)."""
    return Session(args.backend, args.config_dir, **({"start_from": args.start_from} if args.start_from else {}))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=default_backend(),
                   help="where the code runs: auto, firecracker, qemu or local (default: %(default)s)")
    p.add_argument("--config-dir", default=None, help="DHG_HOME for artifacts and run dirs (default: $DHG_HOME or ~/.dhg)")


def _read_code(args) -> str | None:
    """The script (a file, or '-' for stdin) or -c CODE; None (after saying so) when not exactly one is given."""
    if (args.script is None) == (args.code is None):
        print(f"dhvm {args.command}: give a SCRIPT file or -c CODE (one of them)", file=sys.stderr)
        return None
    return args.code if args.code is not None else (sys.stdin.read() if args.script == "-" else Path(args.script).read_text())


def _to_send(args, code: str) -> tuple[files_mod.ScanReport, list[files_mod.CellInput]]:
    """The workspace files the code names (and --file), and the -i NAME=FILE tables, within --max-push-mb."""
    workspace = Path.cwd()
    report = files_mod.ScanReport() if args.no_files else files_mod.scan(code, workspace)
    files_mod.add_explicit(report, args.file, workspace)
    inputs = [files_mod.CellInput.from_file(spec) for spec in args.input]
    files_mod.check_limit(report.files, args.max_push_mb, inputs)
    return report, inputs


def _execute(session: Session, args, code: str, report: files_mod.ScanReport, inputs: list[files_mod.CellInput],
             max_rows: int | None, stream: bool):
    """Run the code in the session's server, streaming its output to this process's stdout/stderr."""
    return session.execute(
        code, report.files, max_rows=max_rows, timeout=args.timeout or None, inputs=inputs,
        on_stdout=(lambda t: (sys.stdout.write(t), sys.stdout.flush())) if stream else None,
        on_stderr=(lambda t: (sys.stderr.write(t), sys.stderr.flush())) if stream else None)


def cmd_exec(args) -> int:
    code = _read_code(args)
    if code is None:
        return 2
    report, inputs = _to_send(args, code)
    session = _session(args)
    stream = not args.json
    try:
        result = _execute(session, args, code, report, inputs, args.max_rows if args.max_rows > 0 else None, stream)
    finally:
        session.stop()
    result.files_skipped = report.skipped
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=None if args.compact else 2, default=str)
        sys.stdout.write("\n")
    else:
        text = format_text(result, verbose=args.verbose)
        if text:
            print(text, file=sys.stderr if result.error and not result.tables else sys.stdout)
    return 0 if result.ok else 1


def cmd_fetch(args) -> int:
    """Run a script in a fresh server, then stream its table NAME into a local file (no CLI session outlives
    its command, so the table is made and fetched in one go)."""
    from .tablefiles import check_target

    check_target(args.to, args.format, args.force)  # before a server is started for nothing
    code = _read_code(args)
    if code is None:
        return 2
    report, inputs = _to_send(args, code)
    session = _session(args)
    try:
        # The script's tables are not printed: only the one asked for travels, and into the file.
        result = _execute(session, args, code, report, inputs, max_rows=0, stream=True)
        if args.verbose:
            print(timing_line(result), file=sys.stderr)
        if not result.ok:
            print("".join(result.error.traceback).rstrip() or str(result.error) if result.error else result.status,
                  file=sys.stderr)
            return 1
        written = session.fetch_to(args.name, args.to, args.format, args.force,
                                   progress=False if args.quiet or not sys.stderr.isatty() else None)
    finally:
        session.stop()
    print(written)
    return 0


def cmd_checkpoint(args) -> int:
    """list | info NAME | rm NAME | create NAME --from SCRIPT: the saved sessions under DHG_HOME."""
    from .vm import checkpoint_store as store

    layout = Layout.resolve(args.config_dir)
    if args.action == "list":
        rows = [c.describe() for c in store.list_all(layout)]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no checkpoints under {layout.checkpoints} (make one: dhvm checkpoint create NAME --from setup.py, "
                  f"or %dhvm checkpoint NAME in a notebook)")
        else:
            print(f"{'NAME':24s} {'CREATED':26s} {'SIZE':>9s}  {'BACKEND':8s} TABLES")
            for r in rows:
                print(f"{r['name']:24s} {r['created'] or '?':26s} {r['size_mb'] / 1024:7.2f}GB  {r['backend']:8s} "
                      f"{', '.join(r['tables']) or '-'}" + (f"\n  {r['status']}" if r["status"] != "ok" else ""))
        return 0
    if not args.name:
        print(f"dhvm checkpoint {args.action}: give the checkpoint's NAME", file=sys.stderr)
        return EXIT_ERROR
    if args.action == "info":
        ck = store.load(layout, args.name)
        info = ck.describe()
        if args.json:
            print(json.dumps({**info, "metadata": ck.meta}, indent=2, default=str))
        else:
            print(format_mapping(info))
        return 0
    if args.action == "rm":
        store.remove(layout, args.name)
        print(f"removed checkpoint {args.name} (VMs already restored from it run on)")
        return 0
    # create: run the script in a fresh server, then save it
    if not args.from_script:
        print("dhvm checkpoint create: give the script to run: --from setup.py", file=sys.stderr)
        return EXIT_ERROR
    store.check_name(args.name)
    if layout.checkpoint(args.name).exists() and not args.overwrite:
        store.load(layout, args.name)  # an unreadable one says so; a complete one is refused below
        raise DhvmError(f"a checkpoint named {args.name!r} already exists; replace it with --overwrite "
                        f"(or remove it: dhvm checkpoint rm {args.name})")
    code = sys.stdin.read() if args.from_script == "-" else Path(args.from_script).read_text()
    args.no_files, args.file, args.input, args.max_push_mb, args.timeout = False, [], [], DEFAULT_MAX_PUSH_MB, 0
    report, inputs = _to_send(args, code)
    session = _session(args)
    try:
        t0 = time.perf_counter()
        result = _execute(session, args, code, report, inputs, max_rows=0, stream=True)
        if not result.ok:
            print("".join(result.error.traceback).rstrip() or str(result.error) if result.error else result.status,
                  file=sys.stderr)
            print(f"dhvm checkpoint create: {args.from_script} failed, so no checkpoint was made", file=sys.stderr)
            return 1
        ran_s = time.perf_counter() - t0
        ck = session.checkpoint(args.name, overwrite=args.overwrite)
    finally:
        session.stop()
    d = ck.describe()
    print(f"checkpoint {ck.name}: {args.from_script} ran in {ran_s:.1f} s, saved in {d['save_s']} s, "
          f"{d['size_mb'] / 1024:.2f} GB on disk; tables: {', '.join(ck.tables) or 'none'}\n"
          f"start from it: dhvm exec --start-from {ck.name} ..., or %config Dhvm.start_from = '{ck.name}'")
    return 0


def cmd_status(args) -> int:
    if args.host:
        from .cluster import remote_status

        return remote_status(args.host, args.python, args.json)
    from .instances import list_instances
    from .vm import BACKENDS, choose_backend, why_not

    layout = Layout.resolve(args.config_dir)
    st: dict = {"dhg_home": str(layout.home)}
    try:
        chosen, passed = choose_backend(layout) if args.backend == "auto" else (args.backend, {})
        st["backend"] = chosen
    except DhvmError as e:  # status reports, it does not fail
        chosen, passed = None, {}
        st["backend"] = None
        st["error"] = str(e)
    st["checks"] = {name: why_not(name, layout) or "ok" for name in BACKENDS}
    if passed:
        st["not_chosen"] = passed
    if chosen == "local":
        st["warning"] = "cells run in a local process WITHOUT isolation"
    if chosen:
        try:
            from .vm import get_backend

            st["details"] = get_backend(chosen, layout).describe()
        except DhvmError as e:
            st["details"] = {"error": str(e)}
    if args.probe:
        _probe_kvm(layout, st)
    st["firecracker"] = _firecracker_status(layout, args.firecracker)
    st["instances"] = [{"id": r.id, "backend": r.backend, "owner_pid": r.owner_pid, "owner_alive": r.owner_alive,
                        **{k: v for k, v in r.info.items() if k in ("deephaven_url", "accel")}}
                       for r in list_instances(layout)]
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        print(format_mapping(st))
    return 0


def _probe_kvm(layout: Layout, st: dict) -> None:
    """``--probe``: boot the guest kernel under KVM once more (at most 20 s) and keep what it said."""
    from .vm.host import kvm_usable, probe_again
    from .vm.qemu import qemu_binary

    qemu = qemu_binary()
    if not qemu or not layout.kernel.is_file() or not kvm_usable():
        st["probe"] = ("not run: it needs QEMU, the prepared guest kernel (dhvm prepare) and access to /dev/kvm")
        return
    record = probe_again(layout, qemu)
    st["probe"] = f"{'ok' if record['accel'] == 'kvm' else 'FAILED'}: {record['detail']}"


def _cluster_run(args) -> int:
    from .cluster import run

    return run(args)


def _firecracker_status(layout: Layout, binary: str | None) -> dict:
    """Every Firecracker prerequisite, passed or failed, with the binary's version: what runs here and
    what does not, even when another backend was chosen."""
    from .vm.firecracker import FirecrackerBackend

    backend = FirecrackerBackend(layout, firecracker=binary)
    out = backend.describe()
    out.pop("backend", None)
    checks = out.get("checks", {})
    if "kvm_create_vm" in checks and "kvm_boots_guest" not in checks:
        checks["kvm_boots_guest"] = ("not probed yet: dhvm prepare boots the guest kernel under KVM once (at most "
                                     "20 s) to find out")
    return out


def _uid_gid(text: str) -> tuple[int, int]:
    """``name``, ``uid`` or ``uid:gid`` -> (uid, gid); a name's or uid's group is its primary group."""
    import pwd

    user, _, group = text.partition(":")
    if user.isdigit() and group.isdigit():
        return int(user), int(group)
    entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    return entry.pw_uid, int(group) if group else entry.pw_gid


def cmd_prepare(args) -> int:
    if args.backend not in ("qemu", "firecracker", "auto"):
        print(f"dhvm prepare: images are built for the qemu and firecracker backends only (not {args.backend!r}); "
              "the local backend needs no image", file=sys.stderr)
        return 2
    backend = "qemu" if args.backend == "auto" else args.backend
    if backend != "firecracker" and (args.firecracker or args.jailer or args.network):
        print("dhvm prepare: --firecracker, --jailer and --network need --backend firecracker", file=sys.stderr)
        return 2
    jailer_user = None
    if args.jailer_user:
        if not args.jailer:
            print("dhvm prepare: --jailer-user needs --jailer", file=sys.stderr)
            return 2
        try:
            jailer_user = _uid_gid(args.jailer_user)
        except (KeyError, ValueError) as e:
            print(f"dhvm prepare: --jailer-user {args.jailer_user!r}: {e} — give a user name or UID[:GID]",
                  file=sys.stderr)
            return 2
    from .prepare import prepare

    prepare(Layout.resolve(args.config_dir), backend=backend, dh_version=args.dh_version, rebuild=args.rebuild,
            ram_mb=args.ram_mb, heap=args.heap, accel=args.accel, jvm_opts=args.jvm_opts,
            firecracker=args.firecracker, jailer=args.jailer, network=args.network,
            fc_version=args.firecracker_version, jailer_user=jailer_user)
    return 0


def cmd_clean(args) -> int:
    import shutil

    from .instances import list_instances, reap_stale

    layout = Layout.resolve(args.config_dir)
    reap_stale(layout)
    live = [r.id for r in list_instances(layout) if r.owner_alive]
    # Every backend's snapshot of the version (QEMU's and Firecracker's), or everything.
    targets = [layout.vm] if args.all else layout.all_snapshot_dirs(args.dh_version)
    if args.all and live:
        print(f"dhvm clean: {len(live)} instance(s) still run ({', '.join(live)}); stop their sessions "
              "(%dhvm stop, or shut the kernels down) and run clean again", file=sys.stderr)
        return 2
    freed = 0
    for t in targets:
        if t.exists():
            freed += sum(f.stat().st_size for f in t.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(t)
            print(f"removed {t}")
    print(f"freed {freed / 2**20:.0f} MiB" if freed else "nothing to remove")
    return 0


def cmd_reap(args) -> int:
    from .instances import reap_stale

    gone = reap_stale(Layout.resolve(args.config_dir))
    print(f"reaped {len(gone)} stale instance(s)" + (": " + ", ".join(gone) if gone else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dhvm", description="Deephaven in a microVM, from Jupyter or the shell.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("exec", help="run a script (or -c CODE) in a fresh Deephaven server and print its output and tables")
    _add_run(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (stdout, stderr, tables, error, timings)")
    p.add_argument("--compact", action="store_true", help="with --json: no indentation")
    p.add_argument("-n", "--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per table to bring back (0: all)")
    _add_common(p)
    p.set_defaults(func=cmd_exec)

    from .tablefiles import FORMAT_NAMES

    p = sub.add_parser("fetch", help="run a script (or -c CODE) in a fresh Deephaven server, then write its table "
                                     "NAME, all of it, to a local parquet, CSV or Arrow file")
    p.add_argument("name", metavar="NAME", help="the Deephaven table the script makes")
    p.add_argument("--to", required=True, metavar="FILE", help="where to write it: *.parquet, *.csv, *.arrow or "
                                                                 "*.feather (or say --format)")
    p.add_argument("--format", choices=FORMAT_NAMES, help="the file's format, whatever its name")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_run(p)
    _add_common(p)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("checkpoint", help="saved sessions: list, info NAME, rm NAME, create NAME --from SCRIPT "
                                          "(run a script in a fresh server and save the result)")
    p.add_argument("action", choices=["list", "info", "rm", "create"])
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--from", dest="from_script", metavar="SCRIPT", help="create: the script to run first ('-': stdin)")
    p.add_argument("--overwrite", action="store_true", help="create: replace a checkpoint of that name")
    p.add_argument("--json", action="store_true", help="list, info: print JSON")
    _add_start_from(p)
    _add_common(p)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("status", help="which backend runs cells and why, the snapshot, live instances")
    p.add_argument("--json", action="store_true")
    p.add_argument("--host", default=None, metavar="HOST",
                   help="ask HOST over SSH instead (a cluster kernel's host: is it reachable and prepared?)")
    p.add_argument("--python", default=None, metavar="PATH", help="with --host: the Python on HOST with dhg_kernel")
    p.add_argument("--probe", action="store_true",
                   help="boot the guest kernel under KVM now (at most 20 s) to see whether this KVM runs a guest")
    p.add_argument("--firecracker", metavar="PATH", default=None,
                   help="check this Firecracker binary (default: the snapshot's, else PATH, else a downloaded release)")
    _add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("prepare", help="build the VM image and snapshot (rootfs, kernel, cold boot, snapshot)")
    p.add_argument("--dh-version", default=DH_VERSION, help="deephaven-server version in the image")
    p.add_argument("--rebuild", action="store_true", help="rebuild every phase, cached or not")
    from .vm.machine import DEFAULT_HEAP, DEFAULT_RAM_MB
    from .vm.qemu import TCG_JVM_OPTS

    p.add_argument("--ram-mb", type=int, default=DEFAULT_RAM_MB, help="guest RAM in MiB (default %(default)s)")
    p.add_argument("--heap", default=DEFAULT_HEAP, help="the guest JVM's -Xmx (default %(default)s)")
    p.add_argument("--accel", choices=("auto", "tcg", "kvm"), default="auto",
                   help="auto: KVM only when a probe boot succeeds, else TCG")
    p.add_argument("--jvm-opts", default=None,
                   help=f"extra JVM flags, as --jvm-opts='...' (default under TCG: {TCG_JVM_OPTS})")
    from .vm.fc_api import DEFAULT_VERSION as FC_VERSION

    p.add_argument("--firecracker", metavar="PATH", default=None,
                   help="with --backend firecracker: this binary (default: firecracker on PATH, else the pinned "
                        f"release v{FC_VERSION}, downloaded and checksum-verified)")
    p.add_argument("--firecracker-version", default=None, metavar="X.Y.Z",
                   help=f"the release to download when no binary is given (default {FC_VERSION}; "
                        "base URL from $DHG_FIRECRACKER_RELEASES)")
    p.add_argument("--jailer", metavar="PATH", default=None,
                   help="with --backend firecracker: run every restored VM under this jailer, chrooted per instance")
    p.add_argument("--jailer-user", metavar="USER|UID[:GID]", default=None,
                   help="with --jailer: the user (and group) each jailed Firecracker drops to; default: the caller "
                        "(root). A dedicated unprivileged user is what the jailer is for")
    p.add_argument("--network", action="store_true",
                   help="with --backend firecracker: give the guest outbound network access (TAP in a network "
                        "namespace per VM, NAT; needs root and nftables). Off by default")
    _add_common(p)
    p.set_defaults(func=cmd_prepare, backend="qemu")

    p = sub.add_parser("clean", help="remove prepared artifacts")
    p.add_argument("--dh-version", default=DH_VERSION, help="remove this version's snapshot (default %(default)s)")
    p.add_argument("--all", action="store_true", help="remove everything under DHG_HOME/vm (rootfs, wheels, kernel…)")
    _add_common(p)
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("kernel", help="install or uninstall the 'Deephaven microVM' Jupyter kernel")
    p.add_argument("action", choices=["install", "uninstall"])
    from .kernelspec import add_location_args, run as kernel_run

    add_location_args(p)
    p.add_argument("--hosts", metavar="H1,H2,...", default=None,
                   help="install the cluster kernel instead: each kernel starts on one of these hosts over SSH "
                        "(gateway-provisioners' DistributedProvisioner); each host needs dhg_kernel[cluster] "
                        "installed and dhvm prepare done")
    p.add_argument("--balance", choices=["round-robin", "least-connection"], default="round-robin",
                   help="with --hosts: how the next host is picked (default %(default)s)")
    p.add_argument("--name", default=None, help="with --hosts: the kernelspec name (default dhvm-cluster)")
    p.add_argument("--python", default=None, metavar="PATH",
                   help="with --hosts: the Python on the hosts that has dhg_kernel (default: this one's path)")
    p.add_argument("--kubernetes", metavar="IMAGE", default=None,
                   help="install a kernel that runs in a Kubernetes pod from IMAGE (gateway-provisioners' "
                        "KubernetesProvisioner; build the image with k8s/Dockerfile)")
    p.add_argument("--kvm", choices=["device-plugin", "privileged"], default="device-plugin",
                   help="with --kubernetes: how the pod gets /dev/kvm (default %(default)s; privileged gives the pod "
                        "every device of its node)")
    p.add_argument("--home-claim", default="dhvm-home",
                   help="with --kubernetes: the ReadWriteMany volume claim holding DHG_HOME (default %(default)s)")
    p.set_defaults(func=lambda a: _cluster_run(a) if (a.hosts or a.name or a.kubernetes) else kernel_run(a))

    p = sub.add_parser("reap", help="destroy instances whose owner process is gone")
    _add_common(p)
    p.set_defaults(func=cmd_reap)
    return ap


# Exit statuses: 1 a cell failed (exec), 2 the command could not do its job (a DhvmError).
EXIT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes NAME and SCRIPT of `dhvm fetch NAME --to FILE SCRIPT` in one go, before --to, so a
    # SCRIPT after the options is left over: it is the script.
    if extra and args.command == "fetch" and args.script is None and len(extra) == 1 and not extra[0].startswith("-"):
        args.script, extra = extra[0], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except DhvmError as e:
        print(f"dhvm: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
