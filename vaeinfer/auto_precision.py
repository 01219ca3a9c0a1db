"""precision="auto": per graph and batch size, the fastest (backend, precision) path whose error
against fp32 stays within a budget, chosen by measurement on this machine and cached on disk.

- Candidates: every available backend of the device's family (or the one named by `backend=`)
  times every precision it runs that the bundle has (fp32; fp16/int8 where the bundle carries
  the variant; bf16 where the backend computes it). The reference is fp32 on the family's
  default backend (onnxruntime); it always qualifies, so auto is never less exact than the
  budget and never slower than the reference on what it measured.
- Error of a path: on seeded validation inputs of the graph (the kind's `example_feeds`, inputs
  like those the graph meets in use: a latent-diffusion decoder's unscaled N(0, 1) latents and
  smooth photo-like images for its encoder; else `spec.example_inputs`), the mean absolute difference of each float
  output from the reference's, as a fraction of the reference output's value range (max - min);
  an integer output (VQ codes) counts its fraction of mismatches. The largest over the outputs.
  `max_error=0.01` allows 1%; and no single value may be off by more than PEAK_FACTOR (10) x
  max_error of the range, so a path whose average is fine but whose worst pixels are visibly
  wrong (a badly calibrated int8 layer) is refused.
- Speed: the paths within budget run interleaved (one warm-up, then the median of `ROUNDS`
  timed blocks) at the batch buckets `buckets_for` gives: batch 1 always; for graphs cheap enough
  that batching can change the winner also larger batches (16 and 256 for a batch-1 call under
  `TINY_CALL_S`, 64 under `CHEAP_CALL_S`); a call takes the choice of the largest bucket its rows
  reach. The error is measured on `validation_rows` rows (64 for tiny graphs, 8 for cheap ones,
  else 1: a large image's own pixels are samples enough); a call of a bucket's rows or more
  takes the large-batch choice.
- Cache: one JSON file per decision under `cache_dir()`, keyed by the graphs' sha256, the CPU
  model and ISA flags, the backends' versions, the thread count, the budget and this module's
  `VERSION`; a second load reads it instead of measuring. A cache file that cannot be read is
  measured again and rewritten (with a warning), never trusted half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vaeinfer._fs import atomic_write_text

DEFAULT_MAX_ERROR = 0.01  # 1% of the output's range (mean abs): what load(precision="auto") allows by default
PEAK_FACTOR = 10  # the largest single difference may reach this many times max_error (of the range)
TINY_CALL_S = 0.002  # a batch-1 reference call faster than this: buckets (1, 16, 256), errors on 64 rows
CHEAP_CALL_S = 0.05  # faster than this: buckets (1, 64), errors on 8 rows; slower: batch 1 only, 1 row
ROUNDS = 5
BLOCK_S = 0.02  # each timed block repeats a fast call until it takes about this long
VERSION = 5  # of the decision procedure: a change re-measures (5: OpenVINO's bf16 keeps index arithmetic
#              f32, so cached decisions that refused its non-finite outputs are stale)


def check_max_error(max_error) -> float:
    """The budget as a float in [0, 1]; ValueError saying what was expected otherwise."""
    try:
        value = float(max_error)
    except (TypeError, ValueError):
        raise ValueError(f"max_error must be a number in [0, 1] (0.01 = 1% of the output's range), "
                         f"got {max_error!r:.40}") from None
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"max_error must be a number in [0, 1] (0.01 = 1% of the output's range), got {max_error!r}")
    return value


@dataclass(frozen=True)
class Decision:
    """What auto chose for one graph: the path per batch bucket, and what it measured."""

    role: str
    reference: str  # the fp32 reference path the errors are measured against
    choice: dict  # batch bucket (1, ...) -> path "backend/precision" (buckets with the same path as the one below dropped)
    errors: dict  # path -> measured mean error (fraction of the output range)
    peaks: dict  # path -> measured largest single error (fraction of the output range)
    seconds: dict  # batch bucket -> {path: median seconds per call} (paths within budget)
    max_error: float
    cached: bool = False  # read from the cache instead of measured in this process

    def path_for(self, rows: int) -> str:
        return self.choice[max(b for b in self.choice if b <= max(1, rows))]

    def why(self) -> str:
        parts = []
        for batch, path in sorted(self.choice.items()):
            times = self.seconds[batch]
            ref = times.get(self.reference)
            gain = f", {ref / times[path]:.2f}x the reference" if ref else ""
            parts.append(f"batch {batch}+: {path} ({times[path] * 1e3:.3g} ms{gain}, error {self.errors[path]:.2g}, "
                         f"peak {self.peaks[path]:.2g})")
        skipped = [p for p in self.errors if not within_budget(self.errors[p], self.peaks[p], self.max_error)]
        over = (f"; over the budget (mean {self.max_error:g}, peak {PEAK_FACTOR * self.max_error:g}): "
                f"{', '.join(skipped)}") if skipped else ""
        return "; ".join(parts) + over

    def to_json(self) -> dict:
        return {"role": self.role, "reference": self.reference, "choice": {str(k): v for k, v in self.choice.items()}, "errors": self.errors, "peaks": self.peaks,
                "seconds": {str(k): v for k, v in self.seconds.items()}, "max_error": self.max_error}

    @classmethod
    def from_json(cls, data: dict) -> "Decision":
        return cls(role=str(data["role"]), reference=str(data["reference"]), choice={int(k): str(v) for k, v in data["choice"].items()},
                   errors={str(k): float(v) for k, v in data["errors"].items()},
                   peaks={str(k): float(v) for k, v in data["peaks"].items()},
                   seconds={int(b): {str(k): float(v) for k, v in t.items()} for b, t in data["seconds"].items()},
                   max_error=float(data["max_error"]), cached=True)


def output_error(reference: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(mean, peak): the largest, over outputs, of mean |got - reference| / range(reference) and
    of max |got - reference| / range(reference) (floats); an integer output counts its fraction of
    mismatches for both."""
    mean = peak = 0.0
    for a, b in zip(reference, got):
        if np.issubdtype(a.dtype, np.integer):
            m = p = float(np.mean(a != b)) if a.size else 0.0
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            span = float(a64.max() - a64.min()) if a.size else 0.0
            diff = np.abs(a64 - b64) / (span if span > 0 else 1.0)
            m, p = (float(diff.mean()), float(diff.max())) if a.size else (0.0, 0.0)
        mean, peak = max(mean, m), max(peak, p)
    return mean, peak


