"""The idle-memory benchmark's readings: /proc status fields in MB, and the table of medians."""

from __future__ import annotations

import os

from bench.rss import FIELDS, status, table


def test_status_reads_this_process_in_mb() -> None:
    found = status(os.getpid())
    assert set(found) == set(FIELDS)
    assert 5 < found["VmRSS"] < 4096 and found["Threads"] >= 1
    assert abs(found["RssAnon"] + found["RssFile"] - found["VmRSS"]) < 2  # plus RssShmem, usually 0


def test_the_table_has_one_line_per_configuration() -> None:
    row = {"configuration": "serve, tcp", "VmRSS": 64.06, "RssAnon": 37.44, "RssFile": 26.7, "Threads": 8}
    lines = table([row]).splitlines()
    assert lines[2] == "| serve, tcp | 64.1 | 37.4 | 26.7 | 8 |"
