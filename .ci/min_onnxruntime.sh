#!/usr/bin/env bash
# CI, second leg: the runtime against the oldest onnxruntime that pyproject.toml admits
# (onnxruntime>=1.20). A venv whose own site-packages hold only onnxruntime pinned to the
# minimum, with .venv's site-packages appended after it by a .pth file (torch, onnx, pytest
# reused; the pinned onnxruntime comes first), then the tests that run graphs in onnxruntime. Usage: bash .ci/min_onnxruntime.sh [VERSION]  (default 1.20.1)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-1.20.1}"
venv=.ci-work/ort-min
start=$(date +%s)
rm -rf "$venv" && mkdir -p .ci-work
.venv/bin/python -m venv "$venv"
"$venv/bin/pip" install -q --no-deps "onnxruntime==$version"
own=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
# addsitedir (not a bare path line) so that .venv's own .pth files run too: the editable install's
# finder maps vaeinfer.training and vaeinfer.export onto training/ and export/
.venv/bin/python -c "import sysconfig; print(f'import site; site.addsitedir({sysconfig.get_path(\"purelib\")!r})')" > "$own/zz-dot-venv.pth"
"$venv/bin/python" -c "import onnxruntime as o, sys; print('onnxruntime', o.__version__); sys.exit(o.__version__ != '$version')"
PYTHONPATH=$PWD "$venv/bin/python" -m pytest -q -x -p no:cacheprovider \
  tests/test_runtime.py tests/test_prior_step.py tests/test_clean_graphs.py tests/test_io_binding.py \
  tests/test_hostile_bundles.py tests/test_vq.py
echo "min-onnxruntime leg: $(( $(date +%s) - start )) s"
