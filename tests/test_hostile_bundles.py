"""Hostile bundles: what the protobuf scan refuses before onnxruntime sees a graph (operators
outside the allowlist, external data, local functions, training graphs, malformed bytes), graphs
that lie about their outputs, non-finite outputs, and the CLI's one-line errors for all of them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import vaeinfer
from vaeinfer import BundleError, OutputError, onnx_scan

SEEDS = Path(__file__).parent / "data" / "fuzz-seeds"


def _resign(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["graphs"].values():
        entry["sha256"] = hashlib.sha256((bundle / entry["file"]).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _edit(bundle: Path, role: str, change) -> None:
    """Apply change(model) to a graph and re-sign the manifest, as an attacker would."""
    path = bundle / f"{role}.onnx"
    model = onnx.load_from_string(path.read_bytes())
    change(model)
    path.write_bytes(model.SerializeToString())
    _resign(bundle)


def _to_etc_passwd(model) -> None:
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    onnx.external_data_helper.set_external_data(weight, location="../../etc/passwd", offset=0, length=16)
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL


# ---- the allowlist covers what this project exports --------------------------------------------------


def _graphs():
    bundled = [Path(vaeinfer.__file__).parent / "models" / name for name in vaeinfer.available_models()]
    for folder in [*bundled, SEEDS / "vae", SEEDS / "vq"]:
        for path in sorted(folder.glob("*.onnx")):
            yield path


@pytest.mark.parametrize("path", list(_graphs()), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_exported_graphs_pass_the_scan(path):
    data = path.read_bytes()
    scan = onnx_scan.scan(data, str(path))
    model = onnx.load_from_string(data)
    assert scan.ops == {(n.domain, n.op_type) for n in model.graph.node}
    assert scan.nodes == len(model.graph.node) and scan.opset_domains == {o.domain for o in model.opset_import}


def test_scan_is_cheap():
    data = [p.read_bytes() for p in _graphs()]
    start = time.perf_counter()
    for d in data:
        onnx_scan.scan(d)
    assert time.perf_counter() - start < 0.2


# ---- refused before onnxruntime ------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("isolate", [False, True])
def test_external_data_leaving_the_bundle_refused(bundle_copy, verify, isolate, monkeypatch):
    from vaeinfer import _probe

    _edit(bundle_copy, "encoder", _to_etc_passwd)
    monkeypatch.setattr(_probe, "command", lambda: pytest.fail("the child must not start for a refused bundle"))
    with pytest.raises(BundleError, match="external data"):
        vaeinfer.load(bundle_copy, verify=verify, isolate=isolate)


def test_external_data_location_alone_refused(bundle_copy):
    def change(model):
        model.graph.initializer[0].data_location = onnx.TensorProto.EXTERNAL

    _edit(bundle_copy, "decoder", change)
    with pytest.raises(BundleError, match="data_location"):
        vaeinfer.load(bundle_copy)


def test_external_data_in_a_constant_attribute_refused(bundle_copy):
    def change(model):
        value = helper.make_tensor("c", onnx.TensorProto.FLOAT, [1], np.ones(1, np.float32).tobytes(), raw=True)
        onnx.external_data_helper.set_external_data(value, location="/etc/shadow")
        value.data_location = onnx.TensorProto.EXTERNAL
        model.graph.node.insert(0, helper.make_node("Constant", [], ["c_out"], value=value))

    _edit(bundle_copy, "encoder", change)
    with pytest.raises(BundleError, match="external"):
        vaeinfer.load(bundle_copy)


@pytest.mark.parametrize("op, domain", [("RandomNormal", ""), ("If", ""), ("Loop", ""), ("ImageDecoder", ""),
                                        ("Relu", "ai.onnx.ml"), ("MyOp", "my.custom"), ("Gelu", "com.microsoft")])
def test_operators_outside_the_allowlist_refused(bundle_copy, op, domain):
    def change(model):
        model.graph.node[0].op_type = op
        model.graph.node[0].domain = domain

    _edit(bundle_copy, "decoder", change)
    with pytest.raises(BundleError, match="allowlist"):
        vaeinfer.load(bundle_copy, verify=False)


def test_opset_domain_outside_the_allowlist_refused(bundle_copy):
    _edit(bundle_copy, "encoder", lambda m: m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3)))
    with pytest.raises(BundleError, match="opset domain 'ai.onnx.ml'"):
        vaeinfer.load(bundle_copy)


def test_local_functions_refused(bundle_copy):
    def change(model):
        model.functions.append(helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                    [helper.make_opsetid("", 18)]))

    _edit(bundle_copy, "encoder", change)
    with pytest.raises(BundleError, match="local functions"):
        vaeinfer.load(bundle_copy)


def test_training_info_refused(bundle_copy):
    _edit(bundle_copy, "encoder", lambda m: setattr(m.training_info.add().algorithm, "name", "sgd"))
    with pytest.raises(BundleError, match="training_info"):
        vaeinfer.load(bundle_copy)


def test_operators_in_subgraphs_are_checked(bundle_copy):
    def change(model):
        body = helper.make_graph([helper.make_node("RandomUniform", [], ["r"], shape=[1])], "body", [], [])
        model.graph.node[0].attribute.append(helper.make_attribute("then_branch", body))

    _edit(bundle_copy, "decoder", change)
    with pytest.raises(BundleError, match="RandomUniform"):
        vaeinfer.load(bundle_copy)


def _nested(depth: int) -> bytes:
    """A model whose graph holds a Relu whose attribute holds a graph ... `depth` levels deep
    (written by hand: protobuf's own Python runtime refuses to build more than 100 levels)."""
    graph = _field(1, 2, NODE)
    for _ in range(depth):
        attribute = _field(1, 2, b"body") + _field(20, 0, b"\x05") + _field(6, 2, graph)
        graph = _field(1, 2, NODE + _field(5, 2, attribute))
    return _field(7, 2, graph)


def test_subgraph_nesting_is_bounded():
    onnx_scan.scan(_nested(onnx_scan.MAX_DEPTH))
    with pytest.raises(BundleError, match="nested more than"):
        onnx_scan.scan(_nested(onnx_scan.MAX_DEPTH + 1))
    with pytest.raises(BundleError, match="nested more than"):
        onnx_scan.scan(_nested(500))  # far beyond Python's recursion limit if it were followed


def _field(number: int, wire: int, payload: bytes) -> bytes:
    def varint(v):
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)
    tag = varint(number << 3 | wire)
    return tag + (varint(len(payload)) + payload if wire == 2 else payload)


