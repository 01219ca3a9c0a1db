"""vaeinfer against its peers on this machine's CPU, in one process, on the same weights.

    python -m benchmarks.speed.peers                 # every bundled model, all cores
    python -m benchmarks.speed.peers --quick         # a smoke run: short timings, no cold start
    python -m benchmarks.speed.peers --device cuda [--cuda-graph]   # on a GPU (onnxruntime-gpu)
    options: --threads N (default: all usable cores), --batches 1,8,64,256, --min-time SECONDS,
             --models a,b, --no-torch, --no-coldstart, --out DIR (default benchmarks/results)

Writes DIR/cpu.json (everything), DIR/cpu.md (the tables, quoted by the README) and DIR/cpu.png;
with --device cuda, gpu.json / gpu.md / gpu.png, the GPU's name in each.

For each bundled model (`vaeinfer.available_models()`) and each of its encoder and decoder:
- vaeinfer: the public API with every runtime check on (input validation, the non-finite output
  check): `encode(x)`; `decode_params(z)` (VAE: the decoder graph's own output); for a VQ-VAE
  `decode(codes)`, whose image conversion the other runners then also do;
- onnxruntime: `InferenceSession.run` on the very same graph bytes, with vaeinfer's session
  options (so that the difference is vaeinfer's own per-call work), and once more with
  onnxruntime's default options;
- PyTorch eager and torch.compile (inductor, weights frozen), from the model's training
  checkpoint in training/checkpoints/<name>/ (or runs/<name>/ while a model is in training),
  under torch.inference_mode().
Runners are timed in interleaved blocks (so a slow moment of the machine hits all of them) and
compared by median latency. Decoder throughput is quoted as a fraction of the machine's measured
fp32 peak: the best of a large matmul in onnxruntime (MLAS), PyTorch and numpy, on the same
threads. FLOPs per image are PyTorch's FlopCounterMode count of the module (convolutions,
matmuls; 2 per multiply-add). Precision variants that a bundle carries are timed against fp32.
Also: `vaeinfer bench` of each model (latency percentiles, first call, memory), cold start of
`vaeinfer sample -n 16` against `import torch`, and the installed size of both (speed/coldstart.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import onnxruntime as ort

import vaeinfer
from benchmarks.harness import report as results
from benchmarks.harness.cli import description, int_list, name_list
from benchmarks.harness.machine import cpu_seconds, others_since
from benchmarks.harness.timing import interleaved, stats
from benchmarks.speed import coldstart, vq_sampling
from vaeinfer import bench as vbench
from vaeinfer import likelihood as lik
from vaeinfer.runtime import MODE_TRIAL_CALLS
from vaeinfer.session import parse_device, providers_for, session_options

REPO = Path(__file__).resolve().parents[2]

BATCHES = (1, 8, 64, 256)
PEAK_N = 2048


# --- the machine's peak -------------------------------------------------------------------------

def matmul_peak(threads: int, torch_mod=None, n: int = PEAK_N, device: str = "cpu") -> dict:
    """GFLOP/s of an n x n x n fp32 matmul in onnxruntime, numpy and PyTorch (best of runs).
    On CUDA: onnxruntime with device-resident inputs/outputs (IO binding) and PyTorch on the GPU."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3

    def best(fn, reps=8):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return flops / min(times) / 1e9

    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    dev = parse_device(device)
    sess = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=providers_for(dev))
    if dev.backend == "cuda":
        binding = sess.io_binding()
        binding.bind_ortvalue_input("A", ort.OrtValue.ortvalue_from_numpy(a, "cuda", dev.index))
        binding.bind_output("C", "cuda", dev.index)

        def ort_mm():
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
        out = {"n": n, "onnxruntime": best(ort_mm)}
    else:
        out = {"n": n, "onnxruntime": best(lambda: sess.run(None, {"A": a}))}
        out["numpy"] = best(lambda: a @ b)
    if torch_mod is not None and (dev.backend == "cpu" or torch_mod.cuda.is_available()):
        where = "cpu" if dev.backend == "cpu" else f"cuda:{dev.index}"
        ta, tb = torch_mod.from_numpy(a).to(where), torch_mod.from_numpy(b).to(where)
        sync = torch_mod.cuda.synchronize if dev.backend == "cuda" else (lambda: None)
        out["torch"] = best(lambda: (ta @ tb, sync()))
    out["peak_gflops"] = max(v for k, v in out.items() if k != "n")
    out["peak_from"] = max((k for k in out if k not in ("n", "peak_gflops")), key=lambda k: out[k])
    return out


