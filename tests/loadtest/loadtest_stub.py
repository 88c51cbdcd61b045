"""A tiny HTTP/1.1 server on asyncio streams that imitates the classify API, for tests.

It runs in a thread of the test process with its own event loop, so a test can drive the
generator (which runs its own loop, or other processes) against it. Column k takes
`column_ms[k-1]` to answer; column 1 always answers "frog" and deeper columns answer the
image's true label, so accuracy by column is known exactly. Like the real server, it
sheds (503) a request whose deadline no column (or the forced column) can meet, and
picks the deepest column that fits otherwise.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
WRONG = "frog"


class StubServer:
    def __init__(
        self,
        column_ms: tuple[float, ...] = (2.0, 20.0),
        labels: Mapping[bytes, str] | None = None,
        fixed_delay_s: float = 0.0,
    ) -> None:
        self.column_ms = column_ms
        self.labels = dict(labels or {})
        self.fixed_delay_s = fixed_delay_s
        """Extra sleep before every classify answer (a deliberately slow server)."""
        self.port = 0
        self.arrivals: dict[str, float] = {}
        """time.monotonic() of each classify request's arrival, by X-Request-ID."""
        self.budgets: dict[str, float] = {}
        """The X-Deadline-Ms each classify request carried, by X-Request-ID."""
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StubServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._handle(method, path, headers, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _reply(self, writer: asyncio.StreamWriter, status: int, payload: Any) -> bool:
        body = json.dumps(payload).encode()
        reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        return True

    def _choose(self, deadline: float | None, forced: int | None) -> int | None:
        """The column to answer with, or None to shed."""
        if forced is not None:
            fits = deadline is None or self.column_ms[forced - 1] <= deadline
            return forced if fits else None
        ok = [k for k, ms in enumerate(self.column_ms, 1) if deadline is None or ms <= deadline]
        return max(ok) if ok else None

    def _prediction(self, column: int, body: bytes) -> dict[str, Any]:
        name = WRONG if column == 1 else self.labels.get(body, WRONG)
        return {"column": column, "class_name": name, "class_index": CLASSES.index(name)}

    def _models(self) -> dict[str, Any]:
        variants = [{"key": f"column_{k}", "column": k} for k in range(1, len(self.column_ms) + 1)]
        return {"models": [{"name": "stub", "classes": CLASSES, "variants": variants}]}

    async def _handle(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if method == "GET" and path in ("/v2/health/live", "/v2/health/ready"):
            return await self._reply(writer, 200, {"status": "ok"})
        if method == "GET" and path == "/v1/models":
            return await self._reply(writer, 200, self._models())
        if method != "POST" or path != "/v1/classify":
            return await self._reply(writer, 404, {"error": "not found"})
        request_id = headers.get("x-request-id", str(len(self.arrivals)))
        self.arrivals[request_id] = time.monotonic()
        deadline = float(headers["x-deadline-ms"]) if "x-deadline-ms" in headers else None
        if deadline is not None:
            self.budgets[request_id] = deadline
        forced = int(headers["x-column"]) if "x-column" in headers else None
        column = self._choose(deadline, forced)
        if column is None:
            shed = {"error": "cannot meet the deadline", "reason": "deadline"}
            return await self._reply(writer, 503, shed)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.fixed_delay_s)
            if headers.get("accept") != "text/event-stream":
                await asyncio.sleep(self.column_ms[column - 1] / 1000.0)
                return await self._reply(writer, 200, self._prediction(column, body))
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            run = [1, column] if column > 1 else [1]
            for k in run:
                await asyncio.sleep(self.column_ms[k - 1] / 1000.0)
                data = json.dumps(self._prediction(k, body))
                writer.write(f"event: prediction\ndata: {data}\n\n".encode())
                await writer.drain()
            final = self._prediction(column, body)
            done = {"final": final, "reason": "deepest", "columns_run": run}
            writer.write(f"event: done\ndata: {json.dumps(done)}\n\n".encode())
            await writer.drain()
            return False
        finally:
            self.in_flight -= 1
