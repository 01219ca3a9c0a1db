"""Request and response bodies: JSON (small arrays as nested lists), .npy, .npz, images (PNG,
JPEG, WebP, one image per body) and multipart forms, chosen by Content-Type / Accept.

Nothing here trusts the client: sizes are bounded before anything is parsed or unpacked,
arrays are never unpickled, and every refusal is an ApiError with a status and a message
saying what was expected and what came.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field

import numpy as np

from vaeinfer import images as image_io

NPY, NPZ, JSON = "application/x-npy", "application/x-npz", "application/json"
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
REQUEST_TYPES = (JSON, NPY, NPZ, *IMAGE_TYPES, "multipart/form-data")
_ALIASES = {"application/octet-stream": NPY, "application/zip": NPZ}


class ApiError(Exception):
    """An HTTP error for the client: status (4xx/5xx) and a message naming the problem."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Payload:
    """A parsed request: named arrays and scalar parameters."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def array(self, names: tuple[str, ...], what: str) -> np.ndarray:
        """The array under the first of `names`, or the only array the request holds."""
        for name in names:
            if name in self.arrays:
                return self.arrays[name]
        if len(self.arrays) == 1:
            return next(iter(self.arrays.values()))
        got = ", ".join(sorted(self.arrays)) or "none"
        raise ApiError(400, f"expected {what} as an array named {' or '.join(names)}, got arrays: {got}")


def media_type(header: str | None) -> str:
    kind = (header or "").split(";")[0].strip().lower()
    return _ALIASES.get(kind, kind)


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length: expected a number of bytes, got {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes; the limit is {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request, body: bytes, image_shape: tuple[int, int, int], limit: int) -> Payload:
    """The request's arrays and parameters (query string parameters plus the body's)."""
    payload = Payload(params={k: _scalar(v) for k, v in request.query_params.items()})
    kind = media_type(request.headers.get("content-type"))
    if not body and kind != "multipart/form-data":
        return payload
    if kind in ("", JSON):
        _json_body(body, payload)
    elif kind == NPY:
        payload.arrays["arr_0"] = load_npy(body, "body")
    elif kind == NPZ:
        payload.arrays.update(load_npz(body, limit, "body"))
    elif kind in IMAGE_TYPES:
        payload.arrays["x"] = load_image(body, image_shape, "body")
    elif kind == "multipart/form-data":
        await _form(request.headers, body, payload, image_shape, limit)
    else:
        raise ApiError(415, f"Content-Type {kind!r}: expected one of {', '.join(REQUEST_TYPES)}")
    return payload


def _scalar(text: str):
    """A query/form value: a JSON number, true/false/null, else the string itself."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) or value is None else text


def _json_body(body: bytes, payload: Payload) -> None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"body: expected a JSON object ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"body: expected a JSON object, got {type(doc).__name__}")
    for key, value in doc.items():
        if isinstance(value, list):
            payload.arrays[key] = json_array(value, key)
        else:
            payload.params[key] = value


def json_array(value: list, what: str) -> np.ndarray:
    """Nested lists of numbers -> an int64 or float64 array (rectangular, numbers only)."""
    try:
        a = np.array(value)
    except (ValueError, TypeError, RecursionError) as e:
        raise ApiError(400, f"{what}: expected a rectangular nested list of numbers ({str(e)[:200]})") from None
    if a.dtype.kind not in "iuf" or a.size == 0 and a.ndim < 2:
        what_came = "an empty list" if a.size == 0 else f"{a.dtype} values"
        raise ApiError(400, f"{what}: expected a rectangular nested list of numbers, got {what_came}")
    return a


def load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ApiError(400, f"{what}: expected a .npy array of numbers ({str(e)[:200]})") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "iufb":
        raise ApiError(400, f"{what}: expected a .npy array of numbers, got {getattr(a, 'dtype', type(a).__name__)}")
    return a


def load_npz(data: bytes, limit: int, what: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz, refused (413) when they would unpack to more than `limit` bytes."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            unpacked = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ApiError(400, f"{what}: expected an .npz file ({e})") from None
    if unpacked > limit:
        raise ApiError(413, f"{what}: the .npz unpacks to {unpacked} bytes; the limit is {limit} (--max-body-bytes)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ApiError(400, f"{what}: expected an .npz of numeric arrays ({str(e)[:200]})") from None
    for k, a in arrays.items():
        if a.dtype.kind not in "iufb":
            raise ApiError(400, f"{what}: array {k!r} has dtype {a.dtype}; expected numbers")
    return arrays


def load_image(data: bytes, image_shape: tuple[int, int, int], what: str) -> np.ndarray:
    """One image file -> uint8 (1, C, H, W) of the model's size."""
    c, h, w = image_shape
    try:
        return image_io.read_image(io.BytesIO(data), c, (h, w), what)[None]
    except image_io.InputError as e:
        raise ApiError(422 if "pixels" in str(e) else 400, str(e)) from None


async def _form(headers, body: bytes, payload: Payload, image_shape, limit: int) -> None:
    from starlette.formparsers import MultiPartParser

    async def chunks():  # the body is already read (and bounded): parse it from memory
        yield body

    try:
        form = await MultiPartParser(headers, chunks(), max_files=8, max_fields=32, max_part_size=limit).parse()
    except Exception as e:  # python-multipart's and Starlette's parse errors have no common base
        raise ApiError(400, f"body: expected a multipart form ({type(e).__name__}: {str(e)[:200]})") from None
    for key, value in form.multi_items():
        if isinstance(value, str):
            payload.params[key] = _scalar(value)
            continue
        data = await value.read()
        kind = media_type(value.content_type)
        name = (value.filename or "").lower()
        if kind == NPY or name.endswith(".npy"):
            payload.arrays[key] = load_npy(data, key)
        else:
            payload.arrays[key] = load_image(data, image_shape, f"{key} ({value.filename})")


def choose(accept: str | None, offered: tuple[str, ...]) -> str:
    """The first type in the Accept header that `offered` holds (JSON for none or */*), else 406."""
    for part in (accept or "").split(","):
        kind = _ALIASES.get(part.split(";")[0].strip().lower(), part.split(";")[0].strip().lower())
        if kind in ("", "*/*", "application/*"):
            return JSON
        if kind == "image/*":
            kind = "image/png"
        if kind in offered:
            return kind
    if not (accept or "").strip():
        return JSON
    raise ApiError(406, f"Accept {accept!r}: this result comes as {', '.join(offered)}")


def offered_types(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    kinds = [JSON, NPZ] + ([NPY] if len(arrays) == 1 else [])
    if "images" in arrays:
        kinds += list(IMAGE_TYPES)
    return tuple(kinds)


def encode(arrays: dict[str, np.ndarray], kind: str, nrow: int | None = None) -> bytes:
    """A result's named arrays as `kind` (see offered_types); images as one grid."""
    if kind == JSON:
        doc = {k: v.tolist() for k, v in arrays.items()}
        doc["shapes"] = {k: list(v.shape) for k, v in arrays.items()}
        return json.dumps(doc, allow_nan=False).encode()
    buf = io.BytesIO()
    if kind == NPY:
        np.save(buf, next(iter(arrays.values())), allow_pickle=False)
    elif kind == NPZ:
        np.savez(buf, **arrays)
    else:
        from PIL import Image

        imgs = arrays["images"]
        imgs = imgs.reshape(-1, *imgs.shape[-3:])
        fmt = IMAGE_TYPES[kind]
        Image.fromarray(image_io.grid(imgs, nrow)).save(buf, format=fmt, **image_io.SAVE_OPTIONS.get(fmt, {}))
    return buf.getvalue()
