"""Streaming video decode (vaeinfer, kind video-vae) against diffusers' own AutoencoderKLWan decode:
time per output frame and peak RSS by clip length, and the error against diffusers fp32.

    python -m benchmarks.speed.video_vae --out video_vae                     # Wan-2.1-sized, 256x256
    python -m benchmarks.speed.video_vae --quick                             # a tiny config, seconds

The model is diffusers' default AutoencoderKLWan config (Wan 2.1's: base_dim 96, z_dim 16,
dim_mult 1-2-4-4), randomly initialised (seed 0), saved with save_pretrained and exported with
`from_diffusers` (validated against diffusers at small sizes). Each (clip length, path) decodes one
seeded latent (1, 16, T, 32, 32) (256x256 frames, 1 + 4 (T - 1) of them) in a fresh process, which
reports its peak resident set size (harness.memory: VmHWM) and the wall time of the decode after
one warm-up decode of a 1-latent-frame clip (a first call's setup is not per-frame cost).

Paths: vaeinfer decode (onnxruntime CPU, fp32, the decoder's graphs only (`roles=("decoder",)`, as
`vaeinfer decode` loads them), the frames kept: the whole clip is the output); vaeinfer-bf16 (the
same on OpenVINO in bf16);
vaeinfer decode_stream (the frames dropped as they come: what a video writer does); vaeinfer-tiled
(decode with tile= half the latent side: four exact spatial tiles per frame); diffusers
eager fp32; diffusers bf16 autocast; diffusers fp32 with enable_tiling() and with tiling under bf16
autocast. The error of each path is against diffusers fp32 (the reference clip, saved by the
first fp32 run). One run each (the goal is a table, not a distribution): per-frame times of a few
percent apart are noise.
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
from benchmarks.harness.cli import description, int_list, name_list

PATHS = ("vaeinfer", "vaeinfer-stream", "vaeinfer-tiled", "vaeinfer-bf16", "diffusers-fp32", "diffusers-bf16", "diffusers-tiled-fp32",
         "diffusers-tiled-bf16")
QUICK = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
         "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}


def _latents(channels: int, t: int, side: int):
    import numpy as np

    return np.random.default_rng(0).standard_normal((1, channels, t, side, side), dtype=np.float32)


def child(path: str, model_dir: str, bundle: str, t: int, side: int, threads: int, ref_file: str) -> None:
    """In a fresh process: decode one clip by `path`; print one JSON line."""
    import numpy as np

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    z = _latents(cfg["z_dim"], t, side)
    if path.startswith("vaeinfer"):
        import vaeinfer

        # decode-only (as `vaeinfer decode` loads it); vaeinfer-bf16: the fp32 step graphs in bf16 on
        # the backend that has it (OpenVINO)
        m = vaeinfer.load(bundle, threads=threads, precision="bf16" if path == "vaeinfer-bf16" else "fp32",
                          roles=("decoder",))
        tile = max(1, side // 2) if path == "vaeinfer-tiled" else None
        m.decode(z[:, :, :1], tile=tile)  # warm-up
        after_load = memory.peak_rss_mib()
        t0 = time.perf_counter()
        if path != "vaeinfer-stream":
            out = m.decode(z, tile=tile)
        else:
            frames, out = 0, None
            for chunk in m.decode_stream(z):
                frames += chunk.shape[2]
            out = None
        seconds = time.perf_counter() - t0
    else:
        import torch
        import diffusers

        torch.set_num_threads(threads)
        vae = diffusers.AutoencoderKLWan.from_pretrained(model_dir, local_files_only=True).eval()
        if "tiled" in path:
            vae.enable_tiling()
        bf16 = path.endswith("bf16")
        zt = torch.from_numpy(z)

        def run(a):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return vae.decode(a).sample.float().numpy()

        run(zt[:, :, :1])
        after_load = memory.peak_rss_mib()
        t0 = time.perf_counter()
        out = run(zt)
        seconds = time.perf_counter() - t0
        if path == "diffusers-fp32" and not Path(ref_file).exists():
            np.save(ref_file, out)
    frames = 1 + 4 * (t - 1)
    err = None
    if out is not None and Path(ref_file).exists():
        ref = np.load(ref_file)
        err = float(np.abs(ref.astype(np.float64) - out).max()) if ref.shape == out.shape else None
    print(json.dumps({"path": path, "latent_frames": t, "frames": frames, "seconds": seconds,
                      "seconds_per_frame": seconds / frames, "peak_rss_mib": memory.peak_rss_mib(),
                      "after_load_mib": after_load, "max_abs_err_vs_diffusers_fp32": err}))


def prepare(tmp: Path, quick: bool) -> tuple[Path, Path]:
    """Save the random-init model and export its bundle; (model folder, bundle)."""
    import torch
    import diffusers

    from vaeinfer.export.diffusers import from_diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(**(QUICK if quick else {})).eval()
    model_dir = tmp / "model"
    vae.save_pretrained(model_dir)
    bundle = from_diffusers(model_dir, tmp / "bundle", progress=lambda msg: print(msg, file=sys.stderr))
    return model_dir, bundle


def measure(model_dir: Path, bundle: Path, clips, side: int, threads: int, paths, tmp: Path) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for t in clips:
        ref = tmp / f"ref-{t}.npy"
        # the fp32 reference first, so that every other path's error is measured against it
        for path in sorted(paths, key=lambda p: p != "diffusers-fp32"):
            args = ["--child", path, str(model_dir), str(bundle), str(t), str(side), str(threads), str(ref)]
            run = memory.fresh_process(__spec__.name, args, env=env)
            try:
                rows.append(memory.last_json_line(run))
            except RuntimeError as e:
                rows.append({"path": path, "latent_frames": t, "frames": 1 + 4 * (t - 1), "error": str(e)[-300:]})
            print(rows[-1], file=sys.stderr)
    return rows


def summary(rows: list[dict]) -> dict:
    """The goals: vaeinfer's peak RSS from the shortest to the longest clip, its worst error, and its
    per-frame speed-up over the fastest diffusers path at the longest clip."""
    ok = [r for r in rows if "error" not in r]
    longest = max((r["latent_frames"] for r in ok), default=None)
    out = {}
    for path in ("vaeinfer", "vaeinfer-stream", "vaeinfer-tiled", "vaeinfer-bf16"):
        mine = sorted((r for r in ok if r["path"] == path), key=lambda r: r["latent_frames"])
        if len(mine) >= 2:
            out[f"{path}_rss_growth"] = mine[-1]["peak_rss_mib"] / mine[0]["peak_rss_mib"] - 1
    errs = [r["max_abs_err_vs_diffusers_fp32"] for r in ok if r["path"] in ("vaeinfer", "vaeinfer-tiled")
            and r["max_abs_err_vs_diffusers_fp32"] is not None]
    out["vaeinfer_max_abs_err"] = max(errs) if errs else None
    at = [r for r in ok if r["latent_frames"] == longest]
    best = min((r["seconds_per_frame"] for r in at if r["path"].startswith("diffusers")), default=None)
    for path in ("vaeinfer", "vaeinfer-bf16"):
        mine = next((r["seconds_per_frame"] for r in at if r["path"] == path), None)
        out[f"{path}_speedup_vs_fastest_diffusers"] = best / mine if best and mine else None
    return out


def table(report: dict) -> list[str]:
    lines = [f"Model: {report['model']}; frames {report['side']}x{report['side']}; {report['threads']} thread(s).", "",
             "| frames | path | s / frame | peak RSS MiB | after warm-up MiB | max abs err vs diffusers fp32 |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['path']} | error: {r['error'][-120:]} | | | |")
            continue
        err = r["max_abs_err_vs_diffusers_fp32"]
        lines.append(f"| {r['frames']} | {r['path']} | {r['seconds_per_frame']:.3f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['after_load_mib']:.0f} | {'-' if err is None else f'{err:.2g}'} |")
    s = report["summary"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines += ["", f"vaeinfer peak RSS growth from the shortest to the longest clip: "
                  f"{fmt(s.get('vaeinfer_rss_growth'), '+.1%')} (decode, frames kept), "
                  f"{fmt(s.get('vaeinfer-stream_rss_growth'), '+.1%')} (decode_stream), "
                  f"{fmt(s.get('vaeinfer-tiled_rss_growth'), '+.1%')} (tiled), "
                  f"{fmt(s.get('vaeinfer-bf16_rss_growth'), '+.1%')} (bf16); worst fp32 error "
                  f"{fmt(s.get('vaeinfer_max_abs_err'), '.2g')}; per-frame speed-up over the fastest diffusers path "
                  f"at the longest clip: {fmt(s.get('vaeinfer_speedup_vs_fastest_diffusers'), '.2f')}x (fp32), "
                  f"{fmt(s.get('vaeinfer-bf16_speedup_vs_fastest_diffusers'), '.2f')}x (bf16)."]
    return lines


TITLE = "Streaming video decode against diffusers (AutoencoderKLWan)"


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        path, model_dir, bundle, t, side, threads, ref = argv[1:8]
        child(path, model_dir, bundle, int(t), int(side), int(threads), ref)
        return None
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--clips", type=int_list, default=[5, 17, 33], help="clip lengths in frames (1 + 4 k), comma-separated")
    ap.add_argument("--size", type=int, default=256, help="frame side in pixels (a multiple of 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--paths", type=name_list, default=list(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--quick", action="store_true", help="a tiny random config, 64x64, clips 5,9: checks the plumbing")
    ap.add_argument("--out", metavar="STEM", help="write benchmarks/results/STEM.json and STEM.md")
    ap.add_argument("--reuse", metavar="DIR", help="a folder with model/ (saved diffusers model) and bundle/ "
                    "(its export) from an earlier run: skips the export")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.size = [5, 9], 64
    bad = [c for c in args.clips if c < 1 or (c - 1) % 4]
    if bad or args.size % 8:
        ap.error(f"clips must be 1 + 4 k frames (got {bad}) and --size a multiple of 8 (got {args.size})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, bundle = (Path(args.reuse) / "model", Path(args.reuse) / "bundle") if args.reuse \
            else prepare(tmp, args.quick)
        rows = measure(model_dir, bundle, [1 + (c - 1) // 4 for c in args.clips], args.size // 8, args.threads,
                       args.paths, tmp)
    report = {**results.provenance(__spec__.name, argv),
              "model": "tiny random AutoencoderKLWan (--quick)" if args.quick else
              "AutoencoderKLWan, diffusers' default (Wan 2.1) config, random init (seed 0)",
              "side": args.size, "threads": args.threads, "rows": rows, "summary": summary(rows)}
    if args.out:
        results.write(args.out, TITLE, report, table(report))
    else:
        print("\n".join([*results.header(TITLE, report), *table(report)]))
    return report


if __name__ == "__main__":
    main()
