"""The %%dhvm / %dhvm magics in a real IPython shell against a real Deephaven server."""

from __future__ import annotations

import pandas as pd
import pytest
from IPython.utils.capture import capture_output

from dhg_kernel.display import RemoteCellError

pytestmark = pytest.mark.slow


def run(ip, src):
    with capture_output() as cap:
        res = ip.run_cell(src)
    # dhvm's own status line ("dhvm: … server ready in 0.3 s") is not the cell's output.
    # (CapturedIO.outputs is rebuilt from _outputs on every access)
    cap._outputs[:] = [o for o in cap._outputs if not o["data"].get("text/plain", "").startswith("dhvm: ")]
    return res, cap


def test_cell_streams_print_output_and_renders_the_table_under_its_name(ip, workspace):
    res, cap = run(ip, '%%dhvm\nfrom deephaven import read_csv\ntrades = read_csv("data/trades.csv")\nprint("rows:", trades.size)')
    assert res.success, res.error_in_exec
    assert "rows: 3" in cap.stdout
    heading, frame = cap.outputs[0], cap.outputs[1]
    assert "trades" in heading.data["text/html"] and "3 rows" in heading.data["text/plain"]
    assert "AAPL" in frame.data["text/plain"]


def test_o_binds_tables_as_local_dataframes(ip, workspace):
    res, _ = run(ip, '%%dhvm -o trades -o px=prices\nfrom deephaven import read_csv\n'
                     'trades = read_csv("data/trades.csv")\nprices = trades.view(["sym", "px"])')
    assert res.success
    assert isinstance(ip.user_ns["trades"], pd.DataFrame) and ip.user_ns["trades"]["qty"].tolist() == [10, 20, 30]
    assert list(ip.user_ns["px"].columns) == ["sym", "px"]


def test_o_can_bind_a_table_made_by_an_earlier_cell(ip, workspace):
    run(ip, "%%dhvm\nfrom deephaven import empty_table\nearlier = empty_table(4).update('K = i')")
    res, _ = run(ip, "%%dhvm -o earlier\nx_unrelated = 1")
    assert res.success and ip.user_ns["earlier"]["K"].tolist() == [0, 1, 2, 3]


def test_o_binds_the_whole_table_even_when_the_display_is_cut(ip):
    res, cap = run(ip, "%%dhvm -n 5 -o wide\nfrom deephaven import empty_table\nwide = empty_table(2000).update('X = i')")
    assert res.success
    assert "first 5 of 2,000 rows" in cap.outputs[0].data["text/plain"]
    assert len(ip.user_ns["wide"]) == 2000


def test_remote_errors_fail_the_cell_with_the_remote_traceback(ip):
    res, cap = run(ip, "%%dhvm\ndef boom():\n    raise ValueError('bad input')\nboom()")
    assert not res.success
    err = res.error_in_exec
    assert isinstance(err, RemoteCellError) and type(err).__name__ == "ValueError"
    assert "raise ValueError('bad input')" in cap.stdout and "in the Deephaven server" in cap.stdout


def test_config_sets_defaults(ip):
    ip.run_line_magic("config", "Dhvm.max_rows = 2")
    try:
        res, cap = run(ip, "%%dhvm\nfrom deephaven import empty_table\ncfg = empty_table(10)")
        assert "first 2 of 10 rows" in cap.outputs[0].data["text/plain"]
    finally:
        ip.run_line_magic("config", "Dhvm.max_rows = 1000")


def test_quiet_shows_no_tables(ip):
    res, cap = run(ip, "%%dhvm -q\nfrom deephaven import empty_table\nhidden = empty_table(3)")
    assert res.success and cap.outputs == []


def test_verbose_prints_timings(ip):
    res, cap = run(ip, "%%dhvm -v\ny = 2")
    assert "exec" in cap.stderr and "roundtrip" in cap.stderr


def test_file_over_the_limit_stops_the_cell_before_it_runs(ip, workspace):
    (workspace / "big.csv").write_bytes(b"x" * 200_000)
    res, cap = run(ip, '%%dhvm --max-push-mb 0.1\nran_big = True\nopen("big.csv")')
    assert not res.success and "push limit" in cap.stdout and "big.csv" in cap.stdout
    res, cap = run(ip, "%%dhvm\nprint('ran_big' in globals())")
    assert cap.stdout.strip() == "False"


