"""Deephaven's web IDE in a real browser (Debian's Chromium driven by Playwright; never a browser
download): the link `%dhvm status` shows logs in with the instance's key; without it, or with a
wrong key, the IDE asks for a token. Screenshots land in build/test-artifacts/."""

from __future__ import annotations

import time

import pytest
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


def test_the_web_ide_link_logs_in_with_the_instance_key_and_nothing_else_does(browser, dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        s.start()
        url = s.deephaven_url()
        base = url.split("?")[0]
        assert url == f"{base}?psk={s.instance.key}"
        login_form = "#auth-psk-token-input"
        for shot, u in (("web-ide-no-key.png", base), ("web-ide-wrong-key.png", base + "?psk=wrong")):
            text = _open(browser, u, shot, login_form)
            assert "Login" in text and "Command History" not in text
        text = _open(browser, url, "web-ide-with-key.png", "text=Command History")
        assert "Console" in text and "Login" not in text
    finally:
        s.stop()


def test_a_deephaven_figures_link_opens_the_chart(browser, dhg_home):
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        r = _with_a_chart(s, "chart")
        url = s.widget_url("chart")
        assert url in r.value["text/html"].replace("&amp;", "&")
        _open(browser, url, "deephaven-figure-link.png", ".js-plotly-plot")
        text = _open(browser, url.split("&psk=")[0], "deephaven-figure-no-key.png", "#auth-psk-token-input")
        assert "Login" in text, "without the key the chart is not shown"
    finally:
        s.stop()


def test_ide_opens_the_console_a_table_or_a_figure_and_says_why_not_for_anything_else(browser, dhg_home):
    """`%dhvm ide [NAME]`'s URL: the console, a table's own view, a figure's view — logged in; a name
    that holds something else, or nothing, is a clear error."""
    from dhg_kernel.errors import UsageError
    from dhg_kernel.session import Session

    s = Session("local", dhg_home, heap="768m")
    try:
        _with_a_chart(s, "answer = 42")
        key = s.instance.key
        assert s.ide_url() == s.deephaven_url()
        table_url = s.ide_url("prices")
        assert "/iframe/table/?name=prices&psk=" + key in table_url
        text = _open(browser, table_url, "ide-table.png", ".iris-grid")
        assert "Login" not in text
        figure_url = s.ide_url("chart")
        assert "/iframe/widget/?name=chart&psk=" + key in figure_url
        _open(browser, figure_url, "ide-figure.png", ".js-plotly-plot")
        with pytest.raises(UsageError, match="'answer' is a builtins.int, which Deephaven's web UI does not show"):
            s.ide_url("answer")
        with pytest.raises(UsageError, match="no table or figure named 'missing'"):
            s.ide_url("missing")
        with pytest.raises(UsageError, match="not a variable name"):
            s.ide_url("prices; import os")
    finally:
        s.stop()
