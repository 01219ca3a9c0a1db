"""Writing a bundle directory: all files or none, never a mix of an old and a new export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from export.graphs import ExportError
from vaeinfer import manifest as manifest_mod
from vaeinfer.bundle import MANIFEST


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bundle(out_dir: str | Path, manifest: dict, files: dict[str, bytes]) -> Path:
    """Write `files` and manifest.json into a fresh folder beside `out_dir`, then swap it in.

    The manifest is checked by the runtime's own parser first. An existing `out_dir` must be a
    bundle (or empty): an unrelated folder is never replaced. A crash before the swap leaves
    the old bundle untouched; during the swap, at worst a hidden `.old` folder remains.
    """
    out = Path(out_dir)
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
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