# --- PyTorch side -------------------------------------------------------------------------------

def checkpoint_dir(name: str) -> Path | None:
    for folder in (REPO / "training" / "checkpoints" / name, REPO / "runs" / name):
        if (folder / "checkpoint.json").is_file():
            return folder
    return None


def torch_model(name: str, manifest: dict):
    """(module, source) for a bundled model: its checkpoint's weights, or None."""
    import torch  # noqa: F401

    from vaeinfer.training import checkpoint as ckpt
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model

    folder = checkpoint_dir(name)
    if folder is None:
        return None, None
    tensors, meta = ckpt.load(folder)
    model = build_model(meta["arch"], meta["image_shape"], Likelihood.from_json(meta["likelihood"]), **meta["model_args"])
    model.load_state_dict(ckpt.model_tensors(tensors))
    return model.eval(), str(folder.relative_to(REPO))


def flops_per_image(module, example) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        module(example)
    return counter.get_total_flops() / len(example)


class TorchRunner:
    """Eager and compiled (inductor, frozen weights) calls of a module under inference_mode."""

    def __init__(self, torch_mod, module, post=None, device: str = "cpu"):
        self.torch, self.post, self.device = torch_mod, post, device
        self.module = module.to(device)
        self.compiled = None
        self.compile_s = {}
        self.sync = torch_mod.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def _call(self, fn, x):
        with self.torch.inference_mode():
            out = fn(x)
            if self.post is not None:
                out = self.post(out)
            self.sync()
        return out

    def _input(self, x):
        return self.torch.from_numpy(x).to(self.device)

    def eager(self, x):
        t = self._input(x)
        return lambda: self._call(self.module, t)

    def compile(self, x):
        import torch._inductor.config as inductor

        inductor.freezing = True  # weights as constants: prepacked convolutions, as for deployment
        if self.compiled is None:
            self.compiled = self.torch.compile(self.module, dynamic=False)
        t = self._input(x)
        t0 = time.perf_counter()
        self._call(self.compiled, t)  # compiles for this batch size
        self.compile_s[len(x)] = time.perf_counter() - t0
        return lambda: self._call(self.compiled, t)


# --- one model ----------------------------------------------------------------------------------

def inputs_for(m, role: str, batch: int, seed: int = 0):
    return vbench.graph_inputs(m, role, batch, seed)[0]


