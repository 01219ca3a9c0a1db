"""VQ-VAE sampling: the cached prior loop (prior_row + prior_step) against the reference loop
(the full prior graph once per code position), in the same run, on the same seeds.

Writes benchmarks/results/vq_sampling.{json,md}: in-process sample_codes(n) seconds (median of
interleaved rounds), the fraction of positions where the two loops drew the same code, and the
whole `vaeinfer sample -n N` process (wall seconds, peak RSS: harness.memory) on the bundle as committed and on a
copy without the cached graphs (what an older bundle does, i.e. the reference loop).

    python -m benchmarks.speed.vq_sampling [--model mnist-vqvae] [--n 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import vaeinfer
from benchmarks.harness import memory
from benchmarks.harness import report as results
from benchmarks.harness.cli import description
from benchmarks.harness.timing import interleaved
from vaeinfer.kinds.vqvae import STEP_ROLES


def reference_copy(bundle: Path, into: Path) -> Path:
    """The bundle without its cached prior graphs: sampling falls back to the reference loop."""
    out = into / bundle.name
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for role in STEP_ROLES:
        (out / manifest["graphs"].pop(role)["file"]).unlink()
    manifest["prior"].pop("cache")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def whole_process(model: str, n: int, out_png: Path) -> dict:
    """`vaeinfer sample -m MODEL -n N -o PNG` in a fresh process: wall seconds and peak RSS."""
    args = ["sample", "-m", model, "-n", str(n), "-o", str(out_png)]
    run = memory.fresh_process("vaeinfer.cli", args, timeout=600)
    if run["returncode"] != 0:
        raise RuntimeError(f"vaeinfer {' '.join(args)} failed: {run['stderr'][-1000:]}")
    return {"command": " ".join(["vaeinfer", *args]), "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mib"]}


def measure(model: str = "mnist-vqvae", n: int = 256, rounds: int = 3, seed: int = 1, processes: bool = True) -> dict:
    m = vaeinfer.load(model, device="cpu")
    if not m.info.has_prior or "prior_step" not in m._graphs:
        raise SystemExit(f"{model}: no cached prior graphs to compare")
    for cached in (False, True):  # warm-up, and let each graph choose its execution mode
        m.sample_codes(n, seed=0, cached=cached)
        m.sample_codes(n, seed=0, cached=cached)
    codes = {}

    def runner(name: str, cached: bool):
        return lambda: codes.__setitem__(name, m.sample_codes(n, seed=seed, cached=cached))

    timings = interleaved({"reference": runner("reference", False), "cached": runner("cached", True)}, rounds,
                          calls=1, warmup=0)  # interleaved: a slow moment of the machine hits both
    ref, fast = timings.medians["reference"], timings.medians["cached"]
    same = float(np.mean(codes["reference"] == codes["cached"]))
    report = {
        "onnxruntime_version": ort.__version__, "model": model, "n": n, "seed": seed,
        "in_process": {"reference_s": ref, "cached_s": fast, "speedup": ref / fast,
                       "rounds": {k: timings.seconds(k).tolist() for k in ("reference", "cached")}},
        "same_code_fraction": same, "goal": {"speedup": 8.0, "same_code_fraction": 0.999},
        "met": ref / fast >= 8.0 and same >= 0.999,
    }
    if processes:
        with tempfile.TemporaryDirectory() as tmp:
            old = reference_copy(m.bundle.path, Path(tmp))
            report["whole_process"] = {"reference_loop": whole_process(str(old), n, Path(tmp) / "ref.png"),
                                       "cached_loop": whole_process(model, n, Path(tmp) / "cached.png")}
    return report


def markdown(r: dict) -> list[str]:
    p = r["in_process"]
    lines = ["| loop | sample_codes(n) s (median) |", "|---|---|",
             f"| reference (full prior graph per position) | {p['reference_s']:.3f} |",
             f"| cached (prior_row per row + prior_step per position) | {p['cached_s']:.3f} |", "",
             f"Speed-up: **{p['speedup']:.1f}x** (goal >= 8x). Same code at {r['same_code_fraction']:.4%} of positions "
             f"for seed {r['seed']} (goal >= 99.9%). Goals met: {r['met']}.", ""]
    if "whole_process" in r:
        lines += ["Whole process (a fresh interpreter each):", "", "| bundle | command | wall s | peak RSS MB |",
                  "|---|---|---|---|"]
        for name, row in r["whole_process"].items():
            lines.append(f"| {name.replace('_', ' ')} | `{row['command']}` | {row['wall_s']:.2f} | {row['peak_rss_mb']:.0f} |")
        lines += ["", "(reference loop: a copy of the bundle without prior_row/prior_step, i.e. an older bundle)"]
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", default="mnist-vqvae")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(results.RESULTS))
    args = ap.parse_args(argv)
    report = {**results.provenance(__spec__.name, argv), **measure(args.model, args.n, args.rounds)}
    results.write("vq_sampling", f"VQ-VAE sampling: cached prior loop vs reference loop ({args.model}, n={args.n})",
                  report, markdown(report), args.out)
    return report


if __name__ == "__main__":
    main()
