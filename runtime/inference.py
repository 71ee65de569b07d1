"""Answering inference requests over HTTP, framework-free: body in, (status, payload, headers) out.

Serve path, requests (the HTTP side of the dataplane, framework-free). Domain errors are mapped to codes in one
place (`STATUS`), with the protocol's one error body `{"error": "..."}`; an exception the
model raises is a 500 with that body too (ModelFailed), counted like any answer. A binary request
whose JSON header was seen before takes the kept plan for it (kiln.runtime.plans: parsed, checked,
its answer header built once) and reaches the model through `DataPlane.call`. Used by the fast
front (kiln.runtime.server) and by the FastAPI application (kiln.runtime.routes).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import ValidationError as WireError

from kiln.runtime.dataplane import DataPlane
from kiln.runtime.errors import (
    InvalidInput,
    KilnError,
    ModelFailed,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from kiln.runtime.metrics import Metrics
from kiln.runtime.plans import MAX_HEADER_BYTES, Plan, Plans
from kiln.runtime.protocol import BINARY_HEADER, InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

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


def json_header(response: InferenceResponse) -> bytes:
    return response.model_dump_json(exclude_none=True).encode()


def check_size(declared: str | None, limit: int) -> None:
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")


def header_end(body: bytes | memoryview, header_len: str | None) -> int:
    """Where the JSON header ends: the binary extension's header length, or the whole body."""
    split = len(body) if header_len is None else (int(header_len) if header_len.isdigit() else -1)
    if not 0 <= split <= len(body):
        raise InvalidInput(f"{BINARY_HEADER} is {header_len}, but the body has {len(body)} bytes")
    return split


def parse_body(
    body: bytes | memoryview, header_len: str | None, limit: int
) -> tuple[InferenceRequest, dict[str, tuple[int, int]]]:
    """Parse a JSON body, or a JSON header followed by binary tensor data: the request, and where each
    binary input's bytes start and end in the body."""
    if len(body) > limit:
        raise PayloadTooLarge(f"request body of {len(body)} bytes exceeds the limit of {limit}")
    split = header_end(body, header_len)
    try:
        parsed = InferenceRequest.model_validate(json.loads(bytes(body[:split])))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    except WireError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"malformed inference request at {where}: {first['msg']}") from exc
    layout: dict[str, tuple[int, int]] = {}
    offset = split
    for inp in parsed.inputs:
        size = (inp.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise InvalidInput(f"input {inp.name!r}: binary_data_size {size} runs past the end of the body")
        layout[inp.name] = (offset, offset + size)
        offset += size
    if offset != len(body):
        raise InvalidInput(f"{len(body) - offset} bytes of binary data are not claimed by any input")
    return parsed, layout


class InferAnswer:
    """One inference request, body in, (status, payload, headers) out, counted in the metrics."""

    def __init__(self, plane: DataPlane, limit: int, metrics: Metrics) -> None:
        self.plane, self.limit, self.metrics = plane, limit, metrics
        self.codes: dict[int, Any] = {}  # prometheus label children, resolved once per status
        self.plans = Plans()
        self.inflight, self.latency = metrics.inflight.labels(plane.name), metrics.latency.labels(plane.name)

    def _count(self, status: int) -> Any:
        if status not in self.codes:
            self.codes[status] = self.metrics.requests.labels(self.plane.name, str(status))
        return self.codes[status]

    async def __call__(self, name: str, body: bytes | memoryview, header_len: str | None) -> Parts:
        start = time.perf_counter()
        self.inflight.inc()
        try:
            status, payload, headers = await self._answer(name, body, header_len)
        finally:
            self.inflight.dec()
        self._count(status).inc()
        self.latency.observe(time.perf_counter() - start)
        return status, payload, headers

    async def _answer(self, name: str, body: bytes | memoryview, header_len: str | None) -> Parts:
        try:
            self.plane.check_name(name)
            plan = self.plan(body, header_len)
            header, chunks = await self.plane.call(
                plan.tensors(memoryview(body)),
                plan.rows,
                lambda outputs: plan.answer(outputs, self.plane.encode, json_header),
            )
        except KilnError as exc:
            return error_parts(exc)
        except Exception as exc:  # the model raised: a JSON 500 naming it, counted, and the server keeps serving
            log.exception("model %s failed on a request", self.plane.name)
            return error_parts(ModelFailed.of(self.plane.name, exc))
        if not chunks:
            return 200, header, [("content-type", "application/json")]
        return (
            200,
            header + b"".join(chunks),
            [("content-type", "application/octet-stream"), (BINARY_HEADER.lower(), str(len(header)))],
        )

    def plan(self, body: bytes | memoryview, header_len: str | None) -> Plan:
        """The request's plan: kept from an earlier request with the same binary header, or made (and kept) now."""
        key = None
        if header_len is not None and len(body) <= self.limit:
            split = header_end(body, header_len)
            key = bytes(body[:split]) if split <= MAX_HEADER_BYTES else None
        if key is not None and (plan := self.plans.get(key, len(body))) is not None:
            return plan
        parsed, layout = parse_body(body, header_len, self.limit)
        plan = self.plane.plan(parsed, layout, len(body))
        if key is not None:
            self.plans.keep(key, plan)
        return plan
