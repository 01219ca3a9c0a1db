#!/usr/bin/env bash
# The GPU run, prepared: on a machine with an NVIDIA GPU, install onnxruntime-gpu into a venv of
# its own, check that it has the CUDA provider, run the CUDA tests, the CUDA benchmark and the
# side-by-side table of every CUDA path (vaeinfer's CUDA and TensorRT backends x fp32/fp16/int8 and
# auto against raw onnxruntime CUDA and PyTorch eager fp32/fp16/bf16), and write the results under
# benchmarks/results/ (gpu.md, gpu.json, gpu.png, gpu-tests.txt, gpu-run.md, cpu_paths-cuda.md,
# cpu_paths-cuda.json). Every step has its own time limit; the limits add up to 475 s, under 8
# minutes. The side-by-side table runs its rows cheapest first and rewrites its files after each
# row: when its limit cuts it short (on a fresh machine the SD row does not fit: its export on the
# CPU, then TensorRT engines, take minutes), the files hold the rows it finished and name the rest,
# the script says so and still succeeds; a rerun reuses .gpu-work/ (the exported SD/TAESD bundles)
# and the TensorRT engine cache (~/.cache/vaeinfer/tensorrt). Any other failure fails the script.
#
#   bash benchmarks/gpu.sh [--dry-run] [WHEEL]
#
# WHEEL (or $ORT_GPU_WHEEL): an onnxruntime-gpu wheel file to install (e.g. one reassembled under
# /tmp on a machine without PyPI); without one, onnxruntime-gpu comes from PyPI.
# $PYTHON: the interpreter with vaeinfer's dependencies (default: .venv/bin/python, else python3);
# the GPU venv is made from it with --system-site-packages, so torch/numpy are reused.
# --dry-run: print the steps and check that the files they need exist; install and run nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
wheel="${ORT_GPU_WHEEL:-}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) wheel="$arg" ;;
  esac
done
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
venv=.gpu-venv
results=benchmarks/results
cuda_tests=(tests/test_io_binding.py tests/test_runtime.py tests/test_cli.py tests/test_bench.py)
# the side-by-side rows, cheapest first (each row's results are written before the next starts)
paths_rows=mnist-vae-b256,taesd-dec-512,sd-dec-512
start=$(date +%s)

step() {  # step SECONDS DESCRIPTION COMMAND...: run with a time limit, or print it in a dry run
  local limit=$1 what=$2
  shift 2
  echo "== [$(( $(date +%s) - start ))s] $what (limit ${limit}s)"
  echo "   $*"
  if [ "$dry" = 1 ]; then return 0; fi
  timeout --signal=INT --kill-after=10 "$limit" "$@"
}

need() {  # the files a step uses must exist (checked in the dry run too)
  for f in "$@"; do
    [ -e "$f" ] || { echo "gpu.sh: missing $f"; exit 1; }
  done
}

need benchmarks/speed/peers.py benchmarks/speed/cpu_paths.py "${cuda_tests[@]}" vaeinfer/models
if [ -n "$wheel" ]; then need "$wheel"; fi
command -v timeout >/dev/null || { echo "gpu.sh: needs coreutils timeout"; exit 1; }
if [ "$dry" = 0 ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu.sh: no NVIDIA GPU (nvidia-smi)"; exit 1; }
fi
mkdir -p "$results"

step 20 "venv for onnxruntime-gpu (reusing $python's packages)" \
  bash -c "rm -rf $venv && $python -m venv --system-site-packages $venv"
# the CPU onnxruntime must not shadow the GPU one: uninstall it in the venv's view first
step 100 "install onnxruntime-gpu ${wheel:-from PyPI}" \
  bash -c "$venv/bin/pip uninstall -y -q onnxruntime >/dev/null 2>&1 || true; \
           $venv/bin/pip install -q --no-deps ${wheel:-onnxruntime-gpu} && \
           $venv/bin/pip install -q ${wheel:-onnxruntime-gpu}"
step 15 "the CUDA provider is available" \
  "$venv/bin/python" -c "import onnxruntime as o; p = o.get_available_providers(); print(o.__version__, p); \
assert 'CUDAExecutionProvider' in p, p"
step 100 "CUDA tests (IO binding, CUDA graphs, device='cuda' errors)" \
  bash -c "PYTHONPATH=\$PWD $venv/bin/python -m pytest -q -x -p no:cacheprovider -k 'cuda or binding or device' \
           ${cuda_tests[*]} 2>&1 | tee $results/gpu-tests.txt; exit \${PIPESTATUS[0]}"
step 120 "python -m benchmarks.speed.peers --device cuda" \
  bash -c "PYTHONPATH=\$PWD $venv/bin/python -m benchmarks.speed.peers --device cuda --no-coldstart --min-time 0.5 \
           --note 'benchmarks/gpu.sh' > $results/gpu-run.md"
# the last step: a timeout here keeps the rows it finished (and the steps before), reported, not fatal
paths=0
step 120 "python -m benchmarks.speed.cpu_paths --device cuda (every CUDA path side by side)" \
  bash -c "PYTHONPATH=\$PWD $venv/bin/python -m benchmarks.speed.cpu_paths --device cuda --rows $paths_rows \
           --no-compile --workdir .gpu-work > /dev/null" || paths=$?
case "$paths" in
  0) ;;
  124|137) echo "gpu.sh: cpu_paths --device cuda reached its time limit; $results/cpu_paths-cuda.md holds the rows" \
                "it finished and names the others (for all of them, run the command above without the limit)"
           paths=0 ;;
  *) echo "gpu.sh: cpu_paths --device cuda failed (exit $paths)" ;;
esac
echo "== done in $(( $(date +%s) - start ))s; results: $results/gpu.md $results/gpu.json $results/gpu-tests.txt" \
     "$results/cpu_paths-cuda.md $results/cpu_paths-cuda.json"
exit "$paths"
