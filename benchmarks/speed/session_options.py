"""Which onnxruntime session options run the bundled graphs fastest on this CPU.

    python -m benchmarks.speed.session_options [--threads N] [--min-time S]

Times each bundled model's encoder and decoder at batch 1 and 256 under vaeinfer's session
options (vaeinfer.session.session_options) and under one change at a time, interleaved in blocks
so that a slow moment of the machine hits every variant. Writes
benchmarks/results/session_options.{json,md}; vaeinfer's choices in session.py follow from it.
"""

from __future__ import annotations

import argparse
import os
import sys

import onnxruntime as ort

import vaeinfer
from benchmarks.harness import report as results
from benchmarks.harness.cli import description, int_list
from benchmarks.harness.timing import interleaved
from vaeinfer.bench import graph_inputs
from vaeinfer.session import session_options


def variants(threads: int) -> dict:
    def base():
        return session_options(threads)

    def change(fn):
        opts = base()
        fn(opts)
        return opts

    def entry(key, value):
        return lambda o: o.add_session_config_entry(key, value)

    out = {
        "vaeinfer": base(),
        "no spinning": change(entry("session.intra_op.allow_spinning", "0")),
        "no memory pattern": change(lambda o: setattr(o, "enable_mem_pattern", False)),
        "no CPU arena": change(lambda o: setattr(o, "enable_cpu_mem_arena", False)),
        "optimization EXTENDED (no NCHWc layout)": change(
            lambda o: setattr(o, "graph_optimization_level", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)),
        "denormals as zero": change(entry("session.set_denormal_as_zero", "1")),
        "dynamic block base 4": change(entry("session.dynamic_block_base", "4")),
    }
    if threads > 1:
        out["parallel execution mode"] = change(lambda o: setattr(o, "execution_mode", ort.ExecutionMode.ORT_PARALLEL))
    return out


def markdown(report: dict) -> list[str]:
    rows = report["rows"]
    names = [k for k in rows[0] if k not in ("model", "graph", "batch")]
    lines = [f"{report['threads']} threads, onnxruntime {ort.__version__}.", "",
             "Median latency (ms); in brackets the speed-up over vaeinfer's options (> 1: the change is faster).", "",
             "| model | graph | batch | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r[n]['p50_ms']:.3f}" + ("" if n == "vaeinfer" else f" ({r[n]['speedup']:.2f})") for n in names]
        lines.append(f"| {r['model']} | {r['graph']} | {r['batch']} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per variant, graph and batch")
    ap.add_argument("--batches", type=int_list, default=[1, 256])
    ap.add_argument("--out", default=str(results.RESULTS))
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    rows = []
    for name in vaeinfer.available_models():
        m = vaeinfer.load(name, device="cpu", threads=threads)
        for role in ("encoder", "decoder"):
            data = m.bundle.read_graph(role)
            sessions = {k: ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])
                        for k, o in variants(threads).items()}
            for b in args.batches:
                x = graph_inputs(m, role, b)[0]
                fns = {k: (lambda s: lambda: s.run(None, {s.get_inputs()[0].name: x}))(s) for k, s in sessions.items()}
                print(f"{name} {role} batch {b}", file=sys.stderr, flush=True)
                medians = interleaved(fns, min_time=args.min_time).medians
                rows.append({"model": name, "graph": role, "batch": b,
                             **{k: {"p50_ms": v * 1e3, "speedup": medians["vaeinfer"] / v} for k, v in medians.items()}})
    report = {**results.provenance(__spec__.name, argv), "threads": threads, "rows": rows}
    results.write("session_options", "onnxruntime session options", report, markdown(report), args.out)
    return report


if __name__ == "__main__":
    main()
