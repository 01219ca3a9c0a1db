"""Fuzz the bundle loader: mutated manifests and mutated/truncated ONNX graphs must always end in
success or a typed `vaeinfer.VaeinferError`: never an interpreter crash, a hang, or another
exception type.

    python -m benchmarks.stress.fuzz --minutes 20                 # the long run; writes benchmarks/results/fuzz.{json,md}
    python -m benchmarks.stress.fuzz --attempts 2000 --workers 2  # a fixed number of mutations

Seeds are tiny bundles exported by this project (an MLP VAE, and a VQ-VAE with a
class-conditional PixelCNN prior). Each attempt (numpy Generator([seed, attempt]): any attempt
can be replayed alone with --replay N) applies one family of mutations:

- manifest-json: 1-3 structural edits (drop/replace keys, wrong types, huge numbers, NaN/Inf,
  weird strings, deep nesting, other versions and kinds);
- manifest-bytes / graph-bytes: bit flips, interesting bytes, truncation, insertion, deletion,
  duplication, splices from the other graphs;
- graph-proto: structure-aware edits made with `onnx` (operators, domains, attributes,
  initializers' dims/types/contents, external data, inputs/outputs, opsets, IR version, local
  functions, subgraphs, node order, names);
- graph-swap: a graph of another role or of the other seed.

Graph mutations re-sign the manifest's sha256 (so they reach the parsers instead of stopping at
the hash check); half the attempts load with verify=True and half with verify=False, and a few
leave a stale hash to exercise that check too. A loaded model then runs small calls (sample,
encode, decode, score / prior_nll). Attempts run in worker processes (`--worker`) that import
vaeinfer only: a worker that dies is a crash (counted, its bundle kept), one that runs past the
per-attempt timeout is a hang (killed, counted, kept). Workers cap their address space so that
a graph asking for terabytes fails to allocate instead of swapping the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from benchmarks.harness import report
from benchmarks.harness.cli import description

ROOT = Path(__file__).resolve().parents[2]
RESULTS = report.RESULTS
FAMILIES = {"manifest-json": 0.25, "manifest-bytes": 0.1, "graph-bytes": 0.25, "graph-proto": 0.35, "graph-swap": 0.05}
MEMORY_LIMIT = 3 << 30  # bytes of address space per worker


# ---------------------------------------------------------------- seeds (torch + export side)

def build_seeds(root: Path) -> list[Path]:
    """Export the two tiny seed bundles into root/{vae,vq}; returns their paths."""
    import torch

    from vaeinfer.export import export_vae
    from vaeinfer.export.bundle import export_bundle
    from vaeinfer.training.likelihood import Likelihood
    from vaeinfer.training.models import build_model
    from vaeinfer.training.pixelcnn import GatedPixelCNN
    from vaeinfer.kinds.vqvae import vq_graphs

    torch.manual_seed(0)
    root = Path(root)
    shape = (1, 8, 8)
    lik = Likelihood("bernoulli", None)
    vae = build_model("mlp-vae", shape, lik, latent_dim=3, hidden=[8])
    seeds = [export_vae(vae.encoder, vae.decoder, shape, root / "vae", name="fuzz-vae")]
    vq = build_model("vqvae", shape, lik, codebook_size=8, code_dim=4, channels=[4], blocks=0).eval()
    prior = GatedPixelCNN(8, vq.grid, channels=8, layers=2, num_classes=3).eval()
    specs = vq_graphs(shape, vq.grid, 4, 8, 3)
    seeds.append(export_bundle(
        root / "vq", name="fuzz-vq", kind="vqvae", image=shape,
        latent={"grid": list(vq.grid), "codebook_size": 8, "code_dim": 4}, likelihood=lik.to_json(),
        modules={"encoder": vq.encoder, "decoder": vq.decoder, "prior": prior}, specs=specs,
        prior={"num_classes": 3}, limits={"codes": 8, "label": 3},
        comparators={"encoder": lambda *a: {}},  # a seed needs no parity figures; random codebooks may tie
    ))
    return seeds


# ---------------------------------------------------------------- mutations

WEIRD = [None, True, False, 0, -1, 1, 3, 2 ** 31, 2 ** 63, -(2 ** 63) - 1, 10 ** 30, 1e308, float("inf"),
         float("-inf"), float("nan"), -0.0, 0.5, "", "x", "../../etc/passwd", "/etc/passwd", "encoder.onnx",
         "decoder.onnx", "..", ".", "a" * 5000, "\u0000", "\ud800", "é.onnx", "batch", "float16", "int32",
         [], {}, [1, 2], [0, 0], [1, 28, 28], {"a": 1}, ["batch", 1], [-1, 1], [1.5, 2]]
VERSIONS = ["2.0", "0.9", "1.1", "1.99", "1", "1.0.0", "01.00", " 1.0", "1.0\n", "\u0661.\u0660", "999999999999.0",
            "1." + "9" * 5000, "-1.0", "1.-0", ""]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _deep(depth: int) -> str:
    """A placeholder that `dump_json` turns into `depth` nested lists (json.dumps would recurse)."""
    return f"\u0001DEEP{depth}\u0001"


def dump_json(obj, indent) -> bytes:
    text = json.dumps(obj, indent=indent)
    # a placeholder that is a whole JSON string becomes the nesting; one inside another string stays text
    text = re.sub(r'"\\u0001DEEP(\d+)\\u0001"', lambda m: "[" * int(m[1]) + "]" * int(m[1]), text)
    return text.encode()


def mutate_json(rng, manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    for _ in range(int(rng.integers(1, 4))):
        paths = [p for p in _paths(m) if p]
        path = paths[int(rng.integers(len(paths)))]
        parent, key = _get(m, path[:-1]), path[-1]
        op = int(rng.integers(9))
        if op == 0:
            del parent[key]
        elif op == 1:
            parent[key] = WEIRD[int(rng.integers(len(WEIRD)))]
        elif op == 2:
            value = parent[key]
            parent[key] = [value] if rng.random() < 0.5 else json.dumps(value)
        elif op == 3 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = [0, -parent[key], parent[key] + 1, parent[key] - 1, parent[key] * 1000, 2 ** 40][int(rng.integers(6))]
        elif op == 4:
            other = paths[int(rng.integers(len(paths)))]
            parent[key] = json.loads(json.dumps(_get(m, other)))
        elif op == 5 and isinstance(parent, dict):
            parent[["extra", "graphs", "prior", "variants", "fp16", "int8", "file", "sha256"][int(rng.integers(8))]] = \
                WEIRD[int(rng.integers(len(WEIRD)))]
        elif op == 6:
            m["format_version"] = VERSIONS[int(rng.integers(len(VERSIONS)))]
        elif op == 7:
            m["kind"] = ["vae", "vqvae", "VAE", "gan", ""][int(rng.integers(5))]
        else:
            parent[key] = _deep(int(rng.integers(10, 3000)))
            break
    return m


def mutate_bytes(rng, data: bytes, other: bytes = b"") -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        n = len(b)
        op = int(rng.integers(8))
        if n == 0:
            b += bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
            continue
        pos = int(rng.integers(n))
        if op == 0:  # bit flips
            for _ in range(int(rng.integers(1, 17))):
                i = int(rng.integers(n))
                b[i] ^= 1 << int(rng.integers(8))
        elif op == 1:  # interesting bytes
            for _ in range(int(rng.integers(1, 5))):
                b[int(rng.integers(n))] = [0x00, 0xFF, 0x7F, 0x80, 0x01, 0x0A, 0x22, 0x7B][int(rng.integers(8))]
        elif op == 2:  # truncate
            del b[pos:]
        elif op == 3:  # insert random bytes
            b[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
        elif op == 4:  # delete a chunk
            del b[pos:pos + int(rng.integers(1, 256))]
        elif op == 5:  # duplicate a chunk
            chunk = b[pos:pos + int(rng.integers(1, 512))]
            at = int(rng.integers(len(b) + 1))
            b[at:at] = chunk
        elif op == 6 and other:  # splice from another file
            start = int(rng.integers(len(other)))
            b[pos:pos + int(rng.integers(1, 512))] = other[start:start + int(rng.integers(1, 512))]
        else:  # a huge varint where a length might be
            b[pos:pos] = bytes([0xFF] * int(rng.integers(1, 11)) + [0x7F])
    return bytes(b)


OP_NAMES = ["Add", "Conv", "Gemm", "MatMul", "Relu", "Reshape", "Resize", "Slice", "Concat", "Gather", "ArgMin",
            "Split", "Transpose", "Softmax", "Cast", "QuantizeLinear", "DequantizeLinear", "QLinearConv",
            "ConvInteger", "MatMulInteger", "Expand", "Tile", "Pad", "Unsqueeze", "Squeeze", "TopK", "OneHot",
            "If", "Loop", "Scan", "RandomNormal", "ImageDecoder", "StringSplit", "Foo", "", "SequenceAt"]
DOMAINS = ["", "ai.onnx", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training", "custom.domain"]
INTS = [0, 1, -1, 2, 3, 7, -7, 2 ** 31 - 1, -(2 ** 31), 2 ** 62, -(2 ** 62), 2 ** 20]


def mutate_proto(rng, data: bytes) -> bytes:
    """Structure-aware edits of an ONNX model (needs the `onnx` package)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.ParseFromString(data)
    g = model.graph
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(24))
        nodes = list(g.node)
        node = nodes[int(rng.integers(len(nodes)))] if nodes else None
        inits = list(g.initializer)
        init = inits[int(rng.integers(len(inits)))] if inits else None
        try:
            if op == 0 and node is not None:
                node.op_type = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
            elif op == 1 and node is not None:
                node.domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
            elif op == 2 and nodes:
                del g.node[int(rng.integers(len(nodes)))]
            elif op == 3 and node is not None:
                g.node.append(node)  # a duplicate: two producers of the same names
            elif op == 4 and nodes:
                order = rng.permutation(len(nodes))
                new = [nodes[i] for i in order]
                del g.node[:]
                g.node.extend(new)
            elif op == 5 and node is not None and node.input:
                names = [n for other in nodes for n in other.output] + [i.name for i in g.input] + ["", "nope"]
                node.input[int(rng.integers(len(node.input)))] = names[int(rng.integers(len(names)))]
            elif op == 6 and node is not None and node.attribute:
                a = node.attribute[int(rng.integers(len(node.attribute)))]
                if a.type == onnx.AttributeProto.INT:
                    a.i = INTS[int(rng.integers(len(INTS)))]
                elif a.type == onnx.AttributeProto.INTS and len(a.ints):
                    a.ints[int(rng.integers(len(a.ints)))] = INTS[int(rng.integers(len(INTS)))]
                elif a.type == onnx.AttributeProto.FLOAT:
                    a.f = [0.0, -1.0, 1e30, float("nan"), float("inf")][int(rng.integers(5))]
                elif a.type == onnx.AttributeProto.STRING:
                    a.s = [b"", b"cubic", b"xxxxx", b"\xff\xfe"][int(rng.integers(4))]
                else:
                    a.type = int(rng.integers(0, 16))
            elif op == 7 and node is not None:
                node.attribute.append(helper.make_attribute(["axis", "pads", "strides", "group", "kernel_shape",
                                                             "mode", "to", "perm"][int(rng.integers(8))],
                                                            INTS[int(rng.integers(len(INTS)))]))
            elif op == 8 and node is not None and node.attribute:
                del node.attribute[int(rng.integers(len(node.attribute)))]
            elif op == 9 and init is not None and len(init.dims):
                init.dims[int(rng.integers(len(init.dims)))] = [0, -1, 1, 2 ** 40, 2 ** 62, 7][int(rng.integers(6))]
            elif op == 10 and init is not None:
                init.raw_data = init.raw_data[:int(rng.integers(len(init.raw_data) + 1))]
            elif op == 11 and init is not None:
                init.data_type = int(rng.integers(0, 30))
            elif op == 12 and init is not None:  # external data pointing out of the bundle
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for k, v in (("location", ["../../etc/passwd", "/etc/passwd", "x.bin", "decoder.onnx"][int(rng.integers(4))]),
                             ("offset", "0"), ("length", str(len(init.raw_data) or 4))):
                    e = init.external_data.add()
                    e.key, e.value = k, v
                if rng.random() < 0.5:
                    init.ClearField("raw_data")
            elif op == 13 and init is not None and init.data_type == onnx.TensorProto.INT64 and init.raw_data:
                vals = np.frombuffer(init.raw_data, np.int64).copy()  # shape constants of Reshape/Slice
                vals[int(rng.integers(len(vals)))] = INTS[int(rng.integers(len(INTS)))]
                init.raw_data = vals.tobytes()
            elif op == 14 and init is not None and init.raw_data:
                vals = np.frombuffer(init.raw_data[: len(init.raw_data) // 4 * 4], np.float32).copy()
                if len(vals):
                    vals[int(rng.integers(len(vals)))] = [np.nan, np.inf, -np.inf, 3e38][int(rng.integers(4))]
                    init.raw_data = vals.tobytes()
            elif op == 15:
                vi = list(g.input) + list(g.output)
                v = vi[int(rng.integers(len(vi)))]
                t = v.type.tensor_type
                choice = int(rng.integers(4))
                if choice == 0:
                    t.elem_type = int(rng.integers(0, 30))
                elif choice == 1 and len(t.shape.dim):
                    d = t.shape.dim[int(rng.integers(len(t.shape.dim)))]
                    d.dim_value = [0, 1, 2, 5, 2 ** 40][int(rng.integers(5))]
                elif choice == 2:
                    v.name = ["x", "z", "codes", "label", "mean", "params", "logits", "y", ""][int(rng.integers(9))]
                else:
                    t.shape.dim.add().dim_value = 1
            elif op == 16:
                if rng.random() < 0.5 and len(g.input):
                    del g.input[int(rng.integers(len(g.input)))]
                elif len(g.output):
                    del g.output[int(rng.integers(len(g.output)))]
            elif op == 17 and len(model.opset_import):
                o = model.opset_import[int(rng.integers(len(model.opset_import)))]
                if rng.random() < 0.5:
                    o.version = [1, 6, 12, 17, 19, 23, 99, 10 ** 9, -1][int(rng.integers(9))]
                else:
                    o.domain = DOMAINS[int(rng.integers(len(DOMAINS)))]
            elif op == 18:
                model.ir_version = [0, 1, 3, 7, 11, 13, 14, 99, -1][int(rng.integers(9))]
            elif op == 19:
                f = model.functions.add()
                f.name, f.domain = "F", "local"
                f.node.add().op_type = "Relu"
            elif op == 20 and node is not None:  # a subgraph attribute, with or without an allowed body
                body = helper.make_graph([helper.make_node(["Relu", "RandomNormal", "If"][int(rng.integers(3))],
                                                           ["a"], ["b"])], "body", [], [])
                node.attribute.append(helper.make_attribute("then_branch", body))
            elif op == 21:
                model.training_info.add().algorithm.name = "train"
            elif op == 22 and node is not None:
                node.output[0] = [o for n in nodes for o in n.output][int(rng.integers(sum(len(n.output) for n in nodes)))]
            else:
                c = g.node.add()
                c.op_type = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
                c.input.extend([i.name for i in g.input][:int(rng.integers(0, 3))])
                c.output.append(g.output[0].name if len(g.output) and rng.random() < 0.5 else "extra")
        except (ValueError, TypeError, IndexError, OverflowError):
            pass  # this edit does not fit this field; the others still apply
    return model.SerializeToString()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Seed:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.files = {p.name: p.read_bytes() for p in sorted(self.path.glob("*.onnx"))}
        self.roles = {role: entry["file"] for role, entry in self.manifest["graphs"].items()}


def make_attempt(seeds: list[Seed], seed: int, index: int) -> dict:
    """The files of attempt `index` (name -> bytes), its family, verify flag and a description."""
    rng = np.random.default_rng([seed, index])
    s = seeds[int(rng.integers(len(seeds)))]
    family = list(FAMILIES)[int(rng.choice(len(FAMILIES), p=np.array(list(FAMILIES.values())) / sum(FAMILIES.values())))]
    verify = bool(rng.random() < 0.5)
    manifest = json.loads(json.dumps(s.manifest))
    files = dict(s.files)
    resign = True
    role = list(s.roles)[int(rng.integers(len(s.roles)))]
    name = s.roles[role]
    if family == "graph-bytes":
        others = [d for seed_ in seeds for d in seed_.files.values()]
        files[name] = mutate_bytes(rng, files[name], others[int(rng.integers(len(others)))])
    elif family == "graph-proto":
        files[name] = mutate_proto(rng, files[name])
    elif family == "graph-swap":
        pool = [(seed_, f) for seed_ in seeds for f in seed_.files.values()]
        files[name] = pool[int(rng.integers(len(pool)))][1]
    if family.startswith("graph"):
        resign = rng.random() > 0.05  # a few keep the stale hash
        if resign:
            manifest["graphs"][role]["sha256"] = _sha(files[name])
    text = json.dumps(manifest, indent=2).encode()
    if family == "manifest-json":
        text = dump_json(mutate_json(rng, manifest), int(rng.integers(0, 3)))
    elif family == "manifest-bytes":
        text = mutate_bytes(rng, text)
    files["manifest.json"] = text
    return {"index": index, "seed": s.path.name, "family": family, "verify": verify, "role": role,
            "resigned": resign, "files": files}


# ---------------------------------------------------------------- the worker (vaeinfer only)

def _exercise(model) -> None:
    info = model.info
    c, h, w = info.image_shape
    lo, hi = info.value_range
    x = np.linspace(lo, hi, 2 * c * h * w, dtype=np.float32).reshape(2, c, h, w)
    if info.kind == "vae":
        model.sample(2, seed=0)
        post = model.encode(x)
        model.decode(post)
        model.score(x[:1], samples=2)
    else:
        codes = model.encode(x)
        model.decode(codes)
        if info.has_prior:
            label = 0 if info.num_classes else None
            model.sample(1, seed=0, label=label)
            model.prior_nll(codes, label=[0, 0] if info.num_classes else None)


def worker() -> None:
    """Attempts from stdin (JSON lines {dir, verify}), outcomes to stdout."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass
    # results go to the original stdout; anything else that writes to fd 1 (onnxruntime's C++
    # side, say) lands in stderr instead of in the protocol
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import vaeinfer
    from vaeinfer.session import _ort

    _ort()  # imported before the first attempt, whose clock starts at the "ready" line
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    selftest = os.environ.get("VAEINFER_FUZZ_SELFTEST", "")  # "crash:I,hang:J": prove the harness sees both
    plan = dict(item.split(":")[::-1] for item in selftest.split(",") if ":" in item)
    for line in sys.stdin:
        job = json.loads(line)
        if plan.get(str(job.get("index"))) == "crash":
            os.abort()
        if plan.get(str(job.get("index"))) == "hang":
            time.sleep(3600)
        try:
            model = vaeinfer.load(job["dir"], device="cpu", threads=1, verify=job["verify"])
            _exercise(model)
            result = {"outcome": "ok"}
        except vaeinfer.VaeinferError as e:
            result = {"outcome": type(e).__name__, "message": str(e)[:300]}
        except BaseException as e:  # exactly what must never happen: reported, not raised
            result = {"outcome": "unexpected", "type": f"{type(e).__module__}.{type(e).__name__}",
                      "message": str(e)[:500], "traceback": traceback.format_exc()[-3000:]}
        out.write(json.dumps(result) + "\n")
        out.flush()


# ---------------------------------------------------------------- the campaign

class _Worker:
    def __init__(self, root: Path, n: int):
        self.dir = root / f"w{n}"
        self.stderr = root / f"w{n}.stderr"  # a file, not a pipe: a chatty worker can never block on it
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", __spec__.name, "--worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=str(ROOT),
                                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
        self.job = None
        self.started = 0.0
        self.buffer = b""

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the worker has imported vaeinfer and onnxruntime (not part of any attempt's time)."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"a fuzz worker did not start: {self.kill()}")

    def submit(self, job: dict) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        for name, data in job["files"].items():
            (self.dir / name).write_bytes(data)
        self.job, self.started = job, time.monotonic()
        line = json.dumps({"dir": str(self.dir), "verify": job["verify"], "index": job["index"]}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def kill(self) -> str:
        self.proc.kill()
        self.proc.wait()
        return self.errors()

    def errors(self) -> str:
        return self.stderr.read_bytes().decode("utf-8", "replace")[-3000:]


STAGES = [  # where a BundleError was raised, told by its message
    ("hash check", "sha256"),
    ("protobuf scan: malformed", "not a valid ONNX model"),
    ("protobuf scan: refused (allowlist, external data, functions)", ": refused: "),
    ("onnxruntime refused to load", "onnxruntime cannot load"),
    ("graph signature vs manifest", "the manifest promises"),
    ("onnxruntime failed at run time", "onnxruntime failed to run"),
    ("manifest", "manifest"),
    ("files", ""),
]


def stage(message: str) -> str:
    return next(name for name, needle in STAGES if needle in message)


def run_campaign(seed_paths, attempts: int | None = None, minutes: float | None = None, seed: int = 0,
                 workers: int = 1, timeout: float = 20.0, keep: Path | None = None, log=None) -> dict:
    """Run attempts until `attempts` are done or `minutes` pass; returns the tallies."""
    seeds = [Seed(p) for p in seed_paths]
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    tmp = Path(tempfile.mkdtemp(prefix="vaeinfer-fuzz-"))
    pool = [_Worker(tmp, i) for i in range(workers)]
    outcomes, stages, by_family, by_verify = Counter(), Counter(), defaultdict(Counter), defaultdict(Counter)
    examples: dict[str, str] = {}
    incidents: list[dict] = []
    started, submitted, done = time.monotonic(), 0, 0

    def more() -> bool:
        if attempts is not None and submitted >= attempts:
            return False
        return deadline is None or time.monotonic() < deadline

    def record(w: _Worker, result: dict) -> None:
        nonlocal done
        job = w.job
        done += 1
        outcome = result["outcome"]
        outcomes[outcome] += 1
        by_family[job["family"]][outcome] += 1
        by_verify["verify" if job["verify"] else "no-verify"][outcome] += 1
        if outcome == "BundleError":
            stages[stage(result.get("message", ""))] += 1
        if outcome != "ok" and outcome not in examples:
            examples[outcome] = f"attempt {job['index']} ({job['family']}): {result.get('message', '')[:400]}"
        if outcome in ("crash", "hang", "unexpected"):
            info = {k: job[k] for k in ("index", "seed", "family", "verify", "role", "resigned")} | \
                   {k: v for k, v in result.items() if k != "outcome"} | {"outcome": outcome}
            if keep is not None:
                dest = keep / f"{outcome}-{job['index']}"
                shutil.copytree(w.dir, dest, dirs_exist_ok=True)
                info["kept"] = str(dest)
            incidents.append(info)
            if log:
                log(f"attempt {job['index']}: {outcome}: {json.dumps({k: v for k, v in info.items() if k != 'traceback'})[:400]}")
        w.job = None

    try:
        while True:
            for i, w in enumerate(pool):
                if w.job is None and more():
                    if not getattr(w, "started_ok", False):
                        w.wait_ready()
                        w.started_ok = True
                    w.submit(make_attempt(seeds, seed, submitted))
                    submitted += 1
            busy = [w for w in pool if w.job is not None]
            if not busy:
                break
            ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], 0.5)
            now = time.monotonic()
            for i, w in enumerate(pool):
                if w.job is None:
                    continue
                if w.proc.stdout in ready:
                    line = w.proc.stdout.readline()
                    if line:
                        record(w, json.loads(line))
                        continue
                    w.proc.wait()
                    code = w.proc.returncode
                    stderr = w.errors()
                    how = signal.Signals(-code).name if code < 0 else f"exit {code}"
                    record(w, {"outcome": "crash", "how": how, "stderr": stderr})
                    pool[i] = _Worker(tmp, i)
                elif now - w.started > timeout:
                    stderr = w.kill()
                    record(w, {"outcome": "hang", "seconds": round(now - w.started, 1), "stderr": stderr})
                    pool[i] = _Worker(tmp, i)
            if log and done and done % 1000 == 0:
                log(f"{done} attempts, {dict(outcomes)}")
    finally:
        for w in pool:
            w.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    return {
        "attempts": done, "seconds": round(elapsed, 1), "seed": seed, "workers": workers, "timeout_s": timeout,
        "outcomes": dict(outcomes.most_common()),
        "crashes": outcomes["crash"], "hangs": outcomes["hang"], "unexpected": outcomes["unexpected"],
        "bundle_errors_by_stage": dict(stages.most_common()),
        "by_family": {k: dict(v.most_common()) for k, v in sorted(by_family.items())},
        "by_verify": {k: dict(v.most_common()) for k, v in sorted(by_verify.items())},
        "examples": examples, "incidents": incidents,
    }


def replay(seed_paths, seed: int, index: int, out: Path) -> dict:
    """Write attempt `index` into `out` (to load it by hand, e.g. with isolate=True)."""
    job = make_attempt([Seed(p) for p in seed_paths], seed, index)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in job["files"].items():
        (out / name).write_bytes(data)
    return {k: v for k, v in job.items() if k != "files"}


def write_report(result: dict, argv=None) -> None:
    import onnxruntime

    import vaeinfer

    result = {**report.provenance(__spec__.name, argv), **result, "vaeinfer": vaeinfer.__version__,
              "onnxruntime": onnxruntime.__version__}
    errors = {k: v for k, v in result["outcomes"].items() if k != "ok"}
    lines = [
        f"{result['seconds']:.0f} s, {result['workers']} worker(s), vaeinfer {result['vaeinfer']}, "
        f"onnxruntime {result['onnxruntime']}.", "",
        "| inputs tried | loaded and ran | typed errors | crashes | hangs | other exception types |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result['attempts']} | {result['outcomes'].get('ok', 0)} | "
        f"{sum(v for k, v in errors.items() if k not in ('crash', 'hang', 'unexpected'))} | {result['crashes']} | "
        f"{result['hangs']} | {result['unexpected']} |", "",
        "Outcomes by mutation family:", "", "| family | " + " | ".join(sorted({k for v in result['by_family'].values() for k in v})) + " |",
    ]
    keys = sorted({k for v in result["by_family"].values() for k in v})
    lines.append("|---|" + "---:|" * len(keys))
    for fam, counts in result["by_family"].items():
        lines.append(f"| {fam} | " + " | ".join(str(counts.get(k, 0)) for k in keys) + " |")
    lines += ["", "Where the BundleErrors were raised:", "", "| stage | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["bundle_errors_by_stage"].items()]
    lines += ["", "By hash verification: " + "; ".join(f"{k}: {dict(v)}" for k, v in result["by_verify"].items()), "",
              "An example message of each error type:", ""]
    lines += [f"- {k}: {v}" for k, v in result["examples"].items()]
    if result["incidents"]:
        lines += ["", "Incidents (replay with `--replay INDEX`):", ""]
        lines += [f"- attempt {i['index']} ({i['family']}, {i['seed']}): {i['outcome']} "
                  f"{i.get('how', '')}{i.get('type', '')} {i.get('message', '')[:200]}" for i in result["incidents"]]
    report.write("fuzz", "Bundle fuzzing", result, lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--attempts", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per attempt before it counts as a hang")
    ap.add_argument("--replay", type=int, default=None, help="write attempt N into ./fuzz-replay-N and stop")
    ap.add_argument("--no-report", action="store_true", help="do not write benchmarks/results/fuzz.*")
    ap.add_argument("--write-seeds", type=Path, default=None,
                    help="export the seed bundles into this folder and stop (tests/data/fuzz-seeds is made so)")
    args = ap.parse_args(argv)
    if args.worker:
        worker()
        return
    if args.write_seeds is not None:
        print(build_seeds(args.write_seeds))
        return
    if args.attempts is None and args.minutes is None:
        args.attempts = 2000
    seed_root = Path(tempfile.mkdtemp(prefix="vaeinfer-fuzz-seeds-"))
    try:
        paths = build_seeds(seed_root)
        if args.replay is not None:
            out = Path(f"fuzz-replay-{args.replay}")
            print(json.dumps(replay(paths, args.seed, args.replay, out)), f"-> {out}")
            return
        keep = RESULTS / "fuzz-incidents"
        result = run_campaign(paths, args.attempts, args.minutes, args.seed, args.workers, args.timeout, keep,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        shutil.rmtree(seed_root, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "incidents"}, indent=2))
    if not args.no_report:
        write_report(result, argv)


if __name__ == "__main__":
    main()
