"""The install puts one name in site-packages: `vaeinfer` (training and export live under it)."""

import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_under_vaeinfer():
    cfg = _setuptools()
    assert all(p == "vaeinfer" or p.startswith("vaeinfer.") for p in cfg["packages"]), cfg["packages"]
    assert cfg["package-dir"] == {"vaeinfer": "vaeinfer", "vaeinfer.training": "training", "vaeinfer.export": "export"}


def test_every_source_folder_with_modules_is_listed():
    """A new sub-package (a folder with __init__.py) must be listed, or the wheel would lack it."""
    cfg = _setuptools()
    listed = set(cfg["packages"])
    for pkg, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((pkg, *rel)) in listed, f"{init.parent} is not in pyproject's packages"


def test_training_and_export_import_under_the_namespace_only():
    import vaeinfer.export
    import vaeinfer.training

    assert Path(vaeinfer.training.__file__).parent == ROOT / "training"
    assert Path(vaeinfer.export.__file__).parent == ROOT / "export"
    for bare in ("training", "export"):
        assert bare not in sys.modules or not str(getattr(sys.modules[bare], "__file__", "")).startswith(str(ROOT))


def wheel_top_levels(wheel: Path) -> set[str]:
    """The top-level names a wheel installs."""
    with zipfile.ZipFile(wheel) as z:
        return {name.split("/")[0] for name in z.namelist()}


def test_wheel_top_levels_are_only_vaeinfer(tmp_path):
    """Builds the wheel (no dependencies, no isolation) and lists what it would put in site-packages."""
    import subprocess

    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vaeinfer-*.whl")
    tops = wheel_top_levels(wheel)
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vaeinfer"}, tops
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "vaeinfer/training/train.py" in names and "vaeinfer/export/variants.py" in names
    assert not any("checkpoints" in n or "recipes" in n for n in names)
