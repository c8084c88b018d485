"""Rich output from a cell in the server, as a notebook user expects it (issue 9): display() and
IPython.display objects, display handles, clear_output, _repr_*_ methods, Deephaven tables shown like
results, matplotlib inline, plotly and Deephaven plotly-express figures. Real Deephaven server
(local backend; the VM runs the same agent code) and real kernels through jupyter_client."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(session, code):
    seen: list = []
    r = session.execute(code, on_display=seen.append,
                        on_stdout=lambda t: seen.append(("stdout", t)) if t.strip() else None)
    assert r.error is None, r.error
    return r, seen


def test_display_objects_arrive_in_order_with_stdout(session):
    r, seen = _run(session, """
from IPython.display import HTML, Markdown, JSON, SVG, Latex
print("first")
display(HTML("<b>bold</b>"))
print("second")
display(Markdown("*md*"), JSON({"a": 1}), Latex("$x^2$"),
        SVG('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"></svg>'))
class Obj:
    def _repr_html_(self): return "<i>obj</i>"
    def _repr_mimebundle_(self, include=None, exclude=None): return {"text/x-custom": "custom"}
display(Obj())
print("third")
""")
    kinds = [x[1] if isinstance(x, tuple) else next(m for m in x.data if m != "text/plain") for x in seen]
    assert kinds == ["first", "text/html", "second", "text/markdown", "application/json", "text/latex",
                     "image/svg+xml", "text/x-custom", "third"], kinds
    assert seen[1].data["text/html"] == "<b>bold</b>" and seen[4].data["application/json"] == {"a": 1}
    assert all(d.kind == "display" for d in r.displays)


def test_display_handles_update_and_clear_output(session):
    r, seen = _run(session, """
from IPython.display import Markdown, clear_output, update_display
h = display(Markdown("v1"), display_id=True)
h.update(Markdown("v2"))
update_display(Markdown("v3"), display_id=h.display_id)
display("plain", display_id="mine")
clear_output(wait=True)
""")
    d = [x for x in seen if not isinstance(x, tuple)]
    assert [x.kind for x in d] == ["display", "update", "update", "display", "clear"]
    assert d[0].transient["display_id"] == d[1].transient["display_id"] == d[2].transient["display_id"]
    assert d[1].data["text/markdown"] == "v2" and d[3].transient == {"display_id": "mine"} and d[4].wait


def test_display_of_a_deephaven_table_renders_like_a_result_table_once(session):
    r, seen = _run(session, "from deephaven import empty_table\nshown = empty_table(4).update('X = i')\n"
                            "display(shown)\nother = empty_table(2)")
    tables = [x for x in seen if not isinstance(x, tuple) and x.kind == "table"]
    assert len(tables) == 1 and tables[0].table.name == "shown" and tables[0].table.df["X"].tolist() == [0, 1, 2, 3]
    assert [t.name for t in r.tables] == ["other"], "a displayed table is not shown again at the end"


def test_matplotlib_figures_show_inline_as_png_and_are_closed(session):
    r, seen = _run(session, """
import matplotlib.pyplot as plt
plt.plot([1, 2, 3], [3, 1, 2])
print("drawn")
""")
    pngs = [x for x in seen if not isinstance(x, tuple) and "image/png" in x.data]
    assert len(pngs) == 1 and base64.b64decode(pngs[0].data["image/png"]).startswith(PNG_MAGIC)
    assert seen.index(pngs[0]) > seen.index(("stdout", "drawn")), "an open figure shows at the end of its cell"
    r, seen = _run(session, "import matplotlib.pyplot as plt\nprint(len(plt.get_fignums()))")
    assert seen == [("stdout", "0")], "figures do not pile up into the next cell"
    r, seen = _run(session, "plt.figure()\nplt.plot([1])\nplt.show()\nprint('after show')")
    assert "image/png" in seen[0].data and seen[1] == ("stdout", "after show"), "plt.show() shows at once"


def test_a_png_repr_travels_as_bytes_and_arrives_base64(session):
    r, seen = _run(session, """
