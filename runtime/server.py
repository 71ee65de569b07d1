"""kiln-serve's server: the Open Inference Protocol v2 over HTTP (uvicorn, FastAPI behind a fast front).

Serve path, HTTP server, started by kiln.runtime.serve. `FastFront` answers inference requests and health
probes itself and passes every other request to the FastAPI application of kiln.runtime.routes, built a
second after the model is ready (or on the first request that needs it). The model loads in a worker thread
through kiln.runtime.loader, which imports torch only when the lean loader cannot serve the artifact; on the
lean path kiln-serve's preload thread has usually opened it already.

Two shapes: without intake processes one process serves HTTP and runs the model (`HttpServer` with
`load_in_process`); with them (kiln.runtime.intake_pool) this process only loads the model and answers
the intakes' frames (`serve_model_process`), and each intake runs an `HttpServer` of its own; until one
is up, the model process serves the HTTP connections that come itself, with an `HttpServer` on standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from kiln.runtime.bodies import BODY_EXTENSION, BodyBuffer, InferBodyProtocol, infer_model, protocol_with_limit
from kiln.runtime.dataplane import BatchSettings, DataPlane
from kiln.runtime.errors import InvalidInput, KilnError, PayloadTooLarge
from kiln.runtime.inference import InferAnswer, check_size, error_parts
from kiln.runtime.loader import JitArgs, LoadedModel
from kiln.runtime.metrics import Metrics
from kiln.runtime.preload import cpu_limit, mark, timeline
from kiln.runtime.protocol import BINARY_HEADER
from kiln.runtime.settings import ServeSettings, parse_settings

if TYPE_CHECKING:
    from kiln.runtime.intake_pool import IntakePool
    from kiln.runtime.shm import Arena

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
        self,
        answer: InferAnswer,
        build_api: Callable[[], ASGIApp],
        startup: Callable[[], Coroutine[Any, Any, None]],
        shutdown: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.answer, self.build_api, self.startup, self.shutdown = answer, build_api, startup, shutdown
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
            ok = scope["path"].endswith("live") or plane.reports_ready
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
                await self.shutdown()
                if self.answer.plane.batcher is not None:
                    await self.answer.plane.batcher.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def infer(self, name: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            check_size(headers.get("content-length"), self.answer.limit)
            body = await self.read_body(scope, receive)
            if body is not None:
                await self.reply(send, *await self.answer(name, body, headers.get(BINARY_HEADER.lower())))
        except KilnError as exc:
            await self.reply(send, *error_parts(exc))
        finally:
            buffer: BodyBuffer | None = scope.get("extensions", {}).get(BODY_EXTENSION)
            if buffer is not None:
                buffer.release()  # after the answer: the model process reads tensors where they lie

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


async def load_plane(plane: DataPlane, settings: ServeSettings) -> str | None:
    """Load the model in a worker thread, warm it and start batching; the failure's one-line reason, else None.

    A failure also goes to the termination log, where the operator reads it into the model's status."""
    start = time.perf_counter()
    try:
        await asyncio.to_thread(plane.load, lambda: model_loader(settings))
    except Exception as exc:
        reason = f"{getattr(exc, 'reason', 'LoadFailed')}: {exc}".replace("\n", " ")
        log.error("model failed to load: %s", reason)
        with contextlib.suppress(OSError):
            Path("/dev/termination-log").write_text(reason[:4000])
        return reason
    plane.start()
    log.info("ready in %.2f s (model %s)", time.perf_counter() - start, plane.name)
    mark("ready")
    log.info("start-up: %s", timeline())
    return None


def batch_settings(settings: ServeSettings) -> BatchSettings:
    return BatchSettings(
        settings.max_batch_size,
        settings.max_delay_ms,
        settings.max_queue,
        settings.batchable,
        settings.warm_batch_sizes,
        settings.grow_batches,
    )


