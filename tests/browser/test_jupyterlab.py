"""What a notebook user sees in a real JupyterLab: Debian's Chromium (driven by Playwright, never a
browser download) opens `jupyter lab`, picks "Deephaven microVM" in the launcher and runs cells the
way a user does (typed into the cell editor, Shift+Enter); the checks read the rendered DOM.

The tests of one backend share one JupyterLab and one notebook and run in file order: the first
cell makes the table ``t`` that later cells use; a ticking table's live view is watched updating
between cells, stopped and saved; then the kernel is interrupted, restarted (a fresh VM) and shut
down. Screenshots land in build/test-artifacts/ (jupyterlab-<backend>-<step>.png)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ARTIFACTS
from dhg_kernel.config import Layout
from dhg_kernel.instances import alive, list_instances, proc_start_time

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FIRST_OUTPUT_S = 180  # the first cell waits for the server (local: 10-30 s; qemu: a restore, then emulated cells)
CELL_S = 120  # later cells: a never-compiled formula takes seconds under emulation


# ---------------------------------------------------------------- the JupyterLab server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every live process below ``pid`` (the kernels, watchdogs, agents, VMs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(errors="replace")
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        start = proc_start_time(p)
        if start is not None:
            found[p] = start
        todo += children.get(p, [])
    return found


class Lab:
    """A `jupyter lab` subprocess of the test's own, and its REST API."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        root, settings = workdir / "notebooks", workdir / "lab-settings"
        root.mkdir()
        self.root = root  # where the notebooks are saved
        # No "Would you like to get notified about official Jupyter news?" toast over the screenshots.
        (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
        (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false"}))
        env = {**env, "JUPYTER_CONFIG_DIR": str(workdir / "config"), "JUPYTER_DATA_DIR": str(workdir / "data"),
               "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"), "IPYTHONDIR": str(workdir / "ipython")}
        argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                f"--ServerApp.token={self.token}", f"--ServerApp.root_dir={root}",
                f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workdir / 'workspaces'}",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.log = workdir / "jupyterlab.log"
        self._log_fh = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                self.api("status")
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer in {timeout_s} s:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.2)

    def shutdown_kernels(self) -> None:
        for k in self.api("kernels"):
            self.api(f"kernels/{k['id']}", method="DELETE")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the server shuts its remaining kernels down on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_fh.close()


# ---------------------------------------------------------------- the notebook in the browser

class Notebook:
    """One notebook page: type a cell, run it, and find its rendered outputs."""

    def __init__(self, page, backend: str):
        self.page, self.backend = page, backend
        self.cells = page.locator(".jp-Notebook .jp-Cell")

    def shot(self, step: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"jupyterlab-{self.backend}-{step}.png"))

    def type_in_last_cell(self, code: str):
        """Put ``code`` in the (empty) last cell's editor, as pasted text; returns that cell."""
        cell = self.cells.nth(self.cells.count() - 1)
        cell.locator(".cm-content").click()
        self.page.keyboard.insert_text(code)  # no auto-indent or bracket closing in the way
        return cell

    def run(self, code: str, timeout_s: float = CELL_S):
        """Run ``code`` in a new cell (Shift+Enter) and wait until it finished (its prompt shows its
        execution count instead of ``[*]``); returns the cell, whose outputs are rendered by then."""
        cell = self.type_in_last_cell(code)
        self.page.keyboard.press("Shift+Enter")
        prompt = cell.locator(".jp-InputPrompt")
        prompt.filter(has_text=re.compile(r"\[\d+\]")).wait_for(timeout=timeout_s * 1000)
        return cell

    @staticmethod
    def outputs(cell, mime: str | None = None):
        sel = ".jp-OutputArea-output" + (f'[data-mime-type="{mime}"]' if mime else "")
        return cell.locator(sel)


def _dataframe_values(table) -> list[list[str]]:
    """The body cells of a rendered pandas DataFrame, row by row (without the index column)."""
    return table.evaluate("t => [...t.querySelectorAll('tbody tr')].map("
                          "r => [...r.querySelectorAll('td')].map(c => c.textContent.trim()))")


def _kernel_processes(lab) -> tuple[int, list, dict[int, int]]:
    """The (one) running kernel's pid, the instances it owns, and {pid: start time} of everything
    that must go with it: the kernel, its watchdog, the agent or the VM (whether below the kernel or
    only recorded by its instances)."""
    (kernel,) = lab.api("kernels")
    assert kernel["name"] == "dhvm"
    (kernel_pid,) = [p for p in _descendants(lab.proc.pid)
                     if f"kernel-{kernel['id']}.json".encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
    instances = [i for i in list_instances(Layout(lab.home)) if i.owner_pid == kernel_pid]
    procs = {kernel_pid: proc_start_time(kernel_pid), **_descendants(kernel_pid),
             **{p.pid: p.start_time for i in instances for p in i.processes}}
    return kernel_pid, instances, procs


def _describe(procs: dict[int, int]) -> dict[int, str]:
    """{pid: command line} of the processes of ``procs`` still alive (for a failure message)."""
    out = {}
    for pid, start in procs.items():
        if alive(pid, start):
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            except OSError:
                out[pid] = "?"
    return out


def _wait_gone(procs: dict[int, int], timeout_s: float) -> tuple[dict[int, int], float]:
    """Wait until none of ``procs`` is alive; returns (those still alive, seconds waited)."""
    t0 = time.monotonic()
    while (left := {p: s for p, s in procs.items() if alive(p, s)}) and time.monotonic() - t0 < timeout_s:
        time.sleep(0.1)
    return left, time.monotonic() - t0


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lab_browser(browser):
    """The shared Chromium, where JupyterLab can be served."""
    if importlib.util.find_spec("jupyterlab") is None:
        pytest.skip("jupyterlab is not installed (pip install -e '.[test]')")
    return browser


@pytest.fixture(scope="module", params=["local", pytest.param("qemu", marks=pytest.mark.qemu)])
def lab(request, lab_browser, jupyter_path, tmp_path_factory):
    """A JupyterLab whose kernels run cells on ``request.param``'s backend, with the dhvm kernelspec."""
    backend = request.param
    workdir = tmp_path_factory.mktemp(f"jupyterlab-{backend}")
    home = request.getfixturevalue("qemu_home") if backend == "qemu" else workdir / "dhg-home"
    env = {**os.environ, "JUPYTER_PATH": jupyter_path, "DHG_HOME": str(home), "DHG_BACKEND": backend}
    lab = Lab(workdir, env)
    lab.backend, lab.home = backend, home
    try:
        lab.wait_ready()
        yield lab
    finally:
        try:
            lab.shutdown_kernels()
        except OSError:
            pass
        lab.stop()
        print(f"\n[jupyterlab-{backend}] log: {lab.log}")


@pytest.fixture(scope="module")
def notebook(lab, lab_browser):
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)  # rendering on a busy machine (cells have their own, longer, waits)
    ctx = lab_browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{lab.url}/lab?token={lab.token}")
    yield Notebook(page, lab.backend)
    ctx.close()
    expect.set_options(timeout=5_000)  # Playwright's default


