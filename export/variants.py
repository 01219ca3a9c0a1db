"""Precision variants of a bundle's graphs, written into the bundle's manifest `variants` slot.

    from vaeinfer.export.variants import add_variants
    add_variants("bundles/mnist-vae", ["fp16", "int8"], calibration=train_images, evaluation=test_images)

- fp16: onnxconverter-common's float16 conversion with fp32 inputs/outputs (keep_io_types), for
  GPUs; on a CPU it is rarely faster (the manifest records what it measured).
- int8: onnxruntime.quantization static QDQ (uint8 activations, int8 per-channel weights),
  calibrated on *training* images (encoder) and on encoder posterior samples / codes of those
  images (decoder, prior); never on the evaluation data. Activation ranges are the 99.99th
  percentile of what calibration saw (on the bundled VAE this halved the NLL error of MinMax
  ranges, which a few outlying activations stretch). Fast on CPUs with AVX-512 VNNI / AVX-VNNI.

Nodes that feed an ArgMin/ArgMax (VQ codebook distances and the vectors they compare) stay in
fp32 in both variants: their precision decides the codes. Output layers are converted too by
default (keep_outputs=True keeps them fp32: more accurate logits, a slower int8 decoder).

Each variant is validated before it is written: a non-finite output on the evaluation data fails
the export; the errors against fp32 (raw outputs, images, reconstructions, test NLL) and the
speed-up per graph at batch 256 (through the runtime, on CPU) are recorded in the manifest beside its files.
The bundle is re-written atomically (all files or none, see `export.writer.write_bundle`).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from vaeinfer.export.graphs import IR_VERSION, ExportError
from vaeinfer.export.writer import sha256, write_bundle
from vaeinfer import precisions as precision_table
from vaeinfer.bundle import open_bundle

SPEED_BATCH = 256
# ops that only move or reshape data: walking back from an output through them reaches the
# node that computes it
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Transpose",
                 "Concat", "Gather", "Cast", "Shape", "Expand", "Pad", "Crop"}
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# a variant whose reconstructions differ from fp32's by more than this (mean abs, in the image
# range) is refused: the quantization went wrong somewhere
DEFAULT_MAX_IMAGE_MAE = 0.05


# --- making the graphs ------------------------------------------------------------------------

def keep_fp32_nodes(model: onnx.ModelProto, outputs: bool = True) -> list[str]:
    """Names of the compute nodes that stay fp32: the nearest ones upstream of each graph output
    (through data-movement ops only; when `outputs`), and the nearest ones upstream of each
    ArgMin/ArgMax (through any non-compute op: the codebook distances and the vectors they compare)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    keep = set()

    def nearest(tensors, through):
        stack, seen = list(tensors), set()
        while stack:
            node = producer.get(stack.pop())
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in _COMPUTE:
                keep.add(node.name)
            elif through(node):
                stack.extend(i for i in node.input if i)

    if outputs:
        nearest([o.name for o in model.graph.output], lambda n: n.op_type in _PASS_THROUGH)
    for node in model.graph.node:
        if node.op_type in ("ArgMin", "ArgMax"):
            nearest(list(node.input), lambda n: True)
    return sorted(keep)


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique name (the quantizer and the fp16 block list address nodes by name)."""
    used = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in used:
            node.name = f"{node.op_type}_{i}"
        used.add(node.name)
    return model


def _finish(model: onnx.ModelProto, precision: str) -> bytes:
    model.ir_version = min(model.ir_version, IR_VERSION)
    # the tools import domains they do not use (ai.onnx.ml); the runtime refuses unknown domains
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    entry = next((p for p in model.metadata_props if p.key == "vaeinfer.precision"), None)
    if entry is None:
        entry = model.metadata_props.add()
        entry.key = "vaeinfer.precision"
    entry.value = json.dumps(precision)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the {precision} graph fails onnx.checker: {e}") from e
    return model.SerializeToString()


FP16_MAX = 65504.0
# an fp32 intermediate above this magnitude stays fp32 in the fp16 variant: fp16 tops out at
# 65504, and the converted node's own arithmetic (a GroupNorm's sum of squares, an attention
# softmax's logits) needs headroom above the values it writes
FP16_SAFE = FP16_MAX / 16
FP16_MAX_ROUNDS = 8  # rounds of "block the first non-finite nodes, convert again" before refusing


def _with_intermediates(model: onnx.ModelProto, dtypes: set[int]) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """A copy of `model` whose every node output of a float type in `dtypes` is also a graph
    output; returns it and the (tensor, node name) pairs in graph order."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output,
                                                              *inferred.graph.input)}
    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    tensors = []
    for node in probe.graph.node:
        for out in node.output:
            if out and types.get(out) in dtypes:
                tensors.append((out, node.name))
                if out not in present:
                    probe.graph.output.append(onnx.helper.make_tensor_value_info(out, types[out], None))
                    present.add(out)
    return probe, tensors


