"""Links to Deephaven's web UI carry no login key (issue 21): `%dhvm status`, `%dhvm ide` and figure
links put one-time links of the kernel's link broker in outputs, so the saved notebook (0644) holds
nothing that lets anyone in. A link opens once, for the owner's uid only; the server itself still
refuses logins without the key. And the web UI shows times in UTC, as DataFrames do (configurable).

Real kernels (nbclient), real Deephaven servers (local backend; one QEMU case), probes as uid 65534.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest
from test_reliability import INTRUDER, _nobody_python, _nobody_run

LINK_RE = r"http://127\.0\.0\.1:\d+/dhvm/open/[A-Za-z0-9_-]+"

# Run as uid 65534: opens every broker link found in a saved notebook (never following a redirect).
NOBODY_OPENS = textwrap.dedent(f"""
    import json, re, sys, urllib.error, urllib.request
    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    opener = urllib.request.build_opener(Stay)
    out = []
    for url in sorted(set(re.findall({LINK_RE!r}, open(sys.argv[1]).read()))):
        try:
            r = opener.open(url, timeout=30)
            out.append([url, r.status, r.headers.get("Location")])
        except urllib.error.HTTPError as e:
            out.append([url, e.code, e.headers.get("Location")])
    print(json.dumps(out))
""")


class _Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def open_once(url: str) -> tuple[int, str | None, str]:
    """(status, Location, body) of one GET, redirects not followed."""
    try:
        with urllib.request.build_opener(_Stay).open(url, timeout=30) as r:
            return r.status, r.headers.get("Location"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location"), e.read().decode()


def _key_of(location: str) -> str:
    key = re.search(r"[?&]psk=([A-Za-z0-9_-]+)", location)
    assert key, location
    return key.group(1)


def _login(port: int, key: str):
    from pydeephaven import Session as DhSession

    from dhg_kernel.weblinks import PSK_AUTH_TYPE

    return DhSession(host="127.0.0.1", port=port, auth_type=PSK_AUTH_TYPE, auth_token=key)


def _readable_by_nobody(nb_path: Path) -> tuple[Path, Path]:
    """A copy of a saved notebook where any local user can read it, as Jupyter saves them (0644)."""
    shared = Path(tempfile.mkdtemp(prefix="dhg-weblinks-", dir="/tmp"))
    shared.chmod(0o755)
    copy = shared / nb_path.name
    shutil.copyfile(nb_path, copy)
    copy.chmod(0o644)
    return shared, copy


@pytest.mark.slow
def test_a_saved_notebook_holds_no_key_and_its_links_open_once_for_the_owner_only(jupyter_path, dhg_home, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext dhg_kernel\n%config Dhvm.heap = '1g'"),
        nbformat.v4.new_code_cell(
            "%%dhvm\nfrom deephaven import empty_table\nfrom deephaven.plot.figure import Figure\n"
            "prices = empty_table(5).update(['X = i'])\n"
            "chart = Figure().plot_xy(series_name='s', t=prices, x='X', y='X').show()\nchart"),
        nbformat.v4.new_code_cell("%dhvm status"),
        nbformat.v4.new_code_cell("%dhvm ide"),
        nbformat.v4.new_code_cell("%dhvm ide prices"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    os.environ["DHG_HOME"] = str(dhg_home)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    saved = tmp_path / "saved.ipynb"
    shared = None
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        nbformat.write(nb, saved)
        try:
            shared, copy = _readable_by_nobody(saved)
            text = saved.read_text()
            links = sorted(set(re.findall(LINK_RE, text)))
            # A figure's link, status's web_ide, %dhvm ide's link, and %dhvm ide NAME's link and iframe.
            assert len(links) >= 5, text[-3000:]
            assert "psk=" not in text

            # Another user who reads the saved notebook cannot use its links, not even the unused ones.
            p = _nobody_run([_nobody_python(), "-c", NOBODY_OPENS, str(copy)])
            tried = json.loads(p.stdout or "[]")
            assert [u for u, _, _ in tried] == links, p.stderr[-2000:]
            assert all(status == 403 and where is None for _, status, where in tried), tried

            # The owner opens each link once: it redirects to the real server, with the key.
            keys, ports = set(), set()
            for url in links:
                status, where, _ = open_once(url)
                assert status == 302, (url, status)
                assert where.startswith("http://127.0.0.1:")
                keys.add(_key_of(where))
                ports.add(int(re.match(r"http://127\.0\.0\.1:(\d+)/", where).group(1)))
            (key,), (port,) = keys, ports
            assert len(key) >= 40
            assert key not in text, "the key is nowhere in the saved notebook"
            with urllib.request.urlopen(where, timeout=30) as r:
                assert r.status == 200  # the real page loads
            with _login(port, key) as dh:  # and the server accepts the key
                dh.run_script("opened_by_link = 1")

            # A second use (by the owner too) gets a page that says why and how to get a new link.
            status, where, body = open_once(links[0])
            assert status == 410 and where is None and "already used" in body and "%dhvm ide" in body
            # The other user still gets nothing; nor does logging in without the key or with a wrong one.
            p = _nobody_run([_nobody_python(), "-c", NOBODY_OPENS, str(copy)])
            assert all(status == 403 for _, status, _ in json.loads(p.stdout)), p.stdout
            for how in ("anonymous", "", "wrong-key"):
                p = _nobody_run([_nobody_python(), "-c", INTRUDER, "127.0.0.1", str(port), how])
                assert p.stdout.startswith("REFUSED"), (how, p.stdout, p.stderr[-2000:])
            # No log or file of the session holds the key either.
            for path in Path(dhg_home).rglob("*"):
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                    assert key.encode() not in path.read_bytes(), path
        finally:
            if shared is not None:
                shutil.rmtree(shared)


def test_a_link_expires_a_foreign_or_unknown_token_opens_nothing_and_a_reset_ends_its_links(session):
    from dhg_kernel import weblinks

    url = session.ide_url()
    assert "/dhvm/open/" in url and "psk" not in url
    broker = weblinks.broker()
    token = url.rsplit("/", 1)[1]
    # Expired: made with no time to live.
    expired = broker.mint(lambda: "http://127.0.0.1:1/never", "%dhvm ide", ttl=-1)
    status, where, body = open_once(expired)
    assert status == 410 and where is None and "expired" in body and "%dhvm ide" in body
    # Unknown (a kernel restart forgets its links).
    status, _, body = open_once(url.replace(token, "x" * 43))
    assert status == 404 and "%dhvm ide" in body
    # Another uid neither opens a link nor uses it up.
    assert broker.redeem(token, uid=65534)[0] == 403
    status, where, _ = open_once(url)
    assert status == 302 and where.startswith(f"http://127.0.0.1:{session.deephaven_address()[1]}/ide/?psk=")


def test_a_link_made_before_a_reset_does_not_open_the_new_server(dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        s.start()
        old = s.ide_url()
        s.reset()
        s.start()
        status, where, body = open_once(old)
        assert status == 410 and where is None and "has stopped" in body and "%dhvm ide" in body
        status, where, _ = open_once(s.ide_url())
        assert status == 302 and f":{s.deephaven_address()[1]}/" in where
    finally:
        s.stop()


def test_ide_status_and_figure_outputs_hold_links_not_keys(ip):
    from IPython.utils.capture import capture_output

    with capture_output() as cap:
        ip.run_cell_magic("dhvm", "", "from deephaven import empty_table\nfrom deephaven.plot.figure import Figure\n"
                                      "wl_t = empty_table(3).update(['X = i'])\n"
                                      "wl_chart = Figure().plot_xy(series_name='s', t=wl_t, x='X', y='X').show()")
        ip.run_line_magic("dhvm", "status")
        ip.run_line_magic("dhvm", "ide wl_t")
    session = ip.magics_manager.registry["Dhvm"].session
    key = session.server.instance.key
    everything = cap.stdout + cap.stderr + json.dumps([o.data for o in cap.outputs])
    assert key
    assert key not in everything
    assert "psk=" not in everything
    figure, ide = [o.data for o in cap.outputs if "/dhvm/open/" in o.data.get("text/plain", "")]
    assert "Deephaven figure wl_chart" in figure["text/plain"] and "%dhvm ide wl_chart" in figure["text/plain"]
    frame = re.search(r'<iframe src="([^"]+)"', ide["text/html"]).group(1)
    link = re.search(r'<a href="([^"]+)"', ide["text/html"]).group(1)
    assert frame != link, "the embedded view and the link each get their own one-time link"
    for url in (frame, link, re.search(LINK_RE, cap.stdout).group(0)):
        status, where, _ = open_once(url)
        assert status == 302 and _key_of(where) == key


def test_the_web_ui_shows_utc_unless_told_otherwise(ip, caplog):
    def shown_zone() -> str:
        ip.run_line_magic("dhvm", "ide")  # the zone reaches the server with the next link
        with ip.magics_manager.registry["Dhvm"].session.pydeephaven_session() as dh:
            # The same call Deephaven's web UI makes for its settings (getServerConfigValues).
            return dh.config_service.get_configuration_constants()["timeZone"].string_value

    ip.run_cell_magic("dhvm", "", "tz_probe = 1")
    assert shown_zone() == "UTC"
    try:
        ip.run_line_magic("config", "Dhvm.web_time_zone = 'Asia/Tokyo'")
        assert shown_zone() == "Asia/Tokyo"
        ip.run_line_magic("config", "Dhvm.web_time_zone = 'Mars/Olympus'")  # %config logs the refusal
        assert "'Mars/Olympus' is not a time zone name" in caplog.text
        assert ip.magics_manager.registry["Dhvm"].web_time_zone == "Asia/Tokyo", "a bad name changes nothing"
    finally:
        ip.run_line_magic("config", "Dhvm.web_time_zone = 'UTC'")
    assert shown_zone() == "UTC"


@pytest.mark.qemu
def test_a_vms_link_opens_once_and_its_key_is_in_no_argv(vm):
    url = vm.ide_url()
    key = vm.server.instance.key
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
        except OSError:
            pass
    status, where, _ = open_once(url)
    assert status == 302 and _key_of(where) == key
    port = vm.deephaven_address()[1]
    with _login(port, key) as dh:
        assert dh.config_service.get_configuration_constants()["timeZone"].string_value == "UTC"
    assert open_once(url)[0] == 410
    p = _nobody_run([_nobody_python(), "-c", INTRUDER, "127.0.0.1", str(port), "anonymous"])
    assert p.stdout.startswith("REFUSED"), p.stdout