# ---------------------------------------------------------------- the user's session, in order

def test_the_launcher_offers_a_deephaven_microvm_notebook(notebook):
    from playwright.sync_api import expect

    page = notebook.page
    tile = page.locator('.jp-LauncherCard[data-category="Notebook"][title="Deephaven microVM"]')
    expect(tile).to_be_visible(timeout=90_000)
    expect(tile.locator("img")).to_have_attribute("src", re.compile(r"/kernelspecs/dhvm/logo"))
    notebook.shot("1-launcher")
    tile.click()
    expect(page.locator(".jp-Notebook .jp-Cell .cm-content").first).to_be_visible()
    expect(page.locator(".jp-NotebookPanel-toolbar")).to_contain_text("Deephaven microVM")
    notebook.shot("2-notebook")


def test_a_table_renders_as_a_dataframe_under_its_name_and_size(notebook):
    from playwright.sync_api import expect

    cell = notebook.run('from deephaven import empty_table\nt = empty_table(5).update(["X = i", "Y = X * 2"])',
                        timeout_s=FIRST_OUTPUT_S)
    notebook.shot("3-table")
    heading = notebook.outputs(cell, "text/html").locator("h4")
    expect(heading).to_have_count(1)
    expect(heading.locator("code")).to_have_text("t")
    expect(heading).to_contain_text("5 rows")
    table = notebook.outputs(cell, "text/html").locator("table.dataframe")
    expect(table).to_have_count(1)
    expect(table.locator("thead")).to_contain_text("X")
    assert _dataframe_values(table) == [[str(i), str(2 * i)] for i in range(5)]
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)


def test_html_and_a_displayed_table_render(notebook):
    from playwright.sync_api import expect

    cell = notebook.run('from IPython.display import HTML\ndisplay(HTML("<b id=\'dhg-html\'>hello</b>"))\ndisplay(t)')
    notebook.shot("4-html")
    bold = notebook.outputs(cell, "text/html").locator("b#dhg-html")
    expect(bold).to_have_text("hello")
    table = notebook.outputs(cell, "text/html").locator("table.dataframe")
    expect(table).to_have_count(1)
    assert _dataframe_values(table) == [[str(i), str(2 * i)] for i in range(5)]
    expect(notebook.outputs(cell, "text/html").locator("h4 code")).to_have_text("t")
    # in the order the cell made them: the HTML first, then the table's heading and the table
    mimes = notebook.outputs(cell).evaluate_all("els => els.map(e => e.innerHTML)")
    assert "dhg-html" in mimes[0] and "dataframe" in mimes[-1], mimes


def test_a_help_request_pages_the_vm_table_and_history_keeps_cells_as_typed(notebook):
    from playwright.sync_api import expect

    cell = notebook.run("t?")
    expect(notebook.outputs(cell)).to_contain_text("Deephaven table: 5 rows")  # t is the VM's, not the host's
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)
    cell = notebook.run("%history -l 2")
    lines = notebook.outputs(cell).inner_text().splitlines()
    assert "t?" in lines and "display(t)" in lines and not [line for line in lines if "dhvm" in line], lines


def test_matplotlib_shows_an_inline_png(notebook):
    from playwright.sync_api import expect

    cell = notebook.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])")
    notebook.shot("5-matplotlib")
    img = notebook.outputs(cell, "image/png").locator("img")
    expect(img).to_have_count(1)
    expect(img).to_have_attribute("src", re.compile(r"^data:image/png;base64,iVBOR"))
    assert img.evaluate("i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100"), "the PNG decodes"


def test_plotly_renders_an_interactive_plot(notebook):
    from playwright.sync_api import expect

    if importlib.util.find_spec("plotly") is None:
        pytest.skip("plotly is not installed on the host, so JupyterLab has no plotly renderer (pip install -e '.[local]')")
    cell = notebook.run("import plotly.express as px\npx.line(x=[1, 2, 3], y=[3, 1, 2])")
    # JupyterLab's plotly mime renderer (the jupyterlab-plotly extension of the host's plotly
    # package), not the text/html fallback: the output widget is a jp-RenderedPlotly.
    plot = cell.locator(".jp-OutputArea-output.jp-RenderedPlotly")
    expect(plot).to_have_count(1)
    expect(plot).to_have_class(re.compile(r"\bjs-plotly-plot\b"))
    expect(plot.locator(".plot-container .main-svg").first).to_be_visible()
    expect(plot.locator(".scatterlayer .trace path.js-line")).to_have_count(1)  # the line is drawn
    expect(plot.locator(".modebar")).to_have_count(1)  # the interactive toolbar (zoom, pan…)
    expect(notebook.outputs(cell, "text/html")).to_have_count(0)
    notebook.shot("6-plotly")


