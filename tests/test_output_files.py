"""Files the CLI writes: the mode a plain open() gives (0666 minus the umask), and grids as
PNG, JPEG or WebP by the output's suffix."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vaeinfer import images as image_io
from vaeinfer._fs import atomic_write_bytes
from vaeinfer.cli import main
from vaeinfer.errors import InputError


@pytest.fixture
def umask():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_follows_umask(tmp_path, umask):
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert _mode(tmp_path / "a.bin") == 0o666 & ~umask
    os.umask(0o022)
    atomic_write_bytes(tmp_path / "a.bin", b"y")  # replacing a file gives the new file's mode
    assert _mode(tmp_path / "a.bin") == 0o644 and (tmp_path / "a.bin").read_bytes() == b"y"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left


def test_cli_outputs_follow_umask(tmp_path, umask):
    for out in ("s.png", "s.npz", "s.npy"):
        r = CliRunner().invoke(main, ["sample", "-n", "2", "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        assert _mode(tmp_path / out) == 0o640, out


@pytest.mark.parametrize("suffix", [s for s in (".jpg", ".jpeg", ".webp") if s in image_io.GRID_SUFFIXES])
def test_lossy_grids(tmp_path, suffix):
    out = tmp_path / f"grid{suffix}"
    r = CliRunner().invoke(main, ["sample", "-n", "4", "--seed", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "grid.png"
    assert CliRunner().invoke(main, ["sample", "-n", "4", "--seed", "1", "-o", str(ref)]).exit_code == 0
    with Image.open(out) as im, Image.open(ref) as want:
        assert im.format == {".webp": "WEBP"}.get(suffix, "JPEG") and im.size == want.size
        err = np.abs(np.asarray(im.convert("L"), float) - np.asarray(want.convert("L"), float))
        assert err.mean() < 4  # quality 95: close to the lossless grid


def test_unwritable_suffix_is_refused_before_work(tmp_path):
    r = CliRunner().invoke(main, ["sample", "-n", "2", "-o", str(tmp_path / "s.tiff")])
    assert r.exit_code == 1 and ".jpg" in r.output and not (tmp_path / "s.tiff").exists()
    with pytest.raises(InputError, match="expected an image file ending in"):
        image_io.save_grid(np.zeros((1, 1, 4, 4), np.float32), tmp_path / "g.bmp")
