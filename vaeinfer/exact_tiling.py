"""Exact tiled decode and encode (numpy only): a tiled result equal to the untiled one.

A blended tiled decode (`vaeinfer.tiling`) shows seams on AutoencoderKL-style models because
their GroupNorms and the mid-block attention see one tile instead of the image. Here the graph is
cut at every GroupNorm into *stages* (made at export, `vaeinfer.export.exact_tiling`, listed in
the manifest's `exact_tiling` slot): each stage graph is fully convolutional and takes its
input activation (a tile of it, with a halo covering its receptive field), the GroupNorm
statistics of that input as explicit inputs (`mean`, `rstd`, per channel), optionally a skip
input (a resnet's shortcut), and returns its output activation. The runtime runs the stages one
after the other over the whole image:

- each stage runs tile by tile; a tile's input region is its output region mapped back through
  the stage's resampling, widened by the halo and clamped at the image border (where the graph's
  own zero padding reproduces the untiled border), and the halo is cropped from its output, so
  every output pixel is computed from the same values as in the untiled graph;
- the GroupNorm statistics of an activation are accumulated from the cropped tiles as they are
  written (per channel count, mean and M2 in float64, combined by Chan's formula, then per group);
- the mid-block attention runs over the whole latent: softmax(Q K^T / sqrt(d)) V in float32, by a
  weightless attention graph (one chunk of queries against one chunk of keys: the unnormalised
  output, the row maxima and sums), chunked over queries, with an online softmax (the chunks'
  results combined here) over key chunks when K and V do not fit the budget.

Full-image activations stay in memory while the budget holds them and go to files in a temporary
folder otherwise (read and written with pread/pwrite, never mapped, so they do not count in the
process's resident memory); the folder is removed afterwards. `plan` chooses the tiles, the
attention chunks and what goes to disk from a memory budget before anything runs, and raises
`MemoryBudgetError` naming the smallest budget that works when the budget cannot be met.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from vaeinfer import host_memory

from vaeinfer.errors import BundleError, InputError
from vaeinfer.manifest_fields import get as _get, positive as _positive
from vaeinfer.spec import BATCH, GraphSpec, TensorSpec

SLOT = "exact_tiling"
DIRECTIONS = ("decoder", "encoder")
RESAMPLES = {"none": Fraction(1), "up": Fraction(2), "down": Fraction(1, 2)}
# alignment of a stage's output tiles: an "up" stage's tiles start on even output pixels (whole input pixels)
ALIGN = {"none": 1, "up": 2, "down": 1}
# working memory of one tile beyond its input and output: float32 copies per input / output element
# (the feeds, the normalised and activated input, the conv output, the residual sum, the crop and
# the statistics' temporary). Calibrated against measured peaks (tests/test_exact_tiling.py on a
# small model; SD's decoder at 1024^2 within 1 GiB, per step, against VmHWM: every step's peak
# 10-60% below its estimate).
WORK_IN, WORK_OUT, WORK_UP = 3, 4, 1
# the stage graphs share one onnxruntime arena (fast: no page faults per run); tiles of varying
# sizes fragment it: measured up to ~1.5x their working set
ARENA = 1.5
IM2COL = 9
NCHWC = 16
# what a run adds besides its activations and tiles: numpy's and onnxruntime's per-run buffers,
# the statistics, Python objects (measured on the test model: 4-7 MiB; 10 counted)
OVERHEAD = 10 << 20
SESSION_BYTES = 256 << 10  # a loaded stage graph's own memory beyond its weights (onnxruntime session)
MIN_TILE = 8  # the smallest tile side (output pixels) the planner uses
MIN_STRIP = 16  # full-width strips need at least this many rows, else square tiles
# the planner first spills activations to disk rather than run tiles smaller than this side (or
# strips of fewer pixels): small tiles cost more in per-call overhead and halos than the page
# cache costs in copies; only a budget too small for that falls back to MIN_TILE
GOOD_TILE = 128
GOOD_QUERIES, GOOD_KEYS = 1024, 4096  # the attention's chunks in that first pass
_GRAPH_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.onnx$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3, "m": 1 << 20, "mib": 1 << 20, "mb": 10 ** 6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}


class MemoryBudgetError(InputError):
    """max_memory cannot be met: `smallest` is the smallest budget (bytes) that works."""

    def __init__(self, message: str, smallest: int):
        super().__init__(message)
        self.smallest = smallest


def parse_bytes(value, what: str = "max_memory") -> int:
    """A memory size: an int (bytes) or a string such as "2GiB", "512MiB", "1.5G", "800MB"
    (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        unit = m and m[2].lower()
        if not m or unit not in _UNITS:
            raise InputError(f"{what}: expected a size such as 2GiB, 512MiB, 1.5G or a number of bytes, got {value!r:.40}")
        n = int(float(m[1]) * _UNITS[unit])
    else:
        raise InputError(f"{what}: expected a size such as '2GiB' or a number of bytes, got {type(value).__name__}")
    if n <= 0:
        raise InputError(f"{what}: expected a positive size, got {value!r}")
    return n


def human(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


# --- the manifest slot ------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a direction's plan: a stage graph ("conv") or the attention ("attention", whose
    graph computes one chunk of it: `attention_spec`)."""

    type: str
    x: str
    in_channels: int
    out: str
    out_channels: int
    graph: str | None = None  # the stage graph's role name (its manifest key)
    file: str | None = None
    sha256: str | None = None
    skip: str | None = None
    skip_channels: int = 0
    norm: tuple[int, float] | None = None  # (groups, eps) of the GroupNorm applied to x at the start
    resample: str = "none"
    halo: int = 0  # input pixels each side
    heads: int = 1  # attention
    scale: float = 1.0  # attention: the softmax scale

    @property
    def factor(self) -> Fraction:
        return RESAMPLES[self.resample]


@dataclass(frozen=True)
class Direction:
    """The decoder's or the encoder's stage plan: input -> steps -> outputs (channel slices of the last)."""

    input: str
    input_channels: int
    outputs: tuple[tuple[str, int], ...]
    steps: tuple[Step, ...]

    @property
    def factor(self) -> Fraction:
        return math.prod((s.factor for s in self.steps), start=Fraction(1))

    def graphs(self) -> dict[str, Step]:
        return {s.graph: s for s in self.steps}


def stage_spec(step: Step) -> GraphSpec:
    """The input/output spec of a step's graph (shared by export and runtime)."""
    if step.type == "attention":
        return attention_spec(step)
    hw = ("height", "width")
    ins = [TensorSpec("x", "float32", (BATCH, step.in_channels, *hw))]
    if step.skip:
        ins.append(TensorSpec("skip", "float32", (BATCH, step.skip_channels, *hw)))
    if step.norm:
        ins += [TensorSpec("mean", "float32", (BATCH, step.in_channels)),
                TensorSpec("rstd", "float32", (BATCH, step.in_channels))]
    outs = (TensorSpec("y", "float32", (BATCH, step.out_channels, "out_height", "out_width")),)
    return GraphSpec(step.graph, tuple(ins), outs, batch_buckets=False, variants=False)


def attention_spec(step: Step) -> GraphSpec:
    """The attention graph: q (heads, head_dim, queries), k and v (heads, head_dim, keys), channel
    first as the activations store them -> o = V softmax'(Q^T K * scale)^T (heads, head_dim,
    queries), unnormalised: exp(scores - m), with m and l the rows' maxima and sums (heads,
    queries); o / l is the attention over these keys, and chunks of keys combine exactly."""
    d = step.out_channels // step.heads
    return GraphSpec(step.graph, (TensorSpec("q", "float32", (BATCH, d, "queries")),
                                  TensorSpec("k", "float32", (BATCH, d, "keys")),
                                  TensorSpec("v", "float32", (BATCH, d, "keys"))),
                     (TensorSpec("o", "float32", (BATCH, d, "queries")), TensorSpec("m", "float32", (BATCH, "queries")),
                      TensorSpec("l", "float32", (BATCH, "queries"))), batch_buckets=False, variants=False)


def step_json(step: Step) -> dict:
    out = {"type": step.type, "x": step.x, "in_channels": step.in_channels, "out": step.out,
           "out_channels": step.out_channels, "graph": step.graph, "file": step.file, "sha256": step.sha256}
    if step.type == "conv":
        out.update(skip=step.skip,
                   skip_channels=step.skip_channels, norm=None if step.norm is None else
                   {"groups": step.norm[0], "eps": step.norm[1]}, resample=step.resample, halo=step.halo)
    else:
        out.update(heads=step.heads, scale=step.scale)
    return out


def parse_slot(data, kind_ok: bool = True) -> dict | None:
    """The manifest's optional `exact_tiling` slot -> {"decoder": Direction, "encoder": Direction,
    "unavailable": reason | None}, or None when absent; BundleError when malformed."""
    if data is None:
        return None
    where = SLOT
    if not isinstance(data, dict):
        raise BundleError(f"manifest: expected {where} to be an object, got {type(data).__name__}")
    out = {"unavailable": None}
    if "unavailable" in data:
        out["unavailable"] = _get(data, "unavailable", str, where)
    roles = set()
    for direction in DIRECTIONS:
        if direction not in data:
            continue
        d = _get(data, direction, dict, where)
        w = f"{where}.{direction}"
        inp = _get(d, "input", str, w)
        steps, channels = [], {inp: _positive(d, "input_channels", w, 1 << 16)}
        raw_steps = _get(d, "steps", list, w)
        if not raw_steps or len(raw_steps) > 4096:
            raise BundleError(f"manifest: expected {w}.steps to be a list of 1 to 4096 steps")
        for i, s in enumerate(raw_steps):
            step = _parse_step(s, f"{w}.steps[{i}]", channels)
            if step.graph is not None:
                if step.graph in roles:
                    raise BundleError(f"manifest: {w}.steps[{i}].graph {step.graph!r} is used twice")
                roles.add(step.graph)
            channels[step.out] = step.out_channels
            steps.append(step)
        outs = _get(d, "outputs", list, w)
        try:
            outputs = tuple((str(n), int(c)) for n, c in outs)
        except (TypeError, ValueError):
            raise BundleError(f"manifest: expected {w}.outputs to be [[name, channels], ...], got {outs!r:.80}") from None
        if not outputs or sum(c for _, c in outputs) != steps[-1].out_channels or any(c < 1 for _, c in outputs):
            raise BundleError(f"manifest: {w}.outputs' channels must add up to the last step's "
                              f"{steps[-1].out_channels}, got {outs!r:.80}")
        out[direction] = Direction(inp, channels[inp], outputs, tuple(steps))
    return out


def _parse_step(s, w: str, channels: dict) -> Step:
    if not isinstance(s, dict):
        raise BundleError(f"manifest: expected {w} to be an object")
    kind = _get(s, "type", str, w)
    if kind not in ("conv", "attention"):
        raise BundleError(f"manifest: expected {w}.type 'conv' or 'attention', got {kind!r:.40}")
    x = _get(s, "x", str, w)
    if x not in channels:
        raise BundleError(f"manifest: {w}.x {x!r:.40} is not the input or an earlier step's output")
    cin = _positive(s, "in_channels", w, 1 << 16)
    if cin != channels[x]:
        raise BundleError(f"manifest: {w}.in_channels is {cin}, but {x} has {channels[x]} channels")
    out, cout = _get(s, "out", str, w), _positive(s, "out_channels", w, 1 << 16)
    if out in channels:
        raise BundleError(f"manifest: {w}.out {out!r:.40} is written twice")
    if kind == "attention":
        heads = _positive(s, "heads", w, 1 << 12)
        scale = _get(s, "scale", (int, float), w)
        if cin != 3 * cout or cout % heads or not (0 < scale < 1e6):
            raise BundleError(f"manifest: {w}: attention takes q, k, v (3 x {cout} channels, {heads} heads) "
                              f"and a positive scale; got {cin} channels, scale {scale!r}")
    if "graph" not in s:
        raise BundleError(f"manifest: {w} has no graph (a bundle exported by an earlier vaeinfer, whose "
                          "attention ran outside the graphs): re-export it (vaeinfer export --from-diffusers DIR)")
    graph, file, digest = (_get(s, k, str, w) for k in ("graph", "file", "sha256"))
    if not _GRAPH_FILE.match(file) or not _SHA256.match(digest):
        raise BundleError(f"manifest: expected {w}.file a plain '<name>.onnx' and sha256 64 hex digits")
    if kind == "attention":
        return Step("attention", x, cin, out, cout, graph=graph, file=file, sha256=digest, heads=heads,
                    scale=float(scale))
    skip = s.get("skip")
    skip_channels = 0
    if skip is not None:
        if not isinstance(skip, str) or skip not in channels:
            raise BundleError(f"manifest: {w}.skip {skip!r:.40} is not an earlier activation")
        skip_channels = _positive(s, "skip_channels", w, 1 << 16)
        if skip_channels != channels[skip]:
            raise BundleError(f"manifest: {w}.skip_channels is {skip_channels}, {skip} has {channels[skip]}")
    norm = s.get("norm")
    if norm is not None:
        groups = _positive(norm, "groups", f"{w}.norm", 1 << 16) if isinstance(norm, dict) else 0
        eps = norm.get("eps") if isinstance(norm, dict) else None
        if not groups or cin % groups or not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise BundleError(f"manifest: expected {w}.norm {{groups dividing {cin}, 0 < eps < 1}}, got {norm!r:.80}")
        norm = (groups, float(eps))
    resample = _get(s, "resample", str, w)
    if resample not in RESAMPLES:
        raise BundleError(f"manifest: expected {w}.resample in {list(RESAMPLES)}, got {resample!r:.40}")
    halo = s.get("halo")
    if not isinstance(halo, int) or isinstance(halo, bool) or not 0 <= halo <= 256:
        raise BundleError(f"manifest: expected {w}.halo an integer 0..256, got {halo!r:.40}")
    if resample == "down" and halo % 2:
        raise BundleError(f"manifest: {w}: a downsampling stage's halo must be even, got {halo}")
    return Step("conv", x, cin, out, cout, graph=graph, file=file, sha256=digest, skip=skip,
                skip_channels=skip_channels, norm=norm, resample=resample, halo=halo)


# --- activations: in memory or in a file -------------------------------------------------------

class _Pool(ThreadPoolExecutor):
    """The threads of one run, and how many (what `_by_channels` splits by)."""

    def __init__(self, workers: int):
        super().__init__(workers, thread_name_prefix="vaeinfer-exact")
        self.workers = workers


def _by_channels(pool: _Pool | None, fn, c0: int, c1: int) -> list:
    """fn(a, b) over channel ranges splitting [c0, c1) between the pool's threads (the copies to
    and from spill files and the statistics are per channel: the same values however split; numpy
    and the syscalls release the GIL), in order."""
    parts = pool.workers if pool is not None else 1
    if parts <= 1 or c1 - c0 < 2 * parts:
        return [fn(c0, c1)]
    step = -(-(c1 - c0) // parts)
    return list(pool.map(lambda a: fn(a, min(c1, a + step)), range(c0, c1, step)))


class _Memory:
    """An (N, C, H, W) float32 array in memory. A tile is stored as `begin`, `put` for each of
    its channel groups (from several threads), `end` (what `_store` does)."""

    def __init__(self, shape, array=None):
        self.a = np.empty(shape, np.float32) if array is None else array
        self.shape = self.a.shape

    def read(self, n, y0, y1, x0, x1, c0=0, c1=None):
        return self.a[n, c0:c1, y0:y1, x0:x1]

    def begin(self, n, y0, x0, c, h, w):
        pass

    def put(self, n, c0, y0, x0, part, scratch) -> np.ndarray:
        """Store channels c0.. of a tile; returns where they now are (read again while in cache).
        scratch: a float32 buffer at least part's size (a _Disk's needs one)."""
        view = self.a[n, c0:c0 + part.shape[0], y0:y0 + part.shape[1], x0:x0 + part.shape[2]]
        view[...] = part
        return view

    def end(self, n, y0, x0, h, w):
        pass

    def close(self):
        self.a = None


class _Disk:
    """An (N, C, H, W) float32 array in a file, read and written by region with pread/pwrite
    (through the page cache, never mapped into the process).

    A tile narrower than the image is not written row by row (one syscall per channel and row:
    millions for a large image): the tiles of a band of rows are gathered in a (C, rows, W)
    buffer, written a channel at a time once the band is complete (the planner counts the
    buffer in the step's working memory, `_conv_work(..., spill_width=)`)."""

    def __init__(self, shape, folder, pool: _Pool | None = None, reuse: _Disk | None = None):
        self.shape, self.pool = tuple(shape), pool
        self.band = None  # (n, y0, buffer (C, rows, W), columns written)
        if reuse is not None:  # a freed file of the same shape, overwritten (its pages already cached)
            self.fd, self.path, reuse.fd = reuse.fd, reuse.path, None
            return
        self.fd, self.path = tempfile.mkstemp(suffix=".f32", dir=folder)
        os.ftruncate(self.fd, 4 * math.prod(self.shape))

    def _offset(self, n, c, y, x):
        _, C, H, W = self.shape
        return 4 * (((n * C + c) * H + y) * W + x)

    def read(self, n, y0, y1, x0, x1, c0=0, c1=None):
        if self.band is not None:
            raise RuntimeError("exact tiling: a spill file read before its band of tiles was complete")
        C, W = self.shape[1], self.shape[3]
        c1 = C if c1 is None else c1
        out = np.empty((c1 - c0, y1 - y0, x1 - x0), np.float32)

        def read(a, b):
            for c in range(a, b):
                if x0 == 0 and x1 == W:
                    _pread(self.fd, out[c - c0], self._offset(n, c, y0, 0))
                else:
                    for r in range(y1 - y0):
                        _pread(self.fd, out[c - c0, r], self._offset(n, c, y0 + r, x0))
        _by_channels(self.pool, read, c0, c1)
        return out

    def begin(self, n, y0, x0, c, h, w):
        if w == self.shape[3]:
            return
        if self.band is None:
            self.band = (n, y0, np.empty((c, h, self.shape[3]), np.float32), 0)
        bn, by0, buf, _ = self.band
        if (bn, by0, buf.shape[1]) != (n, y0, h):
            raise RuntimeError(f"exact tiling: tile at row {y0} written before the band at row {by0} was complete")

    def put(self, n, c0, y0, x0, part, scratch) -> np.ndarray:
        """Full-width rows: copied to `scratch` (contiguous) and written; a narrower tile: into the band."""
        if part.shape[2] != self.shape[3]:
            view = self.band[2][c0:c0 + part.shape[0], :, x0:x0 + part.shape[2]]
            view[...] = part
            return view
        buf = scratch[:part.shape[0]]
        buf[...] = part
        for j in range(part.shape[0]):
            _pwrite(self.fd, buf[j], self._offset(n, c0 + j, y0, 0))
        return buf

    def end(self, n, y0, x0, h, w):
        if self.band is None:
            return
        bn, by0, buf, filled = self.band
        self.band = (bn, by0, buf, filled + w)
        if filled + w == self.shape[3]:
            self.band = None

            def write(a, b):
                for c in range(a, b):
                    _pwrite(self.fd, buf[c], self._offset(n, c, y0, 0))
            _by_channels(self.pool, write, 0, buf.shape[0])

    def close(self):
        self.band = None
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = None


def _pread(fd, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"exact tiling: short read from a spill file at {offset + done}")
        done += got


def _pwrite(fd, block: np.ndarray, offset: int) -> None:
    view = memoryview(block).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


# --- GroupNorm statistics ---------------------------------------------------------------------

def _moments(part: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel mean and M2 (float64) of `part` (c, h, w); scratch: a float32 buffer of its shape.
    Rows summed in float32 (numpy's pairwise summation along the contiguous axis: error
    ~eps log2(width)), rows and tiles combined in float64: as exact as a float64 sum, 3x faster."""
    mean = part.sum(axis=2).sum(axis=1, dtype=np.float64) / (part.shape[1] * part.shape[2])
    d = np.subtract(part, mean.astype(np.float32)[:, None, None], out=scratch)
    np.square(d, out=d)
    return mean, d.sum(axis=2).sum(axis=1, dtype=np.float64)


# channels stored (and their statistics taken) in groups of about this many bytes: each group is
# summed right after it is copied, while it is still in the CPU's cache (one pass over memory
# instead of three)
GROUP_BYTES = 1 << 20


def _store(pool: _Pool | None, dst, acc, n: int, y0: int, x0: int, block: np.ndarray, adopted: bool = False) -> None:
    """Store a tile `block` (C, h, w) of image n at (y0, x0) in `dst` (a _Memory or a _Disk) and add
    it to the statistics `acc` (a _Stats, or None), channel group by channel group, the groups
    split between the pool's threads. adopted: `block` already is dst's (statistics only)."""
    c, h, w = block.shape
    if c == 0 or h == 0 or w == 0:
        return
    g = max(1, GROUP_BYTES // (4 * h * w))
    if not adopted:
        dst.begin(n, y0, x0, c, h, w)

    def groups(a, b):
        copy = None if adopted else np.empty((min(g, b - a), h, w), np.float32)
        scratch = None if acc is None else np.empty((min(g, b - a), h, w), np.float32)
        out = []
        for c0 in range(a, b, g):
            part = block[c0:min(b, c0 + g)]
            held = part if adopted else dst.put(n, c0, y0, x0, part, copy)
            if acc is not None:
                out.append(_moments(held, scratch[:part.shape[0]]))
        return out
    parts = _by_channels(pool, groups, 0, c)
    if not adopted:
        dst.end(n, y0, x0, h, w)
    if acc is not None:
        mean, m2 = (np.concatenate(v) for v in zip(*(m for p in parts for m in p)))
        acc.combine(n, mean, m2, h * w)


class _Stats:
    """Per-(image, channel) count, mean and M2 in float64, combined over tiles (Chan et al.)."""

    def __init__(self, n: int, c: int):
        self.count = np.zeros((n, c))
        self.mean = np.zeros((n, c))
        self.m2 = np.zeros((n, c))

    def combine(self, i: int, mean: np.ndarray, m2: np.ndarray, cnt: int) -> None:
        """Add a tile's per channel mean and M2 over `cnt` pixels to image i's."""
        n_a = self.count[i]
        total = n_a + cnt
        delta = mean - self.mean[i]
        self.mean[i] += delta * (cnt / total)
        self.m2[i] += m2 + delta * delta * (n_a * cnt / total)
        self.count[i] = total

    def norm(self, groups: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
        """(mean, rstd) per (image, channel), float32: each channel gets its group's values."""
        n, c = self.count.shape
        cnt = self.count.reshape(n, groups, -1)
        mean_c, m2_c = self.mean.reshape(n, groups, -1), self.m2.reshape(n, groups, -1)
        total = cnt.sum(-1)
        mean = (cnt * mean_c).sum(-1) / total
        m2 = m2_c.sum(-1) + (cnt * (mean_c - mean[..., None]) ** 2).sum(-1)
        rstd = 1.0 / np.sqrt(m2 / total + eps)
        expand = lambda v: np.repeat(v, c // groups, axis=1).astype(np.float32)  # noqa: E731
        return expand(mean), expand(rstd)


# --- the plan ---------------------------------------------------------------------------------

@dataclass
class StepPlan:
    tile: tuple[int, int] = (0, 0)  # conv: output tile (rows, cols); attention: (query rows, key rows)
    tiles: int = 0  # per image
    work: int = 0  # bytes of one tile's working memory
    live: int = 0  # bytes of the in-memory activations live during the step


@dataclass
class Plan:
    shape: tuple  # the input's (N, C, H, W)
    sizes: dict  # activation -> (N, C, H, W)
    disk: frozenset  # activations spilled to files
    steps: list  # StepPlan per step
    resident: int  # bytes counted for the stage graphs' weights (and sessions), when not loaded yet
    budget: int | None
    last_use: dict = field(repr=False, default_factory=dict)
    stream: bool = False  # stage graphs loaded per step and released (set by the caller that loads them)

    @property
    def total(self) -> int:
        """The `progress` total: tiles (and attention query chunks) over all steps and images."""
        return self.shape[0] * sum(s.tiles for s in self.steps)

    @property
    def peak(self) -> int:
        """The estimated peak memory beyond the input and the output arrays (bytes)."""
        return self.resident + OVERHEAD + max(s.live + s.work for s in self.steps)

    def describe(self) -> str:
        spilled = sum(4 * math.prod(self.sizes[a]) for a in self.disk)
        return (f"{len(self.steps)} steps, {self.total} tiles, estimated peak {human(self.peak)}"
                + (f" of {human(self.budget)}" if self.budget else "")
                + (f", {len(self.disk)} activations ({human(spilled)}) on disk" if self.disk else ""))


def _sizes(direction: Direction, shape) -> dict:
    n, _, h, w = shape
    sizes = {direction.input: tuple(shape)}
    for s in direction.steps:
        _, _, hh, ww = sizes[s.x]
        oh, ow = hh * s.factor, ww * s.factor
        if oh.denominator != 1 or ow.denominator != 1:
            raise InputError(f"exact tiling: a {hh}x{ww} activation cannot be resampled {s.resample}; the input's "
                             f"height and width must be multiples of the model's downsampling factor")
        sizes[s.out] = (n, s.out_channels, int(oh), int(ow))
    return sizes


def _conv_work(step: Step, rows: int, cols: int, spill_width: int | None = None) -> int:
    """Bytes of one (rows, cols) output tile's working memory; spill_width: the output goes to a
    spill file this wide, where tiles narrower than it are gathered in a band (`_Disk`)."""
    f = step.factor
    in_r, in_c = math.ceil(rows / f) + 2 * step.halo, math.ceil(cols / f) + 2 * step.halo
    a_in, a_out = in_r * in_c, int(in_r * in_c * f * f)
    out_factor = WORK_OUT + (WORK_UP if step.resample == "up" else 0) + (1 if step.skip else 0)  # + the shortcut's
    work = 4 * ((step.in_channels + step.skip_channels) * a_in * WORK_IN + step.out_channels * a_out * out_factor)
    # onnxruntime's 3x3 convolutions expand their input 9-fold (im2col) over the output's area,
    # except where its blocked layout (NCHWc) runs them directly: channels in multiples of the
    # SIMD block (16 floats on AVX-512, 8 on AVX2)
    blocked = step.in_channels % NCHWC == 0 and step.out_channels % NCHWC == 0
    im2col = 0 if blocked else 4 * IM2COL * max(step.in_channels, step.out_channels) * a_out
    band = 4 * step.out_channels * rows * spill_width if spill_width and cols < spill_width else 0
    return int((work + im2col) * ARENA) + band


def _attention_work(step: Step, width: int, q_rows: int, k_rows: int, kv_resident: bool, height: int) -> int:
    """Bytes of one (query chunk, key chunk) of the attention: the graph's scores, their
    exponentials and its arena; q, its output and the running combination; a chunk of k and v
    read from disk or copied from memory (none when all keys are in one resident chunk)."""
    c = step.out_channels
    lq, lk = q_rows * width, k_rows * width
    kv = 0 if kv_resident and k_rows >= height else 3 * c * lk
    return 4 * (c * lq * 6 + kv) + int(4 * step.heads * lq * lk * 2 * ARENA)


def _conv_tile(step: Step, oh: int, ow: int, avail: int | None, tile=None,
               min_side: int = MIN_TILE, spill_width: int | None = None) -> tuple[int, int] | None:
    """The output tile (rows, cols) of a conv step: the user's, or the largest that fits `avail`
    (full-width strips when they are tall enough, else squares), or None when none fits."""
    align = ALIGN[step.resample]

    def up(v):
        return max(align, -(-v // align) * align)

    if tile is not None:
        return min(oh, up(tile[0])), min(ow, up(tile[1]))
    if avail is None or _conv_work(step, oh, ow) <= avail:
        return oh, ow

    def largest(fits, limit):  # the largest aligned size <= limit with fits(size), or 0
        lo, hi = 0, limit // align
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid * align) else (lo, mid - 1)
        return lo * align

    rows = largest(lambda r: _conv_work(step, r, ow, spill_width) <= avail, oh)
    if rows >= min(oh, MIN_STRIP) and rows * ow >= min(oh * ow, min_side * min_side):
        k = -(-oh // rows)  # even out the strips
        return min(oh, up(-(-oh // k))), ow
    side = largest(lambda t: _conv_work(step, t, t, spill_width) <= avail, min(oh, ow))
    if side < min(min_side, oh, ow):
        return None
    return min(oh, side), min(ow, side)


def _attention_chunks(step, h, w, avail, kv_resident, good: bool = False) -> tuple[int, int] | None:
    """(query rows, key rows) per chunk that fit `avail` (None: all rows). K and V in memory: the
    largest score blocks; read from disk: the largest query chunks (K and V are read once per
    query chunk). good: at least GOOD_QUERIES queries and GOOD_KEYS keys per chunk."""
    if avail is None:
        return h, h
    options = sorted({h, *(max(1, h >> i) for i in range(1, 16))}, reverse=True)
    pairs = sorted(((q, k) for q in options for k in options),
                   key=(lambda p: (-p[0] * p[1], -p[1])) if kv_resident else (lambda p: (-p[0], -p[1])))
    for q_rows, k_rows in pairs:
        if good and (q_rows * w < min(h * w, GOOD_QUERIES) or k_rows * w < min(h * w, GOOD_KEYS)):
            continue
        if _attention_work(step, w, q_rows, k_rows, kv_resident, h) <= avail:
            return q_rows, k_rows
    return None


def plan(direction: Direction, shape, budget: int | None = None, tile=None, resident: int = 0) -> Plan:
    """The stage plan for an input of `shape`: tiles per step and which activations go to disk,
    so that the estimated peak (`Plan.peak`) stays within `budget` bytes (None: everything in
    memory, one tile per step unless `tile` (rows, cols in the input's pixels) is given).
    MemoryBudgetError names the smallest budget that works when `budget` cannot be met."""
    return _plan(direction, shape, budget, tile, resident)


def _plan(direction: Direction, shape, budget, tile, resident) -> Plan:
    sizes = _sizes(direction, shape)
    steps = direction.steps
    last_use = {}
    for i, s in enumerate(steps):
        for a in (s.x, s.skip):
            if a is not None:
                last_use[a] = i
    final = steps[-1].out
    stored = [s.out for s in steps if s.out != final]  # the input and the output are the caller's
    nbytes = {a: 4 * math.prod(sizes[a]) for a in stored}
    first = {s.out: i for i, s in enumerate(steps)}

    def live(i, disk):
        return sum(nbytes[a] for a in stored if a not in disk and first[a] <= i <= last_use.get(a, first[a]))

    def step_tiles(i, avail, disk):
        s = steps[i]
        _, _, oh, ow = sizes[s.out]
        if s.type == "attention":
            chunks = _attention_chunks(s, oh, ow, avail, s.x not in disk, i not in relaxed)
            if chunks is None:
                return None
            return StepPlan(chunks, -(-oh // chunks[0]), _attention_work(s, ow, *chunks, s.x not in disk, oh))
        user = None
        if tile is not None:
            f = sizes[s.out][2] / shape[2]
            user = (max(1, int(tile[0] * f)), max(1, int(tile[1] * f)))
        good = max(MIN_TILE, int(GOOD_TILE * min(Fraction(1), s.factor)))  # in output pixels
        spill = ow if s.out in disk else None
        t = _conv_tile(s, oh, ow, avail, user, MIN_TILE if i in relaxed else good, spill)
        if t is None:
            return None
        return StepPlan(t, -(-oh // t[0]) * -(-ow // t[1]), _conv_work(s, *t, spill))

    def smallest():
        need = 0
        for i, s in enumerate(steps):
            _, _, oh, ow = sizes[s.out]
            if s.type == "attention":
                need = max(need, _attention_work(s, ow, 1, 1, False, oh))
            elif tile is not None:
                need = max(need, step_tiles(i, None, frozenset(stored)).work)
            else:
                a = ALIGN[s.resample]
                side = -(-MIN_TILE // a) * a
                need = max(need, _conv_work(s, min(oh, side), min(ow, side), None if s.out == final else ow))
        return resident + OVERHEAD + need

    disk: set = set()
    relaxed: set = set()  # steps that may run tiles smaller than GOOD_TILE
    if budget is None:
        result = [step_tiles(i, None, disk) for i in range(len(steps))]
    else:
        while True:
            result, bad = [], None
            for i in range(len(steps)):
                avail = budget - resident - OVERHEAD - live(i, disk)
                r = step_tiles(i, avail, disk) if avail > 0 else None
                if r is None or r.work > avail:
                    bad = i
                    break
                result.append(r)
            if bad is None:
                break
            candidates = [a for a in stored if a not in disk and first[a] <= bad <= last_use.get(a, first[a])]
            if not candidates and bad not in relaxed:
                relaxed.add(bad)  # no good tile fits even with everything spilled: smaller ones here
                continue
            if not candidates:
                need = smallest()
                raise MemoryBudgetError(
                    f"max_memory {human(budget)} is too small for an input of shape {tuple(shape)}: the smallest "
                    f"budget that works is {human(need)} (max_memory={need}"
                    + (f", of which {human(resident)} to load the stage graphs" if resident else "")
                    + ("; with tile= set, a smaller tile needs less" if tile is not None else "") + ")", need)
            disk.add(max(candidates, key=lambda a: nbytes[a]))
    for i, r in enumerate(result):
        r.live = live(i, disk)
    return Plan(tuple(shape), sizes, frozenset(disk), result, resident, budget, last_use)


# --- running the plan -------------------------------------------------------------------------

def axis_tiles(length: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) of the tiles of side `tile` along an axis of `length` (the last one may be shorter)."""
    return [(a, min(length, a + tile)) for a in range(0, length, tile)]


def input_range(o0: int, o1: int, length_in: int, f: Fraction, halo: int) -> tuple[int, int]:
    """The input [start, end) that output pixels [o0, o1) of a step resampling by f read: mapped
    back, widened by the halo and clamped to the input's length."""
    a, b = o0 / f, o1 / f
    return max(0, math.floor(a) - halo), min(length_in, math.ceil(b) + halo)


def run(direction: Direction, p: Plan, array: np.ndarray, runner, progress=None, spill_dir=None,
        threads: int | None = None) -> list[np.ndarray]:
    """Run the plan `p` on `array` (the direction's input, (N, C, H, W) float32). `runner(graph)`
    returns the callable running that stage graph: (feeds {name: array}, last: bool) -> [y]
    (last: the stage's last tile, after which its working memory may be given back). `threads`
    (default: the CPU count, at most 8) share the statistics and the spill files' copies between
    the graph runs. Returns the direction's outputs (channel slices of the last step's output)."""
    workers = max(1, threads or min(8, os.cpu_count() or 1))
    with _Pool(workers) if workers > 1 else nullcontext() as pool:
        return _run(direction, p, array, runner, progress, spill_dir, pool)


def _run(direction, p, array, runner, progress, spill_dir, pool) -> list[np.ndarray]:
    if p.budget is not None and sys.platform.startswith("linux"):
        host_memory.bounded_malloc()
    steps = direction.steps
    stats_needed = {s.x for s in steps if s.norm is not None}
    stores = {direction.input: _Memory(array.shape, array)}
    stats: dict[str, _Stats] = {}
    folder = None
    done = 0
    final = steps[-1].out
    # what the last step freed: an array or a spill file of the right shape becomes this step's
    # output (no fresh pages to fault in or to cache); the rest is released before the step runs
    spare: list = []
    try:
        for i, (s, sp) in enumerate(zip(steps, p.steps)):
            shape = p.sizes[s.out]
            on_disk = s.out in p.disk and s.out != final
            same = next((st for st in spare if st.shape == shape and isinstance(st, _Disk if on_disk else _Memory)
                         and (on_disk or st.a.flags.writeable)), None)
            if on_disk:
                if folder is None:
                    folder = tempfile.mkdtemp(prefix="vaeinfer-exact-", dir=spill_dir)
                dst = _Disk(shape, folder, pool, same)
            else:
                dst = _Memory(shape, None if same is None else same.a)
            for st in spare:
                st.close()
            spare = []
            stores[s.out] = dst
            acc = _Stats(shape[0], shape[1]) if s.out in stats_needed else None
            if s.type == "attention":
                done = _attention(s, sp, stores[s.x], dst, acc, runner(s.graph), progress, done, pool)
            else:
                done = _conv(s, sp, stores, dst, acc, stats, runner(s.graph), progress, done, pool)
            if acc is not None:
                stats[s.out] = acc
            for a in (s.x, s.skip):  # free what no later step reads
                if a is not None and p.last_use.get(a) == i and a != direction.input:
                    spare.append(stores.pop(a))
                    stats.pop(a, None)
        out = stores[final].a
    finally:
        for st in spare:
            st.close()
        for a, st in stores.items():
            if a not in (direction.input, final):
                st.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if p.budget is not None and sys.platform.startswith("linux"):
            host_memory.trim()
    parts, c0 = [], 0
    for _, c in direction.outputs:
        parts.append(out[:, c0:c0 + c] if len(direction.outputs) == 1 else np.ascontiguousarray(out[:, c0:c0 + c]))
        c0 += c
    return parts


def _conv(s: Step, sp: StepPlan, stores, dst, acc, stats, run_graph, progress, done, pool=None) -> int:
    src, skip = stores[s.x], (stores[s.skip] if s.skip else None)
    n_img, _, hin, win = src.shape
    _, _, oh, ow = dst.shape
    f = s.factor
    norm = stats[s.x].norm(*s.norm) if s.norm else None
    for n in range(n_img):
        for oy0, oy1 in axis_tiles(oh, sp.tile[0]):
            iy0, iy1 = input_range(oy0, oy1, hin, f, s.halo)
            for ox0, ox1 in axis_tiles(ow, sp.tile[1]):
                ix0, ix1 = input_range(ox0, ox1, win, f, s.halo)
                feeds = {"x": np.ascontiguousarray(src.read(n, iy0, iy1, ix0, ix1)[None])}
                if skip is not None:
                    feeds["skip"] = np.ascontiguousarray(skip.read(n, iy0, iy1, ix0, ix1)[None])
                if norm is not None:
                    feeds["mean"], feeds["rstd"] = norm[0][n:n + 1], norm[1][n:n + 1]
                last = n == n_img - 1 and oy1 == oh and ox1 == ow
                full = run_graph(feeds, last)[0]
                y = full[0]
                cy, cx = int(oy0 - iy0 * f), int(ox0 - ix0 * f)
                block = y[:, cy:cy + oy1 - oy0, cx:cx + ox1 - ox0]
                if block.shape[1:] != (oy1 - oy0, ox1 - ox0):
                    raise BundleError(f"exact tiling: stage {s.graph} returned {y.shape[1:]} for input "
                                      f"{(iy1 - iy0, ix1 - ix0)}; expected resampling {s.resample}")
                del feeds, y
                adopt = n_img == 1 and block.shape[1:] == (oh, ow) and isinstance(dst, _Memory)
                if adopt:
                    dst.a = full  # one tile for the whole image: adopt the graph's output, no copy
                _store(pool, dst, acc, n, oy0, ox0, block, adopted=adopt)
                done += 1
                if progress is not None:
                    progress(done)
    return done


def _attention(s: Step, sp: StepPlan, src, dst, acc, run_graph, progress, done, pool=None) -> int:
    """softmax(Q^T K * scale) V^T over all pixels of each image, Q/K/V the thirds of `src`'s
    channels: the attention graph per (query chunk, key chunk), key chunks combined by their row
    maxima (an online softmax, as flash attention does)."""
    n_img, _, h, w = src.shape
    c, heads = s.out_channels, s.heads
    d = c // heads
    q_rows, k_rows = sp.tile
    key_chunks = axis_tiles(h, k_rows)
    for n in range(n_img):
        whole = src.read(n, 0, h, 0, w, c, 3 * c) if len(key_chunks) == 1 else None
        for qy, qe in axis_tiles(h, q_rows):
            q = np.ascontiguousarray(src.read(n, qy, qe, 0, w, 0, c)).reshape(heads, d, -1)
            o = m = total = None
            for ky, ke in key_chunks:
                kv = whole if whole is not None else src.read(n, ky, ke, 0, w, c, 3 * c)
                last = n == n_img - 1 and qe == h and ke == h
                o_c, m_c, l_c = run_graph({"q": q, "k": np.ascontiguousarray(kv[:c]).reshape(heads, d, -1),
                                           "v": np.ascontiguousarray(kv[c:]).reshape(heads, d, -1)}, last)
                del kv
                if o is None:
                    o, m, total = o_c, m_c, l_c
                    continue
                m_new = np.maximum(m, m_c)
                a, b = np.exp(m - m_new), np.exp(m_c - m_new)
                o = o * a[:, None, :] + o_c * b[:, None, :]
                total, m = total * a + l_c * b, m_new
            block = (o / total[:, None, :]).reshape(c, qe - qy, w)
            _store(pool, dst, acc, n, qy, 0, block)
            done += 1
            if progress is not None:
                progress(done)
    return done
