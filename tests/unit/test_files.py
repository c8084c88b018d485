"""The file scanner: which workspace files a cell names, and which may travel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dhg_kernel import files
from dhg_kernel.files import FileLimitError, FileNotPushable, add_explicit, check_limit, scan, string_literals


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "data" / "deep").mkdir(parents=True)
    (tmp_path / "data" / "trades.csv").write_text("a,b\n1,2\n")
    (tmp_path / "data" / "deep" / "q.parquet").write_bytes(b"PAR1")
    (tmp_path / "data" / "folder.csv").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    return tmp_path


def rels(report):
    return [f.rel for f in report.files]


def test_literals_come_from_the_tokenizer_not_comments_or_fstrings():
    code = '''x = "a.csv"  # "b.csv"\ny = f"c.csv"\nz = b"d.csv"\nw = r'e.csv'\ns = """f.csv"""\n'''
    assert string_literals(code) == ["a.csv", "e.csv", "f.csv"]


def test_single_double_and_triple_quotes_are_all_seen(ws):
    code = "read_csv('data/trades.csv'); open(\"notes.txt\"); p = '''data/deep/q.parquet'''"
    assert sorted(rels(scan(code, ws))) == ["data/deep/q.parquet", "data/trades.csv", "notes.txt"]


def test_path_call_and_dot_slash_are_normalised(ws):
    report = scan('from pathlib import Path\np = Path("./data/trades.csv")\nq = Path("data/trades.csv")', ws)
    assert rels(report) == ["data/trades.csv"]


def test_missing_files_and_directories_are_skipped_with_a_reason(ws):
    report = scan('read_csv("data/missing.csv"); read_csv("data/folder.csv")', ws)
    assert report.files == []
    reasons = dict(report.skipped)
    assert reasons["data/missing.csv"] == "does not exist"
    assert reasons["data/folder.csv"] == "not a regular file"


def test_unknown_extensions_are_not_pushed(ws):
    assert scan('open("img.png")', ws).files == []


def test_extension_list_is_configurable(ws):
    assert rels(scan('open("img.png")', ws, extensions=[".png"])) == ["img.png"]


def test_absolute_paths_are_never_pushed(ws):
    report = scan(f'read_csv("{ws / "data" / "trades.csv"}")', ws)
    assert report.files == [] and "absolute" in report.skipped[0][1]


def test_dotdot_escapes_are_refused(ws):
    outside = ws.parent / "secret.csv"
    outside.write_text("x")
    report = scan('read_csv("../secret.csv"); read_csv("data/../../secret.csv")', ws)
    assert report.files == []
    assert all("leaves the workspace" in why for _, why in report.skipped)


def test_dotdot_that_stays_inside_is_fine(ws):
    assert rels(scan('read_csv("data/deep/../trades.csv")', ws)) == ["data/trades.csv"]


def test_symlink_pointing_outside_is_refused(ws):
    outside = ws.parent / "outside-target.csv"
    outside.write_text("secret")
    os.symlink(outside, ws / "data" / "link.csv")
    report = scan('read_csv("data/link.csv")', ws)
    assert report.files == [] and "outside the workspace" in report.skipped[0][1]


def test_symlink_inside_the_workspace_is_followed(ws):
    os.symlink(ws / "data" / "trades.csv", ws / "alias.csv")
    report = scan('read_csv("alias.csv")', ws)
    assert rels(report) == ["alias.csv"] and report.files[0].path == (ws / "data" / "trades.csv").resolve()


def test_incomplete_code_is_scanned_as_far_as_it_goes(ws):
    assert rels(scan('t = read_csv("data/trades.csv")\nif (', ws)) == ["data/trades.csv"]


def test_limit_lists_files_and_says_how_to_raise_it(ws):
    big = ws / "big.csv"
    big.write_bytes(b"x" * (2 * files.MIB))
    report = scan('read_csv("big.csv"); read_csv("data/trades.csv")', ws)
    with pytest.raises(FileLimitError) as e:
        check_limit(report.files, limit_mb=1)
    msg = str(e.value)
    assert "big.csv" in msg and "2.0 MiB" in msg and "data/trades.csv" in msg
    assert "--max-push-mb 3" in msg and "Dhvm.max_push_mb" in msg
    check_limit(report.files, limit_mb=3)  # under the limit: no error


def test_explicit_file_is_added_and_a_bad_one_is_an_error(ws):
    report = add_explicit(scan("x = 1", ws), ["img.png"], ws)
    assert rels(report) == ["img.png"]
    with pytest.raises(FileNotPushable, match="does not exist"):
        add_explicit(report, ["nope.bin"], ws)
    with pytest.raises(FileNotPushable, match="absolute"):
        add_explicit(report, ["/etc/hostname"], ws)