def test_tab_completion_lists_vm_methods_and_the_state_survives(notebook):
    from playwright.sync_api import expect

    page = notebook.page
    cell = notebook.cells.nth(notebook.cells.count() - 1)
    cell.locator(".cm-content").click()
    page.keyboard.type("t.upd")
    page.keyboard.press("Tab")
    completer = page.locator(".jp-Completer")
    expect(completer).to_be_visible(timeout=CELL_S * 1000)
    expect(completer.locator('.jp-Completer-item[data-value="update"]')).to_have_count(1)
    notebook.shot("7-completion")
    page.keyboard.press("Escape")
    expect(completer).to_be_hidden()
    # the same cell, its text replaced: print(t.size)
    cell.locator(".cm-content").click()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.press("Delete")
    expect(cell.locator(".cm-content")).to_have_text("")
    cell = notebook.run("print(t.size)")
    notebook.shot("8-after-completion")
    expect(notebook.outputs(cell)).to_have_count(1)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("5\n")


def test_an_error_shows_the_deephaven_summary_before_the_java_trace(notebook):
    from playwright.sync_api import expect

    cell = notebook.run('t2 = t.update("Z = nosuch + 1")')
    err = notebook.outputs(cell, "application/vnd.jupyter.stderr")
    expect(err).to_have_count(1)
    err.evaluate("e => e.scrollIntoView({block: 'start'})")  # the screenshot shows what a user reads first
    notebook.shot("9-error")
    lines = [line.strip() for line in err.inner_text().splitlines()]
    assert "--- in the Deephaven server ---" in lines, lines[:10]
    after = lines[lines.index("--- in the Deephaven server ---") + 1:]
    print("\n".join(["[error output, first lines]", *after[:5]]))
    head = after[:3]
    assert any("Cannot find variable or class nosuch" in line for line in head), head
    assert any("nosuch + 1" in line for line in head), head
    java = [i for i, line in enumerate(after) if line.startswith("at io.deephaven.")]
    assert len(java) > 10, "the whole Java trace is still there, for whoever needs it"
    assert "--- full traceback ---" in after[:java[0]], f"the summary comes first, then the trace: {after[:java[0] + 1]}"


# What a live view shows, read in one go: its data-rows, its heading as the user reads it, the
# header and body cells of its table.
_LIVE_JS = """v => ({rows: v.dataset.rows, heading: v.querySelector('h4').innerText.replace(/\\s+/g, ' ').trim(),
    columns: [...v.querySelectorAll('table.dataframe thead th')].map(c => c.textContent.trim()),
    index: [...v.querySelectorAll('table.dataframe tbody tr')].map(r => r.querySelector('th').textContent.trim()),
    values: [...v.querySelectorAll('table.dataframe tbody tr')].map(
        r => [...r.querySelectorAll('td')].map(c => c.textContent.trim()))})"""
# Every frame the page paints (until _watched is called): how many live views the notebook holds,
# and each distinct "data-rows heading" the view showed, in order.
_WATCH_JS = """() => {
    const w = {frames: 0, min: Infinity, max: 0, states: [], done: false};
    window.__dhvmWatch = w;
    const look = () => {
        const views = document.querySelectorAll('.jp-Notebook .dhvm-live');
        w.frames++;
        w.min = Math.min(w.min, views.length);
        w.max = Math.max(w.max, views.length);
        if (views.length) {
            const s = views[0].dataset.rows + ' ' + views[0].querySelector('h4').innerText;
            if (s !== w.states[w.states.length - 1]) w.states.push(s);
        }
        if (!w.done) requestAnimationFrame(look);
    };
    requestAnimationFrame(look);
}"""
# A running view's heading names the moment of its data: the saved notebook keeps it, and must not claim "live".
LIVE_HEADING = re.compile(r"snapshot at \d\d:\d\d:\d\d UTC \(live while the kernel runs; re-run the cell to resume\)")
STOPPED_HEADING = re.compile(r"○ stopped \(stopped by %dhvm live stop\) · final snapshot at \d\d:\d\d:\d\d UTC")


def _live_state(view) -> dict:
    """The live view as the user reads it: ``rows`` (data-rows), ``shown_rows`` (the heading's
    "N rows"), ``heading`` and ``xs``, the X column of the rows shown."""
    s = view.evaluate(_LIVE_JS)
    size = re.search(r"([\d,]+) rows × (\d+) columns", s["heading"])
    assert size, s["heading"]
    s["rows"], s["shown_rows"] = int(s["rows"]), int(size.group(1).replace(",", ""))
    x = s["columns"].index("X") - 1  # (the first header cell is the index's, which has no td)
    s["xs"] = [int(r[x]) for r in s["values"]]
    return s


def _check_consistent(s: dict) -> None:
    """One snapshot: the heading's size is data-rows, and the rows shown are the table's last 10
    (X = i: the row numbers up to rows - 1), each labelled with its row number."""
    assert s["shown_rows"] == s["rows"], s
    n = min(10, s["rows"])
    assert s["xs"] == list(range(s["rows"] - n, s["rows"])), s
    assert s["index"] == [str(x) for x in s["xs"]], s


def _watched(page) -> dict:
    """What the page painted since _WATCH_JS started (which it stops)."""
    return page.evaluate("() => { const w = window.__dhvmWatch; w.done = true; "
                         "return {frames: w.frames, min: w.min, max: w.max, states: w.states}; }")


