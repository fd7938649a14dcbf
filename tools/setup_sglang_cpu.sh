#!/usr/bin/env bash
# Tools venv where the real PyPI sglang server runs on CPU, for the tests marked `sglang_cpu` (and sglang-router for
# the router tests). Never a dependency of the package; git-ignored; `.ci/run` recreates it.
#   bash tools/setup_sglang_cpu.sh [PROJECT_PYTHON]      (default .venv/bin/python, the `make install` venv)
# Measured here (2 shared cores): ~130 s from an empty pip cache, ~2.4 GB (triton alone ~1 GB).
# - sglang is installed with --no-deps: its pins pull torch 2.14.1 + CUDA 13 (~4 GB of nvidia-* wheels). torch comes
#   from the project venv (2.13.0+cpu) through a .pth file; sglang 0.5.23 runs on it.
# - Then sglang's own declared requirements (read from its metadata), less the GPU-only ones and the few that a
#   text model on CPU never imports (SKIP below).
# - torchvision (sglang imports it at module level) only as a --no-deps wheel of the release paired with the
#   project's torch: PyPI's build is a CUDA one whose _C.so does not load beside CPU torch, so its fake-op
#   registration (`torchvision::nms does not exist`) is neutralised here; the image ops sglang never calls for text.
# - sglang imports `sgl_kernel` (CUDA-only on PyPI): tools/sgl_kernel_standin is put on the path (a test fixture).
# - The server needs SGLANG_USE_CPU_ENGINE=1 (rollout/sglang_launcher.py sets it on a machine without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VERSION=0.5.23          # keep equal to setup.py's gpu extra
SGLANG_ROUTER_VERSION=0.3.2    # keep equal to setup.py's gpu extra
TRITON_VERSION=3.9.0           # sglang decorates kernels with @triton.jit at import time (none runs on CPU)
TORCHVISION_VERSION=0.28.0     # the release paired with the project's torch 2.13
PY=${1:-.venv/bin/python}
VENV=tools/.venv-sglang
STAMP="$VENV/.ready-sglang-$SGLANG_VERSION-router-$SGLANG_ROUTER_VERSION-server"
READY="$VENV ready (sglang $SGLANG_VERSION server on CPU, sglang-router $SGLANG_ROUTER_VERSION)"
[ -f "$STAMP" ] && { echo "$READY"; exit 0; }
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"   # kept between runs: pip skips what is already there
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/_project_venv.pth"
echo "$PWD/tools/sgl_kernel_standin" > "$SITE/_sgl_kernel_standin.pth"
PIP="$VENV/bin/pip install -q --disable-pip-version-check"
$PIP --no-deps "sglang==$SGLANG_VERSION" "sglang-router==$SGLANG_ROUTER_VERSION" "triton==$TRITON_VERSION" \
  "torchvision==$TORCHVISION_VERSION"
echo "# neutralised by tools/setup_sglang_cpu.sh: this CUDA build's ops do not load beside CPU torch" \
  > "$SITE/torchvision/_meta_registrations.py"
# GPU-only (CUDA kernels, NVIDIA libraries, CUDA memory hooks) and what a text model on CPU never imports
# (py-spy: profiler binary; torchcodec/timm/torchaudio: audio/video/vision models; deepseek-recipe, tml-renderers:
# model-specific chat renderers; apache-tvm-ffi: flashinfer's FFI, pinned below what xgrammar pulls);
# torch/torchvision: above.
SKIP="cuda-python flash-attn-4 flashinfer-python humming-kernels nvidia-cutlass-dsl nvidia-mathdx nvshmem4py-cu13
quack-kernels sgl-deep-ep sgl-deep-gemm sgl-flash-mla sglang-kernel tilelang torch-memory-saver torch torchaudio
torchvision torchcodec timm py-spy deepseek-recipe tml-renderers apache-tvm-ffi"
REQS=$("$VENV/bin/python" - "$SKIP" <<'EOF'
import re, sys
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = set(sys.argv[1].split())
for line in requires("sglang"):
    r = Requirement(line)
    if re.sub(r"[-_.]+", "-", r.name).lower() in skip or (r.marker and not r.marker.evaluate({"extra": ""})):
        continue
    print(f"{r.name}{r.specifier}")
EOF
)
# pip then lists sglang's skipped pins as "dependency conflicts": expected
# shellcheck disable=SC2086
$PIP $REQS 2>&1 | grep -v -E "^sglang .* requires|dependency conflicts|dependency resolver" || true
SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -W ignore -c \
  "import sglang.srt.entrypoints.http_server, sglang_router.launch_router, sgl_kernel" >/dev/null
touch "$STAMP"
echo "$READY: $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
