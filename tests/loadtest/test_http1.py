"""The generator's HTTP/1.1 client (`loadtest.http1`) against a real uvicorn server and a
raw asyncio one on 127.0.0.1: keep-alive reuse, bodies streamed as they arrive, bodies
that end with the connection, and connections left mid-request closed, not reused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loadtest.http1 import Client, Response
from tests.support import free_port, serve_app_in_thread

PAUSE_S = 0.3


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse(
            {"body": body.decode(), "tag": request.headers.get("x-tag")},
            status_code=201,
            headers={"Server-Timing": "inference;dur=1.5"},
        )

    @app.get("/slow")
    async def slow() -> JSONResponse:
        await asyncio.sleep(1.0)
        return JSONResponse({})

    @app.post("/events")
    async def events() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"event: first\ndata: 1\n\n"
            await asyncio.sleep(PAUSE_S)
            yield b"event: done\ndata: 2\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_app_in_thread(_app(), free_port()) as base:
        yield base


def test_a_connection_is_kept_alive_and_reused(url: str) -> None:
    async def main() -> tuple[list[Response], int, bool]:
        client = Client(url)
        responses = [
            await client.request("POST", "/echo", [("X-Tag", str(i))], f"hi {i}".encode())
            for i in range(3)
        ]
        first = client._idle[0]
        await client.request("POST", "/echo", [], b"")
        same = client._idle[0] is first
        idle = len(client._idle)
        await client.close()
        return responses, idle, same

    responses, idle, same = asyncio.run(main())
    assert idle == 1 and same  # one connection served every request in turn
    for i, response in enumerate(responses):
        assert response.status == 201
        assert response.headers["server-timing"] == "inference;dur=1.5"  # names in lower case
        assert response.body == f'{{"body":"hi {i}","tag":"{i}"}}'.encode()


def test_a_streamed_body_is_handed_over_as_it_arrives(url: str) -> None:
    async def main() -> tuple[list[tuple[float, int, bytes]], float, Response]:
        client = Client(url)
        seen: list[tuple[float, int, bytes]] = []
        start = time.monotonic()
        response = await client.request(
            "POST",
            "/events",
            [("Accept", "text/event-stream")],
            b"x",
            lambda so_far, chunk: seen.append((time.monotonic(), so_far.status, chunk)),
        )
        await client.close()
        return seen, time.monotonic() - start, response

    seen, total_s, response = asyncio.run(main())
    assert response.status == 200 and response.body == b""  # the body went to the handler
    assert response.headers["transfer-encoding"] == "chunked"
    assert b"".join(chunk for _, _, chunk in seen) == (
        b"event: first\ndata: 1\n\nevent: done\ndata: 2\n\n"
    )
    assert all(status == 200 for _, status, _ in seen)  # the status is known before the body
    first_at = seen[0][0]
    assert seen[-1][0] - first_at >= PAUSE_S * 0.9  # the first piece came before the pause
    assert total_s >= PAUSE_S


def test_the_end_is_timed_when_read_not_when_the_task_resumes(url: str) -> None:
    """`Response.done_s` is the instant the last byte was parsed: work the event loop runs
    before the awaiting task resumes (here a 50 ms callback queued as the body arrived)
    does not count in it."""
    hog_s = 0.05

    async def main() -> tuple[float, float, float, Response]:
        client = Client(url)
        loop = asyncio.get_running_loop()
        read_at: list[float] = []

        def on_body(so_far: Response, chunk: bytes) -> None:
            read_at.append(time.monotonic())
            loop.call_soon(time.sleep, hog_s)  # runs before the task is woken

        response = await client.request("POST", "/echo", [], b"x", on_body)
        resumed_s = time.monotonic()
        await client.close()
        return read_at[-1], response.done_s, resumed_s, response

    read_s, done_s, resumed_s, response = asyncio.run(main())
    assert response.status == 201
    assert read_s <= done_s < read_s + hog_s / 2
    assert resumed_s - done_s >= hog_s * 0.9


def test_a_connection_left_mid_request_is_closed(url: str) -> None:
    async def main() -> tuple[int, Response]:
        client = Client(url)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await client.request("GET", "/slow")
        left = len(client._idle)
        after = await client.request("POST", "/echo", [], b"again")  # a new connection
        await client.close()
        return left, after

    left, after = asyncio.run(main())
    assert left == 0 and after.status == 201


def test_a_body_that_ends_with_the_connection() -> None:
    """HTTP/1.1 allows a body delimited by the connection's end (no length, no chunks);
    a connection closed before the headers end is an error."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/cut" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Ty")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def main() -> tuple[Response, int]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Client(f"http://127.0.0.1:{port}")
        whole = await client.request("GET", "/")
        idle = len(client._idle)
        with pytest.raises(ConnectionError):
            await client.request("GET", "/cut")
        await client.close()
        server.close()
        await server.wait_closed()
        return whole, idle

    whole, idle = asyncio.run(main())
    assert whole.status == 200 and whole.body == b"all of it"
    assert idle == 0  # closed by the server: not kept


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError):
        Client("https://127.0.0.1:8443")
    client = Client("http://127.0.0.1:9/base/")
    assert client.encode("POST", "/v1/classify", [("X-A", "1")], b"ab") == (
        b"POST /base/v1/classify HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 2\r\n"
        b"X-A: 1\r\n\r\nab"
    )
    assert client.encode("GET", "/x", []) == b"GET /base/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
