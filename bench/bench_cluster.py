"""Benchmark the cluster kernel: launch -> first result through gateway-provisioners' DistributedProvisioner
over SSH, against the local "Deephaven microVM" kernel on the same machine; then N kernels at once.

Usage::

    sudo python bench/bench_cluster.py [--home ~/.dhg] [--runs 5] [--at-once 8] [--json]

The hosts are two network namespaces on this machine with an sshd each (``tests/vm/clusterhosts.py``),
sharing the prepared QEMU snapshot of ``--home`` read-only; so "remote" costs SSH, the provisioner's
launcher handshake and the network stack, not a second machine's hardware. Needs root, openssh-server
and ``pip install 'dhg_kernel[cluster]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "vm")]

FIRST = "print(1 + 1)"


async def first_result(name: str, cwd: Path) -> dict:
    """Start kernel ``name``, wait until it answers, run FIRST in its VM; the times, and where it ran."""
    from jupyter_client.manager import AsyncKernelManager

    t0 = time.perf_counter()
    km = AsyncKernelManager(kernel_name=name)
    await km.start_kernel(cwd=str(cwd))
    launched = time.perf_counter() - t0
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=300)
        ready = time.perf_counter() - t0
        reply = await kc.execute_interactive(FIRST, timeout=300, output_hook=lambda m: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        done = time.perf_counter() - t0
        host = getattr(km.provisioner, "assigned_host", "local")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()
    return {"launched_s": launched, "ready_s": ready, "first_result_s": done, "host": host}


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=str(Path("~/.dhg").expanduser()), help="DHG_HOME with a prepared QEMU snapshot")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--at-once", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import clusterhosts

    why = clusterhosts.why_not()
    if why:
        print(f"bench_cluster: cannot run here: {why}")
        return 2
    import gateway_provisioners.distributed as gd
    import gateway_provisioners.response_manager as rm

    from dhg_kernel.cluster import install
    from dhg_kernel.config import Layout
    from dhg_kernel.instances import destroy, list_instances
    from dhg_kernel.kernelspec import install as install_local

    home = Path(args.home).expanduser()
    out: dict = {"home": str(home), "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="dhg-bench-cluster-") as tmp:
        root = Path(tmp)
        c = clusterhosts.make(root / "c", 2, home)
        try:
            os.environ["HOME"] = str(c.client_home)
            os.environ["KERNEL_USERNAME"] = "bench"
            os.environ["DHG_HOME"] = str(home)  # the local kernel's
            rm.response_ip = c.hosts[0].gateway_ip
            (root / "logs").mkdir()
            gd.kernel_log_dir = str(root / "logs")
            prefix = root / "prefix"
            install([h.ip for h in c.hosts], "dhvm-cluster", prefix=str(prefix))
            install_local(prefix=str(prefix))
            os.environ["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
            work = root / "work"
            work.mkdir()

            async def series(name: str) -> list[dict]:
                return [await first_result(name, work) for _ in range(args.runs)]

            # One event loop for everything: gateway-provisioners' response listener lives on the loop that
            # first used it.
            loop = asyncio.new_event_loop()
            local = loop.run_until_complete(series("dhvm"))
            remote = loop.run_until_complete(series("dhvm-cluster"))
            for label, rows in (("local", local), ("cluster", remote)):
                out[label] = {k: _med([r[k] for r in rows]) for k in ("launched_s", "ready_s", "first_result_s")}
            out["cluster"]["hosts"] = [r["host"] for r in remote]

            async def burst() -> tuple[float, list[dict], dict]:
                t0 = time.perf_counter()
                from jupyter_client.manager import AsyncKernelManager

                kms = [AsyncKernelManager(kernel_name="dhvm-cluster") for _ in range(args.at_once)]
                started = await asyncio.gather(*(km.start_kernel(cwd=str(work)) for km in kms), return_exceptions=True)
                failed = [(km, e) for km, e in zip(kms, started) if isinstance(e, BaseException)]
                if failed:
                    for km, e in failed:
                        log = root / "logs" / f"kernel-{km.kernel_id}.log"
                        tail = log.read_text()[-1500:] if log.exists() else "(no log)"
                        print(f"kernel {km.kernel_id} on {getattr(km.provisioner, 'assigned_host', '?')} failed: "
                              f"{e}\n--- its launcher log ---\n{tail}", file=sys.stderr)
                    await asyncio.gather(*(km.shutdown_kernel(now=True) for km, e in zip(kms, started)
                                           if not isinstance(e, BaseException)), return_exceptions=True)
                    raise SystemExit(f"{len(failed)} of {len(kms)} launches failed")
                clients = [km.client() for km in kms]
                for kc in clients:
                    kc.start_channels()
                try:
                    await asyncio.gather(*(kc.wait_for_ready(timeout=600) for kc in clients))
                    replies = await asyncio.gather(*(kc.execute_interactive(FIRST, timeout=600, output_hook=lambda m: None)
                                                     for kc in clients))
                    total = time.perf_counter() - t0
                    assert all(r["content"]["status"] == "ok" for r in replies)
                    per_host = {h.ip: len(list((h.home / "vm" / "run").iterdir())) for h in c.hosts}
                    where = [{"host": km.provisioner.assigned_host} for km in kms]
                finally:
                    for kc in clients:
                        kc.stop_channels()
                    await asyncio.gather(*(km.shutdown_kernel() for km in kms))
                return total, where, per_host

            total, where, per_host = loop.run_until_complete(burst())
            loop.close()
            out["at_once"] = {"kernels": args.at_once, "all_first_results_s": round(total, 1),
                              "vms_per_host": per_host}
        finally:
            c.close()
            for h in c.hosts:
                for rec in list_instances(Layout(h.home)):
                    destroy(rec)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        lo, cl = out["local"], out["cluster"]
        print(f"launch -> first result (print(1 + 1) in the VM), median of {args.runs}, QEMU under this host's accel:")
        print(f"  local 'Deephaven microVM' kernel   launched {lo['launched_s']:5.2f}s  ready {lo['ready_s']:5.2f}s  "
              f"first result {lo['first_result_s']:5.2f}s")
        print(f"  cluster kernel over SSH            launched {cl['launched_s']:5.2f}s  ready {cl['ready_s']:5.2f}s  "
              f"first result {cl['first_result_s']:5.2f}s   (hosts: {', '.join(cl['hosts'])})")
        a = out["at_once"]
        print(f"  {a['kernels']} cluster kernels at once: all first results in {a['all_first_results_s']}s; "
              f"VMs per host: {a['vms_per_host']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
