"""What the NaN/Inf check of every graph output costs, at batch 256 on the bundled model.

    python -m benchmarks.speed.finite_check      # writes benchmarks/results/finite_check.{json,md}

For each graph: the median time of onnxruntime's `session.run` alone, of `check_finite` on its
float outputs, and of the runtime's whole `Graph.run` (run + shape check + finite check). The
check passes when it costs under 2% of the run. `check_finite` sums each output once (a sum is
finite iff every term is, barring overflow) and only a non-finite sum pays for an element-wise
count; the cost of that slow path (an output with one NaN) is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from benchmarks.harness import report as results
from benchmarks.harness.cli import description
from benchmarks.harness.timing import interleaved

LIMIT = 0.02


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default="mnist-vae")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: per core)")
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--note", default="", help="a line on the conditions (e.g. a shared machine), for the report")
    args = ap.parse_args(argv)

    import vaeinfer
    from vaeinfer.errors import OutputError
    from vaeinfer.bench import graph_inputs
    from vaeinfer.runtime import check_finite

    model = vaeinfer.load(args.model, device="cpu", threads=args.threads)
    rows = {}
    for role in model.manifest.specs():
        graph = model.graph(role)
        feeds = {t.name: a for t, a in zip(graph.spec.inputs, graph_inputs(model, role, args.batch))}
        names = [t.name for t in graph.spec.outputs]
        floats = [i for i, t in enumerate(graph.spec.outputs) if t.dtype == "float32"]
        for _ in range(5):
            outs = graph.session.run(names, feeds)
            graph.run(feeds)
        # interleaved, so that a change of machine load affects all three alike
        medians = interleaved({"run": lambda: graph.session.run(names, feeds),
                               "check": lambda: [check_finite(outs[i], role) for i in floats],
                               "whole": lambda: graph.run(feeds)}, args.repeats, calls=1, warmup=0).medians
        run_s, check_s, whole_s = medians["run"], medians["check"], medians["whole"]
        bad = [o.copy() for o in outs]
        for i in floats:
            bad[i].flat[len(bad[i].flat) // 2] = np.nan

        def slow():
            for i in floats:
                try:
                    check_finite(bad[i], role)
                except OutputError:
                    pass

        slow_s = interleaved({"slow": slow}, args.repeats, calls=1, warmup=0).medians["slow"]
        rows[role] = {"batch": args.batch, "float_values_checked": int(sum(outs[i].size for i in floats)),
                      "session_run_ms": round(run_s * 1e3, 4), "check_finite_ms": round(check_s * 1e3, 4),
                      "graph_run_ms": round(whole_s * 1e3, 4), "check_cost": round(check_s / run_s, 5),
                      "nan_path_ms": round(slow_s * 1e3, 4)}
        print(role, rows[role], file=sys.stderr)
    worst = max(r["check_cost"] for r in rows.values())
    result = {**results.provenance(__spec__.name, argv), "model": model.info.name, "threads": args.threads,
              "repeats": args.repeats, "graphs": rows, "worst_check_cost": worst, "limit": LIMIT, "passed": worst < LIMIT,
              "note": args.note}
    if args.no_report:
        print(json.dumps(result, indent=2))
        return result
    lines = [f"{result['model']} on CPU; medians of {args.repeats} interleaved runs.", "",
             "| graph | batch | values checked | session.run | check_finite | cost | Graph.run (all) | check with a NaN |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for role, r in rows.items():
        lines.append(f"| {role} | {r['batch']} | {r['float_values_checked']} | {r['session_run_ms']:.3f} ms | "
                     f"{r['check_finite_ms']:.4f} ms | {r['check_cost']:.3%} | {r['graph_run_ms']:.3f} ms | "
                     f"{r['nan_path_ms']:.4f} ms |")
    lines += ["", f"Worst cost {worst:.3%} of the run (limit {LIMIT:.0%}): **{'pass' if result['passed'] else 'FAIL'}**."]
    if args.note:
        lines += ["", args.note]
    results.write("finite_check", "Cost of the NaN/Inf check on outputs", result, lines)
    return result


if __name__ == "__main__":
    main()
