"""`kiln-serve`: the Open Inference Protocol v2 over HTTP (FastAPI + uvicorn).

Runtime layer 4: routes and the HTTP side of errors. Routes are registered in one
place (`register_routes`), domain errors mapped to codes in one place (`STATUS`),
with the protocol's one error body `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError as WireError

from kiln import __version__
from kiln.runtime.bodies import BODY_EXTENSION, BodyBuffer, infer_model, protocol_with_limit
from kiln.runtime.dataplane import BatchSettings, DataPlane
from kiln.runtime.errors import InvalidInput, KilnError, ModelNotFound, NotReady, Overloaded, PayloadTooLarge
from kiln.runtime.loader import JitArgs, LoadedModel
from kiln.runtime.metrics import Metrics
from kiln.runtime.protocol import (
    BINARY_HEADER,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
)
from kiln.runtime.settings import ServeSettings, cpu_limit, parse_settings

log = logging.getLogger("kiln.serve")

STATUS: dict[type[KilnError], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    NotReady: 503,
    Overloaded: 503,
}
RETRY_AFTER_SECONDS = "1"
# An HTTP answer as the fast path sends it: status, body, headers.
Parts = tuple[int, bytes, list[tuple[str, str]]]


def error_parts(exc: KilnError) -> Parts:
    """(status, JSON body, headers) of a domain error: one line that says what was wrong."""
    code = next((c for t, c in STATUS.items() if isinstance(exc, t)), 500)
    headers = [("content-type", "application/json")]
    if isinstance(exc, (Overloaded, NotReady)):
        headers.append(("retry-after", RETRY_AFTER_SECONDS))
    return code, json.dumps({"error": str(exc)}).encode(), headers


def error_response(exc: KilnError) -> Response:
    code, body, headers = error_parts(exc)
    return Response(body, status_code=code, headers=dict(headers))


def check_size(declared: str | None, limit: int) -> None:
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")


def parse_body(
    body: bytes | memoryview, header_len: str | None, limit: int
) -> tuple[InferenceRequest, dict[str, memoryview]]:
    """Parse a JSON body, or a JSON header followed by binary tensor data."""
    if len(body) > limit:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds the limit of {limit}")
    split = len(body) if header_len is None else (int(header_len) if header_len.isdigit() else -1)
    if not 0 <= split <= len(body):
        raise InvalidInput(f"{BINARY_HEADER} is {header_len}, but the body has {len(body)} bytes")
    try:
        parsed = InferenceRequest.model_validate(json.loads(bytes(body[:split])))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    except WireError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"malformed inference request at {where}: {first['msg']}") from exc
    binary: dict[str, memoryview] = {}
    view = memoryview(body)  # slices without copying
    offset = split
    for inp in parsed.inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidInput(f"input {inp.name!r}: binary_data_size {size} runs past the end of the body")
        binary[inp.name] = view[offset : offset + size]
        offset += size
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes of binary data are not claimed by any input")
    return parsed, binary


class InferAnswer:
    """One inference request, body in, (status, payload, headers) out, counted in the metrics."""

    def __init__(self, plane: DataPlane, limit: int, metrics: Metrics) -> None:
        self.plane, self.limit, self.metrics = plane, limit, metrics
        self.codes: dict[int, Any] = {}  # prometheus label children, resolved once per status

    def _count(self, status: int) -> Any:
        if status not in self.codes:
            self.codes[status] = self.metrics.requests.labels(self.plane.name, str(status))
        return self.codes[status]

    async def __call__(self, name: str, body: bytes | memoryview, header_len: str | None) -> Parts:
        start = time.perf_counter()
        inflight = self.metrics.inflight.labels(self.plane.name)
        inflight.inc()
        try:
            status, payload, headers = await self._answer(name, body, header_len)
        finally:
            inflight.dec()
        self._count(status).inc()
        self.metrics.latency.labels(self.plane.name).observe(time.perf_counter() - start)
        return status, payload, headers

    async def _answer(self, name: str, body: bytes | memoryview, header_len: str | None) -> Parts:
        try:
            self.plane.check_name(name)
            parsed, binary = parse_body(body, header_len, self.limit)
            result, chunks = await self.plane.infer(parsed, binary)
        except KilnError as exc:
            return error_parts(exc)
        header = result.model_dump_json(exclude_none=True).encode()
        if not chunks:
            return 200, header, [("content-type", "application/json")]
        return (
            200,
            header + b"".join(chunks),
            [("content-type", "application/octet-stream"), (BINARY_HEADER.lower(), str(len(header)))],
        )


class InferFastPath:
    """ASGI in front of FastAPI: POST /v2/models/{name}/infer skips the framework's per-request
    machinery (middleware stack, routing, dependency solving: about 40% of a small request's CPU
    in a profile); everything else, the OpenAPI document included, is FastAPI's."""

    def __init__(self, api: FastAPI, answer: InferAnswer) -> None:
        self.api, self.answer = api, answer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        name = infer_model(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if name is None:
            await self.api(scope, receive, send)
            return
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


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


def document_infer_body(app: FastAPI) -> dict[str, Any]:
    """The infer route reads its raw body (JSON, or JSON plus binary tensors), so FastAPI cannot
    describe it: this puts InferenceRequest in the OpenAPI document, for clients and fuzzers."""
    schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generate().setdefault("components", {}).setdefault("schemas", {}).update(defs)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def register_routes(app: FastAPI, plane: DataPlane, settings: ServeSettings, metrics: Metrics) -> InferAnswer:
    """The routes of kiln-serve; returns what answers inference requests (for InferFastPath)."""

    @app.get("/v2")
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name="kiln", version=__version__, extensions=["binary_tensor_data"])

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if plane.ready and not plane.draining else 503)

    @app.get("/v2/models/{name}", responses={200: {"model": ModelMetadata}, **_errors(404, 503)})
    async def model_metadata(name: str) -> Response:
        plane.check_name(name)
        return Response(plane.metadata().model_dump_json(exclude_none=True), media_type="application/json")

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        plane.check_name(name)
        return Response(status_code=200 if plane.ready and not plane.draining else 503)

    @app.post(
        "/v2/models/{name}/infer",
        openapi_extra=document_infer_body(app),
        responses={200: {"model": InferenceResponse}, **_errors(400, 404, 413, 503)},
    )
    async def infer(name: str, request: Request) -> Response:
        """Documents the route; requests are answered by InferFastPath, in front of FastAPI."""
        body = await request.body()
        status, payload, headers = await answer(name, body, request.headers.get(BINARY_HEADER))
        return Response(payload, status_code=status, headers=dict(headers))

    answer = InferAnswer(plane, settings.max_body_bytes, metrics)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if plane.batcher is not None:
            metrics.queue_depth.labels(plane.name).set(plane.batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(KilnError)
    async def domain_error(_: Request, exc: KilnError) -> Response:
        return error_response(exc)

    return answer


def jit_args(settings: ServeSettings) -> JitArgs | None:
    if settings.mode != "jit":
        return None
    dynamic = None if settings.jit_dynamic == "auto" else settings.jit_dynamic == "true"
    return JitArgs(settings.inductor_mode, settings.jit_fullgraph, dynamic, settings.jit_backend, settings.jit_disable)


def model_loader(settings: ServeSettings) -> LoadedModel:
    """Load the model the settings name (runs in a worker thread)."""
    import torch

    from kiln.runtime import loader

    threads = settings.intra_op_threads or cpu_limit()
    torch.set_num_threads(threads)
    if settings.inter_op_threads:
        torch.set_num_interop_threads(settings.inter_op_threads)
    pools = {"intra_op_threads": threads, "inter_op_threads": torch.get_num_interop_threads()}
    if settings.artifact:
        model = loader.load_artifact(Path(settings.artifact), settings.device, threads, jit_args(settings))
    else:
        from kiln.runtime.fetch import fetch

        fetched = fetch(
            settings.archive,
            Path("/tmp/kiln-serve-archive.pt2"),
            sha256=settings.archive_sha256 or None,
            max_bytes=8 << 30,
            pvc_root=Path(settings.pvc_root),
        )
        model = loader.load_program(
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
        self.api = FastAPI(title="kiln-serve", version=__version__, lifespan=self.lifespan)
        self.asgi = InferFastPath(self.api, register_routes(self.api, self.plane, settings, self.metrics))

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(self.load())
        yield
        task.cancel()
        if self.plane.batcher is not None:
            await self.plane.batcher.stop()

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


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    import os

    if os.environ.get("KILN_SWITCH"):
        sys.setswitchinterval(float(os.environ["KILN_SWITCH"]))
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
