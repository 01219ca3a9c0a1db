"""Every CPU path side by side, in one run, interleaved, on the same weights, with each cell's error
against fp32: is vaeinfer's auto path at least as fast as the fastest peer at equal or smaller error?

    python -m benchmarks.speed.cpu_paths --workdir bench-work   # the full table (~35 min on 2 cores)
    python -m benchmarks.speed.cpu_paths --quick --no-compile   # tiny configs and sizes: a smoke run
    python -m benchmarks.speed.cpu_paths --device cuda --workdir .gpu-work   # the same on a GPU
    options: --rows a,b (see --help for the names), --threads N (default 2), --rounds R,
             --no-compile, --workdir DIR (keep the exported bundles for the next run), --out DIR,
             --device cpu|cuda (default cpu)

- rows: Stable Diffusion's AutoencoderKL (random-init weights, benchmarks.speed.diffusers_models)
  decoder at 256x256 and 512x512 and encoder at 256x256, batch 1; TAESD's decoder at 512x512,
  batch 1 and 4; the bundled MNIST decoders (mnist-vae, mnist-vae-2d, mnist-vqvae) at batch 1
  and 256, their PyTorch modules from the training checkpoints (training/checkpoints/).
- cells (runners): vaeinfer for each CPU backend (`vaeinfer.backends.names()`) x precision
  (fp32, bf16, int8) and `precision="auto", max_error=0.01`, all through the same public call
  (`decode_params(z)`, `encode(x).mean`; a VQ-VAE's `decode(codes)`, whose image conversion the
  other cells then also do); raw onnxruntime on the bundle's fp32 graph (ORT_ENABLE_ALL);
  OpenVINO's CPU plugin on the same ONNX file at f32 and bf16 inference precision; PyTorch eager
  fp32, bf16 autocast with channels-last, and torch.compile (inductor, frozen weights) of both.
  A cell that cannot run here holds "n/a (reason)" (an API or variant not there, a missing package).
- error: mean and max |cell - reference| on the same inputs, also as a fraction of the reference's
  range (max - min), as vaeinfer's `max_error` measures them; the reference is PyTorch eager fp32
  (raw onnxruntime fp32 where there is no PyTorch module).
- timing: harness.timing.interleaved: the first call (the one the error comes from) is the warm-up,
  then `--rounds` rounds of one call per cell in rotating order; medians. torch.compile's compile
  time is reported apart.
- throughput: GFLOP per row from PyTorch's FlopCounterMode, and the fastest cell's GFLOP/s against
  the machine's torch matmul rates (2048^3, fp32 and bf16, on the same threads).
- caveat: all runtimes share one process, each with its own thread pool; on few cores a pool that
  spins after its call (inductor's OpenMP) slows the next cell's sub-millisecond calls (MNIST
  batch 1: torch eager fp32 ~1 ms with --no-compile, tens of ms with the compile cells). Compare
  small rows with a --no-compile run.
- --device cuda (`DEVICES`, the one table of what differs by device): vaeinfer for each backend of
  the registry's device family "cuda" (onnxruntime CUDA, TensorRT) x the precisions it declares
  (fp32; fp16: the bundle's fp16 variant, TensorRT building fp16 engines, cached; int8), and auto
  on device "cuda"; raw onnxruntime on the CUDA provider (vaeinfer's CUDA provider options, TF32
  off); PyTorch on the GPU: eager fp32, fp16 and bf16 autocast with channels-last, torch.compile
  fp32 and bf16; no OpenVINO cells. TF32 is off in PyTorch too (fp32 means fp32), the matmul rates
  are fp32, fp16 and bf16 at 8192^3, and the SD/TAESD bundles get an fp16 variant besides int8.
  Every cell takes a host array and returns one (the PyTorch cells' inputs are on the GPU before
  the call, their outputs are copied back and synchronized in it). It refuses to start (exit 2)
  where neither onnxruntime's CUDA provider nor torch.cuda is there; where one of them is, the
  other's cells are "n/a (reason)".
Writes DIR/cpu_paths.json and DIR/cpu_paths.md (--quick: cpu_paths-quick.*; --device cuda:
cpu_paths-cuda.* and cpu_paths-cuda-quick.*; default DIR: benchmarks/results).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.harness import report as results
from benchmarks.harness.cli import description, name_list
from benchmarks.harness.machine import cpu_seconds, others_since
from benchmarks.harness.timing import interleaved, stats

PRECISIONS = ("fp32", "bf16", "int8")  # the CPU table's vaeinfer precisions, for every CPU backend
MAX_ERROR = 0.01  # the auto path's error budget (fraction of the reference's range)
TIE = 0.03  # auto slower than the rival by at most this fraction: a tie (the same engine, timing noise)
EQUAL_ERROR = 1e-5  # relative errors this close count as equal (fp32 rounding between runtimes)
BASELINE = "vaeinfer cpu fp32"
TITLE = "CPU paths side by side: vaeinfer's backends and precisions against its peers"
PEERS = ("onnxruntime fp32", "openvino f32", "openvino bf16", "torch eager fp32", "torch bf16 channels-last",
         "torch.compile fp32", "torch.compile bf16")


@dataclass(frozen=True)
class Row:
    name: str
    group: str  # one Markdown table per group
    model: str  # "kl" / "taesd" (benchmarks.speed.diffusers_models) or a bundled model's name
    role: str  # "decoder" / "encoder"
    size: int  # image pixels (square); MNIST: 28
    batch: int
    quick_size: int | None = None  # the image size with --quick (tiny configs)


SD, TAESD, MNIST = "SD AutoencoderKL", "TAESD (AutoencoderTiny)", "MNIST (bundled models)"
ROWS = (Row("sd-dec-256", SD, "kl", "decoder", 256, 1, 32), Row("sd-dec-512", SD, "kl", "decoder", 512, 1, 64),
        Row("sd-enc-256", SD, "kl", "encoder", 256, 1, 32),
        Row("taesd-dec-512", TAESD, "taesd", "decoder", 512, 1, 64),
        Row("taesd-dec-512-b4", TAESD, "taesd", "decoder", 512, 4, 64),
        *(Row(f"{m}-b{b}", MNIST, m, "decoder", 28, b, 28) for m in ("mnist-vae", "mnist-vae-2d", "mnist-vqvae")
          for b in (1, 256)))
QUICK_ROWS = ("sd-dec-256", "taesd-dec-512", "mnist-vae-b1")


@dataclass(frozen=True)
class DeviceSpec:
    """Everything that differs between the CPU and the GPU table (one entry of `DEVICES`)."""

    name: str  # vaeinfer's device string and the registry's device family: "cpu" | "cuda"
    title: str
    stem: str  # the results files' stem (--quick appends "-quick")
    torch_device: str
    vaeinfer_precisions: tuple[str, ...] | None  # for every backend; None: each backend's declared ones
    openvino: tuple[str, ...]  # OpenVINO CPU plugin cells (inference precision hints)
    torch_low: tuple[str, ...]  # the autocast dtypes of the channels-last eager cells
    torch_compiled: tuple[str, ...]  # torch.compile cells: "fp32" and/or autocast dtypes
    matmul: tuple[str, ...]  # the dtypes of the matmul rates
    matmul_n: tuple[int, int]  # its size (full, --quick)
    variants: tuple[str, ...]  # the SD/TAESD bundles' precision variants
    rounds: tuple[int, int]  # default rounds (SD/TAESD, MNIST), without --quick
    tf32: bool = False  # PyTorch's TF32 switches for the run (on a GPU)
    export_all_cores: bool = False  # export the SD/TAESD bundles with all cores (the cells' --threads do not apply)

    @property
    def on_gpu(self) -> bool:
        return self.torch_device != "cpu"

    @property
    def baseline(self) -> str:
        return f"vaeinfer {self.name} fp32"

    def stem_for(self, quick: bool) -> str:
        return f"{self.stem}-quick" if quick else self.stem


DEVICES = {
    "cpu": DeviceSpec("cpu", TITLE, "cpu_paths", "cpu", PRECISIONS, ("f32", "bf16"), ("bf16",), ("fp32", "bf16"), ("fp32", "bf16"),
                      (2048, 256), ("int8",), (3, 20)),
    "cuda": DeviceSpec("cuda", "CUDA paths side by side: vaeinfer's GPU backends and precisions against its peers",
                       "cpu_paths-cuda", "cuda", None, (), ("fp16", "bf16"), ("fp32", "bf16"), ("fp32", "fp16", "bf16"),
                       (8192, 1024), ("int8", "fp16"), (10, 50), tf32=False, export_all_cores=True),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class NotAvailable(Exception):
    """A cell that cannot run here; its message is the reason shown in the table."""


def device_backends(device: str = "cpu") -> tuple[list[str], str]:
    """vaeinfer's backends of one device family (the registry's `device`; the family's default
    backend first: onnxruntime's "cpu" / "cuda"), and where the list came from."""
    from vaeinfer import backends

    family = [b for b in backends.REGISTRY.values() if b.device == device]
    return [b.name for b in sorted(family, key=lambda b: not b.default)], f"vaeinfer.backends.REGISTRY (device '{device}')"


