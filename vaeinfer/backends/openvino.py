"""OpenVINO on the CPU (`backend="openvino"`, the extra `vaeinfer[openvino]`).

It compiles the bundle's verified ONNX bytes in memory (`Core.read_model(bytes)`: no file is read
by path) for OpenVINO's CPU plugin, which uses the CPU's matrix units where onnxruntime's CPU
provider does not: bf16 on AMX (Intel Xeon 4th gen+) and AVX-512 BF16 (AMD Zen 4+), int8 on AMX
and VNNI.

Precisions:
- fp32: the fp32 graph with inference precision f32 (OpenVINO would otherwise default to bf16
  on such CPUs); outputs agree with onnxruntime's to float rounding.
- bf16: the fp32 graph with inference precision bf16 (weights and activations rounded to bf16,
  accumulation in fp32); only where the CPU plugin lists the "BF16" capability. Index arithmetic
  stays f32 (`keep_index_arithmetic_f32`): float maths on shapes that ends in an integer (the
  gather indices of an exported nearest upsample) picks wrong and out-of-bounds pixels in bf16
  once an image side passes 128.
- int8: the bundle's int8 (QDQ) graphs, which OpenVINO runs as int8 kernels.

One compiled model serves many threads: each calling thread gets its own infer request (a
request is not thread-safe; the compiled model is). `threads` sets INFERENCE_NUM_THREADS; one
stream, latency hint, as one onnxruntime session with that many intra-op threads.
"""

from __future__ import annotations

import functools
import threading

import numpy as np

from vaeinfer.backends import Backend, Port, register
from vaeinfer.errors import BackendError, BundleError

INSTALL_HINT = "install 'vaeinfer[openvino]' (the openvino package)"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: the QDQ graph's float parts in f32
_DTYPES = {"f32": "float32", "i64": "int64"}


@functools.lru_cache(maxsize=1)
def _core():
    import openvino

    return openvino.Core()


def is_available() -> bool:
    try:
        return "CPU" in _core().available_devices
    except Exception:  # ImportError, or a plugin that fails to start: not available here
        return False


def capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can do here ("FP32", "BF16", "INT8", ...); () without OpenVINO."""
    if not is_available():
        return ()
    return tuple(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


# The OpenVINO runtime attribute that keeps a node in its original precision: the CPU plugin's bf16
# mark-up (Graph::EnforceInferencePrecision) skips nodes whose "keep original precision" flag it set
# from this attribute. Python can neither construct it nor store anything but str/int in rt_info, so
# the attributes are made by reading an IR of nodes that carry them, and moved with Node.set_rt_info
# (one per node: the attribute is mutable, so nodes do not share one). Newest first:
# DisablePrecisionConversion (2026: "from:to,..", here any type to f16/bf16, which leaves the
# plugin's own i64 -> i32 conversion alone), then the older DisableFP16Compression's names.
_KEEP_ATTRIBUTES = ('<attribute name="DisablePrecisionConversion" version="0" value="dynamic:f16,bf16"/>',
                    '<attribute name="precise" version="0"/>',
                    '<attribute name="disable_fp16_compression" version="0"/>')
_PORT = '<port id="{}" precision="FP32"><dim>1</dim></port>'
_LAYER = ('<layer id="{i}" name="keep{i}" type="Relu" version="opset1"><rt_info>{attribute}</rt_info>'
          '<input>' + _PORT.format(0) + '</input><output>' + _PORT.format(1) + '</output></layer>')


def _make_keep_attributes(attribute: str, n: int) -> list:
    """n fresh (rt_info key, value) of `attribute` (an IR rt_info element of _KEEP_ATTRIBUTES); []
    if this OpenVINO does not know it."""
    import openvino

    layers = ['<layer id="0" name="x" type="Parameter" version="opset1"><data shape="1" element_type="f32"/>'
              '<output>' + _PORT.format(0) + '</output></layer>']
    layers += [_LAYER.format(i=i, attribute=attribute) for i in range(1, n + 1)]
    layers.append(f'<layer id="{n + 1}" name="y" type="Result" version="opset1">'
                  f'<input>{_PORT.format(0)}</input></layer>')
    edges = [f'<edge from-layer="{i}" from-port="{0 if i == 0 else 1}" to-layer="{i + 1}" to-port="0"/>'
             for i in range(n + 1)]
    ir = (f'<?xml version="1.0"?><net name="keep" version="11"><layers>{"".join(layers)}</layers>'
          f'<edges>{"".join(edges)}</edges></net>')
    try:
        model = _core().read_model(ir.encode(), openvino.Tensor(np.zeros(0, np.uint8)))
    except RuntimeError:  # an attribute (or value) this version cannot parse
        return []
    name = attribute.split('"')[1]
    out = []
    for op in model.get_ordered_ops():
        if op.get_friendly_name().startswith("keep"):
            info = op.get_rt_info()
            out += [(key, info[key]) for key in info.keys() if key == name or key.startswith(name + "_")]
    return out if len(out) == n else []


@functools.lru_cache(maxsize=1)
def _keep_attribute() -> str | None:
    """The first of _KEEP_ATTRIBUTES this OpenVINO reads into a node's runtime info; None if none."""
    return next((a for a in _KEEP_ATTRIBUTES if _make_keep_attributes(a, 1)), None)


