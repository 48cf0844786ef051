#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu with nvcc against the installed torch's headers, so that a
# CUDA syntax/type error cannot land even on machines without a GPU or a CUDA build of torch.
#
# Flags mirror what `pip install -e .` passes with a CUDA torch (torch.utils.cpp_extension's
# COMMON_NVCC_FLAGS, -std=c++20, and setup.py's -O3 -fmad=false), for sm_80 and sm_90 (+PTX).
# The .cu files include only ATen/c10 *core* headers, c10/core/impl/DeviceGuardImplInterface.h
# and the CUDA runtime: no c10/cuda/* or ATen/cuda/* header (the CPU torch wheel ships them,
# but not c10/cuda/impl/cuda_cmake_macros.h, and ATen/cuda/CUDAContext.h needs cuBLAS and
# cuSPARSE headers that a bare CUDA toolkit may lack), so the check works with a CPU wheel.
#
# Usage: .ci/check_cuda_compiles.sh            (NVCC, PYTHON, FASTNOISE_CUDA_GENCODE override)
# Exit status: 0 all compiled, 1 a file failed, 77 nvcc not found (skipped).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)";
  elif [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc";
  else echo "check_cuda_compiles: nvcc not found; skipped" >&2; exit 77; fi
fi

mapfile -t INCLUDES < <("$PYTHON" - <<'PY'
import sysconfig
from torch.utils import cpp_extension
for p in cpp_extension.include_paths():
    print("-I" + p)
print("-I" + sysconfig.get_paths()["include"])
PY
)
ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
# setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": SASS for sm_80 and sm_90, PTX compute_90
GENCODE=(${FASTNOISE_CUDA_GENCODE:--gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90})

FLAGS=(-std=c++20 -O3 -fmad=false -lineinfo
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       --expt-relaxed-constexpr --compiler-options -fPIC
       -DFASTNOISE_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       "-D_GLIBCXX_USE_CXX11_ABI=$ABI" -Xcudafe --diag_suppress=3306)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "check_cuda_compiles: $("$NVCC" --version | tail -1)"
status=0
for f in csrc/cuda/*.cu; do
  start=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "${GENCODE[@]}" "${INCLUDES[@]}" -c "$f" -o "$TMP/$(basename "$f").o"; then
    echo "check_cuda_compiles: OK   $f ($((SECONDS - start)) s)"
  else
    echo "check_cuda_compiles: FAIL $f" >&2
    status=1
  fi
done
exit $status