def cpu_backends() -> tuple[list[str], str]:
    return device_backends("cpu")


def vaeinfer_cells(backends: list[str], device: str = "cpu") -> list[tuple[str, str, str]]:
    """(cell name, backend, precision) of the vaeinfer cells other than auto."""
    from vaeinfer.backends import REGISTRY

    spec = DEVICES[device]
    return [(f"vaeinfer {b} {p}", b, p) for b in backends
            for p in (spec.vaeinfer_precisions or (REGISTRY[b].precisions if b in REGISTRY else ("fp32",)))]


def peer_names(device: str = "cpu") -> tuple[str, ...]:
    """The non-vaeinfer cells of a device's table (on the CPU: `PEERS`)."""
    spec = DEVICES[device]
    return ("onnxruntime fp32", *(f"openvino {p}" for p in spec.openvino), "torch eager fp32",
            *(f"torch {p} channels-last" for p in spec.torch_low), *(f"torch.compile {p}" for p in spec.torch_compiled))


def runner_names(backends: list[str], device: str = "cpu") -> list[str]:
    return [*(n for n, _, _ in vaeinfer_cells(backends, device)), "vaeinfer auto", *peer_names(device)]


def unusable(device: str, torch) -> str | None:
    """Why `device` cannot be benchmarked here at all (None: it can; on "cuda", one of onnxruntime's
    CUDA provider or torch.cuda is enough, the other's cells are then n/a)."""
    if device == "cpu":
        return None
    from vaeinfer import backends

    family = [b for b in backends.REGISTRY.values() if b.device == device]
    if any(b.is_available() for b in family):
        return None
    why = torch_unready(device, torch)
    if why is None:
        return None
    import onnxruntime as ort

    return (f"--device {device}: no CUDA here: onnxruntime {ort.__version__} has none of "
            f"{', '.join(b.title for b in family)} (its providers: {', '.join(ort.get_available_providers())}) and {why}; "
            "run it where onnxruntime-gpu and a CUDA build of torch see a GPU (benchmarks/gpu.sh)")


