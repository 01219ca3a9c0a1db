"""A strict, bounded reader of the ONNX protobuf wire format, run on a graph's bytes before
onnxruntime sees them.

vaeinfer does not import `onnx`, so this module reads the few fields that matter itself
(field numbers from onnx.proto):

    ModelProto      graph 7, opset_import 8, training_info 20 (refused), functions 25 (refused)
    GraphProto      node 1, initializer 5, sparse_initializer 15
    NodeProto       op_type 4, attribute 5, domain 7
    AttributeProto  t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
    TensorProto     external_data 13, data_location 14 (EXTERNAL = 1)
    SparseTensorProto  values 1, indices 2
    OperatorSetIdProto domain 1

and refuses: any operator outside `ALLOWED_OPS` (every node, subgraphs included), any opset
domain but the standard one, model-local functions, training info, and any tensor whose
data lives in an external file. Every other field is skipped by its length.

Bounded by construction: no recursion beyond `MAX_DEPTH` nested graphs, no allocation beyond
the input (lengths are checked against the bytes that remain before anything is sliced), and
at most `MAX_FIELDS` fields visited. Any malformed byte stream ends in BundleError, never in
another exception type.
"""

from __future__ import annotations

from dataclasses import dataclass

from vaeinfer.errors import BundleError

# The standard-domain operators the exported VAE / VQ-VAE / PixelCNN graphs use (listed by
# exporting every architecture and activation the training side offers: Add, ArgMin, Conv,
# Elu, Gather, Gemm, LeakyRelu, MatMul, Mul, Relu, Reshape, Resize, Sigmoid, Slice, Split, Sub,
# Tanh, Transpose, Unsqueeze), their close neighbours for other user modules, and what the
# fp16 / int8 variants add (Cast, (De)QuantizeLinear, the integer kernels). Deliberately absent:
# control flow (If, Loop, Scan), Random*, sequences and optionals, strings, image decoding.
STANDARD_OPS = frozenset({
    # arithmetic and elementwise
    "Abs", "Add", "Ceil", "Clip", "Div", "Equal", "Erf", "Exp", "Floor", "Greater", "GreaterOrEqual",
    "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "And", "Or",
    "Pow", "Reciprocal", "Round", "Sign", "Sqrt", "Sub", "Sum", "Where", "IsNaN", "IsInf",
    # activations
    "Celu", "Elu", "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu", "LogSoftmax", "Mish", "PRelu",
    "Relu", "Selu", "Sigmoid", "Softmax", "Softplus", "Softsign", "Tanh", "ThresholdedRelu",
    # linear algebra, convolution, pooling, normalization
    "AveragePool", "BatchNormalization", "Conv", "ConvTranspose", "Gemm", "GlobalAveragePool",
    "GlobalMaxPool", "GroupNormalization", "InstanceNormalization", "LayerNormalization",
    "LpNormalization", "MatMul", "MaxPool",
    # reductions and indexing
    "ArgMax", "ArgMin", "CumSum", "Gather", "GatherElements", "GatherND", "OneHot", "ReduceL2",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "TopK",
    # shape and layout
    "Concat", "Constant", "ConstantOfShape", "DepthToSpace", "Dropout", "Expand", "Flatten",
    "Identity", "Pad", "Range", "Reshape", "Resize", "Shape", "Size", "Slice", "SpaceToDepth",
    "Split", "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze",
    # precision variants
    "Cast", "CastLike", "ConvInteger", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QuantizeLinear",
})
# No com.microsoft (contrib) operators: export/variants.py makes its fp16 and int8 graphs from
# standard operators only (Cast; QDQ QuantizeLinear/DequantizeLinear). onnxruntime fuses them
# into its contrib kernels itself, after this check.
ALLOWED_OPS = {"": STANDARD_OPS, "ai.onnx": STANDARD_OPS}
ALLOWED_DOMAINS = frozenset(ALLOWED_OPS)

MAX_DEPTH = 8  # graphs nested in node attributes
MAX_FIELDS = 10_000_000  # a 2 GiB file of 1-byte fields would otherwise take minutes
MAX_STRING = 4096  # op_type / domain

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Scan:
    """What a graph's bytes hold: its operators as (domain, op_type) and its opset domains."""

    ops: frozenset
    opset_domains: frozenset
    nodes: int


class _Malformed(Exception):
    pass


