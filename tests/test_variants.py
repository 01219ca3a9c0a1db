"""Precision variants (export.variants): fp16 and int8 graphs written into a bundle, validated
against fp32, picked by `vaeinfer.load(..., precision=...)`. Tiny models; no timing assertions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import vaeinfer
from vaeinfer.export import variants
from vaeinfer.export.graphs import ExportError
from vaeinfer.cli import main

FAST = dict(nll_images=8, nll_samples=4, speed_batch=8, max_calibration=32, calibration_batch=8)


@pytest.fixture(scope="module")
def with_variants(conv, tmp_path_factory):
    """A copy of the tiny conv bundle with both variants, made from its run's own data."""
    out = tmp_path_factory.mktemp("variants") / "bundle"
    shutil.copytree(conv.bundle, out)
    variants.add_variants_from_run(out, conv.run, ["fp16", "int8"], **FAST)
    return out


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_variants_in_manifest(with_variants, conv):
    m = _manifest(with_variants)
    before = _manifest(conv.bundle)
    assert m["graphs"] == before["graphs"]  # the fp32 graphs are untouched
    for precision in ("fp16", "int8"):
        entry = m["variants"][precision]
        assert set(entry["graphs"]) == {"encoder", "decoder"}
        for role, f in entry["graphs"].items():
            assert f["file"] == f"{role}.{precision}.onnx" and (with_variants / f["file"]).is_file()
        assert entry["error"]["reconstruction"]["mean_abs_err"] <= variants.DEFAULT_MAX_IMAGE_MAE
        assert np.isfinite(entry["error"]["nll"]["diff"])
        for role in ("encoder", "decoder"):
            assert entry["speedup"]["graphs"][role]["speedup"] > 0
        assert entry["method"]["tool"]
    assert m["variants"]["int8"]["calibration"]["split"] == "train"
    assert m["variants"]["int8"]["method"]["format"] == "QDQ"


def test_load_picks_variant(with_variants, conv):
    ref = vaeinfer.load(with_variants, device="cpu", threads=1)
    assert ref.info.precisions == ("fp32", "fp16", "int8")
    x = conv.images[:6]
    for precision in ("fp16", "int8"):
        m = vaeinfer.load(with_variants, device="cpu", threads=1, precision=precision)
        assert m.info.precision == precision
        assert any(name.endswith(f".{precision}.onnx") for name in m.info.files)
        rec = m.reconstruct(x)
        assert rec.shape == x.shape and np.isfinite(rec).all()
        assert np.abs(rec - ref.reconstruct(x)).mean() < 0.05
        graph = onnx.load(str(with_variants / f"decoder.{precision}.onnx"))
        ops = {n.op_type for n in graph.graph.node}
        assert ("QuantizeLinear" in ops) == (precision == "int8")
        meta = {p.key: p.value for p in graph.metadata_props}
        assert json.loads(meta["vaeinfer.precision"]) == precision
        # fp32 inputs and outputs whatever the precision inside
        assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in (*graph.graph.input, *graph.graph.output))


def test_calibration_uses_training_images_only(conv, tmp_path, monkeypatch):
    from vaeinfer.training import checkpoint as ckpt
    from vaeinfer.training.data import load_data, split

    seen = []
    real = variants.make_int8

    def spy(data, calibration, *args, **kwargs):
        seen.append(calibration)
        return real(data, calibration, *args, **kwargs)

    monkeypatch.setattr(variants, "make_int8", spy)
    out = shutil.copytree(conv.bundle, tmp_path / "b")
    variants.add_variants_from_run(out, conv.run, ["int8"], **FAST)
    _, meta = ckpt.load(conv.run)
    cfg = meta["config"]
    train, held = split(load_data(cfg["data"]), cfg["val_fraction"], cfg["seed"])
    encoder_rows = np.concatenate([feed["x"] for feed in seen[0]])
    as_bytes = lambda a: {r.tobytes() for r in a}  # noqa: E731
    assert as_bytes(encoder_rows) <= as_bytes(train.images)
    assert not as_bytes(encoder_rows) & as_bytes(held.images)
    assert len(seen) == 2 and "z" in seen[1][0]  # the decoder calibrates on posterior samples