class HttpServer:
    """uvicorn and the fast front around a dataplane: the whole server without intake processes, or one
    intake process's server (kiln.runtime.intake) with a dataplane that forwards to the model process."""

    def __init__(
        self,
        settings: ServeSettings,
        plane: DataPlane,
        metrics: Metrics,
        startup: Callable[[HttpServer], Coroutine[Any, Any, None]],
        arena: Arena | None = None,
        listens: bool = True,
    ) -> None:
        self.settings, self.plane, self.metrics, self.arena = settings, plane, metrics, arena
        self.listens = listens  # False: connections come from elsewhere (`adopt`; the model process accepts)
        self.failure: str | None = None
        self.server: uvicorn.Server | None = None
        self.adopting: set[asyncio.Task[Any]] = set()  # connections handed over, being set up
        self.grpc: Any = None  # kiln.runtime.grpc_transport.GrpcServer when --grpc-port is set
        self.asgi = FastFront(
            InferAnswer(plane, settings.max_body_bytes, metrics),
            self.api,
            lambda: self.starting(startup),
            self.stopping,
        )

    async def starting(self, startup: Callable[[HttpServer], Coroutine[Any, Any, None]]) -> None:
        """The lifespan's start: the gRPC port (it answers not-ready until the model is), then `startup`."""
        if self.settings.grpc_port:
            from kiln.runtime import grpc_service  # protobuf: only where gRPC is served

            try:
                settings = self.settings
                port = settings.grpc_port if self.listens else 0
                self.grpc = await grpc_service.start(
                    self.plane, self.metrics, settings.host, port, settings.max_body_bytes, self.arena
                )
            except OSError as exc:
                self.failure = f"GrpcPortUnavailable: {exc}"
                self.stop()
                return
        await startup(self)

    async def stopping(self) -> None:
        """The lifespan's end (HTTP has drained): gRPC calls in flight get the same grace."""
        if self.grpc is not None:
            await self.grpc.stop(self.settings.graceful_seconds)

    def api(self) -> ASGIApp:
        from kiln.runtime.routes import build_api  # FastAPI: imported after the model is ready

        return build_api(self.plane, self.metrics, self.asgi.answer)

    async def build_api_later(self) -> None:
        # Importing FastAPI holds the GIL for a few hundred ms: not while the first requests are answered.
        await asyncio.sleep(API_AFTER_READY_S)
        await self.asgi.application()

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere, as uvicorn serves those it accepts itself."""
        server = self.server
        assert server is not None  # from the lifespan's start on, or `standby()`: uvicorn's config and state exist
        config = server.config
        lifespan = getattr(server, "lifespan", None)  # made by uvicorn's serve; a server on standby has none
        app_state = lifespan.state if lifespan is not None else {}

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=server.server_state, app_state=app_state
            )

        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.connect_accepted_socket(protocol, sock))
        self.adopting.add(task)
        task.add_done_callback(self.adopting.discard)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    def standby(self) -> None:
        """Able to `adopt` connections without uvicorn's own loop, listener or lifespan: the model process
        serves the connections that come while no intake process is up yet (kiln.runtime.intake_pool)."""
        config = self.config()
        config.load()
        self.server = DrainingServer(config, self.plane, self.settings.drain_seconds)

    def retire_adopted(self) -> None:
        """Close each connection adopted so far after its next answer (kiln.runtime.bodies: `retire`)."""
        if self.server is not None:
            for connection in list(self.server.server_state.connections):
                if isinstance(connection, InferBodyProtocol):
                    connection.retire()

    def close_adopted(self) -> None:
        """Close the connections adopted so far: idle ones now, busy ones once answered (uvicorn's shutdown)."""
        if self.server is not None:
            for connection in list(self.server.server_state.connections):
                connection.shutdown()

    async def drain_adopted(self, drain: float, grace: float) -> None:
        """A standby's SIGTERM (readiness is off by now): serve `drain` seconds more, then close its
        connections, giving the requests in flight `grace` seconds."""
        await asyncio.sleep(drain)
        self.close_adopted()
        if self.server is not None and (tasks := set(self.server.server_state.tasks)):
            await asyncio.wait(tasks, timeout=grace)

    def config(self) -> uvicorn.Config:
        settings = self.settings
        return uvicorn.Config(
            self.asgi,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=settings.graceful_seconds,
            access_log=False,
            http=protocol_with_limit(settings.max_body_bytes, self.arena, self.asgi.answer),
            ws="none",  # no websocket routes: uvicorn would import websockets (~0.1 s at start) for nothing
            proxy_headers=False,  # nothing here reads client addresses; saves a middleware per request
        )

    def run(self) -> int:
        self.server = DrainingServer(self.config(), self.plane, self.settings.drain_seconds)
        self.server.run(sockets=None if self.listens else [])  # [] : no listener of its own
        if self.failure:
            print(self.failure, file=sys.stderr)
            return 1
        return 0


async def load_in_process(http: HttpServer) -> None:
    """The lifespan start of a server without intake processes: load here, then build FastAPI."""
    http.failure = await load_plane(http.plane, http.settings)
    if http.failure:
        http.stop()
        return
    await http.build_api_later()


async def standing_by(http: HttpServer) -> None:
    """A standby server's lifespan start: never run (it has no lifespan); the model process loads the model."""


def new_plane(settings: ServeSettings) -> DataPlane:
    """The dataplane of the process that runs the model, with its metrics."""
    return DataPlane(settings.model_name, batch_settings(settings), Metrics())


async def serve_model_process(settings: ServeSettings, pool: IntakePool) -> int:
    """The model process in front of intake processes: load, tell them ready, answer their frames, drain."""
    plane = new_plane(settings)
    metrics = plane.metrics
    plane.intakes = pool.total
    if settings.wait_arriving:  # else the batcher counts only the requests already in this process
        plane.arriving = pool.arriving
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.Event()
    # Until an intake is up, HTTP connections are served here: the intakes import as much as this process
    # does, and on slow hosts they came up after the model (docs/benchmarks.md §18).
    local = HttpServer(settings, plane, metrics, standing_by, listens=False)
    local.standby()
    pool.standby = local
    serving = asyncio.create_task(pool.serve(plane, metrics, ready))
    loading = asyncio.create_task(load_plane(plane, settings))
    await asyncio.wait({loading, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    failure = loading.result() if loading.done() else "stopped while loading"
    if not failure:
        ready.set()
        await asyncio.wait({serving, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping: draining %d intake processes", pool.total)
    plane.draining = True  # the connections served here report not-ready through the drain too
    grace = settings.drain_seconds + settings.graceful_seconds + 5 if not failure else 5
    draining = local.drain_adopted(settings.drain_seconds if not failure else 0, settings.graceful_seconds)
    await asyncio.gather(pool.drain(grace), draining)
    pool.standby = None
    if plane.batcher is not None:
        await plane.batcher.stop()
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


def fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where installed (as uvicorn picks it for the intakes), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    return serve(parse_settings(argv))


def serve(settings: ServeSettings, pool: IntakePool | None = None) -> int:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if pool is not None:
        with asyncio.Runner(loop_factory=fast_loop()) as runner:
            return runner.run(serve_model_process(settings, pool))
    plane = new_plane(settings)
    return HttpServer(settings, plane, plane.metrics, load_in_process).run()


if __name__ == "__main__":
    sys.exit(main())
