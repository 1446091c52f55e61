#!/usr/bin/env bash
# Build (once) TVM's C++ RPC server (apps/cpp_rpc) for armv7 hard float (armhf), with the TVM
# runtime and tvm-ffi libraries it loads, cross-compiled by arm-linux-gnueabihf-g++. There is
# no armhf wheel of apache-tvm, so a PYNQ-Z1-class board cannot run the Python tune agent:
# `splitc tune --target pynq-z1-arm --rpc` measures through this server instead (it speaks
# the same RPC protocol and registers with the tracker under --key). The `arm` test suite runs
# it under qemu-arm. Needs the cross compiler (Debian's g++-arm-linux-gnueabihf), cmake,
# ninja, qemu-user-static (installed here if missing: root), ~200 MB of disk and, on two
# cores, about six minutes. Cached: a second run only checks.
#   scripts/armhf-rpc.sh [--src DIR|TARBALL] [OUT]     (default OUT: .cache/armhf-rpc)
# Sources: --src (or SPLITC_TVM_SRC), a TVM source tree or a .tar.gz of one; without it,
# `git clone --branch v0.27.0` from GitHub. The runtime sources (src/runtime,
# include/tvm/runtime) are then taken from the installed apache-tvm wheel, which ships them,
# and tvm-ffi from the sdist of the installed apache-tvm-ffi version (PyPI, checked against its
# sha256): the board's runtime is the one the compiling machine's TVM generates code for,
# whatever snapshot of the tree around it was given.
# Leaves OUT/bin/tvm_rpc and OUT/lib/lib{tvm_runtime,tvm_runtime_extra,tvm_ffi}.so; run as
#   LD_LIBRARY_PATH=OUT/lib qemu-arm-static -L /usr/arm-linux-gnueabihf OUT/bin/tvm_rpc server \
#     --tracker=HOST:PORT --key=pynq-z1-arm
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${SPLITC_TVM_SRC:-}
OUT=
while [ $# -gt 0 ]; do
  case "$1" in
    --src) SRC=$2; shift 2 ;;
    --src=*) SRC=${1#--src=}; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) OUT=$1; shift ;;
  esac
done
OUT=${OUT:-${SPLITC_ARMHF_RPC:-.cache/armhf-rpc}}
if [ -f "$OUT/.splitc-ready-v1" ]; then echo "$OUT ready"; exit 0; fi

for tool in arm-linux-gnueabihf-g++ cmake ninja; do
  command -v "$tool" >/dev/null || {
    echo "error: $tool not found (apt-get install g++-arm-linux-gnueabihf cmake ninja-build)" >&2
    exit 2; }
done
if ! command -v qemu-arm-static >/dev/null; then
  [ "$(id -u)" = 0 ] || {
    echo "error: qemu-user-static is missing; installing it needs root" >&2; exit 2; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null
fi

PY=.venv/bin/python
site=$("$PY" -c 'import os, tvm; print(os.path.dirname(tvm.__file__))' 2>/dev/null) || {
  echo "error: no apache-tvm in $PY (run scripts/setup.sh)" >&2; exit 2; }
ffi_version=$("$PY" -c 'import tvm_ffi; print(tvm_ffi.__version__)')

mkdir -p "$OUT/src"
OUT=$(cd "$OUT" && pwd)
tree="$OUT/src/tvm"
# (sources prepared once: an interrupted build resumes where it stopped)
if [ ! -f "$OUT/src/.ready" ]; then
  rm -rf "$tree"
  if [ -n "$SRC" ]; then
    if [ -d "$SRC" ]; then
      mkdir -p "$tree"
      (cd "$SRC" && tar -c --exclude=./.git --exclude=./build .) | tar -x -C "$tree"
    elif [ -f "$SRC" ]; then
      mkdir -p "$tree" && tar -xzf "$SRC" -C "$tree"
      # a tarball holding one top folder: use that folder
      if [ ! -f "$tree/CMakeLists.txt" ] && [ "$(ls "$tree" | wc -l)" = 1 ]; then
        top=$(ls "$tree"); mv "$tree/$top" "$tree.tmp" && rmdir "$tree" && mv "$tree.tmp" "$tree"
      fi
    else
      echo "error: --src $SRC: no such directory or tarball" >&2; exit 2
    fi
  elif ! git clone -q --depth 1 --branch v0.27.0 https://github.com/apache/tvm "$tree"; then
    echo "error: cannot clone apache/tvm from GitHub: give a TVM source tree with --src DIR" \
         "(or a .tar.gz of one, or SPLITC_TVM_SRC)" >&2
    exit 2
  fi
  [ -f "$tree/apps/cpp_rpc/main.cc" ] || {
    echo "error: $tree holds no TVM tree (apps/cpp_rpc)" >&2; exit 2; }

  # The installed wheel's runtime sources and headers (what the host's TVM generates code for).
  cp -r "$site/src/runtime/." "$tree/src/runtime/"
  cp -r "$site/include/tvm/runtime/." "$tree/include/tvm/runtime/"

  # tvm-ffi: the sdist of the installed version, whatever the tree's submodule holds.
  sdist="apache_tvm_ffi-$ffi_version.tar.gz"
  if [ ! -f "$OUT/$sdist" ]; then
    link=$(curl -fsS https://pypi.org/simple/apache-tvm-ffi/ \
           | grep -o "https://[^\"]*/$sdist#sha256=[0-9a-f]*" | head -1)
    [ -n "$link" ] || { echo "error: no $sdist on PyPI" >&2; exit 2; }
    curl -fsS -o "$OUT/$sdist.part" "${link%%#*}"
    echo "${link##*#sha256=}  $OUT/$sdist.part" | sha256sum -c --quiet
    mv "$OUT/$sdist.part" "$OUT/$sdist"
  fi
  rm -rf "$tree/3rdparty/tvm-ffi" && mkdir -p "$tree/3rdparty/tvm-ffi"
  tar -xzf "$OUT/$sdist" -C "$tree/3rdparty/tvm-ffi" --strip-components=1
  touch "$OUT/src/.ready"
fi

# tvm-ffi needs CMake >= 3.26 (Debian bookworm has 3.25): then PyPI's, in a venv of its own
CMAKE=cmake
if ! printf '3.26\n%s\n' "$(cmake --version | sed -n 's/^cmake version //p')" | sort -V -C; then
  [ -x "$OUT/tools/bin/cmake" ] || {
    python3 -m venv "$OUT/tools" && "$OUT/tools/bin/pip" install -q 'cmake>=3.26'; }
  CMAKE="$OUT/tools/bin/cmake"
fi

build="$OUT/build"
export GIT_CEILING_DIRECTORIES="$OUT/src"  # the tree's commit, not the enclosing repository's
"$CMAKE" -S "$tree" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=arm \
  -DCMAKE_C_COMPILER=arm-linux-gnueabihf-gcc -DCMAKE_CXX_COMPILER=arm-linux-gnueabihf-g++ \
  -DCMAKE_FIND_ROOT_PATH=/usr/arm-linux-gnueabihf \
  -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY \
  -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY -DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=ONLY \
  -DUSE_LLVM=OFF -DUSE_LIBBACKTRACE=OFF -DUSE_RPC=ON -DUSE_CPP_RPC=ON -DUSE_GTEST=OFF \
  -DUSE_Z3=OFF -DUSE_CCACHE=OFF -DUSE_ALTERNATIVE_LINKER=OFF \
  -DTVM_FFI_USE_LIBBACKTRACE=OFF -DTVM_FFI_BUILD_PYTHON_MODULE=OFF >"$OUT/cmake.log" 2>&1 \
  || { tail -30 "$OUT/cmake.log" >&2; exit 1; }
# two jobs at most, at the lowest priority: the build shares the machine
start=$(date +%s)
nice -n 19 "$CMAKE" --build "$build" --target tvm_rpc -- -j2
echo "built in $(( $(date +%s) - start )) s"

mkdir -p "$OUT/bin" "$OUT/lib"
cp "$build/tvm_rpc" "$OUT/bin/"
find "$build" -name 'libtvm_runtime*.so' -o -name 'libtvm_ffi.so' | xargs -r cp -t "$OUT/lib/"
usage=$(LD_LIBRARY_PATH="$OUT/lib" qemu-arm-static -L /usr/arm-linux-gnueabihf \
        "$OUT/bin/tvm_rpc" 2>&1 || true)
case "$usage" in *--tracker*) ;; *) echo "error: the armhf tvm_rpc does not run under qemu-arm:" \
  "$usage" >&2; exit 1 ;; esac
touch "$OUT/.splitc-ready-v1"
echo "$OUT ready"
