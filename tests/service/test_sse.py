"""EventStreamResponse against a scripted ASGI peer: every chunk sent in order, the
producer closed when the client leaves, and a cancellation that is not ours passed on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, MutableMapping
from typing import Any

import pytest

from service.sse import EventStreamResponse


class Peer:
    """The server side of ASGI: records what is sent; `leave()` delivers a disconnect."""

    def __init__(self) -> None:
        self.sent: list[MutableMapping[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()


async def stalled(closed: asyncio.Event) -> AsyncGenerator[bytes, None]:
    """One chunk, then deeper work the client will not wait for."""
    try:
        yield b"first"
        await asyncio.sleep(30)
        yield b"never"
    finally:
        closed.set()


def bodies(peer: Peer) -> list[bytes]:
    return [m["body"] for m in peer.sent if m["type"] == "http.response.body"]


def test_sends_every_chunk_then_ends() -> None:
    async def chunks() -> AsyncGenerator[bytes, None]:
        yield b"a"
        await asyncio.sleep(0.01)
        yield b"b"

    async def main() -> Peer:
        peer = Peer()
        await EventStreamResponse(chunks(), {"Cache-Control": "no-cache"})(
            {"type": "http"}, peer.receive, peer.send
        )
        return peer

    peer = asyncio.run(main())
    start = peer.sent[0]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache"
    assert bodies(peer) == [b"a", b"b", b""]
    assert peer.sent[-1]["more_body"] is False


def test_disconnect_closes_the_producer_and_returns_quietly() -> None:
    async def main() -> Peer:
        peer = Peer()
        closed = asyncio.Event()
        response = EventStreamResponse(stalled(closed), {})
        call = asyncio.ensure_future(response({"type": "http"}, peer.receive, peer.send))
        await asyncio.sleep(0.01)
        peer.leave()
        await asyncio.wait_for(call, 5)  # returns, does not raise CancelledError
        assert closed.is_set()
        assert not call.cancelled()
        return peer

    peer = asyncio.run(main())
    assert bodies(peer) == [b"first"]


def test_a_cancellation_not_caused_by_the_client_propagates() -> None:
    async def main() -> None:
        peer = Peer()
        response = EventStreamResponse(stalled(asyncio.Event()), {})
        call = asyncio.ensure_future(response({"type": "http"}, peer.receive, peer.send))
        await asyncio.sleep(0.01)
        call.cancel()  # e.g. the server shutting down
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
