"""Finding, reading and verifying a model bundle directory.

Graphs are read into memory, hashed, and handed to onnxruntime as bytes: what runs is exactly
what was verified (no window between check and load), and an ONNX file that points at external
data cannot make onnxruntime read files beside or outside the bundle, since a model given as
bytes has no directory to resolve them against. Before that, `onnx_scan` reads each graph's
protobuf itself and refuses external-data references outright, operators outside an explicit
allowlist, local functions and training graphs (with or without sha256 verification).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vaeinfer import manifest as manifest_mod
from vaeinfer import onnx_scan
from vaeinfer.errors import BundleError

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_GRAPH_BYTES = 1 << 31  # protobuf's own limit
_MODELS = "models"


def available_models() -> list[str]:
    """Names of the models bundled with this package (usable as `vaeinfer.load(name)`)."""
    root = resources.files("vaeinfer") / _MODELS
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def locate(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's name, or a path to a bundle directory -> that directory."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.is_dir():
        return path
    if text in available_models():
        return Path(str(resources.files("vaeinfer") / _MODELS / text))
    raise BundleError(f"no bundle at {text!r}: expected a bundle directory or one of the bundled "
                      f"models {available_models()}")


def _regular_file(folder: Path, name: str) -> Path:
    """folder/name, refusing names that leave the folder, symlinks and non-regular files."""
    path = folder / name
    if Path(name).name != name or name in ("", ".", ".."):
        raise BundleError(f"{folder}: refusing file name {name!r}: it leaves the bundle directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{folder}: expected file {name}, it is missing") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{path}: refusing a symbolic link inside a bundle")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path}: expected a regular file")
    return path


def _read(path: Path, limit: int) -> bytes:
    """The file's bytes, at most `limit`. Opened without following a link and without blocking,
    then checked again to be a regular file: a file swapped for a link or a FIFO after
    `_regular_file` looked at it is refused instead of followed or waited on."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"{path}: cannot open it: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: expected a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: {st.st_size} bytes, more than the {limit} allowed")
        try:
            data = f.read(limit + 1)  # never more than the limit, even if the file grows meanwhile
        except OSError as e:
            raise BundleError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) > limit:
        raise BundleError(f"{path}: more than the {limit} bytes allowed")
    return data


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: manifest_mod.Manifest
    # (precision, role) -> bytes already read, checked and probed (see `pin`); read_graph serves them
    pinned: dict = field(default_factory=dict, repr=False, compare=False)

    def read_graph(self, role: str, precision: str = "fp32", verify: bool = True) -> bytes:
        """The ONNX bytes of one graph, after checking its sha256 (unless verify=False) and
        scanning its protobuf (always: see `vaeinfer.onnx_scan`)."""
        if (precision, role) in self.pinned:
            return self.pinned[precision, role]
        entry = self.manifest.files(precision)[role]
        path = _regular_file(self.path, entry.file)
        data = _read(path, MAX_GRAPH_BYTES)
        if verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise BundleError(f"{self.path / entry.file}: sha256 is {digest}, the manifest says {entry.sha256}; "
                                  "the file was changed or corrupted after export")
        onnx_scan.scan(data, str(path))
        return data

    def read_file(self, name: str, digest: str, limit: int, verify: bool = True) -> bytes:
        """A non-graph file of the bundle (e.g. prior.npz) under the graphs' rules: a plain name
        inside the bundle, no symbolic link, a regular file of at most `limit` bytes, sha256 checked."""
        path = _regular_file(self.path, name)
        data = _read(path, limit)
        if verify and hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"{path}: sha256 is {hashlib.sha256(data).hexdigest()}, the manifest says {digest}; "
                              "the file was changed or corrupted after export")
        return data

    def pin(self, precision: str = "fp32", verify: bool = True) -> "Bundle":
        """This bundle with every graph of `precision` read, verified and scanned once, held in
        memory: whatever loads the result runs exactly these bytes, whatever happens on disk."""
        graphs = {(precision, role): self.read_graph(role, precision, verify) for role in self.manifest.specs()}
        return Bundle(self.path, self.manifest, {**self.pinned, **graphs})


def open_bundle(name_or_path: str | os.PathLike) -> Bundle:
    """Locate a bundle and parse its manifest (graphs are read and verified when loaded)."""
    folder = locate(name_or_path)
    if folder.is_symlink():
        raise BundleError(f"{folder}: refusing a bundle directory that is a symbolic link")
    raw = _read(_regular_file(folder, MANIFEST), MAX_MANIFEST_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{folder / MANIFEST}: expected UTF-8 JSON ({type(e).__name__}: {e})") from None
    return Bundle(folder, manifest_mod.parse(data))
