"""Finding, reading and verifying a model bundle directory.

Graphs are read into memory, hashed, and handed to onnxruntime as bytes: what runs is exactly
what was verified (no window between check and load), and an ONNX file that points at external
data cannot make onnxruntime read files beside or outside the bundle, since a model given as
bytes has no directory to resolve them against.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vaeinfer import manifest as manifest_mod
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
    size = path.stat().st_size
    if size > limit:
        raise BundleError(f"{path}: {size} bytes, more than the {limit} allowed")
    return path.read_bytes()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: manifest_mod.Manifest

    def read_graph(self, role: str, precision: str = "fp32", verify: bool = True) -> bytes:
        """The ONNX bytes of one graph, after checking its sha256 (unless verify=False)."""
        entry = self.manifest.files(precision)[role]
        data = _read(_regular_file(self.path, entry.file), MAX_GRAPH_BYTES)
        if verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry.sha256:
                raise BundleError(f"{self.path / entry.file}: sha256 is {digest}, the manifest says {entry.sha256}; "
                                  "the file was changed or corrupted after export")
        return data


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
