"""VQ-VAE sampling: the cached prior loop (prior_row + prior_step) against the reference loop
(the full prior graph once per code position), in the same run, on the same seeds.

Writes benchmarks/results/vq_sampling.{json,md}: in-process sample_codes(n) seconds (median of
interleaved rounds), the fraction of positions where the two loops drew the same code, and the
whole `vaeinfer sample -n N` process (wall seconds, max RSS) on the bundle as committed and on a
copy without the cached graphs (what an older bundle does, i.e. the reference loop).

    python benchmarks/vq_sampling.py [--model mnist-vqvae] [--n 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import vaeinfer
from vaeinfer import bench as vbench
from vaeinfer.kinds.vqvae import STEP_ROLES

REPO = Path(__file__).resolve().parent.parent


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
    """`vaeinfer sample -m MODEL -n N -o PNG` under /usr/bin/time: wall seconds and max RSS."""
    cmd = [sys.executable, "-m", "vaeinfer.cli", "sample", "-m", model, "-n", str(n), "-o", str(out_png)]
    timer = ["/usr/bin/time", "-f", "%e %M"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    done = subprocess.run(timer + cmd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-1000:]}")
    row = {"command": " ".join(["vaeinfer", *cmd[3:]]), "wall_s": wall}
    if timer:
        elapsed, rss_kb = done.stderr.strip().splitlines()[-1].split()
        row.update({"time_elapsed_s": float(elapsed), "max_rss_mb": int(rss_kb) / 1024})
    return row


def measure(model: str = "mnist-vqvae", n: int = 256, rounds: int = 3, seed: int = 1, processes: bool = True) -> dict:
    m = vaeinfer.load(model, device="cpu")
    if not m.info.has_prior or "prior_step" not in m._graphs:
        raise SystemExit(f"{model}: no cached prior graphs to compare")
    for cached in (False, True):  # warm-up, and let each graph choose its execution mode
        m.sample_codes(n, seed=0, cached=cached)
        m.sample_codes(n, seed=0, cached=cached)
    seconds = {"reference": [], "cached": []}
    codes = {}
    for _ in range(rounds):  # interleaved: a slow moment of the machine hits both
        for name, cached in (("reference", False), ("cached", True)):
            t0 = time.perf_counter()
            codes[name] = m.sample_codes(n, seed=seed, cached=cached)
            seconds[name].append(time.perf_counter() - t0)
    ref, fast = (float(np.median(seconds[k])) for k in ("reference", "cached"))
    same = float(np.mean(codes["reference"] == codes["cached"]))
    report = {
        "command": f"python benchmarks/vq_sampling.py --model {model} --n {n} --rounds {rounds}",
        "machine": vbench.machine(), "onnxruntime_version": ort.__version__, "model": model, "n": n, "seed": seed,
        "in_process": {"reference_s": ref, "cached_s": fast, "speedup": ref / fast, "rounds": seconds},
        "same_code_fraction": same, "goal": {"speedup": 8.0, "same_code_fraction": 0.999},
        "met": ref / fast >= 8.0 and same >= 0.999,
    }
    if processes:
        with tempfile.TemporaryDirectory() as tmp:
            old = reference_copy(m.bundle.path, Path(tmp))
            report["whole_process"] = {"reference_loop": whole_process(str(old), n, Path(tmp) / "ref.png"),
                                       "cached_loop": whole_process(model, n, Path(tmp) / "cached.png")}
    return report


def markdown(r: dict) -> str:
    mach, p = r["machine"], r["in_process"]
    lines = [f"# VQ-VAE sampling: cached prior loop vs reference loop ({r['model']}, n={r['n']})", "",
             f"Command: `{r['command']}`  ", f"Machine: {mach.get('cpu')}, {mach.get('cpus_usable')} usable CPUs; "
             f"onnxruntime {r['onnxruntime_version']}", "",
             "| loop | sample_codes(n) s (median) |", "|---|---|",
             f"| reference (full prior graph per position) | {p['reference_s']:.3f} |",
             f"| cached (prior_row per row + prior_step per position) | {p['cached_s']:.3f} |", "",
             f"Speed-up: **{p['speedup']:.1f}x** (goal >= 8x). Same code at {r['same_code_fraction']:.4%} of positions "
             f"for seed {r['seed']} (goal >= 99.9%). Goals met: {r['met']}.", ""]
    if "whole_process" in r:
        lines += ["Whole process (`/usr/bin/time`):", "", "| bundle | command | wall s | max RSS MB |", "|---|---|---|---|"]
        for name, row in r["whole_process"].items():
            lines.append(f"| {name.replace('_', ' ')} | `{row['command']}` | {row.get('time_elapsed_s', row['wall_s']):.2f} "
                         f"| {row.get('max_rss_mb', float('nan')):.0f} |")
        lines += ["", "(reference loop: a copy of the bundle without prior_row/prior_step, i.e. an older bundle)"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist-vqvae")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    report = measure(args.model, args.n, args.rounds)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results_io import write_results

    write_results(args.out, "vq_sampling", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