def within_budget(mean: float, peak: float, max_error: float) -> bool:
    """The budget: mean error <= max_error, and no value off by more than PEAK_FACTOR x max_error
    of the range (a path whose average is fine but whose worst pixels are visibly wrong fails)."""
    return mean <= max_error and peak <= PEAK_FACTOR * max_error


def buckets_for(first_call_s: float) -> tuple[int, ...]:
    """The batch sizes to time, from the reference's batch-1 call time."""
    if first_call_s < TINY_CALL_S:
        return (1, 16, 256)
    return (1, 64) if first_call_s < CHEAP_CALL_S else (1,)


def validation_rows(first_call_s: float) -> int:
    """How many rows the errors are measured on."""
    return 64 if first_call_s < TINY_CALL_S else 8 if first_call_s < CHEAP_CALL_S else 1


def _block_time(run: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t0) / calls


def measure(paths: dict[str, Callable[[dict], list]], reference: str, feeds_for: Callable[[int], dict],
            max_error: float, role: str, warmup: Callable[[str, dict], None] | None = None) -> Decision:
    """Choose among `paths` (label -> run(feeds) -> outputs) for one graph; `reference` is a label
    of `paths`; `feeds_for(rows)` gives seeded inputs; `warmup(label, feeds)` prepares a path for
    a batch size (e.g. lets the runtime settle its execution mode)."""
    one = feeds_for(1)
    ref_one = paths[reference](one)  # the first call of a session pays for its set-up: time the second
    t0 = time.perf_counter()
    paths[reference](one)
    first = time.perf_counter() - t0
    cheap = first < CHEAP_CALL_S
    rows = validation_rows(first)
    check = feeds_for(rows) if rows > 1 else one
    ref_out = paths[reference](check) if rows > 1 else ref_one
    errors, peaks = {}, {}
    for label, run in paths.items():
        try:
            errors[label], peaks[label] = (0.0, 0.0) if label == reference else output_error(ref_out, run(check))
        except Exception as e:  # a path that fails on valid inputs (a backend's missing kernel) is not a candidate
            warnings.warn(f"precision='auto': {role} on {label} failed and is not considered: {str(e)[:200]}",
                          stacklevel=3)
            errors[label] = peaks[label] = float("inf")
    within = [label for label in paths if within_budget(errors[label], peaks[label], max_error)]
    seconds, choice = {}, {}
    for batch in buckets_for(first):
        feeds = one if batch == 1 else feeds_for(batch)
        for label in within:
            (warmup or (lambda _label, f: paths[_label](f)))(label, feeds)
        estimate = {label: _block_time(lambda: paths[label](feeds), 1) for label in within}
        calls = {label: max(1, int(BLOCK_S / max(t, 1e-6))) for label, t in estimate.items()}
        samples = {label: [] for label in within}
        for r in range(ROUNDS if cheap else 3):
            order = within[r % len(within):] + within[:r % len(within)]  # rotate: no path always first
            for label in order:
                samples[label].append(_block_time(lambda: paths[label](feeds), calls[label]))
        seconds[batch] = {label: statistics.median(s) for label, s in samples.items()}
        choice[batch] = min(within, key=lambda label: (seconds[batch][label], errors[label]))
    kept = {}
    for batch in sorted(choice):  # a bucket that chose what the one below chose adds nothing
        if not kept or choice[batch] != kept[max(kept)]:
            kept[batch] = choice[batch]
    choice = kept
    return Decision(role=role, reference=reference, choice=choice, errors=errors, peaks=peaks, seconds=seconds,
                    max_error=max_error)


