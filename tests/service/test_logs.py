"""The server's log lines are written by a listener thread (`logging_off_the_loop`): every
record arrives, in order, formatted as before, and the handlers come back afterwards."""

from __future__ import annotations

import io
import json
import logging
import threading

from service.logs import JsonFormatter, logging_off_the_loop


def test_records_reach_the_handler_in_order_on_another_thread() -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    writers: set[str] = set()
    emit = handler.emit

    def recording_emit(record: logging.LogRecord) -> None:
        writers.add(threading.current_thread().name)
        emit(record)

    handler.emit = recording_emit  # type: ignore[method-assign]
    saved, level = list(root.handlers), root.level
    for h in saved:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    log = logging.getLogger("test.logs")
    try:
        with logging_off_the_loop():
            assert root.handlers != [handler]  # a queue in front of it meanwhile
            for i in range(200):
                log.info("line %d", i)
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
            logging.getLogger("service.access").info(json.dumps({"status": 200}))
        assert root.handlers == [handler]  # put back
    finally:
        root.removeHandler(handler)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines[:200]] == [f"line {i}" for i in range(200)]
    assert lines[200]["message"] == "failed" and "ValueError: boom" in lines[200]["exception"]
    assert lines[201]["status"] == 200 and lines[201]["logger"] == "service.access"
    assert len(lines) == 202  # all written by the time the block is left
    assert threading.current_thread().name not in writers