def _node_ranges(model: onnx.ModelProto, feeds: list[dict], dtypes: set[int]) -> dict[str, float]:
    """The largest |value| (inf/nan as inf) each node writes, over `feeds`."""
    probe, tensors = _with_intermediates(model, dtypes)
    session = _session(probe.SerializeToString())
    names = [t for t, _ in tensors]
    worst: dict[str, float] = {}
    for feed in feeds:
        outs = session.run(names, feed)
        for (_, node), value in zip(tensors, outs):
            v = np.asarray(value, np.float32)
            m = float(np.max(np.abs(v))) if v.size and np.isfinite(v).all() else (float("inf") if v.size else 0.0)
            worst[node] = max(worst.get(node, 0.0), m)
    return worst


def fp16_overflow_nodes(model: onnx.ModelProto, feeds: list[dict], limit: float = FP16_SAFE) -> dict[str, float]:
    """Nodes of an fp32 graph that write values above `limit` in magnitude on `feeds`: name -> max |value|."""
    ranges = _node_ranges(model, feeds, {onnx.TensorProto.FLOAT})
    return {node: m for node, m in ranges.items() if m > limit}


def make_fp16(data: bytes, feeds: list[dict] | None = None, report: dict | None = None) -> bytes:
    """fp16 weights and arithmetic, fp32 inputs/outputs; codebook-distance nodes stay fp32.

    With `feeds` (real-looking inputs: the overflow of SD-family decoders shows on those, not on
    noise), fp16 is made safe: the nodes whose fp32 outputs exceed FP16_SAFE stay fp32, then the
    fp16 graph runs on the feeds and, while any output is non-finite, the first nodes that write
    non-finite values (their inputs all finite) stay fp32 too; after FP16_MAX_ROUNDS rounds,
    ExportError names them. `report`, if given, receives what was kept in fp32 and why.

    The fp32 ranges decide, not an fp16 run on this machine: onnxruntime's CPU provider runs the
    fp16 operators it has no kernel for in fp32 (its InsertCastTransformer), so a pure fp16 graph
    that overflows on a GPU can look finite on a CPU. The second check catches the rest.
    """
    from onnxconverter_common import float16

    model = _named(onnx.load_from_string(data))
    # fp16 keeps the output layers in fp16 too (a block-listed node that writes a graph output
    # makes the converter emit an fp16 output despite keep_io_types; fp16's 11 bits of mantissa
    # are ample for logits); only the codebook distances stay fp32
    keep = set(keep_fp32_nodes(model, outputs=False))
    overflow = fp16_overflow_nodes(model, feeds) if feeds else {}
    keep |= set(overflow)
    # nodes that make fp32 values from no float input keep their fp32 output: the converter
    # retypes their tensor to fp16 but not the node (a Cast's `to`: the index arithmetic behind a
    # 3-D nearest upsample; a ConstantOfShape's default fp32 zeros: a video cache's zero frames),
    # which onnxruntime refuses; block-listed, they get a Cast to fp16 after them instead
    makers = {n.name for n in model.graph.node if n.op_type == "ConstantOfShape" or n.op_type == "Cast"
              and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)}
    found: list[str] = []
    for _ in range(FP16_MAX_ROUNDS + 1):
        half = float16.convert_float_to_float16(_outputs_apart(model), keep_io_types=True,
                                                node_block_list=sorted(keep | makers) or None)
        if not feeds:
            break
        bad = _first_non_finite(half, feeds)
        if not bad:
            break
        if set(bad) <= keep:
            raise ExportError(f"the fp16 graph stays non-finite with nodes {sorted(bad)[:10]} kept in fp32")
        found += sorted(set(bad) - keep)
        keep |= set(bad)
    else:
        raise ExportError(f"fp16: after {FP16_MAX_ROUNDS} rounds the graph still overflows; nodes that overflow: "
                          f"{sorted(overflow)[:20] + found[:20]}; use the fp32 graph (or int8)")
    want = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    got = {v.name: v.type.tensor_type.elem_type for v in (*half.graph.input, *half.graph.output)}
    if got != want:
        raise ExportError(f"the fp16 conversion changed the graph's input/output types: {got}, expected {want}")
    if report is not None:
        ops = {n.name: n.op_type for n in model.graph.node}
        report.update({"overflow_threshold": FP16_SAFE,
                       "fp32_overflow": {n: {"op": ops.get(n), "max_abs": m} for n, m in sorted(overflow.items())},
                       "non_finite_in_fp16": [{"node": n, "op": ops.get(n)} for n in found],
                       "fp32_nodes": len(keep)})
    return _finish(half, "fp16")


