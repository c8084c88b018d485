"""Rich output in the VM: IPython's display machinery, without an IPython shell.

``display()`` (also as a builtin, as in a kernel), ``IPython.display`` objects (HTML, Markdown,
Image, JSON, SVG, Latex…), display handles (``display_id``, ``.update()``), ``clear_output``, and
any object's ``_repr_html_``/``_repr_png_``/``_repr_svg_``/``_repr_mimebundle_`` all become events
of the running cell, in order with its stdout. Formatting is IPython's own ``DisplayFormatter``.

Figures: matplotlib figures a cell leaves open are shown as PNG at its end and closed (and at once
on ``plt.show()``), as matplotlib-inline does for a kernel; that package hooks into an IPython
shell's post-execute event, which the agent has no shell to fire, so the same few steps are done
here with IPython's ``print_figure``. Plotly figures and Deephaven's plotly-express figures go out
as interactive Plotly JSON (``application/vnd.plotly.v1+json``) with an HTML fallback for
nbconvert. Deephaven tables are handed to the agent, which sends them as tables, so ``display(t)``
renders exactly like a result table.

Binary MIME values (PNG, JPEG) travel as raw frame payloads, not base64.
"""

from __future__ import annotations

import builtins
import json
import sys
import threading
import uuid
from typing import Any, Callable

from .. import protocol as P

EV_DISPLAY = "display"
EV_CLEAR = "clear_output"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
BINARY_MIMES = ("image/png", "image/jpeg")
MAX_TEXT = 1_000_000


class Outlet:
    """Where display output goes: the running cell's event stream (None between cells)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._send: Callable[[dict, list], None] | None = None
        self._re: Any = None
        self.send_table: Callable[[Any, str], None] | None = None
        """Set by the agent: sends a Deephaven table as a table event of the running cell."""
        self.is_table: Callable[[Any], bool] = lambda obj: False
        self.watch_name: Callable[[Any, str], str | None] = lambda obj, name: None
        """Set by the agent: the scope name (``name`` if it holds the figure) a live view of a ticking
        figure can watch."""
        self.shown: set[int] = set()
        """ids of the figures the running cell displayed (not shown again at its end)."""

    def begin(self, send: Callable[[dict, list], None], re_id: Any) -> None:
        with self._lock:
            self._send, self._re = send, re_id
            self.shown = set()

    def end(self) -> None:
        with self._lock:
            self._send, self._re = None, None

    def emit(self, header: dict, payloads: list | None = None) -> bool:
        with self._lock:
            send, re_id = self._send, self._re
        if send is None:
            return False
        sys.stdout.flush()  # what the cell printed before this output comes first
        send({**header, "re": re_id}, payloads or [])
        return True


outlet = Outlet()
_formatter = None


def formatter():
    """IPython's DisplayFormatter, with the figure formatters a kernel would register."""
    global _formatter
    if _formatter is None:
        from IPython.core.formatters import DisplayFormatter

        f = DisplayFormatter()
        # Objects' _ipython_display_ hooks (plotly's, ipywidgets') draw through a live IPython shell,
        # which the agent does not have: their MIME bundles are used instead.
        f.ipython_display_formatter.enabled = False
        f.formatters["image/png"].for_type_by_name("matplotlib.figure", "Figure", _figure_png)
        f.mimebundle_formatter.for_type_by_name("plotly.basedatatypes", "BaseFigure", plotly_bundle)
        f.mimebundle_formatter.for_type_by_name(
            "deephaven.plot.express.deephaven_figure.DeephavenFigure", "DeephavenFigure", deephaven_express_bundle)
        f.mimebundle_formatter.for_type_by_name("deephaven.plot.figure", "Figure", deephaven_figure_bundle)
        _formatter = f
    return _formatter


def _figure_png(fig) -> bytes:
    from IPython.core.pylabtools import print_figure

    return print_figure(fig, "png", bbox_inches="tight")


