#!/usr/bin/env bash
# The second CI stack: the versions a GPU user's `pip install -e '.[gpu,test]'` resolves on Python 3.12 (README
# "Tested versions"), in its own git-ignored venv beside `make install`'s .venv (Python 3.11, torch 2.13.0+cpu,
# megatron-core 0.16.1). The pins live here and nowhere else.
#   bash tools/setup_py312.sh            make .venv-py312 (kept between runs; a stamp names the pins)
#   bash tools/setup_py312.sh --python   print the python3.12 it would use, or exit 3 when there is none
# torch 2.14.1 from PyPI is the CUDA 13 build (sglang's pin); it runs on CPU with torch.cuda.is_available() False.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312_TORCH=2.14.1
PY312_MEGATRON_CORE=0.19.2   # the newest on PyPI; needs Python >= 3.12
VENV=.venv-py312
STAMP="$VENV/.ready-torch-$PY312_TORCH-mcore-$PY312_MEGATRON_CORE"

# python3.12 on PATH; else pyenv's newest 3.12.x (its shim answers "command not found" unless that version is
# selected, which is the case on this image where pyenv's global is 3.11).
find_python312() {
  if command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null; then command -v python3.12; return 0; fi
  if command -v pyenv >/dev/null; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -V | tail -1 || true)
    if [ -n "$v" ] && [ -x "$(pyenv root)/versions/$v/bin/python3.12" ]; then
      echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0
    fi
  fi
  return 3
}

if [ "${1:-}" = "--python" ]; then find_python312; exit $?; fi
if [ ! -f "$STAMP" ]; then
  PY=$(find_python312) || { echo "python3.12 not found (PATH or pyenv)" >&2; exit 3; }
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  PIP="$VENV/bin/pip install -q --disable-pip-version-check"
  $PIP --upgrade pip
  $PIP "torch==$PY312_TORCH" "megatron-core==$PY312_MEGATRON_CORE"
  $PIP -e '.[test]' "torch==$PY312_TORCH" "megatron-core==$PY312_MEGATRON_CORE"
  touch "$STAMP"
fi
# The versions this stack really has, for the CI log
"$VENV/bin/python" - <<'PY'
import sys
from importlib.metadata import version
names = ["torch", "megatron-core", "transformers", "numpy", "pytest"]
print(f"py312 stack: Python {sys.version.split()[0]}, "
      + ", ".join(f"{n} {version(n)}" for n in names))
PY