def bench_model(name: str, batches, threads: int, min_time: float, use_torch: bool, peak: dict, log,
                device: str = "cpu", cuda_graph: bool = False) -> dict:
    m = vaeinfer.load(name, device=device, threads=threads, cuda_graph=list(batches) if cuda_graph else False)
    manifest = m.manifest.raw
    kind = m.info.kind
    dev = parse_device(m.info.device)
    graphs = {role: m.bundle.read_graph(role) for role in ("encoder", "decoder")}
    raw = {role: ort.InferenceSession(data, session_options(threads), providers=providers_for(dev))
           for role, data in graphs.items()}
    default_opts = ort.SessionOptions()
    default_opts.intra_op_num_threads = threads
    default_providers = ["CPUExecutionProvider"] if dev.backend == "cpu" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raw_default = {role: ort.InferenceSession(data, default_opts, providers=default_providers)
                   for role, data in graphs.items()}
    likelihood, value_range = m.manifest.likelihood, m.manifest.value_range
    to_images = (lambda p: lik.mean(p, likelihood, value_range)) if kind == "vqvae" else None

    torch_mod = module = source = None
    if use_torch:
        import torch as torch_mod

        torch_mod.set_num_threads(threads)
        module, source = torch_model(name, manifest)
        if dev.backend == "cuda" and not torch_mod.cuda.is_available():
            log("  (this torch has no CUDA: PyTorch columns omitted)")
            module = None
    runners_torch = {}
    where = "cpu" if dev.backend == "cpu" else f"cuda:{dev.index}"
    if module is not None:
        def torch_post(p):
            if kind != "vqvae":
                return p
            return torch_mod.sigmoid(p) if likelihood["kind"] == "bernoulli" else p.clamp(*value_range)

        runners_torch = {"encoder": TorchRunner(torch_mod, module.encoder, device=where),
                         "decoder": TorchRunner(torch_mod, module.decoder, torch_post, device=where)}

    def vaeinfer_call(role, x, b):
        if role == "encoder":
            return lambda: m.encode(x, batch_size=b)
        if kind == "vqvae":
            return lambda: m.decode(x, batch_size=b)
        return lambda: m.decode_params(x, batch_size=b)

    def raw_call(sess, role, x):
        feed = {sess.get_inputs()[0].name: x}
        if role == "decoder" and to_images is not None:
            return lambda: to_images(sess.run(None, feed)[0])
        return lambda: sess.run(None, feed)

    out = {"name": name, "kind": kind, "checkpoint": source, "device": m.info.device,
           "providers": list(m.info.providers), "cuda_graph": list(m.info.cuda_graph), "graphs": {}}
    for role in ("encoder", "decoder"):
        flops = None
        if use_torch:
            try:  # the checkpoint's module, else the architecture the manifest names (FLOPs need no weights)
                mod = getattr(module if module is not None else _architecture(manifest), role)
                flops = flops_per_image(mod, torch_mod.from_numpy(inputs_for(m, role, 2)))
            except Exception as e:  # noqa: BLE001
                log(f"  (no FLOP count for {role}: {e})")
        rows = []
        for b in batches:
            x = inputs_for(m, role, b)
            fns = {"vaeinfer": vaeinfer_call(role, x, b), "onnxruntime": raw_call(raw[role], role, x),
                   "onnxruntime (default options)": raw_call(raw_default[role], role, x)}
            if role in runners_torch:
                r = runners_torch[role]
                fns["torch eager"] = r.eager(x)
                fns["torch.compile"] = r.compile(x)
            log(f"  {name} {role} batch {b}: {', '.join(fns)}")
            # vaeinfer times its first large calls to choose how to run them; let the other
            # runtimes' idle threads stop spinning first, so that they do not skew that choice
            time.sleep(0.2)
            for _ in range(MODE_TRIAL_CALLS + 2):
                fns["vaeinfer"]()
            timings = interleaved(fns, min_time=min_time)
            row = {"batch": b, **{k: stats(timings.seconds(k), b) for k in fns}}
            if flops:
                for k in fns:
                    gflops = flops * b / (row[k]["p50_ms"] / 1e3) / 1e9
                    row[k]["gflops"] = gflops
                    row[k]["fraction_of_peak"] = gflops / peak["peak_gflops"]
            rows.append(row)
        out["graphs"][role] = {"flops_per_image": flops, "rows": rows,
                               "compile_s": runners_torch[role].compile_s if role in runners_torch else None}
    # how vaeinfer ran large CPU batches (see vaeinfer.runtime: one multi-threaded call, or chunks)
    out["execution_modes"] = m.execution_modes()
    out["execution_trials_us_per_row"] = {role: {k: [v * 1e6 for v in t] for k, t in trials.items()}
                                          for role, trials in m.execution_trials().items()}
    out["variants"] = bench_variants(m, name, threads, min_time, log, device=m.info.device)
    return out


