"""Request headers and answer parsing shared by the generator and the Locust file."""

from __future__ import annotations

import json

import pytest

from service.protocol import (
    Answer,
    answer_from_done,
    answer_from_error,
    answer_from_json,
    classify_headers,
    column_count,
    error_text,
    parse_sse,
    server_timing,
)


def test_headers() -> None:
    assert classify_headers("image/jpeg", 12.5, None, False) == {
        "Content-Type": "image/jpeg", "X-Deadline-Ms": "12.500",
    }  # fmt: skip
    h = classify_headers("image/png", float("nan"), 3, True)
    assert h == {"Content-Type": "image/png", "X-Column": "3", "Accept": "text/event-stream"}
    assert "X-Deadline-Ms" not in classify_headers("image/png", None, None, False)


def test_sse_events_and_final_answer() -> None:
    # the final column's own elapsed time (9.0) is when it was answered; the stream's
    # (12.5, in `done`) is the server's time for the whole request
    final = {"column": 3, "class_name": "cat", "confidence": 0.9, "elapsed_ms": 9.0}
    text = (
        ": a comment\n"
        "event: prediction\n"
        'data: {"column": 1, "class_name": "dog"}\n'
        "\n"
        "event: done\n"
        f"data: {json.dumps({'final': final, 'reason': 'deepest', 'elapsed_ms': 12.5})}\n"
        "\n"
    )
    events = parse_sse(text.split("\n"))
    assert [e.name for e in events] == ["prediction", "done"]
    assert answer_from_done(events[1]) == Answer(column=3, class_name="cat", server_ms=12.5)


def test_server_elapsed_time_of_an_answer() -> None:
    answer = answer_from_json({"column": 2, "class_name": "cat", "elapsed_ms": 4.25})
    assert answer.server_ms == 4.25
    assert answer_from_json({"column": 2, "class_name": "cat"}).server_ms is None
    assert answer_from_json({"class_name": "cat", "elapsed_ms": "soon"}).server_ms is None
    assert answer_from_json({"class_name": "cat", "elapsed_ms": True}).server_ms is None


def test_sse_multiline_data_and_unterminated_event() -> None:
    events = parse_sse(["data: a", "data: b"])
    assert len(events) == 1 and events[0].name == "message" and events[0].data == "a\nb"


def test_error_and_bad_answers() -> None:
    (event,) = parse_sse(["event: error", 'data: {"error": "runtime failed"}', ""])
    assert answer_from_error(event).error == "stream:runtime failed"
    assert answer_from_json({"column": 1}).error is not None
    assert answer_from_json([1, 2]).error is not None
    (done,) = parse_sse(["event: done", "data: not json", ""])
    assert answer_from_done(done).error is not None


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        (503, b'{"error": "too slow", "reason": "deadline"}', "shed:deadline"),
        (400, b'{"error": "bad X-Deadline-Ms"}', "400:bad X-Deadline-Ms"),
        (502, b"<html>", "502"),
    ],
)
def test_error_text(status: int, body: bytes, text: str) -> None:
    assert error_text(status, body) == text


def test_column_count() -> None:
    payload = {"models": [{"variants": [{"column": 1}, {"column": 2}, {"column": 2}]}]}
    assert column_count(payload) == 2
    with pytest.raises(ValueError):
        column_count({"models": []})


def test_server_timing_header() -> None:
    assert server_timing("queue;dur=0.25, inference;dur=1.5") == {"queue": 0.25, "inference": 1.5}
    assert server_timing('db;desc="x";dur="3" , cache') == {"db": 3.0}
    assert server_timing("a;dur=soon, ;dur=2, b;desc=x") == {}
    assert server_timing(None) == {} and server_timing("") == {}
