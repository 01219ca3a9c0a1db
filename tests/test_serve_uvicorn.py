"""`vaeinfer serve` as a real uvicorn process on 127.0.0.1: a small version of the load test
(benchmarks.speed.serve_load: 32 clients, every response checked against the in-process result,
with and without micro-batching) and graceful shutdown finishing the requests in flight."""

from __future__ import annotations

import asyncio
import io
import signal

import numpy as np
import pytest

from benchmarks.speed import serve_load as load

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

import vaeinfer  # noqa: E402


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work():
    return load.workload("mnist-vae", distinct=64)


@pytest.mark.parametrize("mode", list(load.MODES))
def test_load_32_clients_every_response_checked(work, mode):
    r = load.measure(load.MODES[mode], clients=32, requests=320, time_limit=120, work=work)
    print(f"{mode}: {r['throughput_rps']:.0f} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
          f"{r['batches']['calls']} calls, {r['batches']['mean_rows']:.1f} rows each")
    assert r["failures"] == [] and r["requests"] == 320 and r["exit_code"] == 0
    if mode == "micro-batching":
        assert r["batches"]["mean_rows"] > 1.5  # 32 clients at once: merged calls did form
    else:
        assert r["batches"]["calls"] == 320


def test_graceful_shutdown_finishes_in_flight_requests():
    port = load.free_port()
    proc = load.start_server(port, "--max-batch", "8", "--graceful-timeout", "60", model="mnist-vae")
    model = vaeinfer.load("mnist-vae")
    x = (model.sample(8, seed=0) * 255).astype(np.uint8)
    url = f"http://127.0.0.1:{port}"

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            body = load.npy(x)
            headers = {"Content-Type": "application/x-npy"}
            slow = [asyncio.create_task(c.post(f"{url}/v1/models/mnist-vae/score?samples=600&seed={i}",
                                               content=body, headers=headers)) for i in range(3)]
            for _ in range(2000):
                if (await c.get(f"{url}/healthz")).json()["in_flight"] == 3:
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("the requests were never all in flight")
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # a new connection after SIGTERM is refused: the server stopped listening
                late = (await httpx.AsyncClient(timeout=5).get(f"{url}/healthz")).status_code
            except httpx.HTTPError:
                late = None
            return await asyncio.gather(*slow), late

    done, late = asyncio.run(run())
    code = proc.wait(60)
    for i, r in enumerate(done):
        assert r.status_code == 200, r.text
        assert np.array_equal(np.array(r.json()["nll"]), model.score(x, samples=600, seed=i).nll)
    log = proc.stdout.read()
    # uvicorn re-raises SIGTERM after a graceful shutdown: -SIGTERM with its shutdown log is clean
    assert late is None and code in (0, -signal.SIGTERM) and "Finished server process" in log, (late, code, log)


def test_several_worker_processes_serve_and_stop():
    port = load.free_port()
    proc = load.start_server(port, "--workers", "2")
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/mnist-vae/sample", json={"n": 2, "seed": 4},
                       headers={"Accept": "application/x-npy"}, timeout=60)
        assert r.status_code == 200
        assert np.array_equal(np.load(io.BytesIO(r.content)), vaeinfer.load("mnist-vae").sample(2, seed=4))
    finally:
        code = load.stop_server(proc)
    assert code == 0 and proc.stdout.read().count("Finished server process") == 2
