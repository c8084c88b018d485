"""The "Deephaven microVM" Jupyter kernel: ipykernel's IPython kernel, with every ordinary cell
routed to the VM through the same session layer (and the same renderer) as ``%%dhvm``.

Routing, cell by cell:
* ``%%local`` first line: the rest of the cell runs on the host;
* any other cell magic (``%%dhvm -o x``, ``%%time``…): IPython runs it as written, on the host;
* cells made only of line magics and shell escapes (``%dhvm status``, ``%config Dhvm.mode…``,
  ``!ls``): on the host;
* a help request (``name?``, ``name??``, ``?name``): the VM's ``name``, paged as IPython pages a host name's;
* everything else: in the VM, as if it began with ``%%dhvm``.
The routing is an IPython input transform, so ipykernel hands IPython the cell as typed and history
(Up-arrow, ``%history``, ``In``) keeps it so. Completion and inspection of VM cells are answered by the
guest from its live namespace.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from contextvars import ContextVar

from IPython.core import page
from ipykernel.ipkernel import IPythonKernel

from . import __version__
from .cluster import HOST_ENV, exit_after_shutdown
from .errors import DhvmError
from .magic import Dhvm

LOCAL_MAGIC = "%%local"
# IPython's help syntax on one dotted name: ``name?``, ``name??``, ``?name``, ``??name``.
_HELP = re.compile(r"\s*(\?{1,2})?\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*(\?{1,2})?\s*")
# The code of the execute request being run (per asyncio task): only that cell is routed, not code a
# host magic runs (``%%time``'s body runs on the host, as written).
_executing: ContextVar[str | None] = ContextVar("dhvm_executing", default=None)


def _is_host_line(line: str) -> bool:
    s = line.strip()
    return not s or s.startswith(("%", "!", "#"))


def help_request(code: str) -> tuple[str, int] | None:
    """``(name, detail_level)`` when the cell is one help request (``?`` is 0, ``??`` is 1), else None."""
    m = _HELP.fullmatch(code)
    if m is None or bool(m.group(1)) == bool(m.group(3)):
        return None
    return m.group(2), len(m.group(1) or m.group(3)) - 1


def route(code: str) -> tuple[str, str]:
    """Where a cell runs and the code IPython runs for it: ``("vm"|"help"|"host", code)``."""
    asked = help_request(code)
    if asked is not None:
        return "help", f"get_ipython().kernel.page_vm_help({asked[0]!r}, {asked[1]})\n"
    lines = code.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return "host", code
    head = lines[first].strip()
    if head == LOCAL_MAGIC or head.startswith(LOCAL_MAGIC + " "):
        return "host", "\n".join(lines[first + 1:])
    if head.startswith("%%"):
        return "host", code
    if all(_is_host_line(line) for line in lines):
        return "host", code
    return "vm", "%%dhvm\n" + code


class DhvmKernel(IPythonKernel):
    """Every cell runs in a Deephaven server inside a microVM; ``%%local`` runs one on the host."""

    implementation = "dhg_kernel"
    implementation_version = __version__
    banner = ("Deephaven microVM kernel: cells run in a Deephaven server inside a microVM "
              "(%%local runs a cell on the host; %dhvm status shows where).")
    help_links = [{"text": "Deephaven Python docs", "url": "https://deephaven.io/core/docs/"}]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shell.run_line_magic("load_ext", "dhg_kernel")
        self.dhvm: Dhvm = self.shell.magics_manager.registry["Dhvm"]
        # First, before IPython's cleanups: the VM body is passed on exactly as typed.
        self.shell.input_transformer_manager.cleanup_transforms.insert(0, _route_transform)
        history = self.shell.history_manager
        if history is not None:
            history.store_inputs = _typed_history(history.store_inputs)
        # Answer kernel_info at once; the VM restores in the background while the user reads.
        self._warm = threading.Thread(target=self._start_vm, name="dhvm-warm-start", daemon=True)
        self._warm.start()

    def _start_vm(self) -> None:
        try:
            self.dhvm.session.warm()
        except DhvmError as e:  # each cell will show the actionable error
            self.log.warning("dhvm: the VM could not be started in the background: %s", e)

    async def do_execute(self, code, silent, store_history=True, user_expressions=None, allow_stdin=False,
                         *, cell_meta=None, cell_id=None):
        token = _executing.set(code)
        try:
            return await super().do_execute(code, silent, store_history, user_expressions, allow_stdin,
                                            cell_meta=cell_meta, cell_id=cell_id)
        finally:
            _executing.reset(token)

    def do_history(self, hist_access_type, output, raw, session=0, start=0, stop=None, n=None, pattern=None,
                   unique=False):
        """ipykernel's history reply, each entry naming its session by number."""
        reply = super().do_history(hist_access_type, output, raw, session, start, stop, n, pattern, unique)
        # IPython numbers the running session 0 in a range it reads from memory: reply with its number, as asked.
        current = self.shell.history_manager.session_number
        reply["history"] = [(current if entry[0] == 0 else entry[0], *entry[1:]) for entry in reply["history"]]
        return reply

    def page_vm_help(self, name: str, detail_level: int = 0) -> None:
        """A help request in a VM cell: the VM's ``name`` described as Shift-Tab describes it (``??`` adds
        the source), in the pager as IPython's ``?`` shows a host name; an unknown name is said as IPython says it."""
        session = self.dhvm.session
        session.warm()  # the request may be the notebook's first cell
        reply = session.inspect(name, len(name), detail_level)
        if not reply.get("found"):
            print(f"Object `{name}` not found.")
            return
        page.page(reply["data"])

    def _vm_target(self, code: str, cursor_pos: int):
        """Where a completion or inspection at ``cursor_pos`` is answered: ``(session, code, offset)`` when in
        VM code (a VM cell, or the body of a ``%%dhvm [-s NAME]`` cell, whose code starts at ``offset``), else
        None (the host's IPython answers)."""
        line_start = code.rfind("\n", 0, cursor_pos) + 1
        if code[line_start:cursor_pos].lstrip().startswith(("%", "!")):
            return None
        where, _ = route(code)
        if where in ("vm", "help"):
            return self.dhvm.session, code, 0
        head = code.lstrip()
        if not head.startswith("%%dhvm"):
            return None
        offset = len(code) - len(head) + (head.find("\n") + 1 if "\n" in head else len(head))
        if cursor_pos < offset:
            return None
        words = head.split("\n", 1)[0].split()
        name = next((words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-s", "--session")), None)
        session = self.dhvm.sessions.existing(name)
        return (session, code[offset:], offset) if session is not None else None

    def do_complete(self, code, cursor_pos):
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        target = self._vm_target(code, cursor_pos)
        if target is None:
            return super().do_complete(code, cursor_pos)
        session, body, offset = target
        try:
            reply = session.complete(body, cursor_pos - offset)
        except DhvmError as e:
            self.log.warning("dhvm: completion failed: %s", e)
            return {"status": "ok", "matches": [], "cursor_start": cursor_pos, "cursor_end": cursor_pos, "metadata": {}}
        start = reply.get("cursor_start", cursor_pos - offset) + offset
        end = reply.get("cursor_end", cursor_pos - offset) + offset
        return {"status": "ok", "matches": reply.get("matches", []), "cursor_start": start, "cursor_end": end,
                "metadata": {"_jupyter_types_experimental": [
                    {"start": start, "end": end, "text": m, "type": t}
                    for m, t in zip(reply.get("matches", []), reply.get("types", []))]}}

    def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
        target = self._vm_target(code, cursor_pos)
        if target is None:
            return super().do_inspect(code, cursor_pos, detail_level, omit_sections)
        session, body, offset = target
        try:
            reply = session.inspect(body, cursor_pos - offset, detail_level)
        except DhvmError as e:
            self.log.warning("dhvm: inspection failed: %s", e)
            reply = {"found": False, "data": {}}
        return {"status": "ok", "found": bool(reply.get("found")), "data": reply.get("data", {}), "metadata": {}}

    def do_shutdown(self, restart):
        self.dhvm.close()  # the VM goes with the kernel; a restart gets a fresh one
        reply = super().do_shutdown(restart)
        if os.environ.get(HOST_ENV):  # started on a cluster host by the launcher (see cluster.py)
            exit_after_shutdown()
        return reply


def _route_transform(lines: list[str]) -> list[str]:
    """IPython input transform: the cell being executed, routed (a VM cell becomes a ``%%dhvm`` cell)."""
    typed = _executing.get()
    if typed is None or "".join(lines) not in (typed, typed + "\n"):
        return lines
    where, code = route(typed)
    return lines if where == "host" and code == typed else code.splitlines(keepends=True)


# IPython's is_complete (check_complete) skips it: a VM cell is complete when its Python is, not after
# the blank line a cell magic needs.
_route_transform.has_side_effects = True  # type: ignore[attr-defined]


def _typed_history(store_inputs):
    """IPython's ``HistoryManager.store_inputs``, keeping a VM or help cell as typed in the parsed history
    too (``In``, ``_ih``, ``%history``): not the ``%%dhvm`` call it runs as."""

    def store(line_num, source, source_raw=None):
        if source_raw is not None and source_raw == _executing.get() and route(source_raw)[0] != "host":
            source = source_raw
        return store_inputs(line_num, source, source_raw)

    return store


def main() -> None:
    """Launch the kernel (``python -m dhg_kernel.kernel -f CONNECTION_FILE``)."""
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(kernel_class=DhvmKernel)


if __name__ == "__main__":
    sys.exit(main())