def plotly_bundle(fig, include=None, exclude=None) -> dict:
    """Interactive Plotly JSON for JupyterLab/VS Code, and an HTML fallback (plotly.js from its CDN)."""
    import plotly.io as pio

    # Through plotly's own JSON encoder: figures hold NumPy arrays and dates.
    data: dict = {PLOTLY_MIME: json.loads(pio.to_json(fig, validate=False)), "text/plain": f"<{type(fig).__name__}>"}
    try:
        data["text/html"] = pio.to_html(fig, include_plotlyjs="cdn", full_html=False)
    except Exception:  # noqa: BLE001 - the interactive view is the main one
        pass
    return data


def deephaven_express_bundle(fig, include=None, exclude=None) -> dict:
    """A Deephaven plotly-express figure as a Plotly figure of its tables' current data."""
    return plotly_bundle(fig.get_hydrated_figure())


WIDGET_MIME = "application/vnd.dhg.deephaven-widget+json"


def deephaven_figure_bundle(fig, include=None, exclude=None, name: str | None = None) -> dict:
    """A Deephaven ``Figure`` draws in the server's web UI, by the variable that holds it. The host,
    which knows the server's address and key, turns ``WIDGET_MIME`` into a link to it."""
    return {"text/plain": f"<Deephaven Figure{' ' + name if name else ''}: open it in the web UI "
                          f"({'its link is added by the host' if name else 'assign it to a variable first'})>",
            WIDGET_MIME: {"kind": "Figure", "name": name}}


def is_deephaven_figure(obj) -> bool:
    cls = type(obj)
    return cls.__name__ == "Figure" and cls.__module__ == "deephaven.plot.figure"


def is_express_figure(obj) -> bool:
    """A Deephaven plotly-express figure (``dx.line(...)``)."""
    cls = type(obj)
    return cls.__name__ == "DeephavenFigure" and cls.__module__.startswith("deephaven.plot.express.")


def express_tables(fig) -> list:
    """The Deephaven tables a plotly-express figure draws from (as its own hydration finds them)."""
    from deephaven.plot.express.exporter import Exporter

    exporter = Exporter()
    fig.to_dict(exporter)
    tables, _, _ = exporter.references()
    return list(tables)


def is_ticking(obj) -> bool:
    """A plotly-express figure over a ticking table (its plot changes as the table does)."""
    if not is_express_figure(obj):
        return False
    try:
        return any(t.is_refreshing for t in express_tables(obj))
    except Exception:  # noqa: BLE001 - a figure the exporter cannot walk is shown as a snapshot
        return False


def figure_bundle(fig, name: str = "") -> tuple[dict, dict]:
    """(data, transient) of a plotly-express figure: its plot now, and for a ticking one the scope
    name a live view of it can watch (the host decides whether to start one)."""
    data = deephaven_express_bundle(fig)
    watch = outlet.watch_name(fig, name) if is_ticking(fig) else None
    return data, ({P.TRANSIENT_WATCH: watch} if watch else {})


def _split_binary(data: dict) -> tuple[dict, list]:
    """Binary values out of the JSON, into payloads: {"image/png": {"$payload": 0}}."""
    payloads: list = []
    out: dict = {}
    for mime, value in data.items():
        if mime in BINARY_MIMES and isinstance(value, (bytes, bytearray)):
            out[mime] = {"$payload": len(payloads)}
            payloads.append(bytes(value))
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            out[mime] = value[:MAX_TEXT] + "\n… (cut)"
        else:
            out[mime] = value
    return out, payloads


def publish(data: dict, metadata: dict | None = None, transient: dict | None = None, update: bool = False) -> bool:
    """Send one MIME bundle (a ``display_data``, or ``update_display_data`` with ``update``)."""
    data, payloads = _split_binary(data)
    header = {"ev": EV_DISPLAY, "data": data, "metadata": metadata or {}, "transient": transient or {},
              "update": bool(update)}
    return outlet.emit(header, payloads)


class DisplayHandle:
    """What ``display(..., display_id=True)`` returns: ``.display()``, ``.update()``."""

    def __init__(self, display_id: str | None = None):
        self.display_id = display_id or uuid.uuid4().hex

    def __repr__(self) -> str:
        return f"<DisplayHandle display_id={self.display_id}>"

    def display(self, obj, **kwargs) -> None:
        display(obj, display_id=self.display_id, **kwargs)

    def update(self, obj, **kwargs) -> None:
        display(obj, display_id=self.display_id, update=True, **kwargs)