class _Refused(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes):
        self.buf = memoryview(data)
        self.fields = 0

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf, value, shift = self.buf, 0, 0
        for i in range(10):
            if pos >= end:
                raise _Malformed(f"a varint runs past its message's end (byte {pos})")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                if i == 9 and b > 1:
                    raise _Malformed(f"a varint exceeds 64 bits (byte {pos})")
                return value, pos
            shift += 7
        raise _Malformed(f"a varint longer than 10 bytes (byte {pos})")

    def fields_of(self, start: int, end: int):
        """(field number, wire type, value, position) for each field of the message in [start, end):
        value is an int for VARINT / I64 / I32 and a (start, end) pair for LEN."""
        pos = start
        while pos < end:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _Refused(f"more than {MAX_FIELDS} protobuf fields; refusing to scan further")
            at = pos
            tag, pos = self.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if not 0 < number < (1 << 29):
                raise _Malformed(f"field number {number} (byte {at})")
            if wire == _VARINT:
                value, pos = self.varint(pos, end)
            elif wire == _I64 or wire == _I32:
                size = 8 if wire == _I64 else 4
                if pos + size > end:
                    raise _Malformed(f"a fixed-size field runs past its message's end (byte {at})")
                value = int.from_bytes(self.buf[pos:pos + size], "little")
                pos += size
            elif wire == _LEN:
                length, pos = self.varint(pos, end)
                if length > end - pos:
                    raise _Malformed(f"field {number} claims {length} bytes, {end - pos} remain (byte {at})")
                value = (pos, pos + length)
                pos += length
            else:  # 3/4: deprecated groups; 6/7: undefined
                raise _Malformed(f"wire type {wire} in field {number} (byte {at})")
            yield number, wire, value, at

    def string(self, span: tuple[int, int], what: str) -> str:
        start, end = span
        if end - start > MAX_STRING:
            raise _Refused(f"{what} of {end - start} bytes")
        try:
            return bytes(self.buf[start:end]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not UTF-8 (byte {start})") from None


def _expect(wire: int, want: int, number: int, message: str, at: int) -> None:
    if wire != want:
        raise _Malformed(f"{message} field {number} has wire type {wire}, expected {want} (byte {at})")


class _Scanner:
    def __init__(self, data: bytes):
        self.r = _Reader(data)
        self.ops: set[tuple[str, str]] = set()
        self.domains: set[str] = set()
        self.nodes = 0

    def model(self) -> None:
        r, graphs = self.r, 0
        for number, wire, value, at in r.fields_of(0, len(r.buf)):
            if number == 7:
                _expect(wire, _LEN, number, "ModelProto", at)
                self.graph(value, 0)
                graphs += 1
            elif number == 8:
                _expect(wire, _LEN, number, "ModelProto", at)
                self.opset(value)
            elif number == 20:
                raise _Refused("the model carries training_info (training graphs); a bundle graph is inference only")
            elif number == 25:
                raise _Refused("the model defines local functions; bundle graphs use standard operators only")
        if not graphs:
            raise _Malformed("no graph (ModelProto field 7)")

    def opset(self, span) -> None:
        domain = ""
        for number, wire, value, at in self.r.fields_of(*span):
            if number == 1:
                _expect(wire, _LEN, number, "OperatorSetIdProto", at)
                domain = self.r.string(value, "an opset domain")
        if domain not in ALLOWED_DOMAINS:
            raise _Refused(f"opset domain {domain!r:.80}; allowed: {sorted(ALLOWED_DOMAINS)}")
        self.domains.add(domain)

    def graph(self, span, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _Refused(f"graphs nested more than {MAX_DEPTH} deep")
        for number, wire, value, at in self.r.fields_of(*span):
            if number == 1:
                _expect(wire, _LEN, number, "GraphProto", at)
                self.node(value, depth)
            elif number == 5:
                _expect(wire, _LEN, number, "GraphProto", at)
                self.tensor(value)
            elif number == 15:
                _expect(wire, _LEN, number, "GraphProto", at)
                self.sparse(value)

    def node(self, span, depth: int) -> None:
        op, domain = "", ""  # singular fields: the last occurrence wins, as in protobuf
        for number, wire, value, at in self.r.fields_of(*span):
            if number == 4:
                _expect(wire, _LEN, number, "NodeProto", at)
                op = self.r.string(value, "an op_type")
            elif number == 7:
                _expect(wire, _LEN, number, "NodeProto", at)
                domain = self.r.string(value, "a node domain")
            elif number == 5:
                _expect(wire, _LEN, number, "NodeProto", at)
                self.attribute(value, depth)
        self.nodes += 1
        if op not in ALLOWED_OPS.get(domain, ()):
            where = "the standard domain" if domain in ("", "ai.onnx") else f"domain {domain!r:.80}"
            raise _Refused(f"operator {op!r:.80} of {where} is not on vaeinfer's allowlist "
                           f"(see vaeinfer.onnx_scan.ALLOWED_OPS)")
        self.ops.add((domain, op))

    def attribute(self, span, depth: int) -> None:
        for number, wire, value, at in self.r.fields_of(*span):
            if number in (5, 10):
                _expect(wire, _LEN, number, "AttributeProto", at)
                self.tensor(value)
            elif number in (6, 11):
                _expect(wire, _LEN, number, "AttributeProto", at)
                self.graph(value, depth + 1)
            elif number in (22, 23):
                _expect(wire, _LEN, number, "AttributeProto", at)
                self.sparse(value)

    def sparse(self, span) -> None:
        for number, wire, value, at in self.r.fields_of(*span):
            if number in (1, 2):
                _expect(wire, _LEN, number, "SparseTensorProto", at)
                self.tensor(value)

    def tensor(self, span) -> None:
        for number, wire, value, at in self.r.fields_of(*span):
            if number == 13:
                raise _Refused("a tensor names an external data file (TensorProto.external_data); "
                               "bundle graphs must embed their weights")
            if number == 14:
                _expect(wire, _VARINT, number, "TensorProto", at)
                if value != 0:
                    raise _Refused(f"a tensor has data_location {value} (1 = EXTERNAL); "
                                   "bundle graphs must embed their weights")


def scan(data: bytes, what: str = "graph") -> Scan:
    """Check ONNX bytes against the allowlist and the external-data rule; BundleError if refused."""
    scanner = _Scanner(data)
    try:
        scanner.model()
    except _Malformed as e:
        raise BundleError(f"{what}: not a valid ONNX model: {e}") from None
    except _Refused as e:
        raise BundleError(f"{what}: refused: {e}") from None
    except RecursionError:  # cannot happen with MAX_DEPTH this small; kept so no other type escapes
        raise BundleError(f"{what}: refused: nesting too deep") from None
    return Scan(frozenset(scanner.ops), frozenset(scanner.domains), scanner.nodes)


@dataclass(frozen=True)
class Initializer:
    """A top-level initializer whose values are stored as raw bytes: where they lie in the graph's bytes."""

    name: str
    data_type: int  # TensorProto.DataType: 1 float, 10 float16, 2 uint8, 3 int8, ...
    dims: tuple[int, ...]
    start: int  # raw_data's first byte in the graph's bytes
    end: int


def initializers(data: bytes) -> list[Initializer]:
    """The main graph's initializers held as raw_data (TensorProto fields: dims 1, data_type 2,
    name 8, raw_data 9), for graphs that already passed `scan`. Tensors stored any other way
    (typed value fields, segments, external data) are left out, and so is everything on malformed
    bytes: the list is what may be shared, never a check."""
    r, out = _Reader(data), []
    try:
        for number, wire, value, _ in r.fields_of(0, len(r.buf)):
            if number == 7 and wire == _LEN:
                for g_number, g_wire, g_value, _ in r.fields_of(*value):
                    if g_number == 5 and g_wire == _LEN:
                        tensor = _initializer(r, g_value)
                        if tensor is not None:
                            out.append(tensor)
    except (_Malformed, _Refused):
        return []
    return out


def _initializer(r: _Reader, span) -> Initializer | None:
    name, data_type, dims, raw = None, 0, [], None
    for number, wire, value, _ in r.fields_of(*span):
        if number == 1 and wire == _VARINT:
            dims.append(value)
        elif number == 1 and wire == _LEN:  # packed dims
            pos, end = value
            while pos < end:
                d, pos = r.varint(pos, end)
                dims.append(d)
        elif number == 2 and wire == _VARINT:
            data_type = value
        elif number == 8 and wire == _LEN:
            name = r.string(value, "an initializer name")
        elif number == 9 and wire == _LEN:
            raw = value
        elif number in (3, 4, 5, 6, 7, 10, 11, 13, 14):  # segment, typed values, external data
            return None
    if name is None or raw is None or any(d >= 1 << 62 for d in dims):
        return None
    return Initializer(name, data_type, tuple(dims), *raw)