NODE = _field(4, 2, b"Relu")
MALFORMED = {
    "empty": b"",
    "no graph": _field(1, 0, b"\x08"),
    "truncated varint": b"\x08\xff\xff",
    "varint over 10 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
    "length past the end": b"\x3a\xff\xff\xff\xff\x0f",
    "group wire type": b"\x3b\x3c",
    "wire type 7": b"\x3f",
    "field number 0": b"\x02\x00",
    "truncated fixed64": b"\x09\x00\x00",
    "op_type not UTF-8": _field(7, 2, _field(1, 2, _field(4, 2, b"\xff\xfe"))),
    "node field with the wrong wire type": _field(7, 2, _field(1, 0, b"\x01")),
    "data_location with the wrong wire type": _field(7, 2, _field(5, 2, _field(14, 2, b"x"))),
    "huge op_type": _field(7, 2, _field(1, 2, _field(4, 2, b"R" * 5000))),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_protobuf_is_a_bundle_error(name):
    with pytest.raises(BundleError):
        onnx_scan.scan(MALFORMED[name], name)


def test_minimal_model_passes():
    onnx_scan.scan(_field(7, 2, _field(1, 2, NODE)))


def test_random_mutations_of_real_graphs_end_in_bundle_error_or_pass():
    """In-process and fast: only the scan, 3000 mutations; the full fuzz (with onnxruntime) is test_fuzz.py."""
    rng = np.random.default_rng(0)
    originals = [p.read_bytes() for p in _graphs() if p.stat().st_size < 100_000]
    outcomes = {"pass": 0, "refused": 0}
    for _ in range(3000):
        data = bytearray(originals[int(rng.integers(len(originals)))])
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(data)))
            op = rng.integers(4)
            if op == 0:
                data[pos] ^= 1 << int(rng.integers(8))
            elif op == 1:
                del data[pos:]
            elif op == 2:
                data[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
            elif len(data):
                data[pos] = int(rng.choice([0x00, 0xFF, 0x80, 0x7F]))
        try:
            onnx_scan.scan(bytes(data))
            outcomes["pass"] += 1
        except BundleError:
            outcomes["refused"] += 1
    assert outcomes["pass"] > 0 and outcomes["refused"] > 0


# ---- graphs that load but lie or misbehave -----------------------------------------------------------


def _reshape_output_to(model, values) -> None:
    """Make the decoder's final Reshape produce `values` as its shape, computed at run time so
    that onnxruntime's shape inference cannot see it: the graph still declares its old shape."""
    node = next(n for n in reversed(model.graph.node) if n.op_type == "Reshape")
    dims = helper.make_tensor("lie_dims", onnx.TensorProto.INT64, [len(values)], np.asarray(values, np.int64).tobytes(),
                              raw=True)
    model.graph.initializer.append(dims)
    first = model.graph.input[0].name
    model.graph.node.insert(0, helper.make_node("ReduceMax", [first], ["lie_max"], keepdims=0))
    model.graph.node.insert(1, helper.make_node("Mul", ["lie_max", "lie_zero"], ["lie_zeroed"]))
    model.graph.node.insert(2, helper.make_node("Cast", ["lie_zeroed"], ["lie_int"], to=onnx.TensorProto.INT64))
    model.graph.node.insert(3, helper.make_node("Add", ["lie_dims", "lie_int"], ["lie_shape"]))
    model.graph.initializer.append(helper.make_tensor("lie_zero", onnx.TensorProto.FLOAT, [], [0.0]))
    node.input[1] = "lie_shape"


def test_output_shape_lie_refused(bundle_copy):
    """The decoder declares (N, 1, 20, 12) but produces (N, 1, 12, 20): same size, wrong shape."""
    _edit(bundle_copy, "decoder", lambda m: _reshape_output_to(m, [-1, 1, 12, 20]))
    vae = vaeinfer.load(bundle_copy, device="cpu")
    with pytest.raises(BundleError, match="shape"):
        vae.sample(2, seed=0)


def test_run_time_failure_is_a_bundle_error(bundle_copy):
    """A graph that loads but cannot run on valid input: onnxruntime's own exception becomes a BundleError."""
    _edit(bundle_copy, "decoder", lambda m: _reshape_output_to(m, [-1, 7, 5, 3]))
    vae = vaeinfer.load(bundle_copy, device="cpu")
    with pytest.raises(BundleError, match="onnxruntime failed to run"):
        vae.sample(2, seed=0)
    with pytest.raises(BundleError, match="failed to run one batch"):  # isolate=True finds it at load time
        vaeinfer.load(bundle_copy, device="cpu", isolate=True)


def test_non_finite_outputs_raise(bundle_copy):
    def change(model):
        bias = min((t for t in model.graph.initializer if len(t.dims) == 1 and t.data_type == onnx.TensorProto.FLOAT), key=lambda t: t.dims[0])
        values = onnx.numpy_helper.to_array(bias).copy()
        values[0] = np.nan
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))

    _edit(bundle_copy, "decoder", change)
    vae = vaeinfer.load(bundle_copy, device="cpu")
    with pytest.raises(OutputError, match="NaN/Inf"):
        vae.sample(3, seed=0)
    with pytest.raises(OutputError, match="NaN/Inf"):
        vae.decode(np.zeros((2, vae.latent_dim), np.float32), batch_size=1)


