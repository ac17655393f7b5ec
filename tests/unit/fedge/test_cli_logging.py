"""FEDGE_LOG_FORMAT=json: one JSON object per log line, for log shippers."""

from __future__ import annotations

import json
import logging
import sys

from fedge.cli import JsonLogFormatter


def test_a_log_record_becomes_one_line_of_json() -> None:
    record = logging.LogRecord(
        "fl_server.x", logging.WARNING, __file__, 1, "round %d: %s", (3, "ok"), None
    )
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    document = json.loads(line)
    assert document["level"] == "WARNING" and document["logger"] == "fl_server.x"
    assert document["message"] == "round 3: ok" and isinstance(document["pid"], int)


def test_an_exception_is_kept_in_the_line() -> None:
    try:
        raise ValueError('bad "quote"\nand newline')
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), info)
    document = json.loads(JsonLogFormatter().format(record))
    assert "ValueError" in document["error"] and "newline" in document["error"]
