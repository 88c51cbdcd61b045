"""A lean HTTP/1.1 client for the load generator: keep-alive connections on asyncio
protocols, responses parsed by httptools (llhttp, the parser uvicorn uses).

The generator shares the machine with the server it measures, so its CPU a request is
taken from the server and its event loop's delays count against the answers: with
aiohttp it spent 0.6-0.75 ms of CPU a request at 500 requests/s here (docs/loadtest.md).
This client does only what the generator needs: one request at a time a connection (no
pipelining), a body of bytes, the status, the headers and the body back, streamed bodies
(SSE, chunked) handed over as they arrive. No redirects, cookies, proxies, TLS or
compression: the generator talks to one plain-HTTP server.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


@dataclass
class Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    """Header names in lower case; a repeated header keeps its last value."""
    body: bytes = b""
    """Empty when the body went to `on_body` instead."""
    done_s: float = 0.0
    """`time.monotonic()` when the response's end was read: as the bytes arrive, not when
    the awaiting task resumes (one turn of the event loop later, after whatever else that
    turn runs: sends, other responses)."""


BodyHandler = Callable[[Response, bytes], None]
"""Called with the response (its status and headers read) and each piece of its body."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time; httptools calls back the
    `on_*` methods from `data_received`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reusable = False
        self._response = Response()
        self._chunks: list[bytes] = []
        self._on_body: BodyHandler | None = None
        self._done: asyncio.Future[Response] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self._ends_at_close():
            self.on_message_complete()  # a body without length or chunks ends here
        self.reusable = False
        self._fail(ConnectionError("connection closed before the response ended"))

    def _ends_at_close(self) -> bool:
        """Whether the response in progress has its headers and a body delimited by the
        connection's end (neither Content-Length nor chunked: HTTP/1.1 allows it)."""
        headers = self._response.headers
        return (
            self._response.status > 0
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    # -- httptools callbacks -----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools gathers a header split across reads and calls once with the whole.
        self._response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._response.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self._on_body is not None:
            self._on_body(self._response, body)
        else:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        self._response.done_s = time.monotonic()
        self._response.body = b"".join(self._chunks)
        self.reusable = self.parser.should_keep_alive()
        if self._done is not None and not self._done.done():
            self._done.set_result(self._response)

    # -- the request -------------------------------------------------------------------
    def send(self, request: bytes, on_body: BodyHandler | None) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.reusable = False
        self._response, self._chunks, self._on_body = Response(), [], on_body
        self._done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._done

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class Client:
    """Requests to one `http://host:port` server over keep-alive connections: an idle
    one is reused, else a new one is opened (the caller bounds the requests in flight,
    and so the connections)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"need an http://host[:port] URL, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.encode("latin-1")
        self._idle: deque[_Connection] = deque()

    def encode(
        self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> bytes:
        """The request's bytes: its line, Host, Content-Length and `headers`, then `body`."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1".encode("latin-1")]
        lines.append(b"Host: " + self._host_header)
        if body or method not in ("GET", "HEAD"):
            lines.append(b"Content-Length: " + str(len(body)).encode())
        lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        on_body: BodyHandler | None = None,
    ) -> Response:
        """Send one request and wait for the whole response. With `on_body`, the body is
        handed to it piece by piece (de-chunked) as it arrives, with the response so far
        (status and headers), and not kept. A connection is
        reused only after a complete response that keeps it alive; one left mid-request
        (an error, a cancellation, a timeout) is closed."""
        connection = await self._connection()
        try:
            response = await connection.send(self.encode(method, path, headers, body), on_body)
        except BaseException:
            connection.close()
            raise
        if connection.reusable:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                return connection
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Connection, self.host, self.port)
        return protocol

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        await asyncio.sleep(0)  # let the transports close
