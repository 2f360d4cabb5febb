"""Log formats: JSON lines a pipeline can parse, text lines whose fields cannot be forged."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from moderator.logs import REQUEST_LOGGER, JsonFormatter, TextFormatter, configure_logging


def record(message: str, fields: object = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("moderator.x", logging.WARNING, __file__, 1, message, (), exc_info)
    if fields is not None:
        made.fields = fields
    return made


def test_json_lines_carry_the_fields_beside_the_core_keys() -> None:
    line = JsonFormatter().format(record("done", {"method": "Moderate", "images": 3}))
    parsed = json.loads(line)
    assert parsed["message"] == "done"
    assert parsed["level"] == "WARNING"
    assert parsed["logger"] == "moderator.x"
    assert (parsed["method"], parsed["images"]) == ("Moderate", 3)
    assert parsed["time"].endswith("Z")
    assert "T" in parsed["time"]


def test_a_field_cannot_replace_the_core_keys_nor_break_the_line() -> None:
    hostile = {"message": "forged", "level": "DEBUG", "request_id": 'a"\n{"level": "ERROR"}'}
    line = JsonFormatter().format(record("real\nmessage", hostile))
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["message"], parsed["level"]) == ("real\nmessage", "WARNING")
    assert parsed["request_id"] == hostile["request_id"]


def test_json_lines_include_the_traceback() -> None:
    parsed = json.loads(JsonFormatter().format(record("failed", exc=True)))
    assert "ValueError: boom" in parsed["exception"]


def test_text_lines_end_with_the_fields_as_one_json_object() -> None:
    line = TextFormatter().format(record("done", {"request_id": "x y\nz"}))
    first_line = line.splitlines()[0]
    assert first_line.endswith('done {"request_id": "x y\\nz"}')
    assert "\n" not in line
    assert TextFormatter().format(record("plain")).endswith("moderator.x: plain")


@pytest.mark.parametrize("on", [True, False])
def test_the_request_log_is_on_or_off_whatever_the_level(on: bool) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("ERROR", "json", log_requests=on)
        assert logging.getLogger(REQUEST_LOGGER).isEnabledFor(logging.INFO) is on
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
        logging.getLogger(REQUEST_LOGGER).setLevel(logging.NOTSET)


def test_a_server_workers_lines_say_which_worker_wrote_them() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json", worker=3)
        handler = root.handlers[0]
        made = record("ready", {"port": 1})
        assert handler.filter(made)
        line = json.loads(handler.format(made))
        assert (line["worker"], line["port"], line["message"]) == (3, 1, "ready")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def test_json_lines_stay_json_with_non_finite_numbers_and_stacks() -> None:
    made = record("odd", {"ratio": float("nan"), "limit": float("inf")})
    made.stack_info = "Stack (most recent call last):\n  here"
    parsed = json.loads(JsonFormatter().format(made))  # json.loads accepts NaN: check the text
    assert (parsed["ratio"], parsed["limit"]) == ("nan", "inf")
    assert "here" in parsed["stack"]
    assert "NaN" not in JsonFormatter().format(made)


def test_the_error_that_stops_the_server_is_a_json_line_too(tmp_path: Path) -> None:
    """The line that explains a crash loop must reach a JSON log pipeline whole."""
    serve = [sys.executable, "-m", "moderator", "serve", "--demo", "--log-format", "json"]
    done = subprocess.run(
        [*serve, "--policies", str(tmp_path / "missing"), "--port", "0", "--metrics-port", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert lines[-1]["level"] == "ERROR"
    assert lines[-1]["message"] == "error: invalid policies"
    assert "does not exist" in lines[-1]["problems"][0]