def test_non_finite_manifest_numbers_refused(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["image"]["range"] = [0, float("inf")]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="range"):
        vaeinfer.load(bundle_copy)
    manifest["image"]["range"] = [0, 10 ** 400]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="range"):
        vaeinfer.load(bundle_copy)
    manifest["image"]["range"] = [0, 1]
    manifest["format_version"] = "1." + "0" * 5000
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format_version"):
        vaeinfer.load(bundle_copy)


def test_fifo_in_place_of_a_graph_refused_without_blocking(bundle_copy):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    (bundle_copy / "decoder.onnx").unlink()
    os.mkfifo(bundle_copy / "decoder.onnx")
    with pytest.raises(BundleError, match="regular file"):
        vaeinfer.load(bundle_copy, verify=False)


# ---- the CLI: one line on stderr, non-zero exit, no traceback --------------------------------------------


def _hostile(kind: str, bundle: Path) -> None:
    if kind == "external-data":
        _edit(bundle, "encoder", _to_etc_passwd)
    elif kind == "operator":
        _edit(bundle, "decoder", lambda m: setattr(m.graph.node[0], "op_type", "RandomNormal"))
    elif kind == "truncated-graph":
        data = (bundle / "decoder.onnx").read_bytes()
        (bundle / "decoder.onnx").write_bytes(data[: len(data) // 3])
        _resign(bundle)
    elif kind == "tampered-graph":
        data = bytearray((bundle / "decoder.onnx").read_bytes())
        data[-10] ^= 0xFF
        (bundle / "decoder.onnx").write_bytes(bytes(data))
    elif kind == "bad-json":
        (bundle / "manifest.json").write_text('{"format": "vaeinfer-bundle",')
    elif kind == "major-2":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["format_version"] = "2.0"
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "surrogate-name":
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["name"] = "\ud800\nmulti\nline"
        manifest["graphs"]["decoder"]["sha256"] = "0" * 64
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "output-lie":
        _edit(bundle, "decoder", lambda m: _reshape_output_to(m, [-1, 7, 5, 3]))


@pytest.mark.parametrize("kind", ["external-data", "operator", "truncated-graph", "tampered-graph", "bad-json",
                                  "major-2", "surrogate-name", "output-lie", "missing"])
def test_cli_hostile_bundle_one_line(bundle_copy, tmp_path, kind):
    target = bundle_copy if kind != "missing" else tmp_path / "nowhere"
    _hostile(kind, bundle_copy)
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "vaeinfer.cli", "sample", "-m", str(target), "-n", "2",
                           "--device", "cpu", "-o", str(out)], capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    err = done.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip() and "sampling" not in line]
    assert done.returncode == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and not out.exists()


def test_cli_bad_input_one_line(mlp, tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((2, 1, 20, 12), np.nan, np.float32))
    done = subprocess.run([sys.executable, "-m", "vaeinfer.cli", "encode", "-m", str(mlp.bundle), "--device", "cpu",
                           str(bad), "-o", str(tmp_path / "z.npz")], capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 1 and err.count("\n") == 1 and err.startswith("error: images: expected finite"), err


def test_run_error_types():
    """Out of memory is the backend's; any other onnxruntime failure the graph's (found by fuzzing:
    onnxruntime's messages name std::allocator, which is no allocation failure)."""
    from vaeinfer.runtime import run_error

    assert isinstance(run_error("g", MemoryError()), vaeinfer.BackendError)
    assert isinstance(run_error("g", RuntimeError("std::bad_alloc")), vaeinfer.BackendError)
    assert isinstance(run_error("g", RuntimeError("Failed to allocate memory for requested buffer")), vaeinfer.BackendError)
    pads = "PadBase::ComputePadsImpl(...) [with PadsVector = InlinedVector<long, 10, std::allocator<long> >] pads_data.size()"
    assert isinstance(run_error("g", RuntimeError(pads)), BundleError)
