"""Did a retrained model get slower? Two bundles' graphs timed in one process, interleaved.

    python -m benchmarks.speed.compare_bundles OLD_BUNDLE NEW_BUNDLE --batches 1,256 --stem mnist-vae-retrain-speed

Both go through the public API with every runtime check on (`encode(x)`, `decode_params(z)`) on
the same seeded inputs and the same threads; blocks alternate between the two bundles so that a
slow moment of the machine hits both. Reports median latency per batch and NEW / OLD (a ratio
above 1.10 is a regression of more than 10%), and the execution mode each bundle's graph chose
for large CPU batches on its first calls (one multi-threaded call or parallel chunks, see
vaeinfer.runtime): when the two differ, so may their times, whatever the weights.
"""

from __future__ import annotations

import argparse

import vaeinfer
from benchmarks.harness import report as results
from benchmarks.harness.cli import description, int_list, name_list
from benchmarks.harness.timing import interleaved, stats
from vaeinfer.bench import example_inputs

TITLE = "Retrained bundle against the one it replaces (same machine, same process)"

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
            timings = interleaved({k: (lambda m=m: call(m, x)) for k, m in models.items()}, min_time=min_time)
            s = {k: stats(timings.seconds(k), batch) for k in models}
            modes = {k: m.execution_modes()[role] for k, m in models.items()}  # chosen on the first large calls
            rows.append({"op": op, "batch": batch, "old": {**s["old"], "mode": modes["old"]},
                         "new": {**s["new"], "mode": modes["new"]}, "ratio": s["new"]["p50_ms"] / s["old"]["p50_ms"]})
            print(f"{op} batch {batch}: old {s['old']['p50_ms']:.3f} ms, new {s['new']['p50_ms']:.3f} ms", flush=True)
    return rows


def markdown(report: dict) -> list[str]:
    lines = [f"Old: `{report['old']}`; new: `{report['new']}`; {report['precision']} graphs", "",
             "| op | batch | old p50 | new p50 | new / old | large-batch mode (old / new) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['op']} | {r['batch']} | {r['old']['p50_ms']:.3f} ms | {r['new']['p50_ms']:.3f} ms | "
                     f"{r['ratio']:.3f}{' (regression)' if r['ratio'] > 1.10 else ''} | "
                     f"{r['old'].get('mode') or '-'} / {r['new'].get('mode') or '-'} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--batches", type=int_list, default=[1, 256])
    ap.add_argument("--ops", type=name_list, default=list(CALLS))
    ap.add_argument("--threads", type=int, default=None, help="default: onnxruntime's (one per core)")
    ap.add_argument("--min-time", type=float, default=4.0, help="seconds of timed calls per bundle, op and batch")
    ap.add_argument("--precision", default="fp32", help="the graph variant of both bundles: fp32, fp16 or int8")
    ap.add_argument("--stem", default=None, help="also write benchmarks/results/<stem>.json and .md")
    args = ap.parse_args(argv)
    ops = args.ops
    if unknown := set(ops) - set(CALLS):
        ap.error(f"--ops takes {sorted(CALLS)}, got {sorted(unknown)}")
    rows = compare(args.old, args.new, args.batches, ops, args.threads, args.min_time, args.precision)
    report = {**results.provenance(__spec__.name, argv), "old": args.old, "new": args.new, "precision": args.precision,
              "rows": rows}
    if args.stem:
        results.write(args.stem, TITLE, report, markdown(report))
    else:
        print("\n".join([*results.header(TITLE, report), *markdown(report)]))
    return report


if __name__ == "__main__":
    main()
