"""Every committed graph opens in onnxruntime without a warning (e.g. "Removing initializer ...",
which unused initializers cause; users and Triton see those at every load)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from vaeinfer.export.graphs import unused_initializers

GRAPHS = sorted(Path(__file__).parent.parent.joinpath("vaeinfer", "models").glob("*/*.onnx"))
OPEN = """
import sys, onnxruntime as ort
for path in sys.argv[2:]:
    options = ort.SessionOptions()
    options.log_severity_level = int(sys.argv[1])
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
"""


def test_committed_graphs_exist():
    assert len(GRAPHS) >= 15


@pytest.mark.parametrize("severity", [0, 1, 2])
def test_committed_graphs_open_without_onnxruntime_warnings(severity):
    done = subprocess.run([sys.executable, "-c", OPEN, str(severity), *map(str, GRAPHS)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in (done.stdout + done.stderr).splitlines() if "[W:" in line or "[E:" in line]
    assert not warnings, "\n".join(warnings[:10])


@pytest.mark.parametrize("path", GRAPHS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_graphs_have_no_unused_initializers(path):
    assert unused_initializers(onnx.load(path)) == []


def test_the_writer_drops_unused_initializers(tmp_path):
    import json

    from vaeinfer.export.writer import sha256, write_bundle
    bundle = GRAPHS[0].parent
    manifest = json.loads((bundle / "manifest.json").read_text())
    model = onnx.load(bundle / "decoder.onnx")
    model.graph.initializer.append(onnx.numpy_helper.from_array(__import__("numpy").zeros(3, "float32"), "stray"))
    files = {e["file"]: (bundle / e["file"]).read_bytes() for e in manifest["graphs"].values()}
    files["decoder.onnx"] = model.SerializeToString()
    manifest["variants"] = {}
    manifest["graphs"]["decoder"]["sha256"] = sha256(files["decoder.onnx"])
    out = write_bundle(tmp_path / "b", manifest, files)
    written = (out / "decoder.onnx").read_bytes()
    assert unused_initializers(onnx.load_from_string(written)) == []
    assert json.loads((out / "manifest.json").read_text())["graphs"]["decoder"]["sha256"] == sha256(written)
