"""Validation, part of every export: a graph that fails it is never written.

1. `onnx.checker.check_model(full_check=True)` (shape inference included);
2. no Random* op (sampling noise is the host's job, so seeds mean the same everywhere);
3. onnxruntime's outputs against PyTorch's at several batch sizes, within a stated tolerance.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from vaeinfer.export.graphs import ExportError, example_inputs
from vaeinfer.spec import GraphSpec

PARITY_BATCHES = (1, 2, 37)
FP32_TOLERANCE = 1e-4  # max abs error of any float output, fp32
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}

# compare(name, torch_out, ort_out, inputs) -> dict of figures; raises ExportError when out of tolerance
Comparator = Callable[[str, np.ndarray, np.ndarray, list], dict]


def check_structure(model: onnx.ModelProto, role: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{role}: onnx.checker rejects the graph: {e}") from e
    ops = {n.op_type for n in model.graph.node}
    if ops & RANDOM_OPS:
        raise ExportError(f"{role}: the graph contains {sorted(ops & RANDOM_OPS)}; sampling noise must come "
                          "from the host (pass it as an input), never from a Random* op")
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(f"{role}: initializers {external[:5]} use external data; a bundle graph must be self-contained")


def max_abs_error(tolerance: float) -> Comparator:
    def compare(name, expected, actual, _inputs):
        if expected.dtype.kind in "iu":
            mismatch = float(np.mean(expected != actual))
            if mismatch:
                raise ExportError(f"output {name}: {mismatch:.2%} of integer values differ from PyTorch")
            return {"mismatch": 0.0}
        err = float(np.max(np.abs(expected.astype(np.float64) - actual))) if expected.size else 0.0
        if not err <= tolerance:
            raise ExportError(f"output {name}: max abs error {err:.3g} against PyTorch exceeds the tolerance {tolerance:g}")
        return {"max_abs_err": err}
    return compare


def parity(model: onnx.ModelProto, module: torch.nn.Module, spec: GraphSpec, compare: Comparator,
           limits: dict | None = None, batches=PARITY_BATCHES, seed: int = 0, sizes=(None,),
           feeds: Callable | None = None) -> dict:
    """Run the graph in onnxruntime (CPU) and the module in PyTorch on the same seeded inputs, at
    each batch size and each entry of `sizes` (lengths of the symbolic spatial axes, or None).

    `feeds(batch, seed, sizes) -> inputs` replaces `example_inputs` where a kind needs its own.
    Returns per-output figures, the worst over all batch sizes and sizes.
    """
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]
    make = feeds or (lambda batch, s, size: example_inputs(spec, batch, s, limits, size))
    worst: dict[str, dict] = {}
    for size in sizes:
        for batch in batches:
            inputs = make(batch, seed + batch, size)
            with torch.no_grad():
                expected = module.eval()(*[torch.from_numpy(a) for a in inputs])
            expected = expected if isinstance(expected, (tuple, list)) else (expected,)
            actual = session.run(names, {t.name: a for t, a in zip(spec.inputs, inputs)})
            for name, e, a in zip(names, expected, actual):
                e = e.detach().cpu().numpy()
                if e.shape != a.shape:
                    raise ExportError(f"{spec.role} output {name}: onnxruntime shape {a.shape}, PyTorch {e.shape} "
                                      f"at batch {batch}" + (f", sizes {size}" if size else ""))
                for key, value in compare(name, e, a, inputs).items():
                    slot = worst.setdefault(name, {})
                    slot[key] = max(slot.get(key, value), value)
    return {name: {k: float(v) for k, v in figures.items()} for name, figures in worst.items()}
