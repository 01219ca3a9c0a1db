"""Load test of `vaeinfer serve` on 127.0.0.1: concurrent clients against a real uvicorn process,
with and without micro-batching.

    python -m benchmarks.speed.serve_load                       # 32 clients, 3000 decode requests of batch 1 per mode
    python -m benchmarks.speed.serve_load --requests 600 --clients 8 --no-write

Each request decodes one latent (application/x-npy in and out) drawn from a fixed set of 256;
every response must equal the in-process `model.decode` of the same latent bit for bit (a
mismatch or an error fails the run). Per mode: throughput, p50/p99 latency, and the batch sizes
the server formed (from its /metrics). Modes: "one request per call" (--max-batch 1: each request
is its own onnxruntime call, calls run concurrently in the server's thread pool) and
"micro-batching" (--max-batch 32 --max-wait-ms 2), both servers up at once and measured in
alternating rounds (load from other work on a shared machine falls on both alike). Writes
benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import report as results
from benchmarks.harness.cli import description

ROOT = Path(__file__).resolve().parents[2]
MODES = {"one request per call": ["--max-batch", "1"],
         "micro-batching": ["--max-batch", "32", "--max-wait-ms", "2"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *flags: str, model: str = "mnist-vae") -> subprocess.Popen:
    """`vaeinfer serve` in its own process (this checkout's code), ready when this returns."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "vaeinfer.cli", "serve", "-m", model, "--port", str(port), "--no-access-log", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_ready(port, proc)
    return proc


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout} s")


def stop_server(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM, then its exit status: 0 for a clean shutdown (uvicorn re-raises the signal once it
    has shut down gracefully, so -SIGTERM counts as clean too), else the real status."""
    proc.terminate()
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
    return 0 if code == -signal.SIGTERM else code


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def workload(model_name: str = "mnist-vae", distinct: int = 256, seed: int = 0):
    """(request bodies, expected response arrays): decode of one latent each, in-process."""
    import vaeinfer

    model = vaeinfer.load(model_name)
    z = np.random.default_rng(seed).standard_normal((distinct, model.info.latent["dim"]), dtype=np.float32)
    return [npy(z[i:i + 1]) for i in range(distinct)], [model.decode(z[i:i + 1]) for i in range(distinct)]


async def _post(reader, writer, request: bytes) -> tuple[int, bytes]:
    """One request on a keep-alive connection: a minimal HTTP/1.1 client, so that the client's own
    cost (it shares the machine with the server) stays far below the server's."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:]) if k.lower() == b"content-length")
    return int(lines[0].split(b" ", 2)[1]), await reader.readexactly(length)


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-npy\r\n"
            f"Accept: application/x-npy\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _run(port: int, bodies: list[bytes], expected: list[np.ndarray], clients: int, requests: int,
               time_limit: float, model: str) -> dict:
    requests_bytes = [_request(f"/v1/models/{model}/decode", b) for b in bodies]
    latencies, failures, next_index = [], [], iter(range(requests))
    deadline = time.monotonic() + time_limit

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in next_index:
                if time.monotonic() > deadline:
                    failures.append("time limit reached")
                    return
                k = i % len(bodies)
                t0 = time.perf_counter()
                status, content = await _post(reader, writer, requests_bytes[k])
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    failures.append(f"request {i}: {status} {content[:200]!r}")
                elif not np.array_equal(np.load(io.BytesIO(content), allow_pickle=False), expected[k]):
                    failures.append(f"request {i}: the response differs from the in-process decode")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    import httpx

    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "failures": failures, "wall_s": wall, "throughput_rps": len(latencies) / wall,
            "latencies_ms": ms, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "batches": batch_sizes(metrics, model, "decode")}