import matplotlib.pyplot as plt, io
class Pic:
    def _repr_png_(self):
        fig = plt.figure(figsize=(1, 1)); buf = io.BytesIO(); fig.savefig(buf, format="png"); plt.close(fig)
        return buf.getvalue()
display(Pic())
Pic()
""")
    assert base64.b64decode(seen[0].data["image/png"]).startswith(PNG_MAGIC)
    assert base64.b64decode(r.value["image/png"]).startswith(PNG_MAGIC), "a last expression's image too"


def test_plotly_and_deephaven_express_figures_are_interactive_plotly_with_an_html_fallback(session):
    r, seen = _run(session, """
import plotly.express as px
display(px.line(x=[1, 2, 3], y=[3, 1, 2]))
from deephaven import empty_table
import deephaven.plot.express as dx
src = empty_table(5).update(["X = i", "Y = i * i"])
dx.line(src, x="X", y="Y")
""")
    fig = seen[0].data
    assert fig["application/vnd.plotly.v1+json"]["data"][0]["type"] == "scatter"
    assert "plotly" in fig["text/html"] and "<div" in fig["text/html"]
    dxfig = r.value["application/vnd.plotly.v1+json"]
    assert dxfig["data"][0]["type"].startswith("scatter")
    ys = dxfig["data"][0]["y"]
    assert ys == [0, 1, 4, 9, 16] or "bdata" in ys, ys  # the table's data, hydrated


def test_dhvm_exec_json_carries_displays_as_mime_bundles(tmp_path, dhg_home):
    code = "from IPython.display import HTML\ndisplay(HTML('<p>hi</p>'))\nprint('done')"
    env = {**os.environ, "DHG_HOME": str(dhg_home), "DHG_BACKEND": "local"}
    p = subprocess.run([sys.executable, "-m", "dhg_kernel.cli", "exec", "--json", "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    out = json.loads(p.stdout)
    assert out["displays"] == [{"kind": "display", "data": {"text/plain": "<IPython.core.display.HTML object>",
                                                             "text/html": "<p>hi</p>"},
                                "metadata": {}, "transient": {}}]


def test_the_kernel_sends_display_update_and_clear_messages_on_iopub(jupyter_path, dhg_home):
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="dhvm", env={**os.environ, "DHG_HOME": str(dhg_home), "DHG_BACKEND": "local"})
    try:
        code = ("from IPython.display import HTML, clear_output\nprint('a')\nh = display(HTML('<b>1</b>'), display_id=True)\n"
                "h.update(HTML('<b>2</b>'))\nclear_output(wait=True)\nprint('b')")
        msgs: list = []
        reply = kc.execute_interactive(code, timeout=300, output_hook=msgs.append)
        assert reply["content"]["status"] == "ok"
        notice = [m for m in msgs if m["content"].get("data", {}).get("text/plain", "").startswith("dhvm: ")]
        assert not notice or "starting the Deephaven server" in notice[0]["content"]["data"]["text/plain"]
        seq = [(m["msg_type"], m["content"].get("text", "").strip() or m["content"].get("data", {}).get("text/html", ""))
               for m in msgs if m["msg_type"] in ("stream", "display_data", "update_display_data", "clear_output")
               and m not in notice]
        assert seq == [("stream", "a"), ("display_data", "<b>1</b>"), ("update_display_data", "<b>2</b>"),
                       ("clear_output", ""), ("stream", "b")], seq
        ids = [m["content"]["transient"]["display_id"] for m in msgs
               if m["msg_type"].endswith("display_data") and m not in notice]
        assert len(set(ids)) == 1
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_table_headings_say_ticking_when_snapshotted_and_the_column_types(session):
    from dhg_kernel.display import table_heading

    r = session.execute("from deephaven import time_table, empty_table\n"
                        "ticks = time_table('PT0.1S').update('X = i')\nstill = empty_table(2).update('S = `a`')")
    assert r.ok, r.error
    plain, rich = table_heading(r.table("ticks"))
    assert r.table("ticks").refreshing and "ticking table: a snapshot taken at" in plain and "● ticking" in rich
    assert "Timestamp Instant (UTC)" in plain and "X int" in plain, plain
    plain, rich = table_heading(r.table("still"))
    assert "ticking" not in plain and "columns: S String" in plain


def test_a_table_in_the_notebook_has_no_second_size_footer(ip):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        ip.run_cell_magic("dhvm", "-n 5", "from deephaven import empty_table\nbig = empty_table(50).update('X = i')")
    html = "".join(o.data.get("text/html", "") for o in cap.outputs)
    assert "50 rows × 1 columns" in html and "showing the first 5 of 50 rows" in html
    assert "5 rows × 1 columns" not in html.replace("50 rows × 1 columns", ""), "pandas' own footer is gone"


# -- in a QEMU microVM --------------------------------------------------------------------------------


@pytest.mark.qemu
def test_rich_output_and_figures_in_a_vm(vm):
    r, seen = _run(vm, """
