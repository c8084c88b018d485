"""Every notebook in notebooks/, executed headless the way users run them: `jupyter nbconvert
--execute` and `papermill`; plus what a failing cell does to such a run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run_notebook(runner: str, nb_name: str, tmp_path: Path, home: Path, *extra: str,
                 backend: str = "local") -> nbformat.NotebookNode:
    work = tmp_path / "nb"
    shutil.copytree(NOTEBOOKS, work)
    out = tmp_path / "out.ipynb"
    if runner == "nbconvert":
        cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--ExecutePreprocessor.timeout=600", str(work / nb_name), "--output", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "papermill", str(work / nb_name), str(out), "--cwd", str(work), *extra]
    env = {**os.environ, "DHG_HOME": str(home), "DHG_BACKEND": backend}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return nbformat.read(out, 4)


def _notice(o) -> bool:
    """dhvm's own status line ("dhvm: … server ready in 0.3 s"), not the cell's output."""
    return o.output_type == "display_data" and o.get("data", {}).get("text/plain", "").startswith("dhvm: ")


def outputs_of(nb, marker: str) -> list:
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return [o for o in cell.outputs if not _notice(o)]


def all_text(nb) -> str:
    parts = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        for o in c.outputs:
            parts.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
            assert o.output_type != "error", f"cell failed: {c.source[:80]!r}: {o.get('ename')}"
    return "\n".join(parts)


def check_quickstart(nb) -> None:
    read = outputs_of(nb, 'read_csv("data/trades.csv")')
    assert "rows: 60" in "".join(o.get("text", "") for o in read if o.output_type == "stream")
    html = [o.data["text/html"] for o in read if o.output_type == "display_data"]
    assert "trades" in html[0] and "<table" in html[1], "a heading, then pandas' own HTML table"
    heads = [o.data["text/plain"] for o in outputs_of(nb, "-o summary") if o.output_type == "display_data"]
    assert any(h.startswith("summary") for h in heads)
    local = outputs_of(nb, "plain pandas on the host")[0]
    assert local.output_type == "execute_result" and "MSFT" in local.data["text/plain"]
    tables = outputs_of(nb, "%dhvm tables")[0].data["text/plain"]
    assert all(name in tables for name in ("trades", "symbols", "summary"))


def check_data_files(nb) -> None:
    text = "".join(o.get("text", "") for o in outputs_of(nb, "parquet.read") if o.output_type == "stream")
    assert "trades 60 quotes 200" in text
    assert "data/market/quotes.parquet" in text, "-v lists the pushed files"
    best = outputs_of(nb, "-o best")
    assert any(o.data["text/plain"].startswith("best") for o in best if o.output_type == "display_data")
    local = outputs_of(nb, 'best.groupby("Name")')[0].data["text/plain"]
    assert "Nasdaq" in local and "NYSE Arca" in local


def check_kernel(nb) -> None:
    text = all_text(nb)
    assert "rows: 60" in text and "min_size in the VM: 100" in text and "host python" in text


def check_per_session(nb) -> None:
    text = all_text(nb)
    assert "loaded 60 trades" in text and "symbols: 5" in text and "mode: per-session" in text
    assert outputs_of(nb, "a fresh server after the reset")[0]["text"].strip() == "False"


def check_per_cell(nb) -> None:
    text = all_text(nb)
    assert "loaded 60 trades" in text and "mode: per-cell" in text
    assert outputs_of(nb, "this cell has its own server")[0]["text"].strip() == "False"
    assert "AAPL" in outputs_of(nb, "groupby('Sym')")[0].data["text/plain"]


def check_live_data(nb) -> None:
    text = all_text(nb)
    views = [o for o in outputs_of(nb, 'time_table("PT0.5S")') if "dhvm-live" in o.get("data", {}).get("text/html", "")]
    assert len(views) == 1, "the ticking table is one live view"
    # the saved notebook keeps its last snapshot, marked stopped by the %dhvm live stop cell
    assert "○ stopped (stopped by %dhvm live stop)" in views[0]["data"]["text/plain"]
    assert "1 live view stopped" in text
    by_sym = outputs_of(nb, "-i orders")
    assert any("by_sym" in o.get("data", {}).get("text/html", "") for o in by_sym)
    assert "(200000, 9999950000.0)" in text and "200,000 rows" in text


CHECKS = {"quickstart.ipynb": check_quickstart, "live_data.ipynb": check_live_data, "data_files.ipynb": check_data_files,
          "kernel.ipynb": check_kernel, "per_session.ipynb": check_per_session, "per_cell.ipynb": check_per_cell}


def test_every_notebook_has_checks():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CHECKS)


@pytest.mark.parametrize("runner", ["nbconvert", "papermill"])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_headless_on_the_local_backend(name, runner, tmp_path, dhg_home, jupyter_path):
    nb = run_notebook(runner, name, tmp_path, dhg_home, backend="local")
    all_text(nb)  # no error outputs anywhere
    CHECKS[name](nb)


@pytest.mark.qemu
@pytest.mark.parametrize("runner", ["nbconvert", "papermill"])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_notebook_runs_headless_in_qemu_microvms(name, runner, tmp_path, qemu_home, jupyter_path):
    nb = run_notebook(runner, name, tmp_path, qemu_home, backend="qemu")
    all_text(nb)
    CHECKS[name](nb)
    status = "\n".join(o.get("text", "") for c in nb.cells if "%dhvm status" in c.get("source", "")
                       for o in c.get("outputs", []))
    assert not status or "backend: qemu" in status


def test_a_failing_cell_fails_the_nbconvert_run_with_the_remote_traceback(tmp_path, dhg_home):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext dhg_kernel"),
                nbformat.v4.new_code_cell("%%dhvm\nfrom deephaven import empty_table\nempty_table(1).update('X = nope')"),
                nbformat.v4.new_code_cell("print('never reached')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "fails.ipynb"
    nbformat.write(nb, path)
    env = {**os.environ, "DHG_HOME": str(dhg_home)}
    p = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(path),
                        "--output", str(tmp_path / "o.ipynb")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0
    assert "nope" in p.stderr and "in the Deephaven server" in p.stderr
    assert "never reached" not in p.stderr
