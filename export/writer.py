"""Writing a bundle directory: all files or none, never a mix of an old and a new export."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import onnx

from vaeinfer.export.graphs import ExportError, strip_unused_initializers
from vaeinfer import manifest as manifest_mod
from vaeinfer._fs import fsync_dir
from vaeinfer.bundle import MANIFEST


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(out_dir: str | Path, manifest: dict, files: dict[str, bytes]) -> Path:
    """Write `files` and manifest.json into a fresh folder beside `out_dir`, then swap it in.

    The manifest is checked by the runtime's own parser first. An existing `out_dir` must be a
    bundle (or empty): an unrelated folder is never replaced. A crash before the swap leaves
    the old bundle untouched; on Linux the swap itself is one atomic exchange of the two folders,
    elsewhere a crash between its two renames leaves a hidden `.old` folder and no `out_dir`.
    """
    out = Path(out_dir)
    files = clean_graphs(manifest, files)
    manifest_mod.parse(manifest)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise ExportError(f"{out}: exists and is not a bundle directory; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if out.exists() and _exchange(tmp, out):
            pass  # one atomic step: `out` is the new bundle, `tmp` the old one (removed below)
        else:
            old = None
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rmdir(old)
                os.rename(out, old)
            os.rename(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def clean_graphs(manifest: dict, files: dict[str, bytes]) -> dict[str, bytes]:
    """The files with every .onnx graph's unused initializers removed (onnxruntime warns about each
    when it opens a graph) and the manifest's sha256 of any graph changed updated, in place."""
    out, changed = {}, {}
    for name, data in files.items():
        if name.endswith(".onnx"):
            model = onnx.load_from_string(data)
            if strip_unused_initializers(model):
                data = changed[name] = model.SerializeToString()
        out[name] = data
    entries = list(manifest.get("graphs", {}).values())
    entries += [e for v in (manifest.get("variants") or {}).values() for e in v.get("graphs", {}).values()]
    exact = manifest.get("exact_tiling") or {}
    entries += [s for d in ("decoder", "encoder") for s in (exact.get(d) or {}).get("steps", []) if "file" in s]
    for entry in entries:
        if isinstance(entry, dict) and entry.get("file") in changed:
            entry["sha256"] = sha256(changed[entry["file"]])
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system cannot, and the caller falls back to two renames, between which a crash leaves `b`
    missing (the old bundle then sits in a hidden `.NAME.old-*` folder beside it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
