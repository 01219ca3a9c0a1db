"""Which onnxruntime session options run the bundled graphs fastest on this CPU.

    .venv/bin/python benchmarks/session_options.py [--threads N] [--min-time S]

Times each bundled model's encoder and decoder at batch 1 and 256 under vaeinfer's session
options (vaeinfer.session.session_options) and under one change at a time, interleaved in blocks
so that a slow moment of the machine hits every variant. Writes
benchmarks/results/session_options.{json,md}; vaeinfer's choices in session.py follow from it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

import vaeinfer  # noqa: E402
from run import inputs_for, interleaved  # noqa: E402
from vaeinfer.bench import machine  # noqa: E402
from vaeinfer.session import session_options  # noqa: E402


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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in vaeinfer.available_models():
        m = vaeinfer.load(name, device="cpu", threads=threads)
        for role in ("encoder", "decoder"):
            data = m.bundle.read_graph(role)
            sessions = {k: ort.InferenceSession(data, o, providers=["CPUExecutionProvider"])
                        for k, o in variants(threads).items()}
            for b in batches:
                x = inputs_for(m, role, b)
                fns = {k: (lambda s: lambda: s.run(None, {s.get_inputs()[0].name: x}))(s) for k, s in sessions.items()}
                print(f"{name} {role} batch {b}", file=sys.stderr, flush=True)
                t = interleaved(fns, args.min_time)
                base = float(np.median(t["vaeinfer"]))
                rows.append({"model": name, "graph": role, "batch": b,
                             **{k: {"p50_ms": float(np.median(v)) * 1e3, "speedup": base / float(np.median(v))}
                                for k, v in t.items()}})
    report = {"command": " ".join(["python", "benchmarks/session_options.py", *(argv or sys.argv[1:])]),
              "threads": threads, "machine": machine(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "session_options.json").write_text(json.dumps(report, indent=2) + "\n")
    names = [k for k in rows[0] if k not in ("model", "graph", "batch")]
    lines = ["# onnxruntime session options", "",
             f"`{report['command']}` on {report['machine']['cpu']}, {threads} threads, onnxruntime "
             f"{report['machine']['onnxruntime']}, {report['machine']['date']}.", "",
             "Median latency (ms); in brackets the speed-up over vaeinfer's options (> 1: the change is faster).", "",
             "| model | graph | batch | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r[n]['p50_ms']:.3f}" + ("" if n == "vaeinfer" else f" ({r[n]['speedup']:.2f})") for n in names]
        lines.append(f"| {r['model']} | {r['graph']} | {r['batch']} | " + " | ".join(cells) + " |")
    (out / "session_options.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
