#!/usr/bin/env bash
# Tools venv for the CPU checks against real SGLang (tests marked `sglang_cpu`): sglang's own server-argument parser
# and the prebuilt sglang-router. Never a dependency of the package; git-ignored; `.ci/run` recreates it.
#   bash tools/setup_sglang_cpu.sh [PROJECT_PYTHON]      (default .venv/bin/python, the `make install` venv)
# sglang is installed with --no-deps (its pins pull torch 2.14.1 + CUDA 13). torch, numpy, transformers ... come
# from the project venv through a .pth file; the modules `sglang.srt.server_args` imports on top of them are listed
# below. triton is imported at module level by sglang.srt.utils.common (no kernel runs here).
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VERSION=0.5.23          # keep equal to setup.py's gpu extra
SGLANG_ROUTER_VERSION=0.3.2    # keep equal to setup.py's gpu extra
TRITON_VERSION=3.9.0
PY=${1:-.venv/bin/python}
VENV=tools/.venv-sglang
STAMP="$VENV/.ready-sglang-$SGLANG_VERSION-router-$SGLANG_ROUTER_VERSION"
[ -f "$STAMP" ] && { echo "$VENV ready (sglang $SGLANG_VERSION, sglang-router $SGLANG_ROUTER_VERSION)"; exit 0; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"   # kept between runs: pip skips what is already there
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/_project_venv.pth"
PIP="$VENV/bin/pip install -q --disable-pip-version-check"
$PIP --no-deps "sglang==$SGLANG_VERSION" "sglang-router==$SGLANG_ROUTER_VERSION" "triton==$TRITON_VERSION"
# pip lists sglang's uninstalled pins as "dependency conflicts" here: expected, the parser does not need them
$PIP msgspec orjson pybase64 pyzmq requests starlette ipython setproctitle fastapi uvicorn
"$VENV/bin/python" -c "from sglang.srt.server_args import ServerArgs; import sglang_router.launch_router"
touch "$STAMP"
echo "$VENV ready (sglang $SGLANG_VERSION, sglang-router $SGLANG_ROUTER_VERSION)"