def _save(lab, notebook, timeout_s: float = 60) -> Path:
    """Save the notebook as a user does (Ctrl+S; an untitled notebook's first save asks for a name:
    the one offered is kept); returns the .ipynb on disk once this save wrote it."""
    page = notebook.page
    tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current")
    dialog = page.locator(".jp-Dialog")
    t0 = time.time_ns()
    page.keyboard.press("ControlOrMeta+s")
    deadline = time.monotonic() + timeout_s
    while True:
        if dialog.count():
            notebook.shot("live-4-save-dialog")
            dialog.locator("button.jp-mod-accept").click()
            from playwright.sync_api import expect

            expect(dialog).to_have_count(0)
        (session,) = [s for s in lab.api("sessions") if s["type"] == "notebook"]
        path = lab.root / session["path"]
        dirty = "jp-mod-dirty" in (tab.get_attribute("class") or "")
        if path.is_file() and path.stat().st_mtime_ns >= t0 and not dirty:
            return path
        assert time.monotonic() < deadline, f"the notebook was not saved in {timeout_s} s (dirty: {dirty}, {path})"
        time.sleep(0.2)


def test_a_ticking_table_shows_a_live_view_that_updates_between_cells(notebook):
    from playwright.sync_api import expect

    page = notebook.page
    cell = notebook.run("from deephaven import time_table\nticks = time_table('PT0.2S').update('X = i')",
                        timeout_s=FIRST_OUTPUT_S)
    view = notebook.outputs(cell, "text/html").locator("div.dhvm-live")
    expect(view).to_have_count(1)
    expect(view).to_have_attribute("data-table", "ticks")
    expect(view.locator("h4 code")).to_have_text("ticks")
    # the first snapshot is the cell's; "updated" comes with the view's own updates
    expect(view.locator("h4")).to_contain_text(LIVE_HEADING, timeout=CELL_S * 1000)
    expect(view).not_to_have_attribute("data-rows", "0")  # (a just-made time_table has no row until it ticks)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)
    # (its output, not the view: every update renders a new div.dhvm-live into the same output)
    notebook.outputs(cell, "text/html").scroll_into_view_if_needed()
    page.evaluate(_WATCH_JS)
    first = _live_state(view)
    notebook.shot("live-1")
    page.wait_for_timeout(3000)  # nothing runs: only the view's own updates can change the page
    second = _live_state(view)
    notebook.shot("live-2-3s-later")
    painted = _watched(page)
    print(f"\n[jupyterlab-{notebook.backend}] live view: {first['heading']!r} -> {second['heading']!r}; "
          f"{len(painted['states'])} states painted in {painted['frames']} frames")
    for s in (first, second):
        _check_consistent(s)
        assert LIVE_HEADING.search(s["heading"]) and "ticks" in s["heading"], s["heading"]
    assert second["rows"] > first["rows"], (first, second)
    assert second["xs"][-1] > first["xs"][-1], (first["xs"], second["xs"])
    # the view updated in place: one output, in this cell only, in every frame painted
    assert painted["frames"] > 0 and painted["min"] == painted["max"] == 1, painted
    assert len(painted["states"]) >= 2, painted
    # (besides, at most the note of the server's start when this is the notebook's first cell)
    texts = notebook.outputs(cell).evaluate_all("els => els.map(e => e.querySelector('.dhvm-live') ? 'VIEW' : e.innerText)")
    assert texts.count("VIEW") == 1 and all(t == "VIEW" or t.startswith("dhvm: ") for t in texts), texts
    expect(page.locator(".jp-Notebook .dhvm-live")).to_have_count(1)


def test_live_stop_leaves_the_view_stopped_on_its_final_snapshot(notebook):
    from playwright.sync_api import expect

    page = notebook.page
    view = page.locator(".jp-Notebook div.dhvm-live")
    expect(view).to_have_count(1)
    before = _live_state(view)
    assert LIVE_HEADING.search(before["heading"]), before["heading"]
    cell = notebook.run("%dhvm live stop")
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("dhvm: 1 live view stopped.\n")
    expect(notebook.outputs(cell)).to_have_count(1)
    expect(view.locator("h4")).to_contain_text(STOPPED_HEADING)
    expect(view).to_have_count(1)
    view.scroll_into_view_if_needed()
    page.evaluate(_WATCH_JS)
    stopped = _live_state(view)
    notebook.shot("live-3-stopped")
    page.wait_for_timeout(3000)  # the table still ticks in the server; the view must not follow it
    after = _live_state(view)
    painted = _watched(page)
    print(f"\n[jupyterlab-{notebook.backend}] stopped view: {stopped['heading']!r}, 3 s later {after['heading']!r}")
    _check_consistent(stopped)
    assert "● live" not in stopped["heading"], stopped["heading"]
    assert stopped["rows"] >= before["rows"], (before, stopped)
    assert after == stopped, (stopped, after)
    assert painted["frames"] > 0 and painted["min"] == painted["max"] == 1 and len(painted["states"]) == 1, painted


def test_the_saved_notebook_keeps_the_live_views_final_snapshot_marked_stopped(lab, notebook):
    page = notebook.page
    shown = _live_state(page.locator(".jp-Notebook div.dhvm-live"))
    path = _save(lab, notebook)
    notebook.shot("live-5-saved")
    nb = json.loads(path.read_text())

    def text(value) -> str:  # nbformat keeps multi-line strings as lists of lines
        return "".join(value) if isinstance(value, list) else value

    views = [(c, o) for c in nb["cells"] for o in c.get("outputs", [])
             if "dhvm-live" in text(o.get("data", {}).get("text/html", ""))]
    assert len(views) == 1, [o for _, o in views]
    (cell, out), = views
    assert "time_table" in text(cell["source"]) and out["output_type"] == "display_data", (cell["source"], out)
    plain, rich = text(out["data"]["text/plain"]), text(out["data"]["text/html"])
    assert "○ stopped (stopped by %dhvm live stop) · final snapshot at" in plain, plain
    assert "● live" not in plain and "● live" not in rich, plain
    assert f"data-rows='{shown['rows']}'" in rich, (shown["rows"], rich[:300])
    assert f"ticks  ({shown['rows']:,} rows × " in plain, plain
    assert "transient" not in out, out  # the display id is not saved: the output is plain display_data
    stop = [c for c in nb["cells"] if text(c["source"]).strip() == "%dhvm live stop"]
    assert len(stop) == 1 and [text(o.get("text", "")) for o in stop[0]["outputs"]] == ["dhvm: 1 live view stopped.\n"], stop


