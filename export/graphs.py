"""PyTorch module -> one self-contained ONNX graph, shaped by its `GraphSpec`."""

from __future__ import annotations

import json
import logging
import warnings

import onnx
import torch
from torch.export import Dim

from vaeinfer.spec import BATCH, GraphSpec, TensorSpec, example_inputs  # noqa: F401  (export.validate, export.vqvae use it from here)

OPSET = 18
# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13 (and the oldest
# onnxruntime we support, 1.20, reads 10). Opset 18 needs IR >= 8.
IR_VERSION = 10
TRACE_BATCH = 2  # the dynamo exporter specialises a batch of 1; trace with 2


class ExportError(RuntimeError):
    """An export that could not be made, or that failed its validation."""


def _quiet_exporter() -> None:
    # torch logs a failed trace (with tracebacks) before raising; the ExportError made from the
    # exception says the same, so that a bad module costs one line on the CLI, not a screenful
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export",
                 "torch._subclasses.fake_tensor"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class _Prefixed(torch.nn.Module):
    """Holds the module under `module.`, so its weights are named `module.*` in the graph and never
    collide with the spec's input/output names (a user buffer called `logvar` would otherwise give
    a graph that is not in SSA form)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def trace(module: torch.nn.Module, spec: GraphSpec, limits: dict | None = None, opset: int = OPSET,
          dims: dict | None = None, sizes: dict | None = None, value_range=(0.0, 1.0)) -> onnx.ModelProto:
    """Export `module` with the spec's input/output names and a dynamic batch axis; weights embedded.

    Symbolic axes other than the batch (a spatial VAE's height and width) are dynamic too:
    `dims[name]` is the torch.export Dim (or derived Dim, e.g. 8 * Dim("latent_height")) of each
    one the inputs use, `sizes[name]` its length in the traced example. The graph's inputs and
    outputs are then named by the spec's axis names, whatever the exporter called them."""
    _quiet_exporter()
    module = _Prefixed(module.eval()).eval()
    args = tuple(torch.from_numpy(a) for a in example_inputs(spec, TRACE_BATCH, 0, limits, sizes, value_range))
    axes = {BATCH: Dim(BATCH), **(dims or {})}
    dynamic = tuple({i: axes[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)
    try:
        with warnings.catch_warnings():
            # torch's own deprecation inside its exporter; nothing the caller can act on
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs], dynamic_shapes=(dynamic,),  # *args
                external_data=False, opset_version=opset, optimize=True, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; say which graph failed and why
        raise ExportError(f"{spec.role}: torch.onnx.export failed: {type(e).__name__}: {str(e)[:1000]}") from e
    model = program.model_proto
    model.ir_version = min(model.ir_version, IR_VERSION)
    _name_axes(model, spec)
    _check_io(model, spec)
    return model


def _name_axes(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give each dynamic axis of the graph's inputs/outputs the spec's name (the exporter writes
    its own symbols there, such as `8*latent_height` or `s38`)."""
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        for v, t in zip(values, tensors):
            dims = v.type.tensor_type.shape.dim
            if len(dims) != len(t.shape):
                continue  # _check_io says what is wrong
            for d, want in zip(dims, t.shape):
                if isinstance(want, str) and not d.HasField("dim_value"):
                    d.dim_param = want


def _check_io(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """The traced graph's names, dtypes and shapes are the spec's, with the symbolic axes dynamic."""
    dtypes = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}

    def describe(values):
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = [d.dim_param or None if not d.HasField("dim_value") else d.dim_value for d in tt.shape.dim]
            out.append((v.name, tt.elem_type, dims))
        return out

    def expected(tensors: tuple[TensorSpec, ...]):
        return [(t.name, dtypes[t.dtype], [None, *t.shape[1:]]) for t in tensors]

    for side, got, want in (("inputs", model.graph.input, spec.inputs), ("outputs", model.graph.output, spec.outputs)):
        actual = [(n, e, [None, *dims[1:]] if dims else dims) for n, e, dims in describe(got)]
        if actual != expected(want) or any(isinstance(dims[0], int) for _, _, dims in describe(got) if dims):
            raise ExportError(f"{spec.role}: the traced graph's {side} are {actual}, the spec wants {expected(want)} "
                              "(does the module return what the documented interface says?)")


def set_metadata(model: onnx.ModelProto, facts: dict) -> None:
    """The manifest's key facts, also in the graph's own metadata_props (values as JSON)."""
    del model.metadata_props[:]
    for key, value in facts.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"vaeinfer.{key}", json.dumps(value, sort_keys=True)


def unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Initializers that no node (nor subgraph node) reads and that are no graph output:
    onnxruntime warns about each one ("Removing initializer ...") when it opens the graph."""
    used = {o.name for o in model.graph.output}

    def visit(graph):
        for node in graph.node:
            used.update(node.input)
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    visit(g)

    visit(model.graph)
    return [t.name for t in model.graph.initializer if t.name not in used]


def strip_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove, in place, the initializers that nothing uses; returns how many. Values kept are untouched."""
    unused = set(unused_initializers(model))
    if unused:
        kept = [t for t in model.graph.initializer if t.name not in unused]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inputs = [i for i in model.graph.input if i.name not in unused]  # IR < 4 lists initializers as inputs
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return len(unused)
