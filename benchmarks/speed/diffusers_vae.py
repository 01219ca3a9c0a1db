"""vaeinfer against diffusers (eager and torch.compile) on latent-diffusion autoencoder decoders,
on this machine's CPU, in one run, on the same (random-init) weights.

    python -m benchmarks.speed.diffusers_vae            # SD-sized AutoencoderKL at 256x256, TAESD at 512x512
    python -m benchmarks.speed.diffusers_vae --quick    # tiny configs and sizes: a smoke run
    options: --threads N, --batches 1,4, --rounds R, --no-compile, --no-memory, --note TEXT, --out DIR

- models: diffusers' Stable Diffusion VAE config (AutoencoderKL, block_out_channels (128, 256,
  512, 512), layers_per_block 2, 4 latent channels) and AutoencoderTiny's default (TAESD) config,
  torch.manual_seed(0) weights, saved with save_pretrained and imported with
  `export.diffusers.from_diffusers` (validated against the diffusers module), with an int8 variant
  (calibrated on smooth synthetic images). fp16 is for GPUs: on a CPU onnxruntime runs most fp16
  operators through casts to fp32, so it is not timed here.
- runners: vaeinfer `decode_params(z)` (every runtime check on) at fp32 and int8; diffusers
  `vae.decode(z).sample` eager and torch.compile (inductor, frozen weights), under inference_mode.
  Timed in interleaved rounds (one call per runner per round, after a warm-up call), median.
- GFLOP/s: PyTorch's FlopCounterMode count of the decoder over the median time, as a fraction of
  the measured fp32 matmul peak (benchmarks.speed.peers's `matmul_peak`).
- memory: peak RSS (harness.memory: VmHWM) of a separate process that loads the bundle with
  vaeinfer (no torch) and decodes one SD-sized latent to 512x512 untiled, and to 512x512 and
  1024x1024 tiled (`decode(z, tile=...)`); the output image itself is 12 MiB at 1024x1024.
Writes DIR/diffusers_vae.json and DIR/diffusers_vae.md (default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import memory
from benchmarks.harness import report as results
from benchmarks.harness.cli import description, int_list
from benchmarks.harness.machine import cpu_seconds, others_since
from benchmarks.harness.timing import interleaved, stats
from benchmarks.speed.diffusers_models import FAMILIES, build
from benchmarks.speed.diffusers_models import module as diffusers_module


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def memory_child(bundle: str, size: int, tile: int | None, threads: int) -> None:
    """Run in a fresh process: decode one latent for a size x size image; print peak RSS as JSON."""
    import vaeinfer

    vae = vaeinfer.load(bundle, device="cpu", threads=threads)
    after_load = memory.peak_rss_mib()
    f = vae.downsample
    z = np.random.default_rng(0).standard_normal((1, vae.latent_channels, size // f, size // f)).astype(np.float32)
    t0 = time.perf_counter()
    img = vae.decode(z, tile=tile, tile_mode="blend") if tile else vae.decode(z)  # the blended tiles measured here
    print(json.dumps({"size": size, "tile": tile, "seconds": time.perf_counter() - t0, "peak_rss_mib": memory.peak_rss_mib(),
                      "rss_after_load_mib": after_load, "output_mib": img.nbytes / 2 ** 20,
                      "torch_imported": "torch" in sys.modules}))


def ort_profile(bundle: Path, latent: int, threads: int) -> dict:
    """Where onnxruntime's decoder time goes: kernel time share per operator type (its profiler,
    vaeinfer's session options, one (1, c, latent, latent) input, after two warm-up runs)."""
    import collections

    import onnxruntime as ort

    from vaeinfer.session import session_options

    manifest = json.loads((bundle / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(threads)
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "prof")
        sess = ort.InferenceSession((bundle / "decoder.onnx").read_bytes(), opts, providers=["CPUExecutionProvider"])
        z = np.random.default_rng(0).standard_normal((1, manifest["latent"]["channels"], latent, latent)).astype(np.float32)
        for _ in range(3):
            sess.run(None, {"z": z})
        events = json.loads(Path(sess.end_profiling()).read_text())
    share = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            share[e["args"]["op_name"]] += e["dur"]
    total = sum(share.values()) or 1
    return {"latent": latent, "optimization_level": str(opts.graph_optimization_level),
            "op_share": {k: round(v / total, 3) for k, v in share.most_common(12)}}


def measure_memory(bundle: Path, cases, threads: int) -> list[dict]:
    rows = []
    for size, tile in cases:
        log(f"  memory: decode to {size}x{size}, tile {tile}")
        run = memory.fresh_process(__spec__.name, ["--memory-child", str(bundle), str(size), str(tile or 0), str(threads)],
                                   timeout=1800)
        if run["returncode"] != 0:
            rows.append({"size": size, "tile": tile, "error": run["stderr"].strip().splitlines()[-1:]})
            continue
        rows.append(memory.last_json_line(run))
    return rows


def fp16_ranges(quick: bool) -> dict:
    """The largest |activation| of each decoder submodule on real-looking inputs (latents encoded
    from smooth synthetic images, and N(0, I) / scaling_factor), in PyTorch fp32 (forward hooks):
    where fp16 (max 65504) would overflow. The same weights as the timing run."""
    import torch

    from vaeinfer.export.spatial_vae import smooth_images

    out = {}
    for key, size in (("kl", 32 if quick else 256), ("taesd", 64 if quick else 512)):
        name, vae = FAMILIES[key][0], diffusers_module(key, quick)
        top: dict[str, float] = {}

        def hook(mod, _inp, output, name=None):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                top[name] = max(top.get(name, 0.0), float(t.detach().abs().max()))

        handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in vae.decoder.named_modules() if n]
        s = float(vae.config.scaling_factor or 1.0)
        with torch.inference_mode():
            x = torch.from_numpy(smooth_images(2, 3, size, size, seed=3))
            enc = vae.encode(x)
            z = enc.latent_dist.mean if hasattr(enc, "latent_dist") else enc.latents
            vae.decode(z)
            vae.decode(torch.randn(2, z.shape[1], *z.shape[2:], generator=torch.Generator().manual_seed(0)) / s)
        for h in handles:
            h.remove()
        ranked = sorted(top.items(), key=lambda kv: -kv[1])
        out[name] = {"image": f"{size}x{size}", "max_abs": ranked[0][1] if ranked else 0.0,
                     "top_modules": [{"module": k, "max_abs": v} for k, v in ranked[:8]],
                     "over_fp16": [k for k, v in ranked if v > 65504]}
        log(f"  fp16 ranges {name}: max |activation| {out[name]['max_abs']:.1f} ({ranked[0][0] if ranked else '-'})")
    return out