def keep_index_arithmetic_f32(model) -> int:
    """Mark the model's index arithmetic to stay f32 under a bf16 inference precision; returns how
    many nodes it marked (0 also where this OpenVINO has no attribute for it).

    Index arithmetic: the float nodes computed from tensor shapes (and constants) alone that lead to
    a float -> integer step, e.g. torch.onnx's nearest-exact upsample (Wan's decoder), which gathers
    at int((arange(out) + 0.5) * (in / out)). bf16 has 8 significant bits (steps of 0.5 between 64
    and 128), so for odd i > 128 the x.75 of (i + 0.5) * 0.5 rounds up to the next integer: those
    output pixels come from the wrong source pixel, and the last from one past the end, which
    OpenVINO's GatherND reads as garbage (NaN/Inf on a Wan decoder at 256x256). The nodes are
    vectors the length of a side, so f32 costs nothing; the tensors they index stay bf16."""
    attribute = _keep_attribute()
    if attribute is None:
        return 0
    ops = model.get_ordered_ops()  # topological
    by_id = {op.get_instance_id(): op for op in ops}

    def sources(op):
        return [i.get_source_output().get_node() for i in op.inputs()]

    def takes_real(op):
        return any(i.get_source_output().get_element_type().is_real() for i in op.inputs())

    def gives_real(op):
        return any(o.get_element_type().is_real() for o in op.outputs())

    shaped = set()  # computed from shapes (and constants), not from tensor values; ShapeOf itself excluded
    for op in ops:
        if op.get_type_name() in ("Parameter", "Constant", "Result") or not op.get_input_size():
            continue
        srcs = sources(op)
        if all(s.get_type_name() in ("ShapeOf", "Constant") or s.get_instance_id() in shaped for s in srcs) and \
                any(s.get_type_name() == "ShapeOf" or s.get_instance_id() in shaped for s in srcs) and \
                op.get_type_name() != "ShapeOf":
            shaped.add(op.get_instance_id())
    # the float -> integer steps among them, then the float maths upstream of those, within the shape maths
    todo = [by_id[i] for i in shaped if takes_real(by_id[i]) and not gives_real(by_id[i])]
    marked = set()
    while todo:
        op = todo.pop()
        if op.get_instance_id() not in marked:
            marked.add(op.get_instance_id())
            todo.extend(s for s in sources(op) if s.get_instance_id() in shaped)
    keep = [by_id[i] for i in marked if takes_real(by_id[i]) or gives_real(by_id[i])]
    attributes = _make_keep_attributes(attribute, len(keep)) if keep else []
    for op, (key, value) in zip(keep, attributes):
        op.set_rt_info(value, key)
    return len(attributes)


def _port(port) -> Port:
    kind = port.get_element_type().get_type_name()
    return Port(port.get_any_name(), _DTYPES.get(kind, kind),
                tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape()))


class OpenVINORunner:
    """A `vaeinfer.backends.Runner` over an OpenVINO compiled model."""

    graph_capture = False

    def __init__(self, graph: bytes, *, threads: int | None, what: str, precision: str):
        if precision == "bf16" and "BF16" not in capabilities():
            raise BackendError(f"{what}: bf16 needs a CPU with AMX or AVX-512 BF16 (OpenVINO's CPU plugin lists "
                               f"{list(capabilities())}); use precision 'fp32' or 'int8'")
        core = _core()
        try:
            model = core.read_model(graph, b"")
        except RuntimeError as e:
            raise BundleError(f"{what}: OpenVINO cannot read the graph: {str(e).strip()[:300]}") from None
        # the number of nodes kept f32 under bf16 (index arithmetic); 0 in f32
        self.kept_f32 = keep_index_arithmetic_f32(model) if HINTS[precision] == "bf16" else 0
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:
            raise BackendError(f"{what}: OpenVINO cannot compile the graph for the CPU: {str(e).strip()[:300]}") from None
        self.providers = (f"OpenVINO {version().split('-')[0]} CPU ({HINTS[precision]})",)
        self.errors = (RuntimeError,)
        # the graph's own signature, as read: compiling may forget a static axis (the int8 step
        # graphs of a video VAE come out of the CPU plugin's low-precision passes as all dynamic)
        self._inputs = [_port(p) for p in model.inputs]
        self._outputs = [_port(p) for p in model.outputs]
        self._index = {p.get_any_name(): i for i, p in enumerate(self.compiled.outputs)}
        self._local = threading.local()

    def inputs(self) -> list[Port]:
        return self._inputs

    def outputs(self) -> list[Port]:
        return self._outputs

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()}, share_inputs=True)
        # copies: the request's output buffers are overwritten by its next call
        return [request.get_output_tensor(self._index[n]).data.copy() for n in names]


def make_runner(graph: bytes, device, *, threads, what, precision="fp32", spec=None, capture=False, arena=True):
    return OpenVINORunner(graph, threads=threads, what=what, precision=precision)


BACKEND = register(Backend(
    name="openvino", device="cpu", title="OpenVINO's CPU plugin", engine="openvino", install_hint=INSTALL_HINT,
    is_available=is_available, make_runner=make_runner, host_memory=True, host_threads=False,
    precisions=("fp32", "bf16", "int8"),
))