def _architecture(manifest: dict):
    """The bundle's architecture with random weights, from the manifest's training facts."""
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model

    facts = manifest["training"]
    image = manifest["image"]
    shape = (image["channels"], image["height"], image["width"])
    return build_model(facts["arch"], shape, Likelihood.from_json(manifest["likelihood"]), **facts["model_args"]).eval()


def bench_variants(m, name: str, threads: int, min_time: float, log, batches=(1, 256), device: str = "cpu") -> dict:
    """Each precision variant of the bundle against fp32 through vaeinfer, interleaved."""
    precisions = [p for p in m.info.precisions if p != "fp32"]
    if not precisions:
        return {}
    models = {"fp32": m, **{p: vaeinfer.load(name, device=device, threads=threads, precision=p) for p in precisions}}
    out = {}
    entries = m.manifest.raw.get("variants", {})
    for role in ("encoder", "decoder"):
        for b in batches:
            x = inputs_for(m, role, b)
            fns = {}
            for p, model in models.items():
                if role == "encoder":
                    fns[p] = (lambda mm: lambda: mm.encode(x, batch_size=b))(model)
                elif m.info.kind == "vqvae":
                    fns[p] = (lambda mm: lambda: mm.decode(x, batch_size=b))(model)
                else:
                    fns[p] = (lambda mm: lambda: mm.decode_params(x, batch_size=b))(model)
            log(f"  {name} variants {role} batch {b}")
            medians = interleaved(fns, min_time=min_time).medians
            for p in precisions:
                slot = out.setdefault(p, {"speedup": {}, "error": entries.get(p, {}).get("error")})
                slot["speedup"][f"{role}@{b}"] = medians["fp32"] / medians[p]
                slot["speedup"][f"{role}@{b}_p50_ms"] = medians[p] * 1e3
    return out


