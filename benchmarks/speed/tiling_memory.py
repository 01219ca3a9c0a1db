"""Peak memory of tiled against untiled decoding, by image size, for a spatial ONNX decoder.

    python -m benchmarks.speed.tiling_memory --out tiling_memory     # synthetic decoder
    python -m benchmarks.speed.tiling_memory decoder.onnx --latent-channels 4 \
        --factor 8 --sizes 256 512 1024 --tile 32 --overlap 8

The decoder is any ONNX graph z (N, c, h, w) -> image (N, C, f h, f w) with dynamic h and w
(input name taken from the graph). Without a file, a synthetic one is exported first: an
8x-upsampling conv decoder (4 latent channels, 128-64-32 channels at the three resolutions,
nearest upsampling + 3x3 convs, random weights), small enough to build in seconds.

Each (size, mode) runs in a fresh process (numpy + onnxruntime + vaeinfer.tiling only, no torch)
that loads the decoder, decodes one random latent of size/f, and reports its peak resident set
size (harness.memory: VmHWM, which starts anew at exec, unlike ru_maxrss) before and after
the decode. Tiled decoding should stay at (after load) + output + one tile's activations
whatever the size; untiled decoding grows with the image area times the widest activations.
Prints the markdown table; --out STEM writes benchmarks/results/STEM.json and STEM.md.
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


def child(decoder: str, size: int, factor: int, channels: int, tile: int, overlap: int, threads: int) -> None:
    """In a fresh process: decode one latent for a size x size image; print one JSON line."""
    import numpy as np
    import onnxruntime as ort

    from vaeinfer.tiling import tile_count, tiled_decode

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(decoder, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    z = np.random.default_rng(0).standard_normal((1, channels, size // factor, size // factor), dtype=np.float32)
    after_load = memory.peak_rss_mib()

    def run(a):
        return session.run(None, {name: a})[0]

    t0 = time.perf_counter()
    if tile:
        out = tiled_decode(run, z, tile, overlap, scale=factor)
        tiles = tile_count(z.shape, tile, overlap, factor)
    else:
        out, tiles = run(z), 1
    print(json.dumps({"size": size, "tile": tile or None, "tiles": tiles, "seconds": time.perf_counter() - t0,
                      "peak_rss_mib": memory.peak_rss_mib(), "after_load_mib": after_load,
                      "output_mib": out.nbytes / 2 ** 20}))


def synthetic_decoder(path: Path, channels: int = 4) -> Path:
    """Export the synthetic 8x conv decoder (dynamic batch, h, w) to `path`."""
    import torch
    from torch import nn
    from torch.export import Dim

    torch.manual_seed(0)
    widths = (128, 64, 32)
    layers = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(widths, widths[1:] + (widths[-1],)):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], 3, 3, padding=1))
    model = nn.Sequential(*layers).eval()
    torch.onnx.export(model, (torch.zeros(2, channels, 8, 8),), str(path), dynamo=True, input_names=["z"],
                      output_names=["x"], external_data=False, verbose=False,
                      dynamic_shapes=({0: Dim("batch"), 2: Dim("h", min=2, max=512), 3: Dim("w", min=2, max=512)},))
    return path


def measure(decoder: str, sizes, factor: int, channels: int, tile: int, overlap: int, threads: int) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for size in sizes:
        for t in (0, tile):
            args = ["--child", decoder, *map(str, (size, factor, channels, t, overlap, threads))]
            run = memory.fresh_process(__spec__.name, args, env=env)
            if run["returncode"] != 0:
                rows.append({"size": size, "tile": t or None, "error": run["stderr"].strip().splitlines()[-1:]})
            else:
                rows.append(memory.last_json_line(run))
            print(rows[-1], file=sys.stderr)
    return rows


def table(report: dict) -> list[str]:
    lines = [f"Decoder: {report['decoder']} (factor {report['factor']}, tile {report['tile']} latent px, overlap "
             f"{report['overlap']}); {report['threads']} thread(s).", "",
             "| image | mode | tiles | peak RSS MiB | after load MiB | output MiB | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        mode = f"tile {r['tile']}" if r["tile"] else "untiled"
        if "error" in r:
            lines.append(f"| {r['size']} | {mode} | error: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['size']}x{r['size']} | {mode} | {r['tiles']} | {r['peak_rss_mib']:.0f} | "
                         f"{r['after_load_mib']:.0f} | {r['output_mib']:.1f} | {r['seconds']:.2f} |")
    return lines


TITLE = "Peak memory of tiled against untiled decoding"


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        d, size, factor, channels, tile, overlap, threads = argv[1:8]
        child(d, int(size), int(factor), int(channels), int(tile), int(overlap), int(threads))
        return None
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("decoder", nargs="?", help="an ONNX decoder with dynamic h, w (default: a synthetic one)")
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--factor", type=int, default=8, help="upsampling factor of the decoder")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024], help="image sizes (pixels)")
    ap.add_argument("--tile", type=int, default=32, help="tile size in latent pixels")
    ap.add_argument("--overlap", type=int, default=8, help="overlap in latent pixels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", metavar="STEM", help="write benchmarks/results/STEM.json and STEM.md")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = args.decoder or str(synthetic_decoder(Path(tmp) / "decoder.onnx", args.latent_channels))
        rows = measure(decoder, args.sizes, args.factor, args.latent_channels, args.tile, args.overlap, args.threads)
    report = {**results.provenance(__spec__.name, argv),
              "decoder": args.decoder or "synthetic 8x conv decoder (128-64-32 channels)", "factor": args.factor,
              "tile": args.tile, "overlap": args.overlap, "threads": args.threads, "rows": rows}
    if args.out:
        results.write(args.out, TITLE, report, table(report))
    else:
        print("\n".join([*results.header(TITLE, report), *table(report)]))
    return report


if __name__ == "__main__":
    main()
