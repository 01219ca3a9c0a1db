"""Batch inference with Ray Data: encode, score, decode or reconstruct datasets too large for one machine.

    pip install "vaeinfer[cpu,ray]"          # or [gpu,ray]

    import ray
    from vaeinfer import ray as vray

    ray.init()                                                     # or ray.init("auto") on a cluster
    ds = vray.read_images("s3://bucket/images/")                   # Parquet (an `image` column) or .npy files
    scores = vray.map_model(ds, "/shared/bundles/my-vae", "score", concurrency=8, samples=100, seed=0)
    vray.write(scores, "s3://bucket/scores/")                      # Parquet; format="npy" for .npy files

`map_model` is `Dataset.map_batches` with `BundlePredictor`, a callable class: Ray starts
`concurrency` actors, each loads the bundle once (in `__init__`) and then maps batches (dicts of
numpy arrays) to outputs, on CPU or, with `num_gpus=1`, on the GPU Ray gives the actor. The
bundle must be readable on every node (a shared filesystem, or a model bundled with the installed
package); every actor verifies its sha256s when it loads it.

Results equal one `vaeinfer` call over the whole dataset, however Ray batches it: the runtime's
results do not depend on batching, and for `score` image i's noise is Generator([seed, i]) with i
the row's global index, read from an integer id column (`id_column`, default "id": write it
beside the images, e.g. with `write_images`). The other columns (ids, labels, paths) pass
through, so results can be joined back to their inputs whatever order Ray writes them in.

This module is not imported by `import vaeinfer`; Ray is needed only by the helper functions
(`BundlePredictor` itself is plain Python).
"""

from __future__ import annotations

import os

import numpy as np

OPS = ("encode", "decode", "reconstruct", "score")


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError("vaeinfer.ray needs Ray Data: pip install 'vaeinfer[ray]' "
                          f"(ray[data] and pyarrow; {e.name} is missing)") from e
    return ray


class BundlePredictor:
    """Map batches of a dataset through a bundle; for `Dataset.map_batches` (see `map_model`).

    Args:
        model: a bundle directory (readable on every node) or a bundled model's name.
        op: "encode" (VAE: mean, logvar; VQ-VAE: codes, z_q), "decode" (-> image),
            "reconstruct" (-> reconstruction) or "score" (VAE: nll, elbo, recon, float64 nats).
        device, threads, precision: as for `vaeinfer.load` (threads: onnxruntime intra-op threads;
            default 1, one actor per CPU being Ray's way to use a machine's cores).
        input_column: the column to read; default "image", for decode "z" or "mean" (VAE) / "codes"
            (VQ-VAE), whichever the batch has.
        id_column: integer global row indices; `score` needs them (image i's noise is
            Generator([seed, i])), other ops pass them through.
        keep_columns: pass the batch's other columns through to the output (default True).
        batch_size: rows per onnxruntime call inside a batch (default: the runtime's).
        **call_kwargs: the op's own options, e.g. samples=100, seed=0 for score.

    Images may come as (N, C, H, W) arrays, flat rows (N, C*H*W), or an object array of per-row
    arrays (how Ray reads a Parquet list column); uint8 or float in the model's value range.
    """

    def __init__(self, model: str | os.PathLike, op: str = "encode", *, device: str = "cpu", threads: int | None = 1,
                 precision: str = "fp32", input_column: str | None = None, id_column: str = "id",
                 keep_columns: bool = True, batch_size: int | None = None, **call_kwargs):
        import vaeinfer

        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        self.model = vaeinfer.load(model, device=device, threads=threads, precision=precision)
        from vaeinfer import kinds

        self.kind = kinds.get(self.model.info.kind)
        if op == "score" and not self.kind.scorable:
            raise ValueError(f"score: {self.model.info.name} is a {self.kind.name}; scores (IWAE NLL) are for VAE bundles")
        self.op, self.input_column, self.id_column = op, input_column, id_column
        self.keep_columns, self.batch_size, self.call_kwargs = keep_columns, batch_size, call_kwargs

    def _column(self, batch: dict) -> str:
        if self.input_column is not None:
            candidates = (self.input_column,)
        elif self.op == "decode":
            candidates = self.kind.latent_keys
        else:
            candidates = ("image",)
        for name in candidates:
            if name in batch:
                return name
        raise KeyError(f"{self.op}: expected a column named {' or '.join(candidates)}, the batch has {sorted(batch)}")

    def _images(self, a: np.ndarray) -> np.ndarray:
        if a.dtype == object:
            a = np.stack([np.asarray(row) for row in a])
        shape = self.model.info.image_shape
        if a.ndim != 4 and a.size == len(a) * int(np.prod(shape)):
            a = a.reshape(len(a), *shape)
        return a

    def _score(self, x: np.ndarray, batch: dict) -> dict[str, np.ndarray]:
        if self.id_column not in batch:
            raise KeyError(f"score: expected an integer id column {self.id_column!r} (each image's global row "
                           f"index, which picks its noise), the batch has {sorted(batch)}; write one beside the "
                           "images (vaeinfer.ray.write_images does) or pass id_column=")
        ids = np.asarray(batch[self.id_column])
        if not np.issubdtype(ids.dtype, np.integer) or (len(ids) and ids.min() < 0):
            raise ValueError(f"score: expected non-negative integer ids in {self.id_column!r}, got {ids.dtype}")
        out = {k: np.empty(len(x)) for k in ("nll", "elbo", "recon")}
        # one call per run of consecutive ids, each with its own offset
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1
        for run in np.split(np.arange(len(x)), cuts):
            if len(run) == 0:
                continue
            s = self.model.score(x[run], batch_size=self.batch_size, index_offset=int(ids[run[0]]), **self.call_kwargs)
            for k in out:
                out[k][run] = getattr(s, k)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        column = self._column(batch)
        m, data = self.model, batch[column]
        if self.op == "decode":
            if data.dtype == object:
                data = np.stack([np.asarray(row) for row in data])
            out = {"image": m.decode(data, batch_size=self.batch_size, **self.call_kwargs)}
        else:
            x = self._images(data)
            if self.op == "encode":
                result = m.encode(x, batch_size=self.batch_size, **self.call_kwargs)
                out = {k: getattr(result, k) for k in result.__dataclass_fields__}
            elif self.op == "reconstruct":
                out = {"reconstruction": m.reconstruct(x, batch_size=self.batch_size, **self.call_kwargs)}
            else:
                out = self._score(x, batch)
        if self.keep_columns:
            out = {**{k: v for k, v in batch.items() if k != column and k not in out}, **out}
        return out