def _outputs_apart(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which each graph output comes out of an Identity of its value, so that
    the converter's keep_io_types cast to fp32 serves the output alone. Without it, an output
    that the graph also reads (a video step's cache, concatenated with the next input) leaves
    its fp16 consumers reading the fp32 cast, and an output written by a block-listed node (a
    cache of zero frames, a layer kept in fp32) comes out typed fp16."""
    model = copy.deepcopy(model)
    outputs = {o.name for o in model.graph.output}
    for node in list(model.graph.node):
        for i, out in enumerate(node.output):
            if out in outputs:
                node.output[i] = f"{out}__value"
                for other in model.graph.node:
                    other.input[:] = [node.output[i] if v == out else v for v in other.input]
                model.graph.node.append(onnx.helper.make_node("Identity", [node.output[i]], [out],
                                                              name=f"{out}__apart"))
    return model


def _first_non_finite(half: onnx.ModelProto, feeds: list[dict]) -> list[str]:
    """Nodes of an fp16 graph that write NaN/Inf on `feeds` while none of their inputs has any
    (where the overflow starts); empty when every output is finite."""
    session = _session(half.SerializeToString())
    outs = [o.name for o in half.graph.output]
    if all(np.isfinite(v).all() for f in feeds for v in session.run(outs, f)):
        return []
    probe, tensors = _with_intermediates(half, {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16})
    session = _session(probe.SerializeToString())
    names = [t for t, _ in tensors]
    bad_tensors = set()
    for f in feeds:
        for t, v in zip(names, session.run(names, f)):
            if not np.isfinite(np.asarray(v, np.float32)).all():
                bad_tensors.add(t)
    return sorted({n.name for n in half.graph.node
                   if any(o in bad_tensors for o in n.output) and not any(i in bad_tensors for i in n.input)})


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def make_int8(data: bytes, calibration: list[dict], keep_outputs: bool = False, method: str = "Percentile",
              percentile: float = 99.99) -> bytes:
    """Static QDQ int8 (uint8 activations, int8 symmetric per-channel weights), calibrated on
    `calibration` (a list of feeds) with `method` (Percentile: activation ranges clipped at the
    `percentile`-th percentile of what calibration saw; MinMax; Entropy). Codebook-distance nodes
    stay fp32; output layers too with keep_outputs=True (slower: the fp32 layer's input must be
    dequantized, and on CPU a 1-channel fp32 convolution is inefficient)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="vaeinfer-int8-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(_named(onnx.load_from_string(data)).SerializeToString())
        try:  # shape inference + constant folding first, as onnxruntime recommends; optional
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            model_in = pre
        except Exception:  # noqa: BLE001 (a graph it cannot pre-process is quantized as it is)
            model_in = src
        model = _named(onnx.load(str(model_in)))
        onnx.save(model, str(model_in))
        exclude = keep_fp32_nodes(model, outputs=keep_outputs)
        try:
            quantize_static(str(model_in), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            calibrate_method=getattr(CalibrationMethod, method), nodes_to_exclude=exclude,
                            op_types_to_quantize=sorted(_COMPUTE),
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "CalibPercentile": percentile})
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"int8 quantization failed: {type(e).__name__}: {e}") from e
        return _finish(onnx.load(str(out)), "int8")