# --- the cache --------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$VAEINFER_CACHE_DIR/auto, else $XDG_CACHE_HOME/vaeinfer/auto, else ~/.cache/vaeinfer/auto."""
    root = os.environ.get("VAEINFER_CACHE_DIR")
    if root:
        return Path(root) / "auto"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaeinfer" / "auto"


def machine_key() -> dict:
    """The CPU model and the ISA flags that decide which path is fastest."""
    from vaeinfer.bench import cpu_model_and_flags

    cpu, flags = cpu_model_and_flags()
    return {"cpu": cpu, "flags": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "cores": os.cpu_count()}


def cache_key(role: str, graphs: dict[str, str], versions: dict[str, str], threads, max_error: float) -> str:
    """graphs: path label -> sha256 of the graph it runs; versions: backend name -> version."""
    key = {"version": VERSION, "role": role, "graphs": graphs, "machine": machine_key(), "backends": versions,
           "threads": threads, "max_error": max_error}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def load_cached(key: str, paths) -> Decision | None:
    """The cached decision for `key`, if there is a readable one over the same paths."""
    file = cache_dir() / f"{key}.json"
    if not file.exists():
        return None
    try:
        decision = Decision.from_json(json.loads(file.read_text()))
        if not set(decision.choice.values()) <= set(paths):
            raise ValueError(f"it names paths {sorted(set(decision.choice.values()))}, this process has {sorted(paths)}")
        return decision
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(f"precision='auto': ignoring the unreadable decision cache {file} ({str(e)[:120]}); measuring again",
                      stacklevel=3)
        return None


def save(key: str, decision: Decision) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{key}.json", json.dumps(decision.to_json(), indent=1) + "\n")
    except OSError as e:  # a read-only home: the decision still holds for this process
        warnings.warn(f"precision='auto': could not cache the decision in {folder} ({e}); the next load measures again",
                      stacklevel=3)