def batch_sizes(metrics_text: str, model: str, op: str) -> dict:
    """From /metrics: how many onnxruntime calls ran, mean rows per call, and the histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets, count, total = {}, 0, 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "vaeinfer_batch_rows":
            continue
        for s in family.samples:
            if s.labels.get("model") != model or s.labels.get("op") != op:
                continue
            if s.name.endswith("_bucket"):
                buckets[s.labels["le"]] = int(s.value)
            elif s.name.endswith("_count"):
                count = int(s.value)
            elif s.name.endswith("_sum"):
                total = s.value
    return {"calls": count, "mean_rows": total / count if count else 0.0, "cumulative_le": buckets}


def measure(mode_flags: list[str], clients: int, requests: int, time_limit: float, model: str = "mnist-vae",
            work=None) -> dict:
    """One server with `mode_flags`, a warm-up of 2*clients requests, then the measured run."""
    bodies, expected = work or workload(model)
    port = free_port()
    proc = start_server(port, *mode_flags, model=model)
    try:
        warm = asyncio.run(_run(port, bodies, expected, clients, 2 * clients, time_limit, model))
        result = asyncio.run(_run(port, bodies, expected, clients, requests, time_limit, model))
        result["failures"] = warm["failures"] + result["failures"]
        # the metrics count the warm-up too: subtract its calls
        result["batches"]["calls"] -= warm["batches"]["calls"]
        result["batches"]["mean_rows"] = requests / max(1, result["batches"]["calls"])
    finally:
        result_code = stop_server(proc)
    result["exit_code"] = result_code
    return result


def alternating_rounds(clients: int, requests: int, rounds: int, time_limit: float, model: str, work) -> dict:
    """Both servers up at once, measured in alternating rounds, so that load from other processes
    on a shared machine falls on both modes alike; per mode: all rounds' latencies, throughput =
    requests / summed wall time, and the median of the rounds' throughputs."""
    bodies, expected = work
    servers = {}
    try:
        for name, flags in MODES.items():
            port = free_port()
            servers[name] = (port, start_server(port, *flags, model=model))
        runs = {name: [] for name in MODES}
        for name, (port, _) in servers.items():  # warm-up
            runs[name].append(asyncio.run(_run(port, bodies, expected, clients, 2 * clients, time_limit, model)))
        for _ in range(rounds):
            for name, (port, _) in servers.items():
                runs[name].append(asyncio.run(_run(port, bodies, expected, clients, requests // rounds, time_limit, model)))
    finally:
        codes = {name: stop_server(proc) for name, (_, proc) in servers.items()}
    results = {}
    for name, rs in runs.items():
        warm, measured = rs[0], rs[1:]
        n = sum(r["requests"] for r in measured)
        wall = sum(r["wall_s"] for r in measured)
        ms = np.concatenate([r["latencies_ms"] for r in measured])
        calls = measured[-1]["batches"]["calls"] - warm["batches"]["calls"]
        results[name] = {"requests": n, "wall_s": wall, "throughput_rps": n / wall,
                         "round_throughputs_rps": [round(r["throughput_rps"], 1) for r in measured],
                         "median_round_rps": float(np.median([r["throughput_rps"] for r in measured])),
                         "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                         "batches": {"calls": calls, "mean_rows": n / max(1, calls),
                                     "cumulative_le": measured[-1]["batches"]["cumulative_le"]},
                         "failures": [f for r in rs for f in r["failures"]], "exit_code": codes[name]}
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=3000, help="per mode, over all rounds")
    p.add_argument("--rounds", type=int, default=6, help="alternating rounds per mode")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per round (the run fails past it)")
    p.add_argument("--model", default="mnist-vae")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    modes = alternating_rounds(args.clients, args.requests, args.rounds, args.time_limit, args.model, workload(args.model))
    for name, r in modes.items():
        print(f"{name}: {r['throughput_rps']:.0f} req/s (rounds: {r['round_throughputs_rps']}), p50 {r['p50_ms']:.1f} ms, "
              f"p99 {r['p99_ms']:.1f} ms, {r['batches']['calls']} calls ({r['batches']['mean_rows']:.1f} rows each), "
              f"{len(r['failures'])} failures", flush=True)
    gain = modes["micro-batching"]["throughput_rps"] / modes["one request per call"]["throughput_rps"]
    print(f"micro-batching gain: {gain:.2f}x")
    ok = all(not r["failures"] and r["exit_code"] == 0 for r in modes.values())
    if not args.no_write:
        write(modes, gain, args, argv)
    return 0 if ok else 1


def write(modes: dict, gain: float, args, argv=None) -> None:
    doc = {**results.provenance(__spec__.name, argv),
           "load_average_1_5_15min_at_end": [round(v, 2) for v in os.getloadavg()],  # other work on the cores
           "clients": args.clients, "requests": args.requests, "model": args.model, "op": "decode, batch 1",
           "rounds": args.rounds, "modes": {k: {**v, "flags": MODES[k]} for k, v in modes.items()}, "gain": gain}
    lines = ["Client and server share the machine (the client: one asyncio process, a minimal keep-alive HTTP/1.1 client). Every response was "
             "checked against the in-process `model.decode` bit for bit. Both servers run at once and are measured "
             f"in {args.rounds} alternating rounds (throughput = requests / summed wall time).", "",
             "| mode | server flags | requests | throughput (req/s) | p50 (ms) | p99 (ms) | onnxruntime calls | rows per call | failures |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in modes.items():
        lines.append(f"| {name} | `{' '.join(MODES[name])}` | {r['requests']} | {r['throughput_rps']:.0f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['batches']['calls']} | "
                     f"{r['batches']['mean_rows']:.1f} | {len(r['failures'])} |")
    lines += ["", f"Micro-batching throughput gain: **{gain:.2f}x**"]
    results.write("serve", f"vaeinfer serve: load test ({args.clients} clients, decode of batch 1, {args.model})", doc, lines)


if __name__ == "__main__":
    sys.exit(main())