def _nan_output(data: bytes, *_feeds_and_report) -> bytes:
    """The same graph with every float output multiplied by NaN (make_fp16's signature)."""
    model = onnx.load_from_string(data)
    nan = helper.make_tensor("nan_const", TensorProto.FLOAT, [], [float("nan")])
    model.graph.initializer.append(nan)
    for out in model.graph.output:
        for node in model.graph.node:
            node.output[:] = [o + "_pre" if o == out.name else o for o in node.output]
        model.graph.node.append(helper.make_node("Mul", [out.name + "_pre", "nan_const"], [out.name]))
    return model.SerializeToString()


def test_non_finite_variant_fails_and_leaves_the_bundle(conv, tmp_path, monkeypatch):
    out = shutil.copytree(conv.bundle, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(variants, "make_fp16", _nan_output)
    with pytest.raises(ExportError, match="non-finite"):
        variants.add_variants_from_run(out, conv.run, ["fp16"], **FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folders left


def test_unknown_precision(conv, tmp_path):
    with pytest.raises(ExportError, match="precision"):
        variants.add_variants(conv.bundle, ["int4"], conv.images)


def test_keep_fp32_nodes_guards_argmin_and_outputs():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["n", 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel().tolist())
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="body"),
        helper.make_node("Relu", ["h"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w"], ["d"], name="distances"),
        helper.make_node("Neg", ["d"], ["nd"], name="neg"),
        helper.make_node("ArgMin", ["nd"], ["idx"], name="argmin", axis=1),
        helper.make_node("MatMul", ["r", "w"], ["y0"], name="head"),
        helper.make_node("Reshape", ["y0", "shape"], ["y"], name="reshape"),
    ]
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [idx, y], [w, shape]))
    assert variants.keep_fp32_nodes(model) == ["distances", "head"]
    assert variants.keep_fp32_nodes(model, outputs=False) == ["distances"]


def test_cli_export_with_precision(conv, tmp_path):
    out = tmp_path / "cli-bundle"
    result = CliRunner().invoke(main, ["export", str(conv.run), "--out", str(out), "--precision", "int8"])
    assert result.exit_code == 0, result.output
    assert "int8: speed-up at batch" in result.output
    assert set(_manifest(out)["variants"]) == {"int8"}
    m = vaeinfer.load(out, device="cpu", precision="int8")
    assert np.isfinite(m.sample(3, seed=0)).all()


def test_vq_variants_keep_the_codebook_distances_fp32(tmp_path):
    from tests.test_vq import _vq_run

    run, bundle, images = _vq_run(tmp_path, (1, 16, 12), labels=True, prior=True)
    variants.add_variants_from_run(bundle, run, ["int8", "fp16"], **FAST)
    m = _manifest(bundle)
    for precision in ("int8", "fp16"):
        entry = m["variants"][precision]
        assert set(entry["graphs"]) == {"encoder", "decoder", "prior"}
        err = entry["error"]
        assert 0 <= err["encoder"]["codes_mismatch"] <= 1 and np.isfinite(err["prior_nll"]["diff"])
        vq = vaeinfer.load(bundle, device="cpu", threads=1, precision=precision)
        codes = vq.sample_codes(2, seed=0, label=1)
        assert codes.shape == (2, *vq.grid) and np.isfinite(vq.decode(codes)).all()
    encoder = onnx.load(str(bundle / "encoder.int8.onnx"))
    argmin = next(n for n in encoder.graph.node if n.op_type == "ArgMin")
    producer = {o: n for n in encoder.graph.node for o in n.output}
    assert producer[argmin.input[0]].op_type not in ("DequantizeLinear", "QuantizeLinear")