def map_model(ds, model: str | os.PathLike, op: str = "encode", *, concurrency: int | tuple[int, int] = 1,
              num_gpus: float = 0, num_cpus: float = 1, batch_size: int = 256, device: str | None = None,
              **predictor_kwargs):
    """`ds.map_batches(BundlePredictor, ...)`: `concurrency` actors (or (min, max) for an autoscaling
    pool), each loading the bundle once, on CPU or (num_gpus > 0) GPU. `batch_size` rows per batch;
    the rest goes to `BundlePredictor` (op options such as samples=, seed= included).

    num_cpus is what Ray reserves per actor; below 1 (e.g. 0.5) leaves room for Ray's read and write
    tasks on a machine with as many CPUs as actors.
    """
    _ray()
    if device is None:
        device = "cuda" if num_gpus else "cpu"
    return ds.map_batches(BundlePredictor, fn_constructor_args=(model, op),
                          fn_constructor_kwargs={"device": device, **predictor_kwargs},
                          batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
                          num_gpus=num_gpus, num_cpus=num_cpus)


def _is_npy(paths) -> bool:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    names = [os.fspath(p) for p in paths]
    if all(n.endswith(".npy") for n in names):
        return True
    if any(n.endswith((".parquet", ".pq")) for n in names):
        return False
    # a local folder: whatever it holds
    found = [f for n in names if os.path.isdir(n) for f in os.listdir(n)]
    return bool(found) and any(f.endswith(".npy") for f in found) and not any(f.endswith(".parquet") for f in found)


def read_images(paths, column: str = "image", format: str | None = None, **read_args):
    """A Ray Dataset of images from Parquet files (as written; the images in `column`) or .npy files
    (each an array (n, C, H, W); their rows become `column`). `format`: "parquet" or "npy"
    (default: from the paths). `read_args` go to `ray.data.read_parquet` / `read_numpy`."""
    ray = _ray()
    npy = format == "npy" if format is not None else _is_npy(paths)
    if format not in (None, "parquet", "npy"):
        raise ValueError(f"format must be 'parquet' or 'npy', got {format!r}")
    if not npy:
        return ray.data.read_parquet(paths, **read_args)
    ds = ray.data.read_numpy(paths, **read_args)
    return ds.rename_columns({"data": column}) if column != "data" else ds


def write(ds, path: str, format: str = "parquet", columns: list[str] | None = None) -> None:
    """Write a dataset's results: Parquet files in `path`, or ("npy") one folder of .npy files per
    column, `path/<column>/`. `columns`: which to write (default all)."""
    _ray()
    if columns is not None:
        ds = ds.select_columns(columns)
    if format == "parquet":
        ds.write_parquet(path)
        return
    if format != "npy":
        raise ValueError(f"format must be 'parquet' or 'npy', got {format!r}")
    names = columns or ds.columns()
    if len(names) > 1:
        ds = ds.materialize()  # computed once, then written column by column
    for name in names:
        ds.write_numpy(os.path.join(path, name), column=name)


def write_images(images: np.ndarray, path: str | os.PathLike, ids: np.ndarray | None = None,
                 rows_per_file: int = 4096, column: str = "image", id_column: str = "id") -> list[str]:
    """Write numpy images (N, C, H, W) as Parquet files for `read_images`: the images as flat
    fixed-size lists (plain Parquet that any tool reads) and their global row indices `ids`
    (default 0..N-1), which `score` needs. Needs pyarrow only. Returns the files written."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("write_images needs pyarrow: pip install 'vaeinfer[ray]'") from e
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {images.shape}")
    ids = np.arange(len(images), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    if ids.shape != (len(images),):
        raise ValueError(f"expected {len(images)} ids, got shape {ids.shape}")
    os.makedirs(path, exist_ok=True)
    row = int(np.prod(images.shape[1:]))
    files = []
    for i, start in enumerate(range(0, len(images), rows_per_file)):
        part = images[start:start + rows_per_file]
        flat = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(part).reshape(-1)), row)
        name = os.path.join(os.fspath(path), f"part-{i:05d}.parquet")
        pq.write_table(pa.table({id_column: ids[start:start + rows_per_file], column: flat}), name)
        files.append(name)
    return files


__all__ = ["BundlePredictor", "map_model", "read_images", "write", "write_images", "OPS"]
