"""kiln-serve's server: the Open Inference Protocol v2 over HTTP (uvicorn, FastAPI behind a fast front).

Runtime layer 4 (HTTP), started by kiln.runtime.serve. `FastFront` answers inference requests and health
probes itself and passes every other request to the FastAPI application of kiln.runtime.routes, built a
second after the model is ready (or on the first request that needs it). The model loads in a worker thread
through kiln.runtime.loader, which imports torch only when the lean loader cannot serve the artifact; on the
lean path kiln-serve's preload thread has usually opened it already.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from kiln.runtime.bodies import BODY_EXTENSION, BodyBuffer, infer_model, protocol_with_limit
from kiln.runtime.dataplane import BatchSettings, DataPlane
from kiln.runtime.errors import InvalidInput, KilnError, PayloadTooLarge
from kiln.runtime.inference import InferAnswer, check_size, error_parts
from kiln.runtime.loader import JitArgs, LoadedModel
from kiln.runtime.metrics import Metrics
from kiln.runtime.preload import cpu_limit, mark, timeline
from kiln.runtime.protocol import BINARY_HEADER
from kiln.runtime.settings import ServeSettings, parse_settings

log = logging.getLogger("kiln.serve")

API_AFTER_READY_S = 1.0  # FastAPI is built this long after ready, or sooner on the first request it serves
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class FastFront:
    """The ASGI application uvicorn runs. POST /v2/models/{name}/infer and the health probes are
    answered here, without FastAPI's per-request machinery (middleware stack, routing, dependency
    solving: about 40% of a small request's CPU in a profile); every other request goes to the
    FastAPI application, which is imported and built in the background after the model is ready:
    a replica reports ready without paying for it. The ASGI lifespan starts the model's load."""

    HEALTH = {"/v2/health/live", "/v2/health/ready"}

    def __init__(
        self, answer: InferAnswer, build_api: Callable[[], ASGIApp], startup: Callable[[], Awaitable[None]]
    ) -> None:
        self.answer, self.build_api, self.startup = answer, build_api, startup
        self.api: asyncio.Future[ASGIApp] | None = None
        self.loading: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        name = infer_model(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if name is not None:
            await self.infer(name, scope, receive, send)
        elif scope.get("method") == "GET" and scope.get("path") in self.HEALTH:
            plane = self.answer.plane
            ok = scope["path"].endswith("live") or (plane.ready and not plane.draining)
            await self.reply(send, 200 if ok else 503, b"", [])
        else:
            await (await self.application())(scope, receive, send)

    async def application(self) -> ASGIApp:
        """The FastAPI application, built in a worker thread on first need (or a second after ready)."""
        if self.api is None:
            self.api = asyncio.ensure_future(asyncio.to_thread(self.build_api))
        return await asyncio.shield(self.api)

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loading = asyncio.create_task(self.startup())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.loading is not None:
                    self.loading.cancel()
                if self.answer.plane.batcher is not None:
                    await self.answer.plane.batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def infer(self, name: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            check_size(headers.get("content-length"), self.answer.limit)
            body = await self.read_body(scope, receive)
        except KilnError as exc:
            await self.reply(send, *error_parts(exc))
            return
        if body is not None:
            await self.reply(send, *await self.answer(name, body, headers.get(BINARY_HEADER.lower())))

    async def read_body(self, scope: dict[str, Any], receive: Any) -> bytes | memoryview | None:
        """The whole body (None: the client left): InferBodyProtocol's buffer, or the pieces joined."""
        buffer: BodyBuffer | None = scope.get("extensions", {}).get(BODY_EXTENSION)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.answer.limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.answer.limit}")
            if not message.get("more_body"):
                break
        if buffer is not None:
            if not buffer.complete:
                raise InvalidInput(f"request body ended after {buffer.filled} of {buffer.length} bytes")
            return buffer.view
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    @staticmethod
    async def reply(send: Any, status: int, payload: bytes, headers: list[tuple[str, str]]) -> None:
        raw = [(k.encode(), v.encode()) for k, v in headers] + [(b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})


def jit_args(settings: ServeSettings) -> JitArgs | None:
    if settings.mode != "jit":
        return None
    dynamic = None if settings.jit_dynamic == "auto" else settings.jit_dynamic == "true"
    return JitArgs(settings.inductor_mode, settings.jit_fullgraph, dynamic, settings.jit_backend, settings.jit_disable)


def model_loader(settings: ServeSettings) -> LoadedModel:
    """Load the model the settings name (runs in a worker thread); torch is imported only if the loader needs it."""
    from kiln.runtime import loader

    threads = settings.intra_op_threads or cpu_limit()
    if settings.artifact:
        return loader.load_artifact(
            Path(settings.artifact), settings.device, threads, jit_args(settings), settings.inter_op_threads
        )
    from kiln.runtime import torch_loaders
    from kiln.runtime.fetch import fetch

    pools = torch_loaders.set_threads(threads, settings.inter_op_threads)
    fetched = fetch(
        settings.archive,
        Path("/tmp/kiln-serve-archive.pt2"),
        sha256=settings.archive_sha256 or None,
        max_bytes=8 << 30,
        pvc_root=Path(settings.pvc_root),
    )
    model = torch_loaders.load_program(
        fetched.path, settings.device, jit_args(settings), settings.max_batch_size, settings.batch_dim
    )
    model.threads = pools
    return model


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM first turns readiness off and keeps serving `drain` seconds.

    Endpoints take a moment to drop a terminating pod; requests routed to it in that
    moment still get answers instead of refused connections.
    """

    def __init__(self, config: uvicorn.Config, plane: DataPlane, drain: float) -> None:
        super().__init__(config)
        self.plane, self.drain, self.draining = plane, drain, False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain > 0 and not self.draining and sig == signal.SIGTERM:
            self.draining = True
            self.plane.draining = True
            log.info("SIGTERM: not ready; serving %.1f s more before shutting down", self.drain)
            threading.Timer(self.drain, super().handle_exit, (sig, frame)).start()
            return
        super().handle_exit(sig, frame)


class App:
    """The server and its model: loads in the background so liveness answers at once."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.plane = DataPlane(
            settings.model_name,
            BatchSettings(settings.max_batch_size, settings.max_delay_ms, settings.max_queue, settings.batchable),
            self.metrics,
        )
        self.failure: str | None = None
        self.server: uvicorn.Server | None = None
        self.asgi = FastFront(InferAnswer(self.plane, settings.max_body_bytes, self.metrics), self.api, self.load)

    def api(self) -> ASGIApp:
        from kiln.runtime.routes import build_api  # FastAPI: imported after the model is ready

        return build_api(self.plane, self.metrics, self.asgi.answer)

    async def load(self) -> None:
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self.plane.load, lambda: model_loader(self.settings))
        except Exception as exc:
            reason = f"{getattr(exc, 'reason', 'LoadFailed')}: {exc}".replace("\n", " ")
            log.error("model failed to load: %s", reason)
            self.failure = reason
            with contextlib.suppress(OSError):
                Path("/dev/termination-log").write_text(reason[:4000])
            if self.server is not None:
                self.server.should_exit = True
            return
        self.plane.start()
        log.info("ready in %.2f s (model %s)", time.perf_counter() - start, self.plane.name)
        mark("ready")
        log.info("start-up: %s", timeline())
        # Importing FastAPI holds the GIL for a few hundred ms: not while the first requests are answered.
        await asyncio.sleep(API_AFTER_READY_S)
        await self.asgi.application()


def main(argv: list[str] | None = None) -> int:
    return serve(parse_settings(argv))


def serve(settings: ServeSettings) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = App(settings)
    config = uvicorn.Config(
        app.asgi,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.graceful_seconds,
        access_log=False,
        http=protocol_with_limit(settings.max_body_bytes),
        proxy_headers=False,  # nothing here reads client addresses; saves a middleware per request
    )
    app.server = DrainingServer(config, app.plane, settings.drain_seconds)
    app.server.run()
    if app.failure:
        print(app.failure, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