from IPython.display import HTML
display(HTML("<b>vm</b>"))
import matplotlib.pyplot as plt
plt.plot([1, 2], [2, 1])
from deephaven import empty_table
import deephaven.plot.express as dx
src = empty_table(3).update(["X = i", "Y = i * 2"])
dx.scatter(src, x="X", y="Y")
""")
    shown = [x for x in seen if not isinstance(x, tuple)]
    assert shown[0].data["text/html"] == "<b>vm</b>"
    assert base64.b64decode(shown[-1].data["image/png"]).startswith(PNG_MAGIC)
    assert r.value["application/vnd.plotly.v1+json"]["data"][0]["type"].startswith("scatter")


@pytest.mark.qemu
def test_the_first_tab_in_a_fresh_vm_answers_and_the_state_survives(vm):
    import time

    vm.execute("from deephaven import empty_table\nt = empty_table(3)")
    t0 = time.monotonic()
    reply = vm.complete("import os\nos.pa", 15)
    took = time.monotonic() - t0
    print(f"first completion in a fresh VM: {took * 1000:.0f} ms")
    assert "path" in reply["matches"], "answered within the question deadline (jedi warmed before the snapshot)"
    assert "update" in vm.complete("t.upd", 5)["matches"]
    assert vm.execute("print(t.size)").stdout == "3\n"


def test_the_images_plotting_wheels_are_the_local_extras_pins():
    import tomllib
    from pathlib import Path

    from dhg_kernel.prepare import GUEST_WHEELS

    extra = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]["local"]
    assert set(GUEST_WHEELS) <= set(extra), (GUEST_WHEELS, extra)


def test_a_deephaven_figure_gives_a_working_link_to_the_web_ui(session):
    import urllib.request

    from dhg_kernel import protocol as P
    from dhg_kernel.guest import rich

    assert rich.WIDGET_MIME == P.MIME_DEEPHAVEN_WIDGET
    r, seen = _run(session, """
from deephaven import empty_table
from deephaven.plot.figure import Figure
pts = empty_table(5).update(["X = i", "Y = i * 2"])
chart = Figure().plot_xy(series_name="s", t=pts, x="X", y="Y").show()
chart
""")
    url = r.value["text/plain"].split()[3]  # a one-time link of the link broker (test_weblinks.py)
    assert r.value["text/plain"].startswith(f"Deephaven figure chart: {url}") and url in r.value["text/html"]
    assert "/dhvm/open/" in url and "psk=" not in r.value["text/html"]
    with urllib.request.urlopen(url, timeout=30) as resp:  # it opens the figure's view
        assert resp.status == 200 and "/iframe/widget/?name=chart&psk=" in resp.url
        assert b"<html" in resp.read().lower()
    r, seen = _run(session, "chart2 = Figure().plot_xy(series_name='s', t=pts, x='X', y='Y').show()")
    links = [d for d in seen if not isinstance(d, tuple) and "Deephaven figure chart2: http" in d.data.get("text/plain", "")]
    assert len(links) == 1, "a figure assigned in a cell gets its link too"


# -- figures a cell assigns, and blink tables (issue 21) ---------------------------------------------

PLOTLY = "application/vnd.plotly.v1+json"


def test_an_assigned_plotly_express_figure_is_shown_once_and_a_ticking_one_is_offered_for_watching(session):
    from dhg_kernel import protocol as P

    r, seen = _run(session, """