def cli_bench(name: str, batches, device: str, threads: int, min_time: float, cuda_graph: bool) -> dict:
    """`vaeinfer bench` in a process of its own, so that its memory figures are the runtime's
    alone (this process also holds PyTorch)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "vaeinfer.cli", "bench", "-m", name, "--device", device, "--threads", str(threads),
               "--batch", ",".join(map(str, batches)), "--min-time", str(min_time), "--min-iters", "3", "-o", str(out)]
        if cuda_graph:
            cmd.append("--cuda-graph")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        report = json.loads(out.read_text())
    report["command"] = "vaeinfer " + " ".join(cmd[3:-2])
    return report


# --- report -------------------------------------------------------------------------------------

def overhead_rows(models: list[dict]) -> list[dict]:
    """vaeinfer against raw session.run at batch 1: target max(10 us, 5 %)."""
    rows = []
    for mm in models:
        for role, g in mm["graphs"].items():
            r = next((r for r in g["rows"] if r["batch"] == 1), None)
            if r is None:
                continue
            v, o = r["vaeinfer"]["p50_ms"] * 1e3, r["onnxruntime"]["p50_ms"] * 1e3
            limit = max(10.0, 0.05 * o)
            rows.append({"model": mm["name"], "graph": role, "vaeinfer_us": v, "onnxruntime_us": o,
                         "overhead_us": v - o, "overhead_pct": (v - o) / o * 100, "limit_us": limit,
                         "met": v - o <= limit})
    return rows


def targets(models: list[dict]) -> list[dict]:
    """The issue's CPU targets, each with its measured figure."""
    out = []
    for row in overhead_rows(models):
        out.append({"target": f"{row['model']} {row['graph']}: vaeinfer overhead at batch 1 <= max(10 us, 5%)",
                    "measured": f"{row['overhead_us']:+.1f} us ({row['overhead_pct']:+.1f}%), limit {row['limit_us']:.1f} us",
                    "met": row["met"]})
    for mm in models:
        dec = mm["graphs"]["decoder"]
        rows = {r["batch"]: r for r in dec["rows"]}
        if 1 in rows and "torch eager" in rows[1]:
            s = rows[1]["torch eager"]["p50_ms"] / rows[1]["vaeinfer"]["p50_ms"]
            out.append({"target": f"{mm['name']} decoder: >= 2x PyTorch eager at batch 1", "measured": f"{s:.2f}x",
                        "met": s >= 2})
        big = max(rows)
        if "torch eager" in rows[big] and mm["kind"] in ("vae", "vqvae"):
            s = rows[big]["torch eager"]["p50_ms"] / rows[big]["vaeinfer"]["p50_ms"]
            out.append({"target": f"{mm['name']} decoder: >= 1.5x PyTorch eager at batch {big}",
                        "measured": f"{s:.2f}x", "met": s >= 1.5})
        if all("torch.compile" in r for r in rows.values()):
            worst = min(r["torch.compile"]["p50_ms"] / r["vaeinfer"]["p50_ms"] for r in rows.values())
            out.append({"target": f"{mm['name']} decoder: not slower than torch.compile at any batch",
                        "measured": f"worst {worst:.2f}x (torch.compile time / vaeinfer time)", "met": worst >= 1.0})
        if "fraction_of_peak" in rows[big]["vaeinfer"]:
            f = rows[big]["vaeinfer"]["fraction_of_peak"]
            out.append({"target": f"{mm['name']} decoder at batch {big}: >= 60% of the fp32 matmul peak",
                        "measured": f"{f:.0%} ({rows[big]['vaeinfer']['gflops']:.0f} GFLOP/s)", "met": f >= 0.6})
        int8 = mm.get("variants", {}).get("int8")
        if int8:
            s = int8["speedup"].get(f"decoder@{big}")
            err = int8.get("error") or {}
            mae = (err.get("reconstruction") or {}).get("mean_abs_err")
            nll = (err.get("nll") or {}).get("diff")
            out.append({"target": f"{mm['name']} int8: >= 1.5x fp32 at batch {big} (decoder)", "measured": f"{s:.2f}x",
                        "met": s is not None and s >= 1.5})
            if mae is not None:
                out.append({"target": f"{mm['name']} int8: image mean abs error <= 0.02", "measured": f"{mae:.4f}",
                            "met": mae <= 0.02})
            if nll is not None:
                out.append({"target": f"{mm['name']} int8: test NLL within 1 nat of fp32",
                            "measured": f"{nll:+.3f} nats", "met": abs(nll) <= 1})
    return out


def title(report: dict) -> str:
    return f"vaeinfer {'GPU' if report.get('device', 'cpu') != 'cpu' else 'CPU'} benchmark"


