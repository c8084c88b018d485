"""The ``dhvm`` command: run scripts through the same session path as the magic, and manage the VM side."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import files as files_mod
from .config import DEFAULT_BACKEND, DEFAULT_MAX_PUSH_MB, DEFAULT_MAX_ROWS, Layout
from .display import format_text
from .session import DhvmError, Session


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=os.environ.get("DHG_BACKEND", DEFAULT_BACKEND),
                   help="where the code runs (default: %(default)s)")
    p.add_argument("--config-dir", default=None, help="DHG_HOME for artifacts and run dirs (default: $DHG_HOME or ~/.dhg)")


def cmd_exec(args) -> int:
    if (args.script is None) == (args.code is None):
        print("dhvm exec: give a SCRIPT file or -c CODE (one of them)", file=sys.stderr)
        return 2
    code = args.code if args.code is not None else (sys.stdin.read() if args.script == "-" else Path(args.script).read_text())
    workspace = Path.cwd()
    try:
        report = files_mod.ScanReport() if args.no_files else files_mod.scan(code, workspace)
        files_mod.add_explicit(report, args.file, workspace)
        files_mod.check_limit(report.files, args.max_push_mb)
    except (files_mod.FileLimitError, files_mod.FileNotPushable) as e:
        print(f"dhvm: {e}", file=sys.stderr)
        return 2
    session = Session(args.backend, args.config_dir)
    stream = not args.json
    try:
        result = session.execute(
            code, report.files, max_rows=args.max_rows if args.max_rows > 0 else None, timeout=args.timeout or None,
            on_stdout=(lambda t: (sys.stdout.write(t), sys.stdout.flush())) if stream else None,
            on_stderr=(lambda t: (sys.stderr.write(t), sys.stderr.flush())) if stream else None)
    except DhvmError as e:
        print(f"dhvm: {e}", file=sys.stderr)
        return 2
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


def cmd_status(args) -> int:
    session = Session(args.backend, args.config_dir)
    st = session.status()
    from .instances import list_instances

    st["instances"] = [{"id": r.id, "backend": r.backend, "owner_pid": r.owner_pid, "owner_alive": r.owner_alive}
                       for r in list_instances(Layout.resolve(args.config_dir))]
    if args.json:
        print(json.dumps(st, indent=2, default=str))
    else:
        for k, v in st.items():
            print(f"{k}: {v}")
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
    p.add_argument("script", nargs="?", help="Python file to run ('-' for stdin)")
    p.add_argument("-c", "--code", help="code to run instead of a file")
    p.add_argument("--json", action="store_true", help="print one JSON object (stdout, stderr, tables, error, timings)")
    p.add_argument("--compact", action="store_true", help="with --json: no indentation")
    p.add_argument("-n", "--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per table to bring back (0: all)")
    p.add_argument("--timeout", type=float, default=0, help="cancel after this many seconds")
    p.add_argument("--file", action="append", default=[], metavar="PATH", help="push this workspace file too")
    p.add_argument("--no-files", action="store_true", help="do not scan the code for files to push")
    p.add_argument("--max-push-mb", type=float, default=DEFAULT_MAX_PUSH_MB, help="push limit in MiB")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-phase timings")
    _add_common(p)
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("status", help="backend, instances and artifacts")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("kernel", help="install or uninstall the 'Deephaven microVM' Jupyter kernel")
    p.add_argument("action", choices=["install", "uninstall"])
    from .kernelspec import add_location_args, run as kernel_run

    add_location_args(p)
    p.set_defaults(func=kernel_run)

    p = sub.add_parser("reap", help="destroy instances whose owner process is gone")
    _add_common(p)
    p.set_defaults(func=cmd_reap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
