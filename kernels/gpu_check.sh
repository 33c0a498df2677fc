#!/usr/bin/env bash
# The GPU checks of the kernels (issue 6), for a machine with a CUDA GPU, nvcc, CMake, PyTorch and Triton
# (it needs no network: Python packages it lacks can sit as wheels in .whl/, the model at STRATA_MODEL_PATH).
#
#   bash kernels/gpu_check.sh kernels   build both modules, every kernel test (the gpu-marked ones on the
#                                       GPU), the Triton tests compiled for the GPU, kernel benchmarks
#   bash kernels/gpu_check.sh all       the same, then the engine on the GPU: its tests and decode rates
#   bash kernels/gpu_check.sh tests     only the gpu-marked tests (kernels, Triton compiled, and the engine's
#                                       when STRATA_MODEL_PATH is set): a quick re-check after a change
#
# Logs and bench/results-style JSON/PNG go to $OUT (default /tmp/strata-gpu). Exit status: 0 when every step
# passed.
set -uo pipefail
MODE=${1:-kernels}
OUT=${OUT:-/tmp/strata-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
status=0
step() {   # step NAME CMD...: runs CMD, its output to $OUT/NAME.log and the terminal's tail
    local name=$1; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
if ls .whl/*.whl > /dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/strata-site .whl/*.whl
fi
export PYTHONPATH=$PWD:/tmp/strata-site
$PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

build() {
    [ -e kernels/.gpu_build_done ] && return 0
    cmake -S kernels -B /tmp/strata-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" &&
    cmake --build /tmp/strata-build -j 16 &&
    cp /tmp/strata-build/_C*.so /tmp/strata-build/_cuda*.so kernels/ &&
    $PY -c "import kernels._loader as l; assert l.cuda_built() and l.cuda_module().device_count() > 0, 'no _cuda'" &&
    touch kernels/.gpu_build_done
}
step build build || { echo "build failed"; exit 1; }

if [ "$MODE" = tests ]; then
    step kernel_tests $PY -m pytest -p no:cacheprovider -q -rs -m gpu tests/kernels
else
    step kernel_tests $PY -m pytest -p no:cacheprovider -q -rs tests/kernels
fi
step triton_gpu_tests env TRITON_INTERPRET=0 $PY -m pytest -p no:cacheprovider -q -rs tests/kernels/test_triton.py
if [ "$MODE" = tests ]; then
    if [ -n "${STRATA_MODEL_PATH:-}" ]; then
        step engine_tests $PY -m pytest -p no:cacheprovider -q -rs tests/integration/test_engine_gpu.py
    fi
elif [ "$MODE" = all ]; then
    step engine_tests $PY -m pytest -p no:cacheprovider -q -rs tests/integration/test_engine_gpu.py
    step bench $PY -m bench.kernels_gpu --out "$OUT/kernels_gpu.json"
else
    step bench $PY -m bench.kernels_gpu --no-engine --out "$OUT/kernels_gpu.json"
fi
echo "gpu_check $MODE: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