def markdown(report: dict) -> list[str]:
    """The report's Markdown below its header (harness.report writes the header)."""
    mach, peak = report["machine"], report["peak"]
    gpu = report.get("device", "cpu") != "cpu"
    lines = [*([f"GPU: {mach.get('gpu') or 'unknown'} ({report['device']}, CUDA graphs "
                f"{'on' if report.get('cuda_graph') else 'off'})  "] if gpu else []),
             f"Threads: {report['threads']} (onnxruntime intra-op and torch)  ",
             f"fp32 matmul peak ({peak['n']}^3): {peak['peak_gflops']:.0f} GFLOP/s from {peak['peak_from']} "
             f"(" + ", ".join(f"{k} {v:.0f}" for k, v in peak.items() if k not in ('n', 'peak_gflops', 'peak_from'))
             + ")", ""]
    if report.get("note"):
        lines += [f"> {report['note']}", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    for mm in report["models"]:
        others = mm.get("other_processes") or {}
        lines += ["", f"## {mm['name']} ({mm['kind']})", "",
                  f"PyTorch weights: {mm['checkpoint'] or 'no checkpoint found (PyTorch columns omitted)'}  ",
                  f"vaeinfer's execution mode for large batches: {mm.get('execution_modes')}  ",
                  f"Other processes used {others.get('cpu_fraction', float('nan')):.1%} of the machine's CPU time "
                  f"while this model was measured ({others.get('wall_s', 0):.0f} s)", ""]
        for role, g in mm["graphs"].items():
            flops = g["flops_per_image"]
            lines += [f"### {role}" + (f" ({flops / 1e6:.1f} MFLOP per image)" if flops else ""), ""]
            names = [k for k in g["rows"][0] if k != "batch"]
            head = "| batch | " + " | ".join(f"{n} ms" for n in names) + " | vaeinfer images/s |"
            if flops:
                head += " vaeinfer % of peak |"
            lines += [head, "|" + "---|" * (head.count("|") - 1)]
            for r in g["rows"]:
                cells = [f"{r[n]['p50_ms']:.3f}" for n in names]
                line = f"| {r['batch']} | " + " | ".join(cells) + f" | {r['vaeinfer']['images_per_s']:,.0f} |"
                if flops:
                    line += f" {r['vaeinfer']['fraction_of_peak']:.0%} |"
                lines.append(line)
            lines.append("")
        if mm.get("variants"):
            lines += ["### precision variants (vaeinfer, against fp32)", "",
                      "| precision | speed-up encoder@1 | encoder@256 | decoder@1 | decoder@256 | reconstruction MAE "
                      "| test NLL diff (nats) |", "|---|---|---|---|---|---|---|"]
            for p, v in mm["variants"].items():
                err = v.get("error") or {}
                mae = (err.get("reconstruction") or {}).get("mean_abs_err")
                nll = (err.get("nll") or {}).get("diff")
                sp = v["speedup"]
                lines.append(f"| {p} | {sp.get('encoder@1', float('nan')):.2f}x | {sp.get('encoder@256', float('nan')):.2f}x"
                             f" | {sp.get('decoder@1', float('nan')):.2f}x | {sp.get('decoder@256', float('nan')):.2f}x | "
                             f"{'-' if mae is None else f'{mae:.4f}'} | {'-' if nll is None else f'{nll:+.3f}'} |")
            lines.append("")
    ov = report["overhead"]
    if ov:
        lines += ["## vaeinfer overhead over raw `session.run` (batch 1, every runtime check on)", "",
                  "| model | graph | vaeinfer us | session.run us | overhead us | overhead % | limit us |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['graph']} | {r['vaeinfer_us']:.1f} | {r['onnxruntime_us']:.1f} | "
                  f"{r['overhead_us']:+.1f} | {r['overhead_pct']:+.1f}% | {r['limit_us']:.1f} |" for r in ov]
        lines.append("")
    for b in report.get("vaeinfer_bench", []):
        lines += [f"## `{b['command']}`", "",
                  "Public API, every check on; peak MB: the process's peak resident memory (runtime alone).", "", "```",
                  vbench.format_table(b), "```", ""]
    cs = report.get("coldstart")
    if cs:
        lines += ["## Cold start and installed size", "", "| process | median s | min s |", "|---|---|---|"]
        lines += [f"| `{k}` | {v['median_s']:.3f} | {v['min_s']:.3f} |" for k, v in cs["cold_start"].items()]
        lines += ["", "| dependency closure | installed MB | largest |", "|---|---|---|"]
        for k, v in cs["installed_size"].items():
            top = ", ".join(f"{n} {s:.0f}" for n, s in list(v["distributions"].items())[:3])
            lines.append(f"| {k} | {v['total_mb']:.0f} | {top} |")
        lines.append("")
    if report.get("vq_sampling"):
        vq = report["vq_sampling"]
        lines += ["## VQ sampling (benchmarks/speed/vq_sampling.py)", "",
                  f"`sample_codes(256)` of mnist-vqvae: cached loop {vq['in_process']['cached_s']:.3f} s, reference loop "
                  f"{vq['in_process']['reference_s']:.3f} s ({vq['in_process']['speedup']:.1f}x, goal >= 8x); same code at "
                  f"{vq['same_code_fraction']:.3%} of positions (goal >= 99.9%).", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for i, mm in enumerate(models):
        for j, role in enumerate(("encoder", "decoder")):
            ax = axes[i][j]
            g = mm["graphs"][role]
            names = [k for k in g["rows"][0] if k != "batch"]
            bs = [r["batch"] for r in g["rows"]]
            for n in names:
                ax.plot(bs, [r[n]["images_per_s"] for r in g["rows"]], marker="o", label=n)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel("images / s (median latency)")
            title = f"{mm['name']} {role}"
            last = g["rows"][-1]["vaeinfer"]
            if "fraction_of_peak" in last:
                title += f": vaeinfer {last['fraction_of_peak']:.0%} of fp32 peak at {bs[-1]}"
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    mach = report["machine"]
    where = mach["cpu"] if report.get("device", "cpu") == "cpu" else f"{mach.get('gpu') or 'GPU'} ({report['device']})"
    fig.suptitle(f"{where}, {report['threads']} CPU threads, onnxruntime {mach['onnxruntime']}, "
                 f"torch {report.get('torch_version') or '-'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (onnxruntime-gpu)")
    ap.add_argument("--cuda-graph", action="store_true", help="CUDA: vaeinfer replays CUDA graphs for the batch sizes")
    ap.add_argument("--threads", type=int, default=None, help="default: all usable cores")
    ap.add_argument("--batches", type=int_list, default=list(BATCHES), help="comma-separated, e.g. 1,8,64,256")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per runner and batch")
    ap.add_argument("--models", type=name_list, default=None, help="comma-separated; default: every bundled model")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-coldstart", action="store_true")
    ap.add_argument("--quick", action="store_true", help="short timings, no cold start (a smoke run)")
    ap.add_argument("--note", default=None, help="a line to print in the report (e.g. what else ran on the machine)")
    ap.add_argument("--out", default=str(results.RESULTS))
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    batches = args.batches
    min_time = 0.2 if args.quick else args.min_time
    names = args.models or vaeinfer.available_models()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    torch_mod = None
    if not args.no_torch:
        import torch as torch_mod

        torch_mod.set_num_threads(threads)
    stem = "cpu" if parse_device(args.device).backend == "cpu" else "gpu"
    if stem == "gpu" and "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"--device {args.device}: this onnxruntime has no CUDA provider "
                 f"({ort.get_available_providers()}); install onnxruntime-gpu (and no onnxruntime)")
    log(f"peak: {PEAK_N}^3 fp32 matmul on {args.device}, {threads} threads")
    peak = matmul_peak(threads, torch_mod, device=args.device)
    report = {**results.provenance(__spec__.name, argv), "device": args.device, "cuda_graph": args.cuda_graph,
              "threads": threads, "batches": batches, "min_time_s": min_time, "note": args.note,
              "torch_version": None if torch_mod is None else torch_mod.__version__,
              "peak": peak, "models": []}
    for name in names:
        log(f"model {name}")
        before = cpu_seconds()
        report["models"].append(bench_model(name, batches, threads, min_time, not args.no_torch, peak, log,
                                            args.device, args.cuda_graph))
        report["models"][-1]["other_processes"] = others_since(before)
        log(f"  vaeinfer bench {name}")
        report.setdefault("vaeinfer_bench", []).append(
            cli_bench(name, batches, args.device, threads, min_time / 2, args.cuda_graph))
    report["overhead"] = overhead_rows(report["models"])
    if "mnist-vqvae" in names and stem == "cpu":
        log("VQ sampling: cached vs reference prior loop")
        report["vq_sampling"] = vq_sampling.measure("mnist-vqvae", 256, 1 if args.quick else 3, processes=False)
    report["targets"] = targets(report["models"])
    if not args.no_coldstart and not args.quick and stem == "cpu":
        log("cold start and installed size")
        report["coldstart"] = {"cold_start": coldstart.cold_start(threads=threads),
                               "installed_size": coldstart.installed_size()}
    results.write(stem, title(report), report, markdown(report), out)
    plot(report, out / f"{stem}.png")
    log(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'}, {out / f'{stem}.png'}")
    return report


if __name__ == "__main__":
    main()
