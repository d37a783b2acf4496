"""The Open Inference Protocol (KServe's "v2" REST protocol) on the wire: an inference
request read and checked (JSON, and Triton's binary tensor data extension), and its answer
written (JSON or binary outputs, Triton's classification extension). No HTTP here: see
v2_routes.py.

Sources of the wire format: KServe's "Open Inference Protocol" REST specification
(kserve/open-inference-protocol, rest spec: $inference_request, $inference_response,
$request_input with "parameters", tensor data flattened in row-major order), and NVIDIA
Triton's protocol extensions (triton-inference-server/server docs/protocol/
extension_binary_data.md: the Inference-Header-Content-Length header, "binary_data_size",
"binary_data", "binary_data_output", BYTES elements as a 4-byte little-endian length and
the bytes; extension_classification.md: the output parameter "classification": k, answered
as BYTES [batch, k] of "value:index[:label]")."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..untrusted import json_depth, shown
from .decode import PIXEL_CHANNELS, BadInput

HEADER = "inference-header-content-length"  # Triton's binary data extension
INPUTS = {"pixels": "UINT8", "image": "BYTES"}
OUTPUTS = ("logits", "probabilities")
MAX_JSON_DEPTH = 8  # a nested [B][H][W][C] tensor is 5 deep
QUICK_BRACKETS = 32
MAX_ID_CHARS = 256
MAX_DIM = 2**63 - 1  # Triton's dims are int64; beyond, a number is not a size but an attack


@dataclass
class Infer:
    """A checked inference request: the request id (echoed), the input's name and its
    images (uint8 (H, W, C) arrays for "pixels", encoded bytes for "image"), and for each
    output asked (all by default): binary or JSON, and the classification count (0: none)."""

    id: str | None
    input: str
    images: list[Any]
    outputs: list[tuple[str, bool, int]]


def _bad(message: str, status: int = 400) -> BadInput:
    return BadInput(status, message)


def split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """(the JSON header as parsed, the binary data after it)."""
    if header_length is None:
        head, rest = body, b""
    else:
        text = header_length.strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 12):
            raise _bad(f"the Inference-Header-Content-Length header must be a byte count, got "
                       f"{shown(repr(text[:20]))}")
        n = int(text)
        if n > len(body):
            raise _bad(f"the Inference-Header-Content-Length header says {n:,} bytes of JSON, "
                       f"but the body has only {len(body):,}")
        head, rest = body[:n], body[n:]
    # the brackets counted first (in C): a request with binary tensors has a handful, and
    # json_depth's pass costs several times the parse of such a header
    # (nesting up to QUICK_BRACKETS deep is harmless to the parser)
    brackets = head.count(b"[") + head.count(b"{")
    if brackets > QUICK_BRACKETS and json_depth(head) > MAX_JSON_DEPTH:
        raise _bad(f"the request's JSON nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        request = json.loads(head)
    except (ValueError, RecursionError) as e:
        raise _bad(f"the request is not valid JSON ({shown(str(e))[:100]})") from None
    if not isinstance(request, dict):
        raise _bad("the request must be a JSON object with \"inputs\"")
    return request, rest


def parse(body: bytes, header_length: str | None, in_chans: int, limits: dict[str, Any],
          classes: int) -> Infer:
    """The request in `body` (the JSON header's length from Triton's header, or None: all
    JSON), checked against the model (`in_chans`, `classes`) and `limits` (max_batch,
    max_image_pixels, max_body_bytes). Raises BadInput with one sentence."""
    request, binary = split_body(body, header_length)
    rid = request.get("id")
    if rid is not None and not (isinstance(rid, str) and len(rid) <= MAX_ID_CHARS):
        raise _bad(f"\"id\" must be a string of at most {MAX_ID_CHARS} characters")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad("\"inputs\" must be a list of one tensor: \"pixels\" (UINT8 [batch, height, "
                   "width, channels]) or \"image\" (BYTES [batch], encoded image files)")
    tensor = inputs[0]
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if name not in INPUTS:
        raise _bad(f"unknown input {shown(repr(name))[:60]}: the inputs are \"pixels\" and "
                   f"\"image\"")
    if datatype != INPUTS[name]:
        raise _bad(f"input {name} must have datatype {INPUTS[name]}, got "
                   f"{shown(repr(datatype))[:40]}")
    shape = _shape(tensor.get("shape"), name, in_chans, limits)
    size = _binary_size(tensor)
    if size is not None and size != len(binary):
        raise _bad(f"input {name} declares {size:,} bytes of binary data (binary_data_size) but "
                   f"{len(binary):,} follow the JSON header")
    if size is None and binary:
        raise _bad(f"{len(binary):,} bytes follow the JSON header but no input declares "
                   f"binary_data_size")
    if name == "pixels":
        images = _pixels(tensor, shape, binary if size is not None else None)
    else:
        images = _strings(tensor, shape[0], binary if size is not None else None,
                          limits["max_body_bytes"])
    outputs = _outputs(request, classes)
    return Infer(rid, name, images, outputs)


def _shape(shape: Any, name: str, in_chans: int, limits: dict[str, Any]) -> list[int]:
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise _bad(f"input {name}: \"shape\" must be a list of at most 8 whole numbers up to "
                   f"2**63 - 1")
    if name == "pixels" and len(shape) != 4:
        raise _bad(f"input pixels must have shape [batch, height, width, channels], got {shape}")
    if name == "image" and not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise _bad(f"input image must have shape [batch], got {shape}")
    if not 1 <= shape[0] <= limits["max_batch"]:
        raise _bad(f"a batch of {shape[0]} is outside the server's limit of 1 to "
                   f"{limits['max_batch']} images (--max-batch)", 413 if shape[0] else 400)
    if name == "pixels":
        _, h, w, c = shape
        if c not in PIXEL_CHANNELS:
            raise _bad(f"input pixels must have 1, 3 or 4 channels (this model takes {in_chans}), "
                       f"got {c}")
        if h < 1 or w < 1 or h * w > limits["max_image_pixels"]:
            raise _bad(f"images of {h}x{w} pixels are outside the server's limit of 1 to "
                       f"{limits['max_image_pixels']:,} pixels (--max-image-pixels)",
                       413 if h * w else 400)
        if shape[0] * h * w * c > limits["max_body_bytes"]:
            raise _bad(f"a tensor of shape {shape} is over the server's limit of "
                       f"{limits['max_body_bytes']:,} bytes (--max-body-mb)", 413)
    return shape


def _binary_size(tensor: dict[str, Any]) -> int | None:
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("\"parameters\" must be a JSON object")
    size = params.get("binary_data_size")
    if size is not None and not (type(size) is int and size >= 0):
        raise _bad("binary_data_size must be a whole number of bytes")
    if size is not None and "data" in tensor:
        raise _bad("an input has both \"data\" and binary_data_size: send one")
    return size


def _pixels(tensor: dict[str, Any], shape: list[int], binary: bytes | None) -> list[np.ndarray]:
    count = int(np.prod(shape))
    if binary is not None:
        if len(binary) != count:
            raise _bad(f"input pixels of shape {shape} needs {count:,} bytes, got "
                       f"{len(binary):,}")
        array = np.frombuffer(binary, dtype=np.uint8)
    else:
        try:
            array = np.array(tensor.get("data"))
        except (ValueError, TypeError):
            raise _bad("input pixels: \"data\" must be a list of numbers from 0 to 255") \
                from None
        if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
            raise _bad("input pixels: \"data\" must be a list of whole numbers from 0 to 255")
        if array.size != count:
            raise _bad(f"input pixels of shape {shape} needs {count:,} values, got "
                       f"{array.size:,}")
        array = array.astype(np.uint8)
    return list(array.reshape(shape))


def _strings(tensor: dict[str, Any], batch: int, binary: bytes | None,
             max_bytes: int) -> list[bytes]:
    if binary is None:
        data = tensor.get("data")
        if not (isinstance(data, list) and all(isinstance(d, str) for d in data)):
            raise _bad("input image: \"data\" must be a list of strings (send image files as "
                       "binary data: Triton's binary tensor data extension)")
        items = [d.encode("utf-8", "surrogatepass") for d in data]
    else:
        items, at = [], 0
        while at < len(binary):  # each element: a 4-byte little-endian length, then the bytes
            if at + 4 > len(binary):
                raise _bad("input image: the binary data ends inside an element's length")
            (n,) = struct.unpack_from("<I", binary, at)
            if n > len(binary) - at - 4:
                raise _bad(f"input image: an element says it has {n:,} bytes but only "
                           f"{len(binary) - at - 4:,} follow")
            items.append(binary[at + 4:at + 4 + n])
            at += 4 + n
            if len(items) > batch:
                break
    if len(items) != batch:
        count = len(items) if len(items) <= batch else "more"
        raise _bad(f"input image has shape [{batch}] but {count} elements")
    if any(len(i) > max_bytes for i in items):
        raise _bad(f"an element of input image is over the server's limit of {max_bytes:,} "
                   f"bytes (--max-body-mb)", 413)
    return items


def _outputs(request: dict[str, Any], classes: int) -> list[tuple[str, bool, int]]:
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("\"parameters\" must be a JSON object")
    binary_default = params.get("binary_data_output", False)
    if type(binary_default) is not bool:
        raise _bad("binary_data_output must be true or false")
    asked = request.get("outputs")
    if asked is None:
        return [(name, binary_default, 0) for name in OUTPUTS]
    if not isinstance(asked, list) or not asked or len(asked) > len(OUTPUTS):
        raise _bad("\"outputs\" must be a list naming \"logits\", \"probabilities\" or both")
    out = []
    for o in asked:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in OUTPUTS:
            raise _bad(f"unknown output {shown(repr(name))[:60]}: the outputs are \"logits\" and "
                       f"\"probabilities\"")
        if any(name == seen for seen, *_ in out):
            raise _bad(f"output {name} is asked for twice")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise _bad(f"output {name}: \"parameters\" must be a JSON object")
        k = p.get("classification", 0)
        if not (type(k) is int and 0 <= k <= classes):
            raise _bad(f"output {name}: classification must be a count of classes from 1 to "
                       f"{classes}, got {shown(repr(k))[:20]}")
        binary = p.get("binary_data", binary_default)
        if type(binary) is not bool:
            raise _bad(f"output {name}: binary_data must be true or false")
        out.append((name, binary, k))
    return out


def answer(req: Infer, logits: np.ndarray, model: str, version: int,
           classes: list[str]) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of the answer: the outputs asked for, from the
    batch's fp32 logits (probabilities: their softmax)."""
    logits = logits.astype(np.float32)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    values = {"logits": logits, "probabilities": shifted / shifted.sum(1, keepdims=True)}
    outputs, blobs = [], []
    for name, binary, k in req.outputs:
        out: dict[str, Any] = {"name": name}
        if k:
            data = _classes(values[name], k, classes)
            out.update(datatype="BYTES", shape=[len(data) // k, k])
            blob = b"".join(struct.pack("<I", len(d)) + d for d in data)
            items: list[Any] = [d.decode() for d in data]
        else:
            out.update(datatype="FP32", shape=list(values[name].shape))
            blob = values[name].astype("<f4").tobytes()
            items = values[name].ravel().tolist()
        if binary:
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = items
        outputs.append(out)
    head = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    text = json.dumps(head).encode()
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)


def _classes(values: np.ndarray, k: int, classes: list[str]) -> list[bytes]:
    """Each row's k best as "value:index:label", best first (Triton's classification)."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    return [f"{values[r, i]:f}:{i}:{classes[i]}".encode() for r in range(len(values))
            for i in order[r]]
