"""The ASGI app: one FastAPI application serving one or more loaded models.

    POST /v1/models/{model}/{op}   op: sample, encode, decode, reconstruct, score, interpolate
    GET  /v1/models/{model}        the model's info and the ops it offers
    GET  /v1/models                the models served (the first is the default)
    GET  /healthz /readyz /metrics /openapi.json /docs, and the page at /

A model offers the ops whose runtime method it has (a VQ-VAE has no score or interpolate);
each op's parameters are its method's keyword arguments. Row-wise ops (encode, decode,
reconstruct, and the decoding step of sample) go through a micro-batcher per model and method.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import vaeinfer
from vaeinfer import kinds
from vaeinfer.errors import BackendError, InputError, OutputError
from vaeinfer.op_params import INTERPOLATE, SAMPLE, SCORE
from vaeinfer.serve import bodies
from vaeinfer.serve.batcher import Batcher
from vaeinfer.serve.bodies import ApiError, Payload
from vaeinfer.serve.config import ServeConfig
from vaeinfer.serve.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("vaeinfer.serve")
BATCHED = ("encode", "decode", "reconstruct")  # row-wise model methods: safe to merge across requests
MAX_SCORE_SAMPLES = 5000
STATIC = resources.files("vaeinfer.serve") / "static"


@dataclass(frozen=True)
class Op:
    name: str
    method: str  # the model method that must exist for the model to offer the op
    summary: str
    inputs: tuple[str, ...]  # array names the op reads (the first is the usual one)
    run: Callable[["Served", Payload], Awaitable[tuple[dict, int | None]]]  # -> (arrays, grid nrow)
    skip: tuple[str, ...] = ()  # method parameters that are not request parameters
    # reads a latent: the array names are the kind's latent_keys, then `inputs`; the method takes
    # it as its first parameter (named after latent_keys[0]), not a request parameter
    latent: bool = False


class Served:
    """A loaded model with its batchers and the parameters each op takes."""

    def __init__(self, name: str, model, config: ServeConfig, metrics: Metrics):
        self.name, self.model, self.config = name, model, config
        self.latent_keys = kinds.get(model.info.kind).latent_keys
        self.batchers = {m: Batcher(self._method(m), config.max_batch, config.max_wait_ms / 1000,
                                    metrics.on_batch(name, m)) for m in BATCHED if hasattr(model, m)}
        self.ops = {op.name: op for op in OPS if hasattr(model, op.method)}

    def _method(self, m: str):
        """The model's method `m`; with max_memory, a spatial VAE's runs with exact tiling in it."""
        method = getattr(self.model, m)
        if self.config.max_memory is None or not hasattr(self.model, "exact_tiling_info"):
            return method
        info = self.model.exact_tiling_info()
        if not (info["decoder"] and info["encoder"]):
            raise InputError(f"serve --max-memory: {self.name} cannot decode with exact tiling: {info['why']}")
        return functools.partial(method, max_memory=self.config.max_memory)

    def params(self, op: Op) -> set[str]:
        sig = inspect.signature(getattr(self.model, op.method)).parameters
        skip = (*op.skip, *(self.latent_keys[:1] if op.latent else ()), "batch_size", "progress")
        return {p for p in sig if p not in skip} | {"nrow"}

    def inputs(self, op: Op) -> tuple[str, ...]:
        """The array names `op` reads from a request, in order."""
        return (*(self.latent_keys if op.latent else ()), *op.inputs)

    def rows(self, payload: Payload, names: tuple[str, ...], what: str) -> np.ndarray:
        a = payload.array(names, what)
        if a.ndim < 1 or len(a) == 0:
            raise ApiError(422, f"{what}: expected a batch (N, ...) with N >= 1, got shape {a.shape}")
        if len(a) > self.config.max_rows:
            raise ApiError(413, f"{what}: {len(a)} rows; the limit is {self.config.max_rows} (--max-rows)")
        return a

    def info(self) -> dict:
        info = dataclasses.asdict(self.model.info)
        info["ops"] = sorted(self.ops)
        info["params"] = {name: sorted(self.params(op) - {"nrow"}) for name, op in self.ops.items()}
        return info


def _kwargs(payload: Payload, skip=("nrow",)) -> dict:
    return {k: v for k, v in payload.params.items() if k not in skip}


async def _sample(s: Served, p: Payload):
    n = p.params.get("n", SAMPLE["n"].default)
    if isinstance(n, int) and not isinstance(n, bool) and n > s.config.max_rows:
        raise ApiError(413, f"n: {n} images; the limit is {s.config.max_rows} (--max-rows)")
    latents = await run_in_threadpool(s.model.sample_latents, n, **_kwargs(p, ("nrow", "n")))
    return {"images": await s.batchers["decode"](latents)}, p.params.get("nrow")


async def _encode(s: Served, p: Payload):
    result = await s.batchers["encode"](s.rows(p, OPS_BY_NAME["encode"].inputs, "x"))
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, None


async def _decode(s: Served, p: Payload):
    return {"images": await s.batchers["decode"](s.rows(p, s.inputs(OPS_BY_NAME["decode"]), "z"))}, p.params.get("nrow")


async def _reconstruct(s: Served, p: Payload):
    x = s.rows(p, OPS_BY_NAME["reconstruct"].inputs, "x")
    return {"images": await s.batchers["reconstruct"](x)}, p.params.get("nrow")


async def _score(s: Served, p: Payload):
    x = s.rows(p, OPS_BY_NAME["score"].inputs, "x")
    samples = p.params.get("samples", SCORE["samples"].default)
    if isinstance(samples, int) and samples > MAX_SCORE_SAMPLES:
        raise ApiError(413, f"samples: {samples}; the limit is {MAX_SCORE_SAMPLES}")
    result = await run_in_threadpool(s.model.score, x, **_kwargs(p))
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, None


async def _interpolate(s: Served, p: Payload):
    if not {"a", "b"} <= set(p.arrays):
        raise ApiError(400, f"interpolate: expected two arrays (or images) named a and b, got: {', '.join(p.arrays) or 'none'}")
    a, b = (s.rows(Payload({k: p.arrays[k]}), (k,), k) for k in ("a", "b"))
    steps = p.params.get("steps", INTERPOLATE["steps"].default)
    if isinstance(steps, int) and steps * len(a) > s.config.max_rows:
        raise ApiError(413, f"{len(a)} pairs x {steps} steps; the limit is {s.config.max_rows} images (--max-rows)")
    images = await run_in_threadpool(s.model.interpolate, a, b, **_kwargs(p))
    return {"images": images}, p.params.get("nrow") or images.shape[1]


OPS = (
    Op("sample", "sample_latents", "Images from the prior (seeded host-side noise, decoded in merged batches).",
       (), _sample, skip=()),
    Op("encode", "encode", "Encode images: a VAE's posterior (mean, logvar) or a VQ-VAE's codes (codes, z_q).",
       ("x", "images", "arr_0"), _encode, skip=("x",)),
    Op("decode", "decode", "Decode latents z (N, latent) or code grids (N, h, w) to images.",
       ("arr_0",), _decode, latent=True),
    Op("reconstruct", "reconstruct", "Encode then decode images.", ("x", "images", "arr_0"), _reconstruct, skip=("x",)),
    Op("score", "score", "Per-image nll / elbo / recon in nats (IWAE with `samples` importance samples).",
       ("x", "images", "arr_0"), _score, skip=("x", "index_offset")),
    Op("interpolate", "interpolate", "Decoded interpolations between the encodings of images a[i] and b[i].",
       ("a", "b"), _interpolate, skip=("a", "b")),
)
OPS_BY_NAME = {op.name: op for op in OPS}


def _status(e: Exception) -> int:
    if isinstance(e, ApiError):
        return e.status
    if isinstance(e, (InputError, OutputError, ValueError, TypeError)):
        return 422  # the request's values (OutputError: the model produced NaN/Inf for them)
    if isinstance(e, BackendError):
        return 503
    return 500


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status, headers=headers)


def create_app(config: ServeConfig) -> FastAPI:
    """Load config.models and return the app (models load here, before the server listens)."""
    metrics = Metrics()
    served: dict[str, Served] = {}
    for spec in config.models:
        model = vaeinfer.load(spec, device=config.device, threads=config.threads, precision=config.precision,
                              backend=config.backend, max_error=config.max_error)
        served[model.info.name] = Served(model.info.name, model, config, metrics)
    state = {"ready": False, "in_flight": 0}

    @asynccontextmanager
    async def lifespan(app):
        state["ready"] = True
        yield
        state["ready"] = False  # uvicorn has finished the in-flight requests by now
        for s in served.values():
            for b in s.batchers.values():
                await b.close()

    app = FastAPI(title="vaeinfer serve", version=vaeinfer.__version__, lifespan=lifespan,
                  description="VAE / VQ-VAE inference with dynamic micro-batching. Bodies: JSON (arrays as nested "
                              "lists, parameters as fields), .npy/.npz (parameters in the query string), an image "
                              "(PNG/JPEG/WebP) or a multipart form; results as JSON, .npy, .npz or an image grid, by Accept.")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        metrics.requests.labels("-", "-", str(e.status_code)).inc()
        what = "no such endpoint" if e.status_code == 404 else e.detail
        return _error(e.status_code, f"{request.method} {request.url.path}: {what}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return _error(422, f"{request.url.path}: {e.errors()}")

    def model_of(name: str) -> Served:
        if name not in served:
            raise ApiError(404, f"model {name!r} is not served here; models: {', '.join(served)}")
        return served[name]

    async def handle(op_name: str, name: str, request: Request) -> Response:
        t0 = time.perf_counter()
        model_label = name if name in served else "-"
        if state["in_flight"] >= config.max_queue:
            metrics.rejected.inc()
            metrics.requests.labels(model_label, op_name, "503").inc()
            return _error(503, f"server busy: {state['in_flight']} requests in flight (--max-queue "
                               f"{config.max_queue}); retry later", {"Retry-After": "1"})
        state["in_flight"] += 1
        metrics.in_flight.inc()
        try:
            s = model_of(name)
            if op_name not in s.ops:
                raise ApiError(404, f"model {name!r} ({s.model.info.kind}) has no {op_name}; it offers {', '.join(s.ops)}")
            op = s.ops[op_name]
            body = await bodies.read_body(request, config.max_body_bytes)
            payload = await bodies.parse(request, body, s.model.info.image_shape, config.max_body_bytes)
            unknown = set(payload.params) - s.params(op)
            if unknown:
                raise ApiError(400, f"{op_name} on {name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                                    f"it takes {', '.join(sorted(s.params(op)))}")
            nrow = payload.params.get("nrow")
            if nrow is not None and (not isinstance(nrow, int) or isinstance(nrow, bool) or nrow < 1):
                raise ApiError(422, f"nrow: expected a positive integer, got {nrow!r}")
            arrays, nrow = await op.run(s, payload)
            kind = bodies.choose(request.headers.get("accept"), bodies.offered_types(arrays))
            response = Response(bodies.encode(arrays, kind, nrow), media_type=kind)
        except Exception as e:
            status = _status(e)
            if status >= 500 and not isinstance(e, BackendError):
                log.exception("%s %s failed", request.method, request.url.path)
            message = e.message if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
            metrics.errors.labels(model_label, op_name, str(status), type(e).__name__).inc()
            response = _error(status, message, getattr(e, "headers", None))
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.dec()
        metrics.requests.labels(model_label, op_name, str(response.status_code)).inc()
        metrics.latency.labels(model_label, op_name).observe(time.perf_counter() - t0)
        return response

    body_doc = {"required": False, "content": {
        "application/json": {"schema": {"type": "object", "additionalProperties": True},
                             "example": {"z": [[0.0] * 4]}},
        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        "application/x-npz": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "additionalProperties": True}}}}
    result_doc = {"200": {"description": "the result", "content": {
        k: {} for k in ("application/json", "application/x-npy", "application/x-npz", "image/png")}},
        "4XX": {"description": "a JSON error {error, status} naming the problem"},
        "503": {"description": "queue full (--max-queue): retry later"}}
    for op in OPS:
        async def endpoint(model: str, request: Request, _op=op.name):
            return await handle(_op, model, request)
        params = "; parameters: " + ", ".join(sorted({p for s in served.values() if op.name in s.ops
                                                      for p in s.params(s.ops[op.name])}))
        arrays = f" Arrays: {', '.join(op.inputs)}." if op.inputs else ""
        app.add_api_route(f"/v1/models/{{model}}/{op.name}", endpoint, methods=["POST"], summary=op.summary,
                          description=op.summary + arrays + params, name=op.name,
                          openapi_extra={"requestBody": body_doc, "responses": result_doc})

    @app.get("/v1/models", summary="The models served; the first is the default.")
    async def models():
        return {"default": next(iter(served)), "models": [s.info() for s in served.values()]}

    @app.get("/v1/models/{model}", summary="A model's info: kind, shapes, ops and their parameters.")
    async def info(model: str):
        try:
            return model_of(model).info()
        except ApiError as e:
            return _error(e.status, e.message)

    @app.get("/healthz", summary="The process is up (and how many requests it holds).")
    async def healthz():
        return {"status": "ok", "in_flight": state["in_flight"]}

    @app.get("/readyz", summary="Models loaded and the server accepting work (503 while starting or stopping).")
    async def readyz():
        if not state["ready"]:
            return _error(503, "not ready")
        return {"status": "ready", "models": list(served), "in_flight": state["in_flight"]}

    @app.get("/metrics", summary="Prometheus metrics.")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.state.served, app.state.metrics, app.state.config = served, metrics, config
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory for `--workers N` (each worker process builds its own app)."""
    return create_app(ServeConfig.from_env())
