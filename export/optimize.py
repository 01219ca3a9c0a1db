"""Graph rewrites that keep a graph's function and make it run faster in onnxruntime on CPU.

`narrow_convs`: a k x k convolution with very few output channels (a decoder's last layer:
32 -> 1 channel at full resolution) is the slowest layer of the bundled decoders on CPU.
onnxruntime's NCHWc convolution kernels pad the output channels up to the block size (16 with
AVX-512), so a 1-channel convolution does 16 times its arithmetic: 2% of the decoder's FLOPs,
20% of its time. Rewritten as a 1x1 convolution to C_out * k * k "tap" channels (cheap: a
matmul), then the k * k shifted windows of those maps summed (Pad, Slice, Sum), it does the
arithmetic once. Same values up to float rounding (the export's parity check still applies).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT_MAX = 2 ** 63 - 1


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def narrow_convs(model: onnx.ModelProto, max_out_channels: int = 2) -> int:
    """Rewrite, in place, each Conv with at most `max_out_channels` outputs, a k x k kernel (k > 1),
    stride 1, dilation 1, group 1 and constant weights. Returns how many were rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    out, count = [], 0
    for node in nodes:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
            out.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 4 or w.dtype != np.float32:
            out.append(node)
            continue
        c_out, c_in, kh, kw = w.shape
        if (c_out > max_out_channels or kh * kw == 1 or _attr(node, "group", 1) != 1
                or any(s != 1 for s in _attr(node, "strides", [1, 1])) or any(d != 1 for d in _attr(node, "dilations", [1, 1]))
                or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            out.append(node)
            continue
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            out.append(node)
            continue
        out.extend(_taps(node, w, bias, pads, model, f"{node.name or node.output[0]}_taps"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(out)
    if count:  # the replaced convolutions' weights and biases are used by nothing now
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        kept = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return count


def _taps(node, w: np.ndarray, bias, pads, model, prefix: str) -> list:
    c_out, c_in, kh, kw = w.shape
    k = kh * kw
    # channel o * k + (ky * kw + kx) of the 1x1 convolution holds tap (ky, kx) of output o
    w1 = w.transpose(0, 2, 3, 1).reshape(c_out * k, c_in, 1, 1)
    add = model.graph.initializer.append
    add(numpy_helper.from_array(np.ascontiguousarray(w1, np.float32), f"{prefix}_w"))
    add(numpy_helper.from_array(np.array([0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], np.int64), f"{prefix}_pads"))
    add(numpy_helper.from_array(np.array([1, 2, 3], np.int64), f"{prefix}_axes"))
    nodes = [helper.make_node("Conv", [node.input[0], f"{prefix}_w"], [f"{prefix}_maps"], kernel_shape=[1, 1],
                              name=f"{prefix}_conv"),
             helper.make_node("Pad", [f"{prefix}_maps", f"{prefix}_pads"], [f"{prefix}_padded"], name=f"{prefix}_pad")]
    sums = []
    for o in range(c_out):
        windows = []
        for ky in range(kh):
            for kx in range(kw):
                c = o * k + ky * kw + kx
                end_y = ky - (kh - 1) if ky < kh - 1 else INT_MAX
                end_x = kx - (kw - 1) if kx < kw - 1 else INT_MAX
                name = f"{prefix}_{o}_{ky}_{kx}"
                add(numpy_helper.from_array(np.array([c, ky, kx], np.int64), f"{name}_start"))
                add(numpy_helper.from_array(np.array([c + 1, end_y, end_x], np.int64), f"{name}_end"))
                nodes.append(helper.make_node("Slice", [f"{prefix}_padded", f"{name}_start", f"{name}_end",
                                                        f"{prefix}_axes"], [name], name=f"{name}_slice"))
                windows.append(name)
        if bias is not None:
            add(numpy_helper.from_array(bias[o].reshape(1, 1, 1, 1).astype(np.float32), f"{prefix}_{o}_bias"))
            windows.append(f"{prefix}_{o}_bias")
        target = node.output[0] if c_out == 1 else f"{prefix}_{o}_sum"
        nodes.append(helper.make_node("Sum", windows, [target], name=f"{prefix}_{o}_sum"))
        sums.append(target)
    if c_out > 1:
        nodes.append(helper.make_node("Concat", sums, [node.output[0]], axis=1, name=f"{prefix}_concat"))
    return nodes