def make_models(quick: bool, tmp: Path, threads: int):
    out = {}
    for key, size in (("kl", 32 if quick else 256), ("taesd", 64 if quick else 512)):
        m = build(key, quick, tmp)
        out[m["name"]] = {"module": m["module"], "bundle": m["bundle"], "size": size, "export_s": m["export_s"],
                          "config": m["config"]}
    return out


def bench(models: dict, batches, threads: int, rounds: int, compile_: bool, peak: dict, on_row=None) -> list[dict]:
    """Time every runner on every model and batch; `on_row(rows)` after each row (partial results
    survive an interrupted run)."""
    import torch

    import vaeinfer
    from vaeinfer.export.diffusers import _Decoder
    from benchmarks.speed.peers import TorchRunner, flops_per_image

    rows = []
    for name, m in models.items():
        module, size = m["module"], m["size"]
        vaes = {p: vaeinfer.load(m["bundle"], device="cpu", threads=threads, precision=p) for p in ("fp32", "int8")}
        f = vaes["fp32"].downsample
        dec = _Decoder(module).eval()
        runner = TorchRunner(torch, dec)
        for b in batches:
            z = np.random.default_rng(b).standard_normal((b, 4, size // f, size // f)).astype(np.float32)
            z = z / np.float32(vaes["fp32"].scaling_factor)
            flops = flops_per_image(dec, torch.from_numpy(z[:1]))
            fns = {f"vaeinfer {p}": (lambda v=v: v.decode_params(z)) for p, v in vaes.items()}
            fns["diffusers eager"] = runner.eager(z)
            if compile_:
                log(f"  {name} batch {b}: torch.compile")
                fns["torch.compile"] = runner.compile(z)
            log(f"  {name} batch {b}: timing {list(fns)} ({rounds} rounds)")
            # one warm-up call each (vaeinfer: session arenas; torch: allocator), then one call per round
            timings = interleaved(fns, rounds, calls=1, warmup=1)
            row = {"model": name, "image": f"{size}x{size}", "batch": b, "gflop_per_image": flops / 1e9,
                   "compile_s": runner.compile_s.get(b), "runners": {}}
            for k in fns:
                s = stats(timings.seconds(k), b)
                s["gflops"] = flops * b / (s["p50_ms"] / 1e3) / 1e9
                s["of_peak"] = s["gflops"] / peak["peak_gflops"]
                row["runners"][k] = s
            eager = row["runners"]["diffusers eager"]["p50_ms"]
            comp = row["runners"].get("torch.compile", {}).get("p50_ms")
            for k, s in row["runners"].items():
                s["vs_eager"] = eager / s["p50_ms"]
                s["vs_compile"] = comp / s["p50_ms"] if comp else None
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            log("    " + ", ".join(f"{k} {s['p50_ms']:.0f} ms" for k, s in row["runners"].items()))
    return rows


TITLE = "vaeinfer vs diffusers: latent-diffusion decoders on CPU"


def markdown(report: dict) -> list[str]:
    peak = report["peak"]
    lines = [f"Threads: {report['threads']}; rounds: {report['rounds']} interleaved calls per runner (median)  ",
             f"fp32 matmul peak: {peak['peak_gflops']:.0f} GFLOP/s ({peak['peak_from']})  ",
             f"Other processes used {report['other_processes']['cpu_fraction']:.0%} of the machine's CPU time during "
             f"the run (load average at start {report['load_at_start']})", ""]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    lines += ["| decoder | image | batch | runner | ms (median) | images/s | GFLOP/s | of peak | vs eager | vs compile |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        for k, s in r["runners"].items():
            vc = f"{s['vs_compile']:.2f}x" if s.get("vs_compile") else "-"
            lines.append(f"| {r['model']} | {r['image']} | {r['batch']} | {k} | {s['p50_ms']:.0f} | "
                         f"{s['images_per_s']:.2f} | {s['gflops']:.0f} | {s['of_peak']:.0%} | {s['vs_eager']:.2f}x | {vc} |")
    lines += ["", "GFLOP per image (FlopCounterMode): " + ", ".join(
        f"{r['model']} {r['image']}: {r['gflop_per_image']:.1f}" for r in report["rows"] if r["batch"] == report["batches"][0])]
    for name, prof in (report.get("ort_profile") or {}).items():
        lines += ["", f"onnxruntime kernel time by operator, {name} decoder, latent {prof['latent']}x{prof['latent']}: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in prof["op_share"].items())]
    if report.get("memory"):
        lines += ["", "## Peak memory of one decode (separate process, vaeinfer only, peak RSS = VmHWM)", "",
                  "| image | tile | peak RSS MiB | after load MiB | output MiB | seconds |", "|---|---|---|---|---|---|"]
        for r in report["memory"]:
            if "error" in r:
                lines.append(f"| {r['size']} | {r['tile'] or 'untiled'} | error: {r['error']} | | | |")
            else:
                tile = f"{r['tile']} latent px" if r["tile"] else "untiled"
                lines.append(f"| {r['size']}x{r['size']} | {tile} | {r['peak_rss_mib']:.0f} | "
                             f"{r['rss_after_load_mib']:.0f} | {r['output_mib']:.0f} | {r['seconds']:.1f} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    ap.add_argument("--batches", type=int_list, default=[1, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny configs and sizes (a smoke run)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--tile", type=int, default=32, help="tile size of the tiled memory runs, in latent pixels (32 = 256 image pixels)")
    ap.add_argument("--note", default=None)
    ap.add_argument("--out", default=str(results.RESULTS))
    ap.add_argument("--fp16-ranges", action="store_true",
                    help="only measure the decoders' activation ranges (fp16 overflow), into DIR/diffusers_vae_fp16.json")
    ap.add_argument("--memory-only", metavar="BUNDLE", default=None,
                    help="only the peak-memory runs, on an existing SD-sized spatial-vae bundle, into DIR/diffusers_vae_memory.json")
    ap.add_argument("--memory-child", nargs=4, metavar=("BUNDLE", "SIZE", "TILE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        bundle, size, tile, threads = args.memory_child
        memory_child(bundle, int(size), int(tile) or None, int(threads))
        return {}
    if args.memory_only:
        threads = args.threads or len(os.sched_getaffinity(0))
        small, big = (64, 128) if args.quick else (512, 1024)
        tile = 4 if args.quick else args.tile
        report = {**results.provenance(__spec__.name, argv), "bundle": str(args.memory_only), "threads": threads, "load_at_start": [round(v, 2) for v in os.getloadavg()],
                  "ort_profile": ort_profile(Path(args.memory_only), 16, threads),
                  "memory": measure_memory(Path(args.memory_only), [(small, None), (small, tile), (big, tile)], threads)}
        results.write("diffusers_vae_memory", "Peak memory of one decode (vaeinfer only, separate processes)", report,
                      ["```json", json.dumps(report["memory"], indent=2), "```"], args.out)
        return report
    import diffusers
    import torch

    from benchmarks.speed.peers import matmul_peak

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    if args.fp16_ranges:
        ranges = {**results.provenance(__spec__.name, argv), "diffusers_version": diffusers.__version__,
                  "fp16_max": 65504, "models": fp16_ranges(args.quick)}
        results.write("diffusers_vae_fp16-quick" if args.quick else "diffusers_vae_fp16",
                      "Activation ranges of the diffusers decoders (fp16 overflow)", ranges,
                      ["```json", json.dumps(ranges["models"], indent=2), "```"], args.out)
        return ranges
    batches = args.batches
    load = os.getloadavg()
    before = cpu_seconds()
    log(f"peak: fp32 matmul, {threads} threads")
    peak = matmul_peak(threads, torch, n=512 if args.quick else 2048)
    out = Path(args.out)
    stem = "diffusers_vae-quick" if args.quick else "diffusers_vae"

    def write(report):
        report["other_processes"] = others_since(before)
        results.write(stem, TITLE, report, markdown(report), out)

    report = {**results.provenance(__spec__.name, argv), "torch_version": torch.__version__,
              "diffusers_version": diffusers.__version__,
              "threads": threads, "batches": batches, "rounds": args.rounds, "note": args.note, "peak": peak,
              "load_at_start": [round(v, 2) for v in load]}
    with tempfile.TemporaryDirectory(prefix="vaeinfer-diffusers-bench-") as tmp:
        models = make_models(args.quick, Path(tmp), threads)
        report["models"] = {k: {"export_s": v["export_s"], "config": v["config"]} for k, v in models.items()}
        def save(rows):
            report["rows"] = rows
            write(report)

        report["rows"] = bench(models, batches, threads, args.rounds, not args.no_compile, peak, save)
        report["ort_profile"] = {k: ort_profile(v["bundle"], v["size"] // 8 if not args.quick else 4, threads)
                                 for k, v in models.items()}
        if not args.no_memory:
            kl = models["AutoencoderKL (SD)"]["bundle"]
            small, big = (64, 128) if args.quick else (512, 1024)
            tile = 4 if args.quick else args.tile
            report["memory"] = measure_memory(kl, [(small, None), (small, tile), (big, tile)], threads)
    write(report)
    return report


if __name__ == "__main__":
    main()