def test_explicit_file_flag_pushes_a_file_the_scanner_cannot_see(ip, workspace):
    (workspace / "hidden.bin").write_bytes(b"12345")
    res, cap = run(ip, "%%dhvm --file hidden.bin\nimport os\nname = 'hid' + 'den.bin'\nprint(os.path.getsize(name))")
    assert res.success and cap.stdout.strip() == "5"


def test_a_pushed_module_imports_by_name_as_in_a_notebook(ip, workspace):
    """The workspace is first on the agent's sys.path: `--file helper.py` then `import helper` works."""
    (workspace / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    res, cap = run(ip, "%%dhvm --file helper.py\nimport helper\nprint(helper.double(21))")
    assert res.success and cap.stdout.strip() == "42", cap.stdout


def test_no_files_turns_scanning_off(ip, workspace):
    (workspace / "data" / "fresh.csv").write_text("a\n1\n")
    res, cap = run(ip, '%%dhvm --no-files\nimport os\nprint(os.path.exists("data/fresh.csv"))')
    assert cap.stdout.strip() == "False"


def test_line_magic_status_and_tables(ip):
    run(ip, "%%dhvm\nfrom deephaven import empty_table\nlisted_t = empty_table(3)")
    res, cap = run(ip, "%dhvm status")
    assert "backend: local" in cap.stdout and "running: True" in cap.stdout
    res, _ = run(ip, "%dhvm tables")
    assert "listed_t" in res.result["name"].tolist()


def test_ide_shows_a_link_and_the_tables_view_and_a_clear_error_for_other_names(ip):
    run(ip, "%%dhvm\nfrom deephaven import empty_table\nide_t = empty_table(3)\nide_n = 7")
    res, cap = run(ip, "%dhvm ide ide_t")
    assert res.success
    (shown,) = [o.data for o in cap.outputs]
    assert "/dhvm/open/" in shown["text/plain"] and "psk=" not in shown["text/plain"] + shown["text/html"]
    assert '<a href="' in shown["text/html"] and "<iframe src=" in shown["text/html"]
    res, cap = run(ip, "%dhvm ide")
    (shown,) = [o.data for o in cap.outputs]
    assert "/dhvm/open/" in shown["text/plain"] and "<iframe" not in shown["text/html"], "the console is a link only"
    res, cap = run(ip, "%dhvm ide ide_n")
    assert not res.success and "UsageError" in cap.stdout and "builtins.int" in cap.stdout
    assert "Traceback" not in cap.stdout, "a DhvmError shows as its message alone"


def test_ide_under_jupyterhub_says_how_to_reach_the_port(ip, monkeypatch):
    run(ip, "%%dhvm\nfrom deephaven import empty_table\nhub_t = empty_table(3)")
    res, cap = run(ip, "%dhvm ide hub_t")
    assert "JupyterHub" not in cap.outputs[0].data["text/plain"]
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/alice/")
    res, cap = run(ip, "%dhvm ide hub_t")
    text = cap.outputs[0].data["text/plain"]
    port = ip.magics_manager.registry["Dhvm"].session.deephaven_address()[1]
    assert f"ssh -L {port}:127.0.0.1:{port}" in text and "%dhvm show hub_t" in text
    assert "JupyterHub" in cap.outputs[0].data["text/html"]


def test_reset_gives_a_fresh_server(ip):
    run(ip, "%%dhvm\nkeep_me = 1")
    res, cap = run(ip, "%%dhvm\nprint(keep_me)")
    assert cap.stdout.strip() == "1"
    run(ip, "%dhvm reset")
    res, cap = run(ip, "%%dhvm\nprint(keep_me)")
    assert not res.success and type(res.error_in_exec).__name__ == "NameError"


def test_help_lists_the_options(ip):
    doc = ip.find_cell_magic("dhvm").__doc__
    for opt in ("--output", "--max-rows", "--quiet", "--verbose", "--timeout", "--file", "--no-files"):
        assert opt in doc
