"""The example notebooks, executed headless the way users run them: `jupyter nbconvert --execute`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(nb_name: str, tmp_path: Path, home: Path) -> nbformat.NotebookNode:
    work = tmp_path / "nb"
    shutil.copytree(NOTEBOOKS, work)
    out = tmp_path / "out.ipynb"
    env = {**os.environ, "DHG_HOME": str(home)}
    p = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                        "--ExecutePreprocessor.timeout=600", str(work / nb_name), "--output", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return nbformat.read(out, 4)


def outputs_of(nb, marker: str) -> list:
    cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
    return cell.outputs


def test_quickstart_runs_end_to_end_and_shows_rows_and_dataframes(tmp_path, dhg_home):
    nb = execute("quickstart.ipynb", tmp_path, dhg_home)
    read = outputs_of(nb, 'read_csv("data/trades.csv")')
    text = "".join(o.get("text", "") for o in read if o.output_type == "stream")
    assert "rows: 60" in text
    html = [o.data["text/html"] for o in read if o.output_type == "display_data"]
    assert "trades" in html[0] and "<table" in html[1]
    summary = outputs_of(nb, "-o summary")
    heads = [o.data["text/plain"] for o in summary if o.output_type == "display_data"]
    assert any(h.startswith("summary") for h in heads)
    local = outputs_of(nb, "plain pandas on the host")[0]
    assert local.output_type == "execute_result" and "MSFT" in local.data["text/plain"]
    tables = outputs_of(nb, "%dhvm tables")[0].data["text/plain"]
    for name in ("trades", "symbols", "summary"):
        assert name in tables


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
    assert "DHError" in p.stderr or "nope" in p.stderr


def test_data_files_notebook_reads_csv_parquet_and_json_from_subfolders(tmp_path, dhg_home):
    nb = execute("data_files.ipynb", tmp_path, dhg_home)
    first = outputs_of(nb, "parquet.read")
    text = "".join(o.get("text", "") for o in first if o.output_type == "stream")
    assert "trades 60 quotes 200" in text
    assert "data/market/quotes.parquet" in text, "-v lists the pushed files"
    best = outputs_of(nb, "-o best")
    assert any(o.data["text/plain"].startswith("best") for o in best if o.output_type == "display_data")
    local = outputs_of(nb, 'best.groupby("Name")')[0]
    assert "Nasdaq" in local.data["text/plain"] and "NYSE Arca" in local.data["text/plain"]