# The points of a cell's plot (the Plotly graph div holds the figure it drew; 0 while it is redrawn).
_PLOT_POINTS_JS = "c => { const p = c.querySelector('.jp-RenderedPlotly'); return p && p.data ? p.data[0].y.length : 0 }"


def _plot_points(cell, timeout_s: float = 10) -> int:
    """How many points the cell's plot shows (waiting out a redraw: each update renders the plot anew)."""
    deadline = time.monotonic() + timeout_s
    while not (n := cell.evaluate(_PLOT_POINTS_JS)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_an_assigned_plotly_express_figure_renders_and_ticks(notebook):
    """``fig = dx.line(...)``, the style of Deephaven's docs: the plot shows (as an assigned table does),
    drawn by JupyterLab's Plotly renderer, and redrawn as its ticking table grows."""
    from playwright.sync_api import expect

    if importlib.util.find_spec("plotly") is None:
        pytest.skip("plotly is not installed on the host, so JupyterLab has no plotly renderer (pip install -e '.[local]')")
    page = notebook.page
    cell = notebook.run("import deephaven.plot.express as dx\nfrom deephaven import time_table\n"
                        "fig_src = time_table('PT0.5S').update('X = i')\nfig = dx.line(fig_src, x='Timestamp', y='X')",
                        timeout_s=FIRST_OUTPUT_S)
    plot = cell.locator(".jp-OutputArea-output.jp-RenderedPlotly")
    expect(plot).to_have_count(1, timeout=CELL_S * 1000)
    cell.evaluate("c => c.scrollIntoView()")  # (not Playwright's: it waits for a still element)
    notebook.shot("figure-0")
    page.wait_for_function(f"() => ({_PLOT_POINTS_JS})([...document.querySelectorAll('.jp-Notebook .jp-Cell')]"
                           f".find(c => c.innerText.includes('dx.line(fig_src'))) >= 2", timeout=CELL_S * 1000)
    # dx.line draws with WebGL (scattergl): the line is in the plot's canvas, over its SVG axes
    expect(plot.locator(".plot-container .main-svg").first).to_be_visible(timeout=CELL_S * 1000)
    expect(plot.locator(".modebar")).to_have_count(1)  # the interactive toolbar (zoom, pan…)
    assert cell.evaluate("c => c.querySelector('.jp-RenderedPlotly').data[0].type") in ("scatter", "scattergl")
    heading = notebook.outputs(cell, "text/html").locator(".dhvm-figure h4")
    expect(heading).to_contain_text(LIVE_HEADING, timeout=CELL_S * 1000)
    expect(heading.locator("code")).to_have_text("fig")
    first = _plot_points(cell)
    notebook.shot("figure-1")
    # the plot output's height in every frame painted for 3 s, in which only the view can redraw the plot
    heights = page.evaluate("""c => new Promise(done => { const hs = []; const t0 = performance.now();
        const look = () => { hs.push(c.querySelector('.jp-OutputArea').getBoundingClientRect().height);
            if (performance.now() - t0 < 3000) requestAnimationFrame(look); else done(hs); };
        requestAnimationFrame(look); })""", cell.element_handle())
    later = _plot_points(cell)
    notebook.shot("figure-2-3s-later")
    print(f"\n[jupyterlab-{notebook.backend}] assigned figure: {first} -> {later} points in 3 s; its outputs' "
          f"height over {len(heights)} frames: {min(heights):.0f}-{max(heights):.0f} px "
          f"({sum(h != heights[0] for h in heights)} frames differ from the first)")
    assert later > first >= 1, (first, later)
    expect(plot).to_have_count(1)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)


def _dirty(page) -> bool:
    tab = page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current")
    return "jp-mod-dirty" in (tab.get_attribute("class") or "")


def _save_now(lab, notebook, timeout_s: float = 60) -> Path:
    """Ctrl+S; returns the .ipynb once this save wrote it (a running view may make it dirty again at once,
    so unlike _save this does not wait for a clean tab)."""
    page = notebook.page
    t0 = time.time_ns()
    page.keyboard.press("ControlOrMeta+s")
    deadline = time.monotonic() + timeout_s
    while True:
        dialog = page.locator(".jp-Dialog")
        if dialog.count():  # an untitled notebook's first save asks for a name: the one offered is kept
            dialog.locator("button.jp-mod-accept").click()
        (session,) = [s for s in lab.api("sessions") if s["type"] == "notebook"]
        path = lab.root / session["path"]
        if path.is_file() and path.stat().st_mtime_ns >= t0:
            time.sleep(0.5)  # (the contents API writes the file in one go; let it finish)
            return path
        assert time.monotonic() < deadline, f"the notebook was not saved in {timeout_s} s ({path})"
        time.sleep(0.2)