# --- inputs for calibration, evaluation and timing --------------------------------------------

def _session(data: bytes, threads: int | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def graph_feeds(manifest, sessions: dict, images: np.ndarray, labels: np.ndarray | None, seed: int) -> dict:
    """Each graph's inputs derived from real images: the images themselves (encoder); posterior
    samples z = mean + std * eps (VAE decoder) or the codes (VQ decoder, prior) that the fp32
    encoder gives them; labels for a class-conditional prior (random ones if none are known)."""
    rng = np.random.default_rng(seed)
    x = np.ascontiguousarray(images, np.float32)
    feeds = {"encoder": {"x": x}}
    enc = sessions["encoder"].run(None, {"x": x})
    from vaeinfer import kinds

    feeds.update(kinds.get(manifest.kind).feeds_from_encoder(manifest, enc, labels, rng))
    return feeds


def _chunks(feeds: dict, size: int) -> list[dict]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def _time(graph, feeds: dict, repeats: int) -> float:
    """Median seconds of `graph.run(feeds)` (a vaeinfer.runtime.Graph)."""
    graph.run(feeds)
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        graph.run(feeds)
        best.append(time.perf_counter() - t0)
    return float(np.median(best))


def speedups(bundle_dir: Path, precision: str, feeds: dict, batch: int = SPEED_BATCH, repeats: int = 10,
             threads: int | None = None) -> dict:
    """fp32 time / variant time per graph at `batch` rows, as the runtime runs them on CPU (its
    execution mode chosen first, see vaeinfer.runtime), in interleaved blocks of calls."""
    import vaeinfer
    from vaeinfer.runtime import MODE_TRIAL_CALLS

    models = {p: vaeinfer.load(bundle_dir, device="cpu", threads=threads, precision=p) for p in ("fp32", precision)}
    out = {}
    # a stored variant's own graphs; a computed precision runs every graph that has variants
    roles = models[precision].manifest.variants[precision] or [
        role for role, spec in models[precision].manifest.specs().items() if spec.variants]
    for role in roles:
        f = {k: _tile(v, batch) for k, v in feeds[role].items()}
        graphs = {p: m.graph(role) for p, m in models.items()}
        for g in graphs.values():
            for _ in range(MODE_TRIAL_CALLS + 1):  # warm up, and let the runtime choose its mode
                g.run(f)
        times = {p: [] for p in graphs}
        for _ in range(3):  # interleave, so that a slow moment of the machine hits both
            for p, g in graphs.items():
                times[p].append(_time(g, f, repeats))
        a, b = min(times["fp32"]), min(times[precision])
        out[role] = {"fp32_ms": a * 1e3, "variant_ms": b * 1e3, "speedup": a / b,
                     "modes": {p: g.mode for p, g in graphs.items()}}
    return out


def _tile(a: np.ndarray, rows: int) -> np.ndarray:
    reps = -(-rows // len(a))
    return np.ascontiguousarray(np.concatenate([a] * reps)[:rows])


# --- validation -------------------------------------------------------------------------------

def abs_errors(a: np.ndarray, b: np.ndarray) -> dict:
    """|a - b|: its max and mean (float64), the measure of a variant against fp32."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"max_abs_err": float(d.max()), "mean_abs_err": float(d.mean())}


def evaluate(bundle_dir: Path, precision: str, images: np.ndarray, labels: np.ndarray | None,
             nll_images: int, nll_samples: int, seed: int = 0) -> dict:
    """Errors of a written variant against fp32 through the runtime itself, on `images` (the
    kind's data: clips for a video kind), by the kind's exporter's `variant_errors`.

    Raises ExportError on any non-finite output (the runtime refuses them as OutputError), and
    when this machine cannot run the variant (bf16 needs OpenVINO on a CPU with BF16).
    """
    import vaeinfer
    from vaeinfer.errors import BackendError, OutputError
    from vaeinfer.export import EXPORTERS

    ref = vaeinfer.load(bundle_dir, device="cpu")
    try:
        var = vaeinfer.load(bundle_dir, device="cpu", precision=precision)
    except BackendError as e:  # bf16 without OpenVINO or a CPU that has it: nothing to validate, no entry
        raise ExportError(f"the {precision} variant cannot be validated on this machine: {e}") from e
    x = np.ascontiguousarray(images, np.float32)
    try:
        errors = EXPORTERS[ref.info.kind].variant_errors(ref, var, x, labels, nll_images, nll_samples, seed)
    except OutputError as e:
        raise ExportError(f"the {precision} variant produced non-finite values on the evaluation data: {e}") from e
    return errors


# --- the bundle -------------------------------------------------------------------------------

def _bundle_files(bundle) -> dict[str, bytes]:
    """Every file the manifest names (graphs of fp32 and variants, a learned prior), verified."""
    from vaeinfer.export.latent_prior import bundle_files

    m = bundle.manifest
    files = bundle_files(bundle)
    for precision in ("fp32", *m.variants):
        for role, entry in m.files(precision).items():
            if entry.file not in files:
                files[entry.file] = bundle.read_graph(role, precision)
    return files


def add_variants(bundle_dir: str | Path, precisions, calibration: np.ndarray, evaluation: np.ndarray | None = None, *,
                 calibration_labels: np.ndarray | None = None, evaluation_labels: np.ndarray | None = None,
                 out_dir: str | Path | None = None, source: dict | None = None, max_calibration: int = 512,
                 calibration_batch: int = 64, nll_images: int = 1000, nll_samples: int = 100,
                 max_image_mae: float = DEFAULT_MAX_IMAGE_MAE, speed_batch: int = SPEED_BATCH,
                 threads: int | None = None, seed: int = 0, keep_outputs: bool = False,
                 method: str = "Percentile", percentile: float = 99.99, progress=None) -> Path:
    """Make, validate and add precision variants to a bundle (in place, or into `out_dir`).

    calibration: training images (N, C, H, W) float32 in the image range (int8 calibrates on
        at most `max_calibration` of them); for a video kind, clips (N, C, T, H, W). evaluation:
        held-out images / clips (the test set) for the errors and the NLL; default: the
        calibration data beyond `max_calibration`, else it. A variant whose reconstructions
        differ from fp32's by more than `max_image_mae` (mean abs) is refused (ExportError).
    progress(message), if given, is told what is happening.
    """
    say = progress or (lambda _msg: None)
    for p in precisions:
        if p not in CONVERTERS:
            raise ExportError(f"precision must be one of {tuple(CONVERTERS)}, got {p!r}")
    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    # a graph whose spec says so (a VQ prior's cached graphs) stays fp32 in every variant
    fp32 = {role: bundle.read_graph(role) for role, spec in m.specs().items() if spec.variants}
    sessions = {role: _session(data) for role, data in fp32.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(calibration))
    calib_idx = np.sort(order[:max_calibration])
    calib = np.ascontiguousarray(calibration[calib_idx], np.float32)
    calib_labels = None if calibration_labels is None else np.asarray(calibration_labels)[calib_idx]
    if evaluation is None:
        rest = np.sort(order[max_calibration:])
        evaluation = calibration[rest] if len(rest) else calib
        evaluation_labels = None if calibration_labels is None else np.asarray(calibration_labels)[rest] \
            if len(rest) else calib_labels
    from vaeinfer.export import EXPORTERS

    # each graph's inputs as the calibration data drive them (a kind's own hook: a video VAE's
    # step graphs are fed by stepping through whole clips)
    feeds = (EXPORTERS[m.kind].variant_feeds or graph_feeds)(m, sessions, calib, calib_labels, seed)
    files = _bundle_files(bundle)
    manifest = copy.deepcopy(m.raw)
    manifest.setdefault("variants", {})
    made = {}
    settings = {"keep_outputs": keep_outputs, "method": method, "percentile": percentile}
    for precision in dict.fromkeys(precisions):
        say(f"{precision}: converting {', '.join(fp32)}")
        convert, row = CONVERTERS[precision], precision_table.get(precision, variant=True)
        if not row.stored:  # computed (bf16): the fp32 graphs run in its arithmetic; validated below
            made[precision] = {}
            manifest["variants"][precision] = {"computed_from": row.computed_from}
            continue
        graphs = {}
        reports = {role: {} for role in fp32}
        for role, data in fp32.items():
            # converted with the calibration images' own feeds (real-looking inputs): int8's ranges, fp16's safety
            graphs[role] = convert.make(data, _chunks(feeds[role], calibration_batch), reports[role], **settings)
        made[precision] = graphs
        for role, data in graphs.items():
            files[row.variant_file(role)] = data
        manifest["variants"][precision] = {
            "graphs": {role: {"file": row.variant_file(role), "sha256": sha256(data)}
                       for role, data in graphs.items()}}
        if convert.report:
            manifest["variants"][precision][convert.report] = reports
    # a first write to a scratch copy, so that the runtime itself can evaluate the variants
    with tempfile.TemporaryDirectory(prefix="vaeinfer-variants-") as tmp:
        scratch = write_bundle(Path(tmp) / "bundle", manifest, files)
        for precision, graphs in made.items():
            say(f"{precision}: validating against fp32 on {len(evaluation)} held-out {_what(evaluation)}")
            errors = evaluate(scratch, precision, evaluation, evaluation_labels, min(nll_images, len(evaluation)),
                              nll_samples, seed)
            mae = errors["reconstruction"]["mean_abs_err"]
            if not mae <= max_image_mae:
                raise ExportError(f"the {precision} variant's reconstructions differ from fp32's by {mae:.4f} "
                                  f"(mean abs), more than the {max_image_mae} allowed")
            say(f"{precision}: timing fp32 against {precision} at batch {speed_batch}")
            speed = speedups(scratch, precision, feeds, speed_batch, threads=threads)
            entry = manifest["variants"][precision]
            entry.update({
                "method": CONVERTERS[precision].method(**settings),
                "calibration": None if not precision_table.get(precision).calibrated else {
                    **(source or {}), **_count(calib), "split": "train", "seed": seed},
                "error": {"evaluated_on": {**(source or {}), **_count(evaluation), "split": "held out"}, **errors},
                "speedup": {"batch": speed_batch, **_runs_on(scratch, precision), "threads": threads,
                            "measured": "vaeinfer runtime, median of interleaved calls",
                            "onnxruntime_version": ort.__version__, "graphs": speed},
            })
    say(f"writing {out_dir or bundle_dir}")
    return write_bundle(out_dir or bundle.path, manifest, files)


def _what(data: np.ndarray) -> str:
    return "clips" if data.ndim == 5 else "images"


def _count(data: np.ndarray) -> dict:
    """How much data: {"images": n}, or {"clips": n, "frames": T} for clips (N, C, T, H, W)."""
    return {"clips": len(data), "frames": int(data.shape[2])} if data.ndim == 5 else {"images": len(data)}


def _runs_on(bundle_dir: Path, precision: str) -> dict:
    """What runs `precision` on this machine's CPU: the backend, its providers and its engine's version."""
    import vaeinfer

    info = vaeinfer.load(bundle_dir, device="cpu", precision=precision).info
    return {"backend": info.backend, "provider": info.providers[0]}


@dataclass(frozen=True)
class Converter:
    """How one variant precision (a row of vaeinfer.precisions) is made from an fp32 graph.

    make(fp32 graph bytes, feeds of the calibration images (a list of dicts), report (a dict to
    fill, per graph), keep_outputs=, method=, percentile=) -> the variant graph's bytes.
    method(keep_outputs=, method=, percentile=) -> the manifest's `method` entry.
    report: the manifest key the per-graph reports go under (None: the converter reports nothing).
    """

    make: Callable[..., bytes]
    method: Callable[..., dict]
    report: str | None = None


def _fp16_method(**_settings) -> dict:
    return {"tool": "onnxconverter_common.float16.convert_float_to_float16", "keep_io_types": True,
            "fp32_nodes": "codebook distances (VQ), and the nodes that overflow fp16 on the calibration "
                          "images (fp32 values above fp16_safety.overflow_threshold, or NaN/Inf in fp16)"}


def _int8_method(keep_outputs: bool, method: str, percentile: float) -> dict:
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activations": "uint8 asymmetric",
            "weights": "int8 symmetric per-channel", "calibration": method,
            **({"percentile": percentile} if method == "Percentile" else {}),
            "fp32_nodes": "codebook distances (VQ)" + (" and output layers" if keep_outputs else "")}


# one converter per variant row of vaeinfer.precisions (tests/test_precisions.py checks they agree)
CONVERTERS: dict[str, Converter] = {
    "fp16": Converter(lambda data, feeds, report, **_: make_fp16(data, feeds, report), _fp16_method,
                      report="fp16_safety"),
    "int8": Converter(lambda data, feeds, report, keep_outputs, method, percentile:
                      make_int8(data, feeds, keep_outputs, method, percentile), _int8_method),
    # computed from the fp32 graphs by the backend (no graph made): what the backend does is the method
    "bf16": Converter(lambda *_, **__: None, lambda **_: {
        "tool": "the backend's bf16 inference precision on the fp32 graphs (OpenVINO INFERENCE_PRECISION_HINT bf16)"}),
}


# --- from a training run ----------------------------------------------------------------------

def run_data(meta: dict) -> tuple:
    """(train images, train labels, held-out images, held-out labels, description) of the run
    that made a checkpoint: its own data, train/validation split and binarization. Held out
    is the dataset's test split when it has one (an MNIST-style folder with t10k-* files),
    else the run's validation split."""
    from vaeinfer.training.data import load_data, split

    cfg = meta["config"]
    kwargs = {"image_size": cfg.get("image_size"), "channels": cfg.get("channels")}
    data = load_data(cfg["data"], **kwargs)
    train, val = split(data, cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
    held, held_name = val, "validation split"
    folder = Path(cfg["data"])
    tests = sorted(folder.glob("t10k-images-idx3-ubyte*")) if folder.is_dir() else []
    if tests:
        held, held_name = load_data(tests[0], **kwargs), f"test split ({tests[0].name})"
    x_held = held.images
    if cfg.get("binarize") == "dynamic":  # the likelihood was fitted to binary images
        from vaeinfer.training.evaluate import binarize

        x_held = binarize(x_held, seed=cfg.get("seed", 0))
    desc = {"data": cfg["data"], "held_out": held_name, "binarized": cfg.get("binarize") == "dynamic"}
    return train.images, train.labels, x_held, held.labels, desc


def add_variants_from_run(bundle_dir: str | Path, run: str | Path, precisions, **kwargs) -> Path:
    """add_variants with the calibration and evaluation data of the run that made the bundle."""
    from vaeinfer.training import checkpoint as ckpt

    _, meta = ckpt.load(run)
    x_train, y_train, x_held, y_held, desc = run_data(meta)
    return add_variants(bundle_dir, precisions, x_train, x_held, calibration_labels=y_train,
                        evaluation_labels=y_held, source=desc, **kwargs)
