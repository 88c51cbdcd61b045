"""`fractal serve`: run the server with uvicorn, draining gracefully on SIGTERM.

On SIGTERM (or the first Ctrl-C) readiness turns false at once, new work is refused with
503, queued and running work and open streams finish (bounded by the grace period), and
only then does uvicorn stop and the process exit 0. A second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from service.app import create_app
from service.engine import Engine
from service.logs import configure_logging, logging_off_the_loop
from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain before its shutdown.

    On the first SIGTERM or SIGINT, readiness turns false and requests that arrive from
    then on get 503 (reason `draining`); the listening socket stays open meanwhile, so a
    new connection gets that 503 rather than a refused connection. Requests already in
    flight, open streams included, run to their end, bounded by the grace period. Then
    uvicorn's own shutdown closes the socket and idle connections, and the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine, grace_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace_s = grace_s
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            self.force_exit = self._draining is not None
            return
        # Only schedule here: the drain begins on the loop, after the requests already
        # received have started, so they count as arrived before it.
        self._draining = asyncio.get_event_loop().create_task(self._drain_then_exit(sig))

    async def _drain_then_exit(self, sig: int) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.grace_s
        log.info("signal %d: draining (grace %.0f s)", sig, self.grace_s)
        self.engine.begin_drain()
        in_flight = set(self.server_state.tasks)
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.grace_s)
        await self.engine.drain(max(end - loop.time(), 0.0))
        # What is left of the grace period bounds uvicorn's wait for open connections.
        self.config.timeout_graceful_shutdown = max(math.ceil(end - loop.time()), 1)
        self.should_exit = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fractal serve",
        description="Serve a FractalNet bundle. Every setting is an environment variable "
        "FRACTAL_<NAME> (e.g. FRACTAL_MAX_BATCH_SIZE); these options override them.",
    )
    p.add_argument("--model", type=Path, help="bundle folder (FRACTAL_MODEL_PATH)")
    p.add_argument("--host", help="interface (FRACTAL_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (FRACTAL_PORT, default 8000)")
    p.add_argument("--providers", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--latency-profile",
        type=Path,
        help="fixed latency profile JSON (FRACTAL_LATENCY_PROFILE_PATH)",
    )
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--intra-op-threads", type=int)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {
        "model_path": args.model,
        "host": args.host,
        "port": args.port,
        "providers": args.providers,
        "latency_profile_path": args.latency_profile,
        "max_batch_size": args.max_batch_size,
        "intra_op_threads": args.intra_op_threads,
    }
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    settings = settings_from(parse_args(argv))
    if not (settings.model_path / "manifest.json").is_file():
        print(
            f"fractal serve: no bundle at {settings.model_path} (manifest.json missing)",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=configure_logging(settings),
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1,
        lifespan="on",
    )
    server = DrainingServer(config, app.state.engine, settings.shutdown_grace_s)
    with logging_off_the_loop():  # after uvicorn.Config, which applies the log config
        server.run()
    return 0 if server.started else 1