def _dirty_within(page, seconds: float) -> float | None:
    """Seconds until the notebook's tab showed unsaved changes (None: not within ``seconds``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if _dirty(page):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def test_a_view_saved_while_it_runs_says_snapshot_and_reopens_as_one(lab, notebook):
    """Saved while its view runs, the figure's heading says "snapshot at T (live while the kernel runs;
    re-run the cell to resume)", never "● live"; reopened (the kernel still feeding the view), it shows
    that snapshot and stays still. Also measured: JupyterLab's "unsaved changes" after a save."""
    from playwright.sync_api import expect

    page = notebook.page
    path = _save_now(lab, notebook)
    nb = json.loads(path.read_text())

    def text(value) -> str:
        return "".join(value) if isinstance(value, list) else value

    (cell,) = [c for c in nb["cells"] if "dx.line(fig_src" in text(c["source"])]
    outs = cell["outputs"]
    headings = [text(o["data"]["text/plain"]) for o in outs if "dhvm-figure" in text(o.get("data", {}).get("text/html", ""))]
    plots = [o for o in outs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(headings) == 1 and len(plots) == 1, outs
    assert LIVE_HEADING.search(headings[0]), headings[0]
    saved = path.read_text()
    assert "● live" not in saved
    saved_points = len(plots[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["y"])
    became_dirty = _dirty_within(page, 4.0)
    print(f"\n[jupyterlab-{notebook.backend}] saved with a view running: unsaved changes again after "
          f"{became_dirty if became_dirty is None else round(became_dirty, 2)} s")

    # Reopen it: a reload of the page opens the notebook from disk, on the same kernel, whose view runs on.
    page.once("dialog", lambda d: d.accept())  # ("leave the page with unsaved changes?")
    page.reload()
    fig_cell = page.locator(".jp-Notebook .jp-Cell", has_text="dx.line(fig_src")
    plot = fig_cell.locator(".jp-OutputArea-output.jp-RenderedPlotly")
    expect(plot).to_have_count(1, timeout=60_000)
    heading = fig_cell.locator(".dhvm-figure h4")
    expect(heading).to_contain_text(LIVE_HEADING)
    # (JupyterLab does not lay out cells outside the window, so their inner_text is empty: scroll first,
    # and compare the text the DOM holds)
    fig_cell.evaluate("c => c.scrollIntoView()")
    shown = heading.text_content()
    assert LIVE_HEADING.search(shown), shown
    notebook.shot("figure-3-reopened")
    page.wait_for_timeout(3000)
    assert heading.text_content() == shown  # a snapshot: nothing moves it
    assert saved_points >= 1

    cell = notebook.run("%dhvm live")
    assert "fig" in cell.inner_text(), "the kernel still feeds the view (updates no output on the page)"
    cell = notebook.run("%dhvm live stop")
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_contain_text("stopped.")
    _save_now(lab, notebook)
    quiet = _dirty_within(page, 3.0)
    print(f"[jupyterlab-{notebook.backend}] saved with no view running: unsaved changes after {quiet} s")
    assert quiet is None


def test_interrupting_a_sleeping_cell_stops_it_and_keeps_the_vm(notebook):
    from playwright.sync_api import expect

    page = notebook.page
    cell = notebook.run("kept = 41", timeout_s=FIRST_OUTPUT_S)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)
    # The print shows the cell is running in the VM (not still queued) before the user interrupts.
    cell = notebook.type_in_last_cell("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    page.keyboard.press("Shift+Enter")
    prompt = cell.locator(".jp-InputPrompt")
    expect(prompt).to_have_text(re.compile(r"\[\*\]"))
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("sleeping\n", timeout=CELL_S * 1000)
    # The notebook toolbar's ■ button, as a user clicks it.
    button = page.locator(".jp-NotebookPanel-toolbar [data-command='notebook:interrupt-kernel']")
    expect(button).to_have_attribute("title", "Interrupt the kernel")
    t0 = time.monotonic()
    button.click()
    prompt.filter(has_text=re.compile(r"\[\d+\]")).wait_for(timeout=45_000)
    stopped_s = time.monotonic() - t0
    print(f"\n[jupyterlab-{notebook.backend}] the interrupted cell stopped {stopped_s:.2f} s after the click")
    err = notebook.outputs(cell, "application/vnd.jupyter.stderr")
    expect(err).to_have_count(1)
    notebook.shot("10-interrupt")
    assert stopped_s < 15, f"the cell took {stopped_s:.1f} s to stop after the interrupt"
    text = err.inner_text()
    assert "KeyboardInterrupt" in text, text[-2000:]
    assert "state (tables, variables) is lost" not in text, f"the interrupt replaced the VM: {text[-2000:]}"
    # The VM and its variables survived the interrupt.
    cell = notebook.run("print(kept + 1)")
    notebook.shot("11-after-interrupt")
    expect(notebook.outputs(cell)).to_have_count(1)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("42\n")


def test_restarting_the_kernel_gives_a_fresh_vm_and_ends_the_old_one(lab, notebook):
    from playwright.sync_api import expect

    page = notebook.page
    old_pid, old_instances, old_procs = _kernel_processes(lab)
    assert old_instances and all(i.backend == lab.backend and i.processes for i in old_instances), old_instances
    assert all(alive(p, s) for p, s in old_procs.items()), old_procs
    names = sorted(Path(f"/proc/{p}/comm").read_text().strip() for p in old_procs)
    # Kernel menu > Restart Kernel…, then the dialog's Restart.
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Kernel$")).click()
    page.locator(".lm-Menu-item[data-command='kernelmenu:restart']").click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Restart Kernel?")
    notebook.shot("12-restart-dialog")
    t0 = time.monotonic()
    dialog.locator("button.jp-mod-accept").click()
    expect(dialog).to_have_count(0)
    left, gone_s = _wait_gone(old_procs, 30)
    print(f"\n[jupyterlab-{notebook.backend}] the old kernel's {len(old_procs)} processes {names} were gone "
          f"{gone_s:.2f} s after the restart was confirmed")
    assert not left, f"processes of the old kernel left {gone_s:.0f} s after the restart: {_describe(left)}"
    assert gone_s < 10, f"the old kernel's processes took {gone_s:.1f} s to go"
    assert not any(Path(i.dir).exists() for i in old_instances), "the old instances' run directories are removed"
    # A fresh VM: the variables of before are gone, and cells run.
    cell = notebook.run("print('kept' in globals())", timeout_s=FIRST_OUTPUT_S)
    first_s = time.monotonic() - t0
    print(f"[jupyterlab-{notebook.backend}] the first cell after the restart finished {first_s:.2f} s "
          f"after the restart was confirmed")
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("False\n")
    # (besides, at most the note of the new server's start: "dhvm: … ready in 15.9 s")
    outputs = notebook.outputs(cell).evaluate_all("els => els.map(e => e.innerText)")
    print(f"[jupyterlab-{notebook.backend}] the first cell after the restart shows: {outputs}")
    assert all(o == "False\n" or o.startswith("dhvm: ") for o in outputs), outputs
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)
    cell = notebook.run("print(sum(range(10)))")
    notebook.shot("13-after-restart")
    expect(notebook.outputs(cell)).to_have_count(1)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("45\n")
    new_pid, new_instances, _ = _kernel_processes(lab)
    assert new_pid != old_pid
    assert new_instances and not {i.id for i in new_instances} & {i.id for i in old_instances}, new_instances


def test_shutting_the_kernel_down_leaves_no_process(lab, notebook):
    kernel_pid, (instance,), procs = _kernel_processes(lab)
    assert instance.backend == lab.backend and instance.processes, instance
    assert all(alive(p.pid, p.start_time) for p in instance.processes), instance
    lab.shutdown_kernels()
    assert lab.api("kernels") == []
    left, _ = _wait_gone(procs, 30)
    assert not left, f"processes left after the kernel shut down: {_describe(left)}"
    assert not Path(instance.dir).exists(), "the instance's run directory is removed"
    assert [i for i in list_instances(Layout(lab.home)) if i.owner_pid == kernel_pid] == []
    lab.stop()
    assert lab.proc.returncode is not None


# ---------------------------------------------------------------- checkpoints, forks and named sessions
# These come after the kernel was shut down and JupyterLab stopped (the tests above, in a whole-file
# run), or straight after the launcher (-k): each opens what it needs.

def _dataframe_records(table) -> list[dict[str, str]]:
    """The rows of a rendered pandas DataFrame as {column header: cell text} (without the index)."""
    return table.evaluate("t => { const h = [...t.querySelectorAll('thead th')].slice(1).map(c => c.textContent.trim());"
                          " return [...t.querySelectorAll('tbody tr')].map(r => Object.fromEntries("
                          "[...r.querySelectorAll('td')].map((c, i) => [h[i], c.textContent.trim()]))); }")


def _open_microvm_notebook(request, lab, notebook) -> None:
    """A "Deephaven microVM" notebook open and its kernel idle: the one of the tests above if it is
    still open; else a new one from the launcher, in a JupyterLab started again if the shutdown test
    stopped it (the ``lab`` fixture then stops the new one)."""
    from playwright.sync_api import expect

    page = notebook.page
    if lab.proc.poll() is not None:
        workdir = request.getfixturevalue("tmp_path_factory").mktemp(f"jupyterlab-{lab.backend}-again")
        env = {**os.environ, "JUPYTER_PATH": request.getfixturevalue("jupyter_path"), "DHG_HOME": str(lab.home),
               "DHG_BACKEND": lab.backend}
        again = Lab(workdir, env)
        again.backend, again.home = lab.backend, lab.home
        lab.__dict__.update(again.__dict__)
        lab.wait_ready()
        page.goto(f"{lab.url}/lab?token={lab.token}")
    panel = page.locator(".jp-NotebookPanel")
    tile = page.locator('.jp-LauncherCard[data-category="Notebook"][title="Deephaven microVM"]')
    expect(panel.or_(tile).first).to_be_visible(timeout=90_000)
    if not panel.count():
        tile.click()
    expect(page.locator(".jp-NotebookPanel-toolbar")).to_contain_text("Deephaven microVM")
    # A cell run before the kernel is connected is not run at all (its prompt stays "[ ]").
    expect(page.locator("#jp-main-statusbar")).to_contain_text("Deephaven microVM | Idle", timeout=90_000)


def test_a_qemu_notebook_checkpoints_restores_and_forks_into_a_named_session(request, lab, notebook):
    from playwright.sync_api import expect

    from dhg_kernel.vm import checkpoint_store as store

    if lab.backend != "qemu":
        pytest.skip("checkpoints need a microVM (the local backend's refusal is tested below)")
    name, fork = f"jl-{secrets.token_hex(4)}", f"jlfork-{secrets.token_hex(3)}"
    layout = Layout(lab.home)
    stdout = "application/vnd.jupyter.stdout"
    _open_microvm_notebook(request, lab, notebook)
    try:
        cell = notebook.run('from deephaven import empty_table\nck_v = 1\nck_t = empty_table(3).update(["X = i * 10"])',
                            timeout_s=FIRST_OUTPUT_S)
        expect(notebook.outputs(cell, "text/html").locator("h4 code")).to_have_text("ck_t")

        cell = notebook.run(f"%dhvm checkpoint {name}")
        notebook.shot("ck-1-checkpoint")
        expect(notebook.outputs(cell)).to_have_count(1)
        text = notebook.outputs(cell, stdout).inner_text()
        print(f"\n[jupyterlab-qemu] {text.strip()}")
        saved = re.match(rf"dhvm: checkpoint {re.escape(name)} saved in [\d.]+ s: [\d.]+ GiB on disk, "
                         r"tables: (.*)\. The session runs on\.\n", text)
        assert saved and "ck_t" in saved.group(1).split(", "), text
        assert f"%dhvm restore {name} (this session)" in text and "%dhvm fork NEW" in text, text
        assert (layout.checkpoint(name) / "metadata.json").is_file()

        cell = notebook.run("%dhvm checkpoints")
        notebook.shot("ck-2-checkpoints")
        rows = [r for r in _dataframe_records(notebook.outputs(cell, "text/html").locator("table.dataframe"))
                if r["name"] == name]
        assert len(rows) == 1, rows
        assert rows[0]["backend"] == "qemu" and "ck_t" in rows[0]["tables"], rows

        # The session runs on after the checkpoint; change what it holds, then go back.
        cell = notebook.run('ck_v = 2\nck_t = empty_table(1)\nprint(ck_v, ck_t.size)')
        expect(notebook.outputs(cell, stdout)).to_have_text("2 1\n")
        cell = notebook.run(f"%dhvm restore {name}")
        expect(notebook.outputs(cell)).to_have_count(1)
        expect(notebook.outputs(cell, stdout)).to_have_text(re.compile(
            rf"^dhvm: this session now runs a server restored from checkpoint {re.escape(name)} "
            r"\(in [\d.]+ s\); its earlier server was discarded\.\n$"))
        print(f"[jupyterlab-qemu] {notebook.outputs(cell, stdout).inner_text().strip()}")
        cell = notebook.run("print(ck_v, ck_t.size)")
        notebook.shot("ck-3-restored")
        expect(notebook.outputs(cell)).to_have_count(1)
        expect(notebook.outputs(cell, stdout)).to_have_text("1 3\n")

        # A fork: a second session from this one's state; a -s cell changes only the fork.
        cell = notebook.run(f"%dhvm fork {fork}")
        expect(notebook.outputs(cell, stdout)).to_have_text(re.compile(
            rf"^dhvm: session {fork} forked from main in [\d.]+ s; both run on\. Run cells in it with %%dhvm -s {fork}\n$"))
        print(f"[jupyterlab-qemu] {notebook.outputs(cell, stdout).inner_text().strip()}")
        cell = notebook.run(f'%%dhvm -s {fork}\nck_v = 99\nck_u = ck_t.update(["Y = X + 1"])\nprint("in the fork", ck_v, ck_t.size)')
        notebook.shot("ck-4-fork-cell")
        expect(notebook.outputs(cell, stdout)).to_have_text("in the fork 99 3\n")
        expect(notebook.outputs(cell, "text/html").locator("h4 code")).to_have_text("ck_u")
        assert _dataframe_values(notebook.outputs(cell, "text/html").locator("table.dataframe")) == [
            [str(10 * i), str(10 * i + 1)] for i in range(3)]
        expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)
        cell = notebook.run('print(ck_v, "ck_u" in globals())')
        expect(notebook.outputs(cell, stdout)).to_have_text("1 False\n")  # the main session is untouched

        cell = notebook.run("%dhvm sessions")
        notebook.shot("ck-5-sessions")
        sessions = {r["session"]: r for r in _dataframe_records(notebook.outputs(cell, "text/html").locator("table.dataframe"))}
        assert sorted(sessions) == sorted(["main", fork]), sessions
        assert all(s["running"] == "True" and s["backend"] == "qemu" for s in sessions.values()), sessions
        assert sessions["main"]["started_from"] == name, sessions

        cell = notebook.run(f"%dhvm -s {fork} stop")
        expect(notebook.outputs(cell, stdout)).to_have_text(f"dhvm: session {fork} stopped.\n")
        cell = notebook.run("%dhvm sessions")
        records = _dataframe_records(notebook.outputs(cell, "text/html").locator("table.dataframe"))
        assert [r["session"] for r in records] == ["main"], records
        cell = notebook.run("print(ck_v)")
        expect(notebook.outputs(cell, stdout)).to_have_text("1\n")
    finally:
        if layout.checkpoint(name).exists():
            store.remove(layout, name)
    assert name not in [c.name for c in store.list_all(layout)]


