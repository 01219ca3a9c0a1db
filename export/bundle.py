"""The export procedure shared by every kind: trace, check, compare, write. One graph at a time."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime
import torch

import vaeinfer
from vaeinfer.export.graphs import IR_VERSION, OPSET, set_metadata, strip_unused_initializers, trace
from vaeinfer.export.optimize import narrow_convs
from vaeinfer.export.validate import FP32_TOLERANCE, PARITY_BATCHES, Comparator, check_structure, max_abs_error, parity
from vaeinfer.export.writer import sha256, write_bundle
from vaeinfer.manifest import FORMAT, FORMAT_VERSION
from vaeinfer.spec import GraphSpec


def export_graph(module: torch.nn.Module, spec: GraphSpec, facts: dict, limits: dict | None, compare: Comparator,
                 opset: int = OPSET, spatial: dict | None = None, value_range=(0.0, 1.0)) -> tuple[bytes, dict, int]:
    """Trace, rewrite, check and compare one graph: (its bytes, parity figures, rewrites made).
    `spatial`: see export_bundle."""
    spatial = spatial or {}
    model = trace(module, spec, limits, opset, spatial.get("dims"), spatial.get("trace"), value_range)
    rewrites = narrow_convs(model)  # before validation: parity checks the rewritten graph
    strip_unused_initializers(model)
    set_metadata(model, {**facts, "role": spec.role})
    check_structure(model, spec.role)
    figures = parity(model, module, spec, compare, limits, tuple(spatial.get("batches", PARITY_BATCHES)),
                     sizes=tuple(spatial.get("sizes", (None,))), feeds=spatial.get("feeds", {}).get(spec.role))
    return model.SerializeToString(), figures, rewrites


def export_bundle(out_dir: str | Path, *, name: str, kind: str, image: tuple[int, int, int], latent: dict,
                  likelihood: dict, modules: dict[str, torch.nn.Module], specs: dict[str, GraphSpec],
                  prior: dict | None = None, training: dict | None = None, limits: dict | None = None,
                  comparators: dict[str, Comparator] | None = None, tolerance: float = FP32_TOLERANCE,
                  extra_checks: dict | None = None, value_range=(0.0, 1.0), opset: int = OPSET,
                  extra_files: dict[str, bytes] | None = None, extra_manifest: dict | None = None,
                  spatial: dict | None = None, image_extra: dict | None = None) -> Path:
    """Export `modules[role]` for each role of `specs`, validate each graph, write the bundle.

    `extra_checks[name](files) -> figures` validate the graphs together (files: name -> bytes);
    like the per-graph checks they raise ExportError to stop the export before anything is written.
    `extra_files` (name -> bytes) are written beside the graphs and `extra_manifest` merged into the
    manifest (e.g. a VAE's learned prior, see export.latent_prior).
    `spatial` (graphs with dynamic height/width): {"dims": torch.export Dims by axis name,
    "trace": the axis lengths to trace with, "sizes": the axis lengths to validate at, "batches":
    the batch sizes to validate at, "feeds": {role: feeds(batch, seed, sizes)}}. `image_extra`
    adds facts to the manifest's image slot.
    """
    spatial = spatial or {}
    batches = tuple(spatial.get("batches", PARITY_BATCHES))
    sizes = tuple(spatial.get("sizes", (None,)))
    comparators = comparators or {}
    facts = {"format_version": FORMAT_VERSION, "name": name, "kind": kind, "image": list(image),
             "latent": latent, "likelihood": likelihood}
    files, entries, figures, rewrites = {}, {}, {}, {}
    for role, spec in specs.items():
        data, figures[role], rewrites[role] = export_graph(
            modules[role], spec, facts, limits, comparators.get(role, max_abs_error(tolerance)), opset,
            spatial=spatial, value_range=value_range)
        files[f"{role}.onnx"] = data
        entries[role] = {"file": f"{role}.onnx", "sha256": sha256(data), **spec.io_json()}
    checks = {check_name: check(files) for check_name, check in (extra_checks or {}).items()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "kind": kind,
        "image": {"channels": image[0], "height": image[1], "width": image[2], "range": list(value_range),
                  **(image_extra or {})},
        "latent": latent,
        "likelihood": likelihood,
        "graphs": entries,
        "prior": prior,
        "variants": {},
        "export": {
            "opset": opset, "ir_version": IR_VERSION, "torch_version": torch.__version__,
            "onnx_version": onnx.__version__, "onnxruntime_version": onnxruntime.__version__,
            "vaeinfer_version": vaeinfer.__version__,
            "parity": {"batches": list(batches), "tolerance": tolerance, "provider": "CPUExecutionProvider",
                       **({"sizes": [dict(s) for s in sizes]} if sizes != (None,) else {}),
                       "graphs": figures, **checks},
            "rewrites": {"narrow_convs": rewrites},
        },
        "training": training,
        **(extra_manifest or {}),
    }
    return write_bundle(out_dir, manifest, {**files, **(extra_files or {})})