def display(*objs, include=None, exclude=None, metadata=None, transient=None, display_id=None, raw=False,
            clear=False, update=False, **kwargs):
    """IPython's ``display``, sending to the running cell. Returns a DisplayHandle for ``display_id``."""
    if transient is None:
        transient = {}
    if display_id is not None:
        if display_id is True:
            display_id = uuid.uuid4().hex
        transient = {**transient, "display_id": display_id}
    if clear:
        clear_output(wait=True)
    for obj in objs:
        if raw:
            publish(obj, metadata, transient, update)
            continue
        if outlet.is_table(obj) and outlet.send_table is not None and not update:
            outlet.send_table(obj, "display")  # rendered by the host exactly like a result table
            continue
        if is_express_figure(obj) and not update and not raw and display_id is None and include is None \
                and exclude is None:
            data, watch = figure_bundle(obj)
            outlet.shown.add(id(obj))
            publish(data, metadata, {**transient, **watch})
            continue
        data, md = formatter().format(obj, include=include, exclude=exclude)
        if not data:
            continue
        if metadata:
            md = {**(md or {}), **metadata}
        publish(data, md, transient, update)
    if display_id is not None:
        return DisplayHandle(display_id)
    return None


def update_display(obj, *, display_id, **kwargs) -> None:
    """Update the output shown under ``display_id``."""
    display(obj, display_id=display_id, update=True, **kwargs)


def clear_output(wait: bool = False) -> None:
    """Clear the cell's output (``wait``: when the next output arrives)."""
    outlet.emit({"ev": EV_CLEAR, "wait": bool(wait)})


def result_bundle(value) -> tuple[dict, list]:
    """A cell's last expression as a MIME bundle (text always; HTML, images… when the object has them),
    binary values split out as payloads."""
    try:
        data, _ = formatter().format(value)
    except Exception as e:  # noqa: BLE001 - a broken repr must not fail the cell
        data = {"text/plain": f"<{type(value).__name__} (repr failed: {e})>"}
    if not data:
        data = {"text/plain": repr(value)[:MAX_TEXT]}
    return _split_binary(data)


def flush_figures() -> int:
    """Show and close every matplotlib figure still open (at a cell's end, or on ``plt.show()``)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return 0
    shown = 0
    for num in list(pyplot.get_fignums()):
        fig = pyplot.figure(num)
        try:
            display(fig)
            shown += 1
        finally:
            pyplot.close(fig)
    return shown


def _show(*args, **kwargs) -> None:
    flush_figures()


def install(namespace: dict) -> None:
    """Make ``display`` a builtin and route IPython's display functions (and ``plt.show``) here."""
    builtins.display = display  # type: ignore[attr-defined]
    namespace.setdefault("display", display)
    try:
        import IPython.core.display_functions as df
        import IPython.display as ipd
    except ImportError:
        return
    for mod in (df, ipd):
        mod.display = display
        mod.update_display = update_display
        mod.clear_output = clear_output
        mod.DisplayHandle = DisplayHandle
    try:
        import IPython.core.display as cd

        cd.display = display
    except (ImportError, AttributeError):
        pass


def patch_pyplot() -> None:
    """Once pyplot is imported: ``plt.show()`` shows the figures in the cell (Agg draws off screen)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and getattr(pyplot.show, "__module__", "") != __name__:
        pyplot.show = _show


def warm_up() -> None:
    """Load the formatter and the figure libraries before a snapshot (so a clone's first plot is quick)."""
    formatter().format({"a": 1})
    try:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(2, 2))
        plt.plot([1, 2], [3, 4])
        _figure_png(fig)
        plt.close("all")
    except Exception:  # noqa: BLE001 - a plotting library missing from this image is not fatal
        pass
    try:
        import plotly.graph_objects as go

        plotly_bundle(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))
    except Exception:  # noqa: BLE001
        pass
