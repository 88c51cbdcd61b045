"""`fractal classify IMAGE`: send one image to a running server and print the answer.

Without `--stream` it prints the one answer `POST /v1/classify` returns; with `--stream` it
asks for progressive answers (Server-Sent Events) and prints a table row per column as
each arrives, then the final answer and why the server stopped there (docs/api.md).

Only httpx, the standard library and `loadtest.protocol` (the request headers and the SSE
parser the load generator uses too): this runs on any machine with the core install,
without torch or onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx

from service.protocol import CLASSIFY_PATH, EVENT_STREAM, Event, SseParser, classify_headers

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_ENV = "FRACTAL_TOKEN"

# The image types /v1/classify accepts, by file suffix.
CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}

REASONS = {
    "deepest": "the deepest column answered",
    "deadline": "no deeper column fits in the remaining budget",
    "confident": "the confidence reached the threshold",
    "load": "the server was busy: deeper columns run on spare capacity only",
    "forced": "the column was forced (X-Column)",
}

# The streamed table: (heading, width, prediction field); text columns align left.
TABLE = (
    ("column", 6, "column"),
    ("depth", 5, "depth"),
    ("precision", 9, "precision"),
    ("class", 12, "class_name"),
    ("confidence", 10, "confidence"),
    ("elapsed_ms", 10, "elapsed_ms"),
)
LEFT = {"precision", "class_name"}


class ClientError(Exception):
    """A request that did not produce an answer, with the message for the user."""


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _column(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"columns count from 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fractal classify",
        description="Send one image to a FractalNet anytime server and print the answer(s).",
    )
    parser.add_argument("image", type=Path, help="PNG, JPEG, WebP, BMP or GIF file")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL ({DEFAULT_URL})")
    parser.add_argument(
        "--deadline-ms", type=_positive, metavar="MS", help="time budget in ms (X-Deadline-Ms)"
    )
    parser.add_argument(
        "--min-confidence",
        type=_probability,
        metavar="C",
        help="cascade: stop at the first column this confident, 0-1 (X-Min-Confidence)",
    )
    parser.add_argument(
        "--column", type=_column, metavar="K", help="force column K, 1-based (X-Column)"
    )
    parser.add_argument(
        "--stream", action="store_true", help="print each column's answer as it arrives"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token when the server requires one (default: ${TOKEN_ENV})",
    )
    parser.add_argument(
        "--timeout-s",
        type=_positive,
        default=60.0,
        metavar="S",
        help="HTTP timeout in seconds (60)",
    )
    return parser.parse_args(argv)


def request_headers(args: argparse.Namespace, content_type: str) -> dict[str, str]:
    headers = classify_headers(
        content_type, args.deadline_ms, args.column, args.stream, request_start_s=time.time()
    )
    if args.min_confidence is not None:
        headers["X-Min-Confidence"] = f"{args.min_confidence:g}"
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    return headers


def iter_events(lines: Iterable[str]) -> Iterator[Event]:
    """Each event of a text/event-stream as soon as its blank line arrives."""
    parser = SseParser()
    for line in lines:
        yield from parser.feed(line)
    yield from parser.feed("")


def _error_message(response: httpx.Response) -> str:
    detail = response.text.strip() or response.reason_phrase
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        detail = str(body["error"])
        if body.get("reason"):
            detail += f" (reason: {body['reason']})"
    message = f"{response.status_code} {response.reason_phrase}: {detail}"
    if retry := response.headers.get("Retry-After"):
        message += f"; retry after {retry} s"
    return message


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "-"


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def _cell(prediction: dict[str, Any], field: str) -> str:
    value = prediction.get(field)
    if field == "confidence":
        return _percent(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return "-" if value is None else str(value)


def _align(text: str, width: int, field: str) -> str:
    return text.ljust(width) if field in LEFT else text.rjust(width)


def table_header() -> str:
    return "  ".join(_align(heading, width, field) for heading, width, field in TABLE).rstrip()


def table_row(prediction: dict[str, Any]) -> str:
    return "  ".join(_align(_cell(prediction, f), width, f) for _, width, f in TABLE).rstrip()


def _timing(answer: dict[str, Any]) -> str:
    text = _ms(answer.get("elapsed_ms"))
    if answer.get("deadline_ms") is not None:
        met = "met" if answer.get("deadline_met") else "missed"
        text += f" of a {_ms(answer['deadline_ms'])} deadline ({met})"
    else:
        text += " (no deadline)"
    return text


def format_answer(answer: dict[str, Any]) -> str:
    """The lines printed for one non-streamed /v1/classify answer."""
    lines = [
        f"{answer.get('class_name')}  {_percent(answer.get('confidence'))}  "
        f"column {answer.get('column')}/{answer.get('columns')} "
        f"(depth {answer.get('depth')}, {answer.get('precision')}, "
        f"{'two views, ' if answer.get('views') == 2 else ''}"
        f"test accuracy {_percent(answer.get('accuracy'))})",
        f"time: {_timing(answer)}; queue {_ms(answer.get('queue_ms'))}, "
        f"inference {_ms(answer.get('inference_ms'))}",
    ]
    top5 = answer.get("top5") or []
    if top5:
        lines.append(
            "top-5: "
            + ", ".join(f"{t.get('class_name')} {_percent(t.get('probability'))}" for t in top5)
        )
    if cascade := answer.get("cascade"):
        run = ", ".join(str(c) for c in cascade.get("columns_run", []))
        lines.append(
            f"cascade: threshold {cascade.get('threshold')}, columns run {run}, "
            f"reason {cascade.get('reason')}"
        )
    return "\n".join(lines)


def format_done(done: dict[str, Any]) -> str:
    """The line printed for the stream's `done` event."""
    final = done.get("final") or {}
    reason = done.get("reason")
    run = ", ".join(str(c) for c in done.get("columns_run", []))
    return (
        f"final: {final.get('class_name')} ({_percent(final.get('confidence'))}) "
        f"from column {final.get('column')}; reason: {reason} "
        f"({REASONS.get(str(reason), 'not documented')}); columns run: {run}; "
        f"time: {_timing(done)}"
    )


