"""export.optimize: the narrow-convolution rewrite keeps the graph's values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vaeinfer.export.optimize import narrow_convs


def _conv_model(c_in, c_out, k, pads, bias=True, **attrs):
    rng = np.random.default_rng(c_out * 10 + k)
    w = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], kernel_shape=[k, k], pads=pads, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c_in, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c_out, "ho", "wo"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("c_out,k,pads,bias", [(1, 3, [1, 1, 1, 1], True), (2, 3, [0, 1, 2, 1], True),
                                               (1, 5, [2, 2, 2, 2], False), (1, 3, [0, 0, 0, 0], True)])
def test_same_values(c_out, k, pads, bias):
    original = _conv_model(6, c_out, k, pads, bias)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    assert narrow_convs(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    assert "Conv" in {n.op_type for n in rewritten.graph.node} and "Slice" in {n.op_type for n in rewritten.graph.node}
    assert not {"w", "b"} & {t.name for t in rewritten.graph.initializer}  # the old weights are gone
    for shape in [(1, 6, 7, 9), (3, 6, 12, 5)]:
        x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(_run(rewritten, x), _run(original, x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("c_out,k,attrs", [(3, 3, {}), (1, 1, {}), (1, 3, {"strides": [2, 2]}),
                                           (1, 3, {"dilations": [2, 2]})])
def test_left_alone(c_out, k, attrs):
    model = _conv_model(4, c_out, k, [1, 1, 1, 1] if k == 3 else [0, 0, 0, 0], **attrs)
    before = model.SerializeToString()
    assert narrow_convs(model) == 0
    assert model.SerializeToString() == before


def test_export_applies_it_and_says_so(gauss):
    manifest = json.loads((gauss.bundle / "manifest.json").read_text())
    assert manifest["export"]["rewrites"]["narrow_convs"] == {"encoder": 0, "decoder": 1}
    decoder = onnx.load(str(gauss.bundle / "decoder.onnx"))
    assert "Slice" in {n.op_type for n in decoder.graph.node}
    assert manifest["export"]["parity"]["graphs"]["decoder"]["params"]["max_abs_err"] <= 1e-4