from deephaven import empty_table, time_table
import deephaven.plot.express as dx
src = empty_table(5).update(["X = i", "Y = i * i"])
still = dx.line(src, x="X", y="Y")
shown = dx.scatter(src, x="X", y="Y")
display(shown)
moving = time_table("PT0.1S").update("X = i")
tfig = dx.line(moving, x="Timestamp", y="X")
""")
    figs = [d for d in seen if not isinstance(d, tuple) and PLOTLY in d.data]
    # still (assigned), shown (displayed, not again at the end), tfig (assigned, ticking)
    assert len(figs) == 3 and all(d.data[PLOTLY]["data"][0]["type"].startswith("scatter") for d in figs), figs
    assert figs[0].data[PLOTLY]["data"][0]["y"] == [0, 1, 4, 9, 16]
    assert [d.transient.get(P.TRANSIENT_WATCH) for d in figs] == [None, None, "tfig"]
    assert r.value is None

    # the watch machinery follows a figure as it follows a table: its plot, as its table grows
    got: list = []
    ended: list = []
    feed = session.watch("tfig", got.append, ended.append, rate=4)
    import time

    time.sleep(3.0)
    feed.stop()
    assert ended == ["stopped"], ended
    xs = [len(u.figure[PLOTLY]["data"][0]["y"]) for u in got]
    assert len(xs) >= 3 and xs == sorted(xs) and xs[-1] > xs[0], xs
    assert all(u.table is None and u.ticking and u.taken is not None for u in got)
    assert "text/html" in got[-1].figure  # the nbconvert fallback goes with every snapshot


def test_a_ticking_figure_as_the_last_expression_is_offered_for_watching_under_a_hidden_name(session):
    from dhg_kernel import protocol as P

    r, seen = _run(session, "import deephaven.plot.express as dx\nfrom deephaven import time_table\n"
                            "dx.line(time_table('PT0.1S').update('X = i'), x='Timestamp', y='X')")
    (fig,) = [d for d in seen if not isinstance(d, tuple)]
    assert fig.transient[P.TRANSIENT_WATCH].startswith("_dhvm_live_") and PLOTLY in fig.data
    assert r.value is None  # shown as a display (as a ticking table is), not a frozen Out[]


def test_a_blink_tables_heading_says_its_rows_are_its_last_cycles(session):
    import queue

    from dhg_kernel.display import table_heading

    r = session.execute("from deephaven import time_table\nimport time\n"
                        "blinks = time_table('PT0.05S', blink_table=True).update('X = i')\ntime.sleep(2.5)")
    assert r.ok, r.error
    t = r.table("blinks")
    plain, rich = table_heading(t)
    print(plain)
    assert "blink table: it keeps only the rows added in its last update cycle" in plain, plain
    assert f"{t.rows:,} rows in its last update cycle" in plain and "last update cycle" in rich
    assert "ticking table" not in plain  # it says blink, not ticking (whose rows would be all the table's)
    assert t.blink and t.refreshing
    from dhg_kernel.display import live_bundle, live_state

    got: "queue.Queue" = queue.Queue()
    feed = session.watch("blinks", got.put, rows=5)
    u = got.get(timeout=10)
    feed.stop()
    assert u.table.blink
    text = live_bundle(u.table, live_state(u.table.snapshot_time), "last 5 rows", u.table.df)["text/plain"]
    assert "in its last update cycle" in text and "blink table" in text, text
    r = session.execute("from deephaven import time_table\nplain_ticks = time_table('PT0.1S')")
    assert not r.table("plain_ticks").blink and "blink" not in table_heading(r.table("plain_ticks"))[0]
