"""The Jupyter project's own kernel conformance suite (jupyter_kernel_test) against the "Deephaven microVM"
kernel, with samples the VM answers (names only the VM has), and what the suite leaves out: help pages of
VM names, history as typed (``%history``, ``In``) and traceback cell names that match the prompt number.

Every sample the suite has is given; none is skipped. The local-backend class runs with the other slow
tests; the QEMU class runs the same samples against a real microVM (``-m qemu``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import jupyter_kernel_test as jkt
import pytest
from jupyter_client.manager import KernelManager, start_new_kernel

from dhg_kernel.config import Layout
from dhg_kernel.instances import list_instances

# A first cell waits for the VM to start (a QEMU one under TCG takes minutes); later cells are quick.
START_TIMEOUT = 900
CELL_TIMEOUT = 180

# Names only the VM has: a completion or help page that finds them was answered by the VM.
SETUP_CELL = """\
from deephaven import empty_table
conformance_tbl = empty_table(3).update(["Price = 1.5", "Qty = i"])
conformance_value = 42
def conformance_func(x):
    \"\"\"Doubles x: the docstring a help page of the VM shows.\"\"\"
    return 2 * x
"""


class _VMConformance(jkt.KernelTests):
    """jupyter_kernel_test's KernelTests with samples the VM answers; subclasses say where the VM runs."""

    __test__ = False  # the base: its subclasses are the tests
    kernel_name = "dhvm"
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys\nprint('to stderr', file=sys.stderr)"
    # The host's IPython knows none of these names: only the VM's namespace can complete them.
    completion_samples = [
        {"text": "conformance_va", "matches": {"conformance_value"}},
        {"text": "conformance_fu", "matches": {"conformance_func"}},
        {"text": 'conformance_tbl.where("Pri', "matches": {"Price"}},
    ]
    # is_complete is the host's IPython (a VM cell is Python, so the same answer).
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n", "conformance_func(2)"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2", "conformance_tbl.update(["]
    invalid_code_samples = ["import = 7q", "conformance_func(2))"]
    code_page_something = "conformance_func?"
    code_generate_error = "raise ValueError('conformance: an error raised in the VM')"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n * n for n in range(1, 4)]", "result": "[1, 4, 9]"},
        {"code": "conformance_value + 1", "result": "43"},
        {"code": "from IPython.display import HTML\nHTML('<b>vm</b>')", "mime": "text/html", "result": "<b>vm</b>"},
    ]
    code_display_data = [
        {"code": "from IPython.display import HTML, display\ndisplay(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display\ndisplay(Math(r'\\frac{1}{2}'))", "mime": "text/latex"},
        {"code": "display(conformance_tbl)", "mime": "text/html"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "range", "search")
    code_inspect_sample = "conformance_tbl"
    code_clear_output = "from IPython.display import clear_output\nprint('soon gone')\nclear_output()"

    env: dict[str, str] = {}

    @classmethod
    def kernel_env(cls) -> dict[str, str]:
        """The kernel's environment: where its VM runs (the subclass), and an IPython dir of the class's own
        (history search counts entries of every session in the history database)."""
        return {**os.environ, **cls.env, "IPYTHONDIR": cls.ipython_dir}

    @classmethod
    def setUpClass(cls) -> None:
        cls.ipython_dir = tempfile.mkdtemp(prefix="dhg-conformance-ipython-")
        cls.km, cls.kc = start_new_kernel(kernel_name=cls.kernel_name, env=cls.kernel_env())
        reply = cls.kc.execute_interactive(SETUP_CELL, timeout=START_TIMEOUT, output_hook=lambda _m: None)
        assert reply["content"]["status"] == "ok", reply["content"]

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        shutil.rmtree(cls.ipython_dir, ignore_errors=True)

    def execute_helper(self, code, timeout=CELL_TIMEOUT, silent=False, store_history=True, stop_on_error=True):
        """The suite's own (its 15 s default is for kernels without a VM behind them)."""
        return super().execute_helper(code, timeout, silent, store_history, stop_on_error)

    # -- what the suite leaves out ------------------------------------------------------------------

    def _page(self, code: str) -> tuple[dict, str, str]:
        """Run a help cell: (reply content, the paged text/plain, stdout)."""
        self.flush_channels()
        reply, msgs = self.execute_helper(code)
        content = reply["content"]
        paged = "".join(p["data"].get("text/plain", "") for p in content.get("payload", []) if p["source"] == "page")
        out = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        return content, paged, out

    def test_help_requests_page_what_the_vm_knows(self) -> None:
        for code in ("print?", "?print"):
            content, paged, _ = self._page(code)
            self.assertEqual(content["status"], "ok", content)
            self.assertIn("Docstring", paged)
            self.assertIn("Prints the values to a stream", paged)
        content, paged, _ = self._page("conformance_tbl?")
        self.assertEqual(content["status"], "ok", content)
        self.assertIn("Deephaven table: 3 rows", paged)
        self.assertIn("Price", paged)
        _, paged, _ = self._page("conformance_func??")  # ?? adds the source, as IPython's does
        self.assertIn("return 2 * x", paged)
        _, paged, _ = self._page("??conformance_func")
        self.assertIn("return 2 * x", paged)
        content, paged, out = self._page("no_such_name_anywhere?")
        self.assertEqual(content["status"], "ok", content)
        self.assertEqual(content["payload"], [])
        self.assertEqual(out.strip(), "Object `no_such_name_anywhere` not found.")

    def test_history_holds_what_the_user_typed(self) -> None:
        self.flush_channels()
        typed = "typed_in_the_vm = conformance_value"
        reply, _ = self.execute_helper(typed)
        n = reply["content"]["execution_count"]
        reply, msgs = self.execute_helper(f"%%local\nprint(repr(In[{n}]))\nprint(repr(_ih[{n}]))")
        self.assertEqual(reply["content"]["status"], "ok", reply["content"])
        out = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
        self.assertEqual(out.splitlines(), [repr(typed)] * 2)
        _, msgs = self.execute_helper("%history -l 3")
        out = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
        self.assertIn(typed, out.splitlines())
        self.assertNotIn("dhvm", out)
        raw = self.kc.history(raw=True, output=False, hist_access_type="tail", n=3, reply=True)["content"]["history"]
        parsed = self.kc.history(raw=False, output=False, hist_access_type="tail", n=3, reply=True)["content"]["history"]
        for history in (raw, parsed):  # Up-arrow asks for raw history; %history and In show the parsed one
            self.assertIn(typed, [h[2] for h in history])
            self.assertFalse([h for h in history if "dhvm" in h[2]], history)

    def test_traceback_cell_names_match_the_prompt_number(self) -> None:
        self.flush_channels()
        self.execute_helper("%%local\nhost_only = 1")  # a prompt number the VM never sees
        reply, _ = self.execute_helper("def conformance_fails():\n    raise KeyError('where')\nconformance_fails()")
        content = reply["content"]
        self.assertEqual(content["status"], "error")
        text = "\n".join(content["traceback"])
        self.assertIn(f'File "<dhvm-cell-{content["execution_count"]}>", line 2', text)
        self.assertIn(f'File "<dhvm-cell-{content["execution_count"]}>", line 3', text)


@pytest.mark.slow
@pytest.mark.usefixtures("jupyter_path", "dhg_home")
class TestLocalConformance(_VMConformance):
    """The suite against the local backend (the guest agent's code, run on the host)."""

    __test__ = True


@pytest.fixture(scope="module")
def _qemu_env(qemu_home, jupyter_path):
    """Point the QEMU class at the prepared image (qemu_home; DHG_TEST_HOME picks it)."""
    TestQemuConformance.env = {"DHG_BACKEND": "qemu", "DHG_HOME": str(qemu_home)}
    yield


@pytest.mark.slow
@pytest.mark.qemu
@pytest.mark.usefixtures("_qemu_env")
class TestQemuConformance(_VMConformance):
    """The suite against a real QEMU microVM."""

    __test__ = True


@pytest.mark.slow
@pytest.mark.usefixtures("jupyter_path", "dhg_home")
class TestIopubWelcome(jkt.IopubWelcomeTests):
    """JEP 65: the first message a new iopub subscriber gets is iopub_welcome (ipykernel's XPUB socket)."""

    kernel_name = "dhvm"
    support_iopub_welcome = True

    @classmethod
    def setUpClass(cls) -> None:
        cls.home = Path(tempfile.mkdtemp(prefix="dhg-welcome-"))
        cls.km = KernelManager(kernel_name=cls.kernel_name)
        cls.km.start_kernel(env={**os.environ, "DHG_HOME": str(cls.home)})
        cls.kc = cls.km.client()

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        deadline = time.monotonic() + 60
        while list_instances(Layout(cls.home)) and time.monotonic() < deadline:
            time.sleep(0.5)  # the background start the kernel began is undone by its shutdown
        left = list_instances(Layout(cls.home))
        shutil.rmtree(cls.home, ignore_errors=True)
        assert not left, f"the kernel left instances behind: {left}"
