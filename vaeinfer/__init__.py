"""vaeinfer: run exported VAE / VQ-VAE bundles with onnxruntime, on CUDA or CPU.

    import vaeinfer
    vae = vaeinfer.load("mnist-vae")          # a bundled model's name, or a bundle directory
    images = vae.sample(16, seed=0)           # (16, C, H, W) float32 in the image range

This package imports numpy, onnxruntime, click and pillow only; never torch or onnx.
"""

from __future__ import annotations

import os

from vaeinfer.bundle import available_models, open_bundle
from vaeinfer.errors import BackendError, BundleError, InputError, OutputError, VaeinferError
from vaeinfer.results import Codes, ModelInfo, Posterior, Score

__version__ = "0.1.0"
DEFAULT_MODEL = "mnist-vae"

__all__ = ["load", "available_models", "DEFAULT_MODEL", "Posterior", "Codes", "Score", "ModelInfo",
           "VaeinferError", "BundleError", "InputError", "OutputError", "BackendError", "__version__"]


def load(model: str | os.PathLike = DEFAULT_MODEL, device: str = "auto", threads: int | None = None,
         precision: str = "fp32", verify: bool = True, cuda_graph=False, io_binding: bool | None = None,
         isolate: bool = False, backend: str | None = None, max_error: float | None = None, roles=None):
    """Load a bundle: the name of a bundled model (see `available_models()`) or a bundle directory.

    device: "auto" (CUDA when a session really binds it, else CPU; `info.device` says which),
        "cpu", "cuda" or "cuda:N" (an error, never a silent fallback, when CUDA cannot run).
    threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
    precision: "fp32", a variant the bundle carries (see `info.precisions`; the known ones:
        vaeinfer.precisions.names()), "bf16" (the fp32 graphs in bf16 arithmetic, by a backend
        that has it: OpenVINO on CPUs with AMX or AVX-512 BF16), or "auto": per graph and batch
        size, the fastest path (backend x precision) whose measured error against fp32 is within
        `max_error`, measured on this machine at the first load and cached (see
        `vaeinfer.auto_precision`; `info.auto` says what was chosen and why).
    max_error: precision="auto"'s budget: the mean absolute difference from the fp32 output as a
        fraction of the output's range (default 0.01 = 1%; 0 keeps fp32-exact paths only).
    verify: check every graph's sha256 against the manifest. Turn off only for a bundle you
        already trust on a hot path (e.g. reloading the bundled models in a worker).
    cuda_graph: on CUDA, replay captured CUDA graphs for fixed batch buckets: True (batch sizes
        1, 2, 4, ..., 256) or your own sizes; calls are padded up to the next bucket and larger
        ones run in chunks of the largest. A graph that cannot be captured runs without;
        `info.cuda_graph` lists the buckets in use. Needs device "cuda" (ignored by "auto" on CPU).
    io_binding: run through onnxruntime's IO binding (default: on CUDA yes, on CPU no, where
        plain `run` has less per-call overhead); `model.run_graph(role, feeds, keep_on_device=True)`
        always does, and leaves the outputs on the device.
    backend: what runs the graphs on that device (`vaeinfer.backends.names()`: "cpu", "cuda",
        "tensorrt", ...); default: the device's own ("auto": CUDA if it binds, else CPU).
        `info.backend` says which ran; a named backend that cannot run raises BackendError.
    isolate: for a bundle you do not trust, first open it in a child process (every session
        created, one tiny batch run); if onnxruntime crashes there, or runs past
        `vaeinfer._probe.TIMEOUT` (120 s), BundleError here instead of a dead or hung app. Costs
        one process start and one extra session creation per graph.
    roles: the graphs to load, by role ("decoder", "encoder", "prior"; `info.roles` lists what
        was loaded): None (the default) loads every graph of the bundle; ("decoder",) makes a
        decode-only model, ("encoder",) an encode-only one, in the memory of those graphs alone.
        A role brings the graphs that run with it (a video VAE's decoder its first-step graph, a
        VQ-VAE's prior its cached sampling graphs). Every graph file is still read and checked
        (sha256, scan) here, loaded or not, so a bad bundle fails at load whatever the roles; a
        call that needs a graph left out raises ValueError saying how to load it. Graphs are
        never loaded later: what runs is what was checked at load, whatever happens on disk.
    Returns the runtime class of the bundle's kind (`vaeinfer.kinds`): `vaeinfer.vae.VAE`,
    `vaeinfer.vqvae.VQVAE`, ...; all are safe to share between threads.
    """
    bundle = open_bundle(model)
    if isolate:
        from vaeinfer import _probe, precisions
        from vaeinfer.backends import parse_device

        device = parse_device(device, backend)  # a bad device string is the caller's error, not the bundle's
        # the probe and this process run the same bytes; "auto" may run any stored precision's graphs
        probed = (precisions.REFERENCE, *(p for p in bundle.manifest.variants if precisions.get(p).stored)) \
            if precision == "auto" else (precision,)
        for p in probed:
            bundle = bundle.pin(p, verify)
            _probe.probe(bundle, p, device)
    from vaeinfer import kinds

    cls = kinds.get(bundle.manifest.kind).runtime_class()
    return cls(bundle, device, threads, precision, verify, cuda_graph=cuda_graph, io_binding=io_binding,
               backend=backend, max_error=max_error, roles=roles)
