"""What every loaded model shares: sessions per graph, signature checks, chunked runs, info.

A loaded model holds no mutable state after construction, and onnxruntime's `run` is
thread-safe, so one model serves concurrent calls from many threads.
"""

from __future__ import annotations

import numpy as np

from vaeinfer import likelihood as lik
from vaeinfer.bundle import Bundle
from vaeinfer.errors import BackendError, BundleError, OutputError
from vaeinfer.manifest import PRECISIONS
from vaeinfer.results import ModelInfo
from vaeinfer.session import Device, create_session, parse_device
from vaeinfer.spec import ORT_TYPES, GraphSpec

DEFAULT_BATCH = 512  # rows per onnxruntime call when the caller gives no batch_size


class Graph:
    """One onnxruntime session plus the spec it must honour."""

    def __init__(self, session, spec: GraphSpec, what: str):
        self.session, self.spec, self.what = session, spec, what
        self._check_signature()
        self._output_names = [t.name for t in spec.outputs]
        self._float_outputs = [i for i, t in enumerate(spec.outputs) if t.dtype == "float32"]

    def _check_signature(self) -> None:
        """The graph's own inputs/outputs must be exactly the ones the manifest promises."""
        for side, actual, expected in (("inputs", self.session.get_inputs(), self.spec.inputs),
                                       ("outputs", self.session.get_outputs(), self.spec.outputs)):
            got = [(a.name, a.type, len(a.shape)) for a in actual]
            want = [(t.name, ORT_TYPES[t.dtype], len(t.shape)) for t in expected]
            if got != want:
                raise BundleError(f"{self.what}: the graph's {side} are {got}, the manifest promises {want}")
            for a, t in zip(actual, expected):
                if list(a.shape[1:]) != list(t.shape[1:]) or isinstance(a.shape[0], int):
                    raise BundleError(f"{self.what}: {side[:-1]} {a.name} has shape {a.shape}, "
                                      f"the manifest promises {list(t.shape)} with a dynamic batch axis")

    def run(self, feeds: dict[str, np.ndarray], batch_size: int | None = None, progress=None) -> list[np.ndarray]:
        """Run over the batch axis in chunks of `batch_size`; non-finite float outputs raise.

        `progress`, if given, is called with the number of rows done after each chunk.
        """
        n = len(next(iter(feeds.values())))
        step = batch_size or DEFAULT_BATCH
        if n <= step and progress is None:
            outs = self.session.run(self._output_names, feeds)
        else:
            parts = []
            for i in range(0, n, step):
                parts.append(self.session.run(self._output_names, {k: v[i:i + step] for k, v in feeds.items()}))
                if progress is not None:
                    progress(min(n, i + step))
            outs = [np.concatenate(p) for p in zip(*parts)] if len(parts) > 1 else parts[0]
        for i in self._float_outputs:
            check_finite(outs[i], f"{self.what} output {self._output_names[i]}")
        return outs


def check_finite(a: np.ndarray, what: str) -> None:
    """Refuse NaN/Inf. One reduction over the array (a sum is finite iff every term is, barring
    overflow); only a non-finite sum pays for the exact element-wise check."""
    if not np.isfinite(a.sum()) and not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise OutputError(f"{what}: {bad} of {a.size} values are NaN/Inf; expected finite values "
                          "(the input may be far outside what the model was trained on)")


class Model:
    """A loaded bundle: one `Graph` per role, all on one device."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None,
                 precision: str = "fp32", verify: bool = True):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.bundle, self.manifest = bundle, bundle.manifest
        dev = parse_device(device)
        graph_bytes = {role: bundle.read_graph(role, precision, verify) for role in self.manifest.specs()}
        try:
            self._graphs = self._sessions(graph_bytes, dev, threads)
        except BackendError:
            if not dev.auto:
                raise
            dev = Device("cpu")
            self._graphs = self._sessions(graph_bytes, dev, threads)
        m = self.manifest
        self.info = ModelInfo(
            name=m.name, kind=m.kind, format_version=m.format_version, image_shape=m.image,
            value_range=m.value_range, latent=dict(m.latent), likelihood=dict(m.likelihood), device=str(dev),
            providers=tuple(next(iter(self._graphs.values())).session.get_providers()), precision=precision,
            precisions=("fp32", *sorted(m.variants)), threads=threads, has_prior="prior" in self._graphs,
            num_classes=None if m.prior is None else m.prior["num_classes"],
            files={f.file: f.sha256 for f in m.files(precision).values()}, path=str(bundle.path),
        )

    def _sessions(self, graph_bytes: dict[str, bytes], device: Device, threads) -> dict[str, Graph]:
        specs = self.manifest.specs()
        return {role: Graph(create_session(data, device, threads, f"{self.manifest.name}/{role}"), specs[role],
                            f"{self.manifest.name}/{role}") for role, data in graph_bytes.items()}

    def _images_from_params(self, params: np.ndarray) -> np.ndarray:
        return lik.mean(params, self.manifest.likelihood, self.manifest.value_range)

    def __repr__(self):
        return f"<vaeinfer {self.info.kind} {self.info.name!r} on {self.info.device} ({self.info.precision})>"
