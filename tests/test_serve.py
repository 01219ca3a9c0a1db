"""`vaeinfer serve` through an in-process client: every op on both bundled models bit-identical
to the runtime's own call, merged requests bit-identical to each call alone, every malformed
request a 4xx JSON error naming the problem, the bounded queue, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import io
import sys
import zipfile

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from vaeinfer.serve import ServeConfig, create_app  # noqa: E402

NPY = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
LIMITS = dict(max_batch=8, max_wait_ms=20, max_rows=64, max_body_bytes=1 << 20, max_queue=64)


@pytest.fixture(scope="module")
def app():
    return create_app(ServeConfig(models=("mnist-vae", "mnist-vqvae"), **LIMITS))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def vae(app):
    return app.state.served["mnist-vae"].model


@pytest.fixture(scope="module")
def vq(app):
    return app.state.served["mnist-vqvae"].model


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=False)
    return buf.getvalue()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def load_npy(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def digits(model, n=4, seed=0) -> np.ndarray:
    return (model.sample(n, seed=seed) * 255 + 0.5).astype(np.uint8)


def test_sample_json_is_the_runtime_call(client, vae):
    r = client.post("/v1/models/mnist-vae/sample", json={"n": 3, "seed": 5, "temperature": 0.8})
    assert r.status_code == 200 and r.json()["shapes"]["images"] == [3, 1, 28, 28]
    got = np.array(r.json()["images"], np.float32)
    assert np.array_equal(got, vae.sample(3, seed=5, temperature=0.8))


def test_sample_vq_with_label_and_query_params(client, vq):
    r = client.post("/v1/models/mnist-vqvae/sample?n=2&seed=3&label=7&top_k=20", headers={"Accept": "application/x-npy"})
    assert np.array_equal(load_npy(r), vq.sample(2, seed=3, label=7, top_k=20))


@pytest.mark.parametrize("name", ["mnist-vae", "mnist-vqvae"])
def test_encode_decode_reconstruct_npy_npz(client, app, name):
    model = app.state.served[name].model
    x = digits(model, 5, seed=1)
    enc = client.post(f"/v1/models/{name}/encode", content=npy(x), headers={**NPY, "Accept": "application/x-npz"})
    assert enc.status_code == 200, enc.text
    with np.load(io.BytesIO(enc.content)) as z:
        got = {k: z[k] for k in z.files}
    want = model.encode(x)
    assert set(got) == {f for f in vars(want)} and all(np.array_equal(got[k], getattr(want, k)) for k in got)
    latent = got.get("mean", got.get("codes"))
    dec = client.post(f"/v1/models/{name}/decode", content=npy(latent), headers=NPY)
    assert np.array_equal(load_npy(dec), model.decode(latent))
    rec = client.post(f"/v1/models/{name}/reconstruct", content=npz(x=x), headers={"Content-Type": "application/x-npz",
                                                                                   "Accept": "application/x-npy"})
    assert np.array_equal(load_npy(rec), model.reconstruct(x))


def test_png_upload_and_png_grid(client, vae):
    x = digits(vae, 1, seed=2)
    r = client.post("/v1/models/mnist-vae/reconstruct", content=png(x[0, 0]),
                    headers={"Content-Type": "image/png", "Accept": "application/x-npy"})
    assert np.array_equal(load_npy(r), vae.reconstruct(x))
    r = client.post("/v1/models/mnist-vae/sample", json={"n": 6, "seed": 0, "nrow": 3}, headers={"Accept": "image/png"})
    assert r.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.size == (3 * 30 + 2, 2 * 30 + 2)


def test_score_and_interpolate(client, vae):
    x = digits(vae, 2, seed=4)
    xf = x / 255.0  # JSON numbers: floats in the image range (integers would be int64, which images refuse)
    r = client.post("/v1/models/mnist-vae/score", json={"x": xf.tolist(), "samples": 20, "seed": 1})
    want = vae.score(xf, samples=20, seed=1)
    assert r.status_code == 200 and np.array_equal(np.array(r.json()["nll"]), want.nll)
    files = {"a": ("a.png", png(x[0, 0]), "image/png"), "b": ("b.png", png(x[1, 0]), "image/png")}
    r = client.post("/v1/models/mnist-vae/interpolate", files=files, data={"steps": "5"},
                    headers={"Accept": "application/x-npy"})
    assert np.array_equal(load_npy(r), vae.interpolate(x[:1], x[1:], steps=5))


def test_info_models_health_openapi(client):
    models = client.get("/v1/models").json()
    assert models["default"] == "mnist-vae" and [m["name"] for m in models["models"]] == ["mnist-vae", "mnist-vqvae"]
    info = client.get("/v1/models/mnist-vqvae").json()
    assert info["ops"] == ["decode", "encode", "reconstruct", "sample"] and "label" in info["params"]["sample"]
    assert client.get("/healthz").json() == {"status": "ok", "in_flight": 0}
    assert client.get("/readyz").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for op in ("sample", "encode", "decode", "reconstruct", "score", "interpolate"):
        assert f"/v1/models/{{model}}/{op}" in paths
    assert "application/x-npy" in paths["/v1/models/{model}/decode"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and client.get("/static/app.js").status_code == 200


async def _concurrent(app, requests):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        return await asyncio.gather(*(c.post(path, **kw) for path, kw in requests))


def _rows(metrics: str, op: str) -> tuple[float, float]:
    """(calls, rows) of the decode batcher so far, from the Prometheus text."""
    values = {}
    for line in metrics.splitlines():
        for suffix in ("_count", "_sum"):
            if line.startswith(f"vaeinfer_batch_rows{suffix}{{") and f'model="mnist-vae",op="{op}"' in line:
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values.get("_count", 0.0), values.get("_sum", 0.0)


def test_merged_requests_are_bit_identical_and_errors_stay_with_their_request(app, client, vae):
    rng = np.random.default_rng(0)
    zs = [rng.standard_normal((int(k), 32), dtype=np.float32) for k in rng.integers(1, 4, size=24)]
    bad = {3: np.zeros((1, 31), np.float32), 9: np.full((2, 32), np.nan, np.float32), 15: np.zeros((1, 32), np.int64)}
    bodies = [bad.get(i, z) for i, z in enumerate(zs)]
    calls0, rows0 = _rows(client.get("/metrics").text, "decode")
    responses = asyncio.run(_concurrent(app, [("/v1/models/mnist-vae/decode", {"content": npy(b), "headers": NPY})
                                              for b in bodies]))
    for i, (r, z) in enumerate(zip(responses, bodies)):
        if i in bad:
            assert r.status_code == 422 and r.json()["error"].startswith("InputError"), (i, r.text)
        else:
            assert np.array_equal(load_npy(r), vae.decode(z)), i
    calls, rows = _rows(client.get("/metrics").text, "decode")
    assert rows - rows0 >= sum(len(z) for z in zs) - 4  # the good ones all ran
    assert calls - calls0 < len(bodies)  # and some were merged (max_wait 20 ms, max_batch 8)


def test_sample_requests_merge_bit_identically(app, vae):
    reqs = [("/v1/models/mnist-vae/sample", {"json": {"n": 1 + i % 3, "seed": i, "temperature": 0.5 + i / 10},
                                             "headers": {"Accept": "application/x-npy"}}) for i in range(12)]
    for i, r in enumerate(asyncio.run(_concurrent(app, reqs))):
        assert np.array_equal(load_npy(r), vae.sample(1 + i % 3, seed=i, temperature=0.5 + i / 10)), i


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy(np.zeros((2, 1, 28, 28), np.uint8)) + bytes(4 << 20))
    return buf.getvalue()


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


MALFORMED = [
    # (path, request kwargs, status, words the error must contain)
    ("decode", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "JSON object"),
    ("decode", {"json": [1, 2]}, 400, "JSON object, got list"),
    ("decode", {"json": {"z": [[1, 2], [3]]}}, 400, "rectangular"),
    ("decode", {"json": {"z": [["a"] * 32]}}, 400, "numbers"),
    ("decode", {"json": {"z": [[0.0] * 31]}}, 422, "latent size 32"),
    ("decode", {"json": {"z": []}}, 400, "empty"),
    ("decode", {"content": npy(np.float32(1.0)), "headers": NPY}, 422, "batch"),
    ("decode", {"content": b"\x93NUMPY garbage", "headers": NPY}, 400, ".npy"),
    ("decode", {"content": _pickled(), "headers": NPY}, 400, ".npy"),
    ("decode", {"content": npy(np.zeros((65, 32), np.float32)), "headers": NPY}, 413, "--max-rows"),
    ("decode", {"content": bytes(2 << 20), "headers": NPY}, 413, "--max-body-bytes"),
    ("decode", {"content": b"x", "headers": {"Content-Type": "text/csv"}}, 415, "expected one of"),
    ("decode", {"json": {"z": [[0.0] * 32]}, "headers": {"Accept": "text/html"}}, 406, "application/json"),
    ("encode", {"json": {"x": np.zeros((1, 1, 28, 28)).tolist()}, "headers": {"Accept": "image/png"}}, 406, "x-npz"),
    ("decode", {"json": {"z": [[0.0] * 32], "temperature": 2}}, 400, "unknown parameter"),
    ("decode", {"json": {"z": [[0.0] * 32], "nrow": -1}}, 422, "nrow"),
    ("sample", {"json": {"n": 0}}, 422, "positive integer"),
    ("sample", {"json": {"n": 65}}, 413, "--max-rows"),
    ("sample", {"json": {"n": 1, "seed": "abc"}}, 422, "seed"),
    ("sample", {"json": {"n": 1, "temperature": -1}}, 422, "temperature"),
    ("sample", {"json": {"n": 1, "label": 3}}, 400, "unknown parameter(s) label"),
    ("encode", {"content": npz(x=np.zeros((1, 1, 28, 28))), "headers": {"Content-Type": "application/x-npz"}}, 200, ""),
    ("encode", {"content": _bomb(), "headers": {"Content-Type": "application/x-npz"}}, 413, "unpacks"),
    ("encode", {"content": b"PK\x03\x04junk", "headers": {"Content-Type": "application/x-npz"}}, 400, ".npz"),
    ("encode", {"content": png(np.zeros((20, 20), np.uint8)), "headers": {"Content-Type": "image/png"}}, 422, "28x28"),
    ("encode", {"content": b"\x89PNG\r\n\x1a\nbroken", "headers": {"Content-Type": "image/png"}}, 400, "image file"),
    ("encode", {"json": {"x": np.full((1, 1, 28, 28), 2.0).tolist()}}, 422, "[0.0, 1.0]"),
    ("encode", {"json": {"a": [1.0], "b": [2.0]}}, 400, "x or images"),
    ("score", {"json": {"x": np.zeros((1, 1, 28, 28)).tolist(), "samples": 10 ** 6}}, 413, "samples"),
    ("interpolate", {"json": {"a": np.zeros((1, 1, 28, 28)).tolist()}}, 400, "named a and b, got: a"),
    ("interpolate", {"files": {"a": ("a.png", b"nope", "image/png")}}, 400, "image file"),
]


@pytest.mark.parametrize("op, kwargs, status, words", MALFORMED, ids=[f"{m[0]}-{m[2]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_requests_get_a_json_error(client, op, kwargs, status, words):
    r = client.post(f"/v1/models/mnist-vae/{op}", **kwargs)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.headers["content-type"] == "application/json" and words in r.json()["error"], r.json()


@pytest.mark.parametrize("method, path, status, words", [
    ("POST", "/v1/models/nope/decode", 404, "not served here"),
    ("POST", "/v1/models/mnist-vqvae/score", 404, "has no score"),
    ("POST", "/v1/models/mnist-vae/explode", 404, "no such endpoint"),
    ("GET", "/v1/models/mnist-vae/decode", 405, "Method Not Allowed"),
    ("GET", "/v1/models/nope", 404, "not served here"),
])
def test_unknown_models_and_endpoints(client, method, path, status, words):
    r = client.request(method, path)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_server_keeps_serving_after_errors(client, vae):
    for _ in range(3):
        client.post("/v1/models/mnist-vae/decode", content=b"\x00" * 100, headers=NPY)
    r = client.post("/v1/models/mnist-vae/decode", json={"z": [[0.0] * 32]}, headers={"Accept": "application/x-npy"})
    assert np.array_equal(load_npy(r), vae.decode(np.zeros((1, 32), np.float32)))
    metrics = client.get("/metrics").text
    assert 'vaeinfer_errors_total{error="ApiError",model="mnist-vae",op="decode",status="400"}' in metrics
    assert "vaeinfer_request_seconds_bucket" in metrics


def test_full_queue_answers_503():
    app = create_app(ServeConfig(models=("mnist-vae",), max_queue=2, max_batch=1))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            x = np.zeros((8, 1, 28, 28)).tolist()
            slow = [asyncio.create_task(c.post("/v1/models/mnist-vae/score", json={"x": x, "samples": 2000}))
                    for _ in range(2)]
            for _ in range(1000):  # until both are admitted
                if (await c.get("/healthz")).json()["in_flight"] == 2:
                    break
                await asyncio.sleep(0.002)
            else:
                raise AssertionError("the slow requests were never both in flight")
            busy = await c.post("/v1/models/mnist-vae/decode", json={"z": [[0.0] * 32]})
            return busy, await asyncio.gather(*slow)

    busy, done = asyncio.run(run())
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "--max-queue" in busy.json()["error"]
    assert all(r.status_code == 200 for r in done)


def test_missing_extra_names_the_install(monkeypatch):
    from vaeinfer.errors import BackendError
    from vaeinfer.serve import require

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(BackendError, match=r'pip install "vaeinfer\[serve\]"'):
        require()


def test_cli_serve_refuses_a_bad_model_before_listening():
    from click.testing import CliRunner

    from vaeinfer.cli import main

    r = CliRunner().invoke(main, ["serve", "-m", "no-such-model", "--port", "1"])
    assert r.exit_code == 1 and r.output.startswith("error:") and "no-such-model" in r.output, r.output
