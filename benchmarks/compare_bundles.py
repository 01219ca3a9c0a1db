#!/usr/bin/env python
"""Did a retrained model get slower? Two bundles' graphs timed in one process, interleaved.

    python benchmarks/compare_bundles.py OLD_BUNDLE NEW_BUNDLE --batches 1,256 --stem mnist-vae-retrain-speed

Both go through the public API with every runtime check on (`encode(x)`, `decode_params(z)`) on
the same seeded inputs and the same threads; blocks alternate between the two bundles so that a
slow moment of the machine hits both. Reports median latency per batch and NEW / OLD (a ratio
above 1.10 is a regression of more than 10%), and the execution mode each bundle's graph chose
for large CPU batches on its first calls (one multi-threaded call or parallel chunks, see
vaeinfer.runtime): when the two differ, so may their times, whatever the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vaeinfer  # noqa: E402
from benchmarks.results_io import header, provenance, write_results  # noqa: E402
from benchmarks.run import interleaved, stats  # noqa: E402
from vaeinfer.bench import example_inputs  # noqa: E402

# op -> (the graph it runs, the call)
CALLS = {"encode": ("encoder", lambda m, x: m.encode(x)), "decode": ("decoder", lambda m, x: m.decode_params(x))}


def compare(old: str, new: str, batches: list[int], ops: list[str], threads: int | None, min_time: float,
            precision: str = "fp32") -> list[dict]:
    models = {k: vaeinfer.load(b, device="cpu", threads=threads, precision=precision) for k, b in (("old", old), ("new", new))}
    rows = []
    for op in ops:
        for batch in batches:
            x = example_inputs(models["old"], op, batch, seed=0)
            role, call = CALLS[op]
            seconds = interleaved({k: (lambda m=m: call(m, x)) for k, m in models.items()}, min_time)
            s = {k: stats(v, batch) for k, v in seconds.items()}
            modes = {k: m.execution_modes()[role] for k, m in models.items()}  # chosen on the first large calls
            rows.append({"op": op, "batch": batch, "old": {**s["old"], "mode": modes["old"]},
                         "new": {**s["new"], "mode": modes["new"]}, "ratio": s["new"]["p50_ms"] / s["old"]["p50_ms"]})
            print(f"{op} batch {batch}: old {s['old']['p50_ms']:.3f} ms, new {s['new']['p50_ms']:.3f} ms", flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [*header("Retrained bundle against the one it replaces (same machine, same process)", report),
             f"Old: `{report['old']}`; new: `{report['new']}`; {report['precision']} graphs", "",
             "| op | batch | old p50 | new p50 | new / old | large-batch mode (old / new) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['op']} | {r['batch']} | {r['old']['p50_ms']:.3f} ms | {r['new']['p50_ms']:.3f} ms | "
                     f"{r['ratio']:.3f}{' (regression)' if r['ratio'] > 1.10 else ''} | "
                     f"{r['old'].get('mode') or '-'} / {r['new'].get('mode') or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--ops", default="encode,decode")
    ap.add_argument("--threads", type=int, default=None, help="default: onnxruntime's (one per core)")
    ap.add_argument("--min-time", type=float, default=4.0, help="seconds of timed calls per bundle, op and batch")
    ap.add_argument("--precision", default="fp32", help="the graph variant of both bundles: fp32, fp16 or int8")
    ap.add_argument("--stem", default=None, help="also write benchmarks/results/<stem>.json and .md")
    args = ap.parse_args(argv)
    ops = args.ops.split(",")
    if unknown := set(ops) - set(CALLS):
        ap.error(f"--ops takes {sorted(CALLS)}, got {sorted(unknown)}")
    rows = compare(args.old, args.new, [int(b) for b in args.batches.split(",")], ops, args.threads, args.min_time,
                   args.precision)
    report = {**provenance(["benchmarks/compare_bundles.py", *(argv if argv is not None else sys.argv[1:])]),
              "old": args.old, "new": args.new, "precision": args.precision, "rows": rows}
    if args.stem:
        write_results(REPO / "benchmarks" / "results", args.stem, report, markdown(report))
    else:
        print(markdown(report))
    return report


if __name__ == "__main__":
    main()
