"""Shared fixtures: real Deephaven servers (local backend) started once per test session."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Screenshots of the browser tests.
ARTIFACTS = ROOT / "build" / "test-artifacts"
sys.path.insert(0, str(ROOT))
# Tests are in folders by cost (README "Tests"); a few share helpers across folders by module name.
COST_FOLDERS = ("unit", "local", "vm", "browser")
sys.path[1:1] = [str(ROOT / "tests" / d) for d in (*COST_FOLDERS, "fakes")]


# Fixtures that need the prepared QEMU image (directly or through another fixture).
QEMU_FIXTURES = {"qemu_home", "vm"}


def _needs_qemu(item) -> bool:
    return item.get_closest_marker("qemu") is not None or bool(QEMU_FIXTURES & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(config, items):
    """Each test is marked with its folder's cost (``-m unit``, ``-m "not vm and not browser"``). The tests
    that need the QEMU image run last, in their order, while ``dhvm prepare`` brings the image up to date in
    the background: on a fresh machine its ~20 min build overlaps the rest of the suite."""
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in COST_FOLDERS:
            item.add_marker(getattr(pytest.mark, folder))
    qemu = [i for i in items if _needs_qemu(i)]
    if qemu and not config.option.collectonly:
        items[:] = [i for i in items if not _needs_qemu(i)] + qemu
        _BackgroundPrepare.start()


class _BackgroundPrepare:
    """``dhvm prepare`` of the tests' QEMU home, started at collection, awaited by ``qemu_home``."""

    proc: subprocess.Popen | None = None
    log: Path | None = None

    @classmethod
    def home(cls) -> Path:
        return Path(os.environ.get("DHG_TEST_HOME", "~/.dhg-test")).expanduser()

    @classmethod
    def start(cls) -> None:
        from dhg_kernel.vm.qemu import qemu_binary

        home = cls.home()
        if cls.proc is not None or not qemu_binary() or os.geteuid() != 0:
            return  # (without root, qemu_home uses an image prepared before, or skips)
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        cls.log = home / "prepare-tests.log"
        with open(cls.log, "w") as out:
            # Its own session, so its own autogroup: the scheduler would otherwise split the CPU by session,
            # and a cold boot under TCG starved by the tests' JVMs can miss its timeout.
            cls.proc = subprocess.Popen([sys.executable, "-m", "dhg_kernel", "prepare", "--config-dir", str(home)],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, cwd=ROOT)
        try:
            Path(f"/proc/{cls.proc.pid}/autogroup").write_text("-10")
        except OSError:
            pass
        print(f"\n[prepare] dhvm prepare --config-dir {home} runs in the background (pid {cls.proc.pid}; "
              f"log {cls.log}) while the tests that need no VM run", file=sys.stderr)

    @classmethod
    def wait(cls) -> None:
        if cls.proc is None:
            return
        t0 = time.monotonic()
        code = cls.proc.wait()
        waited = time.monotonic() - t0
        if waited > 1:
            print(f"\n[prepare] waited {waited:.0f} s for the background dhvm prepare", file=sys.stderr)
        if code != 0:
            tail = "\n".join(cls.log.read_text(errors="replace").splitlines()[-30:]) if cls.log else ""
            pytest.fail(f"dhvm prepare of the test image failed (exit {code}; log {cls.log}):\n{tail}")

    @classmethod
    def stop(cls) -> None:
        if cls.proc is not None and cls.proc.poll() is None:
            os.killpg(cls.proc.pid, signal.SIGTERM)  # the run ended first (-x, Ctrl-C): no build left behind
            try:
                cls.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(cls.proc.pid, signal.SIGKILL)


def pytest_unconfigure(config):
    _BackgroundPrepare.stop()


@pytest.fixture(scope="session")
def dhg_home(tmp_path_factory) -> Path:
    """A DHG_HOME of the test session's own (run dirs, sockets, logs)."""
    home = tmp_path_factory.mktemp("dhg-home")
    os.environ["DHG_HOME"] = str(home)
    os.environ["DHG_BACKEND"] = "local"  # tests that want a VM ask for one by name
    return home


@pytest.fixture(scope="session")
def session(dhg_home):
    """One Deephaven agent (local backend) shared by the agent-level tests."""
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="1g")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def ip(dhg_home):
    """An IPython shell with ``%load_ext dhg_kernel`` done."""
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "dhg_kernel")
    shell.run_line_magic("config", f"Dhvm.config_dir = {str(dhg_home)!r}")
    shell.run_line_magic("config", "Dhvm.heap = '1g'")
    yield shell
    shell.run_line_magic("dhvm", "stop")


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A notebook working directory with a small CSV under data/."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "trades.csv").write_text("sym,px,qty\nAAPL,1.5,10\nMSFT,2.5,20\nGOOG,3.5,30\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory):
    """The dhvm kernelspec installed under a prefix of the test's own, found through JUPYTER_PATH."""
    prefix = tmp_path_factory.mktemp("prefix")
    p = subprocess.run([sys.executable, "-m", "dhg_kernel", "kernel", "install", "--prefix", str(prefix)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    path = str(prefix / "share" / "jupyter")
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = path
    yield path
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="session")
def qemu_home() -> Path:
    """A DHG_HOME holding a prepared QEMU image and snapshot (built once, cached between runs in
    ``$DHG_TEST_HOME``, default ``~/.dhg-test``). A failing prepare fails the tests that need it."""
    from dhg_kernel.vm.qemu import qemu_binary

    if not qemu_binary():
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86; make test does)")
    from dhg_kernel.config import Layout
    from dhg_kernel.prepare import PrepareError, prepare

    _BackgroundPrepare.wait()
    home = _BackgroundPrepare.home()
    layout = Layout(home)
    have_snapshot = (layout.snapshots() / "metadata.json").is_file()
    if not have_snapshot and os.geteuid() != 0:
        pytest.skip(f"no prepared QEMU snapshot under {home}, and building one needs root "
                    f"(run: sudo dhvm prepare --config-dir {home})")
    try:
        prepare(layout, progress=lambda m: print(f"[prepare] {m}", file=sys.stderr))
    except PrepareError as e:
        pytest.fail(f"could not prepare the QEMU image: {e}")
    return home


@pytest.fixture
def vm(qemu_home):
    """A session on a freshly restored microVM."""
    from dhg_kernel.session import Session

    s = Session(backend="qemu", config_dir=qemu_home)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (never a browser download)."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (make test does)")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; make test does as root)")
    # Without the background-networking flags Chromium keeps trying hosts this closed network refuses.
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=args)
        yield b
        b.close()


@pytest.fixture
def parent_netns():
    """A network namespace standing in for the host, so the test never touches the real host's network."""
    from dhg_kernel.vm import netns

    reason = netns.why_not()
    if reason:
        pytest.skip(reason)
    from pyroute2 import netns as pn

    name = f"dhgt-{os.getpid()}"
    pn.create(name)
    yield name
    pn.remove(name)