def torch_unready(device: str, torch) -> str | None:
    """Why PyTorch cannot run on `device` here, or None."""
    if torch is None:
        return "no torch"
    if device == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA device (torch.cuda.is_available() is False)"
    return None


def setup_torch(torch, spec: DeviceSpec) -> None:
    """The run's PyTorch switches: on a CUDA device TF32 as the table says (off: fp32 cells are fp32)."""
    if spec.on_gpu and torch is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = spec.tf32
        torch.backends.cudnn.allow_tf32 = spec.tf32


# --- the machine's matmul rates -----------------------------------------------------------------

def matmul_rates(torch, threads: int, n: int = 2048, reps: int = 5, device: str = "cpu",
                 dtypes=("fp32", "bf16")) -> dict:
    """GFLOP/s of an n x n x n torch matmul in each of `dtypes` on `device` (best of `reps`, after
    one warm-up; on a GPU synchronized, TF32 as `setup_torch` left it)."""
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {"n": n, "threads": threads, "library": f"torch {torch.__version__}"}
    if device.startswith("cuda"):
        out.update(device=torch.cuda.get_device_name(), tf32=torch.backends.cuda.matmul.allow_tf32)
    for label in dtypes:
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(n, n, generator=g, device=device).to(getattr(torch, DTYPES[label])) for _ in range(2))
        a @ b
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t)
        out[f"{label}_gflops"] = 2.0 * n ** 3 / best / 1e9
        del a, b
    return out


DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # torch dtype names


def rate_labels(rates: dict) -> list[str]:
    """The dtypes a rates dict holds ("fp32", "bf16", ...), in its order."""
    return [k.removesuffix("_gflops") for k in rates if k.endswith("_gflops")]


# --- errors -------------------------------------------------------------------------------------

def error(out: np.ndarray, ref: np.ndarray) -> dict:
    """Mean and max |out - ref|, and both as a fraction of the reference's range (as vaeinfer's
    precision="auto" measures them: max_error bounds the mean, 10 x max_error the max)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise NotAvailable(f"output shape {out.shape}, reference {ref.shape}")
    diff = np.abs(out - ref)
    span = float(ref.max() - ref.min()) or 1.0
    return {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()), "rel_mean": float(diff.mean()) / span,
            "rel_max": float(diff.max()) / span, "reference_range": span}


# --- one row's model and inputs -----------------------------------------------------------------

@dataclass
class Subject:
    """What every cell of a row runs: the bundle (path), the graph file, the input, the PyTorch module
    (or None), how a graph's raw output becomes the compared output (`post`), and the vaeinfer call."""

    bundle: Path
    graph: Path
    x: np.ndarray
    module: object | None
    module_note: str
    post: Callable[[np.ndarray], np.ndarray]
    torch_post: Callable | None
    call: Callable[[object, np.ndarray], np.ndarray]


