"""Soak: one loaded model shared by many threads, thousands of mixed calls.

    python -m benchmarks.stress.soak --calls 20000         # bundled mnist-vae, 16 threads (+ a 5000-call warm-up)
    python -m benchmarks.stress.soak --calls 4000 --model PATH

Every call (sample / encode / decode / reconstruct / score / interpolate on a VAE; encode /
decode / sample / prior_nll on a VQ-VAE, with varying batch sizes and seeds) is drawn from a
fixed set of distinct calls whose results were computed sequentially first; each concurrent
result must equal its sequential one bit for bit. RSS (from /proc/self/statm) is sampled after
the warm-up (see `soak`) and through the measured run: at the end it may be at most 10% above
its value after the warm-up. Writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from benchmarks.harness import report
from benchmarks.harness.cli import description
MAX_GROWTH = 0.10


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def make_calls(model, distinct: int, seed: int = 0, max_batch: int = 32) -> list[tuple]:
    """`distinct` different calls for this model, as (name, *arguments)."""
    rng = random.Random(seed)
    info = model.info
    names = (["sample", "encode", "decode", "reconstruct", "score", "interpolate"] if info.kind == "vae"
             else ["encode", "decode", "reconstruct"] + (["sample", "prior_nll"] if info.has_prior else []))
    return [(rng.choice(names), rng.randint(1, max_batch), rng.randrange(1 << 30)) for _ in range(distinct)]


def _images(model, n: int, seed: int) -> np.ndarray:
    c, h, w = model.info.image_shape
    lo, hi = model.info.value_range
    return np.random.default_rng(seed).uniform(lo, hi, (n, c, h, w)).astype(np.float32)


def run_call(model, call: tuple) -> list[np.ndarray]:
    """Run one call; its result as a list of arrays."""
    name, n, seed = call
    info = model.info
    if info.kind == "vae":
        if name == "sample":
            return [model.sample(n, seed=seed, temperature=0.5 + (seed % 3) / 2)]
        if name == "encode":
            post = model.encode(_images(model, n, seed))
            return [post.mean, post.logvar]
        if name == "decode":
            return [model.decode(np.random.default_rng(seed).standard_normal((n, model.latent_dim), dtype=np.float32))]
        if name == "reconstruct":
            return [model.reconstruct(_images(model, n, seed), batch_size=max(1, n // 2))]
        if name == "score":
            s = model.score(_images(model, min(n, 4), seed), samples=4, seed=seed)
            return [s.nll, s.elbo, s.recon]
        x = _images(model, 2, seed)
        return [model.interpolate(x[:1], x[1:], steps=min(n, 6))]
    labels = None
    if info.num_classes:
        labels = np.random.default_rng(seed).integers(0, info.num_classes, n)
    if name == "encode":
        codes = model.encode(_images(model, n, seed))
        return [codes.codes, codes.z_q]
    if name == "decode":
        grid = np.random.default_rng(seed).integers(0, model.codebook_size, (n, *model.grid))
        return [model.decode(grid)]
    if name == "reconstruct":
        return [model.reconstruct(_images(model, n, seed))]
    if name == "sample":
        return [model.sample(min(n, 4), seed=seed, top_k=1 + seed % model.codebook_size,
                             label=None if labels is None else labels[:min(n, 4)])]
    codes = model.encode(_images(model, n, seed)).codes
    return [model.prior_nll(codes, label=labels)]


def soak(model, calls: list[tuple], total: int, threads: int = 16, seed: int = 0, warmup: int | None = None,
         log=None) -> dict:
    """Sequential results first, then a warm-up, then `total` calls drawn from `calls` on `threads` threads.

    The warm-up: every thread runs the heaviest call of each kind at the same moment, then
    `warmup` random calls (default: a quarter of `total`, at least one pass over `calls`).
    onnxruntime's CPU arena grows to the high-water mark of concurrent demand (with some
    fragmentation) and never shrinks; the warm-up lets it get there, and what follows shows
    whether anything grows after. Returns counts, mismatches, errors and RSS figures."""
    started = time.perf_counter()
    expected = [run_call(model, c) for c in calls]

    def check(i: int) -> str | None:
        try:
            got = run_call(model, calls[i])
        except Exception as e:  # counted, and the run goes on
            return f"{type(e).__name__}: {e}"
        if len(got) != len(expected[i]) or not all(np.array_equal(a, b) for a, b in zip(got, expected[i])):
            return "mismatch"
        return None

    rng = random.Random(seed)
    # the heaviest call of each kind: in the warm-up every thread runs them at the same moment, so
    # that onnxruntime's arena and the allocator reach the high-water mark of the worst coincidence
    # of calls now, rather than at some random moment of the run (which would look like growth)
    heaviest = {}
    for i, c in enumerate(calls):
        if c[0] not in heaviest or c[1] > calls[heaviest[c[0]]][1]:
            heaviest[c[0]] = i
    heavy = sorted(heaviest.values())
    barrier = threading.Barrier(threads)

    def peak(t: int) -> list:
        out = []
        for r in range(len(heavy)):
            barrier.wait()
            out.append(check(heavy[(t + r) % len(heavy)]))
        return out

    warmup = max(len(calls), total // 4) if warmup is None else warmup
    warm = [rss_bytes()]
    with ThreadPoolExecutor(threads) as pool:
        problems = [p for ps in pool.map(peak, range(threads)) for p in ps if p]
        order = list(range(len(calls))) + [rng.randrange(len(calls)) for _ in range(warmup - len(calls))]
        rng.shuffle(order)
        step = max(1, len(order) // 5)
        for k in range(0, len(order), step):
            problems += [p for p in pool.map(check, order[k:k + step]) if p]
            warm.append(rss_bytes())
        rss_start = rss_bytes()
        samples = [rss_start]
        done, mismatches, errors = 0, 0, {}
        order = [rng.randrange(len(calls)) for _ in range(total)]
        chunk = max(1, total // 20)
        t0 = time.perf_counter()
        for k in range(0, total, chunk):
            for p in pool.map(check, order[k:k + chunk]):
                done += 1
                if p == "mismatch":
                    mismatches += 1
                elif p:
                    errors[p] = errors.get(p, 0) + 1
            samples.append(rss_bytes())
            if log:
                log(f"{done}/{total} calls, rss {samples[-1] / 2**20:.1f} MiB")
        seconds = time.perf_counter() - t0
    rss_end = rss_bytes()
    growth = (rss_end - rss_start) / rss_start if rss_start else 0.0
    return {
        "calls": done, "warmup_calls": warmup + len(heavy) * threads,
        "distinct_calls": len(calls), "threads": threads, "seconds": round(seconds, 2),
        "calls_per_second": round(done / seconds, 1), "warmup_problems": len(problems),
        "mismatches": mismatches, "errors": errors, "rss_after_warmup_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1), "rss_max_mib": round(max(samples) / 2**20, 1),
        "rss_growth": round(growth, 4), "rss_samples_mib": [round(s / 2**20, 1) for s in samples],
        "rss_warmup_mib": [round(s / 2**20, 1) for s in warm],
        "mix": {name: sum(1 for i in order if calls[i][0] == name) for name in sorted({c[0] for c in calls})},
        "total_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default="mnist-vae")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--distinct", type=int, default=200)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=None, help="random warm-up calls (default: a quarter of --calls)")
    ap.add_argument("--ort-threads", type=int, default=None, help="onnxruntime intra-op threads (default: per core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args(argv)

    import onnxruntime

    import vaeinfer

    model = vaeinfer.load(args.model, device="cpu", threads=args.ort_threads)
    calls = make_calls(model, args.distinct, args.seed)
    result = soak(model, calls, args.calls, args.threads, args.seed, args.warmup, log=lambda m: print(m, file=sys.stderr, flush=True))
    result = {**report.provenance(__spec__.name, argv), **result}
    result.update(model=model.info.name, ort_threads=args.ort_threads, seed=args.seed,
                  passed=result["mismatches"] == 0 and not result["errors"] and result["warmup_problems"] == 0
                  and result["rss_growth"] <= MAX_GROWTH,
                  vaeinfer=vaeinfer.__version__, onnxruntime=onnxruntime.__version__,
                  threads_in_use=threading.active_count())
    if args.no_report:
        print(json.dumps(result, indent=2))
        return result
    lines = [
        f"{result['model']} on CPU (onnxruntime {result['onnxruntime']}).", "",
        "| calls | distinct calls | threads | errors | results differing from sequential | RSS after warm-up | RSS at end | growth | calls/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['calls']} | {result['distinct_calls']} | {result['threads']} | {sum(result['errors'].values())} | "
        f"{result['mismatches']} | {result['rss_after_warmup_mib']} MiB | {result['rss_end_mib']} MiB | "
        f"{result['rss_growth']:+.1%} | {result['calls_per_second']} |", "",
        f"Warm-up: {result['warmup_calls']} calls (every thread running the heaviest call of each kind at once, "
        f"then random calls); RSS during it (MiB): {result['rss_warmup_mib']}. onnxruntime's CPU arena grows to "
        "the high-water mark of concurrent demand and keeps it; the measured run shows whether anything grows after.",
        "",
        f"Mix of calls: {result['mix']}. RSS over the measured run (MiB): {result['rss_samples_mib']}.",
        f"Pass (no error, identical results, RSS growth <= {MAX_GROWTH:.0%}): **{result['passed']}**.",
    ]
    report.write("soak", "Soak: one model, many threads", result, lines)
    return result


if __name__ == "__main__":
    main()
