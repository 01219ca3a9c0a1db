"""Exact tiled decoding (decode(z, max_memory=...)) against untiled: exactness, peak memory, time.

    python -m benchmarks.speed.exact_tiling --quick                      # a small config, a minute
    python -m benchmarks.speed.exact_tiling --sizes 1024 2048 4096 --max-memory 1GiB \
        --untiled-up-to 2048 --out exact_tiling                         # the SD config, hours on CPU

The model is an AutoencoderKL with Stable Diffusion's config (4 latent channels, 128-256-512-512,
32 groups, 2 resnets per block, mid-block attention) and random weights (no download), imported
with its exact-tiling stage graphs (`--bundle DIR` reuses an import; `--keep DIR` keeps it).
Each (size, mode) runs in a fresh process that loads the bundle, decodes one N(0, 1) latent of
size/8 and reports its time and peak RSS (VmHWM) minus its RSS after loading the bundle (an exact
run loads its stage graphs within the call, as a user's first call does: both count); the exact run's output
is compared with the untiled one's where both ran (max abs, images in [-1, 1]). The
target: exact within max_memory + the output array, equal to untiled within 1e-3, and at 1024
within 1.3x of the untiled time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import memory
from benchmarks.harness import report as results
from benchmarks.harness.cli import description

from benchmarks.speed.diffusers_models import SD_CONFIG as SD
QUICK = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
             sample_size=64)


def child(bundle: str, size: int, budget: str, threads: int, save: str) -> None:
    """In a fresh process: one decode; one JSON line."""
    import numpy as np

    import vaeinfer

    def rss(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024

    m = vaeinfer.load(bundle, device="cpu", threads=threads or None)
    f = m.downsample
    z = np.random.default_rng(0).standard_normal((1, m.latent_channels, size // f, size // f)).astype(np.float32)
    after = rss("VmRSS")
    plan = m.exact_plan(z.shape, max_memory=budget) if budget else None
    t0 = time.perf_counter()  # an exact run loads its stage graphs in the call (counted in time and peak)
    img = m.decode(z, max_memory=budget) if budget else m.decode(z)
    seconds = time.perf_counter() - t0
    if save:
        np.save(save, img)
    print(json.dumps({"size": size, "mode": f"exact {budget}" if budget else "untiled", "seconds": seconds,
                      "peak_over_load_mib": rss("VmHWM") - after, "after_load_mib": after,
                      "output_mib": img.nbytes / 2 ** 20, "estimate_mib": plan and plan.peak / 2 ** 20,
                      "plan": plan and plan.describe()}))


def export(config: dict, out: Path, say) -> Path:
    import diffusers
    import torch

    from vaeinfer.export.diffusers import from_diffusers

    torch.manual_seed(0)
    src = out.parent / (out.name + "-diffusers")
    diffusers.AutoencoderKL(**config).eval().save_pretrained(src)
    return from_diffusers(src, out, sizes=((64, 64), (64, 96)), batches=(1,), progress=say)


def cli_rows(bundle: str, size: int, budget: str, threads: int, tmp: Path, say) -> list[dict]:
    """`vaeinfer decode -m BUNDLE z.npy --max-memory BUDGET -o out.png` in a fresh process at `size`
    and at the smallest latent (8x8): wall time and peak RSS of each."""
    import numpy as np

    rows = []
    for side in (64, size):
        z = tmp / f"z{side}.npy"
        np.save(z, np.random.default_rng(0).standard_normal((1, 4, side // 8, side // 8)).astype(np.float32))
        args = ["decode", "-m", bundle, str(z), "--max-memory", budget, "-o", str(tmp / f"cli{side}.png")]
        run = memory.fresh_process("vaeinfer.cli", args + (["--threads", str(threads)] if threads else []))
        row = {"size": side, "mode": f"CLI decode --max-memory {budget} -> PNG"}
        if run["returncode"] != 0:
            row["error"] = run["stderr"].strip().splitlines()[-1:]
        else:
            row.update(seconds=run["wall_s"], seconds_per_mpx=run["wall_s"] / (side * side / 1e6),
                       cli_peak_rss_mib=run["peak_rss_mib"])
        rows.append(row)
        say(json.dumps(row))
    if all("error" not in r for r in rows):
        rows[-1]["peak_over_load_mib"] = rows[-1]["cli_peak_rss_mib"] - rows[0]["cli_peak_rss_mib"]
    return rows


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        bundle, size, budget, threads, save = argv[1:6]
        child(bundle, int(size), budget, int(threads), save)
        return None
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--quick", action="store_true", help="a small config at 128 and 256 pixels, 48 MiB budget")
    ap.add_argument("--bundle", help="an already imported bundle (with exact tiling) to use")
    ap.add_argument("--keep", help="import the SD-config model into this folder (reused when it exists)")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (pixels)")
    ap.add_argument("--max-memory", default=None, help="the budget of the exact runs (default 1GiB; --quick 48MiB)")
    ap.add_argument("--untiled-up-to", type=int, default=None, help="also run untiled up to this size (default 1024)")
    ap.add_argument("--threads", type=int, default=0, help="0: onnxruntime's default")
    ap.add_argument("--cli-size", type=int, default=None,
                    help="also decode this size with `vaeinfer decode --max-memory` to a PNG (its peak RSS beside "
                         "the same command's on the smallest latent: the CLI's own loading)")
    ap.add_argument("--out", metavar="STEM", help="write benchmarks/results/STEM.json and STEM.md")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([128, 256] if args.quick else [1024, 2048, 4096])
    budget = args.max_memory or ("48MiB" if args.quick else "1GiB")
    untiled_up_to = args.untiled_up_to or (256 if args.quick else 1024)

    def say(msg):
        print(msg, file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="vaeinfer-exact-bench-") as tmp:
        bundle = args.bundle
        if bundle is None:
            target = Path(args.keep) if args.keep else Path(tmp) / "bundle"
            bundle = str(target if (target / "manifest.json").exists() else
                         export(QUICK if args.quick else SD, target, say))
        rows = []
        env = dict(os.environ)
        for size in sizes:
            outs = {}
            for mode in (["untiled"] if size <= untiled_up_to else []) + ["exact"]:
                save = str(Path(tmp) / f"{size}-{mode}.npy")
                run = memory.fresh_process(__spec__.name, ["--child", bundle, str(size),
                                                           budget if mode == "exact" else "", str(args.threads), save],
                                           env=env)
                if run["returncode"] != 0:
                    row = {"size": size, "mode": mode, "error": run["stderr"].strip().splitlines()[-1:]}
                else:
                    row = memory.last_json_line(run)
                    row["seconds_per_mpx"] = row["seconds"] / (size * size / 1e6)
                    outs[mode] = save
                rows.append(row)
                say(json.dumps(row))
            if len(outs) == 2:
                import numpy as np

                err = float(np.abs(np.load(outs["exact"]) - np.load(outs["untiled"])).max())
                untiled = next(r for r in rows if r["size"] == size and r["mode"] == "untiled")
                rows[-1].update(max_abs_vs_untiled=err, time_vs_untiled=rows[-1]["seconds"] / untiled["seconds"])
            for p in outs.values():
                os.unlink(p)
        if args.cli_size:
            rows += cli_rows(bundle, args.cli_size, budget, args.threads, Path(tmp), say)
    report = {**results.provenance(__spec__.name, argv), "model": "AutoencoderKL " + ("quick config" if args.quick
                                                                                     else "SD config, random weights"),
              "max_memory": budget, "threads": args.threads or None, "rows": rows}
    lines = [f"Model: {report['model']}; exact runs with max_memory {budget}.", "",
             "| image | mode | seconds | s/Mpx | peak over load MiB | estimate MiB | output MiB "
             "| max abs vs untiled | time vs untiled |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['mode']} | error: {r['error']} | | | | | | |")
            continue
        if "cli_peak_rss_mib" in r:
            over = f"{r['peak_over_load_mib']:.0f} (peak {r['cli_peak_rss_mib']:.0f})" if "peak_over_load_mib" in r \
                else f"(peak {r['cli_peak_rss_mib']:.0f}: the CLI's loading)"
            lines.append(f"| {r['size']}x{r['size']} | {r['mode']} | {r['seconds']:.1f} | {r['seconds_per_mpx']:.1f} | "
                         f"{over} | | | | |")
            continue
        est = f"{r['estimate_mib']:.0f}" if r.get("estimate_mib") else ""
        err = f"{r['max_abs_vs_untiled']:.2e}" if "max_abs_vs_untiled" in r else ""
        ratio = f"{r['time_vs_untiled']:.2f}x" if "time_vs_untiled" in r else ""
        lines.append(f"| {r['size']}x{r['size']} | {r['mode']} | {r['seconds']:.1f} | {r['seconds_per_mpx']:.1f} | "
                     f"{r['peak_over_load_mib']:.0f} | {est} | {r['output_mib']:.0f} | {err} | {ratio} |")
    if args.out:
        results.write(args.out, "Exact tiled decoding against untiled", report, lines)
    else:
        print("\n".join([*results.header("Exact tiled decoding against untiled", report), *lines]))
    return report


if __name__ == "__main__":
    main()