def classify(args: argparse.Namespace, client: httpx.Client, out: TextIO) -> None:
    """Send the image and print the answer(s) to `out`; raise ClientError on failure."""
    content_type = CONTENT_TYPES.get(args.image.suffix.lower())
    if content_type is None:
        raise ClientError(
            f"{args.image}: unsupported suffix; use one of {', '.join(sorted(CONTENT_TYPES))}"
        )
    try:
        body = args.image.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {args.image}: {exc.strerror}") from exc
    url = args.url.rstrip("/") + CLASSIFY_PATH
    headers = request_headers(args, content_type)
    with client.stream("POST", url, content=body, headers=headers) as response:
        if not response.is_success:
            response.read()
            raise ClientError(_error_message(response))
        if not response.headers.get("Content-Type", "").startswith(EVENT_STREAM):
            response.read()
            print(format_answer(response.json()), file=out)
            return
        _print_stream(response, out)


def _print_stream(response: httpx.Response, out: TextIO) -> None:
    print(table_header(), file=out, flush=True)
    for event in iter_events(response.iter_lines()):
        try:
            payload = json.loads(event.data)
        except json.JSONDecodeError as exc:
            raise ClientError(f"unreadable {event.name} event: {event.data!r}") from exc
        if event.name == "prediction":
            print(table_row(payload), file=out, flush=True)
        elif event.name == "done":
            print(format_done(payload), file=out, flush=True)
            return
        elif event.name == "error":
            raise ClientError(f"the server stopped the stream: {payload.get('error', event.data)}")
    raise ClientError("the stream ended without a final answer")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with httpx.Client(timeout=args.timeout_s) as client:
            classify(args, client, sys.stdout)
    except ClientError as exc:
        print(f"fractal classify: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"fractal classify: {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
