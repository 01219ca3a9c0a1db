"""A Triton Inference Server model repository for a bundle: each graph as an onnxruntime-backend model.

    vaeinfer triton-repo -m mnist-vae --out repo            # or write_model_repository("mnist-vae", "repo")
    docker run --rm -p8000:8000 -p8001:8001 -v $PWD/repo:/models \\
        nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models

writes, for a bundle named NAME:

    repo/NAME_encoder/config.pbtxt    platform "onnxruntime_onnx", inputs/outputs from the manifest's
    repo/NAME_encoder/1/model.onnx    graph specs, dynamic batching, an instance group
    repo/NAME_decoder/...             (and NAME_prior/ for a VQ-VAE bundle with a prior)

The model files are the bundle's own graphs, byte for byte (sha256-verified on the way). Triton
serves the graphs only: the host-side parts of the runtime stay with the client (sampling noise,
turning decoder parameters into images: sigmoid of Bernoulli logits or the clipped Gaussian mean,
the IWAE score, the prior's autoregressive sampling loop).

Numpy-free and stdlib-only: the config is text in Triton's protobuf text format, written from the
same `vaeinfer.spec.GraphSpec` data that export and the runtime use.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from vaeinfer._fs import atomic_write_bytes, atomic_write_text
from vaeinfer.bundle import open_bundle
from vaeinfer.errors import InputError
from vaeinfer.spec import GraphSpec, TensorSpec

PLATFORM = "onnxruntime_onnx"
DATA_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MODEL_FILE = "model.onnx"


def model_name(bundle_name: str, role: str) -> str:
    return f"{bundle_name}_{role}"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(t: TensorSpec, batched: bool) -> str:
    """One input/output entry. With batching, Triton's dims leave out the batch axis; a tensor that
    is only the batch axis (a VQ prior's label, shape (batch,)) is dims [1] reshaped to []."""
    dims = [int(d) for d in t.shape[1:]]
    lines = [f"    name: {_quote(t.name)}", f"    data_type: {DATA_TYPES[t.dtype]}"]
    if not batched:
        lines.append(f"    dims: [ {', '.join(['-1', *map(str, dims)])} ]")
    elif dims:
        lines.append(f"    dims: [ {', '.join(map(str, dims))} ]")
    else:
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    return "  {\n" + "\n".join(lines) + "\n  }"


def config_pbtxt(name: str, spec: GraphSpec, max_batch_size: int = 256, instances: int = 1, kind: str = "cpu",
                 preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int = 100,
                 gpus: list[int] | None = None) -> str:
    """The config.pbtxt text of one graph (see `write_model_repository` for the arguments)."""
    batched = max_batch_size > 0
    parts = [f"name: {_quote(name)}", f"platform: {_quote(PLATFORM)}", f"max_batch_size: {max_batch_size}",
             "input [\n" + ",\n".join(_tensor(t, batched) for t in spec.inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor(t, batched) for t in spec.outputs) + "\n]"]
    if batched:
        sizes = preferred_batch_sizes if preferred_batch_sizes is not None else default_preferred(max_batch_size)
        body = []
        if sizes:
            body.append(f"  preferred_batch_size: [ {', '.join(map(str, sizes))} ]")
        body.append(f"  max_queue_delay_microseconds: {max_queue_delay_us}")
        parts.append("dynamic_batching {\n" + "\n".join(body) + "\n}")
    group = [f"    count: {instances}", f"    kind: {KINDS[kind]}"]
    if gpus:
        group.append(f"    gpus: [ {', '.join(map(str, gpus))} ]")
    parts.append("instance_group [\n  {\n" + "\n".join(group) + "\n  }\n]")
    return "\n".join(parts) + "\n"


def default_preferred(max_batch_size: int) -> list[int]:
    """Half the largest batch and the largest: a full batch when traffic allows, else half of one."""
    return sorted({s for s in (max_batch_size // 2, max_batch_size) if s > 0})


def _check(max_batch_size, instances, kind, preferred, max_queue_delay_us) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(max_batch_size) or max_batch_size < 0:
        raise InputError(f"max_batch_size: expected an int >= 0 (0: no batching), got {max_batch_size!r}")
    if not is_int(instances) or instances < 1:
        raise InputError(f"instances: expected an int >= 1, got {instances!r}")
    if kind not in KINDS:
        raise InputError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    if preferred is not None and not all(is_int(s) and 0 < s <= max_batch_size for s in preferred):
        raise InputError(f"preferred_batch_sizes: expected ints in [1, max_batch_size={max_batch_size}], "
                         f"got {preferred!r}")
    if not is_int(max_queue_delay_us) or max_queue_delay_us < 0:
        raise InputError(f"max_queue_delay_us: expected an int >= 0, got {max_queue_delay_us!r}")


def write_model_repository(model: str | os.PathLike, out_dir: str | os.PathLike, *, max_batch_size: int = 256,
                           instances: int = 1, kind: str = "cpu", precision: str = "fp32", name: str | None = None,
                           preferred_batch_sizes: list[int] | None = None, max_queue_delay_us: int = 100,
                           gpus: list[int] | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write one Triton model per graph of `model` (a bundle directory or a bundled model's name).

    max_batch_size: Triton's largest batch (the graphs' batch axis is dynamic); 0 turns batching
        off, and then the dims carry the batch axis as -1.
    instances, kind, gpus: the instance group: `instances` copies of each model on CPU or GPU
        ("cpu" | "gpu"; `gpus` picks devices, default all).
    precision: which of the bundle's graph variants to serve ("fp32", or "fp16"/"int8" if it has them).
    name: the models' name prefix (default: the manifest's name): NAME_encoder, NAME_decoder, NAME_prior.
    preferred_batch_sizes, max_queue_delay_us: the dynamic batcher's settings (default: half the
        largest batch and the largest; 100 us).
    overwrite: replace model folders of these names that already exist (other models in `out_dir`
        are left alone); without it an existing one is an error.

    Each model folder is built beside its final place and renamed into it, so a Triton server
    polling the repository never sees a half-written model. Returns {role: model folder}.
    """
    _check(max_batch_size, instances, kind, preferred_batch_sizes, max_queue_delay_us)
    bundle = open_bundle(model)
    manifest = bundle.manifest
    prefix = name or manifest.name
    out = Path(out_dir)
    specs = manifest.specs()
    targets = {role: out / model_name(prefix, role) for role in specs}
    if not overwrite:
        existing = [str(p) for p in targets.values() if p.exists()]
        if existing:
            raise InputError(f"{', '.join(existing)}: already exists; pass overwrite=True (--overwrite) to replace")
    graphs = {role: bundle.read_graph(role, precision) for role in specs}  # all verified before writing any
    out.mkdir(parents=True, exist_ok=True)
    for role, spec in specs.items():
        target = targets[role]
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=out))
        try:
            atomic_write_bytes(tmp / "1" / MODEL_FILE, graphs[role])
            atomic_write_text(tmp / "config.pbtxt", config_pbtxt(
                target.name, spec, max_batch_size, instances, kind, preferred_batch_sizes, max_queue_delay_us, gpus))
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return targets


__all__ = ["write_model_repository", "config_pbtxt", "model_name"]
