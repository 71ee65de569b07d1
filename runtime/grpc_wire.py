"""ModelInfer's messages at the byte level: where a request's raw tensors lie, and an answer written around its outputs.

Serve path, requests (framework-free: neither grpc nor the protobuf runtime). A serialized message is a
series of fields, and a ModelInferRequest's raw_input_contents hold nearly all its bytes. `split_request`
walks the top-level fields once: each raw input is found where it lies (the request's tensors are views
of the bytes grpc handed over, not copies made by a parse), and the other fields, a few hundred bytes
of names, shapes and parameters, are themselves a valid ModelInferRequest that keys a request plan
(kiln.runtime.plans) as an HTTP request's JSON header does. An answer is a kept ModelInferResponse
without outputs' bytes followed by one `raw_output` field per output: fields of a message may come in
any order and concatenate.
"""

from __future__ import annotations

from array import array

from kiln.runtime.errors import InvalidInput

RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_CONTENTS = 6  # ModelInferResponse.raw_output_contents
VARINT, I64, LEN, I32 = 0, 1, 2, 5  # wire types (3 and 4, groups, are not in this protocol)
FIXED = {I64: 8, I32: 4}


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidInput("the request is not a valid ModelInferRequest: a field runs past its end")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_request(data: bytes | memoryview) -> tuple[bytes, list[tuple[int, int]]]:
    """The request without its raw_input_contents (a ModelInferRequest of its own), and each raw input's
    (start, end) in `data`, in order."""
    rest: list[bytes | memoryview] = []
    raws: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        kind = tag & 7
        if kind == LEN:
            size, pos = _varint(data, pos)
            end = pos + size
        elif kind == VARINT:
            end = _varint(data, pos)[1]
        elif kind in FIXED:
            end = pos + FIXED[kind]
        else:
            raise InvalidInput(f"the request is not a valid ModelInferRequest: field {tag >> 3} has wire type {kind}")
        if end > len(data):
            raise InvalidInput("the request is not a valid ModelInferRequest: a field runs past its end")
        if tag == RAW_INPUT_CONTENTS << 3 | LEN:
            raws.append((pos, end))
        else:
            rest.append(data[start:end])
        pos = end
    return b"".join(rest), raws


def plan_key(rest: bytes, raws: list[tuple[int, int]]) -> bytes:
    """What a request plan is kept by: the fields but raw inputs, and where the raw inputs lie."""
    return rest + array("Q", [n for span in raws for n in span]).tobytes()


def raw_output(chunk: bytes) -> bytes:
    """One output's bytes as a ModelInferResponse raw_output_contents field."""
    return _encode_varint(RAW_OUTPUT_CONTENTS << 3 | LEN) + _encode_varint(len(chunk)) + chunk
