"""Deephaven's web IDE in a real browser (Debian's Chromium driven by Playwright; never a browser
download): the one-time link `%dhvm status` shows logs in, once; without the key, or with a wrong
key, the IDE asks for a token. Screenshots land in build/test-artifacts/."""

from __future__ import annotations

import time

import pytest

from dhg_kernel import weblinks
from conftest import ARTIFACTS

pytestmark = pytest.mark.slow


def _open(browser, url: str, shot: str, ready: str, timeout_s: float = 60) -> str:
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.goto(url)
        page.wait_for_selector(ready, timeout=timeout_s * 1000)
        time.sleep(0.5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / shot))
        return page.inner_text("body")
    finally:
        ctx.close()


def _with_a_chart(session, last_line: str):
    """A table ``prices`` and a Deephaven Figure ``chart`` of it in the session; ``last_line`` ends the cell."""
    r = session.execute("from deephaven import empty_table\nfrom deephaven.plot.figure import Figure\n"
                        "prices = empty_table(5).update(['Sym = `S` + i', 'Px = i * 2.5'])\n"
                        f"chart = Figure().plot_xy(series_name='s', t=prices, x='Px', y='Px').show()\n{last_line}")
    assert r.ok, r.error
    return r


def _real_url(link: str) -> str:
    """Where a one-time link leads (it is used up by this)."""
    from test_weblinks import open_once

    status, where, _ = open_once(link)
    assert status == 302, status
    return where


def test_the_web_ide_link_logs_in_once_and_nothing_else_does(browser, dhg_home):
    """`%dhvm status`'s link opens the console, logged in, once; a second visit, the bare server, or a
    wrong key get no console."""
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        s.start()
        link = weblinks.console_link(s)
        assert "/dhvm/open/" in link and s.instance.key not in link
        text = _open(browser, link, "web-ide-with-link.png", "text=Command History")
        assert "Console" in text and "Login" not in text
        text = _open(browser, link, "web-ide-link-used.png", "text=already used")
        assert "%dhvm ide" in text and "Command History" not in text
        base = f"http://127.0.0.1:{s.deephaven_address()[1]}/ide/"
        login_form = "#auth-psk-token-input"
        for shot, u in (("web-ide-no-key.png", base), ("web-ide-wrong-key.png", base + "?psk=wrong")):
            text = _open(browser, u, shot, login_form)
            assert "Login" in text and "Command History" not in text
    finally:
        s.stop()


def test_a_deephaven_figures_link_opens_the_chart(browser, dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        r = _with_a_chart(s, "chart")
        link = r.value["text/plain"].split()[3]
        assert "/dhvm/open/" in link and link in r.value["text/html"]
        _open(browser, link, "deephaven-figure-link.png", ".js-plotly-plot")
        bare = _real_url(weblinks.widget_url(s, "chart")).split("&psk=")[0]
        text = _open(browser, bare, "deephaven-figure-no-key.png", "#auth-psk-token-input")
        assert "Login" in text, "without the key the chart is not shown"
    finally:
        s.stop()


def test_ide_opens_the_console_a_table_or_a_figure_and_says_why_not_for_anything_else(browser, dhg_home):
    """`%dhvm ide [NAME]`'s links: the console, a table's own view, a figure's view — logged in; a name
    that holds something else, or nothing, is a clear error."""
    from dhg_kernel.errors import UsageError
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        _with_a_chart(s, "answer = 42")
        key = s.instance.key
        assert _real_url(s.ide_url()).endswith(f"/ide/?psk={key}")
        assert "/iframe/table/?name=prices&psk=" + key in _real_url(s.ide_url("prices"))
        text = _open(browser, s.ide_url("prices"), "ide-table.png", ".iris-grid")
        assert "Login" not in text
        assert "/iframe/widget/?name=chart&psk=" + key in _real_url(s.ide_url("chart"))
        _open(browser, s.ide_url("chart"), "ide-figure.png", ".js-plotly-plot")
        with pytest.raises(UsageError, match="'answer' is a builtins.int, which Deephaven's web UI does not show"):
            s.ide_url("answer")
        with pytest.raises(UsageError, match="no table or figure named 'missing'"):
            s.ide_url("missing")
        with pytest.raises(UsageError, match="not a variable name"):
            s.ide_url("prices; import os")
    finally:
        s.stop()