def _spatial_subject(row: Row, built: dict, size: int) -> Subject:
    from vaeinfer.export.diffusers import _Decoder, _KLEncoder, _LatentsEncoder
    from vaeinfer.export.spatial_vae import smooth_images

    import vaeinfer

    m = vaeinfer.load(built["bundle"], device="cpu")
    rng = np.random.default_rng(row.batch)
    if row.role == "decoder":
        f = m.downsample
        z = rng.standard_normal((row.batch, m.latent_channels, size // f, size // f)).astype(np.float32)
        return Subject(Path(built["bundle"]), Path(built["bundle"]) / "decoder.onnx",
                       z / np.float32(m.scaling_factor), _Decoder(built["module"]).eval(), "diffusers module",
                       post=lambda o: o, torch_post=None, call=lambda v, x: v.decode_params(x))
    x = smooth_images(row.batch, 3, size, size, seed=3)
    kl = row.model == "kl"
    enc = (_KLEncoder if kl else _LatentsEncoder)(built["module"]).eval()
    return Subject(Path(built["bundle"]), Path(built["bundle"]) / "encoder.onnx", x, enc, "diffusers module",
                   post=lambda o: o, torch_post=(lambda o: o[0]) if kl else None, call=lambda v, x: v.encode(x).mean)


def _mnist_subject(row: Row, use_torch: bool) -> Subject:
    import vaeinfer
    from vaeinfer import likelihood as lik
    from vaeinfer.bench import graph_inputs

    m = vaeinfer.load(row.model, device="cpu")
    bundle = Path(m.info.path)
    x = graph_inputs(m, row.role, row.batch, seed=0)[0]
    module, note = None, "n/a (--no-torch)"
    if use_torch:
        from benchmarks.speed.peers import torch_model

        module, source = torch_model(row.model, m.manifest.raw)
        note = source or "n/a (no training checkpoint)"
        module = getattr(module, row.role) if module is not None else None
    if row.role == "encoder":
        return Subject(bundle, bundle / "encoder.onnx", x, module, note, lambda o: o, lambda o: o[0] if isinstance(o, tuple) else o,
                       lambda v, x: v.encode(x).mean)
    if m.info.kind != "vqvae":
        return Subject(bundle, bundle / "decoder.onnx", x, module, note, lambda o: o, None,
                       lambda v, x: v.decode_params(x))
    # a VQ-VAE has no decode_params: vaeinfer's decode(codes) gives images, so every other cell converts too
    likelihood, value_range = m.manifest.likelihood, m.manifest.value_range

    def torch_post(p):
        import torch

        return torch.sigmoid(p) if likelihood["kind"] == "bernoulli" else p.clamp(*value_range)

    return Subject(bundle, bundle / "decoder.onnx", x, module, note, lambda o: lik.mean(o, likelihood, value_range),
                   torch_post, lambda v, x: v.decode(x))


# --- the cells ----------------------------------------------------------------------------------

def vaeinfer_cell(subject: Subject, threads: int, backend: str | None, precision: str,
                  device: str = "cpu") -> tuple[Callable, dict]:
    import vaeinfer
    from vaeinfer.errors import VaeinferError

    kwargs = {"device": device, "precision": precision, "threads": threads}
    if precision == "auto":
        kwargs["max_error"] = MAX_ERROR
    else:
        kwargs["backend"] = backend
    info = {}
    try:
        model = vaeinfer.load(subject.bundle, **kwargs)
    except (VaeinferError, ValueError) as e:
        raise NotAvailable(f"vaeinfer.load: {e}") from None
    info.update({"precision": model.info.precision, "providers": list(model.info.providers),
                 "backend": getattr(model.info, "backend", None)})
    if precision == "auto":
        auto = getattr(model.info, "auto", None)
        info["auto"] = dataclasses.asdict(auto) if dataclasses.is_dataclass(auto) else auto
    x = subject.x
    return (lambda: subject.call(model, x)), info


def ort_providers(device: str) -> list:
    """Raw onnxruntime's providers on `device`: the CPU provider, or vaeinfer's CUDA provider options
    (heuristic cuDNN algorithm search, TF32 off) then the CPU for what CUDA does not take."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    from vaeinfer.backends import onnxruntime_cuda

    return [(onnxruntime_cuda.PROVIDER, onnxruntime_cuda.provider_options(0)), "CPUExecutionProvider"]


def ort_cell(subject: Subject, threads: int, device: str = "cpu") -> tuple[Callable, dict]:
    import onnxruntime as ort

    providers = ort_providers(device)
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    if first not in ort.get_available_providers():
        raise NotAvailable(f"onnxruntime {ort.__version__} has no {first} ({', '.join(ort.get_available_providers())})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(subject.graph), opts, providers=providers)
    if sess.get_providers()[0] != first:  # onnxruntime falls back silently when a provider fails to start
        raise NotAvailable(f"onnxruntime bound {sess.get_providers()}, not {first}")
    feed = {sess.get_inputs()[0].name: subject.x}
    info = {"onnxruntime": ort.__version__, "providers": sess.get_providers()}
    return (lambda: subject.post(sess.run(None, feed)[0])), info


def openvino_cell(subject: Subject, threads: int, precision: str) -> tuple[Callable, dict]:
    try:
        import openvino as ov
    except ImportError as e:
        raise NotAvailable(f"no openvino ({e})") from None
    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if precision == "bf16" and "BF16" not in caps:
        raise NotAvailable(f"the CPU plugin lists no BF16 ({', '.join(caps)})")
    compiled = core.compile_model(str(subject.graph), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                              "INFERENCE_NUM_THREADS": threads,
                                                              "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    port, x = compiled.output(0), subject.x
    return (lambda: subject.post(request.infer([x])[port])), {"openvino": ov.__version__,
                                                              "capabilities": list(caps)}


def autocast_channels_last(module, dtype: str = "bf16", device: str = "cpu"):
    """A copy of `module` in channels-last memory that runs under `dtype` autocast on `device`'s
    type (outputs back to fp32)."""
    import torch

    kind, low = torch.device(device).type, getattr(torch, DTYPES[dtype])

    class AutocastChannelsLast(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = copy.deepcopy(inner).to(memory_format=torch.channels_last)

        def forward(self, x):
            if x.dim() == 4 and x.is_floating_point():
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(kind, dtype=low):
                out = self.inner(x)
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    return AutocastChannelsLast(module).eval()


def bf16_channels_last(module):
    """A copy of `module` in channels-last memory that runs under bf16 autocast (outputs back to fp32)."""
    return autocast_channels_last(module, "bf16", "cpu")


def torch_cells(subject: Subject, compile_: bool, device: str = "cpu") -> dict:
    """name -> (fn, info) or NotAvailable, for the device's PyTorch cells (compile time in info)."""
    spec = DEVICES[device]
    names = [k for k in peer_names(device) if k.startswith("torch")]
    if subject.module is None:
        return {k: NotAvailable(f"no PyTorch module: {subject.module_note}") for k in names}
    import torch

    why = torch_unready(device, torch)
    if why is not None:
        return {k: NotAvailable(why) for k in names}
    from benchmarks.speed.peers import TorchRunner

    def numpy_of(fn):  # host out: the copy back (a no-op on the CPU) is in the timed call
        return lambda: fn().float().cpu().numpy()

    info = {"torch": torch.__version__}
    if spec.on_gpu:
        info.update(device=torch.cuda.get_device_name(), tf32=torch.backends.cuda.matmul.allow_tf32)
    out = {}
    for label in ("fp32", *spec.torch_low):
        eager_name = "torch eager fp32" if label == "fp32" else f"torch {label} channels-last"
        compiled = label in spec.torch_compiled
        try:
            module = subject.module if label == "fp32" else autocast_channels_last(subject.module, label, spec.torch_device)
            runner = TorchRunner(torch, module, subject.torch_post, device=spec.torch_device)
            out[eager_name] = (numpy_of(runner.eager(subject.x)), dict(info))
        except Exception as e:  # noqa: BLE001 - a cell that fails is reported, not fatal
            out[eager_name] = NotAvailable(f"{type(e).__name__}: {e}")
            if compiled:
                out[f"torch.compile {label}"] = NotAvailable("eager failed")
            continue
        if not compiled:
            continue
        if not compile_:
            out[f"torch.compile {label}"] = NotAvailable("--no-compile")
            continue
        try:
            log(f"    torch.compile {label}")
            # a copy of its own: inductor's frozen weights never touch the eager cell's module
            runner = TorchRunner(torch, copy.deepcopy(module), subject.torch_post, device=spec.torch_device)
            fn = runner.compile(subject.x)
            out[f"torch.compile {label}"] = (numpy_of(fn), {"compile_s": runner.compile_s[len(subject.x)]})
        except Exception as e:  # noqa: BLE001
            out[f"torch.compile {label}"] = NotAvailable(f"{type(e).__name__}: {str(e)[:300]}")
    return out


def make_cells(subject: Subject, names: list[str], backends: list[str], threads: int, compile_: bool,
               device: str = "cpu") -> dict:
    """Every runner of `names` (see `runner_names`): (fn, info), or NotAvailable."""
    cells: dict = {}

    def attempt(name, make):
        try:
            cells[name] = make()
        except NotAvailable as e:
            cells[name] = e
        except Exception as e:  # noqa: BLE001 - a runtime that cannot take this graph is a finding, not a crash
            cells[name] = NotAvailable(f"{type(e).__name__}: {str(e).strip()[:300]}")
        if isinstance(cells[name], NotAvailable):
            log(f"    {name}: n/a ({cells[name]})")

    for name, b, p in vaeinfer_cells(backends, device):
        attempt(name, lambda b=b, p=p: vaeinfer_cell(subject, threads, b, p, device))
    attempt("vaeinfer auto", lambda: vaeinfer_cell(subject, threads, None, "auto", device))
    attempt("onnxruntime fp32", lambda: ort_cell(subject, threads, device))
    for p in DEVICES[device].openvino:
        attempt(f"openvino {p}", lambda p=p: openvino_cell(subject, threads, p))
    for name, cell in torch_cells(subject, compile_, device).items():
        cells[name] = cell
        if isinstance(cell, NotAvailable):
            log(f"    {name}: n/a ({cell})")
    return {n: cells[n] for n in names}


# --- one row ------------------------------------------------------------------------------------

def flops_of(subject: Subject) -> float | None:
    """FLOPs of the whole batch (FlopCounterMode on the PyTorch module), or None without one."""
    if subject.module is None:
        return None
    import torch

    from benchmarks.speed.peers import flops_per_image

    where = next((p.device for p in subject.module.parameters()), torch.device("cpu"))  # a GPU run moved it
    return flops_per_image(subject.module, torch.from_numpy(subject.x[:1]).to(where)) * len(subject.x)


def bench_row(row: Row, size: int, subject: Subject, names: list[str], backends: list[str], threads: int, rounds: int,
              compile_: bool, rates: dict, device: str = "cpu") -> dict:
    cells = make_cells(subject, names, backends, threads, compile_, device)
    out = {"row": row.name, "group": row.group, "model": row.model, "role": row.role, "batch": row.batch,
           "image": f"{size}x{size}", "rounds": rounds,
           "torch_module": subject.module_note, "cells": {}}
    # the first call of each cell: its output (the error) and its warm-up
    ref_name = "torch eager fp32" if not isinstance(cells.get("torch eager fp32"), NotAvailable) else "onnxruntime fp32"
    outputs, runnable = {}, {}
    for name, cell in cells.items():
        if isinstance(cell, NotAvailable):
            continue
        try:
            outputs[name] = np.array(cell[0](), dtype=np.float32)
            runnable[name] = cell[0]
        except Exception as e:  # noqa: BLE001
            cells[name] = NotAvailable(f"first call: {type(e).__name__}: {str(e).strip()[:300]}")
            log(f"    {name}: n/a ({cells[name]})")
    if ref_name not in outputs:
        raise RuntimeError(f"{row.name}: no fp32 reference ({ref_name}: {cells.get(ref_name)})")
    ref = outputs[ref_name]
    out["reference"] = ref_name
    log(f"  {row.name}: timing {len(runnable)} cells, {rounds} rounds")
    timings = interleaved(runnable, rounds, calls=1, warmup=0)
    flops = flops_of(subject)
    out["gflop"] = None if flops is None else flops / 1e9
    for name, cell in cells.items():
        if isinstance(cell, NotAvailable):
            out["cells"][name] = {"na": str(cell)}
            continue
        s = stats(timings.seconds(name), row.batch)
        try:
            s["error"] = error(outputs[name], ref)
        except NotAvailable as e:
            out["cells"][name] = {"na": str(e)}
            continue
        s["info"] = cell[1]
        if flops is not None:
            s["gflops"] = flops / (s["p50_ms"] / 1e3) / 1e9
        out["cells"][name] = s
    summarize(out, rates, DEVICES[device].baseline)
    return out


def _ms(cell: dict) -> float:
    return cell["p50_ms"]


def summarize(row: dict, rates: dict, baseline: str = BASELINE) -> None:
    """The row's verdict: fastest cell (GFLOP/s against the matmul rates), fastest peer (every cell
    not vaeinfer's), the auto path's choice, and whether auto is at least as fast as the fastest peer
    at equal or smaller error. `baseline`: the cell the speed ratios divide (vaeinfer's fp32 cell)."""
    timed = {k: v for k, v in row["cells"].items() if "p50_ms" in v}
    base = timed.get(baseline)
    for v in timed.values():
        v["vs_vaeinfer_fp32"] = base["p50_ms"] / v["p50_ms"] if base else None
    fastest = min(timed, key=lambda k: _ms(timed[k]))
    row["fastest"] = {"cell": fastest, "p50_ms": _ms(timed[fastest])}
    if row["gflop"] is not None:
        g = row["gflop"] / (_ms(timed[fastest]) / 1e3)
        row["fastest"]["gflops"] = g
        row["fastest"].update({f"of_{label}_matmul": g / rates[f"{label}_gflops"] for label in rate_labels(rates)})
    peers = {k: v for k, v in timed.items() if not k.startswith("vaeinfer ")}
    row["fastest_peer"] = None
    if peers:
        p = min(peers, key=lambda k: _ms(peers[k]))
        row["fastest_peer"] = {"cell": p, "p50_ms": _ms(peers[p]), "rel_max": peers[p]["error"]["rel_max"]}
    auto = timed.get("vaeinfer auto")
    if auto is None:
        row["auto"] = {"na": row["cells"]["vaeinfer auto"].get("na", "not timed")}
        row["verdict"] = {"met": None, "why": "no auto path"}
        return
    row["auto"] = {"p50_ms": _ms(auto), "rel_max": auto["error"]["rel_max"], "choice": auto["info"].get("auto"),
                   "precision": auto["info"].get("precision"), "backend": auto["info"].get("backend")}
    rival = {k: v for k, v in peers.items() if v["error"]["rel_max"] <= auto["error"]["rel_max"] + EQUAL_ERROR}
    if not rival:
        row["verdict"] = {"met": True, "why": "no peer reaches the auto path's error"}
        return
    best = min(rival, key=lambda k: _ms(rival[k]))
    met = _ms(auto) <= _ms(rival[best])
    tie = not met and _ms(auto) <= _ms(rival[best]) * (1 + TIE)
    row["verdict"] = {"met": met, "tie": tie, "rival": best, "rival_ms": _ms(rival[best]),
                      "speedup": _ms(rival[best]) / _ms(auto),
                      "why": f"auto {_ms(auto):.4g} ms vs {best} {_ms(rival[best]):.4g} ms "
                             f"(the fastest peer with error <= auto's {auto['error']['rel_max']:.2g})"}


# --- report -------------------------------------------------------------------------------------

def fmt_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def fmt_cell(cell: dict) -> str:
    if "na" in cell:
        reason = cell["na"] if len(cell["na"]) <= 70 else cell["na"][:67] + "..."
        return f"n/a ({reason.replace('|', '/')})"
    vs = f" ({cell['vs_vaeinfer_fp32']:.3g}x)" if cell.get("vs_vaeinfer_fp32") else ""
    return f"{fmt_ms(cell['p50_ms'])} ms{vs} {cell['error']['rel_mean']:.1e} / {cell['error']['rel_max']:.1e}"


def markdown(report: dict) -> list[str]:
    rates = report["matmul"]
    spec = DEVICES[report.get("device", "cpu")]
    tf32 = {False: " (TF32 off)", True: " (TF32 on)"}.get(rates.get("tf32"), "")
    mm = ", ".join(f"{g}{tf32 if g == 'fp32' else ''} {rates[f'{g}_gflops']:.0f} GFLOP/s" for g in rate_labels(rates))
    lines = [*([f"GPU: {rates['device']}; every cell takes and returns host arrays  "] if rates.get("device") else []),
             (f"Threads: {report['threads']}; interleaved rounds of one call per cell after a warm-up call, medians "
             f"({', '.join(f'{g}: {r}' for g, r in report['rounds'].items())})  "),
             f"torch matmul {rates['n']}^3: {mm}  ",
             (f"vaeinfer backends: {', '.join(report['backends'])} ({report['backends_from']}); auto: "
             f"`precision=\"auto\", max_error={MAX_ERROR}`  "),
             (f"Other processes used {report['other_processes']['cpu_fraction']:.0%} of the machine's CPU time during "
             f"the run (load average at start {report['load_at_start']})"), "",
             (f"Cell: median ms (speed relative to `{spec.baseline}`, >1 is faster), then the mean / max abs error "
             "against the fp32 reference as fractions of the reference's range (auto's budget: mean <= max_error, "
             "max <= 10 x max_error). The verdict compares errors by the max."), ""]
    groups: dict[str, list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault(r["group"], []).append(r)
    for group, rows in groups.items():
        lines += [f"## {group}", "", "| runner | " + " | ".join(f"{r['row']} ({r['role']} {r['image']}, batch {r['batch']})"
                                                                for r in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        for name in report["runners"]:
            lines.append(f"| {name} | " + " | ".join(fmt_cell(r["cells"][name]) for r in rows) + " |")
        lines.append("")
        for r in rows:
            lines += footer(r)
        lines.append("")
    missing = [n for n in report.get("rows_requested", []) if n not in {r["row"] for r in report["rows"]}]
    if missing:
        lines += [("Rows asked for but not in this table (not run yet when the run stopped, or not runnable here): "
                   f"{', '.join(missing)}"), ""]
    compiles = [f"{r['row']} {k}: {v['info']['compile_s']:.0f} s" for r in report["rows"] for k, v in r["cells"].items()
                if "compile_s" in (v.get("info") or {})]
    if compiles:
        lines += ["torch.compile time (first call, not in the medians): " + "; ".join(compiles), ""]
    return lines


def footer(r: dict) -> list[str]:
    f = r["fastest"]
    of = " / ".join(f"{v:.0%} of the {k[3:-7]}" for k, v in f.items() if k.startswith("of_") and k.endswith("_matmul"))
    speed = (f"; {r['gflop']:.3g} GFLOP, {f['gflops']:.0f} GFLOP/s = {of} matmul rate" if r["gflop"] is not None
             else "; GFLOP n/a")
    peer = r["fastest_peer"]
    peer_s = f"{peer['cell']} {fmt_ms(peer['p50_ms'])} ms (error {peer['rel_max']:.1e})" if peer else "none"
    auto = r["auto"]
    if "na" in auto:
        auto_s = f"n/a ({auto['na'][:120]})"
    else:
        auto_s = (f"{fmt_ms(auto['p50_ms'])} ms, error {auto['rel_max']:.1e}, chose "
                  f"{auto.get('backend') or '?'} {auto.get('precision')} ({auto.get('choice')})")
    v = r["verdict"]
    verdict = "n/a" if v["met"] is None else ("**yes**" if v["met"] else
                                              f"**tie** (within {TIE:.0%})" if v.get("tie") else "**no**")
    return [(f"- **{r['row']}**: fastest {f['cell']} {fmt_ms(f['p50_ms'])} ms{speed}; fastest peer {peer_s}; "
            f"auto {auto_s}; auto at least as fast as the fastest peer at equal or smaller error: {verdict} ({v['why']})")]


# --- main ---------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--rows", type=name_list, default=None,
                    help=f"comma-separated subset of: {', '.join(r.name for r in ROWS)} (--quick default: {', '.join(QUICK_ROWS)})")
    ap.add_argument("--quick", action="store_true", help="tiny configs and sizes, three rows (a smoke run)")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile cells")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None, help="default: 3 for SD/TAESD, 20 for MNIST")
    ap.add_argument("--workdir", default=None, help="keep the exported SD/TAESD bundles here and reuse them")
    ap.add_argument("--out", default=str(results.RESULTS))
    ap.add_argument("--device", choices=sorted(DEVICES), default="cpu",
                    help="cpu (default), or cuda: vaeinfer's CUDA backends against onnxruntime CUDA and PyTorch on the "
                         "GPU, written to cpu_paths-cuda.*")
    args = ap.parse_args(argv)
    known = {r.name: r for r in ROWS}
    wanted = args.rows or (list(QUICK_ROWS) if args.quick else list(known))
    unknown = [n for n in wanted if n not in known]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; known: {', '.join(known)}")
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1):
        ap.error("--threads and --rounds must be positive")
    rows = [known[n] for n in wanted]
    spec = DEVICES[args.device]
    try:
        import torch
    except ImportError:
        torch = None
    why = unusable(spec.name, torch)
    if why:
        ap.error(why)
    from benchmarks.speed.diffusers_models import build

    threads = args.threads
    load = os.getloadavg()
    before = cpu_seconds()
    backends, backends_from = device_backends(spec.name)
    names = runner_names(backends, spec.name)
    full_rounds = (1, 3) if args.quick else spec.rounds
    rounds = {"SD/TAESD": args.rounds or full_rounds[0], "MNIST": args.rounds or full_rounds[1]}
    if torch is not None:
        torch.set_num_threads(threads)
        setup_torch(torch, spec)
    if torch is not None and torch_unready(spec.name, torch) is None:
        log(f"torch matmul rates on {spec.torch_device}, {threads} threads")
        rates = matmul_rates(torch, threads, n=spec.matmul_n[1] if args.quick else spec.matmul_n[0],
                             device=spec.torch_device, dtypes=spec.matmul)
    else:
        rates = {"n": 0, **{f"{g}_gflops": float("nan") for g in spec.matmul},
                 "library": torch_unready(spec.name, torch)}
    report = {**results.provenance(__spec__.name, argv), "device": spec.name, "threads": threads, "quick": args.quick,
              "backends": backends, "backends_from": backends_from, "runners": names, "rounds": rounds,
              "rows_requested": [r.name for r in rows], "max_error": MAX_ERROR, "matmul": rates, "load_at_start": [round(v, 2) for v in load], "rows": [],
              "exports": {}}
    if rates.get("device") and not report["machine"].get("gpu"):
        report["machine"]["gpu"] = rates["device"]  # no nvidia-smi: torch's name of the GPU
    stem = spec.stem_for(args.quick)

    def write():
        report["other_processes"] = others_since(before)
        results.write(stem, spec.title, report, markdown(report), args.out)

    with tempfile.TemporaryDirectory(prefix="vaeinfer-cpu-paths-") as tmp:
        workdir = Path(args.workdir or tmp)
        built: dict = {}
        for row in rows:
            log(f"row {row.name}")
            size = row.quick_size if args.quick else row.size
            if row.model in ("kl", "taesd"):
                if torch is None:
                    log("  skipped: the diffusers rows need torch and diffusers")
                    continue
                if row.model not in built:
                    torch.set_num_threads((os.cpu_count() or threads) if spec.export_all_cores else threads)
                    built[row.model] = build(row.model, args.quick, workdir, precisions=spec.variants)
                    torch.set_num_threads(threads)
                    report["exports"][row.model] = {"export_s": built[row.model]["export_s"],
                                                    "reused": built[row.model]["reused"],
                                                    "config": built[row.model]["config"]}
                subject = _spatial_subject(row, built[row.model], size)
                r = rounds["SD/TAESD"]
            else:
                subject = _mnist_subject(row, torch is not None)
                r = rounds["MNIST"]
            report["rows"].append(bench_row(row, size, subject, names, backends, threads, r, not args.no_compile, rates,
                                            spec.name))
            del subject
            if torch is not None and not args.no_compile:
                torch._dynamo.reset()  # compiled graphs hold their frozen weights
            gc.collect()  # the row's sessions and their arenas go before the next row's
            if torch is not None and spec.on_gpu and torch.cuda.is_available():
                torch.cuda.empty_cache()
            write()  # partial results survive an interrupted run
    if not report["rows"]:
        write()
    return report


if __name__ == "__main__":
    main()
