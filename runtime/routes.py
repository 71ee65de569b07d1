"""kiln-serve's FastAPI application: metadata, health, metrics and the OpenAPI document.

Serve path, HTTP routes. Inference requests and health probes never reach it: the fast
front in kiln.runtime.server answers them, and builds this application in the background
once the model is ready, since importing FastAPI is 0.8 s of a replica's start on the H100
(docs/results/importtime-cuda.txt).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from kiln import __version__
from kiln.runtime.dataplane import DataPlane
from kiln.runtime.errors import KilnError
from kiln.runtime.inference import InferAnswer, error_parts
from kiln.runtime.metrics import Metrics
from kiln.runtime.protocol import (
    BINARY_HEADER,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
)


def error_response(exc: KilnError) -> Response:
    code, body, headers = error_parts(exc)
    return Response(body, status_code=code, headers=dict(headers))


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


def build_api(plane: DataPlane, metrics: Metrics, answer: InferAnswer) -> FastAPI:
    """kiln-serve's FastAPI application: every route, for the requests the fast front passes on."""
    app = FastAPI(title="kiln-serve", version=__version__)

    @app.get("/v2")
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(name="kiln", version=__version__, extensions=["binary_tensor_data"])

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if plane.reports_ready else 503)

    @app.get("/v2/models/{name}", responses={200: {"model": ModelMetadata}, **_errors(404, 503)})
    async def model_metadata(name: str) -> Response:
        plane.check_name(name)
        return Response(plane.metadata().model_dump_json(exclude_none=True), media_type="application/json")

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        plane.check_name(name)
        return Response(status_code=200 if plane.reports_ready else 503)

    @app.post(
        "/v2/models/{name}/infer",
        openapi_extra=document_infer_body(app),
        responses={200: {"model": InferenceResponse}, **_errors(400, 404, 413, 503)},
    )
    async def infer(name: str, request: Request) -> Response:
        """Documents the route; requests are answered by the fast front (kiln.runtime.server)."""
        body = await request.body()
        status, payload, headers = await answer(name, body, request.headers.get(BINARY_HEADER))
        return Response(payload, status_code=status, headers=dict(headers))

    @app.get("/metrics")
    async def prometheus() -> Response:
        if plane.batcher is not None:
            metrics.queue_depth.labels(plane.name).set(plane.batcher.depth)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(KilnError)
    async def domain_error(_: Request, exc: KilnError) -> Response:
        return error_response(exc)

    return app