def test_the_local_backend_refuses_a_checkpoint_in_the_cell_and_keeps_working(request, lab, notebook):
    from playwright.sync_api import expect

    if lab.backend != "local":
        pytest.skip("the qemu backend saves checkpoints (tested above)")
    name = f"jl-{secrets.token_hex(4)}"
    _open_microvm_notebook(request, lab, notebook)
    cell = notebook.run("ck_v = 41", timeout_s=FIRST_OUTPUT_S)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stderr")).to_have_count(0)
    for command in (f"%dhvm checkpoint {name}", f"%dhvm restore {name}", "%dhvm fork b"):
        cell = notebook.run(command)
        err = notebook.outputs(cell, "application/vnd.jupyter.stderr")
        expect(notebook.outputs(cell)).to_have_count(1)
        expect(err).to_have_count(1)
        if command.startswith("%dhvm checkpoint"):
            notebook.shot("ck-1-refused")
        text = err.inner_text()
        print(f"\n[jupyterlab-local] {command}: {text.strip()}")
        # the message alone (no traceback), saying why and what to use instead
        assert text.startswith("CheckpointError: the local backend"), text
        assert "cannot be saved" in text and "%config Dhvm.backend = 'qemu'" in text, text
        assert "Traceback" not in text, text
    assert not Layout(lab.home).checkpoint(name).exists()
    # The same server runs on: its variable is still there.
    cell = notebook.run("print(ck_v + 1)")
    notebook.shot("ck-2-after-refusal")
    expect(notebook.outputs(cell)).to_have_count(1)
    expect(notebook.outputs(cell, "application/vnd.jupyter.stdout")).to_have_text("42\n")
