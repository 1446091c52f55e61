#!/usr/bin/env bash
# Set up splitc on a fresh Debian/Ubuntu machine: the cross toolchains and a virtualenv with
# pinned dependencies. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for tool in aarch64-linux-gnu-g++ arm-linux-gnueabihf-g++; do
  command -v "$tool" >/dev/null || need_apt+=("g++-${tool%-g++}")
done
command -v file >/dev/null || need_apt+=(file)
command -v dot >/dev/null || need_apt+=(graphviz)  # `splitc inspect --draw` lays out with dot
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing ${need_apt[*]} (Debian packages)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.splitc-deps
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch is pinned to the CPU build: a bare `torch` requirement pulls a multi-GB CUDA build.
  .venv/bin/python -m pip install -q -e '.[compiler,test,bench]'
  touch "$stamp"
fi
.venv/bin/python - <<'PY'
import tvm, tvm_ffi, torch
assert tvm_ffi.__version__ == "0.1.14.post1", f"apache-tvm-ffi {tvm_ffi.__version__}: pin 0.1.14.post1"
print(f"splitc environment ready: TVM {tvm.__version__}, torch {torch.__version__}")
PY
